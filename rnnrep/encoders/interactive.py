"""The interactive probing rollout as one autograd node: the loop forward, then by hand in reverse.

Interactive probing alternates between the encoder and the members for L steps:
decode a probe from the core's output, step every member on it, read the members'
logits into the core, step the core. Each step is a few dozen small ops, and as
autograd nodes they cost more in recording, saving and scheduling than in
arithmetic. Here the forward runs the whole loop without autograd, keeping what
the backward needs, and the backward walks it in reverse by hand. Weight gradients
are one GEMM per weight over all the rollout's rows: the forward writes each core
layer's inputs and previous states side by side into one `[rows, 2D]` buffer, the
backward writes the layer's d(gates) rows next to it, and `d(gates)^T @ buffer` gives
both of its weight matrices at once; the probe decoder and read-in likewise.

The core runs its gates in the order (o, i, f, g) of the C cell kernel
(`rnnrep/cell.py`, with a torch-ops fallback): its weights are reordered once per
rollout, inside the node, and their gradients put back in PyTorch's order at the end.
The members' weights are reordered the same way; their gradients are computed only
where the member parameters require them (not in training, where they are data).

Under autocast (`rnnrep train --precision bf16`) the core's GEMMs run in that dtype on
copies of its weights made once per rollout, while its cell, its state c, the probe
decoder, the read-in, the members and every gradient handed back stay float32.

The probes come back for inspection only (not differentiable): gradients flow
through the embedding.

The node computes `InteractiveProbing`'s wiring (see `rnnrep.encoders.probing`) with
its modules' parameters, by hand: `decode_probes`, the members' step, `read` and the
core. `tests/test_probing.py` pins it to the reference's loop written with those
modules, values and gradients, in float64.

For the paper's encoder (core 2 x 256, 24 core steps, 64 members, 2 CPU threads) the
forward and backward took 66.5-67.8 ms against 76.1-77.4 ms with an autograd node per
core step and autograd ops for the rest (two runs, medians of 15, the two timed in turn
in one process); 58.9-59.0 against 68.8-69.6 ms under bfloat16 autocast. The members'
contiguous forward weights and the kernel's forget-gate step (below) took off 1.7-2.4 ms
more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnrep import cell, lstm
from rnnrep.lstm import oifg, torch_order


@dataclass(frozen=True)
class _Plan:
    """What the node needs to know besides its tensors (see `_unpack` for their order)."""

    core_layers: int
    initial_state: bool  # the core starts from learned (h0, c0), else zeros
    decoder_layers: int  # Linear layers after `query_up`
    member_layers: int
    num_probes: int
    probe_length: int
    residual: bool
    softmax: bool  # formal-languages probes; MNIST probes are sigmoids
    static_weight: float
    low: torch.dtype | None  # the core GEMMs' autocast dtype, or None


def run(encoder: nn.Module, params: Tensor) -> tuple[Tensor, Tensor]:
    """The core's output after EOS `[B, D]` and the probes `[B, M, L, I]` for members `params[B, P]`."""
    cfg, spec = encoder.cfg, encoder.spec
    core = [t for layer in encoder.core.layers for t in (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)]
    initial = [t for hc in zip(encoder.core.h0, encoder.core.c0) for t in hc] if cfg.learn_initial_state else []
    decoder = [t for m in encoder.probe_decoder if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
    p = lstm.unflatten(spec, params)
    member = [p[f"{name}_l{l}"] for l in range(spec.num_layers) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    device = params.device.type
    plan = _Plan(
        core_layers=len(encoder.core.layers),
        initial_state=bool(initial),
        decoder_layers=len(decoder) // 2,
        member_layers=spec.num_layers,
        num_probes=cfg.num_probes,
        probe_length=cfg.probe_length,
        residual=cfg.residual,
        softmax=encoder.kind == "formal-languages",
        static_weight=cfg.static_weight,
        low=torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
    )
    return _Rollout.apply(
        plan, *core, *initial, encoder.bos, encoder.eos, encoder.codes, encoder.query_up.weight, encoder.query_up.bias,
        *decoder, encoder.read_in.weight, encoder.read_in.bias, *member, p["linear.weight"], p["linear.bias"],
    )


@dataclass
class _Weights:
    core: list[Tensor]  # per layer: w_ih, w_hh, b_ih, b_hh (PyTorch's gate order)
    initial: list[Tensor]  # per layer: h0, c0 (each [D]); empty for zeros
    bos: Tensor
    eos: Tensor
    codes: Tensor
    query_up: list[Tensor]  # weight, bias
    decoder: list[Tensor]  # per Linear: weight, bias
    read_in: list[Tensor]  # weight, bias
    member: list[Tensor]  # per layer: w_ih [B, 4H, I], w_hh, b_ih [B, 4H], b_hh
    readout: list[Tensor]  # weight [B, O, H], bias [B, O]


def _unpack(plan: _Plan, tensors: tuple[Tensor, ...]) -> _Weights:
    it = iter(tensors)

    def take(n: int) -> list[Tensor]:
        return [next(it) for _ in range(n)]

    return _Weights(
        core=take(4 * plan.core_layers),
        initial=take(2 * plan.core_layers if plan.initial_state else 0),
        bos=next(it), eos=next(it), codes=next(it),
        query_up=take(2),
        decoder=take(2 * plan.decoder_layers),
        read_in=take(2),
        member=take(4 * plan.member_layers),
        readout=take(2),
    )


# ---- the LSTM cell, gates (o, i, f, g): the C kernel, or the same math as torch ops

def _cell_forward(acts: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gates `[N, 4H]`, c `[N, H]` -> h, c, f and the backward's factors q `[N, 4H]`, dc_dh."""
    N, G = acts.shape
    H = G // 4
    kernel = cell.kernels(acts)
    if kernel is not None:
        h, c, f, dc_dh = (acts.new_empty(N, H) for _ in range(4))
        q = acts.new_empty(N, G)
        kernel[0](N, H, acts.data_ptr(), c_prev.data_ptr(), c.data_ptr(), h.data_ptr(), H,
                  f.data_ptr(), q.data_ptr(), dc_dh.data_ptr())
        return h, c, f, q, dc_dh
    o, i, f = acts[:, : 3 * H].sigmoid().split(H, dim=1)
    g = acts[:, 3 * H :].tanh()
    c = f * c_prev + i * g
    tanh_c = c.tanh()
    q = torch.cat([tanh_c * o * (1 - o), g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=1)
    return o * tanh_c, c, f, q, o * (1 - tanh_c * tanh_c)


def _cell_backward(dh: Tensor, dc: Tensor | None, f_next: Tensor | None, dc_dh: Tensor, q: Tensor, out: Tensor):
    """A step in reverse -> d(gates) written to `out` `[N, 4H]`, and the step's total d(c).

    `dh`: d(h) of the step; `dc`, `f_next`: d(c) of the next step and its forget gate, so
    that d(c) here = dc * f_next + dh * dc_dh (`f_next` None: `dc` is already d(c) from
    later steps; both None at the last step). The kernel writes the result over `dc`,
    which must be the caller's to lose.
    """
    N, G = q.shape
    kernel = cell.kernels(q)
    if kernel is not None:
        dh = dh.contiguous()
        dc = torch.zeros_like(dh) if dc is None else dc
        kernel[1](N, G // 4, dh.data_ptr(), dc.data_ptr(), None if f_next is None else f_next.data_ptr(),
                  dc_dh.data_ptr(), q.data_ptr(), out.data_ptr())
        return out, dc
    if dc is not None and f_next is not None:
        dc = dc * f_next
    dc = dh * dc_dh if dc is None else dc + dh * dc_dh
    return torch.mul(q, torch.cat([dh, dc, dc, dc], dim=1), out=out), dc


# ---- the core: a stack of LSTM layers stepped one input at a time

@dataclass
class _CoreStep:
    row: int  # first row of this step in the rollout's row buffers
    rows: int
    saved: list[tuple[Tensor, Tensor, Tensor, bool]]  # per layer: f, q, dc_dh, had a state


class _Core:
    """The core's weights for one rollout (gates reordered, maybe cast) and its row buffers."""

    def __init__(self, plan: _Plan, w: list[Tensor], rows: int) -> None:
        self.plan = plan
        self.weights = []  # per layer: w_ih, w_hh in the GEMMs' dtype, bias float32
        for l in range(plan.core_layers):
            w_ih, w_hh, b_ih, b_hh = w[4 * l : 4 * l + 4]
            mm = plan.low or w_ih.dtype
            self.weights.append((oifg(w_ih, 0).to(mm), oifg(w_hh, 0).to(mm), oifg(b_ih + b_hh, 0)))
        D = w[1].shape[1]
        # per layer, per row: the layer's input and its previous h, side by side
        self.inputs = [w[0].new_empty(rows, 2 * D, dtype=plan.low or w[0].dtype) for _ in range(plan.core_layers)]
        self.steps: list[_CoreStep] = []

    def forward(self, x: Tensor, state: list[tuple[Tensor, Tensor]] | None, row: int) -> tuple[Tensor, list]:
        """One step: input `[R, D]`, per-layer (h, c) or None for zeros -> top output, new state."""
        R, D = x.shape
        inp, new, saved = x, [], []
        for (w_ih, w_hh, bias), buf in zip(self.weights, self.inputs):
            x_rows, h_rows = buf[row : row + R, :D], buf[row : row + R, D:]  # in the GEMMs' dtype
            x_rows.copy_(inp)
            acts = torch.addmm(bias.to(w_ih.dtype), x_rows, w_ih.t())
            if state is None:
                h_rows.zero_()
                c_prev = x.new_zeros(R, D)
            else:
                h_prev, c_prev = state[len(new)]
                h_rows.copy_(h_prev)
                acts.addmm_(h_rows, w_hh.t())
            h, c, f, q, dc_dh = _cell_forward(acts.to(x.dtype), c_prev)
            saved.append((f, q, dc_dh, state is not None))
            new.append((h, c))
            inp = h + inp if self.plan.residual else h
        self.steps.append(_CoreStep(row, R, saved))
        return inp, new

    def backward(self, k: int, d_top: Tensor | None, d_state: list | None, d_gates: list[Tensor]):
        """Step k in reverse: d(top output) (None: unused) and d(state after it) -> d(input), d(state before).

        A state's gradient is per layer (d(h), d(c) of the step after it, that step's forget
        gate): the cell kernel applies the gate (see `_cell_backward`).
        """
        step = self.steps[k]
        rows = slice(step.row, step.row + step.rows)
        d_inp, d_prev = d_top, [None] * len(self.weights)
        for l in reversed(range(len(self.weights))):
            w_ih, w_hh, _ = self.weights[l]
            f, q, dc_dh, had_state = step.saved[l]
            dh, dc, f_next = (d_inp, None, None) if d_state is None else d_state[l]
            if d_state is not None and d_inp is not None:
                dh = d_inp + dh
            buf = d_gates[l][rows]
            d_acts, dc = _cell_backward(dh, dc, f_next, dc_dh, q, buf if buf.dtype == q.dtype else torch.empty_like(q))
            if d_acts is not buf:
                buf.copy_(d_acts)
            if had_state:
                d_prev[l] = ((buf @ w_hh).to(dc.dtype), dc, f)
            d_x = (buf @ w_ih).to(dc.dtype)
            d_inp = d_x + d_inp if self.plan.residual and d_inp is not None else d_x
        return d_inp, d_prev

    def weight_grads(self, d_gates: list[Tensor], w: list[Tensor]) -> list[Tensor]:
        """Per layer d(w_ih), d(w_hh), d(b_ih), d(b_hh) in PyTorch's gate order, from all rows."""
        grads = []
        for l, (d, buf) in enumerate(zip(d_gates, self.inputs)):
            D = buf.shape[1] // 2
            g = torch_order((d.t() @ buf).to(w[4 * l].dtype), 0)
            db = torch_order(d.sum(0, dtype=w[4 * l + 2].dtype), 0)
            grads += [g[:, :D], g[:, D:], db, db.clone()]
        return grads


# ---- the node

class _Rollout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: Tensor):
        with torch.autocast(tensors[0].device.type, enabled=False):
            tape = _Tape(plan, _unpack(plan, tensors))
            out, probes = tape.forward()
        ctx.tape = tape
        ctx.mark_non_differentiable(probes)
        return out, probes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor, _d_probes: Tensor):
        tape: _Tape | None = ctx.tape
        if tape is None:
            raise RuntimeError("backward through an interactive probing rollout a second time: its tape is freed after the first; run the encoder again")
        needs = ctx.needs_input_grad[1:]
        with torch.autocast(d_out.device.type, enabled=False):
            grads = tape.backward(d_out, member_grads=any(needs[-4 * tape.plan.member_layers - 2 :]))
        ctx.tape = None  # as autograd frees saved tensors: the next step's forward must not hold two tapes
        return (None, *(g if need else None for g, need in zip(grads, needs)))


class _Tape:
    """One rollout's forward, and what its backward needs."""

    def __init__(self, plan: _Plan, w: _Weights) -> None:
        self.plan, self.w = plan, w
        B = w.member[0].shape[0]
        self.B = B
        # core rows: the BOS step on one row (the same for every member), L reads, EOS
        self.core = _Core(plan, w.core, 1 + (plan.probe_length + 1) * B)
        # per layer: w_ih^T [B, I, 4H], w_hh^T [B, H, 4H], bias [B, 1, 4H] for the forward, w_ih and
        # w_hh for the backward, gates (o, i, f, g). Both layouts contiguous: a batched matmul on a
        # transposed view took twice as long (23 vs 11.5 us at [64, 32, 128]).
        self.member = []
        for l in range(plan.member_layers):
            w_ih, w_hh, b_ih, b_hh = w.member[4 * l : 4 * l + 4]
            w_ih, w_hh = oifg(w_ih, 1), oifg(w_hh, 1)
            self.member.append((w_ih.transpose(1, 2).contiguous(), w_hh.transpose(1, 2).contiguous(),
                                oifg(b_ih + b_hh, 1)[:, None], w_ih, w_hh))
        self.readout = (w.readout[0].transpose(1, 2).contiguous(), w.readout[1][:, None], w.readout[0])

    def forward(self) -> tuple[Tensor, Tensor]:
        plan, w, B, core = self.plan, self.w, self.B, self.core
        initial = None
        if plan.initial_state:
            initial = [(w.initial[2 * l][None], w.initial[2 * l + 1][None]) for l in range(plan.core_layers)]
        out, state = core.forward(w.bos[None], initial, 0)
        state = [(h.expand(B, -1).contiguous(), c.expand(B, -1).contiguous()) for h, c in state]
        self.decoded, self.stepped, self.read = [], [], []
        member_state, probes = None, []
        for t in range(plan.probe_length):
            query = out + plan.static_weight * w.codes[t] if plan.static_weight else out
            x = self._decode(query)  # [1 or B, M, I]
            probes.append(x.expand(B, -1, -1))
            logits, member_state = self._member_forward(probes[-1], member_state)
            flat = logits.flatten(1)
            r = torch.addmm(w.read_in[1], flat, w.read_in[0].t()).sigmoid_()
            self.read.append((flat, r))
            out, state = core.forward(r, state, 1 + t * B)
        out, _ = core.forward(w.eos.expand(B, -1), state, 1 + plan.probe_length * B)
        return out, torch.stack(probes, dim=2)

    def _decode(self, query: Tensor) -> Tensor:
        """Queries `[R, D]` -> probes `[R, M, I]`; saves each Linear's input and pre-activation."""
        w, M = self.w, self.plan.num_probes
        a = torch.addmm(w.query_up[1], query, w.query_up[0].t())
        saved = [(query, a)]
        v = a.relu().view(a.shape[0] * M, -1)
        for j in range(self.plan.decoder_layers):
            y = torch.addmm(w.decoder[2 * j + 1], v, w.decoder[2 * j].t())
            saved.append((v, y))
            v = y.relu()
        x = (y.softmax(-1) if self.plan.softmax else y.sigmoid()).view(a.shape[0], M, -1)
        self.decoded.append((saved, x))
        return x

    def _member_forward(self, x: Tensor, state: list | None) -> tuple[Tensor, list]:
        """Every member's step on its probes `x[B, M, I]` -> logits `[B, M, O]`, new state."""
        B, M = x.shape[:2]
        inp, new, saved = x, [], []
        for l, (w_ih, w_hh, bias, _, _) in enumerate(self.member):
            acts = torch.baddbmm(bias, inp, w_ih)
            H = acts.shape[-1] // 4
            if state is None:
                h_prev, c_prev = None, x.new_zeros(B * M, H)
            else:
                h_prev, c_prev = state[l]
                acts.baddbmm_(h_prev, w_hh)
            h, c, f, q, dc_dh = _cell_forward(acts.view(B * M, 4 * H), c_prev)
            saved.append((inp, h_prev, f, q, dc_dh))
            inp = h.view(B, M, H)
            new.append((inp, c))
        self.stepped.append((saved, inp))
        return torch.baddbmm(self.readout[1], inp, self.readout[0]), new

    def backward(self, d_out: Tensor, member_grads: bool) -> list[Tensor | None]:
        plan, w, B, core = self.plan, self.w, self.B, self.core
        L = plan.probe_length
        d_gates = [buf.new_empty(buf.shape[0], 2 * buf.shape[1]) for buf in core.inputs]
        d_eos, d_state = core.backward(L + 1, d_out, None, d_gates)
        dec_rows: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(plan.decoder_layers + 1)]  # (d pre-act, input)
        read_rows: list[tuple[Tensor, Tensor]] = []
        d_codes = torch.zeros_like(w.codes) if plan.static_weight else None
        d_member = [torch.zeros_like(t) for t in (*[m for layer in self.member for m in layer[:3]], *self.readout[:2])] if member_grads else None
        member_state = None
        d_query = None  # d(core output t+1), through the probe decoded from it
        for t in reversed(range(L)):
            d_r, d_state = core.backward(1 + t, d_query, d_state, d_gates)
            flat, r = self.read[t]
            d_z = d_r * r * (1 - r)
            read_rows.append((d_z, flat))
            d_logits = (d_z @ w.read_in[0]).view(B, plan.num_probes, -1)
            d_x, member_state = self._member_backward(t, d_logits, member_state, d_member)
            d_query = self._decode_backward(t, d_x, dec_rows)
            if d_codes is not None:
                d_codes[t] = plan.static_weight * d_query.sum(0)
        # the BOS step ran on one row, expanded to all members
        d_state = [(dh.sum(0, keepdim=True), (dc * f).sum(0, keepdim=True), None) for dh, dc, f in d_state]
        d_bos, d_initial = core.backward(0, d_query, d_state, d_gates)

        grads: list[Tensor | None] = core.weight_grads(d_gates, w.core)
        if plan.initial_state:
            grads += [g for dh, dc, f in d_initial for g in (dh[0], (dc * f)[0])]
        grads += [d_bos[0], d_eos.sum(0), d_codes]
        for j, rows in enumerate(dec_rows):
            d, x = (torch.cat(parts) for parts in zip(*rows))
            grads += [d.t() @ x, d.sum(0)]
        d, x = (torch.cat(parts) for parts in zip(*read_rows))
        grads += [d.t() @ x, d.sum(0)]
        grads += self._member_grads(d_member) if d_member is not None else [None] * (4 * plan.member_layers + 2)
        return grads

    def _member_backward(self, t: int, d_logits: Tensor, d_state: list | None, d_member: list | None):
        """Step t of every member in reverse -> d(probes) `[B, M, I]`, d(state before)."""
        saved, h_top = self.stepped[t]
        if d_member is not None:
            d_member[-2] += torch.bmm(h_top.transpose(1, 2), d_logits)
            d_member[-1] += d_logits.sum(1, keepdim=True)
        d_h = torch.bmm(d_logits, self.readout[2])
        d_prev = [None] * len(self.member)
        for l in reversed(range(len(self.member))):
            w_ih, w_hh = self.member[l][3:]
            inp, h_prev, f, q, dc_dh = saved[l]
            B, M, H = d_h.shape
            dh, dc, f_next = (d_h, None, None) if d_state is None else (d_h + d_state[l][0], *d_state[l][1:])
            d_acts, dc = _cell_backward(dh.view(B * M, H), dc, f_next, dc_dh, q, torch.empty_like(q))
            d_acts = d_acts.view(B, M, 4 * H)
            if h_prev is not None:
                d_prev[l] = (torch.bmm(d_acts, w_hh), dc, f)
            if d_member is not None:
                d_member[3 * l] += torch.bmm(inp.transpose(1, 2), d_acts)
                if h_prev is not None:
                    d_member[3 * l + 1] += torch.bmm(h_prev.transpose(1, 2), d_acts)
                d_member[3 * l + 2] += d_acts.sum(1, keepdim=True)
            d_h = torch.bmm(d_acts, w_ih)
        return d_h, d_prev

    def _decode_backward(self, t: int, d_x: Tensor, rows: list) -> Tensor:
        """d(probes) `[B, M, I]` of step t -> d(query); records the decoder's weight-gradient rows."""
        saved, x = self.decoded[t]
        if x.shape[0] != d_x.shape[0]:  # decoded on one row, expanded to all members
            d_x = d_x.sum(0, keepdim=True)
        d_y = x * (d_x - (d_x * x).sum(-1, keepdim=True)) if self.plan.softmax else d_x * x * (1 - x)
        d_y = d_y.flatten(0, 1)
        for j in reversed(range(self.plan.decoder_layers)):
            v, _ = saved[j + 1]
            rows[j + 1].append((d_y, v))
            pre = saved[j][1]  # the pre-activation whose ReLU is v
            d_y = (d_y @ self.w.decoder[2 * j]).view(pre.shape) * (pre > 0)
        query = saved[0][0]
        rows[0].append((d_y, query))
        return d_y @ self.w.query_up[0]

    def _member_grads(self, d: list[Tensor]) -> list[Tensor]:
        """The members' gradients back in their own layout: per layer w_ih, w_hh, b_ih, b_hh; the read-out."""
        grads = []
        for l in range(self.plan.member_layers):
            d_ih, d_hh, d_b = d[3 * l : 3 * l + 3]
            db = torch_order(d_b[:, 0], 1)
            grads += [torch_order(d_ih.transpose(1, 2), 1), torch_order(d_hh.transpose(1, 2), 1), db, db.clone()]
        return grads + [d[-2].transpose(1, 2), d[-1][:, 0]]
