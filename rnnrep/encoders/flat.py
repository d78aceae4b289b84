"""Flattened-weights encoder: the whole flat parameter vector through an MLP.

The simplest mechanistic encoder. An MLP on the raw vector sees every weight but
knows nothing of the weight-space symmetry, so it is trained on randomly permuted
members (`cfg.augment`) to learn that permuted members are the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from rnnrep.encoders.common import check_augment, mlp, permute_randomly, unit_norm
from rnnrep.lstm import LSTMSpec


@dataclass(frozen=True)
class FlatConfig:
    """Defaults are the paper's: 3 hidden layers of 128 (1,797,264 parameters for FL)."""

    hidden: tuple[int, ...] = (128, 128, 128)
    embedding_size: int = 16
    # random hidden-neuron permutations in training mode: "batch" (one per layer for the
    # whole batch, the reference's), "member" (one per member) or "none"
    augment: str = "batch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", check_augment("FlatConfig", self.augment))


class FlatEncoder(nn.Module):
    """`params[B, P]` -> unit-norm `z[B, embedding_size]`."""

    def __init__(self, spec: LSTMSpec, cfg: FlatConfig = FlatConfig()) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.head = mlp((spec.num_params, *cfg.hidden, cfg.embedding_size))

    def forward(self, params: Tensor) -> Tensor:
        if self.training:
            params = permute_randomly(self.spec, params, self.cfg.augment)
        return unit_norm(self.head(params))
