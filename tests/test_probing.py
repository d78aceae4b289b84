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


def tiny(encoder: type, kind: str, dtype: torch.dtype = torch.float32, spec: LSTMSpec | None = None, **overrides: object):
    cfg = ProbingConfig(**{"core_hidden": 12, "mlp_hidden": 8, "probe_length": 4, "num_probes": 2, **overrides})
    torch.manual_seed(0)
    return encoder(spec or TINY[kind], kind, cfg).to(dtype)


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
    """The reference's `InteractiveEncoder` loop written out in autograd ops, `torch.lstm_cell`
    for the core and `lstm.step` for the members: query = the core's output (interactive
    weight 1, plus `static_weight` times the code of step t) or the code alone (static weight 1)."""
    B, cfg = params.shape[0], enc.cfg
    if cfg.learn_initial_state:
        state = [(h.expand(B, -1), c.expand(B, -1)) for h, c in zip(enc.core.h0, enc.core.c0)]
    else:
        state = [(params.new_zeros(B, cfg.core_hidden),) * 2] * cfg.core_layers

    def core(x, state):
        new = []
        for layer, hc in zip(enc.core.layers, state):
            h, c = torch.lstm_cell(x, hc, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
            new.append((h, c))
            x = h + x if cfg.residual else h
        return x, new

    out, state = core(enc.bos.expand(B, -1), state)
    member, probes = None, []
    for t in range(cfg.probe_length):
        if not interactive:
            query = enc.codes[t].expand(B, -1)
        else:  # the codes play no part with the paper's static weight 0
            query = out + cfg.static_weight * enc.codes[t] if cfg.static_weight else out
        probes.append(enc.decode_probes(query))
        logits, member = lstm.step(enc.spec, params, probes[-1], member)
        out, state = core(enc.read(logits), state)
    out, _ = core(enc.eos.expand(B, -1), state)
    return enc.embed(out), torch.stack(probes, dim=2)


VARIANTS = {  # ProbingConfig overrides on top of `tiny`'s (M = 2)
    "plain": {},
    "one probe": {"num_probes": 1},
    "static weight": {"static_weight": 0.5},
    "learned start": {"learn_initial_state": True},
    "deeper decoder": {"mlp_layers": 2},
    "linear decoder": {"mlp_layers": 0},
    "not residual, 3 layers": {"residual": False, "core_layers": 3},
}


@pytest.fixture
def nan_filled_empty():
    """`torch.empty` and friends filled with NaN, so that a buffer row left unwritten shows."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


@pytest.mark.usefixtures("cell_path", "nan_filled_empty")
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_the_reference_loop_values_and_gradients(encoder, kind, variant):
    """Non-interactive runs member and core over whole sequences, interactive runs the
    loop as one autograd node with a hand-written backward (`rnnrep.encoders.interactive`);
    both must be the reference's step-by-step loop, gradients to the member weights included."""
    spec = TINY[kind]
    if variant == "not residual, 3 layers":  # and members of 3 layers
        spec = LSTMSpec(spec.input_size, spec.output_size, hidden_size=3, num_layers=3)
    enc = tiny(encoder, kind, torch.float64, spec=spec, **VARIANTS[variant])
    with torch.no_grad():  # a learned initial state off its zero start
        enc.core.h0.normal_()
        enc.core.c0.normal_()
    params = members(spec, 3, torch.float64).requires_grad_()
    got, got_probes = enc.rollout(params)
    want, want_probes = _reference_rollout(enc, params, interactive=encoder is InteractiveProbing)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_probes, want_probes, atol=1e-12, rtol=0)
    w = torch.randn_like(got)
    leaves = [params, *enc.parameters()]
    g_got = torch.autograd.grad((got * w).sum(), leaves, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), leaves, allow_unused=True)
    for name, a, b in zip(["member params"] + [n for n, _ in enc.named_parameters()], g_got, g_want):
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


@pytest.mark.usefixtures("cell_path")
def test_interactive_node_hands_back_only_the_gradients_asked_for():
    """Frozen encoder: the members' gradient alone, as the reference loop gives it; members as
    data (training): the encoder's gradients, and no work or tensor for the members."""
    enc = tiny(InteractiveProbing, "formal-languages", torch.float64).requires_grad_(False)
    params = members(TINY["formal-languages"], 3, torch.float64).requires_grad_()
    (got,) = torch.autograd.grad(enc(params).pow(3).sum(), params)
    (want,) = torch.autograd.grad(_reference_rollout(enc, params, True)[0].pow(3).sum(), params)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    enc.requires_grad_(True)
    data = params.detach()
    enc(data).pow(3).sum().backward()
    assert data.grad is None and all(p.grad is not None for n, p in enc.named_parameters() if n not in ("codes", "core.h0", "core.c0"))


def test_interactive_rollout_backward_twice_is_a_clear_error():
    enc = tiny(InteractiveProbing, "formal-languages")
    loss = enc(members(TINY["formal-languages"], 2)).pow(3).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time.*run the encoder again"):
        loss.backward()
