"""Dropout whose CPU mask comes from a counter-based hash, not torch's sequential generator.

The same op as `nn.Dropout` (each value zeroed with probability p, survivors scaled
by 1 / (1 - p)), with another random stream. On the CPU, torch draws a dropout mask
one element at a time; the parameter transformer's 18 dropouts over up to
64 x 519 x 512 values made that a fifth of its training step. The C kernel
(`_dropout.c`) hashes (seed, index) instead: it vectorises, and the backward
recomputes the mask from the seed rather than storing it. The seed is drawn from
torch's default generator, so `torch.manual_seed` still makes a run repeatable.
On the CPU it handles float32 and bfloat16 (`--precision bf16`). Elsewhere (GPUs,
float64, no compiler, `RNNREP_CELL_KERNEL=0`) this is `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnrep import cell

_SEED_LIMIT = 2**63 - 1


def _masked(kernel, x: Tensor, p: float, seed: int) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    kernel(x.numel(), x.data_ptr(), out.data_ptr(), seed, min(round(p * 2**32), 2**32 - 1), 1.0 / (1.0 - p))
    return out


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, kernel) -> Tensor:
        ctx.kernel, ctx.p, ctx.seed = kernel, p, int(torch.randint(0, _SEED_LIMIT, ()))
        return _masked(kernel, x, p, ctx.seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _masked(ctx.kernel, grad, ctx.p, ctx.seed), None, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """`F.dropout(x, p, training)`, on the C kernel where it applies."""
    if not training or p == 0.0:
        return x
    kernel = cell.dropout_kernel(x)
    if kernel is None or not 0.0 < p < 1.0 or x.numel() >= 2**32:
        return F.dropout(x, p, training=True)  # which also rejects a p outside [0, 1]
    return _HashDropout.apply(x, p, kernel)


class Dropout(nn.Dropout):
    """`nn.Dropout` (its checks, its repr) running `dropout` above; never in place."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
