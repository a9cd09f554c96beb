"""Rollouts with opd_ref kernels: the identical-code-path proof against StableDiffusion3Pipeline, stored
SDE/CPS kernels and log-probs, float32 kernels under bf16, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from opd_ref import GaussianStep, gaussian_log_prob, sde_step
from scale.model import add_lora, predict_velocity
from scale.rollout import decode, kernel_step, rollout, scheduler_sigmas

NUM_STEPS = 4


def _pipe_call(pipe, embeds, latents0, guidance_scale, **kwargs):
    """StableDiffusion3Pipeline.__call__ with the given prompt embeddings and initial latents."""
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeds.prompt_embeds,
            pooled_prompt_embeds=embeds.pooled_prompt_embeds,
            negative_prompt_embeds=embeds.negative_prompt_embeds,
            negative_pooled_prompt_embeds=embeds.negative_pooled_prompt_embeds,
            latents=latents0.clone(),
            num_inference_steps=NUM_STEPS,
            guidance_scale=guidance_scale,
            **kwargs,
        ).images


def test_scheduler_sigmas_are_the_pipeline_grid(tiny_pipe):
    before = tiny_pipe.scheduler.sigmas.clone()
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    assert torch.equal(tiny_pipe.scheduler.sigmas, before)  # the pipeline's scheduler is left alone
    oracle = tiny_pipe.scheduler.__class__.from_config(tiny_pipe.scheduler.config)
    oracle.set_timesteps(NUM_STEPS)
    assert torch.equal(sig, oracle.sigmas)
    assert sig.shape == (NUM_STEPS + 1,) and float(sig[0]) == 1.0 and float(sig[-1]) == 0.0
    # closed form of the static SD3.5 shift 3, shift(s) = 3 s / (1 + 2 s), applied to a uniform grid s
    # from 1 to the training schedule's smallest (already shifted) sigma, shift(1 / 1000)
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    s = torch.linspace(1.0, shift(1.0 / 1000), NUM_STEPS, dtype=torch.float64)
    torch.testing.assert_close(sig[:-1].double(), shift(s), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        scheduler_sigmas(tiny_pipe, 0)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_rollout_is_the_pipeline_sampler(tiny_pipe, embeds, latents0, guidance_scale):
    """The identical-code-path proof: every state of the opd_ref ODE rollout equals the state of
    StableDiffusion3Pipeline.__call__ (same latents, prompt embeddings, steps and guidance), bit for bit,
    and decode() equals the pipeline's own decoded image."""
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    final = _pipe_call(tiny_pipe, embeds, latents0, guidance_scale, output_type="latent", callback_on_step_end=keep)
    image = _pipe_call(tiny_pipe, embeds, latents0, guidance_scale, output_type="pt")
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj = rollout(
        tiny_pipe.transformer, embeds, sig, latents0, kernel="ode", noise_level=0.0, guidance_scale=guidance_scale
    )
    assert traj.latents.shape == (NUM_STEPS + 1,) + tuple(latents0.shape)
    assert torch.equal(traj.latents[0], latents0)
    for k in range(NUM_STEPS):
        assert torch.equal(traj.latents[k + 1], seen[k]), k
    assert torch.equal(traj.final, final)
    assert traj.log_probs is None and torch.equal(traj.stds, torch.zeros_like(traj.stds))
    assert float((final - latents0).abs().max()) > 0.1  # the sampler moved: the check can fail
    assert torch.equal(decode(tiny_pipe, traj.final), image)


def test_ode_rollout_with_an_adapter_matches_the_pipeline_with_that_lora(tiny_pipe, embeds, latents0):
    add_lora(tiny_pipe.transformer, "student", rank=4, alpha=8, init_std=0.05, generator=torch.Generator().manual_seed(5))
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj_s = rollout(tiny_pipe.transformer, embeds, sig, latents0, kernel="ode", guidance_scale=4.5, adapter="student")
    traj_r = rollout(tiny_pipe.transformer, embeds, sig, latents0, kernel="ode", guidance_scale=4.5, adapter=None)
    tiny_pipe.transformer.set_adapter("student")
    final = _pipe_call(tiny_pipe, embeds, latents0, 4.5, output_type="latent")
    assert torch.equal(traj_s.final, final)
    assert float((traj_s.final - traj_r.final).abs().max()) > 1e-3


