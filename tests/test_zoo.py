"""Zoo build end to end (CLI, local Ray), reading back, resuming and refusing bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rnnrep import lstm
from rnnrep.cli import app
from rnnrep.zoo.build import WholeMembers
from rnnrep.zoo.schema import ZooFormatError
from rnnrep.zoo.store import open_zoo

runner = CliRunner()


def build_cli(out, *args):
    return runner.invoke(app, ["zoo", "build", "--preset", "tiny", "--out", str(out), "--no-progress", *args])


@pytest.fixture(scope="module")
def cli_zoo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fl"
    r = build_cli(out, "--members", "5", "--members-per-batch", "2")
    assert r.exit_code == 0, r.output
    return out


def test_cli_build_reads_back_with_polars(cli_zoo):
    df = pl.read_parquet(cli_zoo / "*.parquet")
    meta = json.loads((cli_zoo / "zoo.json").read_text())
    assert meta["complete"] and meta["rows"] == len(df) == 5 * len(meta["snapshot_steps"])
    assert df.group_by("member_id").len()["len"].to_list() == [len(meta["snapshot_steps"])] * 5
    assert df.schema["sequences"] == pl.List(pl.List(pl.Int8))
    assert df.schema["logits"] == pl.List(pl.List(pl.List(pl.Float16)))
    splits = {tuple(s["task"]): s["split"] for s in meta["splits"]}
    assert len(splits) == 216
    for row in df.select("task", "split").iter_rows():
        assert splits[tuple(row[0])] == row[1]


def test_stored_logits_match_torch_lstm(cli_zoo):
    zoo = open_zoo(cli_zoo, kind="formal-languages")
    table = next(zoo.iter_tables(columns=["params", "sequences", "logits"]))
    a = zoo.arrays(table)
    for params, seq, logits in zip(a["params"], a["sequences"], a["logits"]):
        mod, lin = lstm.to_modules(zoo.spec, torch.from_numpy(params.copy()))
        x = F.one_hot(torch.from_numpy(seq[:, :-1].copy()).long(), 6).float()
        with torch.no_grad():
            ref = torch.log_softmax(lin(mod(x)[0]), -1)
        np.testing.assert_allclose(logits.astype(np.float32), ref.numpy(), atol=1e-2, rtol=1e-3)


def test_mnist_zoo_logits_match_torch_lstm(mnist_zoo):
    out, cfg = mnist_zoo
    zoo = open_zoo(out, kind="sequential-mnist")
    meta = zoo.metadata()
    assert set(meta.columns) >= {"accuracy", "train_loss", "eval_loss", "generalization_gap", "weight_decay"}
    a = zoo.arrays(next(zoo.iter_tables(columns=["params", "inputs", "labels", "logits"])))
    assert a["inputs"].shape[1:] == (cfg.rollouts, 50, 16) and (a["labels"] >= 0).all()
    mod, lin = lstm.to_modules(zoo.spec, torch.from_numpy(a["params"][0].copy()))
    with torch.no_grad():
        ref = lin(mod(torch.from_numpy(a["inputs"][0].astype(np.float32)))[0])
    np.testing.assert_allclose(a["logits"][0].astype(np.float32), ref.numpy(), atol=1e-2, rtol=1e-3)


def test_rerun_skips_finished_members(cli_zoo):
    before = {p.name: p.stat().st_mtime_ns for p in cli_zoo.glob("*.parquet")}
    r = build_cli(cli_zoo, "--members", "5", "--members-per-batch", "2")
    assert r.exit_code == 0 and "already built" in r.output
    assert before == {p.name: p.stat().st_mtime_ns for p in cli_zoo.glob("*.parquet")}


def test_resume_after_lost_file_and_partial_write(ray_local, tmp_path):
    out = tmp_path / "zoo"
    assert build_cli(out, "--members", "4", "--members-per-batch", "1").exit_code == 0
    victim = sorted(out.glob("part-*.parquet"))[1]
    victim.unlink()  # as if the build died before this file existed
    (out / ".part-000009-000009.parquet.abc.tmp").write_bytes(b"PAR1 truncated")
    meta = json.loads((out / "zoo.json").read_text())
    meta["complete"] = False
    (out / "zoo.json").write_text(json.dumps(meta))
    with pytest.raises(ZooFormatError, match="unfinished build"):
        open_zoo(out)
    r = build_cli(out, "--members", "4", "--members-per-batch", "1")
    assert r.exit_code == 0, r.output
    assert "trained 1 members (3 already there)" in r.output
    df = open_zoo(out).metadata()
    assert sorted(df["member_id"].unique().to_list()) == [0, 1, 2, 3]
    assert df.group_by("member_id").len()["len"].unique().to_list() == [7]
    assert not list(out.glob("*.tmp"))


def test_members_split_across_ray_blocks_are_written_whole(ray_local, tmp_path):
    """Ray Data cuts big actor outputs into blocks, even inside a member's rows (a GPU
    batch of 256 members did); the build must still write every member whole, once."""
    ctx = ray_local.data.DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = 200_000  # bytes: small enough to cut the batch into blocks (asserted below)
    try:
        out = tmp_path / "zoo"
        r = build_cli(out, "--members", "4", "--members-per-batch", "4")
    finally:
        ctx.target_max_block_size = old
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("part-*.parquet"))) > 1  # the blocks did split the batch
    df = open_zoo(out).metadata()
    assert sorted(df["member_id"].to_list()) == sorted(list(range(4)) * 7)


def test_whole_members_holds_rows_until_a_member_is_complete():
    members = WholeMembers(snapshots=3)
    table = pa.table({"member_id": [0, 0, 0, 1, 1, 1, 2], "snapshot": [0, 1, 2, 0, 1, 2, 0]})
    assert members.add(table.slice(0, 2)) is None
    assert members.add(table.slice(2, 3))["member_id"].to_pylist() == [0, 0, 0]
    assert members.add(table.slice(5, 2))["member_id"].to_pylist() == [1, 1, 1]
    assert members.held["member_id"].to_pylist() == [2]


def test_killed_build_resumes_to_every_member_once(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rnnrep", "zoo", "build", "--preset", "tiny", "--members", "8",
           "--members-per-batch", "1", "--steps", "300", "--out", str(out), "--no-progress"]
    import tempfile

    # Ray's socket paths must stay short: a pytest tmp_path is too deep for them
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rk", dir="/tmp")}
    log = open(tmp_path / "build.log", "wb")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray
    proc.wait()
    written = len(list(out.glob("part-*.parquet")))
    assert 1 <= written < 8, (tmp_path / "build.log").read_text()[-2000:]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stderr
    df = open_zoo(out).metadata()
    counts = df.group_by("member_id").len()
    assert sorted(counts["member_id"].to_list()) == list(range(8))
    assert counts["len"].unique().to_list() == [len(json.loads((out / "zoo.json").read_text())["snapshot_steps"])]


def test_other_config_is_refused_unless_overwrite(ray_local, cli_zoo, tmp_path):
    r = build_cli(cli_zoo, "--members", "5", "--members-per-batch", "2", "--seed", "7")
    assert r.exit_code == 2 and "--overwrite" in r.output
    out = tmp_path / "z"
    assert build_cli(out, "--members", "2").exit_code == 0
    r = build_cli(out, "--members", "3", "--overwrite")
    assert r.exit_code == 0 and open_zoo(out).metadata()["member_id"].n_unique() == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "chess"], "unknown task 'chess'"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--members", "0"], "--members must be at least 1"),
        (["--task", "sequential-mnist", "--mnist-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    ],
)
def test_bad_build_input_is_one_line_error(tmp_path, args, message):
    out = tmp_path / "never"
    r = build_cli(out, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = build_cli(blocker / "zoo")
    assert r.exit_code == 2 and "choose a writable --out" in r.output


def test_readers_fail_loudly(cli_zoo, tmp_path):
    import shutil

    z = tmp_path / "copy"
    shutil.copytree(cli_zoo, z)
    with pytest.raises(ZooFormatError, match="architecture"):
        open_zoo(z, spec=lstm.LSTMSpec(16, 10))
    with pytest.raises(ZooFormatError, match="sequential-mnist zoo was asked"):
        open_zoo(z, kind="sequential-mnist")
    part = sorted(z.glob("part-*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ZooFormatError, match="checksum mismatch"):
        open_zoo(z)
    r = runner.invoke(app, ["zoo", "info", str(z)])
    assert r.exit_code == 2 and "checksum mismatch" in r.output
    # a foreign Parquet file with a correct checksum is still refused by its schema
    pq.write_table(pa.table({"a": [1, 2]}), part)
    meta = json.loads((z / "zoo.json").read_text())
    from rnnrep.zoo.store import sha256

    meta["files"][part.name]["sha256"] = sha256(part)
    (z / "zoo.json").write_text(json.dumps(meta))
    with pytest.raises(ZooFormatError, match="column 'member_id' is missing"):
        open_zoo(z)
    part.unlink()
    with pytest.raises(ZooFormatError, match="missing"):
        open_zoo(z)
    (z / "zoo.json").write_text("{not json")
    with pytest.raises(ZooFormatError, match="not valid JSON"):
        open_zoo(z)
    meta["schema_version"] = 99
    (z / "zoo.json").write_text(json.dumps(meta))
    with pytest.raises(ZooFormatError, match="schema version 99"):
        open_zoo(z)


def test_info_and_plot(cli_zoo, tmp_path):
    png = tmp_path / "acc.png"
    r = runner.invoke(app, ["zoo", "info", str(cli_zoo), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "5 members" in r.output and "accuracy per snapshot step" in r.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_streams_as_ray_dataset_and_by_split(cli_zoo):
    zoo = open_zoo(cli_zoo)
    meta = zoo.metadata()
    split = meta["split"][0]
    ds = zoo.to_ray(split=split, columns=["member_id", "params"])
    assert ds.count() == (meta["split"] == split).sum()
    n = sum(len(t) for t in zoo.iter_tables(split=split, columns=["member_id"]))
    assert n == (meta["split"] == split).sum()


def test_each_row_group_holds_one_split_in_table_order(zoo3):
    """A split's reader decodes only its own rows; rows keep their order within a split."""
    zoo = open_zoo(zoo3)  # written by write_part from parts whose members alternate splits
    groups = 0
    for f in zoo.files:
        pf = pq.ParquetFile(f)
        groups += pf.metadata.num_row_groups
        seen = []
        for rg in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(rg, columns=["split", "member_id", "snapshot"])
            assert len(set(t.column("split").to_pylist())) == 1
            seen.append(t.column("split")[0].as_py())
            keys = list(zip(t.column("member_id").to_pylist(), t.column("snapshot").to_pylist()))
            assert keys == sorted(keys)
        assert len(seen) == len(set(seen))  # each split's rows in one row group here (< 256 rows)
    assert groups > len(zoo.files)  # some part held members of two splits


def test_gpu_request_without_gpus_falls_back_to_cpu(ray_local, tmp_path):
    r = build_cli(tmp_path / "z", "--members", "3", "--gpus-per-actor", "0.25")
    assert r.exit_code == 0, r.output
    assert "no GPU" in r.output and "on cpu" in r.output
