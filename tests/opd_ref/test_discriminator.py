"""D14: density ratio by classification, checked exactly.

Oracles: torch's binary_cross_entropy_with_logits (the loss), grid quadrature of the population
logistic loss on 2D Gaussian-mixture pairs with closed-form noised marginals (the Bayes-optimal
logit), Gauss-Legendre quadrature and autograd of KL - 2 JS written anew (the GAN generator
gradient), closed-form Gaussian scores (the discriminator's input gradient).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from opd_ref.discriminator import (
    bayes_optimal_logit,
    discriminator_log_ratio,
    discriminator_logistic_loss,
    gan_generator_loss,
    log_prior_ratio,
    logit_to_log_ratio,
)
from toys.gmm import GaussianMixture
from toys.metrics import quadrature_grid

D = torch.float64
_GL_X, _GL_W = (torch.tensor(a, dtype=D) for a in np.polynomial.legendre.leggauss(600))


def _gl(lo, hi):
    return 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo), 0.5 * (hi - lo) * _GL_W


@given(n_s=st.integers(1, 7), n_t=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_loss_is_pooled_binary_cross_entropy(n_s, n_t, seed):
    g = torch.Generator().manual_seed(seed)
    ds, dt = 3 * torch.randn(n_s, generator=g, dtype=D), 3 * torch.randn(n_t, generator=g, dtype=D)
    labels = torch.cat([torch.ones(n_s, dtype=D), torch.zeros(n_t, dtype=D)])
    want = binary_cross_entropy_with_logits(torch.cat([ds, dt]), labels)  # mean over all n_s + n_t
    torch.testing.assert_close(discriminator_logistic_loss(ds, dt), want, rtol=1e-13, atol=0)


def _pair(seed):
    """Two random 2-component 2D GMMs (teacher, student)."""
    g = torch.Generator().manual_seed(seed)

    def mix():
        w = torch.rand(2, generator=g, dtype=D) + 0.3
        m = 2.0 * torch.randn(2, 2, generator=g, dtype=D)
        a = 0.5 * torch.randn(2, 2, 2, generator=g, dtype=D)
        return GaussianMixture(w / w.sum(), m, a @ a.transpose(-1, -2) + 0.15 * torch.eye(2, dtype=D))

    return mix(), mix()


@given(sigma=st.floats(0.05, 0.9), n_s=st.integers(1, 5), n_t=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_bayes_optimal_logit_minimises_population_loss(sigma, n_s, n_t, seed):
    # P(d) = int pi_s p_s,sigma sp(-d) + pi_t p_t,sigma sp(d) over a 2D grid (the noised marginals are
    # closed form); at d* = log p_s - log p_t + log(n_s/n_t) the pointwise derivative
    # pi_t p_t sigmoid(d) - pi_s p_s sigmoid(-d) vanishes, and P(d* + e f) - P(d*) equals the second
    # order term e^2/2 int (pi_s p_s + pi_t p_t) sigmoid(d*) sigmoid(-d*) f^2 up to O(e^3)
    teacher, student = _pair(seed)
    pts, area = quadrature_grid(torch.zeros(2, dtype=D), 9.0, 121)
    ls, lt = student.marginal_log_prob(pts, sigma), teacher.marginal_log_prob(pts, sigma)
    pi_s, pi_t = n_s / (n_s + n_t), n_t / (n_s + n_t)
    mass = pi_s * ls.exp() + pi_t * lt.exp()
    d_star = bayes_optimal_logit(ls, lt, n_s, n_t)

    def pop(d):
        return float(area * (pi_s * ls.exp() * softplus(-d) + pi_t * lt.exp() * softplus(d)).sum())

    deriv = pi_t * lt.exp() * torch.sigmoid(d_star) - pi_s * ls.exp() * torch.sigmoid(-d_star)
    assert float((deriv.abs() / mass).max()) < 1e-12
    base = pop(d_star)
    for f in (torch.ones_like(d_star), torch.sin(pts[:, 0]) + 0.3 * pts[:, 1]):
        curv = float(area * (mass * torch.sigmoid(d_star) * torch.sigmoid(-d_star) * f**2).sum())
        for e in (-0.05, 0.05):
            gain = pop(d_star + e * f) - base
            assert gain > 0, (e, gain)
            # third-order remainder: |sp'''| <= 0.1 and |f| <= 6 on the grid, so |R| <= e^3/6 * 0.1 * 216 * mass
            assert abs(gain - 0.5 * e**2 * curv) < 0.1 * 216 * abs(e) ** 3 / 6, (gain, 0.5 * e**2 * curv)


def test_prior_ratio_and_logit_to_log_ratio():
    assert log_prior_ratio(3, 1) == pytest.approx(math.log(3.0), abs=1e-15)
    ls, lt = torch.tensor([0.2, -1.0], dtype=D), torch.tensor([-0.5, 0.7], dtype=D)
    torch.testing.assert_close(logit_to_log_ratio(bayes_optimal_logit(ls, lt, 5, 2), 5, 2), ls - lt, rtol=0, atol=1e-15)


def _kl_minus_2js(mu, log_s, m, v):
    """KL(p || t) - 2 JS(p, t) for 1D Gaussians by quadrature (differentiable in mu, log_s)."""
    x, w = _gl(-25.0, 25.0)
    lp = Normal(mu, torch.exp(log_s)).log_prob(x)
    lt = Normal(m, v).log_prob(x)
    lmix = torch.logaddexp(lp, lt) - math.log(2.0)
    kl = (w * lp.exp() * (lp - lt)).sum()
    js = (w * 0.5 * (lp.exp() * (lp - lmix) + lt.exp() * (lt - lmix))).sum()
    return kl - 2 * js


@given(mu=st.floats(-1.5, 1.5), s=st.floats(0.6, 1.2), m=st.floats(-1.5, 1.5), v=st.floats(0.7, 1.3))
def test_gan_generator_gradient_is_kl_minus_two_js(mu, s, m, v):
    # Diffusion-GAN's non-saturating loss sp(log r(G(z))) at the Bayes-optimal (frozen) logit: its
    # expected gradient over z is the gradient of KL(p||t) - 2 JS(p, t)
    mu_t = torch.tensor(mu, dtype=D, requires_grad=True)
    log_s = torch.tensor(math.log(s), dtype=D, requires_grad=True)
    m_t = torch.tensor(m, dtype=D)
    want = torch.autograd.grad(_kl_minus_2js(mu_t, log_s, m_t, v), (mu_t, log_s))
    z, wz = _gl(-20.0, 20.0)
    wz = wz * Normal(torch.tensor(0.0, dtype=D), 1.0).log_prob(z).exp()
    x = mu_t + torch.exp(log_s) * z
    frozen = Normal(torch.tensor(mu, dtype=D), torch.tensor(s, dtype=D))  # the discriminator does not move
    log_r = bayes_optimal_logit(frozen.log_prob(x), Normal(m_t, v).log_prob(x))
    got = torch.autograd.grad((wz * gan_generator_loss(log_r)).sum(), (mu_t, log_s))
    for g_, w_ in zip(got, want):
        assert abs(float(g_) - float(w_)) < 1e-8 * max(1.0, abs(float(w_))), (float(g_), float(w_))


def test_discriminator_log_ratio_returns_exact_score_difference():
    # logit_fn = the Bayes-optimal logit of two Gaussians in 2D (prior 3:2): the returned log-ratio and
    # input gradient equal log p - log t and the closed-form score difference
    g = torch.Generator().manual_seed(0)
    mp, mt = torch.tensor([0.5, -0.2], dtype=D), torch.tensor([-0.3, 0.4], dtype=D)
    cp, ct = torch.tensor([[1.0, 0.3], [0.3, 0.7]], dtype=D), torch.tensor([[0.6, -0.1], [-0.1, 0.9]], dtype=D)
    p = torch.distributions.MultivariateNormal(mp, cp)
    t = torch.distributions.MultivariateNormal(mt, ct)

    def logit_fn(x, sigma):
        return bayes_optimal_logit(p.log_prob(x), t.log_prob(x), 3, 2) + 0.0 * sigma

    x = torch.randn(6, 2, generator=g, dtype=D)
    log_r, grad = discriminator_log_ratio(logit_fn, x, 0.4, 3, 2)
    torch.testing.assert_close(log_r, p.log_prob(x) - t.log_prob(x), rtol=0, atol=1e-13)
    score_diff = -(x - mp) @ torch.linalg.inv(cp) + (x - mt) @ torch.linalg.inv(ct)
    torch.testing.assert_close(grad, score_diff, rtol=0, atol=1e-12)
    assert not log_r.requires_grad and not grad.requires_grad


def test_bad_input():
    with pytest.raises(ValueError, match=r"logit_student must have shape \(n,\), got \(2, 2\)"):
        discriminator_logistic_loss(torch.zeros(2, 2, dtype=D), torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="n_teacher must be a positive int, got 0"):
        bayes_optimal_logit(torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), 1, 0)
    with pytest.raises(TypeError, match="n_student must be a positive int, got float"):
        log_prior_ratio(1.5, 1)
    with pytest.raises(ValueError, match="log_p_teacher must have the shape of log_p_student"):
        bayes_optimal_logit(torch.zeros(2, dtype=D), torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match=r"logit_fn must return shape \(4,\), got \(4, 1\)"):
        discriminator_log_ratio(lambda x, s: x[:, :1], torch.zeros(4, 2, dtype=D), 0.5)
    with pytest.raises(TypeError, match="logit_fn must be callable"):
        discriminator_log_ratio(3, torch.zeros(4, 2, dtype=D), 0.5)
    with pytest.raises(ValueError, match=r"log_ratio must have shape \(B,\)"):
        gan_generator_loss(torch.zeros(2, 2, dtype=D))
