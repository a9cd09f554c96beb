"""D17's conditional toy: guided velocity and kernels against an independent computation (noised
mixture densities written anew with torch.distributions, scores by autograd), the kernel KL against
torch.distributions, the guided sampler's final law at the known cases w = 0 and w = 1, the hackable
reward, and the toy policy the engine trains."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, kl_divergence

from toys.conditional import (ConditionalToyPolicy, Guided, conditional_student, default_conditional,
                              guided_kernel, guided_sampler_law, kernel_kl)

DT = torch.float64


def _noised_log_density(mix, x, sigma):
    """log p_sigma(x) of x_sigma = (1 - sigma) x_data + sigma eps, written with torch.distributions."""
    cov = (1 - sigma) ** 2 * mix.covs + sigma**2 * torch.eye(2, dtype=DT)
    d = MixtureSameFamily(Categorical(probs=mix.weights), MultivariateNormal((1 - sigma) * mix.means, cov))
    return d.log_prob(x)


def _velocity_from_score(log_density, x, sigma):
    """v = -(x + sigma^2 score) / ... from score = -(x + (1 - sigma) v) / sigma  =>  v = -(sigma score + x) / (1 - sigma)."""
    x = x.detach().requires_grad_(True)
    score = torch.autograd.grad(log_density(x).sum(), x)[0]
    return -(sigma * score + x) / (1 - sigma)


@settings(max_examples=25)
@given(sigma=st.floats(0.05, 0.95), w=st.floats(0.0, 4.0), c=st.integers(0, 1))
def test_guided_velocity_is_the_velocity_of_the_guided_noised_score(sigma, w, c):
    model, _ = default_conditional()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=DT) * 1.5
    lp = lambda z: w * _noised_log_density(model.law(c), z, sigma) + (1 - w) * _noised_log_density(model.unconditional, z, sigma)
    expected = _velocity_from_score(lp, x, sigma)
    torch.testing.assert_close(model.guided_velocity(x, sigma, c, w), expected, rtol=1e-9, atol=1e-10)


def test_unconditional_is_the_class_mixture():
    model, _ = default_conditional()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(4), dtype=DT) * 2
    mix = torch.logsumexp(torch.stack([math.log(p) + _noised_log_density(m, x, 0.0) for p, m in
                                       zip(model.class_weights.tolist(), model.conditionals)]), 0)
    torch.testing.assert_close(model.unconditional.log_prob(x), mix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.75), (0.6, 0.4), (0.2, 0.0)])
def test_guided_kernel_and_its_kl_against_torch_distributions(sigma, sigma_next):
    model, _ = default_conditional()
    a, w, c = 0.7, 2.5, 1
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 2, generator=g, dtype=DT)
    # mean and std written out (D2; sigma = 1 uses the next grid sigma in the std_t denominator)
    den = 1 - (sigma_next if sigma >= 1 else sigma)
    std_t = a * math.sqrt(sigma / den)
    dt = sigma_next - sigma
    sig = max(sigma, 1e-300)
    v_w = _velocity_from_score(lambda z: w * _noised_log_density(model.law(c), z, sigma)
                               + (1 - w) * _noised_log_density(model.unconditional, z, sigma), x, sigma) if sigma < 1 else (
        model.unconditional.velocity(x, sigma) + w * (model.law(c).velocity(x, sigma) - model.unconditional.velocity(x, sigma)))
    mean = x + dt * (v_w + std_t**2 / (2 * sig) * (x + (1 - sigma) * v_w))
    step = guided_kernel(model, x, sigma, sigma_next, c, w, a)
    torch.testing.assert_close(step.mean, mean, rtol=1e-9, atol=1e-10)
    assert float(torch.as_tensor(step.std).flatten()[0]) == pytest.approx(std_t * math.sqrt(-dt), rel=1e-12)
    # a student kernel at the same state: KL closed form vs torch.distributions
    v_s = v_w + 0.3 * torch.randn(8, 2, generator=g, dtype=DT)
    from opd_ref import sde_step
    student = sde_step(x, v_s, sigma, sigma_next, a, sigma_one="flowgrpo")
    s = float(torch.as_tensor(step.std).flatten()[0])
    cov = s**2 * torch.eye(2, dtype=DT)
    expected = kl_divergence(MultivariateNormal(student.mean, cov), MultivariateNormal(step.mean, cov))
    torch.testing.assert_close(kernel_kl(student, step), expected, rtol=1e-10, atol=1e-13)


def test_kernel_kl_refuses_different_stds():
    model, _ = default_conditional()
    x = torch.zeros(2, 2, dtype=DT)
    with pytest.raises(ValueError, match="std"):
        kernel_kl(guided_kernel(model, x, 0.5, 0.4, 0, 2.0, 0.7), guided_kernel(model, x, 0.5, 0.4, 0, 2.0, 0.9))


def test_guided_sampler_law_known_cases():
    """w = 1: the flow of p(.|c); w = 0: the flow of p (= the tilted product at w = 0); w = 2: the CFG law
    is neither p(.|c) nor p(.|c)^2 / p (Z) - noising does not commute with the power."""
    model, _ = default_conditional()
    kw = dict(half_width=5.0, n=31, ode_steps=10)
    one = guided_sampler_law(model, 0, 1.0, **kw)
    zero = guided_sampler_law(model, 0, 0.0, **kw)
    two = guided_sampler_law(model, 0, 2.0, **kw)
    assert abs(one["mass"] - 1) < 1e-3 and abs(two["mass"] - 1) < 1e-3
    assert abs(one["kl_to_conditional"]) < 1e-3
    assert abs(zero["kl_to_tilted_product"]) < 1e-3 and zero["kl_to_conditional"] > 1.0
    assert two["kl_to_tilted_product"] > 0.05 and two["kl_to_conditional"] > 0.05


def test_hackable_reward_agrees_on_the_support_and_diverges_off_it():
    model, reward = default_conditional()
    x = torch.tensor([[0.0, -1.0], [3.0, 1.6], [0.0, 1.0]], dtype=DT)
    torch.testing.assert_close(reward.true(x), reward.proxy(x), rtol=0, atol=0)
    up = torch.tensor([[0.0, 2.6], [0.0, 3.6]], dtype=DT)
    torch.testing.assert_close(reward.proxy(up) - reward.true(up), torch.tensor([3.0, 12.0], dtype=DT), rtol=1e-12, atol=1e-12)
    # on the data, the rewards differ only on the ~3% above the threshold
    s = model.law(0).sample(20000, torch.Generator().manual_seed(0))
    frac = float((reward.proxy(s) != reward.true(s)).double().mean())
    assert 0.01 < frac < 0.06


def test_policy_reference_and_student_at_init():
    model, _ = default_conditional()
    policy = ConditionalToyPolicy(conditional_student(model), model)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    for c in range(2):
        with policy.active(None):
            torch.testing.assert_close(policy.velocity(x, 0.4, c), model.law(c).velocity(x, 0.4), rtol=0, atol=0)
            torch.testing.assert_close(policy.velocity(x, 0.4, policy.with_guidance(c, 3.0)),
                                       model.guided_velocity(x, 0.4, c, 3.0), rtol=0, atol=0)
        with policy.active("student"), torch.no_grad():
            torch.testing.assert_close(policy.velocity(x, 0.4, c), model.law(c).velocity(x, 0.4), rtol=1e-9, atol=1e-9)
    assert policy.with_guidance(1, 2) == Guided(1, 2.0)
