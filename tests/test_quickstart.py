"""The README's main job, end to end (minutes: run with `-m slow`)."""

import pytest
from typer.testing import CliRunner

from rnnrep.cli import app


@pytest.mark.slow
def test_quickstart_runs_the_whole_flow(ray_local, tmp_path):
    r = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--train-steps", "100"])
    assert r.exit_code == 0, r.output
    assert "3/3 embedded 576 snapshots" in r.output
