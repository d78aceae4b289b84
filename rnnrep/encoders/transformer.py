"""Parameter transformer: one token per neuron, a compression token read out at the end.

A neuron is a row of a weight matrix together with its bias: its incoming weights.
Each (weight, bias) pair of the member (`weight_ih_l*` + `bias_ih_l*`, `weight_hh_l*`
+ `bias_hh_l*`, read-out) has its own linear map of rows to `d_model`, so an LSTM
layer gives 4H tokens from its input weights and 4H from its recurrent weights (one
per gate row). Learned position embeddings tell tokens apart, which also breaks
the permutation symmetry; hence training with random permutations (`cfg.augment`).
A learned compression token, appended last, gathers the embedding.

Paper defaults (6 blocks, d 128, 2 heads, FF 512) give 1,276,688 parameters for the
formal-language member (519 tokens) and 1,278,480 for the MNIST one (523 tokens),
as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnrep.dropout import Dropout
from rnnrep.encoders.common import (
    check_augment,
    check_positive,
    permute_randomly,
    unit_norm,
    weight_bias_pairs,
)
from rnnrep.lstm import LSTMSpec, unflatten


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 128
    num_layers: int = 6
    num_heads: int = 2
    feedforward: int = 512
    # The reference builds torch.nn.TransformerEncoderLayer with its default dropout,
    # 0.1 on the residual and feed-forward paths and on the attention weights. We keep
    # the first and drop the second: attention-weight dropout rules out PyTorch's fused
    # attention kernel and materialises B x heads x T x T (T = 519) weights, which made
    # a training step ~2.4x slower on 2 CPU cores. Set 0.1 to reproduce it exactly.
    dropout: float = 0.1
    attention_dropout: float = 0.0
    embedding_size: int = 16
    # random hidden-neuron permutations in training mode: "batch" (one per layer for the
    # whole batch, the reference's), "member" (one per member) or "none"
    augment: str = "batch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", check_augment("TransformerConfig", self.augment))
        check_positive(self, "d_model", "num_layers", "num_heads", "feedforward", "embedding_size")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")


class Block(nn.Module):
    """Post-norm transformer encoder block (the math of `nn.TransformerEncoderLayer`).

    `last_only` computes only the last token's output: the final block's other rows
    are never read, and skipping them saves most of that block's work.
    """

    def __init__(
        self, d_model: int, num_heads: int, feedforward: int, dropout: float, attention_dropout: float
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=attention_dropout, batch_first=True)
        self.ff = nn.Sequential(
            nn.Linear(d_model, feedforward), nn.ReLU(), Dropout(dropout), nn.Linear(feedforward, d_model)
        )
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2 = Dropout(dropout), Dropout(dropout)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        q = x[:, -1:] if last_only else x
        h = self.norm1(q + self.drop1(self.attn(q, x, x, need_weights=False)[0]))
        return self.norm2(h + self.drop2(self.ff(h)))


class TransformerEncoder(nn.Module):
    """`params[B, P]` -> unit-norm `z[B, embedding_size]`."""

    def __init__(self, spec: LSTMSpec, cfg: TransformerConfig = TransformerConfig()) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.pairs = weight_bias_pairs(spec)
        shapes = [spec.tensor(w).shape for w, _ in self.pairs]
        self.embed = nn.ModuleList(nn.Linear(fan_in + 1, cfg.d_model) for _, fan_in in shapes)
        num_tokens = sum(rows for rows, _ in shapes) + 1
        self.positions = nn.Parameter(torch.randn(1, num_tokens, cfg.d_model))
        self.compression = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.num_heads, cfg.feedforward, cfg.dropout, cfg.attention_dropout)
            for _ in range(cfg.num_layers)
        )
        self.out = nn.Linear(cfg.d_model, cfg.embedding_size)

    def tokens(self, params: Tensor) -> Tensor:
        """`[B, num_neurons + 1, d_model]`: neuron tokens, then the compression token."""
        p = unflatten(self.spec, params)
        rows = [
            embed(torch.cat([p[w], p[b].unsqueeze(-1)], dim=-1)) for (w, b), embed in zip(self.pairs, self.embed)
        ]
        rows.append(self.compression.expand(params.shape[0], -1, -1))
        return torch.cat(rows, dim=1) + self.positions

    def forward(self, params: Tensor) -> Tensor:
        if self.training:
            params = permute_randomly(self.spec, params, self.cfg.augment)
        x = self.tokens(params)
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return unit_norm(self.out(x[:, -1]))
