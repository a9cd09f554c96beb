"""D15: Di-Bregman with a normalised reward target, E_T[D_h(r || r*)], checked exactly.

Oracles: Gauss-Legendre quadrature and autograd of the exact objective (1D Gaussians), the Gaussian
tilt and its log Z written anew below, torch.distributions' KL, and grid quadrature on a 2D GMM whose
tilt is toys.gmm's closed form.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from opd_ref.bregman import H_FAMILY, bregman_divergence, bregman_generator_surrogate
from opd_ref.reward_bregman import normalized_reward_log_ratio, reward_bregman_generator_surrogate
from toys.gmm import GaussianMixture
from toys.metrics import quadrature_grid
from toys.rewards import QuadraticReward
from toys.students import GMMStudent

D = torch.float64
_GL_X, _GL_W = (torch.tensor(a, dtype=D) for a in np.polynomial.legendre.leggauss(600))


def _gl(lo, hi):
    return 0.5 * (hi - lo) * _GL_X + 0.5 * (hi + lo), 0.5 * (hi - lo) * _GL_W


def _f64(a):
    return torch.tensor(a, dtype=D)


class Problem:
    """Teacher N(m, v^2), reward R(x) = -a/2 (x - c)^2, temperature beta; p* = N(m*, v*^2) with
    1/v*^2 = 1/v^2 + a/beta, m* = v*^2 (m/v^2 + a c/beta), and
    log Z = log E_T[e^{R/beta}] = -1/2 log(1 + k v^2) - k (m - c)^2 / (2 (1 + k v^2)), k = a/beta."""

    def __init__(self, m, v, a, c, beta):
        self.m, self.v, self.a, self.c, self.beta = m, v, a, c, beta
        k = a / beta
        self.v_star = (1 / v**2 + k) ** -0.5
        self.m_star = self.v_star**2 * (m / v**2 + k * c)
        self.log_z = -0.5 * math.log1p(k * v**2) - k * (m - c) ** 2 / (2 * (1 + k * v**2))

    def reward(self, x):
        return -0.5 * self.a * (x - self.c) ** 2

    def reward_grad(self, x):
        return -self.a * (x - self.c)

    def objective(self, h, mu, log_s, log_z_shift=0.0):
        """E_T[D_h(r || r*)] by quadrature in x (differentiable in mu, log_s)."""
        x, w = _gl(-25.0, 25.0)
        lt = Normal(_f64(self.m), self.v).log_prob(x)
        lr = Normal(mu, torch.exp(log_s)).log_prob(x) - lt
        lrs = normalized_reward_log_ratio(self.reward(x), self.beta, self.log_z + log_z_shift)
        return (w * torch.exp(lt) * bregman_divergence(lr, h, lrs)).sum()


# k = a / beta <= 0.5 and a generator scale s <= 1 keep every objective finite: reverse KL needs
# E_theta[1 / r*] = Z E_theta[e^{k (x - c)^2 / 2}] < inf, i.e. k < 1 / s^2 (a margin of 0.5 keeps the tails light)
problems = dict(m=st.floats(-1.0, 1.0), v=st.floats(0.8, 1.2), a=st.floats(0.0, 0.6), c=st.floats(-1.5, 1.5),
                beta=st.floats(1.2, 2.0))


@given(**problems)
def test_log_z_normalises_the_reward_ratio(m, v, a, c, beta):
    # E_T[r*] = 1 and log r* = log p* - log p_T pointwise
    pb = Problem(m, v, a, c, beta)
    x, w = _gl(-25.0, 25.0)
    lt = Normal(_f64(m), v).log_prob(x)
    lrs = normalized_reward_log_ratio(pb.reward(x), beta, pb.log_z)
    assert abs(float((w * torch.exp(lt + lrs)).sum()) - 1.0) < 1e-12
    want = Normal(_f64(pb.m_star), pb.v_star).log_prob(x) - lt
    torch.testing.assert_close(lrs, want, rtol=0, atol=1e-10)


@given(**problems, mu=st.floats(-1.5, 1.5), s=st.floats(0.7, 1.0), name=st.sampled_from(sorted(H_FAMILY)))
def test_gradient_formula_equals_autograd_of_exact_objective(m, v, a, c, beta, mu, s, name):
    # generator x = mu + s z; E_z of the surrogate's gradient (quadrature in z) against autograd of the
    # exact objective (quadrature in x), in mu and log s
    pb = Problem(m, v, a, c, beta)
    mu_t, log_s = _f64(mu).requires_grad_(True), _f64(math.log(s)).requires_grad_(True)
    want = torch.autograd.grad(pb.objective(name, mu_t, log_s), (mu_t, log_s))
    z, wz = _gl(-20.0, 20.0)
    wz = wz * Normal(_f64(0.0), 1.0).log_prob(z).exp()
    x = (mu_t + torch.exp(log_s) * z)[:, None]
    with torch.no_grad():
        xd = x[:, 0]
        s_fake, s_real = (-(xd - mu) / s**2)[:, None], (-(xd - m) / v**2)[:, None]
        log_r = Normal(_f64(mu), _f64(s)).log_prob(xd) - Normal(_f64(m), _f64(v)).log_prob(xd)
        log_rs = normalized_reward_log_ratio(pb.reward(xd), beta, pb.log_z)
        grad_rs = (pb.reward_grad(xd) / beta)[:, None]
    ell = reward_bregman_generator_surrogate(x, s_fake, s_real, log_r, log_rs, grad_rs, name)
    got = torch.autograd.grad((wz * ell).sum(), (mu_t, log_s))
    for g_, w_ in zip(got, want):
        assert abs(float(g_) - float(w_)) < 1e-8 * max(1.0, abs(float(w_))), (name, float(g_), float(w_))


@given(**problems, name=st.sampled_from(sorted(H_FAMILY)), mu=st.floats(-1.5, 1.5), s=st.floats(0.6, 1.0))
def test_minimiser_is_the_tilted_teacher(m, v, a, c, beta, name, mu, s):
    # at p_theta = p* the objective and its gradient vanish; elsewhere it is positive; for h = r log r it
    # is KL(p_theta || p*) itself (torch.distributions)
    pb = Problem(m, v, a, c, beta)
    mu_s, ls_s = _f64(pb.m_star).requires_grad_(True), _f64(math.log(pb.v_star)).requires_grad_(True)
    val = pb.objective(name, mu_s, ls_s)
    grads = torch.autograd.grad(val, (mu_s, ls_s))
    assert abs(float(val.detach())) < 1e-12 and max(abs(float(g)) for g in grads) < 1e-9, (float(val.detach()), grads)
    other = float(pb.objective(name, _f64(mu), _f64(math.log(s))))
    off = abs(mu - pb.m_star) + abs(s - pb.v_star)
    if off > 0.05:
        assert other > 0, other
    if name == "kl":
        want = float(kl_divergence(Normal(_f64(mu), s), Normal(_f64(pb.m_star), pb.v_star)))
        assert abs(other - want) < 1e-9 * max(1.0, want), (other, want)


@pytest.mark.parametrize("name", sorted(H_FAMILY))
def test_unnormalised_reward_moves_the_minimiser_except_for_kl(name):
    # with log Z off by 0.5 (r* scaled by e^-0.5) the gradient at p* is zero for h = r log r only
    pb = Problem(0.2, 1.0, 1.0, 0.8, 1.0)
    mu_s, ls_s = _f64(pb.m_star).requires_grad_(True), _f64(math.log(pb.v_star)).requires_grad_(True)
    g = torch.autograd.grad(pb.objective(name, mu_s, ls_s, log_z_shift=0.5), (mu_s, ls_s))
    size = max(abs(float(t)) for t in g)
    if name == "kl":
        assert size < 1e-10, size
    else:
        assert size > 1e-3, size


@pytest.mark.parametrize("name", sorted(H_FAMILY))
def test_minimiser_on_a_gmm_teacher(name):
    # 2D, 3-component teacher, concave quadratic reward: p* and log Z from toys.gmm's tilt; the exact
    # objective (grid quadrature) and its gradient in the means and Cholesky factors vanish at p*, and
    # log p* - log p_T = R/beta - log Z on the grid
    g = torch.Generator().manual_seed(3)
    w = torch.tensor([0.3, 0.5, 0.2], dtype=D)
    means = 1.5 * torch.randn(3, 2, generator=g, dtype=D)
    L = 0.4 * torch.randn(3, 2, 2, generator=g, dtype=D)
    teacher = GaussianMixture(w, means, L @ L.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=D))
    reward = QuadraticReward(torch.tensor([1.0, -0.5], dtype=D), 0.4 * torch.eye(2, dtype=D))
    beta = 0.8
    target, log_z = teacher.tilt(reward, beta)
    pts, area = quadrature_grid(torch.zeros(2, dtype=D), 8.0, 161)
    lt = teacher.log_prob(pts)
    lrs = normalized_reward_log_ratio(reward(pts), beta, log_z)
    torch.testing.assert_close(target.log_prob(pts) - lt, lrs, rtol=0, atol=1e-10)
    st_ = GMMStudent(target)
    val = area * (lt.exp() * bregman_divergence(st_.mixture(0).log_prob(pts) - lt, name, lrs)).sum()
    grads = torch.autograd.grad(val, [st_.means, st_.chol_raw])
    assert abs(float(val.detach())) < 1e-12
    assert max(float(t.abs().max()) for t in grads) < 1e-10
    moved = GaussianMixture(target.weights, target.means + 0.2, target.covs)
    val_moved = area * (lt.exp() * bregman_divergence(moved.log_prob(pts) - lt, name, lrs)).sum()
    assert float(val_moved.detach()) > 1e-3


def test_reduces_to_d11_for_a_flat_reward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, generator=g, dtype=D)
    sf, sr = torch.randn(5, 2, generator=g, dtype=D), torch.randn(5, 2, generator=g, dtype=D)
    lr = torch.randn(5, generator=g, dtype=D)
    for name in H_FAMILY:
        got = reward_bregman_generator_surrogate(x, sf, sr, lr, torch.zeros(5, dtype=D), torch.zeros(5, 2, dtype=D), name)
        torch.testing.assert_close(got, bregman_generator_surrogate(x, sf, sr, lr, name))


def test_bad_input():
    x = torch.zeros(3, 2, dtype=D)
    with pytest.raises(ValueError, match="beta must be a finite float > 0, got 0.0"):
        normalized_reward_log_ratio(torch.zeros(3, dtype=D), 0.0, 0.0)
    with pytest.raises(TypeError, match="log_z must be a float or a 0-d tensor, got str"):
        normalized_reward_log_ratio(torch.zeros(3, dtype=D), 1.0, "0")
    with pytest.raises(ValueError, match="log_z must be finite, got nan"):
        normalized_reward_log_ratio(torch.zeros(3, dtype=D), 1.0, float("nan"))
    with pytest.raises(ValueError, match="log_z must be a finite 0-d tensor"):
        normalized_reward_log_ratio(torch.zeros(3, dtype=D), 1.0, torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match=r"log_ratio_star must have shape \(3,\), got \(2,\)"):
        reward_bregman_generator_surrogate(x, x, x, torch.zeros(3, dtype=D), torch.zeros(2, dtype=D), x, "kl")
    with pytest.raises(ValueError, match="x_sigma and grad_log_ratio_star must have the same shape"):
        reward_bregman_generator_surrogate(x, x, x, torch.zeros(3, dtype=D), torch.zeros(3, dtype=D),
                                           torch.zeros(3, 1, dtype=D), "kl")
    with pytest.raises(ValueError, match="h must be a BregmanH or one of"):
        reward_bregman_generator_surrogate(x, x, x, torch.zeros(3, dtype=D), torch.zeros(3, dtype=D), x, "tv")


@given(**problems, mu=st.floats(-1.5, 1.5), s=st.floats(0.7, 1.0), sigma=st.floats(0.1, 0.9),
       name=st.sampled_from(sorted(H_FAMILY)))
def test_gradient_formula_at_a_noise_level(m, v, a, c, beta, mu, s, sigma, name):
    # at noise level sigma the target ratio is r*_sigma = p*_sigma / p_T,sigma (noised tilt over noised
    # teacher, all Gaussian: N((1-sigma) m, (1-sigma)^2 v^2 + sigma^2)), with grad log r*_sigma the
    # difference of their scores; x_sigma = (1-sigma) mu + sqrt((1-sigma)^2 s^2 + sigma^2) xi has the law
    # of (1-sigma) G(z) + sigma eps, so the pathwise expectation is the same function of (mu, log s)
    pb = Problem(m, v, a, c, beta)
    k = 1.0 - sigma

    def noised(mean, std):
        return Normal(k * mean, torch.sqrt(k**2 * std**2 + sigma**2))

    teacher_s, star_s = noised(_f64(m), _f64(v)), noised(_f64(pb.m_star), _f64(pb.v_star))

    def objective(mu_, log_s_):
        x, w = _gl(-25.0, 25.0)
        lt = teacher_s.log_prob(x)
        lr = noised(mu_, torch.exp(log_s_)).log_prob(x) - lt
        return (w * torch.exp(lt) * bregman_divergence(lr, name, star_s.log_prob(x) - lt)).sum()

    mu_t, log_s = _f64(mu).requires_grad_(True), _f64(math.log(s)).requires_grad_(True)
    want = torch.autograd.grad(objective(mu_t, log_s), (mu_t, log_s))
    xi, wx = _gl(-20.0, 20.0)
    wx = wx * Normal(_f64(0.0), 1.0).log_prob(xi).exp()
    x = (k * mu_t + torch.sqrt(k**2 * torch.exp(2 * log_s) + sigma**2) * xi)[:, None]
    with torch.no_grad():
        xd, fake = x[:, 0], noised(_f64(mu), _f64(s))

        def score(dist):
            return (-(xd - dist.mean) / dist.variance)[:, None]

        log_r = fake.log_prob(xd) - teacher_s.log_prob(xd)
        log_rs = star_s.log_prob(xd) - teacher_s.log_prob(xd)
        grad_rs = score(star_s) - score(teacher_s)
    ell = reward_bregman_generator_surrogate(x, score(fake), score(teacher_s), log_r, log_rs, grad_rs, name)
    got = torch.autograd.grad((wx * ell).sum(), (mu_t, log_s))
    for g_, w_ in zip(got, want):
        assert abs(float(g_) - float(w_)) < 1e-8 * max(1.0, abs(float(w_))), (name, float(g_), float(w_))
