"""Weight encoders: paper parameter counts, unit-norm output, the permutation symmetry
(invariance, per-layer equivariance, augmentation) and the registry."""

from __future__ import annotations

import pytest
import torch

from rnnrep import cell
from rnnrep.encoders import ENCODERS, MECHANISTIC, build_encoder, encoder_config
from rnnrep.encoders.common import count_parameters
from rnnrep.encoders.dws import (
    DWSConfig,
    DWSEncoder,
    feature_shapes,
    linear_relu_sums,
    permute_features,
    to_features,
)
from rnnrep.encoders.flat import FlatConfig, FlatEncoder
from rnnrep.encoders.statistics import StatisticsEncoder
from rnnrep.encoders.transformer import Block, TransformerConfig, TransformerEncoder
from rnnrep.lstm import LSTMSpec, init_params, permute_hidden, random_permutations

FL = LSTMSpec(input_size=6, output_size=6)
MNIST = LSTMSpec(input_size=16, output_size=10)
SMALL = LSTMSpec(3, 4, hidden_size=5)
DEEP = LSTMSpec(2, 3, hidden_size=4, num_layers=3)


def members(spec: LSTMSpec, b: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return init_params(spec, [torch.Generator().manual_seed(seed + i) for i in range(b)]).to(dtype)


def small(name: str, spec: LSTMSpec) -> torch.nn.Module:
    """Narrow versions: the properties don't depend on width, the test time does."""
    sizes = {
        "statistics": dict(hidden=(16, 16)),
        "flat": dict(hidden=(16, 16)),
        "transformer": dict(d_model=16, num_layers=2, num_heads=2, feedforward=32, dropout=0.0),
        "dws": dict(channels=(6, 5), mlp_hidden=(8,)),
    }[name]
    return build_encoder(name, spec, "formal-languages", **sizes)


# --------------------------------------------------------------------------- sizes and outputs

PAPER_COUNTS = {
    ("statistics", "formal-languages"): 1_248_016,
    ("statistics", "sequential-mnist"): 1_248_016,
    ("flat", "formal-languages"): 1_797_264,
    ("flat", "sequential-mnist"): 1_978_000,
    ("transformer", "formal-languages"): 1_276_688,
    ("transformer", "sequential-mnist"): 1_278_480,
    ("dws", "formal-languages"): 1_279_736,
    ("dws", "sequential-mnist"): 1_282_400,
}


@pytest.mark.parametrize(("name", "kind"), list(PAPER_COUNTS))
def test_paper_parameter_counts(name: str, kind: str) -> None:
    spec = FL if kind == "formal-languages" else MNIST
    assert count_parameters(build_encoder(name, spec, kind)) == PAPER_COUNTS[(name, kind)]


@pytest.mark.parametrize("name", MECHANISTIC)
def test_paper_encoder_output_is_unit_norm(name: str) -> None:
    z = build_encoder(name, FL, "formal-languages").eval()(members(FL, 2))
    assert z.shape == (2, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("spec", [SMALL, DEEP], ids=["2-layer", "3-layer"])
@pytest.mark.parametrize("name", MECHANISTIC)
def test_any_member_shape(name: str, spec: LSTMSpec) -> None:
    encoder = small(name, spec)
    z = encoder(members(spec, 3))
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    z.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


# --------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("spec", [SMALL, DEEP], ids=["2-layer", "3-layer"])
@pytest.mark.parametrize("name", ["statistics", "dws"])
def test_invariant_to_hidden_permutations(name: str, spec: LSTMSpec) -> None:
    encoder = small(name, spec).double()
    x = members(spec, 4, dtype=torch.float64)
    perms = random_permutations(spec, 4, generator=torch.Generator().manual_seed(1))
    x_perm = permute_hidden(spec, x, perms)
    assert not torch.allclose(x, x_perm)
    torch.testing.assert_close(encoder(x_perm), encoder(x), atol=1e-5, rtol=1e-5)


def test_dws_features_follow_the_member_permutation() -> None:
    x = members(DEEP, 2)
    perms = [torch.randperm(DEEP.hidden_size) for _ in range(DEEP.num_layers)]
    permuted = to_features(DEEP, permute_hidden(DEEP, x, perms))
    expected = permute_features(DEEP, to_features(DEEP, x), perms)
    for name in expected:
        torch.testing.assert_close(permuted[name], expected[name])


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("spec", [SMALL, DEEP], ids=["2-layer", "3-layer"])
def test_every_dws_layer_is_equivariant(spec: LSTMSpec, relu: bool) -> None:
    torch.manual_seed(0)
    encoder = DWSEncoder(spec, DWSConfig(channels=(6, 5, 3), mlp_hidden=(8,))).double()
    for layer in encoder.layers:
        c_in = layer.maps[0].point.in_features
        feats = {k: torch.randn(2, *shape, c_in, dtype=torch.float64) for k, shape in feature_shapes(spec).items()}
        perms = [torch.randperm(spec.hidden_size) for _ in range(spec.num_layers)]
        out_of_permuted, _ = layer(permute_features(spec, feats, perms), relu=relu)
        out, sums = layer(feats, relu=relu)
        permuted_out = permute_features(spec, out, perms)
        for name in feats:
            torch.testing.assert_close(out_of_permuted[name], permuted_out[name], atol=1e-10, rtol=1e-10)
        if relu:  # the sums handed to the next layer are the output's
            assert all((x >= 0).all() for x in out.values())
            assert sums.keys() == {k for k, x in out.items() if x.dim() == 4}
            for name, (s_rows, s_cols) in sums.items():
                torch.testing.assert_close(s_rows, out[name].sum(1))
                torch.testing.assert_close(s_cols, out[name].sum(2))


def test_dws_layer_takes_its_inputs_sums_from_the_previous_layer() -> None:
    layer = DWSEncoder(DEEP, DWSConfig(channels=(6, 5))).double().layers[1]
    feats = {k: torch.randn(2, *shape, 6, dtype=torch.float64).relu() for k, shape in feature_shapes(DEEP).items()}
    sums = {k: (x.sum(1), x.sum(2)) for k, x in feats.items() if x.dim() == 4}
    wrong = {k: (s_rows + 1, s_cols) for k, (s_rows, s_cols) in sums.items()}
    (given, _), (computed, _), (from_wrong, _) = layer(feats, sums), layer(feats), layer(feats, wrong)
    for name in feats:
        torch.testing.assert_close(given[name], computed[name])
    assert not torch.allclose(from_wrong["bias_hh_l1"], computed["bias_hh_l1"])


@pytest.mark.parametrize("channels", [(48, 48), (4, 48), (5, 7)], ids=["48-48", "4-48", "5-7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grads", ["all", "sums-only", "no-input-grad"])
@pytest.mark.parametrize("path", ["c-kernel", "torch-ops"])
def test_linear_relu_sums_is_its_ops_one_by_one(channels, dtype: torch.dtype, grads: str, path: str) -> None:
    """The fused map layer against autograd through plain ops, forward and backward.

    48-48 and 4-48 are the paper's sizes, which the C kernel compiles apart; 10 columns
    are a block of 8 and 2 left over in its backward. `sums-only` is the last layer's
    input (only its sums are read), `no-input-grad` the first layer's (member weights)."""
    if path == "c-kernel" and cell.dws_kernels(torch.zeros(1, dtype=dtype)) is None:
        if cell.find_compiler() is None:
            pytest.skip("no C compiler: the kernels cannot be built here")
        pytest.fail("a C compiler is here but the kernels did not build (see the logged warning)")
    (I, O), (B, R, C) = channels, (3, 5, 10)
    g = torch.Generator().manual_seed(0)
    x, weight, col, row = (
        torch.randn(*shape, generator=g, dtype=dtype) for shape in ((B, R, C, I), (O, I), (B, C, O), (B, R, O))
    )
    weight /= I**0.5
    out_grads = [torch.randn(*shape, generator=g, dtype=dtype) for shape in ((B, R, C, O), (B, C, O), (B, R, O))]
    if grads == "sums-only":
        out_grads[0] = None

    def run(fused: bool):
        leaves = [t.clone().requires_grad_(grads != "no-input-grad" or i > 0) for i, t in enumerate((x, weight, col, row))]
        if fused:
            outs = linear_relu_sums(*leaves)
        else:
            y = torch.relu(leaves[0] @ leaves[1].T + leaves[2][:, None] + leaves[3][:, :, None])
            outs = (y, y.sum(1), y.sum(2))
        used = [(o, gr) for o, gr in zip(outs, out_grads) if gr is not None]
        torch.autograd.backward([o for o, _ in used], [gr for _, gr in used])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    expected = run(fused=False)
    if path == "torch-ops":
        with cell.torch_ops():
            got = run(fused=True)
    else:
        got = run(fused=True)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **tol)


def test_dws_pooled_layer_is_the_mean_of_its_output() -> None:
    """The last layer computes only the pooled means; they must be the full output's."""
    layer = DWSEncoder(DEEP, DWSConfig(channels=(6, 5))).double().layers[1]
    feats = {k: torch.randn(2, *shape, 6, dtype=torch.float64) for k, shape in feature_shapes(DEEP).items()}
    (full, _), (pooled, _) = layer(feats), layer(feats, pooled=True)
    for name in feats:
        torch.testing.assert_close(pooled[name], full[name].flatten(1, -2).mean(dim=1))


def test_dws_layer_sees_beyond_its_own_tensor() -> None:
    """Equivariance alone holds for a pointwise map; the layer must also mix tensors."""
    layer = DWSEncoder(SMALL, DWSConfig(channels=(3,))).layers[0]
    feats = to_features(SMALL, members(SMALL, 1))
    changed = dict(feats, weight_hh_l1=feats["weight_hh_l1"] + 1.0)
    (out, _), (out_changed, _) = layer(feats), layer(changed)
    for name in ("weight_ih_l0", "weight_ih_l1", "linear.weight", "bias_ih_l0"):
        assert not torch.allclose(out[name], out_changed[name])


# --------------------------------------------------------------------------- augmentation

AUGMENTED = {
    "flat": lambda spec, augment: FlatEncoder(spec, FlatConfig(hidden=(16,), augment=augment)),
    "transformer": lambda spec, augment: TransformerEncoder(
        spec, TransformerConfig(d_model=16, num_layers=2, feedforward=32, dropout=0.0, augment=augment)
    ),
}


@pytest.mark.parametrize("name", list(AUGMENTED))
@pytest.mark.parametrize("per", ["batch", "member"])
def test_training_forward_permutes_members(name: str, per: str) -> None:
    torch.manual_seed(0)
    encoder = AUGMENTED[name](SMALL, per)
    x = members(SMALL, 4)
    torch.manual_seed(7)
    z_train = encoder.train()(x)
    torch.manual_seed(7)
    if per == "batch":  # one permutation per layer, the same for every member
        perms = [p[0] for p in random_permutations(SMALL, 1)]
    else:
        perms = random_permutations(SMALL, 4)
    encoder.eval()
    torch.testing.assert_close(z_train, encoder(permute_hidden(SMALL, x, perms)))
    assert not torch.allclose(z_train, encoder(x), atol=1e-4)  # a different sample of the same members


@pytest.mark.parametrize("name", list(AUGMENTED))
def test_no_augmentation_in_eval_mode_or_when_off(name: str) -> None:
    torch.manual_seed(0)
    encoder = AUGMENTED[name](SMALL, "batch").eval()
    x = members(SMALL, 4)
    torch.manual_seed(1)
    z = encoder(x)
    torch.manual_seed(2)
    torch.testing.assert_close(encoder(x), z)
    plain = AUGMENTED[name](SMALL, "none")
    plain.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(plain.train()(x), z)


def test_augment_setting_is_checked_and_reads_old_run_folders() -> None:
    assert FlatConfig().augment == "batch"  # the reference's augmentation
    assert FlatConfig(augment=True).augment == "member"  # what True meant before the choice
    assert TransformerConfig(augment=False).augment == "none"
    with pytest.raises(ValueError, match="augment must be one of batch, member, none"):
        FlatConfig(augment="layer")


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(attention_dropout=-0.1), r"attention_dropout must be in \[0, 1\)"),
        (dict(num_heads=3), "divisible by num_heads"),
        (dict(d_model=0), "d_model must be positive"),
    ],
)
def test_transformer_config_rejects_what_cannot_build(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**bad)


