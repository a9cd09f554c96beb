"""Evaluation (eval.jsonl during training, ``opd-scale eval --run``), the EMA of the student LoRA
(its recursion, exact resume), and the TensorBoard tracker read back offline."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from scale.train import STUDENT, Trainer
from tests.scale.train_helpers import (  # noqa: F401  (fixtures)
    lora_file_tensors,
    read_metrics,
    tiny_config,
    workspace,
)


def _read_eval(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]


def _student_lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.setup.transformer.named_parameters()
            if "lora_" in n and f".{STUDENT}." in n}


def test_ema_follows_its_recursion_and_is_what_evaluation_uses(workspace, tmp_path):
    d = 0.6
    seen = []
    over = dict(distill_steps=3, ema_decay=d, heldout_prompt_files=[workspace["heldout"]], eval_every=1,
                eval_steps=2, eval_grid_images=2)
    trainer = Trainer(tiny_config(workspace, tmp_path / "run", **over),
                      callbacks=[lambda tr, name, step: seen.append(_student_lora(tr))])
    start = _student_lora(trainer)
    trainer.run()
    # the recursion written anew: ema_0 = theta_0, ema_n = d ema_{n-1} + (1 - d) theta_n
    ema = {n: t.double() for n, t in start.items()}
    for theta in seen:
        ema = {n: d * ema[n] + (1 - d) * theta[n].double() for n in ema}
    assert len(seen) == 3
    moved = max(float((seen[-1][n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-3  # the student trained, so the EMA differs from both ends
    for n, t in ema.items():
        torch.testing.assert_close(trainer.ema.shadow[n].double(), t, rtol=1e-6, atol=1e-7)
    saved = lora_file_tensors(tmp_path / "run" / "student_ema")
    raw = lora_file_tensors(tmp_path / "run" / "student")
    key_b = next(k for k in saved if "lora_B" in k)
    assert not torch.equal(saved[key_b], raw[key_b])
    # the trained weights are back in the adapter after every EMA evaluation
    for n, t in _student_lora(trainer).items():
        assert torch.equal(t, seen[-1][n])
    recs = _read_eval(tmp_path / "run")
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and {r["weights"] for r in recs} == {"ema"}
    # at update 0 the EMA equals the student: the KL measured on the EMA weights equals the held-out KL
    # computed separately on the student's own weights (metrics.jsonl)
    kl0 = next(r for r in read_metrics(tmp_path / "run") if r.get("event") == "eval" and r["step"] == 0)
    for task in trainer.cfg.tasks:
        assert recs[0][f"kl/{task}"] == pytest.approx(kl0[f"heldout_kl/{task}"], rel=1e-6)
        assert (tmp_path / "run" / "eval" / "step_000003" / f"{task}.png").is_file()
    # after the last update the evaluation saw the EMA weights, not the student's
    with trainer.ema.applied():
        ema_kl = trainer.heldout_divergence()
    student_kl = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "eval"][-1]
    for task in trainer.cfg.tasks:
        assert recs[-1][f"kl/{task}"] == pytest.approx(ema_kl[f"heldout_kl/{task}"], rel=1e-6)
        assert abs(recs[-1][f"kl/{task}"] - student_kl[f"heldout_kl/{task}"]) > 1e-3 * student_kl[f"heldout_kl/{task}"]


def test_ema_resumes_exactly(workspace, tmp_path):
    over = dict(distill_steps=3, checkpoint_every=1, ema_decay=0.7)
    Trainer(tiny_config(workspace, tmp_path / "full", **over)).run()

    def stop_at_2(trainer, name, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    assert Trainer(tiny_config(workspace, part, **over), callbacks=[stop_at_2]).run().status == "interrupted"
    assert Trainer(tiny_config(workspace, part, **over), resume=True).run().status == "finished"
    a, b = lora_file_tensors(tmp_path / "full" / "student_ema"), lora_file_tensors(part / "student_ema")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_eval_rewards_tensorboard_and_the_eval_command(workspace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scale.cli import main
    from scale.io import sample_images
    from scale.rewards import get_reward
    from scale.setup import derive_seed

    run = tmp_path / "run"
    over = dict(distill_steps=2, heldout_prompt_files=[workspace["heldout"]], eval_every=1, eval_steps=3,
                rewards=["brightness", "brightness"], report_to="tensorboard", eval_grid_images=0)
    trainer = Trainer(tiny_config(workspace, run, **over))
    prompts = trainer.setup.heldout[0]
    # the reward of the base model (the student at update 0) by hand: one ODE sample per prompt
    # (micro-batch 1: chunk c = prompt c, noise seed (seed, 3000, task, chunk)), averaged
    bright = get_reward("brightness")
    by_hand = sum(float(bright(sample_images(trainer.setup.pipe, trainer.setup.cache, [p], None, num_steps=3,
                                             resolution=8, guidance_scale=trainer.cfg.guidance_scale,
                                             seed=derive_seed(0, 3000, 1, c)), [p])[0])
                  for c, p in enumerate(prompts)) / len(prompts)
    trainer.run()
    recs = _read_eval(run)
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[0]["reward/task1"] == pytest.approx(by_hand, rel=1e-5)
    assert recs[0]["reward/task1"] != recs[-1]["reward/task1"]
    assert {"kl/task0", "kl/task1", "kl/mean", "reward/mean"} <= set(recs[-1])
    # tensorboard: the events file holds the logged losses at the update count, and the eval rewards
    files = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("distill/loss")]
    metrics = [(r["step"], r["loss"]) for r in read_metrics(run) if r.get("event") == "update"]
    assert [s for s, _ in losses] == [s for s, _ in metrics]
    for (_, got), (_, want) in zip(losses, metrics):
        assert got == pytest.approx(want, rel=1e-6)
    assert acc.Scalars("eval/reward/task1")[-1].value == pytest.approx(recs[-1]["reward/task1"], rel=1e-6)
    # opd-scale eval --run: the saved student reloaded gives the final in-training evaluation again
    out = tmp_path / "ev"
    assert main(["eval", "--run", str(run), "--steps", "3", "--out", str(out), "--set", "eval_grid_images=2"]) == 0
    res = json.loads((out / "eval.json").read_text())
    for key in ("reward/task0", "reward/task1", "kl/task0", "kl/task1"):
        assert res[key] == pytest.approx(recs[-1][key], rel=1e-4, abs=1e-6), key
    assert (out / "grids" / "task0.png").is_file()


def test_a_missing_tracker_package_is_a_clear_error_before_the_run_directory(workspace, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match="report_to 'wandb' needs the 'wandb' package"):
        Trainer(tiny_config(workspace, tmp_path / "run", report_to="wandb"))
    assert not (tmp_path / "run").exists()
