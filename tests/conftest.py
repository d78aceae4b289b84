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
