"""D7 on exact GMMs: closed-form tilts vs scipy quadrature, normalisation, samples vs importance
weighting, multi-reward (sum) tilts, the G-OPD geometric tilt of a reward-tilted teacher, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from tests.toys._fixtures import F64, gauss_hermite_expectation, three_mode_gmm
from toys.gmm import GaussianMixture
from toys.rewards import LinearReward, QuadraticReward, sum_rewards

B_VEC = torch.tensor([0.8, -0.5], dtype=F64)
C_VEC = torch.tensor([1.0, 1.0], dtype=F64)
P_MAT = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)
P_SING = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)  # PSD, singular: reward flat in x_2

REWARDS = {
    "linear": [LinearReward(B_VEC)],
    "quadratic": [QuadraticReward(C_VEC, P_MAT)],
    "quadratic_singular": [QuadraticReward(-C_VEC, P_SING)],
    "sum": [LinearReward(B_VEC), QuadraticReward(C_VEC, P_MAT), QuadraticReward(-C_VEC, P_SING)],
}


def _np_gmm_density(p: GaussianMixture):
    """Independent numpy density of ``p`` (no torch code path) for scipy quadrature."""
    w = p.weights.numpy()
    m = p.means.numpy()
    S = p.covs.numpy()
    P = np.linalg.inv(S)
    norm = w / (2.0 * np.pi * np.sqrt(np.linalg.det(S)))

    def dens(x0: float, x1: float) -> float:
        d = np.array([x0, x1]) - m
        return float((norm * np.exp(-0.5 * np.einsum("ki,kij,kj->k", d, P, d))).sum())

    return dens


def _np_reward(rewards, weights=None):
    weights = weights or [1.0] * len(rewards)
    parts = [(float(w), *(t if isinstance(t, float) else t.numpy() for t in r.canonical())) for w, r in zip(weights, rewards)]

    def rew(x0: float, x1: float) -> float:
        x = np.array([x0, x1])
        return sum(w * (-0.5 * x @ A @ x + h @ x + r0) for w, A, h, r0 in parts)

    return rew


def _dblquad(f, lo: float = -14.0, hi: float = 14.0) -> float:
    val, _ = integrate.dblquad(lambda y, x: f(x, y), lo, hi, lo, hi, epsabs=1e-13, epsrel=1e-11)
    return val


@pytest.mark.parametrize("name", ["linear", "quadratic", "sum"])
def test_log_z_matches_scipy_quadrature(name: str) -> None:
    """Closed-form log Z = log ∫ p_ref e^{r/beta} (rel. err <= 1e-8), and the tilt integrates to 1."""
    p = three_mode_gmm()
    beta = 0.7
    rewards = REWARDS[name]
    tilted, log_z = p.tilt(rewards, beta)
    dens, rew = _np_gmm_density(p), _np_reward(rewards)
    z_quad = _dblquad(lambda x, y: dens(x, y) * math.exp(rew(x, y) / beta))
    assert abs(float(log_z) - math.log(z_quad)) <= 1e-8 * abs(math.log(z_quad))
    assert abs(math.exp(float(log_z)) - z_quad) <= 1e-8 * z_quad
    mass = _dblquad(_np_gmm_density(tilted))
    assert abs(mass - 1.0) <= 1e-8


@pytest.mark.parametrize("name", list(REWARDS))
def test_tilted_density_is_p_ref_times_exp_reward(name: str) -> None:
    p = three_mode_gmm()
    beta = 0.4
    rewards = REWARDS[name]
    tilted, log_z = p.tilt(rewards, beta)
    x = 3.0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    r = sum_rewards(rewards)(x)
    torch.testing.assert_close(tilted.log_prob(x), p.log_prob(x) + r / beta - log_z, rtol=1e-11, atol=1e-11)
    assert abs(float(tilted.weights.sum()) - 1.0) < 1e-14


def test_weighted_multi_reward_tilt_equals_tilt_by_weighted_sum() -> None:
    p = three_mode_gmm()
    rs = REWARDS["sum"]
    lam = [0.5, 2.0, 1.0]
    t1, lz1 = p.tilt_sum(rs, 0.9, lam)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    expect = p.log_prob(x) + (0.5 * rs[0](x) + 2.0 * rs[1](x) + rs[2](x)) / 0.9
    torch.testing.assert_close(t1.log_prob(x) + lz1, expect, rtol=1e-11, atol=1e-11)


def test_tilt_of_gaussian_by_linear_reward_shifts_the_mean() -> None:
    """N(m, S) e^{b^T x / beta} = N(m + S b / beta, S), log Z = b^T m/beta + b^T S b/(2 beta^2)."""
    m = torch.tensor([0.3, -1.0], dtype=F64)
    S = torch.tensor([[0.7, 0.2], [0.2, 0.5]], dtype=F64)
    p = GaussianMixture.gaussian(m, S)
    t, lz = p.tilt(LinearReward(B_VEC), 0.5)
    torch.testing.assert_close(t.means[0], m + S @ B_VEC / 0.5, rtol=0, atol=1e-14)
    torch.testing.assert_close(t.covs[0], S, rtol=0, atol=1e-14)
    assert float(lz) == pytest.approx(float(B_VEC @ m / 0.5 + B_VEC @ S @ B_VEC / (2 * 0.25)), rel=1e-14)


def test_tilted_samples_agree_with_self_normalised_importance_weighting() -> None:
    """E_{p*}[x]: exact tilted mean vs samples of the tilted GMM vs SNIS of p_ref samples."""
    from opd_ref.tilting import self_normalised_weights

    p = three_mode_gmm()
    beta = 1.0
    reward = QuadraticReward(C_VEC, 0.5 * P_MAT)
    tilted, log_z = p.tilt(reward, beta)
    mu = tilted.mean()
    n = 50_000
    xs = tilted.sample(n, torch.Generator().manual_seed(10))
    # CLT, z = 5 per coordinate (false-failure prob 5.7e-7 each): sd = sqrt(Cov_ii / n), Cov exact
    sd_direct = torch.sqrt(torch.diagonal(tilted.covariance()) / n)
    assert bool(((xs.mean(0) - mu).abs() <= 5.0 * sd_direct).all())
    xr = p.sample(n, torch.Generator().manual_seed(11))
    wbar = self_normalised_weights(reward(xr) / beta)
    snis = wbar @ xr
    # SNIS asymptotic variance: E_ref[(p*/p_ref)^2 (x - mu)^2] / n = E_{p*}[(p*/p_ref)(x - mu)^2] / n,
    # computed by Gauss-Hermite on p*; z = 5 plus the O(1/n) SNIS bias, bounded by 10/n in total.
    ratio = lambda x: torch.exp(reward(x) / beta - log_z)[:, None] * (x - mu) ** 2  # noqa: E731
    var_snis = gauss_hermite_expectation(tilted, ratio, n=30)
    sd_snis = torch.sqrt(var_snis / n)
    assert bool(((snis - mu).abs() <= 5.0 * sd_snis + 10.0 / n).all())
    # the two estimates agree with each other
    assert bool(((snis - xs.mean(0)).abs() <= 5.0 * torch.sqrt(sd_snis**2 + sd_direct**2) + 10.0 / n).all())


def test_geometric_tilt_of_reward_tilted_teacher_is_a_gmm() -> None:
    """G-OPD (D12): p_ref (p_T / p_ref)^lam with p_T = p_ref e^{r/beta}/Z is p_ref.tilt(r, beta / lam)."""
    p = three_mode_gmm()
    r = REWARDS["sum"]
    beta = 0.8
    teacher, _ = p.tilt(r, beta)
    x = 2.0 * torch.randn(30, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for lam in (0.5, 1.0, 2.0):
        target, lz = p.tilt(r, beta / lam)
        unnorm = p.log_prob(x) + lam * (teacher.log_prob(x) - p.log_prob(x))
        diff = target.log_prob(x) - unnorm  # must be a constant (-log of the normaliser)
        assert float(diff.max() - diff.min()) < 1e-10


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_beta_raises(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        three_mode_gmm().tilt(LinearReward(B_VEC), beta)


def test_bad_reward_raises() -> None:
    p = three_mode_gmm()
    with pytest.raises(ValueError, match="dimension"):
        p.tilt(LinearReward(torch.ones(3, dtype=F64)), 1.0)
    with pytest.raises(TypeError, match="reward must be"):
        p.tilt(lambda x: x.sum(-1), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive semi-definite"):
        p.tilt(QuadraticReward(C_VEC, -P_MAT), 1.0)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), beta=st.floats(0.3, 3.0), scale=st.floats(0.0, 0.5))
def test_tilt_property_on_random_mixtures(seed: int, beta: float, scale: float) -> None:
    """Random GMMs and rewards: log Z = log E_p[e^{r/beta}] (Gauss-Hermite, 120^2 nodes per component:
    peaked integrands need many nodes; 40^2 was off by 1e-5 for a curvature-6.8 reward),
    normalised weights, and the pointwise density identity."""
    from tests.toys._fixtures import random_gmm

    p = random_gmm(seed)
    g = torch.Generator().manual_seed(seed + 3)
    b = 0.5 * torch.randn(2, generator=g, dtype=F64)
    M = torch.randn(2, 2, generator=g, dtype=F64)
    rs = [LinearReward(b), QuadraticReward(torch.randn(2, generator=g, dtype=F64), scale * (M @ M.T))]
    tilted, log_z = p.tilt(rs, beta)
    total = sum_rewards(rs)
    z_gh = gauss_hermite_expectation(p, lambda x: torch.exp(total(x) / beta), n=120)
    assert abs(float(log_z) - math.log(float(z_gh))) <= 1e-8 * max(1.0, abs(float(log_z)))
    assert abs(float(tilted.weights.sum()) - 1.0) < 1e-13
    x = 2.0 * torch.randn(16, 2, generator=g, dtype=F64)
    torch.testing.assert_close(tilted.log_prob(x), p.log_prob(x) + total(x) / beta - log_z, rtol=1e-10, atol=1e-10)