def test_block_is_a_post_norm_transformer_layer() -> None:
    torch.manual_seed(0)
    block = Block(d_model=8, num_heads=2, feedforward=16, dropout=0.0, attention_dropout=0.0).eval()
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    state = block.state_dict()
    renamed = {"ff.0": "linear1", "ff.3": "linear2", "attn": "self_attn"}
    for old, new in renamed.items():
        state = {k.replace(old + ".", new + ".", 1) if k.startswith(old + ".") else k: v for k, v in state.items()}
    ref.load_state_dict(state)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(block(x), ref(x))
    torch.testing.assert_close(block(x, last_only=True), ref(x)[:, -1:])


# --------------------------------------------------------------------------- registry


def test_unknown_encoder_names_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        build_encoder("mlp", FL, "formal-languages")
    for name in ENCODERS:
        assert name in str(err.value)


def test_unknown_kind_and_setting_are_rejected() -> None:
    with pytest.raises(ValueError, match="sequential-mnist"):
        encoder_config("dws", "mnist")
    with pytest.raises(ValueError, match="channels"):
        encoder_config("dws", "formal-languages", width=3)


def test_config_overrides_are_typed() -> None:
    cfg = encoder_config("dws", "sequential-mnist", channels=[8, 8])
    assert cfg == DWSConfig(channels=(8, 8))
    assert isinstance(build_encoder("statistics", MNIST, "sequential-mnist"), StatisticsEncoder)


