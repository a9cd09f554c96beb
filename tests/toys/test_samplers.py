"""Rollouts built on opd_ref.kernels: bookkeeping, sigma = 1 handling, exactness of the flow."""

from __future__ import annotations

import pytest
import torch

from opd_ref.divergences import gaussian_log_prob
from opd_ref.kernels import GaussianStep, ode_step, sde_step
from tests.toys._fixtures import F64, three_mode_gmm
from toys.gmm import GaussianMixture
from toys.samplers import cps_rollout, evaluate_along, ode_rollout, rollout, sde_rollout, sigma_grid


def test_sigma_grid_endpoints_shift_and_bad_input() -> None:
    g = sigma_grid(4)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    gs = sigma_grid(4, shift=3.0)
    assert float(gs[0]) == 1.0 and float(gs[-1]) == 0.0 and bool((gs[1:-1] > g[1:-1]).all())
    with pytest.raises(ValueError, match="n_steps"):
        sigma_grid(0)
    with pytest.raises(ValueError, match="sigma_min"):
        sigma_grid(3, sigma_max=0.2, sigma_min=0.5)


def test_trajectory_bookkeeping_matches_the_kernels() -> None:
    """states/means/stds/log_probs are exactly what opd_ref.kernels and gaussian_log_prob give."""
    p = three_mode_gmm()
    sig = sigma_grid(6)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    tr = sde_rollout(p.velocity, x0, sig, 0.7, torch.Generator().manual_seed(1))
    assert tr.states.shape == (7, 5, 2) and tr.means.shape == (6, 5, 2) and tr.log_probs.shape == (6, 5)
    assert tr.stochastic.tolist() == [False] + [True] * 5  # default: Euler first step at sigma = 1
    torch.testing.assert_close(tr.states[1], ode_step(x0, p.velocity(x0, 1.0), 1.0, float(sig[1])))
    for n in range(1, 6):
        x, s, sn = tr.states[n], float(sig[n]), float(sig[n + 1])
        st = sde_step(x, p.velocity(x, s), s, sn, 0.7)
        torch.testing.assert_close(tr.means[n], st.mean)
        torch.testing.assert_close(tr.stds[n], st.std.flatten())
        torch.testing.assert_close(tr.log_probs[n], gaussian_log_prob(tr.states[n + 1], st))
    torch.testing.assert_close(tr.total_log_prob(), tr.log_probs[1:].sum(0))
    # replaying the same velocity reproduces the log-probs
    ev = evaluate_along(p.velocity, tr)
    torch.testing.assert_close(ev.log_probs, tr.log_probs)
    torch.testing.assert_close(ev.means, tr.means)


def test_sigma_one_conventions() -> None:
    p = three_mode_gmm()
    sig = sigma_grid(4)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match="sigma = 1"):
        sde_rollout(p.velocity, x0, sig, 0.7, sigma_one="error")
    tr = sde_rollout(p.velocity, x0, sig, 0.7, torch.Generator().manual_seed(2), sigma_one="flowgrpo")
    assert bool(tr.stochastic.all())
    st = sde_step(x0, p.velocity(x0, 1.0), 1.0, float(sig[1]), 0.7, sigma_one="flowgrpo")
    torch.testing.assert_close(tr.means[0], st.mean)
    # CPS is finite at sigma = 1 and deterministic at sigma_next = 0
    trc = cps_rollout(p.velocity, x0, sig, 0.5, torch.Generator().manual_seed(3))
    assert trc.stochastic.tolist() == [True, True, True, False]
    assert float(trc.stds[-1].abs().max()) == 0.0


def test_zero_noise_sde_and_cps_equal_the_ode_rollout() -> None:
    p = three_mode_gmm()
    sig = sigma_grid(5, shift=2.0)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    ode = ode_rollout(p.velocity, x0, sig)
    for tr in (sde_rollout(p.velocity, x0, sig, 0.0), cps_rollout(p.velocity, x0, sig, 0.0)):
        torch.testing.assert_close(tr.states, ode.states, rtol=1e-13, atol=1e-13)
        assert not bool(tr.stochastic.any())


def test_rollout_gradients_only_when_asked() -> None:
    mean = torch.zeros(2, dtype=F64, requires_grad=True)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def v(x, s):
        return GaussianMixture.gaussian(mean, torch.eye(2, dtype=F64)).velocity(x, s)

    tr = ode_rollout(v, x0, sigma_grid(3))
    assert not tr.final.requires_grad
    tr = ode_rollout(v, x0, sigma_grid(3), grad=True)
    (g,) = torch.autograd.grad(tr.final.sum(), mean)
    # N(m, I) data: e_n = dx_n/dm - (1 - sigma_n) obeys e_{n+1} = e_n (1 + dt k_n) with e_0 = 0 (x_init is
    # fixed, sigma_0 = 1), so every Euler state has dx_n/dm = (1 - sigma_n) I exactly; at sigma_N = 0 the
    # gradient of the sum over B = 3 samples is (3, 3)
    torch.testing.assert_close(g, torch.full((2,), 3.0, dtype=F64), rtol=1e-12, atol=1e-12)


def test_bad_input_raises() -> None:
    p = three_mode_gmm()
    x0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(p.velocity, x0, torch.tensor([0.5, 0.7], dtype=F64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rollout(p.velocity, x0, torch.tensor([1.5, 0.7], dtype=F64))
    with pytest.raises(ValueError, match="kind"):
        rollout(p.velocity, x0, sigma_grid(2), "euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x_init"):
        rollout(p.velocity, torch.zeros(3, dtype=F64), sigma_grid(2))
    with pytest.raises(ValueError, match="noise_level"):
        cps_rollout(p.velocity, x0, sigma_grid(2), 1.5)
    with pytest.raises(ValueError, match="velocity returned"):
        rollout(lambda x, s: x[:, :1], x0, sigma_grid(2))
    with pytest.raises(TypeError, match="Trajectory"):
        evaluate_along(p.velocity, GaussianStep(x0, torch.ones(3, 1, dtype=F64)))  # type: ignore[arg-type]
