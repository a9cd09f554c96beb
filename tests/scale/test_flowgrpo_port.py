"""Porting Flow-GRPO settings: ``kl_form = ratio_form = flowgrpo`` reproduce Flow-GRPO's per-step loss
(written anew from its public code), the exchange rates of ``beta`` and ``clip_range`` computed by
``scale.porting`` (and the numbers docs/scale.md states), the presets, and the advantage clip wiring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opd_ref.engine import AdvantageSpec, KernelSpec, ObjectiveSpec, StepInputs

DT = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _flowgrpo_step(sample, model_output, sigma, sigma_prev, noise_level):
    """Flow-GRPO's SDE step (sd3_sde_with_logprob.py, sde_type 'sde'), written anew: mean and std_dev_t."""
    std_dev_t = math.sqrt(sigma / (1 - sigma)) * noise_level
    dt = sigma_prev - sigma
    mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t, dt


def _flowgrpo_log_prob(prev_sample, mean, std_dev_t, dt):
    """Flow-GRPO's log-prob: the Gaussian log-density per dim, averaged over the dims."""
    std = std_dev_t * math.sqrt(-dt)
    lp = -((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def test_flowgrpo_forms_reproduce_flowgrpo_per_step_loss():
    a, sigma, sigma_prev, beta, clip = 0.7, 0.8, 0.7, 0.04, 2e-3
    G, D = 30, 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(G, D, generator=g, dtype=DT)
    v_old = torch.randn(G, D, generator=g, dtype=DT)
    v = (v_old + 0.2 * torch.randn(G, D, generator=g, dtype=DT)).requires_grad_(True)
    v_ref = v_old + 0.4 * torch.randn(G, D, generator=g, dtype=DT)
    noise = torch.randn(G, D, generator=g, dtype=DT)
    rewards = torch.randn(G, generator=g, dtype=DT)
    rewards[0] = 40.0  # an outlier whose normalised advantage sqrt(G - 1) = 5.39 exceeds 5

    # Flow-GRPO, as in its train_sd3.py: advantages (r - mean) / (std + 1e-4) (numpy std), clamped to +-5
    adv_fg = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-4)).clamp(-5.0, 5.0)
    mean_old, std_dev_t, dt = _flowgrpo_step(x, v_old, sigma, sigma_prev, a)
    prev_sample = mean_old + std_dev_t * math.sqrt(-dt) * noise
    mean, _, _ = _flowgrpo_step(x, v, sigma, sigma_prev, a)
    mean_ref, _, _ = _flowgrpo_step(x, v_ref, sigma, sigma_prev, a)
    ratio = torch.exp(_flowgrpo_log_prob(prev_sample, mean, std_dev_t, dt)
                      - _flowgrpo_log_prob(prev_sample, mean_old, std_dev_t, dt))
    policy = torch.maximum(-adv_fg * ratio, -adv_fg * torch.clamp(ratio, 1.0 - clip, 1.0 + clip))
    kl = ((mean - mean_ref) ** 2).mean(dim=1) / (2 * std_dev_t**2)
    expected = policy + beta * kl

    adv = AdvantageSpec(ddof=0, eps=1e-4, clip=5.0)(rewards)
    assert float(adv.max()) == 5.0 and float(adv_fg.max()) == 5.0  # the clip is active
    c = KernelSpec("sde", a, "flowgrpo").coefficients(sigma, sigma_prev)
    spec = ObjectiveSpec("grpo", clip_range=clip, kl_beta=beta, kl_form="flowgrpo", ratio_form="flowgrpo")
    out = spec(StepInputs(c, v, v_old, noise, v_ref, adv))
    frac = float(out.stats["clipped"].mean())
    assert 0.1 < frac < 0.9, frac  # both branches of the clip are exercised
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    (g_suite,) = torch.autograd.grad(out.loss.sum(), v, retain_graph=True)
    (g_fg,) = torch.autograd.grad(expected.sum(), v)
    torch.testing.assert_close(g_suite, g_fg, rtol=1e-9, atol=1e-12)
    # the exact ratio is the D-th power of Flow-GRPO's
    exact = ObjectiveSpec("grpo", clip_range=clip)(StepInputs(c, v, v_old, noise, v_ref, adv))
    torch.testing.assert_close(exact.stats["ratio"], ratio.detach() ** D, rtol=1e-9, atol=1e-12)


