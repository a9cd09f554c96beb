"""D17: CRD's mechanisms in the engine's update (opd_ref.engine.crd_update with ObjectiveSpec.crd), each
against the objective written out anew in the test from the public kernels (opd_ref.sde_step,
gaussian_log_prob, same_cov_kl) and D9's ELBO function, differentiated by autograd."""

from __future__ import annotations

import pytest
import torch

from opd_ref import gaussian_log_prob, same_cov_kl, sde_step
from opd_ref.crd import crd_loss
from opd_ref.elbo import elbo_log_ratio, gauss_legendre_sigmas
from opd_ref.engine import CRDMechanisms, KernelSpec, ObjectiveSpec, RolloutBatch, UpdateSpec, crd_update, policy_rollout
from opd_ref.engine.crd_mechanisms import adaptive_kl_weights
from tests.opd_ref.test_engine import LinearPolicy

DT = torch.float64
GRID = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=DT)
A = 0.7
BETA = 0.5


class GuidedLinearPolicy(LinearPolicy):
    """test_engine's LinearPolicy with cond = class c in {0, 1} or None (unconditional: no class
    embedding); the reference's CFG velocity under ("guided", c, w) is computed here, as a model provides it."""

    def with_guidance(self, cond, w):
        return ("guided", cond, w)

    def velocity(self, x, sigma, cond):
        if isinstance(cond, tuple):
            _, c, w = cond
            v_u, v_c = self.velocity(x, sigma, None), self.velocity(x, sigma, c)
            return v_u + w * (v_c - v_u)
        emb = 0.0 if cond is None else 4 * self.task_emb[cond]
        if self.adapter == "student":
            return self.student(x) * (1 + sigma) + emb
        W, b = self.fixed[None]
        return x @ W.T * (1 + 0.5 * sigma) + b + emb


def _reward(final, batch):
    return -(final - 0.5).pow(2).sum(1)


def _groups():
    return [[RolloutBatch(0, 4, torch.Generator().manual_seed(10), 4 / 10), RolloutBatch(0, 2, torch.Generator().manual_seed(11), 2 / 10)],
            [RolloutBatch(1, 4, torch.Generator().manual_seed(20), 4 / 10)]]


def _grad_of_update(policy, spec, groups):
    opt = torch.optim.SGD(policy.trainable_parameters("student"), lr=1.0)
    before = [p.detach().clone() for p in policy.trainable_parameters("student")]
    stats = crd_update(policy, "student", [(groups, _reward)], spec, opt)
    grads = [b - p.detach() for b, p in zip(before, policy.trainable_parameters("student"))]
    with torch.no_grad():
        for p, b in zip(policy.trainable_parameters("student"), before):
            p.copy_(b)
    return grads, stats


def _spec(**mech):
    return UpdateSpec(GRID, KernelSpec("sde", A), ObjectiveSpec("crd", crd_beta=BETA, crd=CRDMechanisms(**mech)))


def _replay(policy, spec, group):
    """The group's rollouts again from fresh generators with the same seeds, and the generators (for the
    ELBO draws that follow the rollout in the engine)."""
    out = []
    for b in group:
        g = torch.Generator().manual_seed(int(b.generator.initial_seed()))
        out.append((b, policy_rollout(policy, "student", RolloutBatch(b.cond, b.size, g), GRID, spec.kernel), g))
    return out


def _step(policy, adapter, x, n, cond):
    s, sn = float(GRID[n]), float(GRID[n + 1])
    with policy.active(adapter):
        return sde_step(x, policy.velocity(x, s, cond), s, sn, A, sigma_one="flowgrpo")


def _standardised(r):
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-4)


def _assert_grads(grads, expected):
    for g_, e in zip(grads, expected):
        assert float(e.abs().max()) > 0
        torch.testing.assert_close(g_, e, rtol=1e-8, atol=1e-12)


def test_coupled_sampler_collapses_the_log_ratio_and_is_reinforce():
    """(a) With the log-ratio taken against the sampler, the implicit reward is 0 at every sample (the
    signal collapses) and the update is REINFORCE on the centred reward: -beta/G sum_i R~_i grad log p(path_i)."""
    policy = GuidedLinearPolicy()
    spec = _spec(ratio_to="sampler")
    groups = _groups()
    grads, stats = _grad_of_update(policy, spec, groups)
    assert stats["implicit_reward_std/0"] == 0.0
    params = policy.trainable_parameters("student")
    total = 0.0
    for group in groups:
        rep = _replay(policy, spec, group)
        r = torch.cat([_reward(t.final, None) for _, t, _ in rep])
        logp = torch.cat([sum(gaussian_log_prob(t.states[n + 1], _step(policy, "student", t.states[n], n, b.cond))
                              for n in spec.trained_steps) for b, t, _ in rep])
        total = total - BETA * ((r - r.mean()) * logp).mean() * sum(b.weight for b in group)
    _assert_grads(grads, torch.autograd.grad(total, params))
    # the decoupled default on the same rollouts has a live signal
    _, stats_ref = _grad_of_update(policy, _spec(), groups)
    assert stats_ref["implicit_reward_std/0"] > 1e-3


