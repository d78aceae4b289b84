"""Zoo rows as emulation batches: a seekable shuffled stream for training, a fixed set for validation.

Training stream (`TrainStream`). Memory stays bounded in the zoo's size: the rows
of a split are read row group by row group, and only a few windows of row groups (the
shuffle buffer, about `buffer_rows` rows each: the one training and the next) are held
at a time, each row with the one rollout it will be trained on. The
next window is decoded in a background thread while the current one trains. A split
that fits one window is decoded once, all rollouts kept, and re-picked each epoch
(decoding is most of the cost). Per epoch the order of the row groups is shuffled,
then the rows inside each window; the epochs' row orders are concatenated into one endless row stream,
and global step `s` is rows `[s * B, (s + 1) * B)` of it. Everything up to the data
itself is index arithmetic on seeded generators, so:

- the batch of step `s` is a function of (zoo, split, seed, s) only: a resumed run
  seeks to its step and sees exactly the batches an unbroken run saw;
- with W data-parallel workers, rank r takes the r-th slice of each global batch of
  B rows, so W workers together train on the same 64 members per step as one.

Why not a Ray Dataset shard (`ray.train.get_dataset_shard`), as DESIGN.md first planned:
Ray Data's streaming shuffle cannot seek, so a resumed run could not see the batches an
unbroken run saw, and on a small machine its read tasks wait for CPUs that the training
workers hold (RAY-NOTES). Each worker reads its rows straight from the Parquet files
instead; `Zoo.to_ray()` still gives the zoo as a Ray Dataset for other uses.

Validation set (`fixed_batches`): the first `rows` rows of a split in file order,
each with one rollout drawn from a fixed seed: the same members and rollouts at
every evaluation, in every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rnnrep.emulation.step import (
    BATCH_COLUMNS,
    ROLLOUT_COLUMN,
    EmulationBatch,
    batch_from_arrays,
)
from rnnrep.zoo.schema import ZooFormatError
from rnnrep.zoo.store import Zoo

_ROLLOUT_SALT = 0x5EED  # keeps the rollout draws apart from the order draws


@dataclass(frozen=True)
class Chunk:
    """The rows of one split inside one Parquet row group."""

    file: int  # index into zoo.files
    row_group: int
    rows: np.ndarray  # row indices inside the row group that belong to the split


def split_chunks(zoo: Zoo, split: str) -> list[Chunk]:
    """Where the split's rows are: one entry per row group holding any (reads only `split`)."""
    chunks = []
    for fi, f in enumerate(zoo.files):
        pf = pq.ParquetFile(f)
        for rg in range(pf.metadata.num_row_groups):
            col = pf.read_row_group(rg, columns=["split"]).column("split")
            rows = np.flatnonzero(pc.equal(col, split).to_numpy(zero_copy_only=False))
            if len(rows):
                chunks.append(Chunk(fi, rg, rows))
    return chunks


def require_split(zoo: Zoo, split: str) -> list[Chunk]:
    chunks = split_chunks(zoo, split)
    if not chunks:
        raise ZooFormatError(
            f"{zoo.root} has no rows in split {split!r} (it has members of too few tasks): "
            "build a zoo with more members"
        )
    return chunks


def _rollouts(zoo: Zoo) -> int:
    return int(zoo.shapes["logits"][0])


def _read_chunk(zoo: Zoo, chunk: Chunk) -> dict[str, np.ndarray]:
    """Dense arrays of a chunk's rows, all rollouts (`chunk.rows` order)."""
    table = pq.ParquetFile(zoo.files[chunk.file]).read_row_group(chunk.row_group, columns=BATCH_COLUMNS[zoo.kind])
    # densify the whole row group, then select in numpy: Arrow's take on nested
    # lists cost as much as the read itself
    return {k: v[chunk.rows] for k, v in zoo.arrays(table).items()}


