"""D8: centered reward distillation (exact float64 identities on Gaussian students)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate

from opd_ref.crd import (
    center_in_groups,
    crd_loss,
    group_mean,
    group_softmax_weights,
    implicit_reward,
    implicit_reward_from_steps,
    uncentered_reward_loss,
    unit_interval_advantage,
)

D = torch.float64

floats = st.floats(-3.0, 3.0, allow_nan=False)


def _normal_log_prob(x, mean, log_std):
    return torch.distributions.Normal(mean, torch.exp(log_std)).log_prob(x)


def _tilted_gaussian(m_ref, s_ref, b, beta):
    """p_ref = N(m_ref, s_ref^2), r = b x:  p* = N(m_ref + s_ref^2 b / beta, s_ref^2), closed-form log Z."""
    mean = m_ref + s_ref**2 * b / beta
    log_z = b * m_ref / beta + (b * s_ref) ** 2 / (2 * beta**2)
    return mean, log_z


def _setup(seed, n_ctx=3, group=5):
    g = torch.Generator().manual_seed(seed)
    m_ref = torch.randn(n_ctx, generator=g, dtype=D)
    s_ref = 0.5 + torch.rand(n_ctx, generator=g, dtype=D)
    b = 2 * torch.randn(n_ctx, generator=g, dtype=D)
    group_ids = torch.arange(n_ctx).repeat_interleave(group)
    x = m_ref[group_ids] + s_ref[group_ids] * torch.randn(n_ctx * group, generator=g, dtype=D)
    return m_ref, s_ref, b, group_ids, x


def test_log_z_closed_form_matches_quadrature():
    m_ref, s_ref, b, beta = 0.3, 0.8, 1.7, 0.6
    def tilted(x):  # p_ref(x) exp(r(x) / beta), exponents combined to avoid overflow
        return math.exp(-0.5 * ((x - m_ref) / s_ref) ** 2 + b * x / beta) / (s_ref * math.sqrt(2 * math.pi))

    z, _ = integrate.quad(tilted, -40.0, 40.0, epsabs=1e-13, epsrel=1e-13, points=[m_ref + s_ref**2 * b / beta])
    assert abs(_tilted_gaussian(m_ref, s_ref, b, beta)[1] - math.log(z)) < 1e-10


@given(seed=st.integers(0, 10_000), beta=st.floats(0.1, 3.0))
def test_implicit_reward_at_optimum_is_reward_minus_beta_log_z(seed, beta):
    m_ref, s_ref, b, gid, x = _setup(seed)
    mean_star, log_z = _tilted_gaussian(m_ref, s_ref, b, beta)
    r_hat = implicit_reward(
        _normal_log_prob(x, mean_star[gid], torch.log(s_ref[gid])),
        _normal_log_prob(x, m_ref[gid], torch.log(s_ref[gid])),
        beta,
    )
    torch.testing.assert_close(r_hat, b[gid] * x - beta * log_z[gid], atol=1e-10, rtol=1e-10)


@given(seed=st.integers(0, 10_000), beta=st.floats(0.1, 3.0), n_ctx=st.integers(1, 4), group=st.integers(2, 6))
def test_zero_loss_and_zero_gradient_at_p_star_for_any_grouping(seed, beta, n_ctx, group):
    m_ref, s_ref, b, gid, x = _setup(seed, n_ctx, group)
    mean_star, _ = _tilted_gaussian(m_ref, s_ref, b, beta)
    mean = mean_star.clone().requires_grad_(True)
    log_std = torch.log(s_ref).clone().requires_grad_(True)
    # a random relabelling/permutation of prompts: grouping is by id, not by position
    perm = torch.randperm(gid.shape[0], generator=torch.Generator().manual_seed(seed))
    gid, x = gid[perm], x[perm]
    r_hat = implicit_reward(
        _normal_log_prob(x, mean[gid], log_std[gid]),
        _normal_log_prob(x, m_ref[gid], torch.log(s_ref[gid])),
        beta,
    )
    loss = crd_loss(r_hat, b[gid] * x, 7 * gid + 11)
    assert float(loss.detach().abs().max()) < 1e-20
    g_mean, g_std = torch.autograd.grad(loss.sum(), (mean, log_std))
    assert float(g_mean.abs().max()) < 1e-9 and float(g_std.abs().max()) < 1e-9
    # the uncentered loss is not zero there: it is exactly 1/2 (beta log Z(c))^2 for every sample,
    # positive whenever log Z(c) != 0, and 0 only when given the exact normalizer
    _, log_z = _tilted_gaussian(m_ref, s_ref, b, beta)
    unc = uncentered_reward_loss(r_hat, b[gid] * x)
    torch.testing.assert_close(unc.detach(), 0.5 * (beta * log_z[gid]) ** 2, atol=1e-12, rtol=1e-9)
    assert bool((log_z != 0).all()) and bool((unc.detach() > 0).all())
    assert float(uncentered_reward_loss(r_hat, b[gid] * x, beta * log_z[gid]).detach().max()) < 1e-18


@given(seed=st.integers(0, 10_000), shift_scale=st.floats(0.0, 50.0))
def test_invariant_to_per_prompt_constants(seed, shift_scale):
    g = torch.Generator().manual_seed(seed)
    gid = torch.tensor([0, 0, 0, 2, 2, 5, 5, 5, 5])
    r_hat, reward = torch.randn(9, generator=g, dtype=D), torch.randn(9, generator=g, dtype=D)
    a = shift_scale * torch.randn(6, generator=g, dtype=D)
    c = shift_scale * torch.randn(6, generator=g, dtype=D)
    base = crd_loss(r_hat, reward, gid)
    torch.testing.assert_close(crd_loss(r_hat + a[gid], reward + c[gid], gid), base, atol=1e-9, rtol=1e-9)
    w = group_softmax_weights(reward, gid)
    torch.testing.assert_close(group_softmax_weights(reward + c[gid], gid), w, atol=1e-12, rtol=1e-12)
    m = unit_interval_advantage(reward, gid, scale=0.7)
    torch.testing.assert_close(unit_interval_advantage(reward + c[gid], gid, scale=0.7), m, atol=1e-9, rtol=0)
    # the uncentered loss is NOT invariant (the reason for centering)
    if shift_scale > 1.0:
        assert not torch.allclose(uncentered_reward_loss(r_hat + a[gid], reward), uncentered_reward_loss(r_hat, reward))


@given(seed=st.integers(0, 10_000), beta=st.floats(0.1, 3.0))
def test_group_mean_loss_is_half_variance_of_log_ratio_to_p_star(seed, beta):
    # per group: mean_i l_i = 1/2 Var_g[beta log(p_theta / p*)] (biased sample variance), exactly; its
    # large-group limit is 1/2 Var_q, zero only at p* (the normaliser has dropped out)
    m_ref, s_ref, b, gid, x = _setup(seed, n_ctx=2, group=7)
    mean_star, _ = _tilted_gaussian(m_ref, s_ref, b, beta)
    g = torch.Generator().manual_seed(seed + 1)
    mu, log_s = torch.randn(2, generator=g, dtype=D), 0.3 * torch.randn(2, generator=g, dtype=D)
    log_p_theta = _normal_log_prob(x, mu[gid], log_s[gid])
    loss = crd_loss(implicit_reward(log_p_theta, _normal_log_prob(x, m_ref[gid], torch.log(s_ref[gid])), beta),
                    b[gid] * x, gid)
    f = beta * (log_p_theta - _normal_log_prob(x, mean_star[gid], torch.log(s_ref[gid])))
    for c in range(2):
        sel = gid == c
        torch.testing.assert_close(loss[sel].mean(), 0.5 * f[sel].var(unbiased=False), atol=1e-10, rtol=1e-10)


def test_gradient_equals_analytic_gaussian():
    # student N(mu, s^2) per context, p_ref N(m_ref, s_ref^2), r = b x, samples from p_ref:
    # d r_hat / d mu = beta (x - mu) / s^2, d r_hat / d log s = beta ((x - mu)^2 / s^2 - 1);
    # d/dtheta mean_i l_i = mean_i (c_hat_i - c_i) d r_hat_i/dtheta (centering is a projection)
    beta = 0.7
    m_ref, s_ref, b, gid, x = _setup(3, n_ctx=2, group=6)
    mu = torch.tensor([0.4, -0.9], dtype=D, requires_grad=True)
    log_s = torch.tensor([-0.2, 0.3], dtype=D, requires_grad=True)
    r_hat = implicit_reward(
        _normal_log_prob(x, mu[gid], log_s[gid]), _normal_log_prob(x, m_ref[gid], torch.log(s_ref[gid])), beta
    )
    reward = b[gid] * x
    g_mu, g_s = torch.autograd.grad(crd_loss(r_hat, reward, gid).mean(), (mu, log_s))
    with torch.no_grad():
        res = center_in_groups(r_hat, gid) - center_in_groups(reward, gid)
        s2 = torch.exp(2 * log_s)[gid]
        d_mu = beta * (x - mu[gid]) / s2
        d_s = beta * ((x - mu[gid]) ** 2 / s2 - 1)
        n = x.shape[0]
        want_mu = torch.zeros(2, dtype=D).index_add(0, gid, res * d_mu) / n
        want_s = torch.zeros(2, dtype=D).index_add(0, gid, res * d_s) / n
    torch.testing.assert_close(g_mu, want_mu, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_s, want_s, atol=1e-12, rtol=1e-12)


def test_weighted_loss_and_softmax_weights():
    gid = torch.tensor([1, 1, 1, 4, 4])
    reward = torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0], dtype=D)
    w = group_softmax_weights(reward, gid, temperature=0.5)
    want = torch.cat([3 * torch.softmax(reward[:3] / 0.5, 0), 2 * torch.softmax(reward[3:] / 0.5, 0)])
    torch.testing.assert_close(w, want, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(group_mean(w, gid), torch.ones(5, dtype=D), atol=1e-14, rtol=0)
    r_hat = torch.tensor([0.3, -0.1, 0.2, 0.5, 0.0], dtype=D)
    torch.testing.assert_close(crd_loss(r_hat, reward, gid, weights=w), w * crd_loss(r_hat, reward, gid))


def test_unit_interval_advantage_values():
    gid = torch.tensor([0, 0, 1, 1])
    reward = torch.tensor([0.0, 1.0, 5.0, 9.0], dtype=D)  # advantages -0.5, 0.5, -2, 2
    m = unit_interval_advantage(reward, gid, scale=1.0, clip=1.0)
    torch.testing.assert_close(m, torch.tensor([0.25, 0.75, 0.0, 1.0], dtype=D))
    m_default = unit_interval_advantage(reward, gid)
    s = float(torch.tensor([-0.5, 0.5, -2.0, 2.0], dtype=D).std())
    torch.testing.assert_close(m_default, 0.5 + 0.5 * torch.clamp(torch.tensor([-0.5, 0.5, -2.0, 2.0], dtype=D) / s, -1, 1))
    assert float(m_default.min()) >= 0 and float(m_default.max()) <= 1


def test_implicit_reward_from_steps_sums_steps():
    lr = torch.tensor([[0.1, -0.2, 0.4], [1.0, 0.0, -1.0]], dtype=D)
    torch.testing.assert_close(implicit_reward_from_steps(lr, 2.0), torch.tensor([0.6, 0.0], dtype=D))


def test_bad_input():
    r = torch.zeros(4, dtype=D)
    with pytest.raises(ValueError, match=r"group_ids must have shape \(4,\)"):
        crd_loss(r, r, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        crd_loss(r, r, torch.tensor([0, 0, 0, 1]))
    with pytest.raises(TypeError, match="integer"):
        crd_loss(r, r, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="beta"):
        implicit_reward(r, r, 0.0)
    with pytest.raises(ValueError, match="beta"):
        implicit_reward(r, r, -1.0)
    with pytest.raises(ValueError, match="reward contains 1 non-finite"):
        crd_loss(r, torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=D), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="r_hat contains 1 non-finite"):
        crd_loss(torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=D), r, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        crd_loss(r, r, torch.tensor([0, 0, 1, 1]), weights=torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="temperature"):
        group_softmax_weights(r, torch.tensor([0, 0, 1, 1]), temperature=0.0)
    with pytest.raises(ValueError, match="positive std"):
        unit_interval_advantage(r, torch.tensor([0, 0, 1, 1]))
