"""The engine (opd_ref.engine) against independent oracles: the public kernels and losses of opd_ref,
torch.distributions, numpy, and hand-written formulas; gradients of whole updates against autograd of
the objective written out in the test."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from opd_ref import cps_step, gaussian_log_prob, ode_step, ppo_surrogate_loss, same_cov_kl, sde_step
from opd_ref.crd import crd_loss
from opd_ref.engine import (
    METHODS,
    AdvantageSpec,
    DistillTask,
    KernelSpec,
    NonFiniteError,
    ObjectiveSpec,
    RolloutBatch,
    StepInputs,
    UpdateSpec,
    crd_update,
    distill_update,
    grpo_update,
    group_advantages,
    path_divergence,
    policy_rollout,
    rollout,
)
from opd_ref.estimators import estimator_surrogate

DT = torch.float64
PAIRS = [(1.0, 0.9), (0.8, 0.7), (0.5, 0.49999), (0.1, 0.0), (0.999, 0.998), (1e-3, 5e-4)]


def _public(kind, x, v, s, sn, a):
    if kind == "sde":
        st = sde_step(x, v, s, sn, a, sigma_one="flowgrpo")
        return st.mean, float(st.std.flatten()[0])
    if kind == "cps":
        st = cps_step(x, v, s, sn, a)
        return st.mean, float(st.std.flatten()[0])
    return ode_step(x, v, s, sn), 0.0


# ----------------------------------------------------------------------------------- kernel spec
@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("sde", 1.3), ("cps", 0.5), ("cps", 1.0), ("ode", 0.0)])
def test_coefficients_equal_public_kernels(kind, a):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=DT)
    v = torch.randn(4, 3, 5, generator=g, dtype=DT)
    spec = KernelSpec(kind, a)
    for s, sn in PAIRS:
        c = spec.coefficients(s, sn)
        mean, std = _public(kind, x, v, s, sn, a)
        torch.testing.assert_close(c.mean(x, v), mean, rtol=1e-13, atol=1e-13)
        assert c.std == pytest.approx(std, rel=1e-13, abs=0.0)
        # the velocity coefficient is d mean / d v
        torch.testing.assert_close(c.mean(x, v + 1.0) - c.mean(x, v), torch.full_like(x, c.c_v), rtol=1e-9, atol=1e-12)
        if kind == "sde":
            assert c.std_t == pytest.approx(a * math.sqrt(s / (1 - (sn if s >= 1 else s))), rel=1e-14)


def test_ode_mean_is_the_euler_step_bit_for_bit_in_float32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(2, 4, 8, 8, generator=g)
    grid = torch.tensor([1.0, 0.9375, 0.6, 0.2, 0.0], dtype=torch.float32)  # float32 grid like the scheduler's
    for s, sn in zip(grid, grid[1:]):
        c = KernelSpec("ode").coefficients(float(s), float(sn))
        assert torch.equal(c.mean(x, v), x + (sn - s) * v)


def test_sigma_one_rules():
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=DT)
    assert KernelSpec("sde", 0.7, "ode").coefficients(1.0, 0.5).std == 0.0
    assert KernelSpec("sde", 0.7, "flowgrpo").coefficients(1.0, 0.5).std == pytest.approx(0.7 * math.sqrt(1 / 0.5) * math.sqrt(0.5))
    with pytest.raises(ValueError, match="sigma_one='error'"):
        KernelSpec("sde", 0.7, "error").check_grid(grid)
    KernelSpec("cps", 0.5, "error").check_grid(grid)  # CPS is finite at sigma = 1


@pytest.mark.parametrize(
    "kwargs,match",
    [({"kind": "ddim"}, "kind"), ({"kind": "sde", "noise_level": 0.0}, "noise_level"),
     ({"kind": "cps", "noise_level": 1.5}, "noise_level"), ({"noise_level": float("nan")}, "noise_level"),
     ({"sigma_one": "euler"}, "sigma_one"), ({"noise_level": True}, "noise_level")],
)
def test_kernel_spec_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelSpec(**kwargs)


@pytest.mark.parametrize("grid", [[1.0], [0.5, 0.7], [1.2, 0.5], [0.5, float("nan")], [0.0, 0.0]])
def test_check_grid_rejects_bad_grids(grid):
    with pytest.raises(ValueError, match="sigmas"):
        KernelSpec("cps", 0.5).check_grid(torch.tensor(grid, dtype=DT))


# ----------------------------------------------------------------------------------- rollout
def _field(x, s):
    return -0.3 * x + 0.1 * s * torch.sin(x)


@pytest.mark.parametrize("kind,a,sigma_one", [("sde", 0.7, "flowgrpo"), ("sde", 0.7, "ode"), ("cps", 0.6, "flowgrpo"),
                                              ("ode", 0.0, "flowgrpo")])
def test_rollout_against_torch_distributions(kind, a, sigma_one):
    spec = KernelSpec(kind, a, sigma_one)
    grid = torch.linspace(1.0, 0.0, 7, dtype=DT)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    traj = rollout(_field, x0, grid, spec, torch.Generator().manual_seed(3))
    assert traj.states.shape == (7, 5, 3) and traj.n_steps == 6
    for n in range(6):
        s, sn = float(grid[n]), float(grid[n + 1])
        v = _field(traj.states[n], s)
        torch.testing.assert_close(traj.velocities[n], v, rtol=0, atol=0)
        if kind == "sde" and s >= 1 and sigma_one == "ode":
            mean, std = ode_step(traj.states[n], v, s, sn), 0.0
        else:
            mean, std = _public(kind, traj.states[n], v, s, sn, a)
        torch.testing.assert_close(traj.means[n], mean, rtol=1e-12, atol=1e-12)
        assert bool(traj.stochastic[n]) == (std > 0)
        if std > 0:
            lp = torch.distributions.Normal(mean, std).log_prob(traj.states[n + 1]).sum(1)
            torch.testing.assert_close(traj.log_probs[n], lp, rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(traj.states[n + 1], mean + std * traj.noises[n], rtol=0, atol=1e-14)
        else:
            assert torch.equal(traj.states[n + 1], traj.means[n]) and float(traj.log_probs[n].abs().max()) == 0.0


def test_rollout_is_reproducible_and_stops_on_nan():
    grid = torch.linspace(0.9, 0.0, 5, dtype=DT)
    x0 = torch.zeros(3, 2, dtype=DT)
    t1 = rollout(_field, x0, grid, KernelSpec("sde", 0.5), torch.Generator().manual_seed(4))
    t2 = rollout(_field, x0, grid, KernelSpec("sde", 0.5), torch.Generator().manual_seed(4))
    assert torch.equal(t1.states, t2.states)

    def bad(x, s):
        return _field(x, s) * (float("nan") if s < 0.5 else 1.0)

    with pytest.raises(NonFiniteError, match="velocity at step 2"):
        rollout(bad, x0, grid, KernelSpec("sde", 0.5), torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="x0"):
        rollout(_field, torch.zeros(3), grid, KernelSpec("sde", 0.5))
    with pytest.raises(TypeError, match="kernel"):
        rollout(_field, x0, grid, "sde")


# ----------------------------------------------------------------------------------- step inputs
def _inputs(kind="sde", a=0.7, s=0.8, sn=0.7, seed=5, dtype=DT, shape=(4, 6), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DT)
    v_old = torch.randn(shape, generator=g, dtype=DT)
    v = (v_old + 0.3 * scale * torch.randn(shape, generator=g, dtype=DT)).requires_grad_(True)
    v_t = v_old + 0.5 * scale * torch.randn(shape, generator=g, dtype=DT)
    noise = torch.randn(shape, generator=g, dtype=DT)
    c = KernelSpec(kind, a).coefficients(s, sn)
    x_next = c.mean(x, v_old) + c.std * noise
    cast = lambda t: t.detach().to(dtype)
    return c, x, x_next, v, v_old, v_t, noise, StepInputs(c, v.to(dtype) if dtype != DT else v, cast(v_old),
                                                           cast(noise), cast(v_t))


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("cps", 0.5)])
def test_kl_and_log_ratios_equal_public_densities(kind, a):
    c, x, x_next, v, v_old, v_t, noise, inp = _inputs(kind, a)
    st = lambda vel: _public(kind, x, vel, c.sigma, c.sigma_next, a)
    m, s = st(v)
    m_old, _ = st(v_old)
    m_t, _ = st(v_t)
    torch.testing.assert_close(inp.kl(), same_cov_kl(m, m_t, s), rtol=1e-12, atol=1e-12)
    normal = lambda mu: torch.distributions.Normal(mu, s).log_prob(x_next).sum(1)
    torch.testing.assert_close(inp.log_ratio_old(), normal(m) - normal(m_old), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inp.log_ratio_target(), normal(m) - normal(m_t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("s,sn", [(0.9, 0.8), (0.9999, 0.9998), (0.5, 0.49999), (1e-6, 5e-7)])
def test_float32_kl_and_log_ratio_have_no_cancellation(s, sn):
    # velocities 1e-3 apart on a 16x32x32 latent: the KL from the velocity gap keeps float32's precision
    shape = (2, 16, 32, 32)
    g = torch.Generator().manual_seed(6)
    v_old = torch.randn(shape, generator=g, dtype=DT)
    v = v_old + 1e-3 * torch.randn(shape, generator=g, dtype=DT)
    noise = torch.randn(shape, generator=g, dtype=DT)
    c = KernelSpec("sde", 0.7).coefficients(s, sn)
    exact = StepInputs(c, v, v_old, noise, v_old)
    f32 = StepInputs(c, v.float(), v_old.float(), noise.float(), v_old.float())
    rel = ((f32.kl().double() - exact.kl()) / exact.kl()).abs().max()
    assert float(rel) <= 1e-4
    assert float((f32.log_ratio_old().double() - exact.log_ratio_old()).abs().max()) <= 1e-5 * max(
        1.0, float(exact.log_ratio_old().abs().max()))


@pytest.mark.parametrize("name,estimator", [("opd_kl", "pathwise"), ("ppo_opd", "ppo"), ("k1", "k1"), ("vopd", "vopd")])
def test_distillation_objective_gradients_equal_the_estimators(name, estimator):
    # at theta = theta_old (v == v_old) the objectives' gradients are the D5 estimators of opd_ref.estimators
    c, x, x_next, _, v_old, v_t, noise, _ = _inputs()
    v = v_old.clone().requires_grad_(True)
    out = ObjectiveSpec(name)(StepInputs(c, v, v_old, noise, v_t))
    (g_engine,) = torch.autograd.grad(out.loss.sum(), v)
    v2 = v_old.clone().requires_grad_(True)
    student = sde_step(x, v2, c.sigma, c.sigma_next, 0.7)
    teacher = sde_step(x, v_t, c.sigma, c.sigma_next, 0.7)
    (g_public,) = torch.autograd.grad(estimator_surrogate(estimator, student, teacher.mean, x_next).sum(), v2)
    torch.testing.assert_close(g_engine, g_public, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.stats["kl"], same_cov_kl(student.mean, teacher.mean, student.std).detach(),
                               rtol=1e-12, atol=1e-12)


def test_ode_matching_objective():
    c, x, _, v, _, v_t, noise, inp = _inputs("ode", 0.0)
    inp = StepInputs(c, v, v.detach(), noise, v_t)
    expected = 0.5 * (ode_step(x, v, c.sigma, c.sigma_next) - ode_step(x, v_t, c.sigma, c.sigma_next)).pow(2).sum(1)
    torch.testing.assert_close(ObjectiveSpec("opd_ode")(inp).loss, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grpo_objective_value_and_gradient_include_the_reference_kl(clip):
    c, x, x_next, v, v_old, v_ref, noise, _ = _inputs()
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0], dtype=DT)
    beta = 0.37
    out = ObjectiveSpec("grpo", clip_range=clip, kl_beta=beta)(StepInputs(c, v, v_old, noise, v_ref, adv))
    (g_engine,) = torch.autograd.grad(out.loss.sum(), v)
    # independent: public log-probs, PPO surrogate and closed-form KL written with the public kernels
    v2 = v.detach().clone().requires_grad_(True)
    st = sde_step(x, v2, c.sigma, c.sigma_next, 0.7, sigma_one="flowgrpo")
    old = sde_step(x, v_old, c.sigma, c.sigma_next, 0.7, sigma_one="flowgrpo")
    ref = sde_step(x, v_ref, c.sigma, c.sigma_next, 0.7, sigma_one="flowgrpo")
    expected = ppo_surrogate_loss(gaussian_log_prob(x_next, st), gaussian_log_prob(x_next, old), adv, clip)
    expected = expected + beta * ((st.mean - ref.mean) ** 2).sum(1) / (2 * st.std.reshape(-1) ** 2)
    (g_public,) = torch.autograd.grad(expected.sum(), v2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_engine, g_public, rtol=1e-9, atol=1e-9)
    assert float(out.stats["kl_ref"].min()) > 0.0


def test_grpo_flowgrpo_kl_form_against_a_hand_written_formula():
    # Flow-GRPO's code: prev_sample_mean from its SDE step, kl = mean over dims of
    # (mean - mean_ref)^2 / (2 * std_dev_t^2) with std_dev_t = a * sqrt(sigma / (1 - sigma)), no |dt|.
    a, s, sn = 0.7, 0.8, 0.7
    c, x, x_next, v, v_old, v_ref, noise, _ = _inputs("sde", a, s, sn)
    adv = torch.zeros(4, dtype=DT)
    out = ObjectiveSpec("grpo", clip_range=None, kl_beta=1.0, kl_form="flowgrpo")(StepInputs(c, v, v_old, noise, v_ref, adv))

    def fg_mean(vel):
        std_dev_t = a * math.sqrt(s / (1 - s))
        dt = sn - s
        return x + (vel + std_dev_t**2 / (2 * s) * (x + (1 - s) * vel)) * dt, std_dev_t

    m, std_dev_t = fg_mean(v)
    m_ref, _ = fg_mean(v_ref)
    expected = ((m - m_ref) ** 2).mean(1) / (2 * std_dev_t**2)
    torch.testing.assert_close(out.stats["kl_ref"], expected.detach(), rtol=1e-10, atol=1e-12)
    # and it is |dt| / D times the exact per-step KL
    exact = ObjectiveSpec("grpo", kl_beta=1.0)(StepInputs(c, v, v_old, noise, v_ref, adv)).stats["kl_ref"]
    torch.testing.assert_close(out.stats["kl_ref"], exact * (s - sn) / 6, rtol=1e-10, atol=1e-12)


def test_objective_spec_and_registry():
    assert METHODS == ("opd_kl", "opd_ode", "ppo_opd", "k1", "vopd", "grpo", "crd", "fwd_kl", "dmd", "bregman_kl",
                       "bregman_reverse_kl", "bregman_pearson_chi2", "bregman_jensen_shannon", "grpo_guard", "nft")
    for bad, match in [({"name": "ppo"}, "name"), ({"clip_range": 0.0}, "clip_range"), ({"kl_beta": -1.0}, "kl_beta"),
                       ({"kl_form": "mean"}, "kl_form"), ({"crd_beta": 0.0}, "crd_beta")]:
        with pytest.raises(ValueError, match=match):
            ObjectiveSpec(**bad)


# ----------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_against_numpy(ddof):
    r = torch.tensor([0.3, 1.2, -0.7, 2.0, 0.0], dtype=DT)
    want = (r.numpy() - r.numpy().mean()) / (np.std(r.numpy(), ddof=ddof) + 1e-4)
    np.testing.assert_allclose(group_advantages(r, ddof=ddof).numpy(), want, rtol=1e-14)
    assert float(group_advantages(torch.full((4,), 3.0, dtype=DT)).abs().max()) == 0.0
    assert float(AdvantageSpec(clip=0.5)(r).abs().max()) == 0.5
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="rewards"):
            group_advantages(bad)


# ----------------------------------------------------------------------------------- updates
class LinearPolicy:
    """v = (W_a + E_k) x + b_a: a trainable student, fixed teachers, a reference; cond = task k.

    With ``checkpoint=True`` the forward runs under torch.utils.checkpoint and reads the active adapter
    when it runs, as a LoRA model with gradient checkpointing does: a recompute under another adapter
    gives other tensors.
    """

    def __init__(self, d=3, n_tasks=2, checkpoint=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.event_shape, self.device, self.state_dtype = (d,), torch.device("cpu"), DT
        self.student = nn.Linear(d, d, dtype=DT)
        with torch.no_grad():
            self.student.weight.copy_(-0.2 * torch.eye(d, dtype=DT) + 0.1 * torch.randn(d, d, generator=g, dtype=DT))
            self.student.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=DT))
        self.fixed = {f"teacher_{k}": (-0.3 * torch.eye(d, dtype=DT) + 0.2 * torch.randn(d, d, generator=g, dtype=DT),
                                       0.3 * torch.randn(d, generator=g, dtype=DT)) for k in range(n_tasks)}
        self.fixed[None] = (-0.25 * torch.eye(d, dtype=DT), torch.zeros(d, dtype=DT))
        self.task_emb = 0.1 * torch.randn(n_tasks, d, generator=g, dtype=DT)
        self.adapter = None
        self.checkpoint = checkpoint

    @contextlib.contextmanager
    def active(self, adapter):
        prev, self.adapter = self.adapter, adapter
        try:
            yield
        finally:
            self.adapter = prev

    def trainable_parameters(self, adapter):
        return list(self.student.parameters())

    def _forward(self, x, sigma, k):
        if self.adapter == "student":
            return self.student(x) * (1 + sigma) + self.task_emb[k]
        W, b = self.fixed[self.adapter]
        return x @ W.T + b + self.task_emb[k]

    def velocity(self, x, sigma, cond):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, sigma, cond, use_reentrant=False)
        return self._forward(x, sigma, cond)


GRID = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=DT)


def _grad_of_update(policy, fn):
    opt = torch.optim.SGD(policy.trainable_parameters("student"), lr=1.0)
    before = [p.detach().clone() for p in policy.trainable_parameters("student")]
    stats = fn(opt)
    grads = [b - p.detach() for b, p in zip(before, policy.trainable_parameters("student"))]
    with torch.no_grad():
        for p, b in zip(policy.trainable_parameters("student"), before):
            p.copy_(b)
    return grads, stats


def _batches(k, sizes=(3, 5), seed=10):
    total = sum(sizes)
    return [RolloutBatch(k, n, torch.Generator().manual_seed(seed + 100 * k + i), n / total) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("name,kind", [("opd_kl", "sde"), ("opd_kl", "cps"), ("opd_ode", "ode"), ("ppo_opd", "sde")])
def test_distill_update_gradient_is_the_task_average(name, kind):
    policy = LinearPolicy()
    spec = UpdateSpec(GRID, KernelSpec(kind, 0.6 if kind != "ode" else 0.0), ObjectiveSpec(name))
    tasks = [DistillTask(f"teacher_{k}", _batches(k), f"t{k}") for k in range(2)]
    grads, stats = _grad_of_update(policy, lambda opt: distill_update(policy, "student", tasks, spec, opt))
    # independent: per task, the sample-average of the summed per-step objective from the public kernels
    params = policy.trainable_parameters("student")
    total, per_task = 0.0, []
    for k, task in enumerate(tasks):
        lk = 0.0
        for b in task.batches:
            traj = policy_rollout(policy, "student", RolloutBatch(k, b.size, torch.Generator().manual_seed(10 + 100 * k + task.batches.index(b))), GRID, spec.kernel)
            for n in spec.trained_steps:
                s, sn = float(GRID[n]), float(GRID[n + 1])
                x = traj.states[n]
                with policy.active("student"):
                    v = policy.velocity(x, s, k)
                with policy.active(f"teacher_{k}"):
                    v_t = policy.velocity(x, s, k).detach()
                if kind == "ode":
                    per = 0.5 * (ode_step(x, v, s, sn) - ode_step(x, v_t, s, sn)).pow(2).sum(1)
                else:
                    st = _public_step(kind, x, v, s, sn, 0.6)
                    t_mean = _public_step(kind, x, v_t, s, sn, 0.6).mean
                    est = {"opd_kl": "pathwise", "ppo_opd": "ppo"}[name]
                    per = estimator_surrogate(est, st, t_mean, traj.states[n + 1])
                lk = lk + per.mean() * b.size / 8
        per_task.append(float(lk.detach()))
        total = total + lk / 2
    expected = torch.autograd.grad(total, params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert stats["loss"] == pytest.approx(sum(per_task) / 2, rel=1e-9)
    assert stats["loss/t0"] == pytest.approx(per_task[0], rel=1e-9)


def _public_step(kind, x, v, s, sn, a):
    return sde_step(x, v, s, sn, a, sigma_one="flowgrpo") if kind == "sde" else cps_step(x, v, s, sn, a)


def _reward(final, batch):
    return -(final - 0.5).pow(2).sum(1)


def test_gradient_checkpointing_gives_the_same_gradients():
    spec_d = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("opd_kl"))
    spec_g = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("grpo", clip_range=0.2, kl_beta=0.3))
    spec_c = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("crd", crd_beta=0.5))
    runs = {
        "distill": lambda p, opt: distill_update(p, "student", [DistillTask(f"teacher_{k}", _batches(k)) for k in range(2)], spec_d, opt),
        "grpo": lambda p, opt: grpo_update(p, "student", [_batches(0, (4,)), _batches(0, (2, 2), 20)], _reward, spec_g, opt),
        "crd": lambda p, opt: crd_update(p, "student", [([_batches(0, (4,)), _batches(0, (2, 2), 20)], _reward)], spec_c, opt),
    }
    for name, fn in runs.items():
        plain = LinearPolicy()
        ckpt = LinearPolicy(checkpoint=True)
        g_plain, _ = _grad_of_update(plain, lambda opt: fn(plain, opt))
        g_ckpt, _ = _grad_of_update(ckpt, lambda opt: fn(ckpt, opt))
        for a, b in zip(g_plain, g_ckpt):
            assert float(a.abs().max()) > 0
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14), name


def test_grpo_update_gradient_against_the_written_out_objective():
    policy = LinearPolicy()
    beta, clip = 0.3, 0.2
    spec = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("grpo", clip_range=clip, kl_beta=beta))
    groups = [_batches(0, (4,)), _batches(0, (2, 2), 20)]
    groups = [[RolloutBatch(b.cond, b.size, b.generator, b.size / 8) for b in g] for g in groups]
    grads, stats = _grad_of_update(policy, lambda opt: grpo_update(policy, "student", groups, _reward, spec, opt))
    params = policy.trainable_parameters("student")
    total = 0.0
    for g, seed in zip(groups, (10, 20)):
        trajs = [policy_rollout(policy, "student", RolloutBatch(0, b.size, torch.Generator().manual_seed(seed + i)), GRID, spec.kernel)
                 for i, b in enumerate(g)]
        r = torch.cat([_reward(t.final, None) for t in trajs])
        adv = ((r - r.mean()) / (r.std(unbiased=False) + 1e-4)).split([b.size for b in g])
        for b, t, a in zip(g, trajs, adv):
            for n in spec.trained_steps:
                s, sn = float(GRID[n]), float(GRID[n + 1])
                x = t.states[n]
                with policy.active("student"):
                    st = sde_step(x, policy.velocity(x, s, 0), s, sn, 0.7, sigma_one="flowgrpo")
                old = sde_step(x, t.velocities[n], s, sn, 0.7, sigma_one="flowgrpo")
                with policy.active(None):
                    ref = sde_step(x, policy.velocity(x, s, 0), s, sn, 0.7, sigma_one="flowgrpo")
                lp = gaussian_log_prob(t.states[n + 1], st)
                per = ppo_surrogate_loss(lp, gaussian_log_prob(t.states[n + 1], old), a, clip)
                per = per + beta * same_cov_kl(st.mean, ref.mean.detach(), st.std)
                total = total + per.mean() * b.weight
    expected = torch.autograd.grad(total, params)
    for g_, e in zip(grads, expected):
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-12)
    assert stats["kl_ref"] > 0 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-12)


def test_crd_update_gradient_against_the_full_implicit_reward():
    policy = LinearPolicy()
    spec = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("crd", crd_beta=0.5))
    groups = [_batches(0, (4,)), _batches(0, (2, 2), 20)]
    groups = [[RolloutBatch(b.cond, b.size, b.generator, b.size / 8) for b in g] for g in groups]
    grads, _ = _grad_of_update(policy, lambda opt: crd_update(policy, "student", [(groups, _reward)], spec, opt))
    params = policy.trainable_parameters("student")
    total = 0.0
    for g, seed in zip(groups, (10, 20)):
        trajs = [policy_rollout(policy, "student", RolloutBatch(0, b.size, torch.Generator().manual_seed(seed + i)), GRID, spec.kernel)
                 for i, b in enumerate(g)]
        r = torch.cat([_reward(t.final, None) for t in trajs])
        r_hat = []
        for t in trajs:
            lr = 0.0
            for n in spec.trained_steps:
                s, sn = float(GRID[n]), float(GRID[n + 1])
                x = t.states[n]
                with policy.active("student"):
                    st = sde_step(x, policy.velocity(x, s, 0), s, sn, 0.7, sigma_one="flowgrpo")
                with policy.active(None):
                    ref = sde_step(x, policy.velocity(x, s, 0), s, sn, 0.7, sigma_one="flowgrpo")
                lr = lr + gaussian_log_prob(t.states[n + 1], st) - gaussian_log_prob(t.states[n + 1], ref.detach())
            r_hat.append(0.5 * lr)
        loss = crd_loss(torch.cat(r_hat), r, torch.zeros(r.shape[0], dtype=torch.long))
        total = total + loss.mean() * sum(b.weight for b in g)
    expected = torch.autograd.grad(total, params)
    for g_, e in zip(grads, expected):
        assert float(e.abs().max()) > 0
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-12)


def test_path_divergence_is_the_sum_of_closed_form_kls():
    policy = LinearPolicy()
    spec = KernelSpec("sde", 0.7)
    tasks = [DistillTask("teacher_0", [RolloutBatch(0, 6, torch.Generator().manual_seed(1))], "a")]
    div = path_divergence(policy, "student", tasks, GRID, spec)
    traj = policy_rollout(policy, "student", RolloutBatch(0, 6, torch.Generator().manual_seed(1)), GRID, spec)
    want = 0.0
    for n in range(5):
        s, sn = float(GRID[n]), float(GRID[n + 1])
        x = traj.states[n]
        with policy.active("teacher_0"):
            v_t = policy.velocity(x, s, 0)
        st = sde_step(x, traj.velocities[n], s, sn, 0.7, sigma_one="flowgrpo")
        want += float(same_cov_kl(st.mean, sde_step(x, v_t, s, sn, 0.7, sigma_one="flowgrpo").mean, st.std).mean())
    assert div["a"] == pytest.approx(want, rel=1e-10)


def test_update_spec_validation():
    with pytest.raises(ValueError, match="deterministic"):
        UpdateSpec(GRID, KernelSpec("cps", 0.5), ObjectiveSpec("opd_kl"), trained_steps=(4,))
    assert UpdateSpec(GRID, KernelSpec("cps", 0.5), ObjectiveSpec("opd_kl")).trained_steps == (0, 1, 2, 3)
    assert UpdateSpec(GRID, KernelSpec("sde", 0.5, "ode"), ObjectiveSpec("opd_kl")).trained_steps == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="kernels"):
        UpdateSpec(GRID, KernelSpec("ode"), ObjectiveSpec("opd_kl"))
    with pytest.raises(ValueError, match="flowgrpo"):
        UpdateSpec(GRID, KernelSpec("cps", 0.5), ObjectiveSpec("grpo", kl_beta=1.0, kl_form="flowgrpo"))
    with pytest.raises(ValueError, match="trained_steps"):
        UpdateSpec(GRID, KernelSpec("sde", 0.5), ObjectiveSpec("opd_kl"), trained_steps=(7,))
    with pytest.raises(ValueError, match="distillation objective"):
        distill_update(LinearPolicy(), "student", [DistillTask("teacher_0", _batches(0))],
                       UpdateSpec(GRID, KernelSpec("sde", 0.5), ObjectiveSpec("grpo")), None)


def test_non_finite_loss_names_task_and_step_and_leaves_parameters():
    policy = LinearPolicy()
    policy.fixed["teacher_1"] = (policy.fixed["teacher_1"][0] * float("inf"), policy.fixed["teacher_1"][1])
    spec = UpdateSpec(GRID, KernelSpec("sde", 0.7), ObjectiveSpec("opd_kl"))
    before = [p.detach().clone() for p in policy.trainable_parameters("student")]
    opt = torch.optim.SGD(policy.trainable_parameters("student"), lr=1.0)
    with pytest.raises(NonFiniteError, match="loss at task 1, step 0") as err:
        distill_update(policy, "student", [DistillTask(f"teacher_{k}", _batches(k)) for k in range(2)], spec, opt)
    assert "update 7" in str(err.value.at(update=7))
    for p, b in zip(policy.trainable_parameters("student"), before):
        assert torch.equal(p.detach(), b)
