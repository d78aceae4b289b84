"""Emulation learning: the step API, zoo streaming, `rnnrep train` on Ray Train (resume, workers), `rnnrep embed`."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import polars as pl
import pytest
import torch
from conftest import rewrite_splits
from typer.testing import CliRunner

from rnnrep.cli import app
from rnnrep.emulation import data
from rnnrep.emulation.data import TrainStream, fixed_arrays, fixed_batches
from rnnrep.emulation.step import (
    BATCH_COLUMNS,
    batch_from_arrays,
    build_model,
    make_optimizers,
    train_step,
)
from rnnrep.emulation.train import worker_threads
from rnnrep.zoo.store import open_zoo

SMALL_ENCODER = ["--encoder", "flat", "--encoder-opt", "hidden=[16]", "--emulator-opt", "hidden_size=16"]


def _train_args(zoo, out, steps, *extra):
    return ["train", "--zoo", str(zoo), "--out", str(out), "--preset", "tiny", "--steps", str(steps),
            "--val-every", "3", *SMALL_ENCODER, *extra]


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "peak_rss_mb")} for r in rows]


def _assert_same_run(a, b):
    """Metrics of runs `a` and `b` equal, and their last checkpoints' weights equal bit for bit.

    Except the train loss, within 1e-6: it averages the losses of the steps' forward
    passes, and in one CI run (and 2 of 8 runs of the slow test below) one of those came
    out a few float32 ulps apart in one of two identical runs (0.3288922 vs 0.3288924 at
    step 3) while every evaluation loss and later train loss matched to the bit. Not reproduced in 23
    standalone runs nor 3 suites; thread count, input alignment and the C cell kernel
    do not change it.
    """
    ra, rb = _rows(a), _rows(b)
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-6, abs=0)
    assert [{**r, "train_loss": None} for r in ra] == [{**r, "train_loss": None} for r in rb]
    wa = torch.load(a / "checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints/last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- step API (no Ray)


def test_loss_decreases_on_a_fixed_batch(fl_zoo):
    zoo = open_zoo(fl_zoo[0])
    table = next(zoo.iter_tables("train", BATCH_COLUMNS[zoo.kind], 16))
    batch = batch_from_arrays(zoo.kind, zoo.arrays(table), np.random.default_rng(0))
    assert batch.params.shape == (len(table), zoo.spec.num_params)
    assert batch.inputs.shape == (len(table), 41, 6) and batch.targets.shape == (len(table), 41, 6)
    assert batch.inputs.dtype == batch.targets.dtype == torch.float32
    torch.manual_seed(0)
    model = build_model("flat", zoo.spec, zoo.kind, {"hidden_size": 16}, hidden=(16,))
    optimizers = make_optimizers(model, lr=3e-3)
    losses = [train_step(model, optimizers, batch) for _ in range(6)]
    assert losses[-1] < losses[0]
    assert abs(model.loss(batch).item() - losses[-1]) < 0.1


# ---------------------------------------------------------------- data streaming


def test_stream_covers_its_split_each_epoch_and_seeks(zoo3):
    zoo = open_zoo(zoo3)
    val = fixed_arrays(zoo, "val", None)
    n = len(val["params"])
    stream = TrainStream(zoo, "val", batch_size=4, seed=3, buffer_rows=2)
    seen = torch.cat([stream.batch(s).params for s in range(2 * n // 4 + 1)])
    key = lambda p: np.sort(np.asarray(p, dtype=np.float64).sum(1))  # noqa: E731
    np.testing.assert_allclose(key(seen[:n]), key(val["params"]))  # epoch 1: each val row once
    np.testing.assert_allclose(key(seen[n : 2 * n]), key(val["params"]))  # epoch 2 too
    # bounded memory: at most two windows of the shuffle buffer are held
    held = sum(len(w["params"]) for w in stream._window_cache.values())
    assert held <= 2 * stream.chunks_per_window * max(len(c.rows) for c in stream.chunks)
    # seekable and deterministic; ranks split the global batch
    again = TrainStream(zoo, "val", batch_size=4, seed=3, buffer_rows=2)
    assert torch.equal(again.batch(3).targets, stream.batch(3).targets)
    halves = [TrainStream(zoo, "val", 4, 3, 2, rank=r, world_size=2).batch(3) for r in (0, 1)]
    assert torch.equal(torch.cat([h.params for h in halves]), stream.batch(3).params)
    other_seed = TrainStream(zoo, "val", batch_size=4, seed=4, buffer_rows=2)
    assert not all(torch.equal(other_seed.batch(s).inputs, stream.batch(s).inputs) for s in range(3))


@pytest.mark.parametrize("buffer_rows", [10_000, 1])
def test_stream_decodes_a_split_that_fits_its_buffer_once(zoo3, monkeypatch, buffer_rows):
    zoo = open_zoo(zoo3)
    reads = []
    real = data._read_chunk
    monkeypatch.setattr(data, "_read_chunk", lambda z, c: reads.append(c) or real(z, c))
    stream = TrainStream(zoo, "train", batch_size=4, seed=0, buffer_rows=buffer_rows)
    first = [stream.batch(s) for s in range(3 * stream.rows // 4)]  # three epochs
    chunks = len(stream.chunks)
    fits = stream.chunks_per_window >= chunks
    assert fits == (buffer_rows == 10_000) and chunks > 1
    per_epoch = 0 if fits else chunks
    for ahead in list(stream._ahead.values()):  # the window after the last, decoded in the background:
        ahead.result()  # wait for it, or close() may drop it while still queued (a busy core)
    stream.close()
    mine = [c for c in reads if any(c is own for own in stream.chunks)]  # not another stream's decode ahead
    assert len(mine) == chunks + 2 * per_epoch + (0 if fits else 1)
    # the cache changes nothing: a stream that forgets its decoded chunks gives the same batches
    fresh = TrainStream(zoo, "train", batch_size=4, seed=0, buffer_rows=buffer_rows)
    for s, b in enumerate(first):
        fresh._decoded = {}
        got = fresh.batch(s)
        assert torch.equal(got.params, b.params) and torch.equal(got.targets, b.targets)
    fresh.close()  # no decode of this test may run on into the next one's count


def test_a_window_holds_one_decoded_chunk_at_a_time(fl_zoo, tmp_path, monkeypatch):
    """Decoded chunks hold every rollout (about 100x the picked rows): a window of a split
    larger than the buffer drops each once its rows are picked, so its decode holds one."""
    import weakref

    zoo = open_zoo(rewrite_splits(fl_zoo[0], tmp_path / "zoo", lambda m: "train"))
    alive: list[weakref.ref] = []
    real = data._read_chunk

    def read(z, c):
        assert not any(r() is not None for r in alive), "an earlier chunk's dense arrays are still held"
        dense = real(z, c)
        alive.extend(weakref.ref(a) for a in dense.values())
        return dense

    monkeypatch.setattr(data, "_read_chunk", read)
    chunk_rows = max(len(c.rows) for c in data.split_chunks(zoo, "train"))
    stream = TrainStream(zoo, "train", batch_size=4, seed=0, buffer_rows=2 * chunk_rows, prefetch=False)
    assert stream.chunks_per_window == 2 < len(stream.chunks), "the test needs a window of 2 chunks, not the split"
    windows = [stream._build_window(0, w) for w in range(len(stream._epoch(0)))]
    assert sum(len(w["params"]) for w in windows) == stream.rows and alive


def test_prefetch_decodes_ahead_in_the_background_and_changes_no_batch(zoo3, monkeypatch):
    zoo = open_zoo(zoo3)
    threads = []
    real = data._read_chunk
    monkeypatch.setattr(data, "_read_chunk", lambda z, c: threads.append(threading.current_thread().name) or real(z, c))
    ahead = TrainStream(zoo, "train", batch_size=4, seed=0, buffer_rows=1)
    plain = TrainStream(zoo, "train", batch_size=4, seed=0, buffer_rows=1, prefetch=False)
    steps = [*range(2 * ahead.rows // 4), 1, 0, 7, 3]  # two epochs, then seeks back and forth
    for s in steps:
        a, b = ahead.batch(s), plain.batch(s)
        assert torch.equal(a.params, b.params) and torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    ahead.close()
    assert any(name.startswith("rnnrep-prefetch") for name in threads)


def test_workers_share_the_cores_they_may_run_on():
    cores = len(os.sched_getaffinity(0))
    assert worker_threads(1) == cores
    assert worker_threads(2) == max(1, cores // 2)
    assert worker_threads(4 * cores) == 1


def test_validation_set_is_fixed(zoo3):
    zoo = open_zoo(zoo3)
    a = fixed_batches(zoo, "ood", rows=5, batch_size=2)
    b = fixed_batches(zoo, "ood", rows=5, batch_size=2)
    assert sum(len(x) for x in a) == min(5, len(fixed_arrays(zoo, "ood", None)["params"]))
    for x, y in zip(a, b):
        assert torch.equal(x.params, y.params) and torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    ranks = [fixed_batches(zoo, "ood", 5, 2, rank=r, world_size=2) for r in (0, 1)]
    assert sum(len(x) for r in ranks for x in r) == sum(len(x) for x in a)


# ---------------------------------------------------------------- rnnrep train / embed on Ray Train


def test_train_resume_embed_and_errors(zoo3, tmp_path):
    zoo_path = zoo3
    runner = CliRunner()
    run, unbroken = tmp_path / "run", tmp_path / "unbroken"

    r = runner.invoke(app, _train_args(zoo_path, run, 6))
    assert r.exit_code == 0, r.output
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["architecture"] == open_zoo(zoo_path).spec.to_dict() and "encoder.head.0.weight" in best["model"]
    metrics = pl.read_csv(run / "metrics.csv")
    assert metrics["step"].to_list() == [3, 6] and metrics["val_loss"].is_not_null().all()
    assert {"train_loss", "val_loss", "ood_loss", "best_val_loss"} <= set(metrics.columns)

    # resume with more steps == an unbroken run; a run folder from before --precision resumes as fp32
    conf = json.loads((run / "config.json").read_text())
    assert conf.pop("precision") == "fp32"
    (run / "config.json").write_text(json.dumps(conf))
    r = runner.invoke(app, _train_args(zoo_path, run, 9))
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, _train_args(zoo_path, unbroken, 9))
    assert r.exit_code == 0, r.output
    _assert_same_run(run, unbroken)
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 9

    # embed: one unit-norm row per snapshot
    out = tmp_path / "emb.parquet"
    r = runner.invoke(app, ["embed", str(run), "--zoo", str(zoo_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    emb = pl.read_parquet(out)
    meta = open_zoo(zoo_path).metadata()
    assert len(emb) == len(meta) and emb.select("member_id", "snapshot").is_unique().all()
    z = np.stack(emb["z"].to_list())
    assert z.shape == (len(meta), 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert {"split", "task", "step", "accuracy"} <= set(emb.columns)

    # bad input: one line, exit 2, nothing overwritten
    config_before = (run / "config.json").read_text()

    def fails(args, *words):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and all(w in line for w in words), line

    fails(_train_args(zoo_path, run, 9, "--lr", "0.5"), "another configuration")
    fails(_train_args(zoo_path, run, 9, "--buffer-rows", "2"), "another configuration", "buffer_rows")  # other batches
    assert (run / "config.json").read_text() == config_before
    fails(_train_args(zoo_path, tmp_path / "x", 0), "steps")
    fails(_train_args(zoo_path, tmp_path / "x", 3, "--buffer-rows", "0"), "buffer-rows must be at least 1")
    fails(_train_args(zoo_path, tmp_path / "x", 3, "--precision", "fp16"), "unknown precision 'fp16'", "fp32, bf16")
    fails([*_train_args(zoo_path, tmp_path / "x", 3)[:-6], "--encoder", "nope"], "unknown encoder")
    fails([*_train_args(zoo_path, tmp_path / "x", 3), "--encoder-opt", "augment=layer"],
          "augment must be one of batch, member, none")
    assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    fails(["embed", str(broken), "--zoo", str(zoo_path), "--out", str(tmp_path / "e2.parquet")], "corrupt")
    fails(_train_args(zoo_path, broken, 12), "corrupt")
    assert (broken / "checkpoints" / "best.pt").read_bytes() == b"not a checkpoint"
    other = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    other["architecture"] = {**other["architecture"], "hidden_size": 16}
    torch.save(other, broken / "checkpoints" / "best.pt")
    fails(["embed", str(broken), "--zoo", str(zoo_path), "--out", str(out)], "architecture")
    assert len(pl.read_parquet(out)) == len(meta)  # the earlier output is untouched

    # a zoo without a val split
    no_val = rewrite_splits(zoo_path, tmp_path / "zoo-no-val", lambda m: ("train", "ood")[m % 2])
    fails(_train_args(no_val, tmp_path / "y", 3), "no rows in split 'val'")
    assert not (tmp_path / "y").exists()


def test_bf16_run_trains_resumes_and_embeds(zoo3, tmp_path):
    runner, run = CliRunner(), tmp_path / "bf16"
    r = runner.invoke(app, _train_args(zoo3, run, 3, "--precision", "bf16"))
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert np.isfinite(pl.read_csv(run / "metrics.csv")["val_loss"].to_numpy()).all()
    r = runner.invoke(app, _train_args(zoo3, run, 3))
    assert r.exit_code == 2 and "differs in: precision" in r.output, r.output
    out = tmp_path / "emb.parquet"
    r = runner.invoke(app, ["embed", str(run), "--zoo", str(zoo3), "--out", str(out)])
    assert r.exit_code == 0, r.output
    z = np.stack(pl.read_parquet(out)["z"].to_list())
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_two_workers_match_one(zoo3, tmp_path):
    runner = CliRunner()
    one, two = tmp_path / "one", tmp_path / "two"
    for out, workers in ((one, 1), (two, 2)):
        r = runner.invoke(app, _train_args(zoo3, out, 6, "--workers", str(workers)))
        assert r.exit_code == 0, r.output
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):  # same 64 members per step, gradients averaged over ranks
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_killed_training_resumes_to_the_unbroken_result(zoo3, tmp_path):
    """SIGKILL the whole run (driver and its local Ray) mid-way; the re-run ends as an unbroken run."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    args = lambda out: [sys.executable, "-m", "rnnrep", *_train_args(zoo3, out, 40)]  # noqa: E731
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    assert subprocess.run(args(unbroken), env=env, capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(args(killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not (killed / "metrics.jsonl").exists() or len(_rows(killed)) < 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_rows(killed)) < len(_rows(unbroken)), "the kill should land mid-run"
    r = subprocess.run(args(killed), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(killed, unbroken)
