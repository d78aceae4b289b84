"""Emulation learning on Ray Train: config, checkpoints, the worker loop and the driver.

    cfg = train_config("small", zoo="/data/zoo-fl", encoder="interactive")
    final = run_training(cfg, "runs/interactive")     # re-running the same command resumes

The worker loop (`train_loop_per_worker`) is the reference's training loop: 64
members per step (split across data-parallel workers), one rollout each, AdamW
with grad-norm clipping per part, validation on the val and OOD splits every
`val_every` steps, the best model by validation loss kept. It is resumable
exactly: the batch of a step is a function of the step (`data.TrainStream`), the
encoder's randomness (permutation augmentation) is seeded per step, and a
checkpoint holds the model, both optimizers, the step and the best loss; so a run
that is killed and re-run, or extended with more steps, ends where an unbroken run
would.

Run folder:

    config.json                  the TrainConfig + the zoo's kind and architecture
    metrics.jsonl, metrics.csv   one row per validation (rank 0 writes them)
    tb/                          TensorBoard events
    checkpoints/last.pt, best.pt torch.save'd dicts (load with weights_only=True)
    ray/                         Ray Train's own storage (its checkpoints, restore state)

The run folder must be on storage every worker reaches (local disk on one machine,
a shared file system on a cluster).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnrep.config import PRESETS, ConfigError, check_preset
from rnnrep.emulation.losses import LOSSES
from rnnrep.emulation.step import check_precision
from rnnrep.lstm import LSTMSpec
from rnnrep.zoo.store import atomic_write_bytes

CHECKPOINT_FORMAT = "rnnrep-emulation-checkpoint"
CHECKPOINT_VERSION = 1
SPLITS_EVAL = ("val", "ood")
# fields that do not change what a run computes: they may differ when a run is re-run
_EXECUTION_FIELDS = ("steps", "workers", "gpus_per_worker", "threads_per_worker")


@dataclass(frozen=True)
class TrainConfig:
    zoo: str
    encoder: str = "flat"
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    emulator: dict[str, Any] = field(default_factory=dict)  # EmulatorConfig overrides
    steps: int = 2000
    batch_size: int = 64  # members per step, all workers together
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 0.1  # grad-norm clipping per part; 0 = off
    loss: str = "total_variation"
    precision: str = "fp32"  # or bf16: matmuls in bfloat16 under autocast (rnnrep.emulation.step.PRECISIONS)
    val_every: int = 200
    val_rows: int | None = 512  # rows of val and of ood evaluated; None = all
    seed: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    buffer_rows: int = 1024  # training shuffle buffer (bounds memory)
    threads_per_worker: int | None = None  # torch threads; None: its node's cores / its workers there

    def __post_init__(self) -> None:
        from rnnrep.emulation.emulator import EmulatorConfig
        from rnnrep.encoders import encoder_config

        for name in ("steps", "batch_size", "val_every", "workers", "buffer_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.val_rows is not None and self.val_rows < 1:
            raise ConfigError(f"val-rows must be at least 1 (or unset for all), got {self.val_rows}")
        if self.batch_size % self.workers:
            raise ConfigError(f"batch size {self.batch_size} must be divisible by --workers {self.workers}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0 or self.clip < 0:
            raise ConfigError(f"need lr > 0, weight decay >= 0, clip >= 0; got {self.lr}, {self.weight_decay}, {self.clip}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        check_precision(self.precision)
        encoder_config(self.encoder, "formal-languages", **self.encoder_overrides)  # name and settings
        bad = sorted(set(self.emulator) - {f.name for f in dataclasses.fields(EmulatorConfig)})
        if bad:
            raise ConfigError(f"the emulator has no setting(s) {bad}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """What decides the run's numbers (not its length or where it runs)."""
        d = self.to_dict()
        for k in _EXECUTION_FIELDS:
            d.pop(k)
        d["zoo"] = str(Path(d["zoo"]).resolve()) if "://" not in d["zoo"] else d["zoo"]
        return json.loads(json.dumps(d))  # tuples -> lists, as config.json holds them


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=20, val_every=10, val_rows=32, emulator={"hidden_size": 64}),
    "small": dict(steps=2000, val_every=200, val_rows=512),
    "paper": dict(steps=100_000, val_every=1000, val_rows=None),
}


def train_config(preset: str = "small", **overrides: Any) -> TrainConfig:
    """A preset with overrides (`None` overrides are ignored)."""
    check_preset(preset)
    values = dict(_PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# ---------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by training, checked; anything else is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: train one with `rnnrep train --out {path.parent.parent}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {path} is corrupt or not an rnnrep checkpoint ({msg[:120]}); "
                          "delete it or re-run with --overwrite") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an rnnrep emulation checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path} has checkpoint version {ckpt.get('version')}, this rnnrep reads {CHECKPOINT_VERSION}")
    return ckpt


def checkpoint_spec(ckpt: dict[str, Any]) -> LSTMSpec:
    return LSTMSpec(**ckpt["architecture"])


