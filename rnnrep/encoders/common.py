"""Pieces every mechanistic encoder shares: an MLP head, the unit-norm embedding, and
random hidden-neuron permutation augmentation.

Kept apart so that each encoder file holds only what makes it different.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rnnrep.lstm import LSTMSpec, permutation_index, permute_hidden, random_permutations


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them and none after the last.

    `sizes = (in, h1, ..., out)`: `len(sizes) - 1` Linear layers. The head emits raw
    scores that are L2-normalised afterwards, so a final activation would only
    throw away directions.
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def unit_norm(z: Tensor) -> Tensor:
    """The embedding lives on the unit sphere (the reference's `normalize_embedding`).

    In float32 at least: under bfloat16 autocast the norm would be off by up to 0.4%.
    """
    return nn.functional.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def no_autocast(t: Tensor) -> torch.autocast:
    """Autocast off on `t`'s device: for what stays float32 under `--precision bf16`.

    Only where bfloat16 does not pay (2 CPU threads, each pair timed in turn, medians):
    the probing encoders' members (they are the data) and their per-step probe decoder
    and read-in, whose matmuls are tiny (interactive encoder forward + backward 69.5 ms,
    78.1 with autocast on there, 80.4 all float32); and the DWS encoder, whose layers
    are memory-bound sums and broadcasts (140 ms, 181 with autocast, 138 all float32).
    The interactive encoder's rollout node (`rnnrep.encoders.interactive`) turns autocast
    off itself and keeps the same split: only its core's GEMMs run in the autocast dtype.
    """
    return torch.autocast(t.device.type, enabled=False)


AUGMENT = ("batch", "member", "none")


def check_positive(config: object, *names: str) -> None:
    """A ValueError naming the first of `config`'s fields `names` that is below 1."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {value}")


def check_augment(owner: str, value: str | bool) -> str:
    """A valid `augment` setting; a bool is how run folders from before it was a choice hold it."""
    if isinstance(value, bool):  # True then meant one permutation per member
        return "member" if value else "none"
    if value not in AUGMENT:
        raise ValueError(f"{owner}.augment must be one of {', '.join(AUGMENT)}; got {value!r}")
    return value


def permute_randomly(
    spec: LSTMSpec, params: Tensor, per: str = "batch", generator: torch.Generator | None = None
) -> Tensor:
    """`params[B, P]` with random hidden-neuron permutations: one per layer for the batch, or per member.

    `per` is an `augment` setting, checked by `check_augment` when its config is made.

    The permuted member computes the same function, so it is another sample of the
    same data point: encoders that are not permutation invariant by construction
    (flat MLP, parameter transformer) learn the symmetry from it. `per="batch"` is
    the reference's augmentation and costs one gather; `per="member"` gives more
    distinct samples per step at a gather per tensor; `per="none"` leaves `params` as they are.
    """
    if per == "none":
        return params
    if per == "member":
        perms = random_permutations(spec, params.shape[0], generator=generator)
        return permute_hidden(spec, params, [p.to(params.device) for p in perms])
    perms = [p[0] for p in random_permutations(spec, 1, generator=generator)]
    return params.index_select(-1, permutation_index(spec, perms).to(params.device))


def weight_bias_pairs(spec: LSTMSpec) -> list[tuple[str, str]]:
    """(weight, bias) names, one pair per matrix: ih_0, hh_0, ..., ih_{L-1}, hh_{L-1}, read-out.

    A row of a weight with its bias entry is one neuron's (or one gate row's) incoming
    weights, the unit that the transformer tokenises and DWS pairs.
    """
    pairs = []
    for layer in range(spec.num_layers):
        pairs += [(f"weight_ih_l{layer}", f"bias_ih_l{layer}"), (f"weight_hh_l{layer}", f"bias_hh_l{layer}")]
    return pairs + [("linear.weight", "linear.bias")]


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters: the number the paper's parameter budgets compare."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
