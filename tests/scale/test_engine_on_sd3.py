"""The engine's updates on the tiny SD3.5 model through scale, against formulas written anew here.

* one stage-2 update's gradient is the gradient of the *task average* (1/K weighting), each task's
  gradient computed independently with ``opd_ref.sde_step`` / ``opd_kl_loss`` and autograd;
* stage 1 (GRPO) includes beta times the KL to the reference, exact form (``opd_ref.sde_step`` +
  ``same_cov_kl``) and Flow-GRPO's form (a hand-written mean-over-dims formula without |dt|);
* gradient checkpointing gives the same gradients as without, for stage 1, stage 2 and CRD;
* a non-finite velocity stops the run with an error naming the phase, update, task and step.

The optimizer is a recorder: ``step()`` stores the summed gradients and leaves the parameters alone,
so an update and its oracle see the same rollouts (the same seeds, the same parameters).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from opd_ref import opd_kl_loss, same_cov_kl, sde_step
from opd_ref.engine import AdvantageSpec, NonFiniteError, ObjectiveSpec, crd_update, distill_update, grpo_update, policy_rollout
from scale.lora import switch_adapter
from scale.pipeline import predict_velocity
from scale.train import STUDENT, DivergedError, Trainer
from scale.updates import ImageReward, distill_tasks, reward_groups
from tests.scale.train_helpers import tiny_config, workspace  # noqa: F401  (fixture)


class GradRecorder(torch.optim.Optimizer):
    """An optimizer whose step records the gradients and changes nothing."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def _grads(params, loss):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _assert_close(a, b, rtol=1e-4):
    num = math.sqrt(sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.double().pow(2).sum()) for y in b))
    assert den > 0, "the oracle gradient is zero: the comparison could not fail"
    assert num <= rtol * den, (num, den)


