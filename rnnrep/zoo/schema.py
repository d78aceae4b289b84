"""The zoo's on-disk format: one Parquet row per member snapshot, plus `zoo.json`.

Multi-dimensional columns are nested Arrow lists (not Ray's tensor extension type),
so plain pyarrow, polars and DuckDB read them; their shapes are recorded in
`zoo.json` so readers turn them back into dense arrays without guessing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rnnrep.lstm import LSTMSpec

FORMAT = "rnnrep-zoo"
SCHEMA_VERSION = 1

# scalar metrics per kind, all float32 columns
METRICS = {
    "formal-languages": ("accuracy", "strict_accuracy"),
    "sequential-mnist": ("accuracy", "train_loss", "eval_loss", "generalization_gap", "weight_decay"),
}
# rollout columns per kind: name -> numpy dtype of the stored values
ROLLOUTS = {
    "formal-languages": {"sequences": np.int8},
    "sequential-mnist": {"inputs": np.float16, "labels": np.int8},
}

_ARROW = {
    np.dtype(np.int8): pa.int8(),
    np.dtype(np.int32): pa.int32(),
    np.dtype(np.int64): pa.int64(),
    np.dtype(np.float16): pa.float16(),
    np.dtype(np.float32): pa.float32(),
}


class ZooFormatError(ValueError):
    """A zoo on disk is not what it claims to be; the message names the fix."""


def rollout_shapes(kind: str, spec: LSTMSpec, rollouts: int) -> dict[str, list[int]]:
    """Per-row shapes of the multi-dimensional columns."""
    if kind == "formal-languages":
        T = 42
        return {"sequences": [rollouts, T], "logits": [rollouts, T - 1, spec.output_size]}
    T = 50
    return {
        "inputs": [rollouts, T, spec.input_size],
        "labels": [rollouts],
        "logits": [rollouts, T, spec.output_size],
    }


def arrow_schema(kind: str) -> pa.Schema:
    fields = [
        pa.field("member_id", pa.int64()),
        pa.field("snapshot", pa.int8()),
        pa.field("step", pa.int32()),
        pa.field("task", pa.list_(pa.float32())),
        pa.field("split", pa.string()),
        pa.field("params", pa.list_(pa.float32())),
    ]
    for name, dtype in ROLLOUTS[kind].items():
        depth = {"sequences": 2, "inputs": 3, "labels": 1}[name]
        fields.append(pa.field(name, _list_type(_ARROW[np.dtype(dtype)], depth)))
    depth = 3
    fields.append(pa.field("logits", _list_type(pa.float16(), depth)))
    fields += [pa.field(m, pa.float32()) for m in METRICS[kind]]
    return pa.schema(fields)


def _list_type(value: pa.DataType, depth: int) -> pa.DataType:
    for _ in range(depth):
        value = pa.list_(value)
    return value


def nested(arr: np.ndarray) -> pa.Array:
    """A dense array [N, d1, ..., dk] as N rows of k-deep nested lists, without Python loops."""
    arr = np.ascontiguousarray(arr)
    out: pa.Array = pa.array(arr.reshape(-1), type=_ARROW[arr.dtype])
    for size, count in zip(reversed(arr.shape[1:]), _prefix_counts(arr.shape)):
        offsets = pa.array(np.arange(0, count * size + 1, size, dtype=np.int32))
        out = pa.ListArray.from_arrays(offsets, out)
    return out


def _prefix_counts(shape: tuple[int, ...]) -> list[int]:
    """Number of lists at each level, innermost first: N*d1*...*d(k-1), ..., N."""
    counts = []
    for k in range(len(shape) - 1, 0, -1):
        counts.append(int(np.prod(shape[:k])))
    return counts


def dense(column: pa.ChunkedArray | pa.Array, shape: list[int], dtype=None) -> np.ndarray:
    """Inverse of `nested`: rows of nested lists with per-row `shape` -> [N, *shape]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    values = column
    for _ in shape:
        values = values.flatten()
    arr = values.to_numpy(zero_copy_only=False)
    expected = n * int(np.prod(shape))
    if arr.size != expected:
        raise ZooFormatError(
            f"column holds {arr.size} values where shape {shape} needs {expected}: the zoo is "
            "corrupt; rebuild it or re-import it"
        )
    arr = arr.reshape(n, *shape)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def check_table_schema(schema: pa.Schema, kind: str, where: str) -> None:
    expected = arrow_schema(kind)
    for field in expected:
        if field.name not in schema.names:
            raise ZooFormatError(
                f"{where}: column {field.name!r} is missing; this is not a {kind} zoo file "
                "written by rnnrep (rebuild or re-import the zoo)"
            )
        got = schema.field(field.name).type
        if got != field.type:
            raise ZooFormatError(
                f"{where}: column {field.name!r} has type {got}, expected {field.type}; "
                "rebuild or re-import the zoo"
            )
