"""D11: Bregman density-ratio matching on 1D Gaussians, checked by Gauss-Legendre quadrature.

Oracles: torch.distributions KLs, a completed-square closed form for Pearson chi^2, the direct
Jensen-Shannon definition (mixture m), and autograd of the exact objective E_T[D_h(r || 1)].
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from opd_ref.bregman import (
    H_FAMILY,
    JENSEN_SHANNON,
    KL,
    bregman_divergence,
    bregman_generator_surrogate,
    bregman_gradient_weight,
    get_h,
)
from opd_ref.distribution_matching import distribution_matching_surrogate

D = torch.float64
_GL_X, _GL_W = (torch.tensor(a, dtype=D) for a in np.polynomial.legendre.leggauss(600))


def _gl(lo, hi):
    """Gauss-Legendre nodes/weights on [lo, hi] (600 nodes: error << 1e-10 for these integrands)."""
    return 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo), 0.5 * (hi - lo) * _GL_W


def _objective(h, mu, log_s, m, v):
    """E_{p_T}[D_h(r || 1)] by quadrature in x (differentiable in mu, log_s)."""
    x, w = _gl(-25.0, 25.0)
    lt = Normal(m, v).log_prob(x)
    lr = Normal(mu, torch.exp(log_s)).log_prob(x) - lt
    return (w * torch.exp(lt) * bregman_divergence(lr, h)).sum()


def _pearson_closed_form(m1, s1, m2, s2):
    # int p1^2 / p2 = s2 / (sqrt(2 pi) s1^2) int exp(-A x^2 + B x - C) dx, A > 0 required
    A = 1 / s1**2 - 1 / (2 * s2**2)
    B = 2 * m1 / s1**2 - m2 / s2**2
    C = m1**2 / s1**2 - m2**2 / (2 * s2**2)
    return s2 / (math.sqrt(2 * math.pi) * s1**2) * math.sqrt(math.pi / A) * math.exp(B**2 / (4 * A) - C) - 1


def _js_direct(m1, s1, m2, s2):
    x, w = _gl(-25.0, 25.0)
    lp = Normal(torch.tensor(m1, dtype=D), s1).log_prob(x)
    lq = Normal(torch.tensor(m2, dtype=D), s2).log_prob(x)
    lmix = torch.logaddexp(lp, lq) - math.log(2.0)  # log of the mixture (p + q) / 2, underflow-safe
    return float((w * 0.5 * (lp.exp() * (lp - lmix) + lq.exp() * (lq - lmix))).sum())


# s / v <= 1.11 keeps Pearson chi^2 finite (it needs s < sqrt(2) v) with light tails
params = dict(mu=st.floats(-1.5, 1.5), s=st.floats(0.6, 1.0), m=st.floats(-1.5, 1.5), v=st.floats(0.9, 1.3))


@given(**params)
def test_each_h_recovers_its_named_divergence(mu, s, m, v):
    p, t = Normal(torch.tensor(mu, dtype=D), s), Normal(torch.tensor(m, dtype=D), v)
    args = (torch.tensor(mu, dtype=D), torch.log(torch.tensor(s, dtype=D)), torch.tensor(m, dtype=D), v)
    want = {
        "kl": float(kl_divergence(p, t)),
        "reverse_kl": float(kl_divergence(t, p)),
        "pearson_chi2": _pearson_closed_form(mu, s, m, v),
        "jensen_shannon": _js_direct(mu, s, m, v),
    }
    assert set(want) == set(H_FAMILY)
    for name, value in want.items():
        got = float(_objective(name, *args))
        assert abs(got - value) < 1e-9 * max(1.0, abs(value)), (name, got, value)


@given(**params, name=st.sampled_from(sorted(H_FAMILY)))
def test_gradient_formula_equals_autograd_of_exact_objective(mu, s, m, v, name):
    # generator x = mu + s z; E_z[h''(r) r (s_fake - s_real)(x) dx/dtheta] by quadrature in z,
    # through the surrogate's autograd; against autograd of the exact objective.
    mu_t = torch.tensor(mu, dtype=D, requires_grad=True)
    log_s = torch.tensor(math.log(s), dtype=D, requires_grad=True)
    want = torch.autograd.grad(_objective(name, mu_t, log_s, torch.tensor(m, dtype=D), v), (mu_t, log_s))
    z, wz = _gl(-20.0, 20.0)
    wz = wz * Normal(torch.tensor(0.0, dtype=D), 1.0).log_prob(z).exp()
    x = (mu_t + torch.exp(log_s) * z)[:, None]
    with torch.no_grad():
        s_fake = -(x - mu) / s**2
        s_real = -(x - m) / v**2
        f64 = lambda a: torch.tensor(a, dtype=D)  # noqa: E731 (python floats would make Normal float32)
        log_r = Normal(f64(mu), f64(s)).log_prob(x[:, 0]) - Normal(f64(m), f64(v)).log_prob(x[:, 0])
    ell = bregman_generator_surrogate(x, s_fake, s_real, log_r, name)
    got = torch.autograd.grad((wz * ell).sum(), (mu_t, log_s))
    for g_, w_ in zip(got, want):
        assert abs(float(g_) - float(w_)) < 1e-8 * max(1.0, abs(float(w_))), (name, float(g_), float(w_))


@given(lr=st.floats(-5.0, 5.0), lr_star=st.floats(-3.0, 3.0), name=st.sampled_from(sorted(H_FAMILY)))
def test_pointwise_properties(lr, lr_star, name):
    h = get_h(name)
    lr_t, lrs_t = torch.tensor([lr], dtype=D), torch.tensor([lr_star], dtype=D)
    assert float(h.h(torch.zeros(1, dtype=D))) == pytest.approx(0.0, abs=1e-15)  # h(1) = 0
    assert float(bregman_divergence(lr_t, h, lrs_t)) >= -1e-12  # convexity
    assert float(bregman_divergence(lrs_t, h, lrs_t)) == pytest.approx(0.0, abs=1e-12)
    # h' and h'' r against autograd of h(r) in r
    r = torch.exp(lr_t).requires_grad_(True)
    (d1,) = torch.autograd.grad(h.h(torch.log(r)).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    torch.testing.assert_close(d1.detach(), h.h_prime(lr_t), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(d2 * r.detach(), bregman_gradient_weight(lr_t, h), atol=1e-9, rtol=1e-9)


def test_kl_weight_is_dmd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, generator=g, dtype=D)
    sf, sr, lr = torch.randn(5, 2, generator=g, dtype=D), torch.randn(5, 2, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    w = torch.rand(5, generator=g, dtype=D)
    torch.testing.assert_close(bregman_generator_surrogate(x, sf, sr, lr, KL, w), distribution_matching_surrogate(x, sf, sr, w))
    js = bregman_generator_surrogate(x, sf, sr, lr, JENSEN_SHANNON, w)
    torch.testing.assert_close(js, distribution_matching_surrogate(x, sf, sr, w / (2 * (1 + lr.exp()))))


def test_bad_input():
    x = torch.zeros(3, 2, dtype=D)
    with pytest.raises(ValueError, match="h must be a BregmanH or one of"):
        bregman_gradient_weight(torch.zeros(3, dtype=D), "hellinger")
    with pytest.raises(ValueError, match=r"log_ratio must have shape \(3,\)"):
        bregman_generator_surrogate(x, x, x, torch.zeros(2, dtype=D), "kl")
    with pytest.raises(ValueError, match="log_ratio contains 1 non-finite"):
        bregman_divergence(torch.tensor([0.0, float("inf")], dtype=D), "kl")
    with pytest.raises(ValueError, match="log_ratio_star must have the shape"):
        bregman_divergence(torch.zeros(2, dtype=D), "kl", torch.zeros(3, dtype=D))
