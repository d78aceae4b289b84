"""Probing encoders: the paper's sizes, and that they see a member only through its function."""

import pytest
import torch

from rnnrep import lstm
from rnnrep.encoders.probing import (
    InteractiveProbing,
    NonInteractiveProbing,
    ProbingConfig,
    default_probing_config,
)
from rnnrep.lstm import LSTMSpec

ENCODERS = (NonInteractiveProbing, InteractiveProbing)
TINY = {  # kind -> (member spec, config)
    "formal-languages": LSTMSpec(6, 6, hidden_size=4),
    "sequential-mnist": LSTMSpec(16, 10, hidden_size=4),
}


def tiny(encoder: type, kind: str, dtype: torch.dtype = torch.float32, **overrides: object):
    cfg = ProbingConfig(core_hidden=12, mlp_hidden=8, probe_length=4, num_probes=2, **overrides)
    torch.manual_seed(0)
    return encoder(TINY[kind], kind, cfg).to(dtype)


def members(spec: LSTMSpec, k: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, spec.num_params, generator=g) * 0.5).to(dtype)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("encoder", "kind", "member", "overrides", "expected"),
    [
        (NonInteractiveProbing, "formal-languages", LSTMSpec(6, 6), {}, 1_147_030),
        (NonInteractiveProbing, "sequential-mnist", LSTMSpec(16, 10), {}, 1_156_512),
        (InteractiveProbing, "formal-languages", LSTMSpec(6, 6), {}, 1_147_030),
        (InteractiveProbing, "formal-languages", LSTMSpec(6, 6), {"num_probes": 8}, 1_388_054),
        (InteractiveProbing, "sequential-mnist", LSTMSpec(16, 10), {}, 1_156_512),
    ],
)
def test_paper_parameter_counts(encoder, kind, member, overrides, expected):
    assert num_params(encoder(member, kind, default_probing_config(kind, **overrides))) == expected


def test_default_config():
    assert default_probing_config("formal-languages").probe_length == 22
    assert default_probing_config("sequential-mnist").probe_length == 50
    assert default_probing_config("sequential-mnist", num_probes=4).num_probes == 4
    with pytest.raises(ValueError, match="formal-languages"):
        default_probing_config("chess")
    with pytest.raises(ValueError, match="ProbingConfig.core_hidden must be positive, got 0"):
        ProbingConfig(core_hidden=0)
    with pytest.raises(ValueError, match="ProbingConfig.mlp_layers must be >= 0"):
        ProbingConfig(mlp_layers=-1)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("kind", sorted(TINY))
def test_shapes_unit_norm_and_probe_domain(encoder, kind):
    enc = tiny(encoder, kind)
    spec = TINY[kind]
    z, probes = enc.rollout(members(spec, 3))
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert probes.shape == (3, 2, 4, spec.input_size)  # [B, M, L, I]
    if kind == "formal-languages":  # distributions over the 6 tokens
        torch.testing.assert_close(probes.sum(-1), torch.ones(3, 2, 4))
    assert probes.min() >= 0 and probes.max() <= 1
    torch.testing.assert_close(enc(members(spec, 3)), z)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("kind", sorted(TINY))
def test_invariant_to_hidden_neuron_permutations(encoder, kind):
    enc, spec = tiny(encoder, kind, torch.float64), TINY[kind]
    params = members(spec, 5, torch.float64)
    permuted = lstm.permute_hidden(spec, params, lstm.random_permutations(spec, 5, torch.Generator().manual_seed(3)))
    assert not torch.allclose(params, permuted)
    torch.testing.assert_close(enc(permuted), enc(params), atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_differentiable_through_probes_and_member(encoder):
    enc = tiny(encoder, "formal-languages")
    params = members(TINY["formal-languages"], 3).requires_grad_()
    enc(params).pow(2).sum().backward()  # not the norm, whose gradient is zero
    enc.zero_grad()
    z = enc(params)
    (z * torch.randn_like(z)).sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    decoder = enc.probe_decoder[0].weight.grad
    assert decoder is not None and decoder.abs().sum() > 0
    if encoder is NonInteractiveProbing:  # the codes are the probes' only source
        assert enc.codes.grad[: enc.cfg.probe_length].abs().sum() > 0


def test_interactive_probes_depend_on_member_non_interactive_do_not():
    spec = TINY["formal-languages"]
    a, b = members(spec, 1, seed=1), members(spec, 1, seed=2)
    _, pa = tiny(InteractiveProbing, "formal-languages").rollout(a)
    _, pb = tiny(InteractiveProbing, "formal-languages").rollout(b)
    torch.testing.assert_close(pa[:, :, 0], pb[:, :, 0])  # the first probe follows BOS only
    assert not torch.allclose(pa[:, :, 1], pb[:, :, 1])
    _, qa = tiny(NonInteractiveProbing, "formal-languages").rollout(a)
    _, qb = tiny(NonInteractiveProbing, "formal-languages").rollout(b)
    torch.testing.assert_close(qa, qb)


def test_static_weight_mixes_codes_into_interactive_queries():
    spec = TINY["formal-languages"]
    params = members(spec, 2)
    plain = tiny(InteractiveProbing, "formal-languages")
    mixed = tiny(InteractiveProbing, "formal-languages", static_weight=0.5)
    mixed.load_state_dict(plain.state_dict())
    assert not torch.allclose(plain.rollout(params)[1], mixed.rollout(params)[1])


def _reference_rollout(enc, params, interactive: bool):
    """The reference's `InteractiveEncoder` loop written out with `torch.lstm_cell`: query =
    the core's output (interactive weight 1) or the code of step t (static weight 1)."""
    B = params.shape[0]
    zeros = params.new_zeros(B, enc.cfg.core_hidden)
    state = [(zeros, zeros)] * enc.cfg.core_layers

    def core(x, state):
        new = []
        for layer, hc in zip(enc.core.layers, state):
            h, c = torch.lstm_cell(x, hc, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
            new.append((h, c))
            x = h + x
        return x, new

    out, state = core(enc.bos.expand(B, -1), state)
    member = lstm.Prober(enc.spec, params)
    for t in range(enc.cfg.probe_length):
        query = out if interactive else enc.codes[t].expand(B, -1)
        out, state = core(enc.read(member(enc.decode_probes(query))), state)
    out, _ = core(enc.eos.expand(B, -1), state)
    return enc.embed(out)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_matches_the_reference_loop_values_and_gradients(encoder):
    """Non-interactive runs member and core over whole sequences, interactive steps the
    core in its own autograd node; both must be the reference's step-by-step loop."""
    torch.manual_seed(0)
    enc = tiny(encoder, "formal-languages").double()
    params = members(TINY["formal-languages"], 3).double()
    got = enc(params)
    want = _reference_rollout(enc, params, interactive=encoder is InteractiveProbing)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), list(enc.parameters()), allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), list(enc.parameters()), allow_unused=True)
    for (name, _), a, b in zip(enc.named_parameters(), g_got, g_want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("learn", [False, True])
def test_core_starts_from_zeros_as_the_reference_does(encoder, learn):
    enc = tiny(encoder, "formal-languages", learn_initial_state=learn)
    x = members(TINY["formal-languages"], 3)
    before = enc(x)
    before.sum().backward()
    with torch.no_grad():
        enc.core.h0.add_(1.0)
        enc.core.c0.add_(1.0)
    after = enc(x)
    if learn:
        assert not torch.allclose(before, after) and enc.core.h0.grad is not None
    else:  # the parameters exist (the paper's count) but play no part
        assert torch.equal(before, after) and enc.core.h0.grad is None and enc.core.c0.grad is None
