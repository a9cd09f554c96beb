"""D5 (PPO vs pathwise) and D6 (estimator covariances) for opd_ref.estimators.

Setting: one state x, student velocity v_theta(x) = theta_0 x + theta_{1:}, so the SDE kernel mean
mu_theta is affine in theta with Jacobian J = dmu/dtheta (D x P), step std s, teacher mean mu_T.
Oracles: exact per-sample closed forms; Gauss-Hermite quadrature (exact for these polynomial
integrands) in 1-2 dims; Monte Carlo with CLT bounds from the closed-form moments in higher dims.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import norm

from opd_ref.divergences import gaussian_log_prob, same_cov_kl
from opd_ref.estimators import (
    ESTIMATORS,
    analytic_moments,
    estimator_surrogate,
    k1_surrogate,
    pathwise_surrogate,
    per_sample_grads,
    ppo_kl_surrogate,
    vopd_surrogate,
)
from opd_ref.kernels import GaussianStep, sde_step

F64 = torch.float64


class Problem:
    """A student SDE kernel whose mean is affine in theta, a teacher mean at a given gap."""

    def __init__(self, D, a=0.7, sigma=0.6, sigma_next=0.5, gap=0.5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.D = D
        self.x = torch.randn(1, D, generator=g, dtype=F64)
        self.theta = (0.3 * torch.randn(D + 1, generator=g, dtype=F64)).requires_grad_()
        self.args = (sigma, sigma_next, a)
        u = torch.randn(1, D, generator=g, dtype=F64)
        v_t = self.velocity(self.theta.detach()) + gap * u / u.norm()
        self.teacher_mean = sde_step(self.x, v_t, *self.args).mean
        self.J = torch.autograd.functional.jacobian(lambda th: self.mean(th)[0], self.theta.detach())  # (D, P)
        mu = self.mean(self.theta.detach())
        self.s = float(self.kernel(self.theta.detach()).std.flatten()[0])
        self.delta = ((mu - self.teacher_mean) / self.s)[0]
        self.kl = 0.5 * float(self.delta @ self.delta)

    def velocity(self, theta):
        return theta[0] * self.x + theta[1:]

    def kernel(self, theta, n=1):
        step = sde_step(self.x.expand(n, self.D), self.velocity(theta).expand(n, self.D), *self.args)
        return step

    def mean(self, theta):
        return self.kernel(theta).mean

    def grads_at(self, name, eps):
        """Per-sample gradients (n, P) of estimator ``name`` for the actions mu + s eps (eps (n, D)).

        Uses the chain rule g = J^T dl/dmu with the kernel mean as the leaf, which equals
        per_sample_grads (checked in test_chain_rule_matches_per_sample_grads) at a fraction of the cost.
        """
        n = eps.shape[0]
        mean = self.mean(self.theta.detach()).expand(n, self.D).clone().requires_grad_()
        student = GaussianStep(mean, torch.full((n, 1), self.s, dtype=F64))
        x_next = (mean + self.s * eps).detach()
        loss = estimator_surrogate(name, student, self.teacher_mean.expand(n, self.D), x_next)
        (dmu,) = torch.autograd.grad(loss.sum(), mean)
        return dmu @ self.J


def _gh_nodes(D, n):
    """Probabilists' Gauss-Hermite tensor grid for N(0, I_D): nodes (n^D, D), weights (n^D,) summing to 1."""
    z, w = hermegauss(n)
    w = w / math.sqrt(2 * math.pi)
    nodes = np.array(list(itertools.product(z, repeat=D)))
    weights = np.array([np.prod(c) for c in itertools.product(w, repeat=D)])
    return torch.tensor(nodes, dtype=F64), torch.tensor(weights, dtype=F64)


# ---------------------------------------------------------------- D5: exact per-sample identities
def test_chain_rule_matches_per_sample_grads():
    p = Problem(D=3, seed=1)
    eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    for name in ESTIMATORS:
        student = p.kernel(p.theta, n=5)
        x_next = (student.mean + student.std * eps).detach()
        g = per_sample_grads(estimator_surrogate(name, student, p.teacher_mean.expand(5, 3), x_next), [p.theta])
        torch.testing.assert_close(g, p.grads_at(name, eps), rtol=1e-12, atol=1e-14)


def test_ppo_gradient_at_ratio_one_is_grad_kl_plus_kl_grad_log_pi():
    p = Problem(D=4, seed=3)
    n = 6
    student = p.kernel(p.theta, n=n)
    x_next = student.sample(torch.Generator().manual_seed(4)).detach()
    teacher_mean = p.teacher_mean.expand(n, 4)
    g_ppo = per_sample_grads(ppo_kl_surrogate(student, teacher_mean, x_next, clip_range=0.2), [p.theta])
    g_kl = per_sample_grads(same_cov_kl(student.mean, teacher_mean, student.std), [p.theta])
    g_logpi = per_sample_grads(gaussian_log_prob(x_next, student), [p.theta])
    kl = same_cov_kl(student.mean, teacher_mean, student.std).detach()
    torch.testing.assert_close(g_ppo, g_kl + kl[:, None] * g_logpi, rtol=1e-12, atol=1e-14)
    # and the closed forms of the module docstring: grad log pi = J^T eps / s
    eps = (x_next - student.mean.detach()) / p.s
    torch.testing.assert_close(g_logpi, eps @ p.J / p.s, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_kl, (p.delta @ p.J / p.s).expand(n, -1), rtol=1e-12, atol=1e-14)


