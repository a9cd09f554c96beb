"""Per-step OPD losses (opd_ref.losses) and D4, the deterministic limit of the rescaled SDE KL."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opd_ref.divergences import same_cov_kl
from opd_ref.kernels import GaussianStep, ode_step, sde_step
from opd_ref.losses import (
    deterministic_limit_weight,
    ode_matching_loss,
    opd_kl_loss,
    ppo_surrogate_loss,
    sde_kl_rescaled,
)

F64 = torch.float64


def _state(seed, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=F64) for _ in range(3))


# ---------------------------------------------------------------- opd_kl_loss, ode_matching_loss
def test_opd_kl_loss_is_same_cov_kl_and_detaches_teacher():
    x, v_s, v_t = _state(0)
    v_s.requires_grad_()
    v_t.requires_grad_()
    student = sde_step(x, v_s, 0.6, 0.5, 0.7)
    teacher = sde_step(x, v_t, 0.6, 0.5, 0.7)
    loss = opd_kl_loss(student, teacher.mean)
    assert torch.equal(loss, same_cov_kl(student.mean, teacher.mean, student.std))
    loss.sum().backward()
    assert v_t.grad is None and v_s.grad is not None and float(v_s.grad.abs().sum()) > 0
    v_s.grad = None
    student = sde_step(x, v_s, 0.6, 0.5, 0.7)
    teacher = sde_step(x, v_t, 0.6, 0.5, 0.7)
    opd_kl_loss(student, teacher.mean, detach_teacher=False).sum().backward()
    torch.testing.assert_close(v_t.grad, -v_s.grad, rtol=1e-14, atol=0)  # symmetric in the means


def test_ode_matching_loss_is_half_squared_distance_summed():
    a, b, _ = _state(1, shape=(2, 3, 2))
    a.requires_grad_()
    b.requires_grad_()
    loss = ode_matching_loss(a, b)
    torch.testing.assert_close(loss, 0.5 * ((a - b) ** 2).sum((1, 2)), rtol=0, atol=0)
    loss.sum().backward()
    assert b.grad is None
    torch.testing.assert_close(a.grad, (a - b).detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- ppo_surrogate_loss
def test_ppo_surrogate_unclipped_and_clipped_cases():
    old = torch.zeros(6, dtype=F64)
    # ratios 0.5, 0.9, 1.0, 1.1, 1.5, 1.5 ; advantages +, +, +, -, +, -
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 1.5], dtype=F64)
    adv = torch.tensor([1.0, 2.0, -1.0, -1.0, 1.0, -2.0], dtype=F64)
    lp = torch.log(ratio).requires_grad_()
    torch.testing.assert_close(ppo_surrogate_loss(lp, old, adv), -ratio * adv, rtol=1e-14, atol=0)
    loss = ppo_surrogate_loss(lp, old, adv, clip_range=0.2)
    # -min(rA, clip(r, 0.8, 1.2) A), written out case by case
    expected = torch.tensor([-0.5, -1.8, 1.0, 1.1, -1.2, 3.0], dtype=F64)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    loss.sum().backward()
    # the clipped branch is constant in log_prob: entries 1 (r=0.9 in range -> grad -rA) and 4 (clipped)
    torch.testing.assert_close(lp.grad[4], torch.tensor(0.0, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(lp.grad[1], torch.tensor(-0.9 * 2.0, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(lp.grad[5], torch.tensor(1.5 * 2.0, dtype=F64), rtol=1e-14, atol=0)


def test_ppo_advantage_carries_gradient_and_old_log_prob_does_not():
    lp = torch.tensor([0.1, -0.2], dtype=F64, requires_grad=True)
    old = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    adv = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    ppo_surrogate_loss(lp, old, adv, clip_range=0.5).sum().backward()
    torch.testing.assert_close(adv.grad, -torch.exp(lp.detach()), rtol=1e-14, atol=0)
    assert old.grad is None


# ---------------------------------------------------------------- D4
SIGMAS = torch.tensor([0.95, 0.6, 0.3], dtype=F64)
SIGMAS_NEXT = torch.tensor([0.9, 0.45, 0.0], dtype=F64)


def test_d4_step_variance_rescaling_is_matching_times_one_plus_half_a2_squared():
    x, v_s, v_t = _state(2)
    match = ode_matching_loss(ode_step(x, v_s, SIGMAS, SIGMAS_NEXT), ode_step(x, v_t, SIGMAS, SIGMAS_NEXT))
    # exact at a = 0 (no division by s^2 inside; computed from c_v (v_s - v_t), so equal to rounding)
    torch.testing.assert_close(sde_kl_rescaled(x, v_s, v_t, SIGMAS, SIGMAS_NEXT, 0.0), match, rtol=1e-14, atol=0)
    errs = []
    for a in (0.4, 0.2, 0.1, 0.05):
        student = sde_step(x, v_s, SIGMAS, SIGMAS_NEXT, a)
        teacher = sde_step(x, v_t, SIGMAS, SIGMAS_NEXT, a)
        s2kl = student.std.flatten() ** 2 * opd_kl_loss(student, teacher.mean)  # s^2 KL, the long way
        rescaled = sde_kl_rescaled(x, v_s, v_t, SIGMAS, SIGMAS_NEXT, a)
        torch.testing.assert_close(rescaled, s2kl, rtol=1e-12, atol=0)
        torch.testing.assert_close(rescaled, (1 + a**2 / 2) ** 2 * match, rtol=1e-12, atol=0)
        errs.append(float(((rescaled - match) / match).abs().max()))
    # relative error (1 + a^2/2)^2 - 1 = a^2 + a^4/4: quartered when a halves, -> 0
    for e0, e1 in zip(errs, errs[1:]):
        assert 3.9 < e0 / e1 < 4.2
    assert errs[-1] < 2.6e-3


def test_d4_noise_level_squared_rescaling_leaves_per_step_weight():
    x, v_s, v_t = _state(3)
    w = deterministic_limit_weight(SIGMAS, SIGMAS_NEXT)
    torch.testing.assert_close(w, (1 - SIGMAS) / (SIGMAS * (SIGMAS - SIGMAS_NEXT)), rtol=1e-15, atol=0)
    match = ode_matching_loss(ode_step(x, v_s, SIGMAS, SIGMAS_NEXT), ode_step(x, v_t, SIGMAS, SIGMAS_NEXT))
    for a in (0.5, 0.1, 0.01):
        student = sde_step(x, v_s, SIGMAS, SIGMAS_NEXT, a)
        teacher = sde_step(x, v_t, SIGMAS, SIGMAS_NEXT, a)
        a2kl = a**2 * opd_kl_loss(student, teacher.mean)
        rescaled = sde_kl_rescaled(x, v_s, v_t, SIGMAS, SIGMAS_NEXT, a, rescale="noise_level_squared")
        torch.testing.assert_close(rescaled, a2kl, rtol=1e-12, atol=0)
        torch.testing.assert_close(rescaled, w * (1 + a**2 / 2) ** 2 * match, rtol=1e-12, atol=0)
    limit = sde_kl_rescaled(x, v_s, v_t, SIGMAS, SIGMAS_NEXT, 0.0, rescale="noise_level_squared")
    torch.testing.assert_close(limit, w * match, rtol=1e-15, atol=0)


def test_d4_gradients_align_with_direct_matching():
    """Student velocity v_theta(x) = W x: the gradient of the rescaled KL is (1 + a^2/2)^2 times the
    matching gradient, exactly parallel (cosine 1) for every a, and equal in the limit."""
    x, _, v_t = _state(4)
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=F64, requires_grad=True)
    (g_match,) = torch.autograd.grad(
        ode_matching_loss(ode_step(x, x @ W, SIGMAS, SIGMAS_NEXT), ode_step(x, v_t, SIGMAS, SIGMAS_NEXT)).sum(), W
    )
    for a in (1.0, 0.3, 0.03, 0.0):
        (g,) = torch.autograd.grad(sde_kl_rescaled(x, x @ W, v_t, SIGMAS, SIGMAS_NEXT, a).sum(), W)
        cos = float((g * g_match).sum() / (g.norm() * g_match.norm()))
        assert cos == pytest.approx(1.0, abs=1e-13)
        torch.testing.assert_close(g, (1 + a**2 / 2) ** 2 * g_match, rtol=1e-12, atol=1e-15)


@given(
    sigma=st.floats(0.02, 0.98),
    frac=st.floats(0.01, 1.0),
    a=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_d4_property(sigma, frac, a, seed):
    sigma_next = sigma * (1 - frac)
    x, v_s, v_t = _state(seed, shape=(2, 3))
    match = ode_matching_loss(ode_step(x, v_s, sigma, sigma_next), ode_step(x, v_t, sigma, sigma_next))
    torch.testing.assert_close(
        sde_kl_rescaled(x, v_s, v_t, sigma, sigma_next, a), (1 + a**2 / 2) ** 2 * match, rtol=1e-10, atol=1e-300
    )
    w = float((1 - sigma) / (sigma * (sigma - sigma_next)))
    torch.testing.assert_close(
        sde_kl_rescaled(x, v_s, v_t, sigma, sigma_next, a, rescale="noise_level_squared"),
        w * (1 + a**2 / 2) ** 2 * match,
        rtol=1e-10,
        atol=1e-300,
    )


def test_gaussian_step_reused_by_losses_keeps_its_std():
    mean = torch.zeros(2, 3, dtype=F64)
    step = GaussianStep(mean, torch.tensor([[0.5], [2.0]], dtype=F64))
    kl = opd_kl_loss(step, torch.ones(2, 3, dtype=F64))
    torch.testing.assert_close(kl, torch.tensor([3 / (2 * 0.25), 3 / (2 * 4.0)], dtype=F64), rtol=1e-15, atol=0)
