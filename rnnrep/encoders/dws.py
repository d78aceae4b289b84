"""DWSNet for LSTMs: linear layers that commute with hidden-neuron permutations.

Weight-space features keep the member's structure. Each weight matrix becomes a
feature map `[B, rows, cols, C]` and each bias `[B, rows, C]`, channels last. The
four gate blocks of an LSTM matrix (rows `g*H + n`) share the permutation of neuron
`n`, so they become 4 input channels of an `H`-row map; the read-out, which has no
gates, is copied over those 4 channels.

An equivariant layer maps every tensor to a sum of (a) a pointwise channel mix,
(b) a mix of the means of all tensors (broadcast everywhere), (c) a mix of vectors
indexed by the tensor's columns and (d) of vectors indexed by its rows, both drawn
from neighbouring tensors whose rows or columns belong to the same neurons (means
over the other axis, biases). Means and broadcasts commute with any permutation of
the axis they run along, so the layer is equivariant; mean-pooling each output
tensor then gives an invariant embedding. The last layer computes those means
directly (the mean of an affine map is the map of the mean) and never builds its
maps. Learned input/output position embeddings break the (unwanted) symmetry of
the input and output units, which are not interchangeable.

The wiring of (c) and (d) is the reference's `NPLinearLSTM`, term for term (checked
numerically against it with copied weights), so the paper configuration (4 layers x
48 channels, MLP 128) has its parameter count: 1,279,736 (formal languages),
1,282,400 (MNIST). One quirk is kept for that reason: the per-row context of the
last LSTM layer's recurrent weights lacks the read-out averaged over its output
units, although earlier layers' recurrent weights get the next layer's input
weights averaged that way.

The maps do not fit in cache, so a layer costs its passes over them. A built
layer's big maps run in one C pass each way (`linear_relu_sums`): the pointwise
channel mix, the broadcast adds, the ReLU that follows the layer and the row and
column sums the next layer takes. For the paper configuration (64 members, 2
threads) the encoder's forward + backward took 118-119 ms against 154-155 ms in
torch ops (two A/B runs, medians of 30 timed in turn in one process), and a training
step (`rnnrep bench train --encoder dws`) 0.181-0.183 s against 0.211 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnrep import cell
from rnnrep.encoders.common import mlp, no_autocast, unit_norm, weight_bias_pairs
from rnnrep.lstm import LSTMSpec, unflatten

Features = dict[str, Tensor]  # tensor name -> [B, rows, cols, C] (weights) or [B, rows, C] (biases)
Sums = dict[str, tuple[Tensor, Tensor]]  # weight name -> its map summed over rows [B, cols, C], over columns [B, rows, C]

GATES = 4


@dataclass(frozen=True)
class DWSConfig:
    channels: tuple[int, ...] = (48, 48, 48, 48)
    mlp_hidden: tuple[int, ...] = (128,)
    embedding_size: int = 16
    io_embed: bool = True  # learned input/output position embeddings in every layer


# --------------------------------------------------------------------------- weight-space features


def feature_shapes(spec: LSTMSpec) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor's feature map without batch and channel axes."""
    shapes = {}
    for t in spec.tensors:
        if t.layer < spec.num_layers:  # gate blocks -> channels
            shapes[t.name] = (t.shape[0] // GATES, *t.shape[1:])
        else:
            shapes[t.name] = t.shape
    return shapes


def to_features(spec: LSTMSpec, params: Tensor) -> Features:
    """`params[B, P]` -> 4-channel features: gates as channels, read-out copied."""
    B, H = params.shape[0], spec.hidden_size
    out = {}
    for name, t in unflatten(spec, params).items():
        if spec.tensor(name).layer < spec.num_layers:
            t = t.reshape(B, GATES, H, *t.shape[2:])
            out[name] = t.movedim(1, -1)
        else:
            out[name] = t.unsqueeze(-1).expand(*t.shape, GATES)
    return out


def permute_features(spec: LSTMSpec, feats: Features, perms: list[Tensor]) -> Features:
    """The hidden-neuron permutation `perms[l]` (shape [H]) acting on features.

    Same convention as `rnnrep.lstm.permute_hidden`: new neuron n is old neuron
    perms[l][n], so `to_features(permute_hidden(x)) == permute_features(to_features(x))`.
    """
    out = dict(feats)
    for layer, perm in enumerate(perms):
        for name in (f"weight_ih_l{layer}", f"bias_ih_l{layer}", f"weight_hh_l{layer}", f"bias_hh_l{layer}"):
            out[name] = out[name].index_select(1, perm)
        hh = f"weight_hh_l{layer}"
        nxt = f"weight_ih_l{layer + 1}" if layer + 1 < spec.num_layers else "linear.weight"
        out[hh] = out[hh].index_select(2, perm)
        out[nxt] = out[nxt].index_select(2, perm)
    return out


# --------------------------------------------------------------------------- the equivariant layer


def _context(spec: LSTMSpec) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """For each weight: (vectors indexed by its columns, vectors indexed by its rows).

    A vector is named `"<weight>/rows"` (the weight averaged over its rows, so indexed
    by its columns), `"<weight>/cols"` (averaged over its columns: indexed by rows)
    or by a bias name. Layer `L` of the input chain is the read-out.
    """
    L = spec.num_layers

    def ih(l: int) -> tuple[str, str]:
        return ("linear.weight", "linear.bias") if l == L else (f"weight_ih_l{l}", f"bias_ih_l{l}")

    def hh(l: int) -> tuple[str, str]:
        return f"weight_hh_l{l}", f"bias_hh_l{l}"

    ctx = {}
    for l in range(L + 1):
        w, b = ih(l)
        by_col, by_row = [f"{w}/rows"], [f"{w}/cols", b]
        if l > 0:  # columns are the previous layer's neurons
            pw, pb = ih(l - 1)
            hw, hb = hh(l - 1)
            by_col += [f"{pw}/cols", pb, f"{hw}/cols", hb, f"{hw}/rows"]
        if l < L:  # rows are this layer's neurons
            hw, hb = hh(l)
            by_row += [f"{hw}/cols", hb, f"{hw}/rows", f"{ih(l + 1)[0]}/rows"]
        ctx[w] = (tuple(by_col), tuple(by_row))
    for l in range(L):
        (w, b), (iw, ib) = hh(l), ih(l)
        by_col = (f"{w}/rows", f"{w}/cols", b, f"{iw}/cols", ib)
        by_row = [f"{w}/cols", b, f"{w}/rows"]
        if l < L - 1:  # the reference leaves out the read-out here (see module docstring)
            by_row.append(f"{ih(l + 1)[0]}/rows")
        ctx[w] = (by_col, tuple(by_row))
    return ctx


class _PairMap(nn.Module):
    """The maps into one (weight, bias) pair of output tensors."""

    def __init__(self, c_in: int, c_out: int, n_tensors: int, n_by_col: int, n_by_row: int) -> None:
        super().__init__()
        self.point = nn.Linear(c_in, c_out)
        self.glob = nn.Linear(n_tensors * c_in, c_out)
        self.by_col = nn.Linear(n_by_col * c_in, c_out)
        self.by_row = nn.Linear(n_by_row * c_in, c_out)
        self.bias_by_row = nn.Linear(n_by_row * c_in, c_out)
        self.bias_glob = nn.Linear(n_tensors * c_in, c_out)
        _init_sum(self.point, self.glob, self.by_col, self.by_row)
        _init_sum(self.bias_by_row, self.bias_glob)

    def forward(
        self, w: Tensor, glob: Tensor, by_col: Tensor, by_row: Tensor, relu: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """The output weight and bias; with `relu`, their ReLUs and the weight's sums over
        its rows and over its columns (else None)."""
        # Every term but the pointwise product is constant along rows or columns, so
        # they are added to two small vectors first and broadcast once each, in place
        # (with `relu` in the same pass as the ReLU and the sums): this memory-bound
        # layer costs its passes over the big map.
        row_const = self.glob(glob)[:, None] + self.by_row(by_row) + self.point.bias  # [B, rows, C]
        col_const = self.by_col(by_col)  # [B, cols, C]
        b_out = self.bias_by_row(by_row) + self.bias_glob(glob)[:, None]
        if relu:
            w_out, s_rows, s_cols = linear_relu_sums(w, self.point.weight, col_const, row_const)
            return w_out, torch.relu(b_out), (s_rows, s_cols)
        w_out = torch.matmul(w, self.point.weight.T)
        w_out += col_const[:, None]
        w_out += row_const[:, :, None]
        return w_out, b_out, None

    def pooled(self, w_mean: Tensor, glob: Tensor, by_col: Tensor, by_row: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s outputs averaged over their rows and columns, `[B, C]` each.

        Every term is affine, so the mean of the output is the map of the mean input:
        the last layer, whose maps are only pooled, never builds them.
        """
        by_col, by_row = by_col.mean(dim=1), by_row.mean(dim=1)
        w_out = self.point(w_mean) + self.glob(glob) + self.by_col(by_col) + self.by_row(by_row)
        return w_out, self.bias_by_row(by_row) + self.bias_glob(glob)


def _init_sum(*linears: nn.Linear) -> None:
    """Init terms that are summed like one Linear over all their inputs together.

    Each term alone would get PyTorch's U(±1/sqrt(fan_in)); summing four such terms
    would inflate the output scale layer after layer.
    """
    bound = sum(lin.in_features for lin in linears) ** -0.5
    for lin in linears:
        nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.uniform_(lin.bias, -bound, bound)


class EquivariantLayer(nn.Module):
    """Features with `c_in` channels -> features with `c_out` channels, equivariantly."""

    def __init__(self, spec: LSTMSpec, c_in: int, c_out: int, io_embed: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.pairs = weight_bias_pairs(spec)
        self.context = _context(spec)
        n = len(spec.tensors)
        self.maps = nn.ModuleList(
            _PairMap(c_in, c_out, n, len(self.context[w][0]), len(self.context[w][1])) for w, _ in self.pairs
        )
        self.io_embed = io_embed
        if io_embed:
            shapes = feature_shapes(spec)
            self.in_embed = nn.Parameter(torch.randn(shapes["weight_ih_l0"][1], c_in))
            self.out_embed = nn.Parameter(torch.randn(spec.output_size, 1, c_in))
            self.out_bias_embed = nn.Parameter(torch.randn(spec.output_size, c_in))

    def forward(
        self, feats: Features, sums: Sums | None = None, pooled: bool = False, relu: bool = False
    ) -> tuple[Features, Sums]:
        """Output features and, with `relu`, their ReLUs and the weight maps' sums; with
        `pooled`, only the outputs' means over rows and columns, `[B, C]`.

        `sums` may hold `feats`' weight maps' sums over rows and over columns, as a
        layer with `relu` returns them: the missing ones are computed here.
        """
        sums = dict(sums or {})
        if self.io_embed:
            feats = dict(feats)
            feats["weight_ih_l0"] = feats["weight_ih_l0"] + self.in_embed
            feats["linear.weight"] = feats["linear.weight"] + self.out_embed
            feats["linear.bias"] = feats["linear.bias"] + self.out_bias_embed
            sums.pop("weight_ih_l0", None)  # changed maps: their sums are taken below
            sums.pop("linear.weight", None)
        vectors: dict[str, Tensor] = {}
        means: dict[str, Tensor] = {}
        for t in self.spec.tensors:
            x = feats[t.name]
            # sum, then scale the small result: the backward of a sum is a broadcast view,
            # that of a mean a full-size division
            if x.dim() == 4:
                rows, cols = x.shape[1:3]
                s_rows, s_cols = sums.get(t.name) or (x.sum(dim=1), x.sum(dim=2))
                vectors[f"{t.name}/rows"] = s_rows / rows
                vectors[f"{t.name}/cols"] = s_cols / cols
                means[t.name] = vectors[f"{t.name}/rows"].mean(dim=1)
            else:
                vectors[t.name] = x
                means[t.name] = x.mean(dim=1)
        glob = torch.cat([means[t.name] for t in self.spec.tensors], dim=-1)
        out: Features = {}
        out_sums: Sums = {}
        for (w, b), pair_map in zip(self.pairs, self.maps):
            by_col, by_row = (torch.cat([vectors[k] for k in keys], dim=-1) for keys in self.context[w])
            if pooled:
                out[w], out[b] = pair_map.pooled(means[w], glob, by_col, by_row)
            else:
                out[w], out[b], w_sums = pair_map(feats[w], glob, by_col, by_row, relu)
                if w_sums is not None:
                    out_sums[w] = w_sums
        return out, out_sums


# --------------------------------------------------------------------------- the fused map layer


class _LinearReluSums(torch.autograd.Function):
    """See `linear_relu_sums`. A gradient that does not reach the map (the last layer
    reads only the sums) is not materialised."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, col: Tensor, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        kernels = _kernels(x, weight)
        if kernels is None:
            y = torch.matmul(x, weight.T)
            y += col[:, None]
            y += row[:, :, None]
            y.relu_()
            s_rows, s_cols = y.sum(dim=1), y.sum(dim=2)
        else:
            (B, R, C, I), O = x.shape, weight.shape[0]
            x, col, row = x.contiguous(), col.contiguous(), row.contiguous()
            wt = weight.t().contiguous()
            y, s_rows, s_cols = x.new_empty(B, R, C, O), x.new_empty(B, C, O), x.new_empty(B, R, O)
            _check(kernels[0](torch.get_num_threads(), B, R, C, I, O, x.data_ptr(), wt.data_ptr(), col.data_ptr(),
                              row.data_ptr(), y.data_ptr(), s_rows.data_ptr(), s_cols.data_ptr()), O)
        ctx.save_for_backward(x, weight, y)
        return y, s_rows, s_cols

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs_rows: Tensor | None, gs_cols: Tensor | None):
        x, weight, y = ctx.saved_tensors
        (B, R, C, I), O = x.shape, weight.shape[0]
        gs_rows = y.new_zeros(B, C, O) if gs_rows is None else gs_rows.contiguous()
        gs_cols = y.new_zeros(B, R, O) if gs_cols is None else gs_cols.contiguous()
        need_x = ctx.needs_input_grad[0]
        kernels = _kernels(x, weight)
        if kernels is None:
            g = gs_rows[:, None] + gs_cols[:, :, None]
            if gy is not None:
                g = g + gy
            g = g.masked_fill(y <= 0, 0)
            gw = g.flatten(0, 2).T @ x.flatten(0, 2)
            return g @ weight if need_x else None, gw, g.sum(dim=1), g.sum(dim=2)
        gy = None if gy is None else gy.contiguous()
        weight = weight.contiguous()
        gx = x.new_empty(B, R, C, I) if need_x else None
        gw, g_col, g_row = weight.new_empty(O, I), y.new_empty(B, C, O), y.new_empty(B, R, O)
        threads = torch.get_num_threads()
        scratch = weight.new_empty(2 * threads, O, I)
        _check(kernels[1](threads, B, R, C, I, O, x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                          None if gy is None else gy.data_ptr(), gs_rows.data_ptr(), gs_cols.data_ptr(),
                          None if gx is None else gx.data_ptr(), gw.data_ptr(), g_col.data_ptr(), g_row.data_ptr(),
                          scratch.data_ptr()), O)
        return gx, gw, g_col, g_row


_KERNEL_MAX_CHANNELS = 1024  # rnnrep/_dws.c's MAX_CHANNELS


def _kernels(x: Tensor, weight: Tensor):
    return cell.dws_kernels(x) if weight.shape[0] <= _KERNEL_MAX_CHANNELS else None


def _check(status: int, channels: int) -> None:
    if status != 0:
        raise RuntimeError(f"rnnrep/_dws.c refused {channels} output channels (MAX_CHANNELS)")


def linear_relu_sums(x: Tensor, weight: Tensor, col: Tensor, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`y = relu(x @ weight.T + col[:, None] + row[:, :, None])` for a map `x[B, R, C, I]`,
    `weight[O, I]`, `col[B, C, O]`, `row[B, R, O]`, with `y.sum(1)` and `y.sum(2)`.

    One pass over the maps forward and one backward in C (`rnnrep/_dws.c`), where torch
    ops made six and seven; torch ops on GPUs or without a compiler.
    """
    return _LinearReluSums.apply(x, weight, col, row)


# --------------------------------------------------------------------------- the encoder


class DWSEncoder(nn.Module):
    """`params[B, P]` -> unit-norm `z[B, embedding_size]`, invariant to hidden permutations."""

    def __init__(self, spec: LSTMSpec, cfg: DWSConfig = DWSConfig()) -> None:
        super().__init__()
        if not cfg.channels:
            raise ValueError("DWSConfig.channels needs at least one layer")
        self.spec, self.cfg = spec, cfg
        channels = (GATES, *cfg.channels)
        self.layers = nn.ModuleList(
            EquivariantLayer(spec, c_in, c_out, cfg.io_embed) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.head = mlp((len(spec.tensors) * channels[-1], *cfg.mlp_hidden, cfg.embedding_size))

    def forward(self, params: Tensor) -> Tensor:
        with no_autocast(params):  # float32 under --precision bf16 too (see no_autocast)
            feats, sums = to_features(self.spec, params), None
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                feats, sums = layer(feats, sums, pooled=i == last, relu=i != last)
            return unit_norm(self.head(torch.cat([feats[t.name] for t in self.spec.tensors], dim=-1)))
