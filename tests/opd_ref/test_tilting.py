"""D7: KL(q || p*) = KL(q || p_ref) - E_q[r]/beta + log Z (pointwise, in expectation, in gradient) and
the importance-weighted reward estimator, on exact Gaussians / GMMs from ``toys``."""

from __future__ import annotations

import pytest
import torch

from opd_ref.tilting import (
    importance_weighted_reward,
    log_partition_estimate,
    self_normalised_weights,
    tilted_kl_decomposition,
    tilted_log_ratio,
)
from tests.toys._fixtures import F64, gauss_hermite_expectation, three_mode_gmm
from toys.gmm import GaussianMixture, gaussian_kl
from toys.rewards import LinearReward, QuadraticReward, sum_rewards

REWARD = sum_rewards(
    [LinearReward(torch.tensor([0.8, -0.5], dtype=F64)),
     QuadraticReward(torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64))]
)
BETA = 0.7


def _qs():
    """Several models q: single Gaussians and a two-component mixture."""
    e = torch.eye(2, dtype=F64)
    return [
        GaussianMixture.gaussian(torch.tensor([0.0, 0.5], dtype=F64), 0.8 * e),
        GaussianMixture.gaussian(torch.tensor([1.5, -0.5], dtype=F64), torch.tensor([[0.3, 0.1], [0.1, 0.5]], dtype=F64)),
        GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), torch.tensor([[-1.0, 0.0], [1.0, 1.0]], dtype=F64),
                        torch.stack([0.5 * e, 0.3 * e])),
    ]


def _expected_quadratic_reward(q: GaussianMixture) -> torch.Tensor:
    """Closed form E_q[-1/2 x^T A x + h^T x + r0] = sum_k w_k (-1/2 (tr(A S_k) + m_k^T A m_k) + h^T m_k) + r0."""
    A, h, r0 = REWARD.canonical()
    quad = torch.einsum("ij,kji->k", A, q.covs) + torch.einsum("ki,ij,kj->k", q.means, A, q.means)
    return q.weights @ (-0.5 * quad + q.means @ h) + r0


@pytest.mark.parametrize("iq", [0, 1, 2])
def test_decomposition_pointwise(iq: int) -> None:
    p_ref = three_mode_gmm()
    p_star, log_z = p_ref.tilt(REWARD, BETA)
    q = _qs()[iq]
    x = q.sample(64, torch.Generator().manual_seed(iq))
    lhs = q.log_prob(x) - p_star.log_prob(x)
    rhs = tilted_log_ratio(q.log_prob(x), p_ref.log_prob(x), REWARD(x), BETA, log_z)
    torch.testing.assert_close(rhs, lhs, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("iq", [0, 1, 2])
def test_decomposition_in_expectation(iq: int) -> None:
    """Each term by its own exact route: Gauss-Hermite (n = 40, float64) for the KLs, closed form for E_q[r]."""
    p_ref = three_mode_gmm()
    p_star, log_z = p_ref.tilt(REWARD, BETA)
    q = _qs()[iq]
    kl_star = gauss_hermite_expectation(q, lambda x: q.log_prob(x) - p_star.log_prob(x))
    kl_ref = gauss_hermite_expectation(q, lambda x: q.log_prob(x) - p_ref.log_prob(x))
    e_r = _expected_quadratic_reward(q)
    torch.testing.assert_close(gauss_hermite_expectation(q, REWARD), e_r, rtol=1e-12, atol=1e-12)
    decomposed = tilted_kl_decomposition(kl_ref, e_r, BETA, log_z)
    assert abs(float(decomposed - kl_star)) <= 1e-9 * max(1.0, abs(float(kl_star)))
    assert float(kl_star) > 0


def test_decomposition_exact_for_gaussians_and_its_gradient() -> None:
    """Gaussian p_ref, q: every term closed form; grad_theta KL(q||p*) = grad of the decomposition."""
    p_ref = GaussianMixture.gaussian(torch.tensor([0.2, -0.3], dtype=F64),
                                     torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=F64))
    p_star, log_z = p_ref.tilt(REWARD, BETA)
    mean = torch.tensor([0.5, 0.1], dtype=F64, requires_grad=True)
    tril = torch.tensor([[0.7, 0.0], [0.2, 0.5]], dtype=F64, requires_grad=True)
    q = GaussianMixture.from_params(torch.zeros(1, dtype=F64), mean[None], tril[None])
    kl_star = gaussian_kl(q, p_star)
    dec = tilted_kl_decomposition(gaussian_kl(q, p_ref), _expected_quadratic_reward(q), BETA, log_z)
    assert abs(float((dec - kl_star).detach())) <= 1e-12 * max(1.0, float(kl_star.detach()))
    g1 = torch.autograd.grad(kl_star, (mean, tril), retain_graph=True)
    g2 = torch.autograd.grad(dec, (mean, tril))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert float(torch.cat([g.flatten() for g in g1]).abs().max()) > 1e-3  # non-trivial gradient