def _pick(kind: str, dense: dict[str, np.ndarray], slots: np.ndarray, rollouts: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `slots` of a chunk's dense arrays, each with its one rollout."""
    out = {"params": dense["params"][slots]}
    for name in (ROLLOUT_COLUMN[kind], "logits"):
        out[name] = dense[name][slots, rollouts]
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class TrainStream:
    """Endless, seekable, shuffled batches of one split for one rank (see the module docstring)."""

    def __init__(
        self,
        zoo: Zoo,
        split: str = "train",
        batch_size: int = 64,
        seed: int = 0,
        buffer_rows: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        prefetch: bool = True,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} workers")
        self.zoo, self.split, self.seed = zoo, split, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.chunks = require_split(zoo, split)
        self.rows = sum(len(c.rows) for c in self.chunks)
        self.rollouts = _rollouts(zoo)
        chunk_rows = max(len(c.rows) for c in self.chunks)
        self.chunks_per_window = max(1, buffer_rows // chunk_rows)
        self._epoch_cache: tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] | None = None
        self._window_cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._decoded: dict[int, dict[str, np.ndarray]] = {}  # chunk id -> all its rows, all rollouts
        # the next window is decoded in a background thread while this one trains:
        # decoding releases the GIL, so on a GPU the step no longer waits for Parquet
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="rnnrep-prefetch") if prefetch else None
        self._ahead: dict[tuple[int, int], Future] = {}

    def _epoch(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per window of an epoch: chunk ids, and per row of the window (in order) its chunk-local slot and rollout."""
        cached = self._epoch_cache  # read once: the prefetch thread may replace it
        if cached and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.chunks))
        windows = []
        for w in range(0, len(order), self.chunks_per_window):
            ids = order[w : w + self.chunks_per_window]
            sizes = np.array([len(self.chunks[i].rows) for i in ids])
            which = np.repeat(np.arange(len(ids)), sizes)  # window-local chunk of each row
            slot = np.concatenate([np.arange(s) for s in sizes])
            perm = rng.permutation(len(which))
            windows.append((ids, np.stack([which[perm], slot[perm]], 1), None))
        roll = np.random.default_rng([self.seed, epoch, _ROLLOUT_SALT]).integers(0, self.rollouts, self.rows)
        out, start = [], 0
        for ids, pos, _ in windows:
            out.append((ids, pos, roll[start : start + len(pos)]))
            start += len(pos)
        self._epoch_cache = (epoch, out)
        return out

    def _window(self, epoch: int, w: int) -> dict[str, np.ndarray]:
        key = (epoch, w)
        if key not in self._window_cache:
            ahead = self._ahead.pop(key, None)
            arrays = ahead.result() if ahead is not None else self._build_window(epoch, w)
            # only the current window: a batch spanning two holds views of the one before,
            # and the next is being decoded ahead; holding more showed in peak memory
            self._window_cache = {key: arrays}
            if self._prefetcher is not None:
                nxt = (epoch, w + 1) if w + 1 < len(self._epoch(epoch)) else (epoch + 1, 0)
                if nxt not in self._ahead:  # after a seek, a stale window is dropped, not awaited
                    self._ahead = {nxt: self._prefetcher.submit(self._build_window, *nxt)}
        return self._window_cache[key]

    def _build_window(self, epoch: int, w: int) -> dict[str, np.ndarray]:
        """Window `w` of `epoch`: its rows in shuffled order, each with its rollout."""
        ids, pos, roll = self._epoch(epoch)[w]
        parts, decoded = [], {}
        cache = self._decoded
        # a split that fits one window is decoded once, not once per epoch; otherwise
        # each chunk's dense arrays (all its rollouts) are dropped once its rows are
        # picked, so a window's decode holds one chunk, not the window's worth
        whole = len(ids) == len(self.chunks)
        for j, cid in enumerate(ids):
            mine = np.flatnonzero(pos[:, 0] == j)  # window rows from this chunk, in window order
            dense = cache.get(cid)
            if dense is None:
                dense = _read_chunk(self.zoo, self.chunks[cid])
            if whole:
                decoded[cid] = dense
            parts.append((mine, _pick(self.zoo.kind, dense, pos[mine, 1], roll[mine])))
            del dense
        self._decoded = decoded
        n = len(pos)
        arrays = {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in parts[0][1].items()}
        for mine, a in parts:
            for k in arrays:
                arrays[k][mine] = a[k]
        return arrays

    def _rows(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Rows `[start, start + count)` of the endless row stream."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.rows)
            windows = self._epoch(epoch)
            w, base = 0, 0
            while base + len(windows[w][1]) <= offset:
                base += len(windows[w][1])
                w += 1
            take = min(count, base + len(windows[w][1]) - offset)
            arrays = self._window(epoch, w)
            parts.append({k: v[offset - base : offset - base + take] for k, v in arrays.items()})
            start, count = start + take, count - take
        return parts[0] if len(parts) == 1 else _concat(parts)

    def batch(self, step: int) -> EmulationBatch:
        """This rank's share of global step `step`'s batch."""
        per_rank = self.batch_size // self.world_size
        arrays = self._rows(step * self.batch_size + self.rank * per_rank, per_rank)
        return batch_from_arrays(self.zoo.kind, arrays)

    def close(self) -> None:
        """Stop decoding ahead: waits for a decode under way, drops a queued one."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._ahead = {}

    def iter_from(self, step: int = 0) -> Iterator[EmulationBatch]:
        while True:
            yield self.batch(step)
            step += 1

    __iter__ = iter_from


def fixed_arrays(zoo: Zoo, split: str, rows: int | None, seed: int = 0) -> dict[str, np.ndarray] | None:
    """The first `rows` rows of a split (all if None), one fixed rollout each; None if the split is empty."""
    rng = np.random.default_rng([seed, _ROLLOUT_SALT, 1])
    parts, left = [], rows if rows is not None else np.inf
    for chunk in split_chunks(zoo, split):
        if left <= 0:
            break
        n = int(min(left, len(chunk.rows)))
        parts.append(_pick(zoo.kind, _read_chunk(zoo, chunk), np.arange(n), rng.integers(0, _rollouts(zoo), n)))
        left -= n
    return _concat(parts) if parts else None


def fixed_batches(
    zoo: Zoo, split: str, rows: int | None = 256, batch_size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1
) -> list[EmulationBatch]:
    """The validation set of a split as batches; with W ranks, rank r gets every W-th batch."""
    arrays = fixed_arrays(zoo, split, rows, seed)
    if arrays is None:
        return []
    n = len(arrays["params"])
    starts = list(range(0, n, batch_size))[rank::world_size]
    return [
        batch_from_arrays(zoo.kind, {k: v[s : s + batch_size] for k, v in arrays.items()}) for s in starts
    ]


__all__ = ["Chunk", "TrainStream", "fixed_arrays", "fixed_batches", "require_split", "split_chunks"]
