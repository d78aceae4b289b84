"""Opening, validating, writing and streaming zoos (no Ray needed, except `to_ray`).

A zoo folder holds `zoo.json` and `part-*.parquet` files. Every file is written to a
temporary name and renamed into place, and `zoo.json` lists each file with its row
count, member range and sha256, so a reader can tell a finished zoo from a broken one
and a build can resume from whatever complete files are there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rnnrep.lstm import LSTMSpec
from rnnrep.zoo.schema import (
    FORMAT,
    METRICS,
    ROLLOUTS,
    SCHEMA_VERSION,
    ZooFormatError,
    check_table_schema,
    dense,
)

if TYPE_CHECKING:
    import polars as pl

MANIFEST = "zoo.json"
META_COLUMNS = ("member_id", "snapshot", "step", "task", "split")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(root: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(root / MANIFEST, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())


def write_part(root: Path, name: str, table: pa.Table) -> dict[str, Any]:
    """Write one Parquet file atomically; return its manifest entry.

    Each row group holds rows of one split (in their order in `table`), so that a reader
    of one split decodes only its rows: Parquet decodes a row group's nested columns
    whole, and decoding is most of what reading training data costs.
    """
    path = root / name
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        with pq.ParquetWriter(
            tmp, table.schema, compression="zstd", use_dictionary=_dictionary_columns(table.schema)
        ) as writer:
            for part in _by_split(table):
                writer.write_table(part, row_group_size=256)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return part_entry(path, table)


def _by_split(table: pa.Table) -> list[pa.Table]:
    """`table`'s rows split by their `split` value (first-seen order), each in table order."""
    splits = table.column("split").to_numpy(zero_copy_only=False)
    names = list(dict.fromkeys(splits.tolist()))
    if len(names) <= 1:  # one split (or none): no copy
        return [table]
    return [table.take(pa.array(np.flatnonzero(splits == n))) for n in names]


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: the scalar ones, not the arrays.

    Weights and logits have almost no repeated values, so a dictionary only costs:
    with it, decoding a row group of a formal-language zoo took 3x longer (logits
    114 vs 36 ms per 256 rows, measured), and training reads every row each epoch.
    """
    return [f.name for f in schema if not pa.types.is_list(f.type)]


def part_entry(path: Path, table: pa.Table) -> dict[str, Any]:
    ids = table.column("member_id").to_numpy()
    return {
        "rows": len(table),
        "members": sorted({int(i) for i in ids}),
        "sha256": sha256(path),
    }


@dataclass
class Zoo:
    """An opened, validated zoo."""

    root: Path
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def spec(self) -> LSTMSpec:
        a = self.meta["architecture"]
        return LSTMSpec(a["input_size"], a["output_size"], a["hidden_size"], a["num_layers"])

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.meta["shapes"]

    @property
    def files(self) -> list[Path]:
        return [self.root / name for name in sorted(self.meta["files"])]

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS[self.kind]

    def metadata(self) -> pl.DataFrame:
        """One row per snapshot: ids, step, task, split and metrics; no weights or rollouts."""
        import polars as pl  # here, not at the top: building and training a zoo never need it

        cols = list(META_COLUMNS) + list(self.metric_names)
        frames = [pl.read_parquet(f, columns=cols) for f in self.files]
        return pl.concat(frames).sort(["member_id", "snapshot"])

    def iter_tables(
        self, split: str | None = None, columns: list[str] | None = None, batch_rows: int = 256
    ) -> Iterator[pa.Table]:
        """Stream rows file by file, row group by row group: memory stays flat in zoo size."""
        for f in self.files:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns and _with_split(columns)):
                table = pa.Table.from_batches([batch])
                if split is not None:
                    table = table.filter(pc.equal(table.column("split"), split))
                if len(table):
                    yield table

    def arrays(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Dense numpy arrays of a table's columns (shapes from zoo.json)."""
        out: dict[str, np.ndarray] = {}
        for name in table.column_names:
            col = table.column(name)
            if name == "params":
                out[name] = dense(col, [self.spec.num_params])
            elif name == "task":
                out[name] = dense(col, [len(self.meta["task_names"])])
            elif name in self.shapes:
                out[name] = dense(col, self.shapes[name])
            elif name == "split":
                out[name] = np.asarray(col.to_pylist(), dtype=object)
            else:
                out[name] = col.to_numpy()
        return out

    def to_ray(self, split: str | None = None, columns: list[str] | None = None):
        """The zoo as a Ray Dataset (Ray is imported only here)."""
        import ray
        from ray.data.expressions import col

        ds = ray.data.read_parquet([str(f) for f in self.files])
        if columns is not None:
            ds = ds.select_columns(_with_split(columns))
        if split is not None:
            ds = ds.filter(expr=col("split") == split)
        return ds


def _with_split(columns: list[str]) -> list[str]:
    return columns if "split" in columns else [*columns, "split"]


def open_zoo(
    path: str | Path,
    kind: str | None = None,
    spec: LSTMSpec | None = None,
    verify: bool = True,
) -> Zoo:
    """Open a zoo and check it: manifest, schema version, architecture, files, checksums."""
    root = Path(path)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise ZooFormatError(f"no zoo at {root}: build one with `rnnrep zoo build --out {root}`")
    if not manifest.is_file():
        raise ZooFormatError(
            f"{root} has no {MANIFEST}: not an rnnrep zoo (build one with `rnnrep zoo build`, or bring "
            "a reference zoo in with `rnnrep zoo import-reference`)"
        )
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise ZooFormatError(f"{manifest} is not valid JSON ({e}); rebuild or re-import the zoo") from None
    if meta.get("format") != FORMAT:
        raise ZooFormatError(f"{manifest} is not an rnnrep zoo manifest (format={meta.get('format')!r})")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ZooFormatError(
            f"{root} has zoo schema version {version}, this rnnrep reads version {SCHEMA_VERSION}: "
            "upgrade rnnrep or rebuild the zoo"
        )
    if not meta.get("complete", False):
        raise ZooFormatError(
            f"{root} is an unfinished build ({len(meta.get('files', {}))} files so far): re-run the same "
            "`rnnrep zoo build` command to resume it"
        )
    zoo = Zoo(root, meta)
    if kind is not None and zoo.kind != kind:
        raise ZooFormatError(f"{root} is a {zoo.kind} zoo, but a {kind} zoo was asked for")
    if spec is not None and zoo.spec != spec:
        raise ZooFormatError(
            f"{root} holds members of architecture {zoo.spec.to_dict()}, but {spec.to_dict()} was "
            "asked for: use a zoo of that architecture"
        )
    if kind is None and zoo.kind not in ROLLOUTS:
        raise ZooFormatError(f"{root}: unknown zoo kind {zoo.kind!r}")
    for f in zoo.files:
        if not f.is_file():
            raise ZooFormatError(f"{root}: data file {f.name} listed in {MANIFEST} is missing; rebuild the zoo")
        entry = meta["files"][f.name]
        if verify and sha256(f) != entry["sha256"]:
            raise ZooFormatError(
                f"{f}: checksum mismatch (the file changed or is corrupt); rebuild or re-import the zoo"
            )
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ZooFormatError(f"{f}: not a readable Parquet file ({e}); rebuild the zoo") from None
        check_table_schema(schema, zoo.kind, str(f))
    return zoo
