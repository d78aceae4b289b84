"""CLI commands that need no zoo: help, encoders table."""

import re

import pytest
import torch
from typer.testing import CliRunner

from rnnrep import cell
from rnnrep.cli import app

runner = CliRunner()

PAPER_COUNTS = {
    "formal-languages": {"statistics": 1_248_016, "flat": 1_797_264, "transformer": 1_276_688, "dws": 1_279_736,
                         "noninteractive": 1_147_030, "interactive": 1_147_030},
    "sequential-mnist": {"statistics": 1_248_016, "flat": 1_978_000, "transformer": 1_278_480, "dws": 1_282_400,
                         "noninteractive": 1_156_512, "interactive": 1_156_512},
}


@pytest.mark.parametrize("task", list(PAPER_COUNTS))
def test_encoders_table_has_paper_parameter_counts(task):
    r = runner.invoke(app, ["encoders", "--task", task])
    assert r.exit_code == 0, r.output
    counts = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^(\w+)\s+([\d,]+)\s", r.output, re.M)}
    assert counts == PAPER_COUNTS[task]


def test_interactive_with_eight_probes():
    r = runner.invoke(app, ["encoders", "--num-probes", "8"])
    assert re.search(r"^interactive\s+1,388,054", r.output, re.M), r.output


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("zoo", "encoders", "bench", "quickstart"):
        assert cmd in r.output


def test_bench_lstm_times_every_implementation():
    r = runner.invoke(app, ["bench", "lstm", "--members", "2", "--min-steps", "1"])
    assert r.exit_code == 0, r.output
    rates = dict(re.findall(r"^(\S.*?)\s{2,}([\d.]+)\s+[\d.]+x", r.output, re.M))
    expected = {"nn.LSTM per member", "batched autograd", "fused, torch ops", "fused, C cell kernel"}
    if cell.find_compiler() is None:  # no compiler, no kernel to time
        expected.discard("fused, C cell kernel")
    assert set(rates) == expected, r.output
    assert all(float(v) > 0 for v in rates.values())
    assert "<- fastest" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_lstm_refuses_a_missing_gpu():
    r = runner.invoke(app, ["bench", "lstm", "--device", "cuda"])
    assert r.exit_code != 0 and "no CUDA device" in r.output


def test_bench_train_memory_refuses_bad_sizes():
    r = runner.invoke(app, ["bench", "train-memory", "--factor", "1"])
    assert r.exit_code != 0 and "--factor at least 2" in r.output


def test_bench_lstm_refuses_an_unknown_device():
    r = runner.invoke(app, ["bench", "lstm", "--device", "tpu"])
    assert r.exit_code == 2 and "unknown --device 'tpu'" in r.output


def test_bench_train_refuses_an_unknown_precision():
    r = runner.invoke(app, ["bench", "train", "--precision", "fp16"])
    assert r.exit_code == 2 and "unknown precision 'fp16'" in r.output
