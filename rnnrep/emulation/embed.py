"""Embed every snapshot of a zoo with a trained encoder: one Parquet row per snapshot.

    rnnrep embed runs/interactive --zoo /data/zoo-fl --out embeddings.parquet

The best checkpoint's encoder runs in eval mode (no permutation augmentation) and in
the run's precision, without gradients, batch by batch over the zoo's files, so memory stays flat in the zoo's
size. The output is written to a temporary name and renamed into place: a reader
never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rnnrep.emulation.train import (
    check_architecture,
    load_checkpoint,
    model_from_checkpoint,
)
from rnnrep.zoo.store import open_zoo


def embed(run: str | Path, zoo: str | Path, out: str | Path, batch_rows: int = 256) -> int:
    """Write `out` (Parquet): member_id, snapshot, step, split, task, metrics, z; returns the row count."""
    run, out = Path(run), Path(out)
    ckpt_path = run / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    z = open_zoo(zoo)
    check_architecture(ckpt, z, str(ckpt_path))
    model = model_from_checkpoint(ckpt).eval()
    meta_cols = ["member_id", "snapshot", "step", "split", "task", *z.metric_names]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    rows, writer = 0, None
    try:
        for table in z.iter_tables(None, [*meta_cols, "params"], batch_rows):
            params = z.arrays(table.select(["params"]))["params"]
            with torch.no_grad():
                emb = model.encode(torch.from_numpy(np.array(params, dtype=np.float32))).numpy().astype(np.float32)
            zcol = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
            batch = table.select(meta_cols).append_column("z", zcol.cast(pa.list_(pa.float32())))
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema, compression="zstd")
            writer.write_table(batch)
            rows += len(batch)
        if writer is None:
            raise ValueError(f"zoo {z.root} has no rows")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
    return rows


__all__ = ["embed"]
