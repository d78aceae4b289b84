"""The zoo member: a stacked LSTM with a linear read-out, held as one flat vector.

Every encoder, check and importer needs the same facts about a member's weight
space (which tensor lies where in the flat vector, which axes share a hidden-neuron
permutation), so they live in one frozen `LSTMSpec`, the way nfn's `NetworkSpec`
serves all its layers. The flat layout is exactly
`torch.cat([p.flatten() for p in (lstm, linear).parameters()])` of
`nn.LSTM(I, H, L, batch_first=True)` + `nn.Linear(H, O)`, which is also the layout of
the published reference zoos.

The functional forward runs K different weight sets on K batches at once with
batched matmuls: that is what trains a zoo's members together and what lets the
probing encoders feed learned inputs through many members, differentiably.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

State = tuple[Tensor, Tensor]  # h, c: each (L, K, B, H)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int
    layer: int  # LSTM layer index; `num_layers` for the read-out

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class LSTMSpec:
    """Sizes of a member; everything else (tensor order, offsets) follows from them."""

    input_size: int
    output_size: int
    hidden_size: int = 32
    num_layers: int = 2

    def __post_init__(self) -> None:
        for field in ("input_size", "output_size", "hidden_size", "num_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"LSTMSpec.{field} must be positive, got {getattr(self, field)}")

    @cached_property
    def tensors(self) -> tuple[TensorSpec, ...]:
        H, out = self.hidden_size, []
        offset = 0
        for layer in range(self.num_layers):
            fan_in = self.input_size if layer == 0 else H
            for name, shape in (
                (f"weight_ih_l{layer}", (4 * H, fan_in)),
                (f"weight_hh_l{layer}", (4 * H, H)),
                (f"bias_ih_l{layer}", (4 * H,)),
                (f"bias_hh_l{layer}", (4 * H,)),
            ):
                out.append(TensorSpec(name, shape, offset, layer))
                offset += out[-1].numel
        for name, shape in (("linear.weight", (self.output_size, H)), ("linear.bias", (self.output_size,))):
            out.append(TensorSpec(name, shape, offset, self.num_layers))
            offset += out[-1].numel
        return tuple(out)

    @property
    def num_params(self) -> int:
        last = self.tensors[-1]
        return last.offset + last.numel

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, int]:
        return {
            "input_size": self.input_size,
            "output_size": self.output_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }


# --------------------------------------------------------------------------- layout


def unflatten(spec: LSTMSpec, flat: Tensor) -> dict[str, Tensor]:
    """Views of `flat[..., P]` as named tensors `[..., *shape]` (no copy)."""
    if flat.shape[-1] != spec.num_params:
        raise ValueError(f"expected {spec.num_params} parameters for {spec}, got {flat.shape[-1]}")
    lead = flat.shape[:-1]
    return {
        t.name: flat[..., t.offset : t.offset + t.numel].reshape(*lead, *t.shape) for t in spec.tensors
    }


def flatten(spec: LSTMSpec, named: dict[str, Tensor]) -> Tensor:
    """Inverse of `unflatten`; leading batch dimensions are kept."""
    first = named[spec.tensors[0].name]
    lead = first.shape[: first.dim() - len(spec.tensors[0].shape)]
    return torch.cat([named[t.name].reshape(*lead, t.numel) for t in spec.tensors], dim=-1)


def init_params(spec: LSTMSpec, generators: list[torch.Generator]) -> Tensor:
    """PyTorch's default init, one generator per member.

    `nn.LSTM` draws every tensor from U(-1/sqrt(H), 1/sqrt(H)); `nn.Linear(H, O)` draws
    weight and bias from U(-1/sqrt(H), 1/sqrt(H)) too, so one uniform draw over the
    whole flat vector has the same distribution.
    """
    bound = spec.hidden_size**-0.5
    rows = [torch.rand(spec.num_params, generator=g) for g in generators]
    return (torch.stack(rows) * 2 - 1) * bound


def to_modules(spec: LSTMSpec, flat: Tensor) -> tuple[torch.nn.LSTM, torch.nn.Linear]:
    """A single member as `torch.nn` modules (the reference's own architecture)."""
    lstm = torch.nn.LSTM(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True)
    linear = torch.nn.Linear(spec.hidden_size, spec.output_size)
    named = unflatten(spec, flat.detach().float().reshape(-1))
    with torch.no_grad():
        for name, p in list(lstm.named_parameters()) + [
            ("linear." + n, p) for n, p in linear.named_parameters()
        ]:
            p.copy_(named[name])
    return lstm, linear


def from_modules(lstm: torch.nn.LSTM, linear: torch.nn.Linear) -> Tensor:
    return torch.cat([p.detach().flatten() for p in (*lstm.parameters(), *linear.parameters())])


# --------------------------------------------------------------------------- forward


def zero_state(spec: LSTMSpec, k: int, b: int, like: Tensor) -> State:
    z = like.new_zeros(spec.num_layers, k, b, spec.hidden_size)
    return z, z.clone()


IMPLS = ("fused", "autograd")


def forward(
    spec: LSTMSpec, flat: Tensor, x: Tensor, state: State | None = None, impl: str = "fused"
) -> tuple[Tensor, State]:
    """Run K weight sets `flat[K, P]` on their own inputs `x[K, B, T, I]`.

    Returns logits `[K, B, T, O]` and the final state `(h, c)`, each `[L, K, B, H]`.
    `impl="fused"` runs each layer in a custom autograd function with a hand-written
    backward (see `_LSTMLayer`); `impl="autograd"` is the same math in plain ops, the
    check for that gradient.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown LSTM implementation {impl!r}: choose one of {IMPLS}")
    K, B, T, _ = x.shape
    p = unflatten(spec, flat)
    H = spec.hidden_size
    if state is None:
        state = zero_state(spec, K, B, x)
    h_all, c_all = state
    hs, cs = [], []
    seq = x.transpose(1, 2)  # [K, T, B, I]: time-major within each member
    for layer in range(spec.num_layers):
        w_ih, w_hh = p[f"weight_ih_l{layer}"], p[f"weight_hh_l{layer}"]
        bias = p[f"bias_ih_l{layer}"] + p[f"bias_hh_l{layer}"]
        if impl == "fused":
            order = _OIFG[H]
            seq, h, c = _LSTMLayer.apply(
                seq, w_ih[:, order], w_hh[:, order], bias[:, order], h_all[layer], c_all[layer]
            )
        else:
            seq, h, c = _layer_autograd(seq, w_ih, w_hh, bias, h_all[layer], c_all[layer])
        hs.append(h)
        cs.append(c)
    logits = torch.baddbmm(
        p["linear.bias"].unsqueeze(1), seq.reshape(K, T * B, H), p["linear.weight"].transpose(1, 2)
    ).reshape(K, T, B, spec.output_size)
    return logits.transpose(1, 2), (torch.stack(hs), torch.stack(cs))


def step(spec: LSTMSpec, flat: Tensor, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """One time step: `x[K, B, I]` -> logits `[K, B, O]`; for sampling and probing."""
    logits, state = forward(spec, flat, x.unsqueeze(2), state)
    return logits.squeeze(2), state


def _layer_autograd(
    seq: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor, h: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """seq `[K, T, B, I]`, PyTorch gate order (i, f, g, o) -> outputs `[K, T, B, H]`, h, c."""
    K, T, B, _ = seq.shape
    H = h.shape[-1]
    pre = torch.baddbmm(bias.unsqueeze(1), seq.reshape(K, T * B, -1), w_ih.transpose(1, 2))
    w_hh_t = w_hh.transpose(1, 2)
    outs = []
    for pre_t in pre.reshape(K, T, B, 4 * H).unbind(1):  # unbind: one stack in backward, not T zero-fills
        i, f, g, o = torch.baddbmm(pre_t, h, w_hh_t).split(H, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), h, c


class _GateOrder(dict):
    """Row index that reorders PyTorch's (i, f, g, o) gate blocks to (o, i, f, g).

    With o, i, f first, one sigmoid covers all sigmoid gates in the forward; with
    i, f, g last, one broadcast multiply by dc gives their gradients in the backward.
    """

    def __missing__(self, H: int) -> Tensor:
        r = torch.arange(H)
        self[H] = torch.cat([r + 3 * H, r, r + H, r + 2 * H])
        return self[H]


_OIFG = _GateOrder()


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer of K members, gates (o, i, f, g), with a hand-written backward.

    At these sizes (B = 32, H = 32) the cost is per-op overhead, not arithmetic, so
    the point is few ops per time step: 7 in the forward, 5 in the backward. Every
    elementwise factor the backward needs is precomputed for all steps at once, and
    the weight gradients are single large matmuls after the time loop.
    """

    @staticmethod
    def forward(ctx, seq, w_ih, w_hh, bias, h0, c0):
        K, T, B, _ = seq.shape
        H = h0.shape[-1]
        acts = torch.baddbmm(bias.unsqueeze(1), seq.reshape(K, T * B, -1), w_ih.transpose(1, 2))
        acts = acts.reshape(K, T, B, 4 * H)
        hs = acts.new_empty(K, T + 1, B, H)
        cs = torch.empty_like(hs)
        tanh_c = acts.new_empty(K, T, B, H)
        hs[:, 0], cs[:, 0] = h0, c0
        w_hh_t = w_hh.transpose(1, 2)
        for t in range(T):
            a = acts[:, t]
            a.baddbmm_(hs[:, t], w_hh_t)
            a[..., : 3 * H].sigmoid_()
            a[..., 3 * H :].tanh_()
            c = cs[:, t + 1]
            torch.mul(a[..., 2 * H : 3 * H], cs[:, t], out=c)
            c.addcmul_(a[..., H : 2 * H], a[..., 3 * H :])
            torch.tanh(c, out=tanh_c[:, t])
            torch.mul(a[..., :H], tanh_c[:, t], out=hs[:, t + 1])
        ctx.save_for_backward(seq, w_ih, w_hh, acts, hs, cs, tanh_c)
        return hs[:, 1:], hs[:, T].clone(), cs[:, T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        seq, w_ih, w_hh, acts, hs, cs, tanh_c = ctx.saved_tensors
        K, T, B, G = acts.shape
        H = G // 4
        a4 = acts.view(K, T, B, 4, H)
        o, i, f, g = a4.unbind(3)
        # dc_t = dc_{t+1} f_{t+1} + dh_t * o (1 - tanh(c)^2)
        dc_from_dh = o * (1 - tanh_c * tanh_c)
        # d(pre-activation) = dh * q_o for o; dc * q_x for x in (i, f, g)
        q = torch.empty_like(a4)
        q[:, :, :, 0] = tanh_c * o * (1 - o)
        q[:, :, :, 1] = g * i * (1 - i)
        q[:, :, :, 2] = cs[:, :-1] * f * (1 - f)
        q[:, :, :, 3] = i * (1 - g * g)
        d_acts = torch.empty_like(a4)
        if d_out is None:
            d_out = acts.new_zeros(K, T, B, H)
        dh = d_out[:, T - 1] if d_hT is None else d_out[:, T - 1] + d_hT
        dc = acts.new_zeros(K, B, H) if d_cT is None else d_cT.clone()
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = torch.baddbmm(d_out[:, t], d_acts[:, t + 1].reshape(K, B, G), w_hh)
                dc.mul_(f[:, t + 1])
            dc.addcmul_(dh, dc_from_dh[:, t])
            torch.mul(dc.unsqueeze(2), q[:, t, :, 1:], out=d_acts[:, t, :, 1:])
            torch.mul(dh, q[:, t, :, 0], out=d_acts[:, t, :, 0])
        d_pre = d_acts.reshape(K, T * B, G)
        d_pre_t = d_pre.transpose(1, 2)
        d_w_hh = torch.bmm(d_pre_t, hs[:, :-1].reshape(K, T * B, H))
        d_w_ih = torch.bmm(d_pre_t, seq.reshape(K, T * B, -1))
        d_bias = d_pre.sum(1)
        d_seq = torch.bmm(d_pre, w_ih).reshape(seq.shape) if ctx.needs_input_grad[0] else None
        d_h0 = torch.bmm(d_acts[:, 0].reshape(K, B, G), w_hh)
        d_c0 = dc * f[:, 0]
        return d_seq, d_w_ih, d_w_hh, d_bias, d_h0, d_c0


# --------------------------------------------------------------------------- symmetry


def permute_hidden(spec: LSTMSpec, flat: Tensor, perms: list[Tensor]) -> Tensor:
    """Permute the hidden neurons of each layer; the member's function is unchanged.

    `perms[l]` is a permutation of range(H) for layer l (shape [H], or [K, H] for one
    per member). Neuron j of layer l moves to position perms[l][j]'s inverse, i.e.
    new neuron n is old neuron perms[l][n]. Gate rows move together: row g*H + n of
    every gate block, the matching columns of `weight_hh_l` and of the next layer's
    `weight_ih` (or the read-out's weight).
    """
    if len(perms) != spec.num_layers:
        raise ValueError(f"need one permutation per layer ({spec.num_layers}), got {len(perms)}")
    flat2 = flat if flat.dim() == 2 else flat.unsqueeze(0)
    K, H = flat2.shape[0], spec.hidden_size
    p = unflatten(spec, flat2)
    idx = [pm.expand(K, H) if pm.dim() == 1 else pm for pm in perms]
    out = dict(p)

    def rows(t: Tensor, perm: Tensor) -> Tensor:  # t: [K, 4H, ...] gate blocks
        gate_perm = torch.cat([perm + g * H for g in range(4)], dim=1)  # [K, 4H]
        shape = gate_perm.shape + (1,) * (t.dim() - 2)
        return t.gather(1, gate_perm.reshape(shape).expand_as(t))

    def cols(t: Tensor, perm: Tensor) -> Tensor:  # t: [K, R, H]
        return t.gather(2, perm.unsqueeze(1).expand_as(t))

    for layer in range(spec.num_layers):
        perm = idx[layer]
        for name in (f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}", f"bias_hh_l{layer}"):
            out[name] = rows(out[name], perm)
        out[f"weight_hh_l{layer}"] = cols(out[f"weight_hh_l{layer}"], perm)
        nxt = f"weight_ih_l{layer + 1}" if layer + 1 < spec.num_layers else "linear.weight"
        out[nxt] = cols(out[nxt], perm)
    result = flatten(spec, out)
    return result if flat.dim() == 2 else result.squeeze(0)


def random_permutations(spec: LSTMSpec, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """One random hidden-neuron permutation per layer and member: `[K, H]` each."""
    return [
        torch.argsort(torch.rand(k, spec.hidden_size, generator=generator), dim=1)
        for _ in range(spec.num_layers)
    ]