def test_decomposition_gradient_on_a_gmm_reference() -> None:
    """GMM p_ref (no closed-form KL): Gauss-Hermite with reparameterised nodes, gradients agree."""
    p_ref = three_mode_gmm()
    p_star, log_z = p_ref.tilt(REWARD, BETA)
    mean = torch.tensor([0.5, 0.1], dtype=F64, requires_grad=True)
    tril = torch.tensor([[0.6, 0.0], [0.1, 0.4]], dtype=F64, requires_grad=True)
    q = GaussianMixture.from_params(torch.zeros(1, dtype=F64), mean[None], tril[None])
    kl_star = gauss_hermite_expectation(q, lambda x: q.log_prob(x) - p_star.log_prob(x))
    kl_ref = gauss_hermite_expectation(q, lambda x: q.log_prob(x) - p_ref.log_prob(x))
    dec = tilted_kl_decomposition(kl_ref, gauss_hermite_expectation(q, REWARD), BETA, log_z)
    g1 = torch.autograd.grad(kl_star, (mean, tril), retain_graph=True)
    g2 = torch.autograd.grad(dec, (mean, tril))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_importance_weighted_reward_is_unbiased() -> None:
    """E_ref[(q/p_ref) r] = E_q[r]; bound from the quadrature variance E_q[(q/p_ref) r^2] - E_q[r]^2."""
    p_ref = three_mode_gmm()
    # q = N(m_2 + shift, S_2 / 2): q^2 / p_ref <= q^2 / (w_2 N_2) is integrable since 2 S_q^{-1} - S_2^{-1} > 0,
    # so the importance weights have finite variance
    q = GaussianMixture.gaussian(p_ref.means[1] + torch.tensor([0.2, -0.1], dtype=F64), 0.5 * p_ref.covs[1])
    n = 40_000
    x = p_ref.sample(n, torch.Generator().manual_seed(3))
    est, se = importance_weighted_reward(q.log_prob(x), p_ref.log_prob(x), REWARD(x))
    exact = _expected_quadratic_reward(q)
    second = gauss_hermite_expectation(q, lambda y: torch.exp(q.log_prob(y) - p_ref.log_prob(y)) * REWARD(y) ** 2)
    sd = torch.sqrt((second - exact**2) / n)
    # CLT, z = 5: two-sided false-failure probability 5.7e-7
    assert abs(float(est - exact)) <= 5.0 * float(sd)
    assert 0.5 < float(se / sd) < 2.0  # the reported standard error estimates the true one


def test_log_partition_estimate_and_snis_weights() -> None:
    p_ref = three_mode_gmm()
    _, log_z = p_ref.tilt(REWARD, BETA)
    n = 40_000
    x = p_ref.sample(n, torch.Generator().manual_seed(5))
    r = REWARD(x)
    w = self_normalised_weights(r / BETA)
    assert abs(float(w.sum()) - 1.0) < 1e-12 and bool((w >= 0).all())
    # Var of the mean of e^{r/beta}/Z under p_ref = E_ref[e^{2r/beta}]/Z^2 - 1 = E_{p*}[e^{r/beta}]/Z - 1;
    # delta method for the log, z = 5, plus 10/n for the Jensen bias.
    p_star, _ = p_ref.tilt(REWARD, BETA)
    rel_var = gauss_hermite_expectation(p_star, lambda y: torch.exp(REWARD(y) / BETA - log_z)) - 1.0
    tol = 5.0 * float(torch.sqrt(rel_var / n)) + 10.0 / n
    assert abs(float(log_partition_estimate(r, BETA) - log_z)) <= tol


def test_bad_input() -> None:
    v = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="beta"):
        tilted_log_ratio(v, v, v, 0.0, 0.0)
    with pytest.raises(ValueError, match="beta"):
        tilted_kl_decomposition(1.0, 1.0, -2.0, 0.0)
    with pytest.raises(ValueError, match=r"reward must have shape \(3,\)"):
        importance_weighted_reward(v, v, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="log_w"):
        self_normalised_weights(torch.zeros(2, 2, dtype=F64))
    with pytest.raises(TypeError, match="beta"):
        log_partition_estimate(v, "1")  # type: ignore[arg-type]
