"""D18 teacher algorithms against independent oracles: DiffusionNFT's implicit-velocity identity and
optimum (exact Gaussian-mixture tilts, posterior sampling), GRPO-Guard's normalised log-ratio
(public kernels and densities), and the NFT / GRPO-Guard updates of the engine against their
objectives written out in the test."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opd_ref import gaussian_log_prob, sde_step
from opd_ref.engine import (
    DistillTask,
    KernelSpec,
    ObjectiveSpec,
    RolloutBatch,
    StepInputs,
    UpdateSpec,
    distill_update,
    grpo_update,
    nft_update,
    policy_rollout,
)
from opd_ref.teachers import guard_log_ratio, nft_implicit_velocities, nft_loss, nft_optimum, nft_regression_target
from tests.opd_ref.test_engine import GRID, LinearPolicy, _batches, _grad_of_update, _reward
from toys.gmm import GaussianMixture
from toys.rewards import LinearReward

DT = torch.float64


def _draw(seed, shape=(6, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=DT) for _ in range(3)] + [torch.rand(shape[0], generator=g, dtype=DT)]


# ------------------------------------------------------------------------ NFT: exact identities
@given(seed=st.integers(0, 10_000), beta=st.floats(0.05, 5.0))
def test_nft_implicit_velocities_and_the_regression_identity(seed, beta):
    """v+ and v- are reflections about v_old, and the loss is beta^2 ||v - target||^2 + a constant in v,
    with the target written anew here: v_old + (2r - 1)(u - v_old) / beta."""
    v, v_old, u, r = _draw(seed)
    v_plus, v_minus = nft_implicit_velocities(v, v_old, beta)
    torch.testing.assert_close(v_plus + v_minus, 2 * v_old, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_plus - v_minus, 2 * beta * (v - v_old), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_plus, (1 - beta) * v_old + beta * v, rtol=1e-12, atol=1e-12)
    g = (2 * r[:, None] - 1) * (u - v_old) / beta
    expected = beta**2 * ((v - v_old - g) ** 2).sum(1) + ((v_old - u) ** 2).sum(1) - beta**2 * (g**2).sum(1)
    loss = nft_loss(v, v_old, u, r, beta)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10 * (1 + float(expected.abs().max())))
    torch.testing.assert_close(nft_regression_target(v_old, u, r, beta), v_old + g, rtol=1e-12, atol=1e-12)
    # r = 1: plain flow matching of v+ ; r = 0: of v-
    one = torch.ones_like(r)
    torch.testing.assert_close(nft_loss(v, v_old, u, one, beta), ((v_plus - u) ** 2).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nft_loss(v, v_old, u, 0 * one, beta), ((v_minus - u) ** 2).sum(1), rtol=1e-12, atol=1e-12)


def _mixture():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    m = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=DT)
    c = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=DT), 0.15 * torch.eye(2, dtype=DT),
                     torch.tensor([[0.25, -0.05], [-0.05, 0.1]], dtype=DT)])
    return GaussianMixture(w, m, c)


def _posterior_samples(p: GaussianMixture, x: torch.Tensor, sigma: float, n: int, gen) -> torch.Tensor:
    """x0 | x_sigma = x for x_sigma = (1 - s) x0 + s eps, x0 ~ p: Gaussian conditioning per component
    (written here with torch.distributions), components drawn by their posterior weights."""
    a = 1 - sigma
    logits, means, covs = [], [], []
    for k in range(p.weights.shape[0]):
        S = p.covs[k]
        C = a * a * S + sigma**2 * torch.eye(2, dtype=DT)
        logits.append(torch.log(p.weights[k]) + torch.distributions.MultivariateNormal(a * p.means[k], C).log_prob(x))
        K = a * S @ torch.linalg.inv(C)
        means.append(p.means[k] + K @ (x - a * p.means[k]))
        covs.append(S - K @ (a * S))
    comp = torch.multinomial(torch.softmax(torch.stack(logits), 0), n, replacement=True, generator=gen)
    z = torch.randn(n, 2, generator=gen, dtype=DT)
    L = torch.linalg.cholesky(torch.stack(covs))
    return torch.stack(means)[comp] + (L[comp] @ z[:, :, None])[:, :, 0]


@pytest.mark.parametrize("sigma", [0.3, 0.7])
def test_nft_optimum_is_the_linear_response_tilt(sigma):
    """At a state x_sigma, with x0 drawn from the old policy's exact posterior, the minimiser of the
    sample-average NFT loss (one exact Newton step: the loss is quadratic) tends to
    v_old + (2 / beta) d/dlambda v_{p e^{lambda r}} at lambda = 0, the derivative taken by central
    differences of *exact* GMM tilts (error O(h^2) ~ 1e-8).  r is affine in x0 (r = 0.5 + c b^T x0).

    CLT bound: each coordinate of the minimiser is a mean of n i.i.d. regression targets; the tolerance
    is 6 estimated standard errors plus 1e-6 (two-sided normal tail 2e-9 per coordinate)."""
    p, beta, c = _mixture(), 0.5, 0.2
    b = torch.tensor([1.0, -0.5], dtype=DT)
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.4, 0.2]], dtype=DT)
    v_old = p.velocity(x, sigma)
    # exact derivative of the tilted flow's velocity (lambda = c: the reward is c b^T x0 + const)
    h = 1e-4
    v_up = p.tilt(LinearReward(b), 1.0 / (c * h))[0].velocity(x, sigma)
    v_dn = p.tilt(LinearReward(-b), 1.0 / (c * h))[0].velocity(x, sigma)
    v_star = v_old + (2.0 / beta) * (v_up - v_dn) / (2 * h)
    # Monte Carlo: x0 | x, eps from x = (1 - s) x0 + s eps, u = eps - x0
    n = 400_000
    x0 = _posterior_samples(p, x[0], sigma, n, gen)
    eps = (x - (1 - sigma) * x0) / sigma
    u = eps - x0
    r = 0.5 + c * (x0 @ b)
    v0 = v_old.expand(n, 2).clone()
    f = lambda w: nft_loss(w.expand(n, 2), v0, u, r, beta).mean()
    w0 = torch.zeros(1, 2, dtype=DT)
    grad = torch.autograd.functional.jacobian(f, w0).reshape(2)
    hess = torch.autograd.functional.hessian(f, w0).reshape(2, 2)
    v_hat = w0.reshape(2) - torch.linalg.solve(hess, grad)
    targets = v0 + (2 * r[:, None] - 1) * (u - v0) / beta
    se = targets.std(0) / math.sqrt(n)
    tol = 6 * se + 1e-6
    assert ((v_hat - v_star[0]).abs() <= tol).all(), (v_hat, v_star, tol)
    assert float((v_star - v_old).norm()) > 20 * float(tol.max()), "the tilt must be resolved by the test"
    # nft_optimum from the posterior moments E[r|x], E[r u|x] (here Monte Carlo) is the same minimiser
    # once E[u|x] = v_old; with sample moments the two differ exactly by (mean(u) - v_old) / beta
    opt = nft_optimum(v_old, r.mean().reshape(1), (r[:, None] * u).mean(0, keepdim=True), beta)
    torch.testing.assert_close(opt[0] - (u.mean(0) - v_old[0]) / beta, v_hat, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.3, 0.7])
def test_nft_optimum_gap_to_the_exact_tilt_is_second_order(sigma):
    """v* = v_old + lambda d_lambda v_lambda |0 with lambda = 2/beta; the exact tilt's velocity
    v_lambda differs by O(lambda^2): halving lambda divides the gap by ~4 (exact GMM tilts)."""
    p = _mixture()
    b = torch.tensor([1.0, -0.5], dtype=DT)
    x = torch.tensor([[0.4, 0.2], [-0.5, 1.0], [1.0, -1.0]], dtype=DT)
    v_old = p.velocity(x, sigma)
    h = 1e-4
    deriv = (p.tilt(LinearReward(b), 1 / h)[0].velocity(x, sigma) - p.tilt(LinearReward(-b), 1 / h)[0].velocity(x, sigma)) / (2 * h)
    gaps = []
    for lam in (0.2, 0.1, 0.05):
        exact = p.tilt(LinearReward(b), 1 / lam)[0].velocity(x, sigma)
        gaps.append(float((exact - (v_old + lam * deriv)).norm()))
    for g1, g2 in zip(gaps, gaps[1:]):
        assert 3.0 < g1 / g2 < 5.0, gaps


def test_nft_optimum_is_exact_for_a_gaussian_and_a_linear_reward():
    """For one Gaussian the tilt by e^{lambda b^T x} shifts the mean only, so the tilted velocity is affine
    in lambda and the linear-response optimum equals the exact tilt for any lambda."""
    p = GaussianMixture(torch.ones(1, dtype=DT), torch.tensor([[0.3, -0.2]], dtype=DT),
                        torch.tensor([[[0.5, 0.2], [0.2, 0.4]]], dtype=DT))
    b = torch.tensor([1.0, 2.0], dtype=DT)
    x = torch.tensor([[0.4, 0.2], [-0.5, 1.0]], dtype=DT)
    sigma, lam, h = 0.4, 1.5, 1e-4
    v_old = p.velocity(x, sigma)
    deriv = (p.tilt(LinearReward(b), 1 / h)[0].velocity(x, sigma) - p.tilt(LinearReward(-b), 1 / h)[0].velocity(x, sigma)) / (2 * h)
    exact = p.tilt(LinearReward(b), 1 / lam)[0].velocity(x, sigma)
    torch.testing.assert_close(v_old + lam * deriv, exact, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ GRPO-Guard
@pytest.mark.parametrize("s,sn", [(0.9, 0.8), (0.5, 0.4), (0.15, 0.05)])
def test_guard_log_ratio_removes_the_shift_and_equalises_the_spread(s, sn):
    """At one state, over the step noise eps: Flow-GRPO's log-ratio (public kernel densities) is
    Delta^T eps / s - |Delta|^2 / (2 s^2), left-shifted by |Delta|^2/(2 s^2); the normalised one is
    linear in eps with value 0 at eps = 0 (conditional mean 0 exactly) and slope norm |v - v_old|
    (conditional std), at every step; its gradient is kappa = s / |c_v| times Flow-GRPO's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=DT)
    v_old = torch.randn(4, 3, generator=g, dtype=DT)
    v = (v_old + 0.3 * torch.randn(4, 3, generator=g, dtype=DT)).requires_grad_(True)
    a = 0.7
    coef = KernelSpec("sde", a, "flowgrpo").coefficients(s, sn)
    old = sde_step(x, v_old, s, sn, a, sigma_one="flowgrpo")
    std = float(old.std.flatten()[0])
    assert std == pytest.approx(coef.std, rel=1e-12)

    def logs(eps, vv):
        x_next = old.mean + std * eps
        raw = gaussian_log_prob(x_next, sde_step(x, vv, s, sn, a, sigma_one="flowgrpo")) - gaussian_log_prob(x_next, old)
        i = StepInputs(coef, vv, v_old, eps)
        return raw, guard_log_ratio(i.gap_old(), eps, i.s, coef.c_v)

    zero = torch.zeros_like(x)
    raw0, guard0 = logs(zero, v)
    delta = sde_step(x, v, s, sn, a, sigma_one="flowgrpo").mean - old.mean
    torch.testing.assert_close(raw0, -(delta**2).sum(1) / (2 * std**2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(guard0, torch.zeros(4, dtype=DT), rtol=0, atol=1e-12)
    eps = torch.randn(4, 3, generator=g, dtype=DT)
    raw, guard = logs(eps, v)
    torch.testing.assert_close(raw - raw0, (delta * eps).sum(1) / std, rtol=1e-9, atol=1e-12)  # linear in eps
    slope = torch.autograd.functional.jacobian(lambda e: logs(e, v.detach())[1].sum(), eps)
    torch.testing.assert_close(slope.norm(dim=1), (v - v_old).detach().norm(dim=1), rtol=1e-9, atol=1e-12)
    kappa = std / abs(coef.c_v)
    (g_raw,) = torch.autograd.grad(raw.sum(), v)
    (g_guard,) = torch.autograd.grad(guard.sum(), v)
    torch.testing.assert_close(g_guard, kappa * g_raw, rtol=1e-9, atol=1e-12)


def test_grpo_guard_update_gradient_is_kappa_weighted_flow_grpo():
    """At theta = theta_old (first epoch) the grpo_guard objective's gradient is, step by step, kappa_n
    times Flow-GRPO's (clip inactive at ratio 1; the KL term scaled by the same kappa_n): checked against
    per-step grpo updates of the engine on one trained step each."""
    beta, clip, a = 0.3, 0.2, 0.7
    kernel = KernelSpec("sde", a)
    groups = [_batches(0, (4,)), _batches(0, (2, 2), 20)]
    groups = [[RolloutBatch(b.cond, b.size, b.generator, b.size / 8) for b in g] for g in groups]
    fresh = lambda: [[RolloutBatch(b.cond, b.size, torch.Generator().manual_seed(s + i), b.weight)
                      for i, b in enumerate(g)] for g, s in zip(groups, (10, 20))]
    policy = LinearPolicy()
    guard = UpdateSpec(GRID, kernel, ObjectiveSpec("grpo_guard", clip_range=clip, kl_beta=beta))
    g_guard, stats = _grad_of_update(policy, lambda opt: grpo_update(policy, "student", fresh(), _reward, guard, opt))
    expected = None
    levels = kernel.check_grid(GRID)
    for n in guard.trained_steps:
        c = kernel.coefficients(levels[n], levels[n + 1])
        kappa = c.std / abs(c.c_v)
        spec_n = UpdateSpec(GRID, kernel, ObjectiveSpec("grpo", clip_range=clip, kl_beta=beta), (n,))
        g_n, _ = _grad_of_update(policy, lambda opt: grpo_update(policy, "student", fresh(), _reward, spec_n, opt))
        term = [kappa * t for t in g_n]
        expected = term if expected is None else [e + t for e, t in zip(expected, term)]
    for got, exp in zip(g_guard, expected):
        assert float(exp.abs().max()) > 0
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------ the NFT update
@pytest.mark.parametrize("kind,alpha", [("ode", 0.0), ("sde", 0.4)])
def test_nft_update_gradient_against_the_written_out_objective(kind, alpha):
    """nft_update = rollouts (any kernel), rewards mapped to [0, 1] within groups with a fixed scale, a
    forward noising per trained level from the batch's generator after its rollout, the NFT loss at
    theta_old (+ alpha ||v - v_ref||^2), mean over levels, batch weights: written out here."""
    beta, scale, clip = 0.6, 0.8, 1.0
    kernel = KernelSpec(kind, 0.0 if kind == "ode" else 0.7)
    spec = UpdateSpec(GRID, kernel, ObjectiveSpec("nft", nft_beta=beta, kl_beta=alpha))
    sizes = ((4,), (2, 2))
    mk = lambda: [[RolloutBatch(0, n, torch.Generator().manual_seed(s + i), n / 8) for i, n in enumerate(sz)]
                  for sz, s in zip(sizes, (10, 20))]
    policy = LinearPolicy()
    grads, stats = _grad_of_update(policy, lambda opt: nft_update(policy, "student", mk(), _reward, spec, opt,
                                                                  reward_scale=scale, reward_clip=clip))
    params = policy.trainable_parameters("student")
    levels = [float(s) for s in GRID]
    total = 0.0
    for group in mk():
        trajs = [policy_rollout(policy, "student", b, GRID, kernel) for b in group]
        R = torch.cat([_reward(t.final, b) for t, b in zip(trajs, group)])
        A = (R - R.mean()) / scale
        r = (0.5 + 0.5 * A.clamp(-clip, clip) / clip).split([b.size for b in group])
        for b, t, rb in zip(group, trajs, r):
            x0 = t.final
            for n in spec.trained_steps:
                s = levels[n]
                eps = torch.randn(x0.shape, generator=b.generator, dtype=DT)
                xs = (1 - s) * x0 + s * eps
                u = eps - x0
                with torch.no_grad(), policy.active("student"):
                    v_old = policy.velocity(xs, s, 0)
                with torch.no_grad(), policy.active(None):
                    v_ref = policy.velocity(xs, s, 0)
                with policy.active("student"):
                    v = policy.velocity(xs, s, 0)
                pos = (1 - beta) * v_old + beta * v
                neg = (1 + beta) * v_old - beta * v
                per = rb * ((pos - u) ** 2).sum(1) + (1 - rb) * ((neg - u) ** 2).sum(1) + alpha * ((v - v_ref) ** 2).sum(1)
                total = total + per.mean() * b.weight / len(spec.trained_steps)
    expected = torch.autograd.grad(total, params)
    for g_, e in zip(grads, expected):
        assert float(e.abs().max()) > 0
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-12)
    assert 0.0 < stats["r_mean"] < 1.0
    assert ("anchor" in stats) == (alpha > 0)
    if kind == "ode":
        assert spec.trained_steps == tuple(range(len(GRID) - 1)), "NFT trains every level, also under the ODE"


def test_nft_update_validation():
    policy = LinearPolicy()
    grpo = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("grpo"))
    nft = UpdateSpec(GRID, KernelSpec("ode"), ObjectiveSpec("nft"))
    opt = torch.optim.SGD(policy.trainable_parameters("student"), lr=0.1)
    with pytest.raises(ValueError, match="'nft' objective"):
        nft_update(policy, "student", [_batches(0, (4,))], _reward, grpo, opt)
    with pytest.raises(ValueError, match="epochs"):
        nft_update(policy, "student", [_batches(0, (4,))], _reward, nft, opt, epochs=0)
    with pytest.raises(ValueError, match="group_size"):
        nft_update(policy, "student", [_batches(0, (3,))], _reward, nft, opt, group_size=2)
    with pytest.raises(ValueError, match="nft_beta"):
        ObjectiveSpec("nft", nft_beta=0.0)


