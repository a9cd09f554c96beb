"""D12: generalized OPD. The optimum p_ref (p_T / p_ref)^lambda (Gaussian closed form against a
Gauss-Legendre product grid), the objective identity J = KL(p_theta || p_lambda) - log Z, lambda = 1
is plain OPD, and the reward-tilted (mixture) case is the tilt with beta / lambda."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from opd_ref.divergences import same_cov_kl
from opd_ref.gopd import gopd_log_target, gopd_reward, gopd_sample_loss, gopd_step_loss, gopd_target_gaussian
from opd_ref.kernels import GaussianStep
from opd_ref.losses import opd_kl_loss

D = torch.float64
_X, _W = (torch.tensor(a, dtype=D) for a in np.polynomial.legendre.leggauss(240))


def _grid(*gaussians):
    """Gauss-Legendre product rule on [-L, L]^2 with L = max |mean| + 12 max std over ``(mean, cov)``
    pairs: the mass a Gaussian puts outside is below erfc(12 / sqrt 2) ~ 4e-33, and 240 nodes resolve
    every std used here (>= 0.2 at L <= 40: node spacing ~ pi L / 240), so the rule's error is at
    float64 round-off (~1e-13, checked against 400 nodes on a domain 1.5 times wider)."""
    L = max(float(m.abs().max()) + 12.0 * float(torch.linalg.eigvalsh(c).max().sqrt()) for m, c in gaussians)
    nodes = L * _X
    grid = torch.stack(torch.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    return grid, (L * _W[:, None] * L * _W[None, :]).reshape(-1)


def _spd(g, scale):
    A = torch.randn(2, 2, generator=g, dtype=D)
    return scale * (0.5 * torch.eye(2, dtype=D) + 0.3 * A @ A.T)


def _problem(seed):
    """Teacher sharper than the reference (S_ref = S_T + SPD), so p_lambda is normalisable for all
    lambda >= 0 with covariance <= S_ref."""
    g = torch.Generator().manual_seed(seed)
    S_t = _spd(g, 0.5)
    return (0.7 * torch.randn(2, generator=g, dtype=D), S_t, 0.7 * torch.randn(2, generator=g, dtype=D), S_t + _spd(g, 0.6))


@given(seed=st.integers(0, 10_000), lam=st.sampled_from([0.0, 0.3, 1.0, 1.5, 2.0]))
def test_target_matches_quadrature(seed, lam):
    m_t, S_t, m_r, S_r = _problem(seed)
    mean, cov, log_z = gopd_target_gaussian(m_t, S_t, m_r, S_r, lam)
    _GRID, _GW = _grid((m_t, S_t), (m_r, S_r), (mean, cov))
    log_tilde = gopd_log_target(
        MultivariateNormal(m_t, S_t).log_prob(_GRID), MultivariateNormal(m_r, S_r).log_prob(_GRID), lam
    )
    dens = _GW * torch.exp(log_tilde)
    z = dens.sum()
    assert abs(float(torch.log(z) - log_z)) < 1e-9
    q_mean = (dens[:, None] * _GRID).sum(0) / z
    c = _GRID - q_mean
    q_cov = (dens[:, None, None] * c[:, :, None] * c[:, None, :]).sum(0) / z
    torch.testing.assert_close(mean, q_mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(cov, q_cov, atol=1e-9, rtol=1e-9)


@given(seed=st.integers(0, 10_000), lam=st.sampled_from([0.5, 1.0, 1.5]))
def test_objective_is_kl_to_target_minus_log_z(seed, lam):
    # J(theta) = E_theta[gopd_sample_loss] (quadrature) = KL(p_theta || p_lambda) - log Z_lambda:
    # minimised exactly at p_lambda, with gradient 0 there.
    m_t, S_t, m_r, S_r = _problem(seed)
    mean, cov, log_z = gopd_target_gaussian(m_t, S_t, m_r, S_r, lam)
    g = torch.Generator().manual_seed(seed + 1)
    mu0 = torch.randn(2, generator=g, dtype=D)
    L0 = torch.linalg.cholesky(_spd(g, 0.8))
    _GRID, _GW = _grid((m_t, S_t), (m_r, S_r), (mean, cov), (mu0, L0 @ L0.T))
    lt, lr = MultivariateNormal(m_t, S_t).log_prob(_GRID), MultivariateNormal(m_r, S_r).log_prob(_GRID)

    def J(mu, L):
        p = MultivariateNormal(mu, scale_tril=L)
        lp = p.log_prob(_GRID)
        return (_GW * lp.exp() * gopd_sample_loss(lp, lt, lr, lam)).sum()

    want = kl_divergence(MultivariateNormal(mu0, scale_tril=L0), MultivariateNormal(mean, cov)) - log_z
    assert abs(float(J(mu0, L0) - want)) < 1e-8
    mu_s = mean.clone().requires_grad_(True)
    L_s = torch.linalg.cholesky(cov).requires_grad_(True)
    val = J(mu_s, L_s)
    assert abs(float(val.detach()) + float(log_z)) < 1e-8
    for gr in torch.autograd.grad(val, (mu_s, L_s)):
        assert float(gr.abs().max()) < 1e-7


def test_lambda_one_is_plain_opd():
    m_t, S_t, m_r, S_r = _problem(0)
    mean, cov, log_z = gopd_target_gaussian(m_t, S_t, m_r, S_r, 1.0)
    torch.testing.assert_close(mean, m_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cov, S_t, atol=1e-12, rtol=1e-12)
    assert abs(float(log_z)) < 1e-12
    g = torch.Generator().manual_seed(0)
    lp, lt, lr = (torch.randn(6, generator=g, dtype=D) for _ in range(3))
    torch.testing.assert_close(gopd_sample_loss(lp, lt, lr, 1.0), lp - lt)  # k1 OPD integrand
    mu = torch.randn(4, 2, generator=g, dtype=D, requires_grad=True)
    step = GaussianStep(mu, torch.full((4, 1), 0.3, dtype=D))
    mt, mr = torch.randn(4, 2, generator=g, dtype=D), torch.randn(4, 2, generator=g, dtype=D)
    torch.testing.assert_close(gopd_step_loss(step, mt, mr, 1.0), opd_kl_loss(step, mt))


@given(lam=st.floats(0.0, 3.0), seed=st.integers(0, 1000))
def test_step_loss_is_kl_to_extrapolated_kernel(lam, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, 2, generator=g, dtype=D, requires_grad=True)
    s = torch.full((3, 1), 0.4, dtype=D)
    mt, mr = torch.randn(3, 2, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)
    loss = gopd_step_loss(GaussianStep(mu, s), mt, mr, lam)
    m_lam = lam * mt + (1 - lam) * mr
    const = lam * (1 - lam) * ((mt - mr) ** 2).sum(1) / (2 * 0.4**2)
    torch.testing.assert_close(loss, same_cov_kl(mu, m_lam, s) + const, atol=1e-10, rtol=1e-10)
    step_opt = GaussianStep(m_lam.clone().requires_grad_(True), s)
    (gr,) = torch.autograd.grad(gopd_step_loss(step_opt, mt, mr, lam).sum(), step_opt.mean)
    assert float(gr.abs().max()) < 1e-10


def test_tilted_teacher_gives_tilt_with_beta_over_lambda():
    # p_ref a 1D two-component mixture, p_T = p_ref exp(r / beta) / Z (normalised on the grid):
    # log p_ref + lam log(p_T / p_ref) - (log p_ref + lam r / beta) is constant in x.
    x = 12.0 * _X
    comp = Normal(torch.tensor([-1.0, 1.5], dtype=D), torch.tensor([0.5, 0.8], dtype=D))
    log_ref = torch.logsumexp(comp.log_prob(x[:, None]) + torch.log(torch.tensor([0.3, 0.7], dtype=D)), 1)
    beta, r = 0.7, 0.9 * x
    log_t = log_ref + r / beta - torch.log((12.0 * _W * torch.exp(log_ref + r / beta)).sum())
    for lam in (0.5, 1.0, 2.0):
        diff = gopd_log_target(log_t, log_ref, lam) - (log_ref + lam * r / beta)
        assert float(diff.max() - diff.min()) < 1e-10
    torch.testing.assert_close(gopd_reward(log_t, log_ref, 2.0), 2.0 * (log_t - log_ref))


def test_bad_input():
    m, S = torch.zeros(2, dtype=D), torch.eye(2, dtype=D)
    with pytest.raises(ValueError, match="lam"):
        gopd_reward(torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), -1.0)
    with pytest.raises(ValueError, match="lam"):
        gopd_reward(torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), math.inf)
    with pytest.raises(ValueError, match="not positive definite"):
        gopd_target_gaussian(m, 4.0 * S, m, S, 2.0)  # 2/4 - 1 < 0
    with pytest.raises(ValueError, match=r"cov_ref must have shape \(2, 2\)"):
        gopd_target_gaussian(m, S, m, torch.eye(3, dtype=D), 1.5)
    with pytest.raises(ValueError, match=r"log_p_ref must have shape \(2,\)"):
        gopd_reward(torch.zeros(2, dtype=D), torch.zeros(3, dtype=D))