def test_exchange_rates_on_the_sd35_grid_and_the_documented_numbers():
    from scale.porting import flowgrpo_equivalents, sd35_sigmas

    sigmas = sd35_sigmas(10)
    # SD3.5's static shift 3 on diffusers' uniform grid from 1 to the shifted sigma_min, written anew
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    t = torch.linspace(1.0, shift(1.0 / 1000), 10, dtype=DT)
    torch.testing.assert_close(sigmas[:-1].double(), shift(t), rtol=0, atol=1e-6)
    D = 16 * 64 * 64
    eq = flowgrpo_equivalents(sigmas, 0.7, D)
    kernel = KernelSpec("sde", 0.7, "flowgrpo")
    levels = [float(s) for s in sigmas]
    g = torch.Generator().manual_seed(0)
    for n, (s, sn) in enumerate(zip(levels, levels[1:])):
        assert eq["kappa"][n] == pytest.approx(D / (s - sn), rel=1e-9)
        c = kernel.coefficients(s, sn)
        v_old, v_ref, noise = (torch.randn(2, D, generator=g, dtype=DT) for _ in range(3))
        v = v_old + 0.1 * torch.randn(2, D, generator=g, dtype=DT)
        inp = StepInputs(c, v, v_old, noise, v_ref, torch.ones(2, dtype=DT))
        kl = lambda form: ObjectiveSpec("grpo", kl_beta=1.0, kl_form=form)(inp).stats["kl_ref"]  # noqa: E731
        torch.testing.assert_close(kl("exact"), eq["kappa"][n] * kl("flowgrpo"), rtol=1e-9, atol=0)
    assert eq["summed_log_ratio_bound"] == pytest.approx(D * math.log1p(1e-4), rel=1e-12)
    # docs/scale.md states these numbers (rounded as written there)
    text = (ROOT / "docs" / "scale.md").read_text()
    for value in (eq["kappa_min"], eq["kappa_max"], min(eq["beta_exact"]), max(eq["beta_exact"])):
        assert f"{value:.2g}".replace("e+0", "e").replace("e-0", "e-") in text, f"{value:.2g}"
    assert f"{eq['summed_log_ratio_bound']:.3g}" in text


def test_presets_validate():
    from scale.presets import preset_config, preset_names

    assert {"tiny", "sd35m-512-diffusionopd", "flowgrpo-sd35"} <= set(preset_names())
    for name in preset_names():
        cfg = preset_config(name).validate()
        assert cfg.to_dict() == preset_config(name).to_dict()
    sd = preset_config("sd35m-512-diffusionopd")
    assert (sd.resolution, sd.lora_rank, sd.lora_alpha, sd.eval_steps, sd.loss) == (512, 32, 64, 40, "opd_kl")
    fg = preset_config("flowgrpo-sd35")
    assert (fg.kl_form, fg.ratio_form, fg.adv_clip, fg.clip_range, fg.kl_beta) == ("flowgrpo", "flowgrpo", 5.0, 1e-4, 0.04)
    with pytest.raises(ValueError, match="no such preset"):
        preset_config("nope")


def test_tiny_preset_end_to_end_with_stage1_clip_statistics(tiny_model_dir, tmp_path):
    """train --preset tiny: stage 1 (advantage clip, ratio and clip-fraction statistics) + stage 2 with
    EMA, evaluation every 2 updates and TensorBoard events."""
    import json

    from scale.cli import main

    for k in range(2):
        (tmp_path / f"p{k}.txt").write_text("\n".join(f"task {k} picture {i}" for i in range(3)) + "\n")
    (tmp_path / "held.txt").write_text("a held out prompt\n")
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--tasks", "a,b", "--prompt-files", f"{tmp_path / 'p0.txt'},{tmp_path / 'p1.txt'}",
                 "--rewards", "brightness,color", "--heldout-prompt-files", str(tmp_path / "held.txt"),
                 "--stage1-steps", "1", "--distill-steps", "2", "--report-to", "tensorboard", "--ppo-epochs", "2"])
    assert code == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in recs if r.get("event") == "update" and r["phase_name"].startswith("grpo/")]
    assert len(grpo) == 2 and all({"ratio_mean", "clip_frac", "ratio_max_dev"} <= set(r) for r in grpo)
    assert all(r["ratio_max_dev"] > 0 for r in grpo)  # the second epoch moved the ratio away from 1
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2] and {"reward/a", "reward/b", "kl/a", "kl/b"} <= set(evals[-1])
    assert (out / "student_ema").is_dir() and list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_adv_clip_reaches_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    import scale.train as train_mod
    from scale.config import ScaleConfig

    (tmp_path / "p.txt").write_text("one\ntwo\n")
    seen = {}

    def spy(*args, advantages, **kwargs):
        seen["adv"] = advantages
        return {"loss": 0.0}

    monkeypatch.setattr(train_mod, "grpo_update", spy)
    cfg = ScaleConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "r"), resolution=8, num_steps=2,
                      lora_rank=2, lora_alpha=2, max_sequence_length=8, tasks=["t"], prompt_files=[str(tmp_path / "p.txt")],
                      rewards=["brightness"], stage1_steps=1, group_size=2, batch_size=1, adv_clip=2.5)
    trainer = train_mod.Trainer(cfg)
    trainer.close()
    trainer.optimizer = trainer.make_optimizer("teacher_0")
    trainer.grpo_update(0, 0, 0)
    assert seen["adv"].clip == 2.5 and seen["adv"].eps == cfg.adv_eps
