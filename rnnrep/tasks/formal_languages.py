"""Relative-occurrence languages a^n b^(n+m_b) c^(n+m_c) d^(n+m_d).

A task is the offset vector m = (m_b, m_c, m_d), each in {-3, ..., 2}: 216 tasks.
Strings are 42 tokens: BOS, the string, then EOS to the end (truncated when the
string is longer, exactly as the reference generator does). Tokens: a=0, b=1, c=2,
d=3, BOS=4, EOS=5; members see them one-hot (size 6) and predict the next one.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

NUM_SYMBOLS = 4
BOS = 4
EOS = 5
VOCAB = 6
SEQ_LEN = 42
MAX_N = 10
OFFSETS = tuple(range(-3, 3))


def all_tasks() -> np.ndarray:
    """The 216 offset vectors (m_b, m_c, m_d), int64 [216, 3], in lexicographic order."""
    return np.array(list(itertools.product(OFFSETS, repeat=3)), dtype=np.int64)


def min_n(offsets: Tensor) -> Tensor:
    """Smallest n for which every count n + m is non-negative."""
    return torch.clamp(-offsets.min(dim=-1).values, min=0)


def strings_from_n(n: Tensor, offsets: Tensor) -> Tensor:
    """Token sequences [..., 42] for given n [...] and offsets [..., 3] (broadcast)."""
    zeros = torch.zeros_like(offsets[..., :1])
    counts = n.unsqueeze(-1) + torch.cat([zeros, offsets], dim=-1)  # [..., 4]
    ends = counts.cumsum(-1)  # token j occupies positions [ends[j-1], ends[j])
    pos = torch.arange(SEQ_LEN - 1, device=n.device)
    tokens = (pos[..., :, None] >= ends[..., None, :]).sum(-1)  # 0..4, 4 = past the string
    tokens = torch.where(tokens == NUM_SYMBOLS, EOS, tokens)
    bos = torch.full_like(tokens[..., :1], BOS)
    return torch.cat([bos, tokens], dim=-1)


def sample_n(offsets: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """n uniform in [min_n(m), MAX_N) for one task `offsets[3]`."""
    lo = int(min_n(offsets))
    return torch.randint(lo, MAX_N, shape, generator=generator)


def accept(sequences: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Judge sampled sequences [..., 42] (BOS first) against tasks `offsets[..., 3]`.

    Returns (correct, undefined, strict_correct), bool [...]. The reference semantics:
    a sequence without EOS is undefined; otherwise it is correct when, counting the
    tokens before the first EOS, count(x) - offset(x) is the same for all four symbols.
    Order is not checked there, so `correct` accepts "ba" for m = 0; `strict_correct`
    additionally requires the symbols in order (a* b* c* d*) and no BOS in the string.
    """
    body = sequences[..., 1:]
    is_eos = body == EOS
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), body.shape[-1])
    before = torch.arange(body.shape[-1], device=body.device) < first_eos.unsqueeze(-1)
    counts = torch.stack([((body == s) & before).sum(-1) for s in range(NUM_SYMBOLS)], dim=-1)
    zeros = torch.zeros_like(offsets[..., :1])
    adjusted = counts - torch.cat([zeros, offsets], dim=-1)
    correct = (adjusted == adjusted[..., :1]).all(-1) & has_eos
    prefix = torch.where(before, body, NUM_SYMBOLS - 1)  # pad after EOS with the last symbol
    ordered = (prefix[..., 1:] >= prefix[..., :-1]).all(-1) & ~((body == BOS) & before).any(-1)
    return correct, ~has_eos, correct & ordered


def task_entropy(tasks: np.ndarray) -> np.ndarray:
    """The reference's split criterion: entropy of (1 + t - min t) as a distribution.

    `tasks` are the reference's 4-vectors (0, m_b, m_c, m_d). Computed in float32
    exactly as the reference does, since ties and rounding decide the split.
    """
    shifted = 1 + tasks - tasks.min(axis=-1, keepdims=True)
    dist = shifted.astype(np.float32) / shifted.sum(axis=-1, keepdims=True)
    return -(dist * np.log(dist + 1e-6)).sum(axis=-1)


def with_leading_zero(offsets: np.ndarray) -> np.ndarray:
    """(m_b, m_c, m_d) -> (0, m_b, m_c, m_d), the reference's task vector."""
    return np.concatenate([np.zeros_like(offsets[..., :1]), offsets], axis=-1)
