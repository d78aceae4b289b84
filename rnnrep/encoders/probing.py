"""Probing encoders: embed a member by what it does on learned inputs, not by its weights.

A probing encoder feeds L learned probe inputs (M in parallel) through the member,
step by step and differentiably (`rnnrep.lstm.forward` runs the whole batch of
members at once), reads the member's raw logits into a 2-layer residual LSTM core,
and maps the core's final output to a 16-value, L2-normalised embedding. Because it
only sees the member's function, it is invariant to every hidden-neuron permutation
by construction; no augmentation is needed.

- Non-interactive: the probes are a fixed learned sequence, the same for every
  member, so the member and the core each run over the whole sequence in one call.
- Interactive: probe t+1 is decoded from the core's state after it has read the
  member's answer to probe t, so the questions adapt to the member (the paper's
  Prop. 3.3: some function classes need exponentially fewer adaptive queries).

The wiring follows the reference's `InteractiveEncoder` (both variants are that
class there, with interactive/static weights 1/0 or 0/1):

    core input:  BOS, then sigmoid(Linear(member logits of the M probes, concatenated)), then EOS
    probe t:     decode(ReLU(Linear(query_t))) -> M codes of `mlp_hidden` -> MLP -> softmax (FL) / sigmoid (MNIST)
    query_t:     code[t] (non-interactive), or the core's output after the previous read
                 (+ static_weight * code[t]) (interactive); probe 0 follows the core's read of BOS
    embedding:   MLP(core output after EOS), L2-normalised

so the core runs L + 2 steps and the member L steps, from zero state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnrep import lstm
from rnnrep.encoders import interactive
from rnnrep.encoders.common import check_positive, no_autocast, unit_norm
from rnnrep.lstm import LSTMSpec

KINDS = ("formal-languages", "sequential-mnist")
_PROBE_LENGTH = {"formal-languages": 22, "sequential-mnist": 50}


@dataclass(frozen=True)
class ProbingConfig:
    """Sizes of a probing encoder; the defaults are the paper's (FL, M = 1).

    `static_weight` mixes the learned code of step t into the interactive query,
    as the reference's `static_weight` does (0 in the paper; unused by the
    non-interactive encoder, whose query is the code alone).
    """

    embedding_size: int = 16
    core_hidden: int = 256
    core_layers: int = 2
    mlp_hidden: int = 128
    mlp_layers: int = 1
    num_probes: int = 1
    probe_length: int = 22
    residual: bool = True
    static_weight: float = 0.0
    learn_initial_state: bool = False  # the reference starts the core from zeros

    def __post_init__(self) -> None:
        check_positive(self, "embedding_size", "core_hidden", "core_layers", "mlp_hidden", "num_probes", "probe_length")
        if self.mlp_layers < 0:
            raise ValueError(f"ProbingConfig.mlp_layers must be >= 0, got {self.mlp_layers}")


def default_probing_config(kind: str, **overrides: object) -> ProbingConfig:
    """The paper's probing config for a member kind (probe length 22 FL, 50 MNIST)."""
    _check_kind(kind)
    return replace(ProbingConfig(probe_length=_PROBE_LENGTH[kind]), **overrides)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown member kind {kind!r}; choose one of {KINDS}")


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class ResidualLSTMCore(nn.Module):
    """Stacked LSTM whose every layer adds its input to its output (the reference's `RNNCell`).

    Held as single-layer `nn.LSTM`s so that a whole sequence runs in the fused
    kernel (non-interactive); `rnnrep.encoders.interactive` steps the same weights
    one input at a time (interactive). The reference allocates
    an initial state `h0`, `c0` but always starts from zeros; so does this core by
    default (the parameters exist, unused, for the paper's parameter count), and
    `learn_initial_state` trains them instead. Its LSTMs keep PyTorch's initialisation:
    the reference's `--encoder_open_gate_init` would set the forget-gate biases to 1, but
    its training configs set it to 0.
    """

    def __init__(self, size: int, num_layers: int, residual: bool, learn_initial_state: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.LSTM(size, size, batch_first=True) for _ in range(num_layers))
        self.h0 = nn.Parameter(torch.zeros(num_layers, size))
        self.c0 = nn.Parameter(torch.zeros(num_layers, size))
        self.residual = residual
        self.learn_initial_state = learn_initial_state

    def initial_state(self, batch: int) -> list[tuple[Tensor, Tensor]] | None:
        """Per-layer `(h, c)`, each `[batch, D]`; None for zeros (the reference's start)."""
        if not self.learn_initial_state:
            return None
        return [(h.expand(batch, -1), c.expand(batch, -1)) for h, c in zip(self.h0, self.c0)]

    def sequence(self, x: Tensor) -> Tensor:
        """Outputs `[B, T, D]` for inputs `[B, T, D]`, from the initial state."""
        state = self.initial_state(x.shape[0]) or [None] * len(self.layers)
        for layer, hc in zip(self.layers, state):
            out, _ = layer(x, None if hc is None else (hc[0][None].contiguous(), hc[1][None].contiguous()))
            x = out + x if self.residual else out
        return x


