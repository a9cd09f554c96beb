"""Engine rollouts of SD3 / SD3.5 through :class:`scale.policy.SD3Policy`: the identical-code-path proof
against StableDiffusion3Pipeline, stored SDE/CPS kernels and log-probs, float32 states under bf16."""

from __future__ import annotations

import math

import pytest
import torch

from opd_ref import gaussian_log_prob, sde_step
from opd_ref.engine import KernelSpec, rollout
from scale.lora import add_lora
from scale.pipeline import decode, model_inputs, predict_velocity, scheduler_sigmas
from scale.policy import SD3Policy

NUM_STEPS = 4


def _roll(transformer, embeds, sigmas, latents0, kind="ode", a=0.0, guidance_scale=4.5, adapter=None, generator=None):
    """An engine rollout of ``adapter`` through the scale policy (what the trainer runs)."""
    policy = SD3Policy(transformer, tuple(latents0.shape[1:]), latents0.device, transformer.dtype)
    cond = model_inputs(embeds, guidance_scale, transformer.dtype, latents0.device)
    with torch.no_grad(), policy.active(adapter):
        return rollout(lambda x, s: policy.velocity(x, s, cond), latents0, sigmas, KernelSpec(kind, a, "flowgrpo"),
                       generator)


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
    """The identical-code-path proof: every state of the engine's ODE rollout of the scale policy equals
    the state of StableDiffusion3Pipeline.__call__ (same latents, prompt embeddings, steps and guidance),
    bit for bit, and decode() equals the pipeline's own decoded image."""
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    final = _pipe_call(tiny_pipe, embeds, latents0, guidance_scale, output_type="latent", callback_on_step_end=keep)
    image = _pipe_call(tiny_pipe, embeds, latents0, guidance_scale, output_type="pt")
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj = _roll(tiny_pipe.transformer, embeds, sig, latents0, guidance_scale=guidance_scale)
    assert traj.states.shape == (NUM_STEPS + 1,) + tuple(latents0.shape)
    assert torch.equal(traj.states[0], latents0)
    for k in range(NUM_STEPS):
        assert torch.equal(traj.states[k + 1], seen[k]), k
    assert torch.equal(traj.final, final)
    assert not bool(traj.stochastic.any()) and torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))
    assert float((final - latents0).abs().max()) > 0.1  # the sampler moved: the check can fail
    assert torch.equal(decode(tiny_pipe, traj.final), image)


def test_ode_rollout_with_an_adapter_matches_the_pipeline_with_that_lora(tiny_pipe, embeds, latents0):
    add_lora(tiny_pipe.transformer, "student", rank=4, alpha=8, init_std=0.05, generator=torch.Generator().manual_seed(5))
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj_s = _roll(tiny_pipe.transformer, embeds, sig, latents0, adapter="student")
    traj_r = _roll(tiny_pipe.transformer, embeds, sig, latents0, adapter=None)
    # the policy switches lazily: the reference rollout left the adapters disabled; the pipeline gets the student
    tiny_pipe.transformer.enable_adapters()
    tiny_pipe.transformer.set_adapter("student")
    final = _pipe_call(tiny_pipe, embeds, latents0, 4.5, output_type="latent")
    assert torch.equal(traj_s.final, final)
    assert float((traj_s.final - traj_r.final).abs().max()) > 1e-3


