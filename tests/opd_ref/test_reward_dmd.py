"""D16: R_dm (DMD as a reward) and RTDMD's hybrid gradient, exactly in float64.

Oracles: Gauss-Hermite quadrature (exact for the polynomial integrands of Gaussian generators and a
quadratic reward), autograd of closed forms written in the test (torch.distributions KL), and
Monte Carlo with a stated CLT bound for the group-std normalisation only."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from opd_ref.distribution_matching import distribution_matching_surrogate
from opd_ref.reward_dmd import (
    affine_chain_marginal,
    dmd_reward,
    gaussian_dmd_gradient,
    gaussian_dmd_variances,
    rdm_reinforce_surrogate,
    rtdmd_surrogate,
)

DT = torch.float64


def _gh_grid(n_nodes: int, n_dims: int):
    """Tensor-product probabilists' Gauss-Hermite rule: nodes (M, n_dims), weights (M,) summing to 1."""
    u, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    w = w / math.sqrt(2.0 * math.pi)
    nodes = np.array(list(itertools.product(u, repeat=n_dims)))
    weights = np.array([np.prod(c) for c in itertools.product(w, repeat=n_dims)])
    return torch.as_tensor(nodes, dtype=DT), torch.as_tensor(weights, dtype=DT)


def _log_normal(x, m, s):  # independent of opd_ref's log-prob
    return (-0.5 * ((x - m) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)


gauss = st.tuples(st.floats(-1.5, 1.5), st.floats(-1.5, 1.5), st.floats(0.5, 1.6), st.floats(0.5, 1.6))


# ------------------------------------------------------------------------------------ (i) R_dm
@settings(max_examples=15)
@given(p1=gauss, p2=gauss)
def test_reinforce_mean_equals_pathwise_dmd_and_kl_gradient(p1, p2):
    """E[-r grad log p_theta] (quadrature) = E[(s_theta - s_T)^T dx/dtheta] (quadrature) = autograd KL."""
    m0 = torch.tensor([p1[0], p2[0]], dtype=DT)
    mT = torch.tensor([p1[1], p2[1]], dtype=DT)
    s0 = torch.tensor([p1[2], p2[2]], dtype=DT)
    sT = torch.tensor([p1[3], p2[3]], dtype=DT)
    z, w = _gh_grid(40, 2)
    # REINFORCE on the reward -log(p_theta / p_T)
    m = m0.clone().requires_grad_(True)
    log_s = torch.log(s0).requires_grad_(True)
    x = (m0 + s0 * z).detach()
    log_p = _log_normal(x, m, torch.exp(log_s))
    r = dmd_reward(log_p, _log_normal(x, mT, sT))
    g_rf = torch.autograd.grad((w * rdm_reinforce_surrogate(log_p, r)).sum(), (m, log_s))
    # pathwise DMD
    m2 = m0.clone().requires_grad_(True)
    log_s2 = torch.log(s0).requires_grad_(True)
    x2 = m2 + torch.exp(log_s2) * z
    s_fake = -(x2 - m0) / s0**2
    s_real = -(x2 - mT) / sT**2
    g_pw = torch.autograd.grad((w * distribution_matching_surrogate(x2, s_fake, s_real)).sum(), (m2, log_s2))
    # closed form KL by torch.distributions
    m3 = m0.clone().requires_grad_(True)
    log_s3 = torch.log(s0).requires_grad_(True)
    kl = kl_divergence(Normal(m3, torch.exp(log_s3)), Normal(mT, sT)).sum()
    g_kl = torch.autograd.grad(kl, (m3, log_s3))
    cf = gaussian_dmd_gradient(m0, s0, mT, sT)
    for g_a, g_b, g_c, c in zip(g_rf, g_pw, g_kl, (cf["mean"], cf["log_std"])):
        torch.testing.assert_close(g_a, g_c, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g_b, g_c, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(c, g_c, rtol=1e-12, atol=1e-14)


@settings(max_examples=15)
@given(p1=gauss, p2=gauss)
def test_estimator_variances_closed_form_vs_quadrature(p1, p2):
    """Per-coordinate variance of both one-sample estimators of dKL/dm: closed form vs Gauss-Hermite
    (exact: polynomial integrands of degree <= 6)."""
    m0 = torch.tensor([p1[0], p2[0]], dtype=DT)
    mT = torch.tensor([p1[1], p2[1]], dtype=DT)
    s0 = torch.tensor([p1[2], p2[2]], dtype=DT)
    sT = torch.tensor([p1[3], p2[3]], dtype=DT)
    z, w = _gh_grid(12, 2)
    x = m0 + s0 * z
    log_ratio = _log_normal(x, m0, s0) - _log_normal(x, mT, sT)
    g_rf = log_ratio[:, None] * z / s0  # per-sample REINFORCE estimate of dKL/dm
    g_pw = -(x - m0) / s0**2 + (x - mT) / sT**2
    var = lambda g: (w[:, None] * g**2).sum(0) - ((w[:, None] * g).sum(0)) ** 2  # noqa: E731
    cf = gaussian_dmd_variances(m0, s0, mT, sT)
    torch.testing.assert_close(cf["reinforce"], var(g_rf), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cf["pathwise"], var(g_pw), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("G", [2, 3])
def test_group_mean_baseline_scales_the_mean_by_g_minus_one_over_g(G):
    """Leave-in group-mean baseline: E[(1/G) sum_i (r_i - rbar) grad log p(x_i)] = (G-1)/G grad KL,
    by exact quadrature over the G samples of a 1-D Gaussian generator."""
    m0, s0, mT, sT = (torch.tensor([v], dtype=DT) for v in (0.3, 0.8, -0.4, 1.2))
    z, w = _gh_grid(16, G)  # (M, G): one node per group member
    m = m0.clone().requires_grad_(True)
    x = (m0 + s0 * z).detach()  # (M, G)
    log_p = (-0.5 * ((x - m) / s0) ** 2)  # the parts of log p that depend on m
    r = -(_log_normal(x[..., None], m0, s0) - _log_normal(x[..., None], mT, sT))  # (M, G)
    loss = rdm_reinforce_surrogate(log_p.reshape(-1), r.reshape(-1), normalise="mean", group_size=G)
    (g,) = torch.autograd.grad((w[:, None] * loss.reshape(-1, G)).sum() / G, m)
    g_kl = gaussian_dmd_gradient(m0, s0, mT, sT)["mean"]
    torch.testing.assert_close(g, (G - 1) / G * g_kl, rtol=1e-9, atol=1e-12)
    assert abs(float(g - g_kl)) > 0.05 * abs(float(g_kl))  # the bias is visible


def test_group_std_normalisation_rescales_by_reward_std():
    """mean_std normalisation (the engine's group_advantages): with G = 64, the mean of the estimate
    times std(r) is (G-1)/G grad KL up to O(1/G); Monte Carlo over 4000 groups.

    Bound: per-group estimates of dKL/dm, times std(r), have std 0.082 at this point (measured over the
    4000 groups; no closed form with the random std): with 0.2 as bound, the mean over 4000 groups has
    std <= 0.0032 and 5 std (0.016) has two-sided false-failure probability 6e-7.  The tolerance adds
    0.02 for the O(1/G) effect of dividing by the sample std (measured 0.0036)."""
    G, n_groups = 64, 4000
    m0, s0, mT, sT = 0.3, 0.8, -0.4, 1.2
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n_groups * G, generator=gen, dtype=DT)
    m = torch.tensor(m0, dtype=DT, requires_grad=True)
    x = (m0 + s0 * z).detach()
    log_p = -0.5 * ((x - m) / s0) ** 2
    N = lambda mu, s: Normal(torch.tensor(mu, dtype=DT), torch.tensor(s, dtype=DT))  # noqa: E731
    r = -(N(m0, s0).log_prob(x) - N(mT, sT).log_prob(x))
    per_sample = torch.autograd.grad(rdm_reinforce_surrogate(log_p, r, normalise="mean_std", group_size=G).sum(), m)
    # closed-form std of r under p_theta: Var(a1 z + a2 z^2) = a1^2 + 2 a2^2
    a1, a2 = s0 * (m0 - mT) / sT**2, 0.5 * (s0**2 / sT**2 - 1.0)
    std_r = math.sqrt(a1**2 + 2 * a2**2)
    estimate = float(per_sample[0]) / (n_groups * G) * std_r
    g_kl = (m0 - mT) / sT**2
    assert abs(estimate - (G - 1) / G * g_kl) <= 0.016 + 0.02
    assert abs(estimate / std_r - g_kl) > 0.3  # without the rescaling it is far from grad KL


# ------------------------------------------------------------------------------------ (ii) RTDMD
def _chain_case():
    a = torch.tensor([[0.9], [1.1], [0.8]], dtype=DT)
    b = torch.tensor([[0.2], [-0.3], [0.5]], dtype=DT)
    return a, b


def _quadratic(c=0.7, p=1.5):
    return lambda x: -0.5 * p * ((x - c) ** 2).sum(-1)


def _objective(a, b, std, beta, m_T, v_T, c=0.7, p=1.5):
    """E[r(x_N)] - beta KL(p_theta,N || p_T) in closed form (torch.distributions KL), written anew."""
    mu, var = torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT)
    for n in range(a.shape[0]):
        mu, var = a[n] * mu + b[n], a[n] ** 2 * var + std[n] ** 2
    e_r = -0.5 * p * ((mu - c) ** 2 + var).sum()
    kl = kl_divergence(Normal(mu, var.sqrt()), Normal(m_T, v_T.sqrt())).sum()
    return e_r - beta * kl


@pytest.mark.parametrize("baseline", [0.0, -1.3])
@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_rtdmd_hybrid_gradient_is_unbiased(beta, baseline):
    """E[hybrid] (Gauss-Hermite over x_0 and the two stochastic steps' noise: polynomial integrand, exact)
    equals autograd of E[r] - beta KL in closed form, for every parameter."""
    std = (0.5, 0.4, 0.0)
    m_T, v_T = torch.tensor([0.4], dtype=DT), torch.tensor([0.9], dtype=DT)
    nodes, w = _gh_grid(10, 3)
    noise = torch.cat([nodes.T[:, :, None], torch.zeros(1, nodes.shape[0], 1, dtype=DT)])  # (4, M, 1)
    a0, b0 = _chain_case()
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    loss = rtdmd_surrogate(a, b, std, noise, _quadratic(), baseline=baseline, beta=beta, teacher=(m_T, v_T))
    g = torch.autograd.grad((w * loss).sum(), (a, b))
    a2, b2 = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    g_ref = torch.autograd.grad(-_objective(a2, b2, std, beta, m_T, v_T), (a2, b2))
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_affine_chain_marginal_against_sampling_recursion():
    """Closed-form marginal of x_N vs the mean/variance of the chain's states under quadrature."""
    std = (0.5, 0.4, 0.3)
    a, b = _chain_case()
    nodes, w = _gh_grid(6, 4)
    x = nodes[:, 0:1]
    for n in range(3):
        x = a[n] * x + b[n] + std[n] * nodes[:, n + 1:n + 2]
    mean = (w[:, None] * x).sum(0)
    var = (w[:, None] * x**2).sum(0) - mean**2
    mu, v = affine_chain_marginal(a, b, std)
    torch.testing.assert_close(mu, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, var, rtol=1e-12, atol=1e-12)


def test_pure_reinforce_is_unbiased_for_the_last_step_shift():
    """With a stochastic last step (std s_N > 0) pure REINFORCE estimates the same d E[r] / d b_{N-1}
    (that derivative does not depend on s_N), exactly under quadrature."""
    std = (0.5, 0.4, 0.3)
    nodes, w = _gh_grid(8, 4)
    noise = nodes.T[:, :, None]
    a0, b0 = _chain_case()
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    loss = rtdmd_surrogate(a, b, std, noise, _quadratic(), pathwise_last=False)
    g = torch.autograd.grad((w * loss).sum(), (a, b))
    a2, b2 = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    g_ref = torch.autograd.grad(-_objective(a2, b2, std, 0.0, torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT)), (a2, b2))
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_rtdmd_rejects_inconsistent_settings():
    a, b = _chain_case()
    noise = torch.zeros(4, 2, 1, dtype=DT)
    with pytest.raises(ValueError, match="std\\[-1\\]"):
        rtdmd_surrogate(a, b, (0.5, 0.4, 0.3), noise, _quadratic())
    with pytest.raises(ValueError, match="noise"):
        rtdmd_surrogate(a, b, (0.5, 0.4, 0.0), noise[:3], _quadratic())
    with pytest.raises(ValueError, match="beta"):
        rtdmd_surrogate(a, b, (0.5, 0.4, 0.0), noise, _quadratic(), beta=1.0)
    with pytest.raises(ValueError, match="group_size"):
        rdm_reinforce_surrogate(torch.zeros(6, dtype=DT), torch.zeros(6, dtype=DT), normalise="mean", group_size=4)
