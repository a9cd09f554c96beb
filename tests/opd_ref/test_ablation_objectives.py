"""The distillation-objective ablation's per-step objectives (D16, ``fwd_kl``, ``dmd``, ``bregman_*``)
against independent oracles: torch.distributions KLs, Gauss-Hermite quadrature of the exact
f-divergence between the two Gaussian kernels, and the DMD surrogate written out with the state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, kl_divergence

from opd_ref.engine import METHODS, OBJECTIVES, KernelSpec, ObjectiveSpec, StepInputs

DT = torch.float64
NEW = ("fwd_kl", "dmd", "bregman_kl", "bregman_reverse_kl", "bregman_pearson_chi2", "bregman_jensen_shannon")
GH_U, GH_W = np.polynomial.hermite_e.hermegauss(120)
GH_W = GH_W / math.sqrt(2.0 * math.pi)  # E_{u ~ N(0,1)} f(u) = sum_j w_j f(u_j)


def _case(seed: int, kind: str = "sde", sigma: float = 0.6, sigma_next: float = 0.5, scale: float = 0.4, B: int = 3):
    g = torch.Generator().manual_seed(seed)
    coef = KernelSpec(kind, 0.7).coefficients(sigma, sigma_next)
    x = torch.randn(B, 2, generator=g, dtype=DT)
    v_T = torch.randn(B, 2, generator=g, dtype=DT)
    # the student's velocity: a gap scaled so that delta = |Delta| / s is O(scale)
    v0 = v_T + scale * coef.std / abs(coef.c_v) * torch.randn(B, 2, generator=g, dtype=DT)
    return coef, x, v_T, v0


def _grad(name, coef, v0, v_T, noise):
    v = v0.clone().requires_grad_(True)
    out = ObjectiveSpec(name)(StepInputs(coef, v, v0.clone(), noise, v_T))
    (g,) = torch.autograd.grad(out.loss.sum(), v)
    return out, g


def test_registry_holds_the_ablation_objectives():
    for name in NEW:
        assert name in METHODS and OBJECTIVES[name].family == "distill"
        assert set(OBJECTIVES[name].kernels) == {"sde", "cps"}
        ObjectiveSpec(name)  # accepted by the spec validation


# ------------------------------------------------------------------------------------------ fwd_kl
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_fwd_kl_antithetic_mean_is_closed_form_forward_kl(kind):
    """The estimator is affine in eps: its mean over {eps, -eps} is exact.  Oracle: torch.distributions
    KL(pi_T || pi_theta) (forward) and its autograd gradient."""
    coef, x, v_T, v0 = _case(1, kind)
    eps = torch.randn(v0.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    out_p, g_p = _grad("fwd_kl", coef, v0, v_T, eps)
    out_m, g_m = _grad("fwd_kl", coef, v0, v_T, -eps)
    v = v0.clone().requires_grad_(True)
    s = torch.full_like(v0, coef.std)
    student = Independent(Normal(coef.c_x * x + coef.c_v * v, s), 1)
    teacher = Independent(Normal(coef.c_x * x + coef.c_v * v_T, s), 1)
    fwd = kl_divergence(teacher, student)
    (g_fwd,) = torch.autograd.grad(fwd.sum(), v)
    torch.testing.assert_close(0.5 * (out_p.loss + out_m.loss).detach(), fwd.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(0.5 * (g_p + g_m), g_fwd, rtol=1e-12, atol=1e-14)
    # and the closed-form forward KL equals the reverse KL in value and gradient (same covariance)
    rev = kl_divergence(Independent(Normal(coef.c_x * x + coef.c_v * v, s), 1), teacher)
    (g_rev,) = torch.autograd.grad(rev.sum(), v)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_fwd, g_rev, rtol=1e-12, atol=1e-14)
    # the single-draw gradient is not the closed form (the eps term is its noise)
    assert float((g_p - g_fwd).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------- dmd
@given(sigma=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_dmd_gradient_is_score_difference_through_x0_hat(sigma, seed):
    """Oracle: autograd of <sg[s_theta(x) - s_T(x)], x - sigma v_theta(x)> with the scores written from
    the state, s = -(x + (1 - sigma) v) / sigma; and the closed form (1 - sigma)(v - v_T)."""
    coef, x, v_T, v0 = _case(seed, "sde", sigma, sigma * 0.9)
    _, g = _grad("dmd", coef, v0, v_T, torch.zeros_like(v0))
    v = v0.clone().requires_grad_(True)
    score = lambda vel: -(x + (1.0 - sigma) * vel) / sigma  # noqa: E731
    x0_hat = x - sigma * v
    (g_ref,) = torch.autograd.grad(((score(v0) - score(v_T)) * x0_hat).sum(), v)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, (1.0 - sigma) * (v0 - v_T), rtol=1e-10, atol=1e-12)


def test_dmd_gradient_vanishes_at_sigma_one():
    coef, x, v_T, v0 = _case(2, "sde", 1.0, 0.9)
    _, g = _grad("dmd", coef, v0, v_T, torch.zeros_like(v0))
    assert float(g.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------- bregman
def _f_divergence(h_name, delta):
    r"""Independent oracle: :math:`\mathbb E_{\pi_T}[h(r)]` with :math:`\log r = \delta u - \delta^2/2`,
    u ~ N(0,1) (the kernel ratio depends on the teacher draw only through its projection on Delta),
    by Gauss-Hermite quadrature, with h written anew here."""
    u = torch.as_tensor(GH_U, dtype=DT)
    w = torch.as_tensor(GH_W, dtype=DT)
    lr = delta[:, None] * u - 0.5 * delta[:, None] ** 2
    r = torch.exp(lr)
    h = {
        "kl": r * lr,
        "reverse_kl": -lr,
        "pearson_chi2": (r - 1.0) ** 2,
        "jensen_shannon": 0.5 * (r * torch.log(2.0 * r / (1.0 + r)) + torch.log(2.0 / (1.0 + r))),
    }[h_name]
    return (w * h).sum(-1)


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("h_name", ["kl", "reverse_kl", "pearson_chi2", "jensen_shannon"])
def test_bregman_expected_gradient_is_gradient_of_f_divergence(kind, h_name):
    """E_eps of the bregman_H gradient (Gauss-Hermite over the component of eps along Delta; the weight
    depends on eps only there) equals autograd of the exact f-divergence D_h(pi_theta || pi_T)."""
    coef, x, v_T, v0 = _case(3, kind, scale=0.8)
    e = (coef.c_v * (v0 - v_T)) / (coef.c_v * (v0 - v_T)).norm(dim=1, keepdim=True)  # unit Delta direction
    g_mean = torch.zeros_like(v0)
    for u, w in zip(GH_U, GH_W):
        _, g = _grad(f"bregman_{h_name}", coef, v0, v_T, float(u) * e)
        g_mean += float(w) * g
    v = v0.clone().requires_grad_(True)
    delta = (coef.c_v * (v - v_T)).norm(dim=1) / coef.std
    (g_ref,) = torch.autograd.grad(_f_divergence(h_name, delta).sum(), v, retain_graph=True)
    torch.testing.assert_close(g_mean, g_ref, rtol=1e-9, atol=1e-12)
    if h_name == "pearson_chi2":  # closed form chi^2 = exp(delta^2) - 1 as a second oracle
        (g_cf,) = torch.autograd.grad(torch.expm1(delta**2).sum(), v)
        torch.testing.assert_close(g_mean, g_cf, rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 10_000), sigma=st.floats(0.1, 0.95))
def test_bregman_kl_equals_opd_kl_per_draw(seed, sigma):
    """h = r log r has weight 1: the gradient is the pathwise closed-form KL's at every draw."""
    coef, x, v_T, v0 = _case(seed, "sde", sigma, sigma * 0.8)
    eps = torch.randn(v0.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    _, g = _grad("bregman_kl", coef, v0, v_T, eps)
    _, g_kl = _grad("opd_kl", coef, v0, v_T, eps)
    torch.testing.assert_close(g, g_kl, rtol=1e-10, atol=1e-13)
