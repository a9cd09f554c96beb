"""The stage-2 trainer on the tiny SD3.5-style pipeline: the per-step loss is opd_ref's, a short run lowers
the held-out student-teacher KL, only the student LoRA changes, the saved LoRA reproduces the student in
``StableDiffusion3Pipeline``; stage 1 (GRPO) and CRD run; bad input leaves nothing behind."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from opd_ref import ode_matching_loss, ode_step, opd_kl_loss, sde_step
from opd_ref.engine import KernelSpec, RolloutBatch, policy_rollout
from scale.pipeline import model_inputs, predict_velocity
from scale.train import STUDENT, Trainer
from tests.scale.train_helpers import (  # noqa: F401  (fixtures)
    lora_file_tensors,
    read_metrics,
    tiny_config,
    workspace,
)


def _step_velocities(trainer, cfg, rec):
    """The stored transition of a step-hook record, its sigmas, and the student's and the task teacher's
    velocities there, evaluated anew (no gradient)."""
    s = trainer.setup
    t = rec["transition"]
    embeds = s.cache.encode(rec["batch"].meta)
    b = t.x.shape[0]
    sigma, sigma_next = s.sigmas[t.index].expand(b), s.sigmas[t.index + 1].expand(b)
    with torch.no_grad():
        v_s = predict_velocity(s.transformer, t.x, sigma, embeds, cfg.guidance_scale, STUDENT)
        v_t = predict_velocity(s.transformer, t.x, sigma, embeds, cfg.guidance_scale, f"teacher_{rec['task']}")
    return t, sigma, sigma_next, v_s, v_t


@pytest.mark.parametrize("loss,kernel", [("opd_kl", "sde"), ("ppo_opd", "sde"), ("opd_ode", "ode")])
def test_per_step_loss_is_opd_ref_loss_of_the_same_velocities(workspace, tmp_path, loss, kernel):
    """The per-sample loss at every trained step of a run equals opd_ref's public loss recomputed here
    from independently evaluated student and teacher velocities at the stored state (the student before
    the update: the optimizer steps only after the cycle). PPO-OPD's value at ratio 1 is -A = KL."""
    cfg = tiny_config(workspace, tmp_path / "run", loss=loss, kernel=kernel, distill_steps=1)
    trainer = Trainer(cfg)
    s = trainer.setup
    tr = s.transformer
    checked = 0
    before = {n: p.detach().clone() for n, p in tr.named_parameters() if f".{STUDENT}." in n}

    def hook(rec):
        nonlocal checked
        t, sigma, sigma_next, v_s, v_t = _step_velocities(trainer, cfg, rec)
        if loss == "opd_ode":
            expected = ode_matching_loss(ode_step(t.x, v_s, sigma, sigma_next), ode_step(t.x, v_t, sigma, sigma_next))
        else:
            step_s = sde_step(t.x, v_s, sigma, sigma_next, cfg.noise_level, sigma_one="flowgrpo")
            step_t = sde_step(t.x, v_t, sigma, sigma_next, cfg.noise_level, sigma_one="flowgrpo")
            expected = opd_kl_loss(step_s, step_t.mean)
        # float32: opd_ref subtracts the two kernel means, the engine takes c_v (v_s - v_t)
        assert torch.allclose(rec["loss"], expected, rtol=1e-4, atol=1e-6), (t.index, rec["loss"], expected)
        assert bool((expected > 0).all())  # teachers differ from the student: a non-trivial comparison
        checked += 1

    trainer.step_hook = hook
    trainer.run()
    # 2 tasks x 2 micro-batches x 3 trained steps, sigma = 1 (step 0) included
    assert checked == 2 * 2 * 3
    after = {n: p.detach() for n, p in tr.named_parameters() if f".{STUDENT}." in n}
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_stage2_lowers_heldout_kl_changes_only_student_and_saved_lora_reproduces_it(workspace, tmp_path, tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, heldout_prompt_files=[workspace["heldout"]], distill_steps=3, sample_every=2)
    trainer = Trainer(cfg)
    s = trainer.setup
    before = {n: p.detach().clone() for n, p in s.transformer.named_parameters()}
    result = trainer.run()
    assert result.status == "finished"

    # 1. held-out path KL (sum of per-step closed-form KLs on fixed-noise student rollouts) goes down
    evals = [r for r in read_metrics(run) if r["event"] == "eval"]
    assert len(evals) == 2
    first, last = evals[0]["heldout_kl/mean"], evals[-1]["heldout_kl/mean"]
    assert last < 0.9 * first, (first, last)
    for task in cfg.tasks:
        assert evals[-1][f"heldout_kl/{task}"] < evals[0][f"heldout_kl/{task}"]
    updates = [r for r in read_metrics(run) if r["event"] == "update"]
    assert [r["step"] for r in updates] == [1, 2, 3]

    # 2. only the student's LoRA parameters changed (base weights and teachers bit-identical)
    after = dict(s.transformer.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed, "nothing trained"
    assert all(f".{STUDENT}." in n for n in changed), [n for n in changed if f".{STUDENT}." not in n][:3]
    student = [n for n in before if f".{STUDENT}." in n]
    assert len(changed) >= 0.9 * len(student), (len(changed), len(student))

    # 3. outputs: config.json, metrics, sample grids, student LoRA loadable by the diffusers pipeline
    for name in ("config.json", "metrics.jsonl", "samples/step_000002.png", "samples/final.png",
                 "student/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    embeds = s.cache.encode(["task 0 picture 1", "task 1 picture 2"])
    latents0 = torch.randn((2,) + s.policy.event_shape, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                  negative_prompt_embeds=embeds.negative_prompt_embeds,
                  negative_pooled_prompt_embeds=embeds.negative_pooled_prompt_embeds, num_inference_steps=cfg.num_steps,
                  guidance_scale=cfg.guidance_scale, output_type="latent")
    base_out = pipe(latents=latents0.clone(), **kwargs).images
    pipe.load_lora_weights(str(run / "student"))
    lora_out = pipe(latents=latents0.clone(), **kwargs).images
    # the engine's ODE rollout of the student from the same noise (a batch generator seeded alike)
    batch = RolloutBatch(model_inputs(embeds, cfg.guidance_scale, torch.float32, "cpu"), 2,
                         torch.Generator().manual_seed(3))
    ours = policy_rollout(s.policy, STUDENT, batch, s.sigmas, KernelSpec("ode")).final
    gap = (lora_out - base_out).abs().max()
    assert gap > 1e-3, "the student LoRA should differ from the base"
    assert torch.allclose(lora_out, ours, atol=1e-5, rtol=1e-5), (lora_out - ours).abs().max()
    # and the saved file holds exactly the trained tensors
    saved = lora_file_tensors(run / "student")
    assert len(saved) == len(student)


def test_stage1_grpo_then_distill_runs_and_writes_teacher(workspace, tmp_path):
    """Stage 1 trains one teacher per task with GRPO on a built-in reward (KL to the reference on),
    saves it, then stage 2 distills it; the teacher adapter moved, metrics hold rewards and the KL."""
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, tasks=["bright"], prompt_files=workspace["prompt_files"][:1], teacher_loras=[""],
                      rewards=["brightness"], stage1_steps=2, group_size=2, batch_size=2, distill_steps=1,
                      num_steps=2, ppo_epochs=2, clip_range=0.2)
    trainer = Trainer(cfg)
    t0 = {n: p.detach().clone() for n, p in trainer.setup.transformer.named_parameters() if ".teacher_0." in n}
    result = trainer.run()
    assert result.status == "finished"
    assert (run / "teachers" / "bright" / "pytorch_lora_weights.safetensors").is_file()
    assert any(not torch.equal(t0[n], p.detach()) for n, p in trainer.setup.transformer.named_parameters() if n in t0)
    grpo = [r for r in read_metrics(run) if r.get("phase_name") == "grpo/bright"]
    assert [r["step"] for r in grpo] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in grpo)
    # second PPO epoch of the first update moved the policy: KL to the reference > 0
    assert grpo[-1]["kl_ref"] > 0