@pytest.mark.parametrize("kind", ["formal-languages", "sequential-mnist"])
def test_probing_encoders_are_registered(kind: str) -> None:
    pytest.importorskip("rnnrep.encoders.probing")
    assert encoder_config("interactive", kind).probe_length == (22 if kind == "formal-languages" else 50)
    assert encoder_config("noninteractive", kind, probe_length=7).probe_length == 7
    spec = FL if kind == "formal-languages" else MNIST
    expected = 1_147_030 if kind == "formal-languages" else 1_156_512
    for name in ("noninteractive", "interactive"):
        assert count_parameters(build_encoder(name, spec, kind)) == expected


def test_statistics_quantiles_equal_torch_quantile():
    from rnnrep.lstm import unflatten

    spec = LSTMSpec(3, 4, hidden_size=5)
    enc = build_encoder("statistics", spec, "formal-languages").double()
    params = torch.randn(6, spec.num_params, dtype=torch.float64)
    expected = []
    for t in unflatten(spec, params).values():
        x = t.reshape(6, -1)
        q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
        expected += [x.mean(1, keepdim=True), x.var(1, keepdim=True), torch.quantile(x, q, dim=1).T]
    torch.testing.assert_close(enc.features(params), torch.cat(expected, 1), rtol=0, atol=1e-12)


def test_statistics_feature_cache_changes_nothing():
    spec = LSTMSpec(3, 4, hidden_size=5)
    enc = build_encoder("statistics", spec, "formal-languages").double()
    params = torch.randn(6, spec.num_params, dtype=torch.float64)
    first = enc.features(params[:4])  # fills the cache for rows 0-3
    torch.testing.assert_close(first, enc.compute_features(params[:4]), rtol=0, atol=0)
    mixed = enc.features(params[[3, 5, 0, 4]])  # hits and misses together
    torch.testing.assert_close(mixed, enc.compute_features(params[[3, 5, 0, 4]]), rtol=0, atol=0)
    assert len(enc._cache) == 6
