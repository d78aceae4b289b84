"""The emulator and the emulation losses."""

import pytest
import torch
import torch.nn.functional as F

from rnnrep.emulation.emulator import Emulator, EmulatorConfig, token_inputs
from rnnrep.emulation.losses import LOSSES, emulation_loss

SMALL = EmulatorConfig(embedding_size=16, hidden_size=8, num_layers=2)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("io", "expected"), [((6, 6), 1_060_358), ((16, 10), 1_063_946)])
def test_paper_parameter_counts(io, expected):
    assert num_params(Emulator(*io, EmulatorConfig())) == expected


def test_token_inputs_drop_the_last_token():
    seq = torch.tensor([[4, 0, 1, 5], [4, 2, 5, 5]], dtype=torch.int8)
    x = token_inputs(seq, 6)
    assert x.shape == (2, 3, 6) and x.dtype == torch.float32
    assert x.argmax(-1).tolist() == [[4, 0, 1], [4, 2, 5]]


def reference_forward(emu: Emulator, z: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The reference's `EmulatorLSTM.forward`, spelled out: Linear(z) added to the first input only."""
    x = emu.input_projection(inputs)
    x = x + F.pad(emu.embedding_projection(z).unsqueeze(1), (0, 0, 0, inputs.shape[1] - 1))
    return emu.output_projection(emu.lstm(x)[0])


@pytest.mark.parametrize("io", [(6, 6), (16, 10)])
def test_folded_forward_is_the_reference_computation(io):
    torch.manual_seed(0)
    emu = Emulator(*io, SMALL).double()
    inputs = torch.rand(3, 7, io[0], dtype=torch.float64)
    z = F.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1).requires_grad_()
    out, expected = emu(z, inputs), reference_forward(emu, z, inputs)
    assert out.shape == (3, 7, io[1])
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [z, *emu.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [z, *emu.parameters()])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_z_enters_only_at_the_first_step():
    torch.manual_seed(0)
    emu = Emulator(6, 6, SMALL)
    inputs = token_inputs(torch.randint(0, 6, (3, 10)), 6)
    z1, z2 = F.normalize(torch.randn(2, 3, 16), dim=-1)
    out1, out2 = emu(z1, inputs), emu(z2, inputs)
    assert out1.shape == (3, 9, 6)
    assert not torch.allclose(out1[:, 0], out2[:, 0])
    assert not torch.allclose(out1[:, -1], out2[:, -1])  # carried through the state
    # after step 0, z has no way in: continuing with another z changes nothing
    first, state = emu.run(z1, inputs[:, :1])
    rest, _ = emu.run(z2, inputs[:, 1:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), out1)


def random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_for_identical_distributions(name):
    logits = random_logits(4, 7, 6)
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean() if name == "ce" else 0.0
    torch.testing.assert_close(emulation_loss(name, logits + 1.5, logits), torch.as_tensor(expected))


def test_total_variation_is_bounded_and_reaches_one():
    tv = LOSSES["total_variation"](random_logits(50, 6, seed=1), random_logits(50, 6, seed=2))
    assert tv.shape == (50,) and (tv >= 0).all() and (tv <= 1).all()
    disjoint = LOSSES["total_variation"](torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    torch.testing.assert_close(disjoint, torch.ones(1))


def test_kl_matches_torch_and_the_reference_direction():
    q, p = random_logits(4, 7, 6, seed=1), random_logits(4, 7, 6, seed=2)  # emulator, member
    expected = F.kl_div(q.log_softmax(-1), p.softmax(-1), reduction="none").mean(-1).mean()
    torch.testing.assert_close(emulation_loss("kl", q, p), expected)
    reverse = F.kl_div(p.log_softmax(-1), q.log_softmax(-1), reduction="none", log_target=True).mean(-1).mean()
    torch.testing.assert_close(emulation_loss("kl_reverse", q, p), reverse)


def test_js_is_symmetric_and_the_mean_of_both_kls():
    q, p = random_logits(4, 7, 6, seed=1), random_logits(4, 7, 6, seed=2)
    torch.testing.assert_close(emulation_loss("js_div", q, p), emulation_loss("js_div", p, q))
    both = (emulation_loss("kl", q, p) + emulation_loss("kl_reverse", q, p)) / 2
    torch.testing.assert_close(emulation_loss("js_div", q, p), both)


def test_float16_targets_and_gradients():
    q = random_logits(2, 5, 10).requires_grad_()
    emulation_loss("total_variation", q, random_logits(2, 5, 10, seed=3).half()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_variation"):
        emulation_loss("l3", random_logits(2, 6), random_logits(2, 6))
    with pytest.raises(ValueError, match="shapes"):
        emulation_loss("kl", random_logits(2, 6), random_logits(3, 6))
