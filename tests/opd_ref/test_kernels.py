"""D2: flow-matching transition kernels (opd_ref.kernels).

Oracles: the diffusers Euler scheduler, Flow-GRPO's public SDE formula written out again by hand,
the CPS coefficients on a point-mass posterior, and exact Gaussian marginals.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opd_ref.divergences import same_cov_kl
from opd_ref.kernels import (
    GaussianStep,
    cps_kl_coefficient,
    cps_step,
    ode_step,
    sde_kl_coefficient,
    sde_std_t,
    sde_step,
    sigma_to_t,
    t_to_sigma,
)
from opd_ref.losses import opd_kl_loss

F64 = torch.float64


def _xv(seed, shape=(4, 3, 2), dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- ODE vs diffusers
@pytest.mark.parametrize("num_steps", [1, 7, 28])
def test_ode_step_equals_diffusers_euler_scheduler(num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(num_steps)
    sigmas = sched.sigmas
    assert len(sigmas) == num_steps + 1 and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    g = torch.Generator().manual_seed(num_steps)
    x_ref = torch.randn(3, 4, 4, generator=g)  # the scheduler computes in float32
    x_ours = x_ref.clone()
    x64 = x_ref.double()
    for i, t in enumerate(sched.timesteps):
        v = torch.tanh(x_ref) - 0.3 * x_ref + 0.1 * i  # any velocity field, evaluated on the shared state
        x_ref = sched.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ode_step(x_ours, torch.tanh(x_ours) - 0.3 * x_ours + 0.1 * i, sigmas[i], sigmas[i + 1])
        # the scheduler upcasts to float32 and does sample + (sigma_next - sigma) * v: bit-identical
        assert torch.equal(x_ours, x_ref), f"step {i}"
        v64 = torch.tanh(x64) - 0.3 * x64 + 0.1 * i
        x64 = ode_step(x64, v64, float(sigmas[i]), float(sigmas[i + 1]))
    # the float64 chain on the same grid agrees to float32 round-off
    torch.testing.assert_close(x64, x_ref.double(), rtol=1e-5, atol=1e-5)


def test_sde_with_zero_noise_is_the_ode_step():
    x, v = _xv(0)
    sigma = torch.tensor([0.9, 0.5, 0.3, 0.05], dtype=F64)
    sigma_next = sigma - torch.tensor([0.1, 0.2, 0.01, 0.05], dtype=F64)
    step = sde_step(x, v, sigma, sigma_next, 0.0)
    assert torch.equal(step.mean, ode_step(x, v, sigma, sigma_next))
    assert torch.equal(step.std, torch.zeros(4, 1, 1, dtype=F64))


def test_cps_with_zero_noise_is_the_ode_step():
    x, v = _xv(1)
    for sigma, sigma_next in [(1.0, 0.9), (0.7, 0.3), (0.2, 0.0)]:
        step = cps_step(x, v, sigma, sigma_next, 0.0)
        torch.testing.assert_close(step.mean, ode_step(x, v, sigma, sigma_next), rtol=0, atol=1e-14)
        assert float(step.std.abs().max()) == 0.0


# ---------------------------------------------------------------- SDE vs hand-written Flow-GRPO form
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("sigma,sigma_next", [(0.96, 0.91), (0.5, 0.45), (0.1, 0.0)])
def test_sde_step_matches_flowgrpo_public_form(a, sigma, sigma_next):
    x, v = _xv(2)
    step = sde_step(x, v, sigma, sigma_next, a)
    # Flow-GRPO's public form, written out independently of opd_ref:
    #   std_t = a sqrt(sigma / (1 - sigma)), dt = sigma_next - sigma,
    #   mean  = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,
    #   step std = std_t sqrt(-dt)
    std_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(step.mean, mean, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(step.std, torch.full((4, 1, 1), std_t * math.sqrt(-dt), dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(sde_std_t(sigma, a), torch.tensor(std_t, dtype=F64), rtol=1e-14, atol=0)


def test_sde_sigma_one_needs_opt_in_and_then_uses_next_grid_sigma():
    x, v = _xv(3)
    with pytest.raises(ValueError, match="sigma_one='flowgrpo'"):
        sde_step(x, v, 1.0, 0.96, 0.7)
    step = sde_step(x, v, 1.0, 0.96, 0.7, sigma_one="flowgrpo")
    std_t = 0.7 * math.sqrt(1.0 / (1 - 0.96))  # Flow-GRPO: torch.where(sigma == 1, sigmas[1], sigma)
    dt = -0.04
    mean = x * (1 + std_t**2 / 2 * dt) + v * dt  # (1 - sigma) = 0 kills the v-correction
    torch.testing.assert_close(step.mean, mean, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(step.std, torch.full((4, 1, 1), std_t * math.sqrt(0.04), dtype=F64), rtol=1e-14, atol=0)
    # below 1 the opt-in changes nothing
    a_, b_ = sde_step(x, v, 0.5, 0.4, 0.7), sde_step(x, v, 0.5, 0.4, 0.7, sigma_one="flowgrpo")
    assert torch.equal(a_.mean, b_.mean) and torch.equal(a_.std, b_.std)


def test_ode_and_cps_accept_sigma_one():
    x, v = _xv(4)
    torch.testing.assert_close(ode_step(x, v, 1.0, 0.9), x - 0.1 * v, rtol=0, atol=1e-15)
    step = cps_step(x, v, 1.0, 0.9, 0.5)
    assert bool(torch.isfinite(step.mean).all()) and float(step.std[0, 0, 0]) == pytest.approx(0.9 * math.sin(math.pi / 4))


def test_sde_keeps_gaussian_marginals_to_first_order():
    """With the exact velocity of a Gaussian flow, the one-step marginal error is O(dt^2)."""
    m0, c = 0.7, 0.5  # data N(m0, c^2): x_sigma ~ N((1-s) m0, (1-s)^2 c^2 + s^2)

    def moments(s):
        return (1 - s) * m0, (1 - s) ** 2 * c**2 + s**2

    def exact_v(x, s):  # E[eps - x0 | x_sigma = x], both linear-Gaussian regressions
        mu, var = moments(s)
        return (s - (1 - s) * c**2) / var * (x - mu) - m0

    sigma, a = 0.6, 0.8
    errs = []
    for h in (0.04, 0.02, 0.01):
        # the step is affine in x: x' = A x + b + s z; push the Gaussian through exactly
        mu, var = moments(sigma)
        x = torch.tensor([[mu], [mu + 1.0]], dtype=F64)
        step = sde_step(x, exact_v(x, sigma), sigma, sigma - h, a)
        A = float(step.mean[1, 0] - step.mean[0, 0])
        mean_next = float(step.mean[0, 0])
        var_next = A**2 * var + float(step.std[0, 0]) ** 2
        mu_t, var_t = moments(sigma - h)
        errs.append(abs(mean_next - mu_t) + abs(var_next - var_t))
    # local error O(h^2): halving h divides it by ~4
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0
    assert errs[2] < 1e-3


# ---------------------------------------------------------------- CPS
def test_cps_matches_hand_formula_and_preserves_coefficients():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(5, 6, generator=g, dtype=F64)
    eps = torch.randn(5, 6, generator=g, dtype=F64)
    sigma, sigma_next, a = 0.8, 0.55, 0.6
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0  # a point-mass posterior: x0_hat = x0 and eps_hat = eps exactly
    step = cps_step(x, v, sigma, sigma_next, a)
    s = sigma_next * math.sin(a * math.pi / 2)
    assert float(step.std[0, 0]) == pytest.approx(s, rel=1e-15)
    # mean = (1 - sigma') x0 + sqrt(sigma'^2 - s^2) eps: data coefficient kept, noise variance
    # sqrt(.)^2 + s^2 = sigma'^2 after the fresh noise is added
    torch.testing.assert_close(
        step.mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s**2) * eps, rtol=1e-13, atol=1e-14
    )


@pytest.mark.parametrize("a", [0.2, 0.5, 0.9])
def test_cps_kl_is_closed_form_in_velocity_gap(a):
    x, v_s = _xv(6)
    v_t = v_s + torch.randn(v_s.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    sigma, sigma_next = 0.7, 0.62
    ps, pt = cps_step(x, v_s, sigma, sigma_next, a), cps_step(x, v_t, sigma, sigma_next, a)
    assert torch.equal(ps.std, pt.std)
    kl = opd_kl_loss(ps, pt.mean)
    # hand form: dmean/dv = -(1 - sigma') sigma + (1 - sigma) sqrt(sigma'^2 - s^2)
    s = sigma_next * math.sin(a * math.pi / 2)
    c = (-(1 - sigma_next) * sigma + (1 - sigma) * math.sqrt(sigma_next**2 - s**2)) ** 2 / (2 * s**2)
    gap = ((v_s - v_t) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(kl, c * gap, rtol=1e-12, atol=0)
    torch.testing.assert_close(cps_kl_coefficient(sigma, sigma_next, a), torch.tensor([c], dtype=F64), rtol=1e-14, atol=0)


# ---------------------------------------------------------------- SDE KL closed form (D2)
def test_sde_kl_is_closed_form_in_velocity_gap():
    x, v_s = _xv(8)
    v_t = v_s + 0.3 * torch.randn(v_s.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    sigma = torch.tensor([0.95, 0.6, 0.3, 0.08], dtype=F64)
    sigma_next = torch.tensor([0.9, 0.5, 0.29, 0.0], dtype=F64)
    a = torch.tensor([0.1, 0.7, 1.0, 1.5], dtype=F64)
    ps, pt = sde_step(x, v_s, sigma, sigma_next, a), sde_step(x, v_t, sigma, sigma_next, a)
    assert torch.equal(ps.std, pt.std)  # shared covariance: the std never sees v
    kl = same_cov_kl(ps.mean, pt.mean, ps.std)
    # D2: (1 + a^2/2)^2 |dt| (1 - sigma) / (2 a^2 sigma) ||v_s - v_t||^2, written out again
    c = (1 + a**2 / 2) ** 2 * (sigma - sigma_next) * (1 - sigma) / (2 * a**2 * sigma)
    gap = ((v_s - v_t) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(kl, c * gap, rtol=1e-12, atol=0)
    torch.testing.assert_close(sde_kl_coefficient(sigma, sigma_next, a), c, rtol=1e-14, atol=0)


@given(
    batch=st.integers(1, 4),
    event=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    sigma=st.floats(0.02, 0.98),
    frac=st.floats(0.01, 1.0),
    a=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sde_kl_closed_form_property(batch, event, sigma, frac, a, seed):
    sigma_next = sigma * (1 - frac)
    g = torch.Generator().manual_seed(seed)
    x, v_s, v_t = (torch.randn(batch, *event, generator=g, dtype=F64) for _ in range(3))
    ps, pt = sde_step(x, v_s, sigma, sigma_next, a), sde_step(x, v_t, sigma, sigma_next, a)
    kl = opd_kl_loss(ps, pt.mean)
    gap = ((v_s - v_t) ** 2).reshape(batch, -1).sum(1)
    torch.testing.assert_close(kl, sde_kl_coefficient(sigma, sigma_next, a) * gap, rtol=1e-10, atol=1e-300)
    assert ps.mean.shape == x.shape and ps.std.shape == (batch,) + (1,) * len(event)


@given(
    sigma=st.floats(0.05, 1.0),
    frac=st.floats(0.05, 0.95),
    a=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_cps_kl_closed_form_property(sigma, frac, a, seed):
    sigma_next = sigma * (1 - frac)
    g = torch.Generator().manual_seed(seed)
    x, v_s, v_t = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    ps, pt = cps_step(x, v_s, sigma, sigma_next, a), cps_step(x, v_t, sigma, sigma_next, a)
    gap = ((v_s - v_t) ** 2).sum(1)
    torch.testing.assert_close(
        opd_kl_loss(ps, pt.mean), cps_kl_coefficient(sigma, sigma_next, a) * gap, rtol=1e-9, atol=1e-300
    )


# ---------------------------------------------------------------- GaussianStep, conversions
def test_gaussian_step_sample_is_reparameterised_and_frozen():
    mean = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    std = torch.tensor([[0.5], [1.0], [2.0]], dtype=F64)
    step = GaussianStep(mean, std)
    sample = step.sample(torch.Generator().manual_seed(11))
    eps = torch.randn(3, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    torch.testing.assert_close(sample, std * eps, rtol=0, atol=0)
    sample.sum().backward()
    assert torch.equal(mean.grad, torch.ones(3, 2, dtype=F64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.mean = mean  # type: ignore[misc]
    assert float(GaussianStep(mean.detach(), 0.25).std) == 0.25


def test_sigma_to_t_maps_diffusers_to_seed_convention():
    g = torch.Generator().manual_seed(12)
    x_data, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    sigma = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=F64)
    t = sigma_to_t(sigma)
    x_sigma = (1 - sigma[:, None]) * x_data + sigma[:, None] * eps
    x_t = t[:, None] * x_data + (1 - t[:, None]) * eps  # seeds: x_0 = noise, x_1 = data
    torch.testing.assert_close(x_t, x_sigma, rtol=0, atol=1e-15)
    # velocities: the seeds' u_t = d x_t / dt equals -v, v = eps - x_data (x is linear in t)
    h = 0.125
    t_in = sigma_to_t(torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=F64))[:, None]
    x_at = [(1 - t_to_sigma(tt)) * x_data + t_to_sigma(tt) * eps for tt in (t_in - h, t_in)]
    torch.testing.assert_close((x_at[1] - x_at[0]) / h, -(eps - x_data), rtol=0, atol=1e-13)
    torch.testing.assert_close(t_to_sigma(t), sigma, rtol=0, atol=1e-16)
    assert sigma_to_t(0.3) == pytest.approx(0.7, abs=1e-16)


def test_last_step_to_zero_sde_keeps_flowgrpo_noise_cps_and_ode_do_not():
    """docs D2 "The last step": Flow-GRPO's SDE kernel evaluates std_t = a sqrt(sigma / (1 - sigma)) at the
    step's start, so a step from sigma = 0.1 to sigma' = 0 with a = 0.7 still adds noise of std
    0.7 sqrt(0.1 / 0.9) sqrt(0.1) = 0.0738; CPS's std sigma' sin(a pi / 2) is exactly 0 at sigma' = 0 and
    its mean, like the ODE step, is the denoised estimate x - sigma v."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    std = 0.7 * math.sqrt(0.1 / 0.9) * math.sqrt(0.1)  # written anew from Flow-GRPO's formula
    assert abs(std - 0.0738) < 5e-5
    sde = sde_step(x, v, 0.1, 0.0, 0.7)
    torch.testing.assert_close(sde.std.expand(4, 3), torch.full((4, 3), std, dtype=F64), rtol=1e-14, atol=0)
    cps = cps_step(x, v, 0.1, 0.0, 0.7)
    assert torch.equal(cps.std.expand(4, 3), torch.zeros(4, 3, dtype=F64))
    torch.testing.assert_close(cps.mean, x - 0.1 * v, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ode_step(x, v, 0.1, 0.0), x - 0.1 * v, rtol=1e-14, atol=1e-14)