def test_guard_log_ratio_float32_has_no_cancellation_for_large_gaps():
    # |Delta| = 1e4 >> s |eps| = 1e-3: the written-out -|D|^2 + sg|D|^2 (each 1e8/s^2 = 1e14) cancels every
    # float32 digit of Delta^T eps / s; the oracle is kappa Delta^T eps / s in float64, with the gradient
    # kappa (eps / s - Delta / s^2) (derivative of the D18 formula, written anew)
    gen = torch.Generator().manual_seed(3)
    d64 = 1e4 * torch.randn(4, 3, generator=gen, dtype=DT)
    eps64 = torch.randn(4, 3, generator=gen, dtype=DT)
    d64, eps64 = d64.float().double(), eps64.float().double()
    s, c_v = 1e-3, 0.5
    d32 = d64.float().requires_grad_(True)
    out = guard_log_ratio(d32, eps64.float(), s, c_v)
    want = (s / c_v) * (d64 * eps64).sum(1) / s
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), d32)
    torch.testing.assert_close(grad.double(), (s / c_v) * (eps64 / s - d64 / s**2), rtol=1e-5, atol=0)


def test_nft_loss_at_reward_edges_is_the_one_term_even_when_the_other_overflows():
    # r = 1 keeps only ||v+ - u||^2; the (1 - r) term overflows float32 here (1e40), and 0 * inf would be NaN
    v_old = torch.zeros(2, 2)
    v = torch.full((2, 2), 1e20)
    u = torch.full((2, 2), 1e20)  # v+ = v_old + (v - v_old) = u exactly (beta = 1), v- - u = -2e20
    out = nft_loss(v, v_old, u, torch.tensor([1.0, 0.0]), 1.0)
    assert out[0] == 0.0 and out[1] == math.inf, out
    with pytest.raises(ValueError, match="r must have shape"):
        nft_loss(v, v_old, u, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v_old, u, torch.ones(2), float("nan"))
    with pytest.raises(ValueError, match="c_v"):
        guard_log_ratio(v, u, 1.0, 0.0)


# ------------------------------------------------------------------------ round robin over K teachers
@pytest.mark.parametrize("K", [2, 3])
def test_round_robin_over_k_teachers_is_the_gradient_of_the_task_average(K):
    """D13 with K teachers: one distill_update over K tasks gives (1/K) sum_k of the K single-task
    gradients (each single-task update is checked against the public kernels in test_engine)."""
    spec = UpdateSpec(GRID, KernelSpec("sde", 0.6), ObjectiveSpec("opd_kl"))
    tasks = lambda: [DistillTask(f"teacher_{k}", _batches(k), f"t{k}") for k in range(K)]
    policy = LinearPolicy(n_tasks=K)
    g_all, stats = _grad_of_update(policy, lambda opt: distill_update(policy, "student", tasks(), spec, opt))
    singles = [_grad_of_update(policy, lambda opt: distill_update(policy, "student", [tasks()[k]], spec, opt))
               for k in range(K)]
    for j, got in enumerate(g_all):
        exp = sum(sg[0][j] for sg in singles) / K
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-13)
    assert stats["loss"] == pytest.approx(sum(sg[1]["loss"] for sg in singles) / K, rel=1e-10)