def test_sde_rollout_stores_states_velocities_and_log_probs(tiny_pipe, embeds, latents0):
    a = 0.7
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    tr = tiny_pipe.transformer
    traj = _roll(tr, embeds, sig, latents0, "sde", a, generator=torch.Generator().manual_seed(11))
    b = latents0.shape[0]
    assert traj.log_probs.shape == (NUM_STEPS, b) and traj.stds.shape == (NUM_STEPS,)
    assert traj.states.dtype == traj.velocities.dtype == torch.float32
    assert bool(traj.stochastic.all())
    for k in range(NUM_STEPS):
        s, sn = float(sig[k]), float(sig[k + 1])
        # closed-form step std; at sigma = 1 Flow-GRPO puts sigma_next in the denominator
        denom = 1 - (sn if s >= 1 else s)
        std = a * math.sqrt(s / denom) * math.sqrt(s - sn)
        assert float(traj.stds[k]) == pytest.approx(std, rel=1e-12)
        # a fresh velocity from the checked public entry at the stored state: the same velocity, and
        # opd_ref.sde_step's kernel gives the stored state's log-prob (the engine expands its algebra)
        v = predict_velocity(tr, traj.states[k], sig[k].expand(b), embeds, 4.5, None)
        assert torch.equal(v, traj.velocities[k])
        step = sde_step(traj.states[k], v, sig[k].expand(b), sig[k + 1].expand(b), a, sigma_one="flowgrpo")
        torch.testing.assert_close(step.mean, traj.means[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(gaussian_log_prob(traj.states[k + 1], step), traj.log_probs[k], rtol=1e-5, atol=1e-3)
        # independent oracle: torch.distributions, float64
        normal = torch.distributions.Normal(traj.means[k].double(), float(traj.stds[k]))
        oracle = normal.log_prob(traj.states[k + 1].double()).flatten(1).sum(1)
        torch.testing.assert_close(traj.log_probs[k].double(), oracle, rtol=1e-5, atol=1e-3)
    assert float(traj.stds[0]) == pytest.approx(a, rel=1e-6)  # a sqrt(1/(1-s1)) sqrt(1-s1)
    # the stored noise is N(0, 1): n = T*B*C*H*W draws; z = 5 bounds give a two-sided false-failure
    # probability ~5.7e-7 each (mean sd 1/sqrt(n), variance sd sqrt(2/n))
    z = traj.noises.flatten().double()
    n = z.numel()
    assert abs(float(z.mean())) < 5.0 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5.0 * math.sqrt(2.0 / n)
    again = _roll(tr, embeds, sig, latents0, "sde", a, generator=torch.Generator().manual_seed(11))
    assert torch.equal(again.states, traj.states)  # the same generator seed reproduces the rollout


def test_cps_rollout_stds_and_the_deterministic_last_step(tiny_pipe, embeds, latents0):
    a = 0.5
    sig = scheduler_sigmas(tiny_pipe, NUM_STEPS)
    traj = _roll(tiny_pipe.transformer, embeds, sig, latents0, "cps", a, generator=torch.Generator().manual_seed(2))
    want = sig[1:].double() * math.sin(a * math.pi / 2)
    torch.testing.assert_close(traj.stds, want, rtol=1e-12, atol=0)
    assert traj.stochastic.tolist() == [True] * (NUM_STEPS - 1) + [False]
    assert float(traj.log_probs[-1].abs().max()) == 0 and bool(torch.isfinite(traj.log_probs).all())
    assert torch.equal(traj.states[-1], traj.means[-1])


def test_states_are_float32_under_bf16(tiny_pipe, embeds, latents0):
    tiny_pipe.transformer.to(torch.bfloat16)
    sig = scheduler_sigmas(tiny_pipe, 2)
    traj = _roll(tiny_pipe.transformer, embeds, sig, latents0, "sde", 0.7, generator=torch.Generator().manual_seed(0))
    for t in (traj.states, traj.velocities, traj.noises, traj.log_probs):
        assert t.dtype == torch.float32


def test_model_inputs_bad_input(embeds):
    no_negative = type(embeds)(embeds.prompt_embeds, embeds.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="negative"):
        model_inputs(no_negative, 4.5, torch.float32, "cpu")
    with pytest.raises(TypeError, match="PromptEmbeds"):
        model_inputs(embeds.prompt_embeds, 4.5, torch.float32, "cpu")
    assert model_inputs(no_negative, 1.0, torch.float32, "cpu").hidden.shape[0] == 2  # no CFG rows


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
    traj = _roll(tiny_pipe.transformer, embeds, sig, latents0)
    assert torch.equal(traj.final, final)
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler_sigmas(tiny_pipe, NUM_STEPS)
