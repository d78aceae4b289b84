"""Shared fixtures: one local Ray per session, one tiny zoo per kind per session."""

from __future__ import annotations

import os

import pytest

# Quiet, loopback-only Ray for every test that starts one (RAY-NOTES.md).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(params=["c-kernel", "torch-ops"])
def cell_path(request):
    """Runs a test twice: with the C cell kernel (`rnnrep/cell.py`) and with torch ops."""
    from rnnrep import cell

    if request.param == "torch-ops":
        with cell.torch_ops():
            yield request.param
        return
    if cell.library() is None:
        if cell.find_compiler() is None:
            pytest.skip("no C compiler: the cell kernel cannot be built here")
        pytest.fail("a C compiler is here but the cell kernel did not build (see the logged warning)")
    yield request.param


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    from rnnrep.raycluster import connect

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


def _tiny_zoo(tmp_path_factory, task: str, members: int):
    from rnnrep.config import BuildOptions, zoo_config
    from rnnrep.zoo.build import build

    out = tmp_path_factory.mktemp("zoo") / task
    cfg = zoo_config(task, "tiny", members=members)
    build(cfg, out, BuildOptions(members_per_actor_batch=2, progress=False))
    return out, cfg


@pytest.fixture(scope="session")
def fl_zoo(ray_local, tmp_path_factory):
    return _tiny_zoo(tmp_path_factory, "formal-languages", 6)


@pytest.fixture(scope="session")
def mnist_zoo(ray_local, tmp_path_factory):
    return _tiny_zoo(tmp_path_factory, "sequential-mnist", 4)


def rewrite_splits(src, dst, split_of):
    """A copy of zoo `src` whose rows get split `split_of(member_id)` (manifest and checksums updated)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rnnrep.zoo.store import open_zoo, write_manifest, write_part

    dst.mkdir()
    zoo = open_zoo(src)
    meta = dict(zoo.meta, files={})
    for f in zoo.files:
        table = pq.read_table(f)
        splits = [split_of(m) for m in table.column("member_id").to_pylist()]
        table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
        table = table.filter(pc.not_equal(table.column("split"), ""))
        meta["files"][f.name] = write_part(dst, f.name, table)
    meta["rows"] = sum(e["rows"] for e in meta["files"].values())
    write_manifest(dst, meta)
    return dst


@pytest.fixture(scope="session")
def zoo3(fl_zoo, tmp_path_factory):
    """The session's tiny FL zoo with every split present (its 6 members' tasks need not cover val)."""
    return rewrite_splits(fl_zoo[0], tmp_path_factory.mktemp("zoo3") / "zoo", lambda m: ("train", "train", "val", "ood")[m % 4])