def check_architecture(ckpt: dict[str, Any], zoo, where: str) -> None:
    if ckpt["kind"] != zoo.kind or checkpoint_spec(ckpt) != zoo.spec:
        raise ConfigError(
            f"{where} was trained on {ckpt['kind']} members of architecture {ckpt['architecture']}, but zoo "
            f"{zoo.root} holds {zoo.kind} members of architecture {zoo.spec.to_dict()}"
        )


def model_from_checkpoint(ckpt: dict[str, Any]):
    from rnnrep.emulation.step import build_model

    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.encoder, checkpoint_spec(ckpt), ckpt["kind"], cfg.emulator, cfg.precision, **cfg.encoder_overrides)
    model.load_state_dict(ckpt["model"])
    return model


# ---------------------------------------------------------------- metrics files


class MetricsLog:
    """metrics.jsonl (the record), metrics.csv (rewritten from it) and TensorBoard events; rank 0 only."""

    def __init__(self, run: Path, resume_step: int) -> None:
        self.jsonl, self.csv = run / "metrics.jsonl", run / "metrics.csv"
        rows = []
        if resume_step > 0 and self.jsonl.is_file():  # drop rows a killed run wrote after its checkpoint
            rows = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self.rows = rows
        self._rewrite()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run / "tb"), purge_step=resume_step if resume_step > 0 else None)

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        _atomic_text(self.jsonl, text)
        buf = io.StringIO()
        if self.rows:
            keys = list(dict.fromkeys(k for r in self.rows for k in r))
            w = csv.DictWriter(buf, keys)
            w.writeheader()
            w.writerows(self.rows)
        _atomic_text(self.csv, buf.getvalue())

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._rewrite()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, row["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the worker loop


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _resume_state(run: Path) -> dict[str, Any] | None:
    """The latest checkpoint: Ray Train's (restored run), else checkpoints/last.pt."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            p = Path(d) / "last.pt"
            if p.is_file():
                return load_checkpoint(p)
    last = run / "checkpoints" / "last.pt"
    return load_checkpoint(last) if last.is_file() else None


def _all_sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def worker_threads(local_workers: int) -> int:
    """Torch threads for one of `local_workers` training workers on this node: an equal
    share of the cores this process may run on.

    Not the worker's Ray CPU resource: that is capped at 1 so Ray's own actors can be
    scheduled, and one torch thread left half of a 2-core machine idle.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: train, validate, report, checkpoint; resumes from the latest checkpoint."""
    import pyarrow as pa
    import ray.train
    import ray.train.torch

    from rnnrep.emulation.data import TrainStream, fixed_batches
    from rnnrep.emulation.step import (
        build_model,
        evaluate_sums,
        make_optimizers,
        train_step,
        unwrap,
    )
    from rnnrep.malloc import keep_freed_memory
    from rnnrep.zoo.store import open_zoo

    keep_freed_memory()
    # Arrow's default pool (jemalloc) held on to decoded chunks' buffers: on the 400-member
    # zoo of `rnnrep bench train-memory` the worker's peak was 849-853 MB with it and
    # 789-790 MB with the system allocator, which decodes as fast (three alternating
    # rounds: 0.51, 0.47, 0.46 ms a row against jemalloc's 0.59, 0.49, 0.47)
    pa.set_memory_pool(pa.system_memory_pool())
    cfg = TrainConfig.from_dict(config["cfg"])
    run = Path(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads") or worker_threads(ctx.get_local_world_size()))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")

    zoo = open_zoo(cfg.zoo, verify=False)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.encoder, zoo.spec, zoo.kind, cfg.emulator, cfg.precision, **cfg.encoder_overrides).to(device)
    optimizers = make_optimizers(model, cfg.lr, cfg.weight_decay)
    step, best, best_step = 0, math.inf, -1
    state = _resume_state(run)
    if state is not None:
        check_architecture(state, zoo, "the run's checkpoint")
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        step, best, best_step = int(state["step"]), float(state["best_val_loss"]), int(state["best_step"])
    # find_unused_parameters: some encoders hold parameters a forward does not use (interactive: static codes)
    net = (
        ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})
        if world > 1
        else model
    )

    stream = TrainStream(zoo, "train", cfg.batch_size, cfg.seed, cfg.buffer_rows, rank, world)
    val_sets = {
        s: fixed_batches(zoo, s, cfg.val_rows, cfg.batch_size, cfg.seed, rank, world) for s in SPLITS_EVAL
    }
    log = MetricsLog(run, step) if rank == 0 else None
    meta = {"architecture": zoo.spec.to_dict(), "kind": zoo.kind, "config": cfg.to_dict()}
    train_sum, train_n, t0 = 0.0, 0, time.perf_counter()
    try:
        while step < cfg.steps:
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            batch = stream.batch(step).to(device)
            train_sum += train_step(net, optimizers, batch, cfg.loss, cfg.clip)
            train_n += 1
            step += 1
            if step % cfg.val_every and step != cfg.steps:
                continue
            sums = [train_sum, float(train_n)]
            for s in SPLITS_EVAL:
                sums += list(evaluate_sums(net, val_sets[s], cfg.loss, device))
            sums = _all_sum(sums, world, device)
            seconds = time.perf_counter() - t0
            metrics: dict[str, Any] = {
                "step": step,
                "train_loss": sums[0] / max(sums[1], 1),
                "val_loss": sums[2] / sums[3] if sums[3] else None,
                "ood_loss": sums[4] / sums[5] if sums[5] else None,
                "steps_per_s": train_n / seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker's
            }
            improved = metrics["val_loss"] is not None and metrics["val_loss"] < best
            if improved:
                best, best_step = metrics["val_loss"], step
            metrics.update(best_val_loss=best, best_step=best_step)
            checkpoint = None
            tmp = None
            if rank == 0:
                m = unwrap(net)
                model_state = {k: v.detach().cpu() for k, v in m.state_dict().items()}
                ckpt_dir = run / "checkpoints"
                if improved:
                    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta,
                                       "model": model_state, "step": step, "val_loss": best}, ckpt_dir / "best.pt")
                last = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "model": model_state,
                        "optimizers": [o.state_dict() for o in optimizers], "step": step,
                        "best_val_loss": best, "best_step": best_step}
                atomic_torch_save(last, ckpt_dir / "last.pt")
                tmp = tempfile.mkdtemp(prefix="rnnrep-ckpt-")
                shutil.copyfile(ckpt_dir / "last.pt", Path(tmp) / "last.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                log.add(metrics)
            ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            train_sum, train_n, t0 = 0.0, 0, time.perf_counter()
    finally:
        stream.close()
        if log is not None:
            log.close()


# ---------------------------------------------------------------- the driver


def _check_run_dir(out: Path, cfg: TrainConfig, zoo, overwrite: bool) -> None:
    """Refuse a run folder of another config or architecture (unless overwrite); check its checkpoints."""
    conf = out / "config.json"
    if not out.exists():
        return
    if overwrite:
        shutil.rmtree(out)
        return
    if conf.is_file():
        try:
            old = json.loads(conf.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{conf} is not valid JSON: re-run with --overwrite to start afresh") from None
        new = {**cfg.identity(), "kind": zoo.kind, "architecture": zoo.spec.to_dict()}
        old_id = {"precision": "fp32", **{k: v for k, v in old.items() if k not in _EXECUTION_FIELDS}}  # runs from before the option
        if old_id != new:
            diff = sorted(k for k in set(old_id) | set(new) if old_id.get(k) != new.get(k))
            raise ConfigError(
                f"{out} holds a run of another configuration (differs in: {', '.join(diff)}); "
                "use another --out, or --overwrite to replace it"
            )
    elif any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a training run: use another --out, or --overwrite")
    for name in ("last.pt", "best.pt"):
        p = out / "checkpoints" / name
        if p.exists():
            check_architecture(load_checkpoint(p), zoo, str(p))


def _final_metrics(out: Path) -> dict[str, Any]:
    p = out / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []
    return rows[-1] if rows else {}


def run_training(
    cfg: TrainConfig, out: str | Path, address: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train (or resume) a run in folder `out` on Ray Train; returns the last metrics row."""
    from rnnrep.emulation.data import require_split
    from rnnrep.encoders import encoder_config
    from rnnrep.zoo.store import open_zoo

    out = Path(out)
    if "://" not in cfg.zoo:  # workers may run in another directory
        cfg = dataclasses.replace(cfg, zoo=str(Path(cfg.zoo).resolve()))
    zoo = open_zoo(cfg.zoo)
    encoder_config(cfg.encoder, zoo.kind, **cfg.encoder_overrides)
    require_split(zoo, "train")
    require_split(zoo, "val")
    _check_run_dir(out, cfg, zoo, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "config.json", json.dumps(
        {**cfg.identity(), **{k: getattr(cfg, k) for k in _EXECUTION_FIELDS},
         "kind": zoo.kind, "architecture": zoo.spec.to_dict()}, indent=1) + "\n")

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rnnrep.raycluster import connect

    connect(address)
    resources = ray.cluster_resources()
    use_gpu = cfg.gpus_per_worker > 0
    if use_gpu and resources.get("GPU", 0) < cfg.gpus_per_worker * cfg.workers:
        warnings.warn(
            f"{cfg.workers} worker(s) x {cfg.gpus_per_worker} GPU asked, the cluster has "
            f"{resources.get('GPU', 0):g}: training on CPU", stacklevel=2,
        )
        use_gpu = False
    cpus = min(1.0, resources.get("CPU", 1) / cfg.workers)
    per_worker: dict[str, float] = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run": str(out.resolve()), "use_gpu": use_gpu,
                           "threads": cfg.threads_per_worker},  # None: each worker decides on its node
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=str(out.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return _final_metrics(out)


__all__ = [
    "PRESETS",
    "TrainConfig",
    "check_architecture",
    "load_checkpoint",
    "model_from_checkpoint",
    "run_training",
    "train_config",
    "train_loop_per_worker",
]
