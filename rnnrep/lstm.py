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
from functools import cache, cached_property

import torch
from torch import Tensor

from rnnrep import cell

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
STEP_IMPL = "autograd"


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
    if impl == "autograd":
        return _forward_autograd(spec, flat, x, state)
    K, B, T, _ = x.shape
    p = unflatten(spec, flat)
    H = spec.hidden_size
    seq = x.permute(2, 0, 3, 1)  # [T, K, I, B]: time-major, features before batch
    hs, cs = [], []
    for layer in range(spec.num_layers):
        w = _gate_major(p, layer)  # [K, 4H, I + H + 1], gates (o, i, f, g)
        h0 = c0 = None
        if state is not None:
            h0, c0 = state[0][layer].transpose(1, 2), state[1][layer].transpose(1, 2)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (seq, w, h0, c0)
        ):
            seq, h, c = _LSTMLayer.apply(seq, w, h0, c0)
        else:  # no autograd bookkeeping: what sampling one step at a time needs
            z, _, c, _, _ = _scan(seq, w, h0, c0, grad=False)
            seq, h = z[1:, :, -H - 1 : -1], z[T, :, -H - 1 : -1]
        hs.append(h.transpose(1, 2))
        cs.append(c.transpose(1, 2))
    # read-out: logits^T [K, O, T*B] = W_out [K, O, H] @ outputs [K, H, T*B]
    out = seq.permute(1, 2, 0, 3).reshape(K, H, T * B)
    logits = torch.baddbmm(p["linear.bias"].unsqueeze(-1), p["linear.weight"], out)
    return logits.view(K, -1, T, B).permute(0, 3, 2, 1), (torch.stack(hs), torch.stack(cs))