def test_crd_student_on_rewards_runs(workspace, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, loss="crd", tasks=["bright"], prompt_files=workspace["prompt_files"][:1],
                      teacher_loras=[""], rewards=["brightness"], group_size=2, batch_size=1, distill_steps=2,
                      num_steps=2, crd_beta=0.5)
    trainer = Trainer(cfg)
    s0 = {n: p.detach().clone() for n, p in trainer.setup.transformer.named_parameters() if f".{STUDENT}." in n}
    trainer.run()
    ups = [r for r in read_metrics(run) if r["event"] == "update"]
    assert len(ups) == 2 and all(r["loss"] >= 0 for r in ups)
    # at theta = theta_old = reference (lora_B = 0) the implicit reward is 0, the CRD loss is half the
    # centered reward variance; the gradient is not zero, so the student moves
    moved = [n for n, p in trainer.setup.transformer.named_parameters() if n in s0 and not torch.equal(s0[n], p.detach())]
    assert moved


# ---- bad input: clear errors, no run directory left behind --------------------------------------


def _bad_lora(path):
    """A diffusers-format LoRA for a wider transformer (another architecture)."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 48),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 4)},
              str(path / "pytorch_lora_weights.safetensors"))
    return str(path)


@pytest.mark.parametrize("case", ["missing_model", "foreign_lora", "empty_prompts", "unknown_reward", "missing_lora",
                                  "cps_deterministic_step", "group_of_one", "missing_reward_dir", "wrong_reward_dir"])
def test_bad_input_clear_error_and_no_outputs(workspace, tmp_path, case):
    run = tmp_path / "run"
    over, err, match = {}, ValueError, None
    if case == "missing_model":
        over, err, match = {"model": str(tmp_path / "nope")}, FileNotFoundError, "nope"
    elif case == "foreign_lora":
        over = {"teacher_loras": [_bad_lora(tmp_path / "bad"), workspace["teachers"][1]]}
        match = "another architecture"
    elif case == "empty_prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n   \n")
        over, match = {"prompt_files": [str(empty), workspace["prompt_files"][1]]}, "empty"
    elif case == "unknown_reward":
        over = {"teacher_loras": ["", workspace["teachers"][1]], "rewards": ["no_such_reward", ""], "stage1_steps": 1,
                "group_size": 2}
        match = "no_such_reward"
    elif case in ("missing_reward_dir", "wrong_reward_dir"):  # named with the spec, before anything is loaded
        where = tmp_path / "no_model" if case == "missing_reward_dir" else Path(workspace["teachers"][0]).parent
        spec = f"0.5*brightness + 0.5*pickscore:{where}"
        over = {"teacher_loras": ["", workspace["teachers"][1]], "rewards": [spec, ""], "stage1_steps": 1,
                "group_size": 2}
        err = FileNotFoundError if case == "missing_reward_dir" else ValueError
        match = re.escape(f"reward 'pickscore:{where}'") + ".*" + ("does not exist" if err is FileNotFoundError
                                                                   else "no config.json")
    elif case == "cps_deterministic_step":  # CPS's last step has std 0: no KL to train on
        over, match = {"kernel": "cps", "noise_level": 0.5, "train_steps": [0, 2]}, "deterministic"
    elif case == "group_of_one":  # group-normalised advantages need two rollouts per prompt
        over = {"teacher_loras": ["", workspace["teachers"][1]], "rewards": ["brightness", ""], "stage1_steps": 1,
                "group_size": 1}
        match = "group_size"
    elif case == "missing_lora":
        over, err, match = {"teacher_loras": [str(tmp_path / "gone"), workspace["teachers"][1]]}, FileNotFoundError, "gone"
    with pytest.raises(err, match=match):  # at config validation (reward syntax) or setup
        Trainer(tiny_config(workspace, run, **over))
    assert not run.exists()


def test_existing_run_dir_is_not_overwritten(workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_config(workspace, run))
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_cps_stage2_trains_the_stochastic_steps_only(workspace, tmp_path):
    """Under CPS the last step is deterministic (std 0): the default run trains the others and the
    logged KL is finite."""
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, kernel="cps", noise_level=0.5, distill_steps=1,
                      heldout_prompt_files=[workspace["heldout"]])
    trainer = Trainer(cfg)
    assert trainer.setup.spec.trained_steps == (0, 1)
    result = trainer.run()
    assert result.status == "finished"
    records = read_metrics(run)
    values = [v for r in records for k, v in r.items() if k.startswith(("div/", "heldout_kl/"))]
    assert len(values) >= 2 + 3 * 2  # per-task divergences of the update, held-out KL before and after
    assert all(math.isfinite(v) and v >= 0 for v in values)


# ---- D16: the distillation-objective ablation's losses
def _ablation_expected(loss, x, v_s, v_t, noise, sigma, sigma_next, a):
    step_s = sde_step(x, v_s, sigma, sigma_next, a, sigma_one="flowgrpo")
    step_t = sde_step(x, v_t, sigma, sigma_next, a, sigma_one="flowgrpo")
    s = step_s.std
    delta = (step_s.mean - step_t.mean).double()
    if loss == "fwd_kl":  # -log pi_s at mu_t + s eps, less the entropy constant
        return ((delta**2 - 2.0 * s.double() * noise.double() * delta).flatten(1).sum(1) / (2.0 * s.double().flatten(1)[:, 0] ** 2))
    # dmd: <s_s - s_t, x0_hat_s> less its x-part: (1 - sigma) <v_s - v_t, v_s>
    sg = sigma.double()
    return (1.0 - sg) * ((v_s - v_t).double() * v_s.double()).flatten(1).sum(1)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["fwd_kl", "dmd"])
def test_one_tiny_update_with_an_ablation_loss(workspace, tmp_path, loss):
    """D16 at scale: one stage-2 run with ``fwd_kl`` / ``dmd``; the per-sample loss at every trained step
    equals the loss written anew from independently evaluated velocities; the student LoRA changes."""
    cfg = tiny_config(workspace, tmp_path / "run", loss=loss, kernel="sde", distill_steps=1, batch_size=1,
                      micro_batch_size=1)
    trainer = Trainer(cfg)
    s = trainer.setup
    tr = s.transformer
    before = {n: p.detach().clone() for n, p in tr.named_parameters() if f".{STUDENT}." in n}
    checked = []

    def hook(rec):
        t, sigma, sigma_next, v_s, v_t = _step_velocities(trainer, cfg, rec)
        expected = _ablation_expected(loss, t.x, v_s, v_t, t.noise, sigma, sigma_next, cfg.noise_level)
        scale = float(expected.abs().max()) + 1e-6
        assert torch.allclose(rec["loss"].double(), expected, rtol=1e-3, atol=1e-4 * scale), (t.index, rec["loss"], expected)
        checked.append(t.index)

    trainer.step_hook = hook
    trainer.run()
    assert len(checked) == 2 * 3  # 2 tasks x 1 micro-batch x 3 trained steps
    after = {n: p.detach() for n, p in tr.named_parameters() if f".{STUDENT}." in n}
    assert any(not torch.equal(before[n], after[n]) for n in before)
# ---- D17: CRD mechanism switches (config crd_*) on the tiny pipeline; first update: student = reference


def _crd_run(workspace, tmp_path, **over):
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, loss="crd", tasks=["bright"], prompt_files=workspace["prompt_files"][:1],
                      teacher_loras=[""], rewards=["brightness"], group_size=2, batch_size=1, distill_steps=1,
                      num_steps=2, crd_beta=0.5, **over)
    Trainer(cfg).run()
    ups = [r for r in read_metrics(run) if r["event"] == "update"]
    assert len(ups) == 1 and ups[0]["loss"] >= 0 and ups[0]["grad_norm"] > 0
    return ups[0]


@pytest.mark.parametrize("over", [{"crd_ratio_to": "sampler"}, {"crd_implicit": "elbo", "crd_elbo_levels": 2}])
def test_implicit_reward_switches_run_and_start_at_zero(workspace, tmp_path, over):
    """(a), (d): coupled to the sampler, or the ELBO implicit reward: 0 at theta = theta_old = reference."""
    up = _crd_run(workspace, tmp_path, **over)
    assert up["implicit_reward_std/bright"] == 0.0


def test_kl_anchor_to_a_differently_guided_reference(workspace, tmp_path):
    """(b), (c): the anchor to the reference guided at w = 7 (rollouts at 4.5) is > 0 at the first update;
    the reward-adaptive weights lie in [floor, 1]."""
    up = _crd_run(workspace, tmp_path, guidance_scale=4.5, crd_guidance=7.0, crd_kl_beta=0.1, crd_adaptive_kl=True,
              crd_kl_floor=0.2)
    assert up["kl_anchor/bright"] > 0
    assert 0.2 <= up["kl_weight_mean/bright"] <= 1.0


def test_kl_anchor_to_the_same_guided_reference_is_zero_at_the_start(workspace, tmp_path):
    up = _crd_run(workspace, tmp_path, guidance_scale=4.5, crd_kl_beta=0.1)
    assert up["kl_anchor/bright"] == 0.0
