"""Concave quadratic rewards: canonical form, gradient, sums, bad input."""

from __future__ import annotations

import pytest
import torch

from toys.rewards import LinearReward, QuadraticFormReward, QuadraticReward, sum_rewards

F64 = torch.float64


def test_linear_and_quadratic_values_and_gradients() -> None:
    b = torch.tensor([1.0, -2.0], dtype=F64)
    c = torch.tensor([0.5, 1.0], dtype=F64)
    P = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    lin, quad = LinearReward(b), QuadraticReward(c, P)
    torch.testing.assert_close(lin(x), x @ b, rtol=0, atol=1e-14)
    expect = -0.5 * torch.einsum("bi,ij,bj->b", x - c, P, x - c)
    torch.testing.assert_close(quad(x), expect, rtol=0, atol=1e-13)
    for r in (lin, quad, lin + quad, 0.5 * quad):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(r(xr).sum(), xr)
        torch.testing.assert_close(r.grad(x), g, rtol=0, atol=1e-13)


def test_sum_rewards_is_pointwise_sum() -> None:
    rs = [
        LinearReward(torch.tensor([1.0, 0.0], dtype=F64)),
        QuadraticReward(torch.tensor([0.0, 1.0], dtype=F64), torch.eye(2, dtype=F64)),
        QuadraticReward(torch.tensor([-1.0, 0.0], dtype=F64), torch.diag(torch.tensor([1.0, 0.0], dtype=F64))),
    ]
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    total = sum_rewards(rs, [0.5, 2.0, 1.0])
    torch.testing.assert_close(total(x), 0.5 * rs[0](x) + 2.0 * rs[1](x) + rs[2](x), rtol=0, atol=1e-13)
    assert isinstance(total, QuadraticFormReward)


def test_bad_rewards_raise() -> None:
    with pytest.raises(ValueError, match="positive semi-definite"):
        QuadraticReward(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=F64))
    with pytest.raises(ValueError, match="symmetric"):
        QuadraticReward(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"P must have shape \(2, 2\)"):
        QuadraticReward(torch.zeros(2, dtype=F64), torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=r"b must have shape \(d,\)"):
        LinearReward(torch.zeros(2, 2, dtype=F64))
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        LinearReward([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w >= 0"):
        -1.0 * LinearReward(torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        LinearReward(torch.ones(2, dtype=F64))(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="non-empty"):
        sum_rewards([])
