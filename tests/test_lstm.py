"""The functional zoo-member LSTM: agreement with torch.nn, the fused backward,
the flat layout, the hidden-neuron symmetry, and member independence.

Every test runs twice: with the C cell kernel (`rnnrep/cell.py`) and with the same
math in torch ops (what GPUs and machines without a compiler run).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnrep import lstm
from rnnrep.lstm import LSTMSpec

pytestmark = pytest.mark.usefixtures("cell_path")  # every test on both cell paths (conftest)


SPECS = [LSTMSpec(6, 6), LSTMSpec(16, 10), LSTMSpec(3, 2, hidden_size=5, num_layers=3)]


def _params(spec, k, seed=0, dtype=torch.float32):
    return lstm.init_params(spec, [torch.Generator().manual_seed(seed + i) for i in range(k)]).to(dtype)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("impl", lstm.IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_torch_modules(spec, impl, dtype, tol):
    K, B, T = 3, 4, 7
    g = torch.Generator().manual_seed(1)
    flat = _params(spec, K, dtype=dtype)
    x = torch.randn(K, B, T, spec.input_size, generator=g, dtype=dtype)
    h0 = torch.randn(spec.num_layers, K, B, spec.hidden_size, generator=g, dtype=dtype)
    c0 = torch.randn(h0.shape, generator=g, dtype=dtype)
    logits, (h, c) = lstm.forward(spec, flat, x, (h0, c0), impl=impl)
    for k in range(K):
        mod, lin = lstm.to_modules(spec, flat[k])
        mod, lin = mod.to(dtype), lin.to(dtype)
        with torch.no_grad():
            lstm.unflatten(spec, flat)  # layout sanity: to_modules copied from these views
            for name, p in list(mod.named_parameters()) + [("linear." + n, p) for n, p in lin.named_parameters()]:
                p.copy_(lstm.unflatten(spec, flat[k])[name])  # float64 without a float32 round trip
            out, (hk, ck) = mod(x[k], (h0[:, k].contiguous(), c0[:, k].contiguous()))
            torch.testing.assert_close(logits[k], lin(out), atol=tol, rtol=tol)
            torch.testing.assert_close(h[:, k], hk, atol=tol, rtol=tol)
            torch.testing.assert_close(c[:, k], ck, atol=tol, rtol=tol)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("frozen", [None, "weights", "inputs"])  # weights frozen: members as data (probing)
def test_fused_gradients_match_autograd(spec, with_state, frozen):
    K, B, T = 3, 4, 6
    g = torch.Generator().manual_seed(2)
    flat = _params(spec, K, dtype=torch.float64)
    x = torch.randn(K, B, T, spec.input_size, generator=g, dtype=torch.float64)
    shape = (spec.num_layers, K, B, spec.hidden_size)
    h0, c0 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    w_out = torch.randn(K, B, T, spec.output_size, generator=g, dtype=torch.float64)
    w_h, w_c = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    grads = {}
    for impl in lstm.IMPLS:
        tensors = [t.clone() for t in ((flat, x, h0, c0) if with_state else (flat, x))]
        leaves = [t.requires_grad_() for i, t in enumerate(tensors) if (frozen, i) not in (("weights", 0), ("inputs", 1))]
        state = tuple(tensors[2:]) if with_state else None
        logits, (h, c) = lstm.forward(spec, tensors[0], tensors[1], state, impl=impl)
        on_outputs = (logits.tanh() * w_out).sum()
        on_state = (h * w_h).sum() + (c.sin() * w_c).sum()
        grads[impl] = [
            torch.autograd.grad(loss, leaves, retain_graph=True) for loss in (on_outputs, on_state, on_outputs + on_state)
        ]
    for fused, ref in zip(grads["fused"], grads["autograd"]):
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_step_carries_state_differentiably():
    spec = LSTMSpec(4, 3)
    flat = _params(spec, 2, dtype=torch.float64).requires_grad_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    whole, _ = lstm.forward(spec, flat, x)
    state, steps = None, []
    for t in range(3):
        out, state = lstm.step(spec, flat, x[:, :, t], state)
        steps.append(out)
    stepped = torch.stack(steps, dim=2)
    torch.testing.assert_close(stepped, whole, atol=1e-12, rtol=1e-12)
    ga = torch.autograd.grad(whole.sum(), (flat, x))
    gb = torch.autograd.grad(stepped.sum(), (flat, x))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 6), st.integers(1, 3)),
    lead=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_flat_named_round_trip(sizes, lead, seed):
    spec = LSTMSpec(*sizes)
    flat = torch.randn(*lead, spec.num_params, generator=torch.Generator().manual_seed(seed))
    named = lstm.unflatten(spec, flat)
    assert [n for n in named] == [t.name for t in spec.tensors]
    assert all(named[t.name].shape == (*lead, *t.shape) for t in spec.tensors)
    assert torch.equal(lstm.flatten(spec, named), flat)


@pytest.mark.parametrize("spec", SPECS)
def test_modules_round_trip(spec):
    flat = _params(spec, 1)[0]
    mod, lin = lstm.to_modules(spec, flat)
    assert torch.equal(lstm.from_modules(mod, lin), flat)
    assert [n for n, _ in mod.named_parameters()] + ["linear." + n for n, _ in lin.named_parameters()] == [
        t.name for t in spec.tensors
    ]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("layer", range(3))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_hidden_permutation_keeps_the_function(spec, layer, dtype, tol):
    """DWSNets-style: a random permutation of one layer's hidden neurons per member."""
    if layer >= spec.num_layers:
        pytest.skip("no such layer")
    K = 4
    g = torch.Generator().manual_seed(10 + layer)
    flat = _params(spec, K, dtype=dtype)
    perms = [torch.arange(spec.hidden_size).expand(K, -1) for _ in range(spec.num_layers)]
    perms[layer] = lstm.random_permutations(spec, K, g)[layer]
    assert any(not torch.equal(p, torch.arange(spec.hidden_size)) for p in perms[layer])
    permuted = lstm.permute_hidden(spec, flat, perms)
    assert not torch.equal(permuted, flat)
    x = torch.randn(K, 3, 5, spec.input_size, generator=g, dtype=dtype)
    torch.testing.assert_close(lstm.forward(spec, permuted, x)[0], lstm.forward(spec, flat, x)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("spec", SPECS)
def test_permutation_index_is_the_shared_permutation(spec):
    """One gather by `permutation_index` permutes every member as `permute_hidden` does."""
    g = torch.Generator().manual_seed(5)
    flat = _params(spec, 3)
    perms = [p[0] for p in lstm.random_permutations(spec, 1, g)]
    index = lstm.permutation_index(spec, perms)
    assert sorted(index.tolist()) == list(range(spec.num_params))
    assert torch.equal(flat[:, index], lstm.permute_hidden(spec, flat, perms))


@pytest.mark.parametrize("spec", SPECS[:2])
@pytest.mark.parametrize("impl", lstm.IMPLS)
def test_members_are_independent_bitwise(spec, impl):
    """A member run alone gives bit-identical outputs, state and gradient to the same
    member run among others (per-member matmuls and elementwise ops on this CPU)."""
    K, B, T = 5, 32, 9
    g = torch.Generator().manual_seed(3)
    flat = _params(spec, K)
    x = torch.randn(K, B, T, spec.input_size, generator=g)

    def run(f, xx):
        f = f.clone().requires_grad_()
        logits, (h, c) = lstm.forward(spec, f, xx, impl=impl)
        (logits.square().sum() + h.sum() + c.sum()).backward()
        return logits.detach(), h.detach(), c.detach(), f.grad

    together = run(flat, x)
    for k in (0, 3):
        alone = run(flat[k : k + 1], x[k : k + 1])
        assert torch.equal(alone[0][0], together[0][k])
        assert torch.equal(alone[1][:, 0], together[1][:, k])
        assert torch.equal(alone[2][:, 0], together[2][:, k])
        assert torch.equal(alone[3][0], together[3][k])


def test_no_grad_forward_matches_grad_forward():
    spec = LSTMSpec(6, 6)
    flat = _params(spec, 3)
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = lstm.forward(spec, flat, x)
    b = lstm.forward(spec, flat.clone().requires_grad_(), x)
    assert torch.equal(a[0], b[0].detach())
    assert torch.equal(a[1][0], b[1][0].detach()) and torch.equal(a[1][1], b[1][1].detach())


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]])
def test_stepper_matches_forward(spec):
    """The sampler's cached-weight steps give the no-grad forward's outputs and state."""
    K, N, T = 3, 5, 4
    g = torch.Generator().manual_seed(5)
    flat = _params(spec, K)
    x = torch.randn(K, N, T, spec.input_size, generator=g)
    with torch.no_grad():
        whole, (h, c) = lstm.forward(spec, flat, x)
    stepper = lstm.Stepper(spec, flat, N)
    for rep in range(2):  # reset() starts over from the zero state
        steps = [stepper(x[:, :, t].transpose(1, 2)).transpose(1, 2) for t in range(T)]
        torch.testing.assert_close(torch.stack(steps, dim=2), whole, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(stepper.c.transpose(2, 3), c, atol=1e-6, rtol=1e-6)
        stepper.reset()
    # a member alone steps bit-identically to the same member among others
    alone = lstm.Stepper(spec, flat[1:2], N)
    for t in range(T):
        xt = x[:, :, t].transpose(1, 2)
        assert torch.equal(alone(xt[1:2])[0], stepper(xt)[1])