@pytest.mark.parametrize("adaptive", [False, True])
def test_guided_kl_anchor_and_adaptive_weights_against_the_written_out_objective(adaptive):
    """(b), (c): the reference is the CFG-guided one, in the log-ratio and in the KL anchor
    beta_KL * omega_i * sum_n KL(pi_theta || pi_ref^w), omega_i = floor + (1 - floor)(1/2 + clip(A_i, -k, k)/2k)."""
    w, kb, floor, k = 2.5, 0.7, 0.1, 1.5
    policy = GuidedLinearPolicy()
    spec = _spec(guidance=w, kl_beta=kb, adaptive_kl=adaptive, kl_floor=floor, adv_clip=k)
    groups = _groups()
    grads, stats = _grad_of_update(policy, spec, groups)
    params = policy.trainable_parameters("student")
    total = 0.0
    for group in groups:
        rep = _replay(policy, spec, group)
        r = torch.cat([_reward(t.final, None) for _, t, _ in rep])
        a = _standardised(r)
        omega = floor + (1 - floor) * (0.5 + a.clamp(-k, k) / (2 * k)) if adaptive else torch.ones_like(r)
        r_hat, kl_rows = [], []
        for b, t, _ in rep:
            lr, kl = 0.0, 0.0
            for n in spec.trained_steps:
                x, s, sn = t.states[n], float(GRID[n]), float(GRID[n + 1])
                st = _step(policy, "student", x, n, b.cond)
                with policy.active(None):  # guided reference written out: v_u + w (v_c - v_u)
                    v_u, v_c = policy.velocity(x, s, None), policy.velocity(x, s, b.cond)
                ref = sde_step(x, (v_u + w * (v_c - v_u)).detach(), s, sn, A, sigma_one="flowgrpo")
                lr = lr + gaussian_log_prob(t.states[n + 1], st) - gaussian_log_prob(t.states[n + 1], ref)
                kl = kl + same_cov_kl(st.mean, ref.mean, st.std)
            r_hat.append(BETA * lr)
            kl_rows.append(kl)
        gw = sum(b.weight for b in group)
        total = total + crd_loss(torch.cat(r_hat), r, torch.zeros(r.shape[0], dtype=torch.long)).mean() * gw
        total = total + kb * (omega * torch.cat(kl_rows)).mean() * gw
    _assert_grads(grads, torch.autograd.grad(total, params))
    assert stats["kl_anchor/0"] > 0
    if adaptive:
        assert 0.1 < stats["kl_weight_mean/0"] < 1.0


def test_adaptive_kl_weights_known_values():
    """(c) the rule: linear in the clipped standardised reward, floor at the bottom, 1 at the top."""
    a = torch.tensor([-10.0, -2.0, -1.0, 0.0, 1.0, 2.0, 10.0], dtype=DT)
    w = adaptive_kl_weights(a, 0.2, 2.0)
    torch.testing.assert_close(w, torch.tensor([0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0], dtype=DT), rtol=0, atol=1e-15)


def test_elbo_implicit_reward_against_d9():
    """(d) the ELBO implicit reward: beta x the D9 estimate (opd_ref.elbo.elbo_log_ratio) on the final
    samples, Gauss-Legendre levels, one fresh noise draw per level (drawn after the rollout)."""
    J = 3
    policy = GuidedLinearPolicy()
    spec = _spec(implicit="elbo", elbo_levels=J)
    groups = _groups()
    grads, _ = _grad_of_update(policy, spec, groups)
    params = policy.trainable_parameters("student")
    nodes, weights = gauss_legendre_sigmas(J)
    total = 0.0
    for group in groups:
        rep = _replay(policy, spec, group)
        r = torch.cat([_reward(t.final, None) for _, t, _ in rep])
        r_hat = []
        for b, t, g in rep:
            x0 = t.final
            est = 0.0
            for s, om in zip(nodes, weights):
                eps = torch.randn(x0.shape, generator=g, dtype=DT)

                def v_theta(x, sig, c=b.cond):
                    with policy.active("student"):
                        return policy.velocity(x, sig, c)

                def v_ref(x, sig, c=b.cond):
                    with policy.active(None):
                        return policy.velocity(x, sig, c).detach()

                est = est + elbo_log_ratio(v_theta, v_ref, x0, s.reshape(1), om.reshape(1), eps[None])
            r_hat.append(BETA * est)
        total = total + crd_loss(torch.cat(r_hat), r, torch.zeros(r.shape[0], dtype=torch.long)).mean() * sum(
            b.weight for b in group)
    _assert_grads(grads, torch.autograd.grad(total, params))


def test_elbo_implicit_reward_is_zero_when_coupled():
    """(d) + (a): against theta_old the ELBO log-ratio is exactly 0 too."""
    _, stats = _grad_of_update(GuidedLinearPolicy(), _spec(implicit="elbo", ratio_to="sampler"), _groups())
    assert stats["implicit_reward_std/0"] == 0.0


@pytest.mark.parametrize("kw,match", [({"ratio_to": "old"}, "ratio_to"), ({"implicit": "dsm"}, "implicit"),
                                      ({"kl_beta": -1.0}, "kl_beta"), ({"kl_floor": 1.5}, "kl_floor"),
                                      ({"adv_clip": 0.0}, "adv_clip"), ({"elbo_levels": 0}, "elbo_levels"),
                                      ({"guidance": -1.0}, "guidance"), ({"adaptive_kl": True}, "adaptive_kl")])
def test_bad_mechanisms_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CRDMechanisms(**kw)


def test_guidance_needs_a_policy_that_provides_it():
    inner = GuidedLinearPolicy()

    class NoGuidance:  # the protocol without with_guidance
        event_shape, device, state_dtype = inner.event_shape, inner.device, inner.state_dtype
        velocity, active, trainable_parameters = inner.velocity, inner.active, inner.trainable_parameters

    with pytest.raises(TypeError, match="with_guidance"):
        _grad_of_update(NoGuidance(), _spec(guidance=2.0), _groups())