@given(
    D=st.integers(1, 5),
    a=st.floats(0.1, 1.5),
    sigma=st.floats(0.1, 0.95),
    frac=st.floats(0.05, 0.9),
    gap=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_sample_closed_forms_property(D, a, sigma, frac, gap, seed):
    p = Problem(D=D, a=a, sigma=sigma, sigma_next=sigma * (1 - frac), gap=gap, seed=seed % 1000)
    eps = torch.randn(3, D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    de = eps @ p.delta  # delta^T eps, (n,)
    Jt_eps = eps @ p.J / p.s
    closed = {
        "pathwise": (p.delta @ p.J / p.s).expand(3, -1),
        "ppo": p.delta @ p.J / p.s + p.kl * Jt_eps,
        "k1": (p.kl + de)[:, None] * Jt_eps,
        "vopd": de[:, None] * Jt_eps,
    }
    scale = 1.0 + float(closed["k1"].abs().max()) + float(closed["ppo"].abs().max())
    for name in ESTIMATORS:
        torch.testing.assert_close(p.grads_at(name, eps), closed[name], rtol=1e-10, atol=1e-12 * scale)


def test_pathwise_conditional_variance_is_exactly_zero():
    """At a fixed state the pathwise gradient does not vary with the sampled action: its covariance,
    measured over 64 noise draws through the public path (``student.sample`` -> ``estimator_surrogate``
    -> ``per_sample_grads``), is 0 up to float64 rounding.  The same measurement on the same draws sees
    the action noise of PPO: its per-sample gradient is affine in eps, so its sample covariance is
    exactly KL^2 J^T Cov_hat(eps) J / s^2 with the draws' own covariance (a float64 identity)."""
    p = Problem(D=3, gap=1.0, seed=5)
    n = 64
    student = p.kernel(p.theta, n=n)
    x_next = student.sample(torch.Generator().manual_seed(6)).detach()
    teacher_mean = p.teacher_mean.expand(n, 3)

    def sample_cov(rows):
        centred = rows - rows.mean(0)
        return centred.T @ centred / (rows.shape[0] - 1)

    g_pathwise = per_sample_grads(estimator_surrogate("pathwise", student, teacher_mean, x_next), [p.theta])
    g_ppo = per_sample_grads(estimator_surrogate("ppo", student, teacher_mean, x_next), [p.theta])
    scale = float(g_pathwise.abs().max())
    assert scale > 0.1  # a non-trivial gradient (gap 1)
    rounding = (64 * torch.finfo(F64).eps * scale) ** 2
    assert float(sample_cov(g_pathwise).abs().max()) <= rounding
    torch.testing.assert_close(g_pathwise.mean(0), p.delta @ p.J / p.s, rtol=1e-12, atol=0)
    eps = (x_next - student.mean.detach()) / p.s
    ppo_cov = p.kl**2 * p.J.T @ sample_cov(eps) @ p.J / p.s**2
    torch.testing.assert_close(sample_cov(g_ppo), ppo_cov, rtol=1e-10, atol=0)
    assert float(ppo_cov.diagonal().min()) > 1e6 * rounding  # the measurement can see variance


# ---------------------------------------------------------------- D5/D6: Gauss-Hermite, exact
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("a,gap", [(0.3, 0.2), (0.7, 1.0), (1.2, 3.0)])
def test_expectation_and_covariance_by_gauss_hermite(D, a, gap):
    """Every estimator is a polynomial of degree <= 2 in eps, so its mean (degree 2) and second
    moment (degree 4) are integrated exactly by 3-point Gauss-Hermite per dim."""
    p = Problem(D=D, a=a, gap=gap, seed=7 + D)
    nodes, weights = _gh_nodes(D, 3)
    moments = analytic_moments(p.J, p.delta, p.s)
    pathwise_grad = p.delta @ p.J / p.s
    for name in ESTIMATORS:
        g = p.grads_at(name, nodes)  # (n^D, P)
        mean = weights @ g
        cov = (g - mean).T @ (weights[:, None] * (g - mean))
        torch.testing.assert_close(mean, pathwise_grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(mean, moments[name][0], rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(cov, moments[name][1], rtol=1e-10, atol=1e-11)


def test_ppo_beats_vopd_while_kl_is_small_and_k1_never_beats_vopd():
    for gap, ppo_better in [(0.05, True), (0.5, True), (6.0, False)]:
        p = Problem(D=3, gap=gap, a=0.3, seed=11)
        m = analytic_moments(p.J, p.delta, p.s)
        tr = {k: float(torch.trace(c)) for k, (_, c) in m.items()}
        # tr ppo < tr vopd iff KL^2 tr(J^T J) < 2 KL tr(J^T J) + |J^T delta|^2, implied by KL < 2
        assert (tr["ppo"] < tr["vopd"]) == ppo_better, (p.kl, tr)
        assert (p.kl < 2) == ppo_better
        # k1 - vopd = KL^2 J^T J / s^2, positive semi-definite
        diff = m["k1"][1] - m["vopd"][1]
        torch.testing.assert_close(diff, p.kl**2 * p.J.T @ p.J / p.s**2, rtol=1e-12, atol=1e-14)
        assert float(torch.linalg.eigvalsh(diff).min()) > -1e-12


# ---------------------------------------------------------------- Monte Carlo in higher dims
def _z(n_assertions):
    """Two-sided normal quantile with a total false-failure probability of 1e-6 over the assertions."""
    return float(norm.isf(1e-6 / (2 * n_assertions)))


@pytest.mark.parametrize("a,gap", [(0.3, 0.3), (0.8, 1.5)])
def test_expectation_monte_carlo_high_dim(a, gap):
    D, n = 12, 20_000
    p = Problem(D=D, a=a, gap=gap, seed=13)
    eps = torch.randn(n, D, generator=torch.Generator().manual_seed(14), dtype=F64)
    moments = analytic_moments(p.J, p.delta, p.s)
    pathwise_grad = p.delta @ p.J / p.s
    z = _z(3 * (D + 1))  # union bound over 3 estimators x P components: total false-failure <= 1e-6
    for name in ("ppo", "k1", "vopd"):
        g = p.grads_at(name, eps)
        sd = torch.sqrt(torch.diagonal(moments[name][1]))  # closed-form per-component sd (D6)
        # CLT: |mean - E g| < z sd / sqrt(n) fails with prob <= 1e-6 / (3 P) per component
        assert bool(((g.mean(0) - pathwise_grad).abs() < z * sd / math.sqrt(n)).all()), name


def _fourth_moment_2d(c1, c2, rho, fn):
    """E[fn(Z1, Z2)^4]-type moments of (c1^T eps, c2^T eps): exact by 2-D Gauss-Hermite (deg <= 8)."""
    nodes, weights = _gh_nodes(2, 5)
    # (Z1, Z2) with variances c1, c2 and correlation rho, from independent (e1, e2)
    z1 = c1 * nodes[:, 0]
    z2 = c2 * (rho * nodes[:, 0] + math.sqrt(max(1 - rho**2, 0.0)) * nodes[:, 1])
    return float(weights @ fn(z1, z2))


@pytest.mark.parametrize("a,gap,sigma", [(0.3, 0.3, 0.6), (0.8, 1.5, 0.6), (1.2, 0.8, 0.2)])
def test_covariance_monte_carlo_high_dim(a, gap, sigma):
    """Projections y = u^T (g - E g) for u in {e_i} and {e_i + e_j}: E[y^2] = u^T Cov u (D6). The
    estimator mean(y^2) has variance (E[y^4] - (u^T Cov u)^2) / n, where E[y^4] is exact: y depends on
    eps only through (delta^T eps, (J u)^T eps), so a 2-D Gauss-Hermite rule integrates it exactly."""
    D, n = 6, 20_000
    p = Problem(D=D, a=a, gap=gap, sigma=sigma, sigma_next=sigma - 0.1, seed=17)
    eps = torch.randn(n, D, generator=torch.Generator().manual_seed(18), dtype=F64)
    moments = analytic_moments(p.J, p.delta, p.s)
    P = D + 1
    dirs = [torch.eye(P, dtype=F64)[i] for i in range(P)]
    dirs += [torch.eye(P, dtype=F64)[i] + torch.eye(P, dtype=F64)[j] for i in range(P) for j in range(i + 1, P)]
    z = _z(3 * len(dirs))  # union bound: total false-failure <= 1e-6 for this test case
    dn = float(p.delta.norm())
    for name in ("ppo", "k1", "vopd"):
        mean, cov = moments[name]
        g = p.grads_at(name, eps) - mean
        for u in dirs:
            c = p.J @ u / p.s  # y = f(delta^T eps, c^T eps) - u^T mean
            cn = float(c.norm())
            rho = float(c @ p.delta) / (cn * dn) if cn > 0 and dn > 0 else 0.0
            target = float(u @ cov @ u)
            kl, um = p.kl, float(u @ mean)
            fy = {
                "ppo": lambda d_, c_: um + kl * c_ - um,
                "k1": lambda d_, c_: (kl + d_) * c_ - um,
                "vopd": lambda d_, c_: d_ * c_ - um,
            }[name]
            m2 = _fourth_moment_2d(dn, cn, rho, lambda d_, c_: fy(d_, c_) ** 2)
            m4 = _fourth_moment_2d(dn, cn, rho, lambda d_, c_: fy(d_, c_) ** 4)
            assert m2 == pytest.approx(target, rel=1e-9, abs=1e-12)  # the closed form, again, exactly
            est = float(((g @ u) ** 2).mean())
            # CLT with the exact variance of y^2: fails with prob <= 1e-6 / (3 |dirs|) per assertion
            assert abs(est - target) < z * math.sqrt((m4 - target**2) / n), (name, u, est, target)
