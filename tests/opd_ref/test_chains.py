"""D3: path-space KL of Gaussian-kernel Markov chains = expected sum of per-step closed-form KLs.

Exact check: single-Gaussian data makes the SDE/CPS kernels affine in x, so both path measures are
joint Gaussians; their KL from the joint covariances (no chain rule) equals the expected per-step sum
(evaluated with the real kernels at Gauss-Hermite nodes of the student's marginals), rel. 1e-8.
Monte-Carlo check: GMM student/teacher, sequence log-ratio vs per-step sum along student rollouts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from opd_ref.chains import (
    LinearGaussianChain,
    gaussian_kl_full,
    linear_gaussian_joint,
    linear_gaussian_marginals,
    linear_gaussian_path_kl,
    path_kl,
    per_step_kls,
    sequence_log_ratio,
)
from opd_ref.divergences import gaussian_log_prob
from opd_ref.engine import KernelSpec, rollout
from opd_ref.engine.grid import sigma_grid
from opd_ref.kernels import cps_step, sde_step
from tests.toys._fixtures import F64, three_mode_gmm
from toys.gmm import GaussianMixture
from toys.rewards import LinearReward, QuadraticReward

STUDENT = GaussianMixture.gaussian(torch.tensor([0.5, -0.2], dtype=F64), torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=F64))
TEACHER = GaussianMixture.gaussian(torch.tensor([0.1, 0.4], dtype=F64), torch.tensor([[0.3, -0.1], [-0.1, 0.7]], dtype=F64))


def _kernel(kind: str, gmm: GaussianMixture, a: float, s: float, sn: float):
    def step(x):
        v = gmm.velocity(x, s)
        return sde_step(x, v, s, sn, a) if kind == "sde" else cps_step(x, v, s, sn, a)

    return step


def _affine_chain(kind: str, gmm: GaussianMixture, a: float, sigmas: torch.Tensor) -> LinearGaussianChain:
    """Read A_n, b_n off the (affine) kernel mean at 0 and at the basis vectors; std from the kernel."""
    As, bs, ss = [], [], []
    pts = torch.cat([torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)])
    for n in range(len(sigmas) - 1):
        st = _kernel(kind, gmm, a, float(sigmas[n]), float(sigmas[n + 1]))(pts)
        b = st.mean[0]
        As.append((st.mean[1:] - b).T)
        bs.append(b)
        ss.append(st.std[0, 0])
    return LinearGaussianChain(torch.stack(As), torch.stack(bs), torch.stack(ss))


def _gh_nodes(mean: torch.Tensor, cov: torch.Tensor, n: int = 5):
    z1, w1 = np.polynomial.hermite_e.hermegauss(n)
    z = torch.tensor(list(itertools.product(z1, repeat=2)), dtype=F64)
    w = torch.tensor([a * b for a, b in itertools.product(w1, repeat=2)], dtype=F64) / (2 * np.pi)
    return mean + z @ torch.linalg.cholesky(cov).T, w


@pytest.mark.parametrize(
    "kind, a_p, a_q",
    [("sde", 0.7, 0.7), ("sde", 0.5, 1.0), ("cps", 0.6, 0.6), ("cps", 0.4, 0.8)],
)
def test_exact_linear_gaussian_path_kl_equals_expected_sum_of_step_kls(kind: str, a_p: float, a_q: float) -> None:
    sigmas = sigma_grid(8, sigma_max=0.9, sigma_min=0.1 if kind == "cps" else 0.0)
    mean0, cov0 = STUDENT.marginal(0.9).means[0], STUDENT.marginal(0.9).covs[0]
    chain_p = _affine_chain(kind, STUDENT, a_p, sigmas)
    chain_q = _affine_chain(kind, TEACHER, a_q, sigmas)
    exact = linear_gaussian_path_kl(mean0, cov0, chain_p, chain_q)
    # chain rule: E_P[sum_n KL_n(x_n)], x_n ~ N(mu_n, Sigma_n) of the student chain; KL_n(x) is quadratic
    # in x, so 5-point Gauss-Hermite per dim is exact; kernels evaluated by opd_ref.kernels at the nodes.
    mus, covs = linear_gaussian_marginals(mean0, cov0, chain_p)
    total = torch.zeros((), dtype=F64)
    for n in range(len(sigmas) - 1):
        x, w = _gh_nodes(mus[n], covs[n])
        s, sn = float(sigmas[n]), float(sigmas[n + 1])
        sp, sq = _kernel(kind, STUDENT, a_p, s, sn)(x), _kernel(kind, TEACHER, a_q, s, sn)(x)
        kl = per_step_kls(sp.mean[None], sp.std[None, :, 0], sq.mean[None], sq.std[None, :, 0])[0]
        total = total + w @ kl
    assert float(exact) > 0.1
    assert abs(float(total) - float(exact)) <= 1e-8 * float(exact)


def test_joint_covariance_matches_marginals_and_a_direct_simulation_free_check() -> None:
    """Diagonal blocks of the joint covariance are the marginal covariances; the joint KL of a chain
    with itself is 0 and gaussian_kl_full matches torch.distributions."""
    sigmas = sigma_grid(5, sigma_max=0.9)
    chain = _affine_chain("sde", STUDENT, 0.7, sigmas)
    m0, c0 = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    mus, covs = linear_gaussian_marginals(m0, c0, chain)
    jm, jc = linear_gaussian_joint(m0, c0, chain)
    for n in range(6):
        torch.testing.assert_close(jc[2 * n : 2 * n + 2, 2 * n : 2 * n + 2], covs[n], rtol=0, atol=1e-14)
    torch.testing.assert_close(jm.reshape(6, 2), mus)
    assert abs(float(linear_gaussian_path_kl(m0, c0, chain, chain))) < 1e-10
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=F64)
    Sp, Sq = M @ M.T + torch.eye(4, dtype=F64), 2 * torch.eye(4, dtype=F64) + 0.1 * M.T @ M
    mp, mq = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    oracle = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(mp, Sp), torch.distributions.MultivariateNormal(mq, Sq)
    )
    torch.testing.assert_close(gaussian_kl_full(mp, Sp, mq, Sq), oracle, rtol=1e-12, atol=1e-12)


def test_monte_carlo_sequence_log_ratio_agrees_with_per_step_sum_on_gmms() -> None:
    """Student p (3-mode GMM), teacher its tilt; SDE rollouts of the student from a grid below 1.

    Per rollout, l - sum_n KL_n = sum_n delta_n . xi_n has mean 0 and variance 2 E[sum_n KL_n] (same
    step std), so |mean(l) - mean(sum KL)| <= 5 sqrt(2 mean(sum KL) / B) fails with prob. <= 5.7e-7.
    """
    p = three_mode_gmm()
    teacher, _ = p.tilt([LinearReward(torch.tensor([0.5, 0.5], dtype=F64)),
                         QuadraticReward(torch.zeros(2, dtype=F64), 0.3 * torch.eye(2, dtype=F64))], 1.0)
    B = 4000
    sigmas = sigma_grid(10, sigma_max=0.95)
    x0 = p.marginal(0.95).sample(B, torch.Generator().manual_seed(1))
    traj = rollout(p.velocity, x0, sigmas, KernelSpec("sde", 0.8), torch.Generator().manual_seed(2))
    assert bool(traj.stochastic.all())
    # the teacher's kernels at the student's states (opd_ref.kernels, independently of the engine)
    steps_t = [sde_step(traj.states[n], teacher.velocity(traj.states[n], float(sigmas[n])), float(sigmas[n]),
                        float(sigmas[n + 1]), 0.8) for n in range(traj.n_steps)]
    means_t = torch.stack([st.mean for st in steps_t])
    stds_t = torch.stack([st.std.expand(B, 1)[:, 0] for st in steps_t])
    lp_t = torch.stack([gaussian_log_prob(traj.states[n + 1], st) for n, st in enumerate(steps_t)])
    stds = traj.stds[:, None].expand(-1, B)
    seq = sequence_log_ratio(traj.log_probs, lp_t)
    kl_sum = path_kl(traj.means, stds, means_t, stds_t)
    torch.testing.assert_close(stds_t, stds)
    m_kl = float(kl_sum.mean())
    assert m_kl > 0.05  # a non-trivial pair
    assert abs(float(seq.mean()) - m_kl) <= 5.0 * (2.0 * m_kl / B) ** 0.5
    # the per-rollout variance identity itself: Var(l - sum KL) = 2 E[sum KL]; the sample variance of
    # B = 4000 such terms is within 30 % of it (its relative sd is about sqrt(3/B) ~ 3 %)
    assert abs(float((seq - kl_sum).var()) / (2.0 * m_kl) - 1.0) < 0.3


def test_bad_input_raises() -> None:
    m = torch.zeros(3, 4, 2, dtype=F64)
    with pytest.raises(ValueError, match="same shape"):
        per_step_kls(m, torch.ones(3, 4, dtype=F64), torch.zeros(3, 5, 2, dtype=F64), torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="std_p"):
        per_step_kls(m, torch.ones(2, 4, dtype=F64), m, torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="strictly positive"):
        per_step_kls(m, torch.zeros(3, 4, dtype=F64), m, torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"\(N, B\)"):
        sequence_log_ratio(torch.zeros(3, 4, dtype=F64), torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="std must be >= 0"):
        LinearGaussianChain(torch.zeros(2, 2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64), -torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="need A"):
        LinearGaussianChain(torch.zeros(2, 2, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.ones(2, dtype=F64))
    ch = LinearGaussianChain(torch.zeros(2, 2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_kl_full(torch.zeros(2, dtype=F64), -torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="mean0"):
        linear_gaussian_marginals(torch.zeros(3, dtype=F64), torch.eye(2, dtype=F64), ch)
