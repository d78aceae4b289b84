"""bfloat16 training (`--precision bf16`): autocast on the encoder and emulator, members and
losses in float32, and results that track the float32 ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnrep.emulation.emulator import token_inputs
from rnnrep.emulation.step import EmulationBatch, autocast, build_model, check_precision
from rnnrep.encoders import ENCODERS, interactive
from rnnrep.encoders.probing import InteractiveProbing, ProbingConfig
from rnnrep.lstm import LSTMSpec, init_params

FL = LSTMSpec(input_size=6, output_size=6)
SMALL = {  # narrow encoders: what is checked does not depend on width
    "statistics": dict(hidden=(16, 16)),
    "flat": dict(hidden=(16, 16)),
    "transformer": dict(d_model=16, num_layers=2, num_heads=2, feedforward=32, dropout=0.0),
    "dws": dict(channels=(6, 5), mlp_hidden=(8,)),
    "noninteractive": dict(core_hidden=16, mlp_hidden=8, probe_length=3),
    "interactive": dict(core_hidden=16, mlp_hidden=8, probe_length=3),
}


def _batch(n: int = 8) -> EmulationBatch:
    g = torch.Generator().manual_seed(0)
    params = init_params(FL, [torch.Generator().manual_seed(i) for i in range(n)])
    tokens = torch.randint(0, 6, (n, 12), generator=g)
    return EmulationBatch(params, token_inputs(tokens, 6), torch.randn(n, 11, 6, generator=g))


def _loss_and_grads(model: nn.Module, batch: EmulationBatch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model.loss(batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ENCODERS)
def test_bf16_step_tracks_float32(name: str) -> None:
    torch.manual_seed(0)
    fp32 = build_model(name, FL, "formal-languages", {"hidden_size": 32}, **SMALL[name]).eval()
    bf16 = build_model(name, FL, "formal-languages", {"hidden_size": 32}, "bf16", **SMALL[name]).eval()
    bf16.load_state_dict(fp32.state_dict())
    batch = _batch()
    loss32, grad32 = _loss_and_grads(fp32, batch)
    loss16, grad16 = _loss_and_grads(bf16, batch)
    assert loss16.dtype == torch.float32 and bf16(batch.params, batch.inputs).dtype == torch.float32
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in bf16.parameters())
    assert loss16 != loss32  # it did run in bfloat16 ...
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)  # ... and stays close
    assert torch.cosine_similarity(grad16, grad32, dim=0) > 0.99
    z = bf16.encode(batch.params)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(len(batch)))
    torch.testing.assert_close(z, fp32.encode(batch.params), atol=0.05, rtol=0)


def test_probes_and_members_run_in_float32_under_autocast(monkeypatch) -> None:
    seen = []
    step = interactive._Tape._member_forward

    def spy(self, x, state):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return step(self, x, state)

    monkeypatch.setattr(interactive._Tape, "_member_forward", spy)
    model = build_model("interactive", FL, "formal-languages", {"hidden_size": 32}, "bf16", **SMALL["interactive"])
    model.loss(_batch(4)).backward()
    assert seen == [(torch.float32, False)] * SMALL["interactive"]["probe_length"]
    with autocast("bf16", "cpu"):
        for encoder in (model.encoder, build_model("noninteractive", FL, "formal-languages", **SMALL["noninteractive"]).encoder):
            _, probes = encoder.rollout(_batch(2).params)
            assert probes.dtype == torch.float32


@pytest.mark.parametrize("residual", [True, False])
def test_interactive_core_gemms_run_in_bf16_under_autocast(monkeypatch, residual: bool) -> None:
    """Only the core's GEMMs: its weights' copies and row buffers in bfloat16, its bias,
    cell and every gradient handed back in float32, and the result close to float32's."""
    cores = []
    init = interactive._Core.__init__

    def spy(self, *args):
        init(self, *args)
        cores.append(self)

    monkeypatch.setattr(interactive._Core, "__init__", spy)
    torch.manual_seed(0)
    enc = InteractiveProbing(FL, "formal-languages", ProbingConfig(core_hidden=32, mlp_hidden=8, probe_length=4, residual=residual))
    params = _batch().params

    def run(precision: str):
        enc.zero_grad()
        with autocast(precision, "cpu"):
            z = enc(params)
        loss = (z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None])

    loss32, grad32 = run("fp32")
    loss16, grad16 = run("bf16")
    assert all(w.dtype == torch.float32 for w in cores[0].weights[0]) and cores[0].inputs[0].dtype == torch.float32
    w_ih, w_hh, bias = cores[1].weights[0]
    assert w_ih.dtype == w_hh.dtype == cores[1].inputs[0].dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert grad16.dtype == torch.float32 and loss16 != loss32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert torch.cosine_similarity(grad16, grad32, dim=0) > 0.999


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of: fp32, bf16"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        build_model("flat", FL, "formal-languages", None, "half")
