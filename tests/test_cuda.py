"""The GPU paths, each against the CPU: skipped where torch sees no CUDA device.

CI has no GPU; these run on one when a session is lent it (README, "GPU"). Every
test pins the GPU result to the CPU's, so a device path cannot silently drift.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rnnrep import lstm
from rnnrep.cli import app
from rnnrep.config import member_spec, zoo_config
from rnnrep.emulation.step import (
    EmulationBatch,
    build_model,
    make_optimizers,
    train_step,
)
from rnnrep.encoders import ENCODERS
from rnnrep.zoo.members import plan_member, train_members
from rnnrep.zoo.store import open_zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
runner = CliRunner()


@pytest.mark.parametrize("impl", lstm.IMPLS)
def test_member_lstm_forward_and_gradient_match_cpu(impl):
    spec = member_spec("formal-languages")
    g = torch.Generator().manual_seed(0)
    flat = lstm.init_params(spec, [torch.Generator().manual_seed(i) for i in range(3)]).double()
    x = torch.randn(3, 5, 7, spec.input_size, generator=g, dtype=torch.float64)
    r = torch.randn(3, 5, 7, spec.output_size, generator=g, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        w = flat.to(device, copy=True).requires_grad_()
        logits, (h, c) = lstm.forward(spec, w, x.to(device), impl=impl)
        (logits * r.to(device)).sum().backward()
        results.append([t.detach().cpu() for t in (logits, h, c, w.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("task", ["formal-languages", "sequential-mnist"])
def test_members_trained_on_gpu_match_cpu(task):
    cfg = zoo_config(task, "tiny", members=2, steps=4)
    plans = [plan_member(cfg, i) for i in range(2)]
    cpu = list(train_members(cfg, plans, "cpu"))
    gpu = list(train_members(cfg, plans, "cuda"))
    assert [s.step for s in gpu] == [s.step for s in cpu]
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b.params, a.params, atol=1e-4)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-3)
        for name in a.metrics:
            np.testing.assert_allclose(b.metrics[name], a.metrics[name], atol=0.05, err_msg=name)


def _fl_batch(spec) -> EmulationBatch:
    """Four members' weights, random token inputs and random target logits (CPU)."""
    g = torch.Generator().manual_seed(1)
    return EmulationBatch(
        params=lstm.init_params(spec, [torch.Generator().manual_seed(i) for i in range(4)]),
        inputs=F.one_hot(torch.randint(0, 6, (4, 41), generator=g), 6).float(),
        targets=torch.randn(4, 41, 6, generator=g),
    )


@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_on_gpu_match_cpu_and_train_alike(name):
    spec = member_spec("formal-languages")
    torch.manual_seed(0)
    # dropout draws from each device's own generator; everything else must agree
    cpu_model = build_model(name, spec, "formal-languages", **({"dropout": 0.0} if name == "transformer" else {}))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    batch = _fl_batch(spec)
    losses = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        model.eval()
        with torch.no_grad():
            losses.append([model.encoder(batch.params.to(device)).cpu()])
        torch.manual_seed(2)  # the permutation augmentation draws on the CPU generator on both
        opts = make_optimizers(model)
        losses[-1] += [train_step(model, opts, batch.to(device)) for _ in range(3)]
    (z_cpu, *l_cpu), (z_gpu, *l_gpu) = losses
    torch.testing.assert_close(z_gpu, z_cpu, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(l_gpu, l_cpu, rtol=2e-3)


@pytest.mark.parametrize("name", ENCODERS)
def test_bf16_on_gpu_tracks_float32_on_cpu(name):
    spec = member_spec("formal-languages")
    torch.manual_seed(0)
    overrides = {"dropout": 0.0} if name == "transformer" else {}
    cpu_model = build_model(name, spec, "formal-languages", **overrides).eval()
    gpu_model = build_model(name, spec, "formal-languages", None, "bf16", **overrides).cuda().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    batch = _fl_batch(spec)
    grads = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        loss = model.loss(batch.to(device))
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append((loss.detach().cpu(), torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])))
    (l_cpu, g_cpu), (l_gpu, g_gpu) = grads
    torch.testing.assert_close(l_gpu, l_cpu, rtol=2e-2, atol=0)
    assert torch.cosine_similarity(g_gpu, g_cpu, dim=0) > 0.99


def test_cli_builds_on_gpu_and_trains_there(ray_local, tmp_path):
    """A tiny zoo built by GPU actors holds what nn.LSTM on the CPU computes; training on a GPU worker runs."""
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    out = tmp_path / "fl"
    r = runner.invoke(app, ["zoo", "build", "--preset", "tiny", "--members", "8", "--out", str(out),
                            "--no-progress", "--gpus-per-actor", "0.5", "--members-per-batch", "4"])
    assert r.exit_code == 0, r.output
    assert "on cuda" in r.output
    zoo = open_zoo(out)
    a = zoo.arrays(next(zoo.iter_tables(columns=["params", "sequences", "logits"])))
    for params, seq, logits in zip(a["params"][:4], a["sequences"][:4], a["logits"][:4]):
        mod, lin = lstm.to_modules(zoo.spec, torch.from_numpy(params.copy()))
        x = F.one_hot(torch.from_numpy(seq[:, :-1].copy()).long(), 6).float()
        with torch.no_grad():
            ref = torch.log_softmax(lin(mod(x)[0]), -1)
        got = torch.log_softmax(torch.from_numpy(logits.astype(np.float32)), -1)
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-3)

    from conftest import rewrite_splits

    zoo3 = rewrite_splits(out, tmp_path / "zoo3", lambda m: ("train", "train", "val", "ood")[m % 4])
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--zoo", str(zoo3), "--out", str(run), "--preset", "tiny", "--steps", "6",
                            "--val-every", "3", "--encoder", "interactive", "--gpus-per-worker", "1"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(v) for row in rows for k, v in row.items() if k.endswith("loss"))
