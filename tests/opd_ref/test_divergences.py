"""D1: Gaussian log-densities and closed-form KLs (opd_ref.divergences).

Oracles: torch.distributions (Independent Normal), autograd gradcheck, a Monte-Carlo mean with a
CLT bound from the closed-form variance.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, kl_divergence

from opd_ref.divergences import (
    cps_log_prob_flowgrpo,
    diag_gaussian_kl,
    flowgrpo_step_kl,
    gaussian_log_prob,
    gaussian_log_prob_dim_mean,
    same_cov_kl,
)
from opd_ref.kernels import GaussianStep, cps_step, sde_std_t, sde_step

F64 = torch.float64


def _means(seed, shape=(5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


def _indep(mean, std):
    return Independent(Normal(mean, std.expand_as(mean)), mean.dim() - 1)


def test_same_cov_kl_equals_torch_distributions():
    m_p, m_q = _means(0)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0, 7.0], dtype=F64)[:, None, None]
    ref = kl_divergence(_indep(m_p, std), _indep(m_q, std))
    torch.testing.assert_close(same_cov_kl(m_p, m_q, std), ref, rtol=1e-13, atol=0)
    # the same std given as (B,), as a float
    torch.testing.assert_close(same_cov_kl(m_p, m_q, std.flatten()), ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        same_cov_kl(m_p, m_q, 0.3), kl_divergence(_indep(m_p, torch.tensor(0.3, dtype=F64)), _indep(m_q, torch.tensor(0.3, dtype=F64))),
        rtol=1e-13, atol=0,
    )


def test_diag_gaussian_kl_equals_torch_distributions_and_reduces_to_d1():
    m_p, m_q = _means(1)
    g = torch.Generator().manual_seed(2)
    s_p = torch.rand(5, 3, 4, generator=g, dtype=F64) + 0.2
    s_q = torch.rand(5, 3, 4, generator=g, dtype=F64) + 0.2
    ref = kl_divergence(_indep(m_p, s_p), _indep(m_q, s_q))
    torch.testing.assert_close(diag_gaussian_kl(m_p, s_p, m_q, s_q), ref, rtol=1e-12, atol=0)
    # equal stds: the general form is exactly the same-covariance form
    assert torch.equal(diag_gaussian_kl(m_p, s_p, m_q, s_p), same_cov_kl(m_p, m_q, s_p))


def test_gaussian_log_prob_equals_torch_distributions_and_dim_mean_divides_by_d():
    m, x = _means(3)
    std = torch.tensor([0.2, 0.5, 1.0, 1.5, 3.0], dtype=F64)[:, None, None]
    step = GaussianStep(m, std)
    ref = _indep(m, std).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, step), ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gaussian_log_prob_dim_mean(x, step), ref / 12, rtol=1e-13, atol=0)


def test_same_cov_kl_is_zero_iff_means_equal():
    m_p, m_q = _means(4)
    assert torch.equal(same_cov_kl(m_p, m_p.clone(), 0.7), torch.zeros(5, dtype=F64))
    m_q = m_p.clone()
    m_q[2, 1, 3] += 1e-6  # one coordinate of one sample differs
    kl = same_cov_kl(m_p, m_q, 0.7)
    assert float(kl[2]) > 0 and bool((kl[[0, 1, 3, 4]] == 0).all())


@given(
    batch=st.integers(1, 4),
    event=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    std=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**31 - 1),
    equal=st.booleans(),
)
def test_same_cov_kl_property(batch, event, std, seed, equal):
    g = torch.Generator().manual_seed(seed)
    m_p = torch.randn(batch, *event, generator=g, dtype=F64)
    m_q = m_p.clone() if equal else torch.randn(batch, *event, generator=g, dtype=F64)
    kl = same_cov_kl(m_p, m_q, std)
    s = torch.tensor(std, dtype=F64)
    torch.testing.assert_close(kl, kl_divergence(_indep(m_p, s), _indep(m_q, s)), rtol=1e-12, atol=1e-300)
    assert bool((kl == 0).all()) if equal else bool((kl > 0).all())
    # symmetry of the same-covariance KL
    torch.testing.assert_close(kl, same_cov_kl(m_q, m_p, std), rtol=0, atol=0)


def test_same_cov_kl_gradcheck():
    m_p, m_q = _means(5, shape=(2, 3))
    std = torch.tensor([[0.4], [1.3]], dtype=F64)
    inputs = (m_p.requires_grad_(), m_q.requires_grad_(), std.requires_grad_())
    assert torch.autograd.gradcheck(same_cov_kl, inputs, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(same_cov_kl, inputs, eps=1e-6, atol=1e-8)
    s_q = torch.tensor([[0.9], [0.6]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(diag_gaussian_kl, (m_p, std, m_q, s_q), eps=1e-6, atol=1e-8)


def test_same_cov_kl_monte_carlo_log_ratio():
    """E_p[log p(x) - log q(x)] = KL; the sample log-ratio is KL + delta^T eps."""
    m_p = torch.tensor([[0.3, -0.2, 0.5]], dtype=F64)
    m_q = torch.tensor([[0.1, 0.4, 0.0]], dtype=F64)
    std = torch.tensor([[0.5]], dtype=F64)
    n = 40_000
    p = GaussianStep(m_p.expand(n, 3), std.expand(n, 1))
    q = GaussianStep(m_q.expand(n, 3), std.expand(n, 1))
    x = p.sample(torch.Generator().manual_seed(6))
    log_ratio = gaussian_log_prob(x, p) - gaussian_log_prob(x, q)
    kl = float(same_cov_kl(m_p, m_q, std))
    # Var[log-ratio] = ||delta||^2 = 2 KL exactly; CLT with z = 5: false-failure prob ~5.7e-7
    tol = 5.0 * math.sqrt(2 * kl / n)
    assert abs(float(log_ratio.mean()) - kl) < tol
    # and the sampled log-ratio minus KL is exactly linear in the noise (no other randomness)
    eps = (x - m_p) / std
    delta = (m_p - m_q) / std
    torch.testing.assert_close(log_ratio, kl + (eps * delta).sum(1), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- public-code forms
def test_flowgrpo_step_kl_is_exact_kl_times_dt_over_d():
    m_p, _ = _means(7)
    x, v_s, v_t = m_p, m_p.flip(0), torch.randn(m_p.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=F64)
    sigma_next = sigma - torch.tensor([0.05, 0.1, 0.2, 0.05, 0.1], dtype=F64)
    ps, pt = sde_step(x, v_s, sigma, sigma_next, 0.7), sde_step(x, v_t, sigma, sigma_next, 0.7)
    exact = same_cov_kl(ps.mean, pt.mean, ps.std)
    public = flowgrpo_step_kl(ps.mean, pt.mean, sde_std_t(sigma, 0.7))
    torch.testing.assert_close(public, exact * (sigma - sigma_next) / 12, rtol=1e-13, atol=0)


def test_cps_log_prob_flowgrpo_drops_variance_and_normaliser():
    x, v = _means(9)
    step = cps_step(x, v, 0.6, 0.5, 0.7)
    x_next = step.sample(torch.Generator().manual_seed(10))
    d, s = 12, float(step.std[0, 0, 0])
    public = cps_log_prob_flowgrpo(x_next, step)
    exact = gaussian_log_prob(x_next, step)
    # exact = (D / (2 s^2)) * public - D log s - (D / 2) log 2 pi
    torch.testing.assert_close(exact, d / (2 * s**2) * public - d * math.log(s) - d / 2 * math.log(2 * math.pi), rtol=1e-12, atol=1e-12)


def test_size_of_public_code_differences():
    """The numbers quoted in docs/differences.md (Flow-GRPO training grid: 10 steps, shift 3, a = 0.7,
    SD3 latent 16 x 64 x 64 at 512 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    sig = sched.sigmas.double()
    D, a = 16 * 64 * 64, 0.7
    dt = sig[:-1] - sig[1:]
    # 1. mean over dims: log-probs (and the PPO log-ratio) shrink by D.  Oracles written anew: the
    #    public code's reduction (torch's per-dim Normal log-density, averaged over the latent) and
    #    the exact log-density (torch.distributions, summed), which is D = 65536 times larger
    m_p, m_q = _means(11, shape=(1, 16, 64, 64))
    std = torch.tensor([[[[0.3]]]], dtype=F64)
    step = GaussianStep(m_p, std)
    public = gaussian_log_prob_dim_mean(m_q, step)
    torch.testing.assert_close(public, Normal(m_p, 0.3).log_prob(m_q).flatten(1).mean(1), rtol=1e-12, atol=0)
    exact = _indep(m_p, std).log_prob(m_q)
    torch.testing.assert_close(gaussian_log_prob(m_q, step), exact, rtol=1e-12, atol=0)
    assert D == 65536 and float(exact / public) == pytest.approx(D, rel=1e-12)
    # 2. missing |dt| (and mean over dims) in the per-step KL: public / exact = |dt| / D
    x, v_s = m_p, m_q
    v_t = v_s + 0.1
    ratios = []
    for i in range(1, 9):  # the steps strictly inside (0, 1)
        ps, pt = sde_step(x, v_s, sig[i], sig[i + 1], a), sde_step(x, v_t, sig[i], sig[i + 1], a)
        r = flowgrpo_step_kl(ps.mean, pt.mean, sde_std_t(sig[i], a)) / same_cov_kl(ps.mean, pt.mean, ps.std)
        ratios.append(float(r) * D)  # = |dt| without the 1/D
    torch.testing.assert_close(torch.tensor(ratios, dtype=F64), dt[1:9], rtol=1e-12, atol=0)
    assert round(float(dt.min()), 4) == 0.0089 and round(float(dt.max()), 4) == 0.2691
    # relative weight of the steps, public vs exact: spans max|dt| / min|dt| over the grid
    assert round(float(dt.max() / dt.min()), 1) == 30.1
    # 3. CPS log-prob without 2 s^2: its gradient w.r.t. the mean is 2 s^2 / D times the exact one;
    #    s = sigma' sin(a pi / 2) varies along the grid, so the per-step weighting is off by s^2
    s_cps = sig[1:-1] * math.sin(a * math.pi / 2)
    assert round(float((s_cps.max() / s_cps.min()) ** 2), 0) == 11564.0
    # 4. sigma = 1 convention: first step with std_t = a / sqrt(1 - sigma_1); for data N(0, I) the
    #    state at sigma = 1 is eps and the exact velocity is v = x; the next marginal variance
    #    (sigma_1 - a^2/2)^2 + a^2 vs the exact (1 - sigma_1)^2 + sigma_1^2
    x1 = torch.eye(2, dtype=F64)  # two probe states to read off the affine map x -> mean
    step = sde_step(x1, x1, 1.0, sig[1], a, sigma_one="flowgrpo")
    gain = float(step.mean[0, 0])
    assert gain == pytest.approx(float(sig[1]) - a**2 / 2, rel=1e-12)
    var_flowgrpo = gain**2 + float(step.std[0, 0]) ** 2
    var_exact = (1 - float(sig[1])) ** 2 + float(sig[1]) ** 2
    var_ode = float(sig[1]) ** 2
    assert float(step.std[0, 0]) == pytest.approx(a, rel=1e-12)  # s = a exactly on the first step
    assert round(var_flowgrpo / var_exact - 1, 4) == 0.0844
    assert round(var_ode / var_exact - 1, 4) == -0.0017
