"""`rnnrep zoo import-reference`: the published npy zoos in rnnrep's format, same splits.

The reference stores one row per snapshot across parallel npy files (layout in
REFERENCE.md). Its split is computed per zoo over the task rows present, so the
importer reproduces that computation, not rnnrep's own all-216-task split: an
imported zoo must be split exactly as the reference's reported losses were.

Two fields the reference does not store are marked, not invented: MNIST digit labels
of the rollouts (-1) and FL `strict_accuracy` (NaN).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rnnrep.config import ConfigError, member_spec
from rnnrep.tasks import formal_languages as fl
from rnnrep.tasks.splits import split_of_rows
from rnnrep.zoo.rows import manifest, task_key
from rnnrep.zoo.schema import (
    METRICS,
    ZooFormatError,
    arrow_schema,
    nested,
    rollout_shapes,
)
from rnnrep.zoo.store import write_manifest, write_part

COMMON = ("parameters.npy", "sequences.npy", "logits.npy", "tasks.npy")
KIND_FILES = {"formal-languages": ("num_step_correct.npy",), "sequential-mnist": ("num_step.npy", "accuracy_losses.npy")}


def guess_kind(source: Path) -> str:
    for kind, files in KIND_FILES.items():
        if all((source / f).is_file() for f in files):
            return kind
    raise ZooFormatError(
        f"{source} holds neither num_step_correct.npy (formal languages) nor num_step.npy + "
        "accuracy_losses.npy (sequential MNIST): point at an extracted reference zoo folder"
    )


def _load(source: Path, name: str) -> np.ndarray:
    path = source / name
    if not path.is_file():
        raise ZooFormatError(f"{path} is missing: a reference zoo folder has {', '.join(COMMON)} and more")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ZooFormatError(f"{path} is not a readable npy file ({e}); re-extract the zoo") from None


def import_reference(
    source: str | Path, out: str | Path, kind: str | None = None, rows_per_file: int = 900, overwrite: bool = False
) -> dict[str, Any]:
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ZooFormatError(f"no folder at {source}: extract the reference zoo there first")
    if rows_per_file < 1:
        raise ConfigError("--rows-per-file must be at least 1")
    kind = kind or guess_kind(source)
    if kind not in KIND_FILES:
        raise ConfigError(f"unknown task {kind!r}: choose one of {', '.join(KIND_FILES)}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    arrays = {name: _load(source, name) for name in COMMON + KIND_FILES[kind]}
    params, sequences, logits, tasks = (arrays[n] for n in COMMON)
    n = len(params)
    for name, arr in arrays.items():
        if len(arr) != n:
            raise ZooFormatError(f"{source}/{name} has {len(arr)} rows, parameters.npy has {n}: the zoo is incomplete")
    spec = member_spec(kind)
    if params.ndim != 2 or params.shape[1] != spec.num_params:
        raise ZooFormatError(
            f"{source}/parameters.npy rows have {params.shape[1:]} values; a {kind} member (2x32 LSTM) has "
            f"{spec.num_params}: wrong zoo kind or architecture"
        )
    if kind == "formal-languages":
        steps_info = np.asarray(arrays["num_step_correct.npy"])
        member_ids, steps = steps_info[:, 0].astype(np.int64), steps_info[:, 1].astype(np.int64)
        task_rows = np.asarray(tasks).astype(np.int64)
        _, _, splits = split_of_rows(task_rows, lambda t: fl.task_entropy(t))
        task_values = task_rows[:, 1:].astype(np.float32)
        metrics = {
            "accuracy": steps_info[:, 2].astype(np.float32) / 1000,
            "strict_accuracy": np.full(n, np.nan, dtype=np.float32),
        }
    else:
        steps_info = np.asarray(arrays["num_step.npy"])
        member_ids, steps = steps_info[:, 0].astype(np.int64), steps_info[:, 1].astype(np.int64)
        task_rows = np.asarray(tasks, dtype=np.float64).reshape(n, -1)
        _, _, splits = split_of_rows(task_rows, lambda t: t.reshape(len(t), -1).sum(-1))
        task_values = task_rows.astype(np.float32)
        acc = np.asarray(arrays["accuracy_losses.npy"], dtype=np.float32)
        metrics = {
            "accuracy": acc[:, 0],
            "train_loss": acc[:, 1],
            "eval_loss": acc[:, 2],
            "generalization_gap": acc[:, 2] - acc[:, 1],
            "weight_decay": acc[:, 3],
        }
    rollouts = int(sequences.shape[1])
    shapes = rollout_shapes(kind, spec, rollouts)
    stored_as = "sequences" if kind == "formal-languages" else "inputs"  # what sequences.npy holds
    expected = {"sequences": tuple(shapes[stored_as]), "logits": tuple(shapes["logits"])}
    for name, arr in (("sequences", sequences), ("logits", logits)):
        if tuple(arr.shape[1:]) != expected[name]:
            raise ZooFormatError(
                f"{source}/{name}.npy rows have shape {arr.shape[1:]}, expected {expected[name]} for {kind}"
            )
    snapshot_steps = sorted(int(s) for s in np.unique(steps))
    snapshot_index = np.searchsorted(snapshot_steps, steps).astype(np.int8)
    split_map = {task_key(t): str(s) for t, s in zip(task_values, splits)}
    args = source / "args.json"
    meta = manifest(
        kind, spec, origin="imported",
        config={"source": str(source.resolve()), "reference_args": json.loads(args.read_text()) if args.is_file() else None},
        snapshot_steps=snapshot_steps, splits=split_map, rollouts=rollouts, source={"name": "reference-npy"},
        members=int(len(np.unique(member_ids))),
    )
    meta["notes"] = (
        "strict_accuracy is NaN: the reference stores only counts of correct strings"
        if kind == "formal-languages"
        else "labels are -1: the reference does not store the digits' labels"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.importing-"))
    try:
        write_manifest(staging, meta)
        order = np.lexsort((snapshot_index, member_ids))
        for start in range(0, n, rows_per_file):
            rows = order[start : start + rows_per_file]
            table = _table(kind, rows, params, sequences, logits, member_ids, snapshot_index, steps, task_values, splits, metrics)
            name = f"part-{start // rows_per_file:05d}.parquet"
            meta["files"][name] = write_part(staging, name, table)
        meta["rows"] = n
        meta["complete"] = True
        write_manifest(staging, meta)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _table(kind, rows, params, sequences, logits, member_ids, snapshot_index, steps, task_values, splits, metrics) -> pa.Table:
    cols: dict[str, Any] = {
        "member_id": pa.array(member_ids[rows]),
        "snapshot": pa.array(snapshot_index[rows]),
        "step": pa.array(steps[rows].astype(np.int32)),
        "task": nested(task_values[rows]),
        "split": pa.array([str(s) for s in splits[rows]], type=pa.string()),
        "params": nested(np.asarray(params[rows], dtype=np.float32)),
    }
    if kind == "formal-languages":
        seq = np.asarray(sequences[rows]).astype(np.int8)
        # The reference's acceptance check wrote EOS over position 0 of sequences that never
        # emitted EOS (first-EOS index 0); their logits were computed from BOS, so restore it.
        seq[:, :, 0] = fl.BOS
        cols["sequences"] = nested(seq)
    else:
        cols["inputs"] = nested(np.asarray(sequences[rows], dtype=np.float16))
        cols["labels"] = nested(np.full((len(rows), sequences.shape[1]), -1, dtype=np.int8))
    cols["logits"] = nested(np.asarray(logits[rows], dtype=np.float16))
    for m in METRICS[kind]:
        cols[m] = pa.array(metrics[m][rows])
    return pa.table(cols, schema=arrow_schema(kind))