class _Probing(nn.Module):
    """What both probing encoders share: parameters, probe decoding, the read-in and the head."""

    def __init__(self, spec: LSTMSpec, kind: str, cfg: ProbingConfig) -> None:
        super().__init__()
        _check_kind(kind)
        self.spec, self.kind, self.cfg = spec, kind, cfg
        D, E, M = cfg.core_hidden, cfg.mlp_hidden, cfg.num_probes
        self.core = ResidualLSTMCore(D, cfg.core_layers, cfg.residual, cfg.learn_initial_state)
        self.bos = nn.Parameter(torch.zeros(D))
        self.eos = nn.Parameter(torch.zeros(D))
        # L + 1 codes as in the reference, which queries only the first L of them.
        self.codes = nn.Parameter(torch.randn(cfg.probe_length + 1, D))
        self.query_up = nn.Linear(D, E * M)  # one code of size E per parallel probe
        self.probe_decoder = _mlp([E] + [E] * cfg.mlp_layers + [spec.input_size])
        self.read_in = nn.Linear(spec.output_size * M, D)
        self.head = _mlp([D] + [E] * cfg.mlp_layers + [cfg.embedding_size])

    def decode_probes(self, query: Tensor) -> Tensor:
        """Queries `[..., D]` -> M member inputs `[..., M, I]` (token distributions or tiles)."""
        with no_autocast(query):
            codes = F.relu(self.query_up(query)).unflatten(-1, (self.cfg.num_probes, self.cfg.mlp_hidden))
            out = self.probe_decoder(codes)
            return out.softmax(-1) if self.kind == "formal-languages" else out.sigmoid()

    def read(self, logits: Tensor) -> Tensor:
        """Member logits `[..., M, O]` -> a core input `[..., D]`."""
        with no_autocast(logits):
            return torch.sigmoid(self.read_in(logits.flatten(-2)))

    def embed(self, core_out: Tensor) -> Tensor:
        return unit_norm(self.head(core_out))

    def forward(self, params: Tensor) -> Tensor:
        """Flat member parameters `[B, P]` -> embeddings `[B, embedding_size]`."""
        return self.rollout(params)[0]

    def rollout(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings `[B, embedding_size]` and the probes put to each member, `[B, M, L, I]`."""
        raise NotImplementedError


class NonInteractiveProbing(_Probing):
    """The same learned probe sequence for every member; see the module docstring."""

    def probes(self) -> Tensor:
        """The probe inputs `[M, L, I]` (member-independent)."""
        return self.decode_probes(self.codes[: self.cfg.probe_length]).transpose(0, 1)

    def rollout(self, params: Tensor) -> tuple[Tensor, Tensor]:
        B = params.shape[0]
        x = self.probes()
        x = x.expand(B, *x.shape)
        with no_autocast(params):
            logits, _ = lstm.forward(self.spec, params, x)  # [B, M, L, O]
        reads = self.read(logits.transpose(1, 2))  # [B, L, D]
        bos, eos = self.bos.expand(B, 1, -1), self.eos.expand(B, 1, -1)
        out = self.core.sequence(torch.cat([bos, reads, eos], dim=1))
        return self.embed(out[:, -1]), x


class InteractiveProbing(_Probing):
    """Each probe is decoded from the core's state after the previous answer; see the module docstring."""

    def rollout(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """As `_Probing.rollout`, in one autograd node (`rnnrep.encoders.interactive`); the
        probes are returned for inspection, without a gradient."""
        out, probes = interactive.run(self, params)
        return self.embed(out), probes
