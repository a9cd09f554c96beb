"""Numerics that once gave silent wrong results: the meaning of a 1-D std, half-precision sigmas, and
the PPO surrogate of an all-equal-reward group."""

import math

import pytest
import torch

from opd_ref import GaussianStep, cps_step, gaussian_log_prob, ode_step, opd_kl_loss, ppo_surrogate_loss, sde_step
from opd_ref.engine import KernelSpec, ObjectiveSpec, StepInputs

F64 = torch.float64


def test_a_1d_std_is_per_sample_everywhere():
    # B = 3 equals the last event dim: before, GaussianStep broadcast a (3,) std per dimension while
    # opd_kl_loss read it per sample
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 3, generator=g, dtype=F64)
    x = torch.randn(3, 3, generator=g, dtype=F64)
    t_mean = torch.randn(3, 3, generator=g, dtype=F64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    step = GaussianStep(mean, std)
    assert step.std.shape == (3, 1)
    per_sample = torch.distributions.Normal(mean, std[:, None])
    torch.testing.assert_close(gaussian_log_prob(x, step), per_sample.log_prob(x).sum(1), rtol=1e-13, atol=0)
    want_kl = torch.distributions.kl_divergence(per_sample, torch.distributions.Normal(t_mean, std[:, None])).sum(1)
    torch.testing.assert_close(opd_kl_loss(step, t_mean), want_kl, rtol=1e-13, atol=0)
    eps = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(step.sample(torch.Generator().manual_seed(1)), mean + std[:, None] * eps)
    with pytest.raises(ValueError, match=r"GaussianStep.std of shape \(4,\) is ambiguous"):
        GaussianStep(torch.zeros(3, 4, dtype=F64), torch.ones(4, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_keep_float32_coefficients(dtype):
    x = torch.zeros(2, 4, dtype=dtype)
    v = torch.ones(2, 4, dtype=dtype)
    want_std = 0.7 * math.sqrt(0.995 / 0.005) * math.sqrt(0.005)  # 0.698, not 0.984 from bf16 sigmas
    st = sde_step(x, v, 0.995, 0.99, 0.7)
    assert st.std.dtype == torch.float32
    assert float(st.std.flatten()[0]) == pytest.approx(want_std, rel=1e-6)
    assert float(cps_step(x, v, 0.995, 0.99, 0.7).std.flatten()[0]) == pytest.approx(0.99 * math.sin(0.35 * math.pi), rel=1e-6)
    torch.testing.assert_close(ode_step(x, v, 0.995, 0.99), torch.full((2, 4), -0.005, dtype=torch.float32))


@pytest.mark.parametrize("clip", [None, 0.2])
def test_ppo_surrogate_is_zero_at_zero_advantage_even_when_the_ratio_overflows(clip):
    lp = torch.tensor([100.0, 1000.0, 0.1], dtype=torch.float32, requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([0.0, 0.0, 1.0])
    loss = ppo_surrogate_loss(lp, old, adv, clip)
    assert bool(torch.isfinite(loss).all()) and float(loss[0]) == 0.0 and float(loss[1]) == 0.0
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert bool(torch.isfinite(g).all()) and float(g[0]) == 0.0
    # the engine's GRPO objective uses the same formula
    c = KernelSpec("sde", 0.7).coefficients(0.5, 0.4)
    v_old = torch.zeros(3, 2)
    v = torch.full((3, 2), 50.0)  # far from the behaviour policy: log-ratio in the hundreds
    out = ObjectiveSpec("grpo", clip_range=clip)(StepInputs(c, v, v_old, torch.ones(3, 2), None, adv))
    assert float(out.loss[0]) == 0.0 and float(out.loss[1]) == 0.0
