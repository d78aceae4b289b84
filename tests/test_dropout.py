"""`rnnrep.dropout`: nn.Dropout's op on a hashed mask (C kernel on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnrep import cell
from rnnrep.dropout import Dropout, dropout

requires_kernel = pytest.mark.skipif(cell.library() is None, reason="no C compiler: dropout is torch's")


def _sd(n: int, p: float) -> float:
    return (p * (1 - p) / n) ** 0.5


@requires_kernel
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_one_minus_p_and_scales_survivors(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    y = dropout(x, p, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * _sd(x.numel(), p)
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)


@requires_kernel
def test_mask_has_no_pattern_along_the_tensor():
    """Drop rates agree between halves, even and odd positions, and rows; drops are independent of neighbours."""
    torch.manual_seed(1)
    p, x = 0.1, torch.ones(512, 2048)
    dropped = (dropout(x, p, training=True) == 0).float()
    n = x.numel() // 2
    for part in (dropped[:256], dropped[256:], dropped[:, ::2], dropped[:, 1::2]):
        assert abs(part.mean().item() - p) < 5 * _sd(n, p)
    both = (dropped[:, 1:] * dropped[:, :-1]).mean().item()  # neighbours both dropped: p^2
    assert abs(both - p * p) < 5 * _sd(dropped[:, 1:].numel(), p * p)
    assert dropped.sum(1).std().item() < 2 * (2048 * p * (1 - p)) ** 0.5  # rows binomial, not clumped


@requires_kernel
def test_follows_torch_seed_and_differs_between_calls():
    x = torch.ones(100_000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.3, True), dropout(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, True), a)
    both = ((a == 0) & (b == 0)).float().mean().item()  # independent masks: 0.09
    assert abs(both - 0.09) < 5 * _sd(x.numel(), 0.09)


@requires_kernel
def test_gradient_uses_the_forward_mask():
    torch.manual_seed(4)
    x = torch.randn(64, 33, requires_grad=True)
    w = torch.randn(64, 33)
    y = dropout(x, 0.25, training=True)
    (y * w).sum().backward()
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(kept, w * (1 / 0.75), torch.zeros_like(w)), rtol=0, atol=0)


def test_identity_when_evaluating_or_p_zero():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    module = Dropout(0.5).eval()
    assert module(x) is x


def test_torch_dropout_where_the_kernel_does_not_apply():
    x = torch.ones(1000, dtype=torch.float64)
    torch.manual_seed(5)
    want = F.dropout(x, 0.2, training=True)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2, training=True), want)  # float64: torch's own
    x32 = torch.ones(1000)
    with cell.torch_ops():
        torch.manual_seed(5)
        got = dropout(x32, 0.2, training=True)
    torch.manual_seed(5)
    assert torch.equal(got, F.dropout(x32, 0.2, training=True))
    assert torch.equal(dropout(x32, 1.0, training=True), torch.zeros(1000))


def test_rejects_a_probability_outside_0_1():
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)
    with pytest.raises(ValueError):
        dropout(torch.ones(3), -0.1, training=True)


@requires_kernel
def test_bfloat16_has_the_float32_mask_and_rounds_once():
    x = torch.randn(300_000)
    torch.manual_seed(6)
    y32 = dropout(x, 0.3, True)
    torch.manual_seed(6)
    y16 = dropout(x.bfloat16(), 0.3, True)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16 != 0, y32 != 0)
    # survivors: bfloat16(x) * scale computed in float32, rounded to nearest even like torch does
    assert torch.equal(y16, (x.bfloat16().float() * (1 / 0.7)).bfloat16() * (y32 != 0))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38], dtype=torch.bfloat16)
    torch.manual_seed(7)
    got = dropout(special.repeat(1000), 0.5, True).view(1000, 4)
    nan = got[:, 0]
    assert (nan.isnan() | (nan == 0)).all() and nan.isnan().any() and (nan == 0).any()  # NaN stays NaN
    assert (got[:, 1][got[:, 1] != 0] == float("inf")).all() and (got[:, 2][got[:, 2] != 0] == -float("inf")).all()
    assert (got[:, 3][got[:, 3] != 0] == float("inf")).all()  # 3e38 * 2 overflows, as in torch
