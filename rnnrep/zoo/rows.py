"""Turning trained members into zoo rows, and planning a zoo's tasks and splits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

import rnnrep
from rnnrep.config import ZooConfig
from rnnrep.lstm import LSTMSpec
from rnnrep.tasks import formal_languages as fl
from rnnrep.tasks.splits import reference_split
from rnnrep.zoo.members import MemberPlan, Snapshot
from rnnrep.zoo.schema import (
    FORMAT,
    METRICS,
    SCHEMA_VERSION,
    arrow_schema,
    nested,
    rollout_shapes,
)

TASK_NAMES = {"formal-languages": ["m_b", "m_c", "m_d"], "sequential-mnist": ["angle"]}


def task_key(task) -> tuple[float, ...]:
    """Tasks compare as float32, the precision the zoo stores them in."""
    return tuple(float(v) for v in np.asarray(task, dtype=np.float32).reshape(-1))


def plan_splits(cfg: ZooConfig, plans: list[MemberPlan]) -> dict[tuple[float, ...], str]:
    """Task -> split, fixed before any member trains.

    Formal languages: all 216 tasks split by the reference's entropy criterion, so a
    task's split never depends on which tasks the members drew. MNIST (a continuous
    task): the reference procedure over the angles of every planned member.
    """
    if cfg.task == "formal-languages":
        tasks = fl.all_tasks()
        labels = reference_split(tasks, fl.task_entropy(fl.with_leading_zero(tasks)))
        return {task_key(t): str(s) for t, s in zip(tasks, labels)}
    angles = np.unique(np.array([p.task for p in plans], dtype=np.float32), axis=0)
    labels = reference_split(angles, angles.reshape(len(angles), -1).sum(-1))
    return {task_key(t): str(s) for t, s in zip(angles, labels)}


def snapshot_table(
    cfg: ZooConfig, plans: list[MemberPlan], snapshots: list[Snapshot], splits: dict[tuple[float, ...], str]
) -> pa.Table:
    """All snapshot rows of a batch of members, member-major."""
    K, S = len(plans), len(snapshots)

    def stack(get) -> np.ndarray:  # [S, K, ...] -> [K*S, ...] ordered by member, then snapshot
        arr = np.stack([get(s) for s in snapshots], axis=1)
        return arr.reshape(K * S, *arr.shape[2:])

    member_ids = np.repeat(np.array([p.member_id for p in plans], dtype=np.int64), S)
    tasks = np.repeat(np.array([p.task for p in plans], dtype=np.float32), S, axis=0)
    split = [splits[task_key(p.task)] for p in plans for _ in range(S)]
    columns: dict[str, Any] = {
        "member_id": pa.array(member_ids),
        "snapshot": pa.array(np.tile(np.array([s.index for s in snapshots], dtype=np.int8), K)),
        "step": pa.array(np.tile(np.array([s.step for s in snapshots], dtype=np.int32), K)),
        "task": nested(tasks),
        "split": pa.array(split, type=pa.string()),
        "params": nested(stack(lambda s: s.params.astype(np.float32))),
    }
    for name in snapshots[0].rollouts:
        columns[name] = nested(stack(lambda s: s.rollouts[name]))
    columns["logits"] = nested(stack(lambda s: s.logits.astype(np.float16)))
    for m in METRICS[cfg.task]:
        columns[m] = pa.array(stack(lambda s: s.metrics[m]).astype(np.float32))
    return pa.table(columns, schema=arrow_schema(cfg.task))


def manifest(
    kind: str,
    spec: LSTMSpec,
    *,
    origin: str,
    config: dict[str, Any],
    snapshot_steps: list[int],
    splits: dict[tuple[float, ...], str],
    rollouts: int,
    source: dict[str, Any],
    members: int,
) -> dict[str, Any]:
    """A new, still empty `zoo.json` for built (`origin="built"`) and imported zoos alike."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "rnnrep_version": rnnrep.__version__,
        "kind": kind,
        "origin": origin,
        "architecture": {**spec.to_dict(), "num_params": spec.num_params},
        "config": config,
        "snapshot_steps": list(snapshot_steps),
        "task_names": TASK_NAMES[kind],
        "splits": [{"task": list(t), "split": s} for t, s in sorted(splits.items())],
        "shapes": rollout_shapes(kind, spec, rollouts),
        "logits_are": "log_softmax" if kind == "formal-languages" else "raw",
        "data_source": source,
        "members": members,
        "rows": 0,
        "files": {},
        "complete": False,
    }
