"""`rnnrep zoo build`: Ray actors train batches of members; the driver writes Parquet.

Ray Data streams member batches through a pool of `MemberTrainer` actors (each
trains its batch together, vectorised over members). The driver consumes the
results and writes whole members as Parquet files, atomically, then records each in
`zoo.json`. Writing on the driver, not in Ray Data write tasks, is deliberate: a
write task needs a CPU that busy actors hold (a hang on small machines), and
`write_parquet` writes straight to the final name, so a killed build could leave a
truncated file. Here a file either exists whole or not at all, and a re-run skips
every member already written.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rnnrep.config import BuildOptions, ConfigError, ZooConfig
from rnnrep.zoo.members import plan_member, train_members
from rnnrep.zoo.rows import manifest, plan_splits, snapshot_table
from rnnrep.zoo.store import MANIFEST, part_entry, write_manifest, write_part

PROGRESS_EVERY = 25  # training steps between progress reports from an actor


@dataclass
class BuildResult:
    out: Path
    members_trained: int
    members_skipped: int
    seconds: float
    member_steps_per_s: float
    device: str


def data_source(cfg: ZooConfig) -> dict[str, Any]:
    if cfg.task != "sequential-mnist":
        return {"name": "generated"}
    from rnnrep.tasks import sequential_mnist as mnist

    images, labels = mnist.load_digits(cfg.mnist_source)  # fails early, on the driver
    return {"name": mnist.source_name(cfg.mnist_source), **mnist.digits_fingerprint(images, labels)}


def prepare_output(out: Path, cfg: ZooConfig, overwrite: bool) -> tuple[dict[str, Any], set[int]]:
    """Create or reopen the output folder; return its manifest and the finished members."""
    source = data_source(cfg)
    plans = [plan_member(cfg, i) for i in range(cfg.members)]
    fresh = manifest(
        cfg.task, cfg.spec, origin="built", config=cfg.to_dict(), snapshot_steps=list(cfg.snapshot_steps),
        splits=plan_splits(cfg, plans), rollouts=cfg.rollouts, source=source, members=cfg.members,
    )
    fresh = json.loads(json.dumps(fresh))  # as it reads back, so configs compare equal
    if out.exists() and overwrite:
        if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
            raise ConfigError(f"{out} exists and is not a zoo; refusing to delete it (choose another --out)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).exists():
            raise ConfigError(f"{out} is not empty and holds no zoo: choose an empty or new --out")
        meta = json.loads((out / MANIFEST).read_text())
        if meta.get("config") != fresh["config"] or meta.get("data_source") != fresh["data_source"]:
            raise ConfigError(
                f"{out} holds a zoo built with another configuration: pass --overwrite to replace it, "
                "or choose another --out"
            )
        return meta, reconcile(out, meta, cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, fresh)
    except OSError as e:
        raise ConfigError(f"cannot write to {out} ({e.strerror}): choose a writable --out") from None
    return fresh, set()


def reconcile(out: Path, meta: dict[str, Any], cfg: ZooConfig) -> set[int]:
    """Bring the manifest in line with the files on disk after an interrupted build.

    Temporary files are partial writes: deleted. A complete Parquet file missing from
    the manifest (the build died between rename and manifest update) is adopted. A
    file whose members are not all complete, or that repeats a member, is deleted so
    those members train again. Returns the finished member ids.
    """
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    files: dict[str, Any] = {}
    seen: set[int] = set()
    n_snap = len(cfg.snapshot_steps)
    for path in sorted(out.glob("part-*.parquet")):
        try:
            table = pq.read_table(path, columns=["member_id", "snapshot"])
        except Exception:
            path.unlink()
            continue
        ids, counts = np.unique(table.column("member_id").to_numpy(), return_counts=True)
        if (counts != n_snap).any() or seen & set(ids.tolist()):
            path.unlink()
            continue
        entry = meta["files"].get(path.name) or part_entry(path, table)
        files[path.name] = entry
        seen |= set(int(i) for i in ids)
    meta["files"] = files
    meta["rows"] = sum(e["rows"] for e in files.values())
    meta["complete"] = len(seen) == cfg.members
    write_manifest(out, meta)
    return seen


class MemberTrainer:
    """A Ray Data actor: trains one batch of members per call, returns its rows."""

    def __init__(self, cfg_dict: dict[str, Any], device: str, threads: int, counter=None):
        import torch

        from rnnrep.malloc import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(threads)
        self.cfg = ZooConfig.from_dict(cfg_dict)
        self.device = device
        self.counter = counter
        plans = [plan_member(self.cfg, i) for i in range(self.cfg.members)]
        self.splits = plan_splits(self.cfg, plans)

    def __call__(self, batch: dict[str, np.ndarray]):
        ids = np.concatenate([np.asarray(g).reshape(-1) for g in batch["member_id"]])
        plans = [plan_member(self.cfg, int(i)) for i in ids]
        K = len(plans)

        def report(step: int) -> None:
            if self.counter is not None and step % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                self.counter.add.remote(K * PROGRESS_EVERY)

        snaps = list(train_members(self.cfg, plans, self.device, on_step=report))
        return snapshot_table(self.cfg, plans, snaps, self.splits)


class WholeMembers:
    """Re-joins members whose snapshot rows arrive split across Ray Data blocks.

    Ray Data cuts an actor's output into blocks of at most `target_max_block_size`
    (128 MiB by default), and a cut can fall inside one member's rows. Written as
    they came, such halves made part files that `reconcile` rightly deleted, and a
    GPU build of 256 members per actor never finished. So rows are held until all
    of a member's snapshots are in.
    """

    def __init__(self, snapshots: int) -> None:
        self.snapshots = snapshots
        self.held: pa.Table | None = None

    def add(self, table: pa.Table) -> pa.Table | None:
        """The rows of every member now whole (None if none is); the rest wait."""
        if self.held is not None:
            table = pa.concat_tables([self.held, table])
        ids = table.column("member_id").to_numpy()
        members, counts = np.unique(ids, return_counts=True)
        whole = np.isin(ids, members[counts == self.snapshots])
        self.held = None if whole.all() else table.filter(pa.array(~whole))
        return table.filter(pa.array(whole)) if whole.any() else None


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def value(self) -> int:
        return self.n


def build(cfg: ZooConfig, out: str | Path, opts: BuildOptions) -> BuildResult:
    """Build (or resume) the zoo `cfg` into `out`."""
    out = Path(out)
    meta, done = prepare_output(out, cfg, opts.overwrite)
    pending = [i for i in range(cfg.members) if i not in done]
    t0 = time.perf_counter()
    if not pending:
        meta["complete"] = True
        write_manifest(out, meta)
        return BuildResult(out, 0, len(done), 0.0, 0.0, "none")

    import ray

    from rnnrep.raycluster import connect

    connect(opts.address)
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    use_gpu = opts.gpus_per_actor > 0 and gpus > 0 and opts.device != "cpu"
    if opts.gpus_per_actor > 0 and not use_gpu:
        _warn(f"--gpus-per-actor {opts.gpus_per_actor} asked, but the cluster has no GPU: training on CPU")
    if use_gpu:
        actors = opts.actors or max(1, int(gpus / opts.gpus_per_actor))
        res: dict[str, Any] = {"num_gpus": opts.gpus_per_actor, "num_cpus": 1}
        device, threads = "cuda", 1
    else:
        actors = opts.actors or max(1, int(cpus))
        # leave a CPU's share free for Ray Data's own tasks: actors holding every CPU hang it
        res = {"num_cpus": max(0.25, min(1.0, (cpus - 0.5) / actors))}
        device, threads = "cpu", max(1, int(cpus // actors))
    # a GPU only pays off with many members per batched matmul; on CPU, 16 keeps a
    # batch's activations in cache and the progress bar moving
    per_batch = opts.members_per_actor_batch or (256 if use_gpu else 16)
    groups = [pending[i : i + per_batch] for i in range(0, len(pending), per_batch)]
    actors = min(actors, len(groups))

    counter = ray.remote(num_cpus=0)(_Counter).remote()
    ds = ray.data.from_items([{"member_id": g} for g in groups], override_num_blocks=len(groups))
    ds = ds.map_batches(
        MemberTrainer,
        fn_constructor_kwargs=dict(cfg_dict=cfg.to_dict(), device=device, threads=threads, counter=counter),
        batch_size=1,
        batch_format="numpy",
        # one batch of members in flight per actor: otherwise the first actor up queues
        # batches that an idle actor could train
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        **res,
    )

    total_steps = len(pending) * (cfg.steps + 1)
    state = {"done": 0, "error": None}
    members = WholeMembers(len(cfg.snapshot_steps))

    def consume() -> None:
        try:
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                table = members.add(block)
                if table is None:
                    continue
                ids = table.column("member_id").to_numpy()
                name = f"part-{int(ids.min()):06d}-{int(ids.max()):06d}.parquet"
                meta["files"][name] = write_part(out, name, table)
                meta["rows"] = sum(e["rows"] for e in meta["files"].values())
                write_manifest(out, meta)
                state["done"] += len(np.unique(ids))
        except BaseException as e:  # surfaced on the main thread
            state["error"] = e

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    with _progress(opts.progress, len(pending), total_steps) as update:
        while worker.is_alive():
            worker.join(0.5)
            steps = ray.get(counter.value.remote())
            update(state["done"], steps, time.perf_counter() - t0)
        if state["error"] is None:
            update(state["done"], total_steps, time.perf_counter() - t0)
    if state["error"] is not None:
        raise state["error"]
    seconds = time.perf_counter() - t0
    reconcile(out, meta, cfg)
    if not meta["complete"]:
        raise RuntimeError("build ended with members missing; re-run the same command to resume")
    return BuildResult(out, len(pending), len(done), seconds, total_steps / seconds, device)


class _progress:
    """A rich progress bar of members done and member-steps per second (or nothing)."""

    def __init__(self, enabled: bool, members: int, steps: int):
        self.enabled, self.members, self.steps = enabled, members, steps

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]zoo build"),
            BarColumn(),
            TextColumn("{task.fields[members]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("build", total=self.steps, members="", rate="")

        def update(done: int, steps: int, elapsed: float) -> None:
            rate = steps / elapsed if elapsed > 0 else 0.0
            self.bar.update(
                self.task,
                completed=min(steps, self.steps),
                members=f"{done}/{self.members} members",
                rate=f"{rate:,.0f} member-steps/s",
            )

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False


def _warn(msg: str) -> None:
    import sys

    print(f"warning: {msg}", file=sys.stderr)