def _perturb(trainer, adapter, std=0.05, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in trainer.setup.transformer.named_parameters():
            if f".lora_B.{adapter}." in n:
                p.add_(std * torch.randn(p.shape, generator=gen))


def _kernel_pair(x, v, v_other, sig, n, a):
    b = x.shape[0]
    s, sn = sig[n].expand(b), sig[n + 1].expand(b)
    return sde_step(x, v, s, sn, a, sigma_one="flowgrpo"), sde_step(x, v_other, s, sn, a, sigma_one="flowgrpo")


def test_distill_update_gradient_is_the_task_average(workspace, tmp_path):
    """grad of one engine update over K = 2 tasks = (1/K) sum_k grad L_k, with L_k the task's
    sample-weighted sum over trained steps of opd_ref's closed-form KL, recomputed per task here."""
    trainer = Trainer(tiny_config(workspace, tmp_path / "run", max_grad_norm=0.0))
    s = trainer.setup
    params = list(s.policy.trainable_parameters(STUDENT))
    rec = GradRecorder(params)
    distill_update(s.policy, STUDENT, distill_tasks(s, 0, 0), s.spec, rec)
    per_task = []
    for task in distill_tasks(s, 0, 0):  # fresh generators: the same rollouts
        loss = 0.0
        for batch in task.batches:
            traj = policy_rollout(s.policy, STUDENT, batch, s.sigmas, s.spec.kernel)
            embeds = s.cache.encode(batch.meta)
            for n in s.spec.trained_steps:
                x, sigma = traj.states[n], s.sigmas[n].expand(batch.size)
                v_s = predict_velocity(s.transformer, x, sigma, embeds, trainer.cfg.guidance_scale, STUDENT)
                with torch.no_grad():
                    v_t = predict_velocity(s.transformer, x, sigma, embeds, trainer.cfg.guidance_scale, task.teacher)
                step_s, step_t = _kernel_pair(x, v_s, v_t, s.sigmas, n, trainer.cfg.noise_level)
                loss = loss + batch.weight * opd_kl_loss(step_s, step_t.mean).mean()
        per_task.append(_grads(params, loss))
    average = [(g0 + g1) / 2 for g0, g1 in zip(*per_task)]
    _assert_close(rec.grads, average)
    # the two tasks' gradients differ, so a missing 1/K (or a missing task) cannot pass
    _assert_close([g0 - g1 for g0, g1 in zip(*per_task)], average, rtol=10.0)


def _stage1_trainer(ws, tmp_path, **over):
    cfg = tiny_config(ws, tmp_path / "run", tasks=["bright"], prompt_files=ws["prompt_files"][:1], teacher_loras=[""],
                      rewards=["brightness"], stage1_steps=1, group_size=2, batch_size=1, num_steps=2,
                      max_grad_norm=0.0, kl_beta=0.5, clip_range=0.2, **over)
    trainer = Trainer(cfg)
    _perturb(trainer, "teacher_0")  # the policy differs from the reference: KL > 0
    return trainer


def _grpo(trainer, spec):
    s = trainer.setup
    rec = GradRecorder(s.policy.trainable_parameters("teacher_0"))
    stats = grpo_update(s.policy, "teacher_0", reward_groups(s, 0, 0, 0), ImageReward(s.pipe, s.tasks[0].reward), spec,
                        rec, advantages=AdvantageSpec(ddof=0, eps=trainer.cfg.adv_eps))
    return stats, rec.grads


@pytest.mark.parametrize("kl_form", ["exact", "flowgrpo"])
def test_stage1_loss_includes_beta_times_the_kl_to_the_reference(workspace, tmp_path, kl_form):
    """Stage-1 loss(beta) - loss(0) = beta * sum_n E[KL_n] and the same for the gradients, with KL_n the
    exact per-step KL (opd_ref.sde_step + same_cov_kl) or Flow-GRPO's code form, written here:
    mean over latent dims of (mu_theta - mu_ref)^2 / (2 std_t^2), std_t = a sqrt(sigma / (1 - sigma))
    (at sigma = 1 the next grid sigma in the denominator), no |dt|."""
    trainer = _stage1_trainer(workspace, tmp_path, kl_form=kl_form)
    s, cfg = trainer.setup, trainer.cfg
    beta = cfg.kl_beta
    stats, grads = _grpo(trainer, s.grpo_spec)
    off = dataclasses.replace(s.grpo_spec, objective=ObjectiveSpec("grpo", clip_range=cfg.clip_range, kl_beta=0.0))
    stats0, grads0 = _grpo(trainer, off)
    params = list(s.policy.trainable_parameters("teacher_0"))
    kl_sum, a, sig = 0.0, cfg.noise_level, s.sigmas.double()
    for group in reward_groups(s, 0, 0, 0):
        for batch in group:
            traj = policy_rollout(s.policy, "teacher_0", batch, s.sigmas, s.spec.kernel)
            embeds = s.cache.encode(batch.meta)
            for n in s.grpo_spec.trained_steps:
                x, sigma = traj.states[n], s.sigmas[n].expand(batch.size)
                v = predict_velocity(s.transformer, x, sigma, embeds, cfg.guidance_scale, "teacher_0")
                with torch.no_grad():
                    v_ref = predict_velocity(s.transformer, x, sigma, embeds, cfg.guidance_scale, None)
                step, ref = _kernel_pair(x, v, v_ref, s.sigmas, n, a)
                if kl_form == "exact":
                    kl = same_cov_kl(step.mean, ref.mean, step.std)
                else:
                    sg, sn = float(sig[n]), float(sig[n + 1])
                    std_t = a * math.sqrt(sg / (1.0 - (sn if sg >= 1.0 else sg)))
                    kl = (step.mean - ref.mean).pow(2).mean(dim=(1, 2, 3)) / (2.0 * std_t**2)
                kl_sum = kl_sum + batch.weight * kl.mean()
    kl_value = float(kl_sum.detach())
    assert kl_value > 1e-3  # a real KL
    assert stats["kl_ref"] == pytest.approx(kl_value, rel=1e-4)
    assert stats["loss"] - stats0["loss"] == pytest.approx(beta * kl_value, rel=1e-3)
    # float32: the oracle subtracts two nearly equal kernel means, the engine takes c_v (v - v_ref)
    _assert_close([g - g0 for g, g0 in zip(grads, grads0)], [beta * g for g in _grads(params, kl_sum)], rtol=2e-3)


def _update_grads(trainer, kind):
    s = trainer.setup
    # start from the reference (adapters disabled): an update must not depend on the adapter active
    # before it, and a recomputed forward that saw the state at rest would see the reference
    switch_adapter(s.transformer, None)
    if kind == "grpo":
        return _grpo(trainer, s.grpo_spec)[1]
    rec = GradRecorder(s.policy.trainable_parameters(STUDENT))
    if kind == "distill":
        distill_update(s.policy, STUDENT, distill_tasks(s, 1, 0), s.spec, rec)
    else:
        crd_update(s.policy, STUDENT, [(reward_groups(s, 0, 0, 0), ImageReward(s.pipe, s.tasks[0].reward))], s.spec, rec)
    return rec.grads


@pytest.mark.parametrize("kind", ["grpo", "distill", "crd"])
def test_gradient_checkpointing_gives_the_same_gradients(workspace, tmp_path, kind):
    """--gradient-checkpointing true recomputes each trained forward during backward with the same adapter:
    the gradients equal those without it (stage 1, stage 2 and CRD)."""
    grads = {}
    for ckpt in (False, True):
        out = tmp_path / f"run_{ckpt}"
        if kind == "grpo":
            trainer = _stage1_trainer(workspace, out, gradient_checkpointing=ckpt)
        elif kind == "distill":
            trainer = Trainer(tiny_config(workspace, out / "run", num_steps=2, batch_size=1, max_grad_norm=0.0,
                                          gradient_checkpointing=ckpt))
        else:
            trainer = Trainer(tiny_config(workspace, out / "run", loss="crd", tasks=["bright"], teacher_loras=[""],
                                          prompt_files=workspace["prompt_files"][:1], rewards=["brightness"],
                                          group_size=2, batch_size=1, num_steps=2, max_grad_norm=0.0,
                                          gradient_checkpointing=ckpt))
        assert trainer.setup.transformer.is_gradient_checkpointing == ckpt
        grads[ckpt] = _update_grads(trainer, kind)
    _assert_close(grads[True], grads[False], rtol=1e-5)


def test_a_non_finite_velocity_stops_the_run_naming_where(workspace, tmp_path):
    """A NaN in the student after update 1: update 2's rollout stops with phase, update, task and step."""

    def poison(trainer, name, step):
        with torch.no_grad():
            for p in trainer.setup.policy.trainable_parameters(STUDENT):
                p.fill_(float("nan"))

    trainer = Trainer(tiny_config(workspace, tmp_path / "run", distill_steps=2), callbacks=[poison])
    with pytest.raises(DivergedError, match=r"non-finite velocity at phase distill, update 2, task 0, step 0") as info:
        trainer.run()
    cause = info.value.__cause__
    assert isinstance(cause, NonFiniteError) and (cause.update, cause.task, cause.step) == (2, 0, 0)
