"""The interactive encoder's core LSTM, stepped one differentiable input at a time.

Interactive probing alternates between the core and the members, so the core
cannot run a sequence in one fused call. `torch.lstm_cell` makes each layer step
about a dozen autograd nodes, and autograd adds each step's weight gradients into
the weights' gradients with one more full-size op per weight and step. Here one
autograd node runs a step of all layers: per layer two GEMMs (input, recurrent;
none for a zero state) and one C cell call forward (`rnnrep/cell.py`, which also
computes the backward's factors while the gates are in cache), one C call and two
GEMMs backward.

Weight gradients are deferred: each step's backward writes its d(gates), inputs and
states into the rollout's row buffers (the cell kernel writes d(gates) there directly),
and the rollout's first step, whose backward autograd runs last because every later
step depends on it, computes each weight's gradient as one GEMM over all rows and
hands it to autograd once. Accumulating one GEMM per step in place instead took the
encoder's forward + backward 81.2 ms against 81.7 in float32, but 82.3 against 72.3 in
bfloat16, where it also rounds every step's product; gathering the rows with
`torch.cat` at the end took 82.8 and 73.8 (medians of 15, all timed in turn).

Under autocast (`rnnrep train --precision bf16`) the GEMMs run in bfloat16 on copies
of the weights made once per rollout, while the cell, the state c and the gradients
handed to autograd stay float32.

For the paper's interactive encoder (core 2 x 256, 24 steps, batch 64, 2 CPU threads)
the stepping node took the encoder's forward + backward from 103 to 96 ms against
`torch.lstm_cell` (medians of 15, timed in turn in one process); the core then took 60 ms
of that, of which its GEMMs alone took 38. Without the C kernel (GPUs, no compiler) the
cell runs as torch ops inside the same node.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnrep import cell
from rnnrep.lstm import oifg

State = list[tuple[Tensor, Tensor]]  # per layer (h, c), each [B, H]


class SteppedLSTM:
    """Single-layer `nn.LSTM`s stacked (residually or not), prepared for one rollout.

    The gate rows are reordered once, through autograd, so gradients reach the
    modules' parameters. Use one instance per rollout: the deferred weight
    gradients belong to it.
    """

    def __init__(self, layers: nn.ModuleList, residual: bool) -> None:
        H = layers[0].hidden_size
        self.weights = [
            oifg(t, dim=0)
            for layer in layers
            for t in (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0 + layer.bias_hh_l0)
        ]
        self.hidden_size, self.residual = H, residual
        self.steps = self.rows = 0  # steps taken, rows fed (over all steps)
        # per layer, over all rows: the backward's d(gates), the inputs and the states h
        self.buffers: list[tuple[Tensor, Tensor, Tensor]] | None = None
        device = self.weights[0].device.type
        self.low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        self.low_weights: list[Tensor] | None = None

    def __call__(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One step: input `[B, D]` and the state (None: zeros) -> top output `[B, H]`, new state."""
        flat_state = [] if state is None else [t for hc in state for t in hc]
        out = _Step.apply(self, self.steps == 0, x, *flat_state, *self.weights)
        self.steps += 1
        L = len(self.weights) // 3
        top = out[2 * L] if self.residual else out[L - 1]
        return top, list(zip(out[:L], out[L : 2 * L]))


