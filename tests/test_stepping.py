"""The stepped core (`rnnrep.encoders.stepping`) against `torch.lstm_cell`, values and gradients."""

import pytest
import torch
from torch import nn

from rnnrep.encoders.stepping import SteppedLSTM

pytestmark = pytest.mark.usefixtures("cell_path")  # every test on both cell paths (conftest)


def _reference(layers, residual, x_steps, state):
    """The same stack run as plain `torch.lstm_cell` autograd ops."""
    outs = []
    for x in x_steps:
        new = []
        for l, layer in enumerate(layers):
            hc = state[l] if state is not None else (x.new_zeros(x.shape[0], layer.hidden_size),) * 2
            h, c = torch.lstm_cell(x, hc, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
            new.append((h, c))
            x = h + x if residual else h
        state = new
        outs.append(x)
    return outs, state


def _stepped(layers, residual, x_steps, state):
    stepper = SteppedLSTM(layers, residual)
    outs = []
    for x in x_steps:
        out, state = stepper(x, state)
        outs.append(out)
    return outs, state


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("learned_start", [False, True])
def test_matches_lstm_cell_values_and_gradients(residual, learned_start):
    torch.manual_seed(0)
    B, H, T = 5, 6, 4
    layers = nn.ModuleList(nn.LSTM(H, H, batch_first=True) for _ in range(3)).double()
    x_steps = [torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(T)]
    h0 = torch.randn(3, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, B, H, dtype=torch.float64, requires_grad=True)
    state = list(zip(h0, c0)) if learned_start else None
    leaves = [*x_steps, *layers.parameters()] + ([h0, c0] if learned_start else [])

    def loss(run):
        outs, (last, *_) = run(layers, residual, x_steps, state)
        w = torch.linspace(-1, 1, B * H, dtype=torch.float64).view(B, H)
        # every output, and the first layer's final h and c, so all gradient paths count
        return sum(((o * w).sum() for o in outs), (last[0] * w).sum() + last[1].pow(2).sum())

    ref, got = loss(_reference), loss(_stepped)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_no_input_gradient_when_the_input_needs_none():
    layers = nn.ModuleList(nn.LSTM(4, 4) for _ in range(2))
    x = torch.randn(3, 4)
    out, _ = SteppedLSTM(layers, residual=True)(x)
    out.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in layers.parameters())


def test_a_second_backward_through_the_same_rollout_gets_the_same_gradients():
    """The deferred sums are handed over and reset, so nothing carries into the next backward."""
    torch.manual_seed(1)
    layers = nn.ModuleList(nn.LSTM(4, 4) for _ in range(2))
    outs, _ = _stepped(layers, True, [torch.randn(3, 4)] * 3, None)
    loss = torch.stack(outs).sum()
    first = torch.autograd.grad(loss, list(layers.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(layers.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_frozen_weights_still_pass_the_input_gradient():
    torch.manual_seed(2)
    layers = nn.ModuleList(nn.LSTM(4, 4) for _ in range(2)).double().requires_grad_(False)
    x_steps = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grads = []
    for run in (_reference, _stepped):
        outs, _ = run(layers, True, x_steps, None)
        grads.append(torch.autograd.grad(torch.stack(outs).pow(2).sum(), x_steps))
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in layers.parameters())