def test_sde_rollout_stores_states_kernels_and_log_probs(tiny_pipe, embeds, latents0):
    a = 0.7
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    tr = tiny_pipe.transformer
    traj = rollout(
        tr, embeds, sig, latents0, kernel="sde", noise_level=a, guidance_scale=4.5,
        generator=torch.Generator().manual_seed(11),
    )
    b = latents0.shape[0]
    assert traj.log_probs.shape == (NUM_STEPS, b) and traj.stds.shape == (NUM_STEPS, b, 1, 1, 1)
    assert traj.latents.dtype == traj.means.dtype == torch.float32
    assert bool(traj.stochastic_steps().all())
    for k in range(NUM_STEPS):
        s, sn = float(sig[k]), float(sig[k + 1])
        # closed-form step std; at sigma = 1 Flow-GRPO puts sigma_next in the denominator
        denom = 1 - (sn if s >= 1 else s)
        std = a * math.sqrt(s / denom) * math.sqrt(s - sn)
        torch.testing.assert_close(traj.stds[k].flatten(), torch.full((b,), std), rtol=1e-5, atol=0)
        # recompute the kernel from the stored state with a fresh velocity: same mean, same log-prob
        v = predict_velocity(tr, traj.latents[k], sig[k].expand(b), embeds, 4.5, None)
        step = sde_step(traj.latents[k], v, sig[k].expand(b), sig[k + 1].expand(b), a, sigma_one="flowgrpo")
        torch.testing.assert_close(step.mean, traj.means[k], rtol=0, atol=1e-6)
        lp = gaussian_log_prob(traj.latents[k + 1], GaussianStep(traj.means[k], traj.stds[k]))
        assert torch.equal(lp, traj.log_probs[k])
        torch.testing.assert_close(gaussian_log_prob(traj.latents[k + 1], step), traj.log_probs[k], rtol=1e-5, atol=1e-3)
        # independent oracle: torch.distributions, float64
        normal = torch.distributions.Normal(traj.means[k].double(), traj.stds[k].double())
        oracle = normal.log_prob(traj.latents[k + 1].double()).flatten(1).sum(1)
        torch.testing.assert_close(traj.log_probs[k].double(), oracle, rtol=1e-5, atol=1e-3)
    assert float(traj.stds[0].flatten()[0]) == pytest.approx(a, rel=1e-6)  # a sqrt(1/(1-s1)) sqrt(1-s1)
    # the stored noise z = (x' - mean) / std is N(0, 1): n = T*B*C*H*W draws; z = 5 bounds give a
    # two-sided false-failure probability ~5.7e-7 each (mean sd 1/sqrt(n), variance sd sqrt(2/n))
    z = ((traj.latents[1:] - traj.means) / traj.stds).flatten().double()
    n = z.numel()
    assert abs(float(z.mean())) < 5.0 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5.0 * math.sqrt(2.0 / n)
    # the same generator seed reproduces the rollout exactly
    again = rollout(tr, embeds, sig, latents0, kernel="sde", noise_level=a, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(11))
    assert torch.equal(again.latents, traj.latents)


def test_cps_rollout_stds_and_the_deterministic_last_step(tiny_pipe, embeds, latents0):
    a = 0.5
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj = rollout(tiny_pipe.transformer, embeds, sig, latents0, kernel="cps", noise_level=a, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(2))
    want = sig[1:] * math.sin(a * math.pi / 2)
    torch.testing.assert_close(traj.stds[:, 0].flatten(), want, rtol=1e-6, atol=0)
    assert traj.stochastic_steps().tolist() == [True] * (NUM_STEPS - 1) + [False]
    assert bool(torch.isnan(traj.log_probs[-1]).all()) and bool(torch.isfinite(traj.log_probs[:-1]).all())
    assert torch.equal(traj.latents[-1], traj.means[-1])


def test_kernels_run_in_float32_under_bf16(tiny_pipe, embeds, latents0):
    tiny_pipe.transformer.to(torch.bfloat16)
    sig = scheduler_sigmas(tiny_pipe, 2)
    traj = rollout(tiny_pipe.transformer, embeds.to(dtype=torch.bfloat16), sig, latents0, kernel="sde",
                   noise_level=0.7, guidance_scale=4.5, generator=torch.Generator().manual_seed(0))
    for t in (traj.latents, traj.means, traj.stds, traj.log_probs):
        assert t.dtype == torch.float32
    step = kernel_step("sde", latents0.bfloat16(), latents0.bfloat16(), sig[0].expand(2), sig[1].expand(2), 0.7)
    assert step.mean.dtype == torch.float32


def test_rollout_bad_input(tiny_pipe, embeds, latents0):
    tr = tiny_pipe.transformer
    sig = scheduler_sigmas(tiny_pipe, 2)
    with pytest.raises(ValueError, match="kernel"):
        rollout(tr, embeds, sig, latents0, kernel="euler")
    with pytest.raises(ValueError, match="noise_level"):
        rollout(tr, embeds, sig, latents0, kernel="sde", noise_level=0.0)
    with pytest.raises(ValueError, match="noise_level"):
        rollout(tr, embeds, sig, latents0, kernel="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="decrease"):
        rollout(tr, embeds, sig.flip(0), latents0)
    with pytest.raises(ValueError, match="batch size"):
        rollout(tr, embeds.select(0), sig, latents0)
    with pytest.raises(ValueError, match="latents0"):
        rollout(tr, embeds, sig, latents0[0])


def test_dynamic_shifting_grid_matches_the_pipeline(tiny_pipe, embeds, latents0):
    """With a resolution-dependent shift (use_dynamic_shifting), scheduler_sigmas computes the same
    mu as the pipeline: the ODE rollout still equals the pipeline's output bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        tiny_pipe.scheduler.config, use_dynamic_shifting=True
    )
    p = tiny_pipe.transformer.config.patch_size
    seq_len = (latents0.shape[-2] // p) * (latents0.shape[-1] // p)
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS, image_seq_len=seq_len)
    static = tiny_pipe.scheduler.__class__.from_config(tiny_pipe.scheduler.config, use_dynamic_shifting=False)
    static.set_timesteps(NUM_STEPS)
    assert float((sig - static.sigmas).abs().max()) > 1e-3  # the shift really differs from the static one
    final = _pipe_call(tiny_pipe, embeds, latents0, 4.5, output_type="latent")
    traj = rollout(tiny_pipe.transformer, embeds, sig, latents0, kernel="ode", guidance_scale=4.5)
    assert torch.equal(traj.final, final)
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler_sigmas(tiny_pipe, NUM_STEPS)