def _cell_forward(acts: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gates `[B, 4H]` (o, i, f, g), c `[B, H]` -> h, c, f and the backward's factors q, dc_dh."""
    B, G = acts.shape
    H = G // 4
    kernel = cell.kernels(acts)
    if kernel is not None:
        h, c, f, dc_dh = (acts.new_empty(B, H) for _ in range(4))
        q = acts.new_empty(B, G)
        kernel[0](B, H, acts.data_ptr(), c_prev.data_ptr(), c.data_ptr(), h.data_ptr(), H,
                  f.data_ptr(), q.data_ptr(), dc_dh.data_ptr())
        return h, c, f, q, dc_dh
    o, i, f = acts[:, : 3 * H].sigmoid().split(H, dim=1)
    g = acts[:, 3 * H :].tanh()
    c = f * c_prev + i * g
    tanh_c = c.tanh()
    q = torch.cat([tanh_c * o * (1 - o), g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=1)
    return o * tanh_c, c, f, q, o * (1 - tanh_c * tanh_c)


def _cell_backward(dh: Tensor, dc: Tensor, dc_dh: Tensor, q: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """d(loss)/d(h, c) of a step -> d(gates) `[B, 4H]` (written to `out`, contiguous) and the total dc."""
    B, G = q.shape
    kernel = cell.kernels(q)
    if kernel is not None:
        dh, dc = dh.contiguous(), dc.clone(memory_format=torch.contiguous_format)
        kernel[1](B, G // 4, dh.data_ptr(), dc.data_ptr(), None, dc_dh.data_ptr(), q.data_ptr(), out.data_ptr())
        return out, dc
    dc = dc + dh * dc_dh
    return torch.mul(q, torch.cat([dh, dc, dc, dc], dim=1), out=out), dc


def _mm_weights(stepper: SteppedLSTM, weights: tuple[Tensor, ...]) -> list[Tensor] | tuple[Tensor, ...]:
    """The weights the GEMMs use: the float32 ones, or their autocast-dtype copies (made once)."""
    if stepper.low is None:
        return weights
    if stepper.low_weights is None:
        stepper.low_weights = [w.detach().to(stepper.low) for w in weights]
    return stepper.low_weights


def _grad_buffers(stepper: SteppedLSTM, mm_weights) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer, `[rows, 4H]`, `[rows, D]`, `[rows, H]` in the GEMMs' dtype, filled step by step."""
    R = stepper.rows
    return [(w_ih.new_empty(R, w_ih.shape[0]), w_ih.new_empty(R, w_ih.shape[1]), w_hh.new_empty(R, w_hh.shape[1]))
            for w_ih, w_hh in zip(mm_weights[0::3], mm_weights[1::3])]


def _weight_grads(buffers: list[tuple[Tensor, Tensor, Tensor]], weights: tuple[Tensor, ...]) -> list[Tensor]:
    """Each weight's gradient over the whole rollout: one GEMM over all its steps' rows."""
    grads = []
    for (d, x, h), w_ih, w_hh, bias in zip(buffers, weights[0::3], weights[1::3], weights[2::3]):
        grads += [(d.t() @ x).to(w_ih.dtype), (d.t() @ h).to(w_hh.dtype), d.sum(0, dtype=bias.dtype)]
    return grads


class _Step(torch.autograd.Function):
    """One step of all layers of a `SteppedLSTM` (see the module docstring).

    Inputs: the stepper, whether this is its first step, x, the state flattened
    (h_0, c_0, h_1, c_1, ...; absent for zeros), the stepper's weights.
    Outputs: every layer's h, then every layer's c, then (residual only) the top
    output, which is not the top h there.
    """

    @staticmethod
    def forward(ctx, stepper: SteppedLSTM, first: bool, x: Tensor, *rest: Tensor):
        L, H = len(stepper.weights) // 3, stepper.hidden_size
        state, weights = rest[: len(rest) - 3 * L], rest[len(rest) - 3 * L :]
        dtype = weights[0].dtype
        mm_weights = _mm_weights(stepper, weights)
        inp = x
        saved, hs, cs = [], [], []
        for l in range(L):
            w_ih, w_hh, bias = mm_weights[3 * l : 3 * l + 3]
            a = inp.to(w_ih.dtype)
            acts = torch.addmm(bias, a, w_ih.t())
            if state:
                h_prev, c_prev = state[2 * l].to(w_hh.dtype), state[2 * l + 1].contiguous()
                acts.addmm_(h_prev, w_hh.t())
            else:  # zero state: no recurrent term
                h_prev, c_prev = None, x.new_zeros(x.shape[0], H, dtype=dtype)
            h, c, f, q, dc_dh = _cell_forward(acts.to(dtype), c_prev)
            saved += [a, h_prev, f, q, dc_dh]
            hs.append(h)
            cs.append(c)
            inp = h + inp if stepper.residual else h
        ctx.save_for_backward(*saved, *weights)
        ctx.stepper, ctx.first, ctx.rows = stepper, first, slice(stepper.rows, stepper.rows + x.shape[0])
        stepper.rows += x.shape[0]
        return (*hs, *cs, inp) if stepper.residual else (*hs, *cs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *d_outputs: Tensor):
        stepper: SteppedLSTM = ctx.stepper
        L = len(stepper.weights) // 3
        saved = ctx.saved_tensors
        weights = saved[5 * L :]
        mm_weights = _mm_weights(stepper, weights)
        need_w = any(ctx.needs_input_grad[-3 * L :])
        if need_w and stepper.buffers is None:
            stepper.buffers = _grad_buffers(stepper, mm_weights)
        rows = ctx.rows
        d_h, d_c = d_outputs[:L], d_outputs[L : 2 * L]
        d_state: list[Tensor] = []
        d_inp = d_outputs[2 * L] if stepper.residual else None  # d(top output), beyond d_h
        for l in reversed(range(L)):
            inp, h_prev, f, q, dc_dh = saved[5 * l : 5 * l + 5]
            w_ih, w_hh, _ = mm_weights[3 * l : 3 * l + 3]
            d_buf = stepper.buffers[l][0][rows] if need_w else None
            out = d_buf if d_buf is not None and d_buf.dtype == q.dtype else torch.empty_like(q)
            d_acts, dc = _cell_backward(d_h[l] if d_inp is None else d_inp + d_h[l], d_c[l], dc_dh, q, out)
            if need_w:  # this step's rows of the rollout's weight-gradient GEMMs
                _, x_buf, h_buf = stepper.buffers[l]
                if d_buf is not d_acts:
                    d_buf.copy_(d_acts)
                x_buf[rows] = inp
                if h_prev is None:
                    h_buf[rows] = 0
                else:
                    h_buf[rows] = h_prev
            d_mm = d_acts.to(w_ih.dtype) if d_buf is None else d_buf
            if h_prev is not None:
                d_state[:0] = [(d_mm @ w_hh).to(dc.dtype), dc * f]
            if l > 0 or ctx.needs_input_grad[2]:
                d_x = (d_mm @ w_ih).to(dc.dtype)
                d_inp = d_x + d_inp if stepper.residual else d_x
        d_weights: list[Tensor | None] = [None] * (3 * L)
        if need_w and ctx.first:  # autograd runs the first step's backward last
            d_weights, stepper.buffers = _weight_grads(stepper.buffers, weights), None
        return (None, None, d_inp if ctx.needs_input_grad[2] else None, *d_state, *d_weights)