def step(spec: LSTMSpec, flat: Tensor, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """One differentiable time step: `x[K, B, I]` -> logits `[K, B, O]`, for inputs that
    depend on earlier outputs (the interactive encoder has its own node for speed;
    the tests check it against this).

    A single step has no time loop to fuse, and the fused layer's set-up (gate-major
    weights, buffers) then costs more than it saves: plain autograd ops are faster here
    (26-32 vs 36-52 µs per member, measured). No-grad sampling uses `Stepper`.
    """
    logits, state = forward(spec, flat, x.unsqueeze(2), state, impl=STEP_IMPL)
    return logits.squeeze(2), state


class Stepper:
    """Single no-grad steps of K members on N sequences each, for sampling.

    The prepared weights (the same `[K, 4H, D]` gate-major blocks as `forward`) and the
    state buffers are made once, not at every step: a step is then one matmul and
    seven elementwise ops per layer (the no-grad `_scan`'s, so outputs match `forward`
    run on the same inputs), plus one copy of each layer's h into the next layer's input.
    Everything is in the transposed layout: inputs `[K, I, N]`, logits `[K, O, N]`.
    """

    def __init__(self, spec: LSTMSpec, flat: Tensor, n: int) -> None:
        flat = flat.detach()
        K, H = flat.shape[0], spec.hidden_size
        p = unflatten(spec, flat)
        self.spec, self.n = spec, n
        self.w, self.z = [], []
        for layer in range(spec.num_layers):
            self.w.append(_gate_major(p, layer))
            self.z.append(flat.new_empty(K, self.w[-1].shape[2], n))
        self.w_out, self.b_out = p["linear.weight"].contiguous(), p["linear.bias"].unsqueeze(-1).contiguous()
        self.c = flat.new_empty(spec.num_layers, K, H, n)
        self.acts = flat.new_empty(K, 4 * H, n)
        self.tanh_c = flat.new_empty(K, H, n)
        self.reset()

    def reset(self) -> None:
        """Zero state."""
        for z in self.z:
            z.zero_()
            z[:, -1] = 1
        self.c.zero_()

    @property
    def input(self) -> Tensor:
        """The next step's input `[K, I, N]`, to be filled in place."""
        return self.z[0][:, : self.spec.input_size]

    @torch.no_grad()
    def __call__(self, x: Tensor | None = None) -> Tensor:
        """One step on `x[K, I, N]` (or on `input` as filled): logits `[K, O, N]`."""
        if x is not None:
            self.input.copy_(x)
        H, acts, tanh_c = self.spec.hidden_size, self.acts, self.tanh_c
        o, i, f, g, sig = acts[:, :H], acts[:, H : 2 * H], acts[:, 2 * H : 3 * H], acts[:, 3 * H :], acts[:, : 3 * H]
        L = len(self.w)
        kernel = cell.kernels(acts)
        for layer in range(L):
            z, c = self.z[layer], self.c[layer]
            I = z.shape[1] - H - 1
            torch.bmm(self.w[layer], z, out=acts)
            h = z[:, I : I + H]
            if kernel is not None:  # the cell in C, as in `_scan`: c in place, h into z
                K, D, N = z.shape
                h_p = z.data_ptr() + I * N * z.element_size()
                kernel[0](K, H * N, acts.data_ptr(), c.data_ptr(), c.data_ptr(), h_p, D * N, None, None, None)
            else:
                sig.sigmoid_()
                g.tanh_()
                c.mul_(f)  # f c: the same product as the no-grad `_scan`'s mul(f, c)
                c.addcmul_(i, g)
                torch.tanh(c, out=tanh_c)
                torch.mul(o, tanh_c, out=h)
            if layer + 1 < L:
                self.z[layer + 1][:, :H].copy_(h)
        return torch.baddbmm(self.b_out, self.w_out, h)


def _gate_major(p: dict[str, Tensor], layer: int) -> Tensor:
    """`[K, 4H, I + H + 1]`: input, hidden and summed-bias columns, gate rows (o, i, f, g)."""
    bias = p[f"bias_ih_l{layer}"] + p[f"bias_hh_l{layer}"]
    w = torch.cat([p[f"weight_ih_l{layer}"], p[f"weight_hh_l{layer}"], bias.unsqueeze(-1)], dim=-1)
    return oifg(w, dim=1)


def _forward_autograd(spec: LSTMSpec, flat: Tensor, x: Tensor, state: State | None) -> tuple[Tensor, State]:
    """The reference: plain ops in PyTorch's layout and gate order, autograd's backward."""
    K, B, T, _ = x.shape
    p = unflatten(spec, flat)
    H = spec.hidden_size
    if state is None:
        state = zero_state(spec, K, B, x)
    hs, cs = [], []
    seq = x.transpose(1, 2)  # [K, T, B, I]
    for layer in range(spec.num_layers):
        w_ih, w_hh = p[f"weight_ih_l{layer}"], p[f"weight_hh_l{layer}"]
        bias = p[f"bias_ih_l{layer}"] + p[f"bias_hh_l{layer}"]
        h, c = state[0][layer], state[1][layer]
        pre = torch.baddbmm(bias.unsqueeze(1), seq.reshape(K, T * B, -1), w_ih.transpose(1, 2))
        outs = []
        for pre_t in pre.reshape(K, T, B, 4 * H).unbind(1):
            i, f, g, o = torch.baddbmm(pre_t, h, w_hh.transpose(1, 2)).split(H, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        seq = torch.stack(outs, dim=1)
        hs.append(h)
        cs.append(c)
    logits = torch.baddbmm(
        p["linear.bias"].unsqueeze(1), seq.reshape(K, T * B, H), p["linear.weight"].transpose(1, 2)
    ).reshape(K, T, B, spec.output_size)
    return logits.transpose(1, 2), (torch.stack(hs), torch.stack(cs))


def oifg(t: Tensor, dim: int) -> Tensor:
    """PyTorch's gate blocks (i, f, g, o) along `dim` reordered to (o, i, f, g).

    With o, i, f first, one sigmoid covers all sigmoid gates in the forward; with
    i, f, g last, one broadcast multiply by dc gives their gradients in the backward.
    `index_select`, whose backward is an index_add: measured faster than a cat of
    slices, and than `t[index]`, whose backward is a sorting scatter (about 2.7 ms
    of an interactive training step).
    """
    return t.index_select(dim, _oifg_index(t.shape[dim] // 4, t.device))


def torch_order(t: Tensor, dim: int) -> Tensor:
    """The inverse of `oifg`: gate blocks (o, i, f, g) along `dim` back to PyTorch's (i, f, g, o)."""
    return t.index_select(dim, _oifg_index(t.shape[dim] // 4, t.device).argsort())


@cache
def _oifg_index(H: int, device: torch.device) -> Tensor:
    r = torch.arange(H, device=device)
    return torch.cat([r + 3 * H, r, r + H, r + 2 * H])


def _scan(
    seq: Tensor, w: Tensor, h0: Tensor | None, c0: Tensor | None, grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward recurrence of one layer in the transposed, gate-major layout.

    seq `[T, K, I, B]`, w `[K, 4H, I + H + 1]` (columns: input, hidden, bias; gate rows
    o, i, f, g), h0, c0 `[K, H, B]` or None for zeros. Each step is one matmul
    gates^T = w @ z_t with z_t = [x_t; h_{t-1}; 1] a contiguous `[K, I + H + 1, B]`
    block of the buffer `z`, into which h_t is written directly; every elementwise op
    then runs on blocks of H*B (or 3H*B) contiguous floats.

    With `grad`, each step also computes what the backward needs while it is still in
    cache (an all-steps pass afterwards reads everything back from memory, which costs
    more than the extra ops): q `[T, K, 4H, B]`, d(loss)/d(pre-activation) per unit of
    (dh, dc, dc, dc), and dc_dh `[T, K, H, B]` = o (1 - tanh(c)^2).

    Only the forget gates `[T, K, H, B]` are kept of the gate activations (one step's
    gates live in a reused buffer: writing all steps' to fresh memory costs more than
    the copy of f). Returns z `[T + 1, K, I + H + 1, B]` (h_t is z[t + 1, :, I : I + H]),
    the forget gates, c_T `[K, H, B]`, q and dc_dh (the last three None without `grad`).
    """
    T, K, I, B = seq.shape
    G, D = w.shape[1], w.shape[2]
    H = G // 4
    z = seq.new_empty(T + 1, K, D, B)
    z[:T, :, :I] = seq
    z[T, :, :I] = 0
    z[:, :, D - 1] = 1
    if h0 is None:
        z[0, :, I : I + H] = 0
    else:
        z[0, :, I : I + H] = h0
    acts = seq.new_empty(K, G, B)  # one step's gates: reused, so it stays in cache
    c_buf = seq.new_empty(2, K, H, B)  # c_t, c_{t+1}: ping-pong
    c_buf[0].zero_() if c0 is None else c_buf[0].copy_(c0)
    f_all = q = dc_dh = None
    if grad:
        q = seq.new_empty(T, K, G, B)
        dc_dh = seq.new_empty(T, K, H, B)
        f_all = seq.new_empty(T, K, H, B)  # the backward's only use of the gates
    kernel = cell.kernels(seq)
    if kernel is not None:  # one C call per step for the elementwise work (rnnrep/cell.py)
        _scan_steps_c(kernel[0], w, z, acts, c_buf, T, I, H, f_all, q, dc_dh)
    else:
        _scan_steps_torch(w, z, acts, c_buf, T, I, H, f_all, q, dc_dh)
    return z, f_all, c_buf[T % 2], q, dc_dh


def _scan_steps_c(fwd, w, z, acts, c_buf, T, I, H, f_all, q, dc_dh) -> None:
    """`_scan`'s time loop with the cell in C: a matmul and one kernel call per step.

    Pointers advance by byte offsets computed here, so a step costs no tensor views.
    """
    K, D, B = z.shape[1:]
    HB, size = H * B, z.element_size()
    zs = z.unbind(0)
    acts_p, c_p = acts.data_ptr(), (c_buf[0].data_ptr(), c_buf[1].data_ptr())
    h_p, h_step = z.data_ptr() + (K * D * B + I * B) * size, K * D * B * size
    step = K * HB * size
    f_p, d_p, q_p = (None if t is None else t.data_ptr() for t in (f_all, dc_dh, q))
    for t in range(T):
        torch.bmm(w, zs[t], out=acts)
        if f_p is None:
            fwd(K, HB, acts_p, c_p[t % 2], c_p[(t + 1) % 2], h_p + t * h_step, D * B, None, None, None)
        else:
            fwd(K, HB, acts_p, c_p[t % 2], c_p[(t + 1) % 2], h_p + t * h_step, D * B,
                f_p + t * step, q_p + 4 * t * step, d_p + t * step)


def _scan_steps_torch(w, z, acts, c_buf, T, I, H, f_all, q, dc_dh) -> None:
    """`_scan`'s time loop with the cell in torch ops (GPUs, or no C compiler)."""
    K, B, G = z.shape[1], z.shape[3], 4 * H
    grad = f_all is not None
    tanh_c = acts.new_empty(K, H, B)
    # per-step views, made once: slicing in the loop would cost as much as the math
    o, i, f, g, sig = (acts[:, s] for s in (slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H), slice(3 * H, G), slice(0, 3 * H)))
    zs, hs = z.unbind(0), z[:, :, I : I + H].unbind(0)
    c = c_buf[0]
    if grad:
        fs = f_all.unbind(0)
        pm = acts.new_empty(K, 2 * H, B)  # p = i g, m = f c_{t-1}
        p, m = pm[:, :H], pm[:, H:]
        q_o, q_if, q_g = (q[:, :, s].unbind(0) for s in (slice(0, H), slice(H, 3 * H), slice(3 * H, G)))
        i_f = acts[:, H : 3 * H]
    for t in range(T):
        torch.bmm(w, zs[t], out=acts)
        sig.sigmoid_()
        g.tanh_()
        c_new = c_buf[(t + 1) % 2]
        if grad:
            fs[t].copy_(f)
            torch.mul(f, c, out=m)
            torch.mul(i, g, out=p)
            torch.addcmul(m, i, g, out=c_new)  # not m + p: same rounding as without grad
        else:
            torch.mul(f, c, out=c_new)
            c_new.addcmul_(i, g)
        c = c_new
        torch.tanh(c, out=tanh_c)
        h = torch.mul(o, tanh_c, out=hs[t + 1])
        if grad:
            torch.addcmul(pm, pm, i_f, value=-1, out=q_if[t])  # g i (1 - i), c f (1 - f)
            torch.addcmul(h, h, o, value=-1, out=q_o[t])  # tanh(c) o (1 - o)
            torch.addcmul(i, p, g, value=-1, out=q_g[t])  # i (1 - g^2)
            torch.addcmul(o, h, tanh_c, value=-1, out=dc_dh[t])  # o (1 - tanh(c)^2)


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer of K members (see `_scan`) with a hand-written backward.

    At these sizes (B = 32, H = 32) the cost is per-op overhead and memory traffic,
    not arithmetic, so the point is few ops per step, each on contiguous blocks that
    are still in cache: 12 in the forward, 6 in the backward (+1 for the input
    gradient), and no pass over all steps at once.
    """

    @staticmethod
    def forward(ctx, seq, w, h0, c0):
        z, f, c, q, dc_dh = _scan(seq, w, h0, c0, grad=True)
        ctx.save_for_backward(w, z, f, q, dc_dh)
        ctx.has_state = h0 is not None
        H = c.shape[1]
        T = seq.shape[0]
        return z[1:, :, -H - 1 : -1], z[T, :, -H - 1 : -1].clone(), c.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        w, z, f_all, q, dc_dh_all = ctx.saved_tensors
        T, K, G, B = q.shape
        H, D = G // 4, w.shape[2]
        I = D - H - 1
        d_acts = w.new_empty(2, K, G, B)  # steps t, t + 1: ping-pong
        d_out = d_out.contiguous().unbind(0)
        z_t = z.transpose(2, 3).unbind(0)
        w_h_t = w[:, :, I : I + H].transpose(1, 2).contiguous()  # [K, H, 4H]
        need_x = ctx.needs_input_grad[0]
        if need_x:
            w_x_t = w[:, :, :I].transpose(1, 2).contiguous()
            d_seq = w.new_empty(T, K, I, B)
            d_seq_t = d_seq.unbind(0)
        need_w = ctx.needs_input_grad[1]  # not where the members are data (probing encoders)
        d_w = w.new_zeros(K, G, D) if need_w else None
        dc = d_cT.clone(memory_format=torch.contiguous_format)
        kernel = cell.kernels(w)
        if kernel is not None:  # byte pointers of each step's blocks, as in `_scan_steps_c`
            size, HB = w.element_size(), H * B
            f_p, dcdh_p, q_p = f_all.data_ptr(), dc_dh_all.data_ptr(), q.data_ptr()
            step, dc_p, acts_p = K * HB * size, dc.data_ptr(), (d_acts[0].data_ptr(), d_acts[1].data_ptr())
        else:  # per-step views for the cell in torch ops
            f, dc_dh = f_all.unbind(0), dc_dh_all.unbind(0)
            q_o, q_ifg = q[:, :, :H].unbind(0), q[:, :, H:].unflatten(2, (3, H)).unbind(0)
            d_o, d_ifg = d_acts[:, :, :H], d_acts[:, :, H:].unflatten(2, (3, H))
        for t in range(T - 1, -1, -1):
            j = t % 2
            if t == T - 1:
                dh = d_out[t] + d_hT
            else:
                dh = torch.baddbmm(d_out[t], w_h_t, d_acts[1 - j])
            if kernel is not None:
                f_next = None if t == T - 1 else f_p + (t + 1) * step
                kernel[1](K, HB, dh.data_ptr(), dc_p, f_next, dcdh_p + t * step, q_p + 4 * t * step, acts_p[j])
            else:
                if t < T - 1:
                    dc.mul_(f[t + 1])
                dc.addcmul_(dh, dc_dh[t])
                torch.mul(dc.unsqueeze(1), q_ifg[t], out=d_ifg[j])
                torch.mul(dh, q_o[t], out=d_o[j])
            if need_w:
                d_w.baddbmm_(d_acts[j], z_t[t])
            if need_x:
                torch.bmm(w_x_t, d_acts[j], out=d_seq_t[t])
        d_h0 = d_c0 = None
        if ctx.has_state:
            d_h0 = torch.bmm(w_h_t, d_acts[0])
            d_c0 = dc * f_all[0]
        return d_seq if need_x else None, d_w, d_h0, d_c0


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


def permutation_index(spec: LSTMSpec, perms: list[Tensor]) -> Tensor:
    """`[P]` source positions: `flat[..., index]` is `permute_hidden(spec, flat, perms)`.

    For one permutation per layer (`[H]` each) shared by every member: permuting the
    positions `0..P-1` themselves gives the gather that permutes any flat vector alike.
    """
    return permute_hidden(spec, torch.arange(spec.num_params, device=perms[0].device), perms)


def random_permutations(spec: LSTMSpec, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """One random hidden-neuron permutation per layer and member: `[K, H]` each."""
    return [
        torch.argsort(torch.rand(k, spec.hidden_size, generator=generator), dim=1)
        for _ in range(spec.num_layers)
    ]

