"""Per-step distances between the member's next-output distribution and the emulator's.

Definitions follow the reference's `training_iteration` exactly, quirks included,
so that losses are comparable with the paper's (Table 2 reports total variation):

- `total_variation`: 0.5 * sum_o |p - q|, in [0, 1]; the default.
- `kl`: KL(p || q), p the member's distribution (target), q the emulator's,
  averaged (not summed) over the O outputs, as the reference's
  `F.kl_div(log q, p).mean(-1)`: the true KL divided by O.
- `kl_reverse`: KL(q || p), likewise averaged over outputs.
- `js_div`: the reference's "js_div", (KL(p||q) + KL(q||p)) / 2 averaged over
  outputs: a symmetrised KL (Jeffreys / 2), not the Jensen-Shannon divergence.
- `ce`: cross-entropy -sum_o p log q against the member's distribution. The
  reference uses the sampled next token (FL) or the member's argmax (MNIST) as a
  hard label; the soft target is the FL version's expectation, without its noise.

Every function maps logits `[..., O]` to per-step losses `[...]`; `emulation_loss`
averages them over steps and members (each member has the same number of steps,
so this is the reference's mean of per-member means).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Loss = Callable[[Tensor, Tensor], Tensor]


def _log_probs(emulator_logits: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log q (emulator) and log p (member), in the emulator's dtype (stored logits are float16)."""
    return emulator_logits.log_softmax(-1), target_logits.to(emulator_logits.dtype).log_softmax(-1)


def total_variation(emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    log_q, log_p = _log_probs(emulator_logits, target_logits)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def kl(emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    log_q, log_p = _log_probs(emulator_logits, target_logits)
    return (log_p.exp() * (log_p - log_q)).mean(-1)


def kl_reverse(emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    log_q, log_p = _log_probs(emulator_logits, target_logits)
    return (log_q.exp() * (log_q - log_p)).mean(-1)


def js_div(emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    log_q, log_p = _log_probs(emulator_logits, target_logits)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).mean(-1) / 2


def cross_entropy(emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    log_q, log_p = _log_probs(emulator_logits, target_logits)
    return -(log_p.exp() * log_q).sum(-1)


LOSSES: dict[str, Loss] = {
    "total_variation": total_variation,
    "kl": kl,
    "kl_reverse": kl_reverse,
    "js_div": js_div,
    "ce": cross_entropy,
}


def emulation_loss(name: str, emulator_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean per-step loss `name` between emulator logits and the member's logits (same shape)."""
    if name not in LOSSES:
        raise ValueError(f"unknown emulation loss {name!r}; choose one of {sorted(LOSSES)}")
    if emulator_logits.shape != target_logits.shape:
        raise ValueError(
            f"logit shapes differ: emulator {tuple(emulator_logits.shape)}, target {tuple(target_logits.shape)}"
        )
    return LOSSES[name](emulator_logits, target_logits).mean()

