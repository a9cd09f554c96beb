"""Guidance per role (issue 12, point 1): each adapter's CFG scale, g = 1 as one conditional forward,
and Flow-GRPO's detached unconditional branch against gradients written out by hand."""

from __future__ import annotations

import pytest
import torch

from scale.lora import add_lora, lora_parameters, switch_adapter
from scale.pipeline import model_inputs
from scale.policy import SD3Policy


def _raw(transformer, x, sigma, hidden, pooled):
    """One plain transformer forward (the oracle: no CFG code involved)."""
    t = torch.full((x.shape[0],), sigma * 1000.0)
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled,
                       return_dict=False)[0]


@pytest.fixture()
def two_adapters(tiny_pipe):
    """The tiny transformer with a student and a teacher LoRA, both with random (non-zero) lora_B."""
    tr = tiny_pipe.transformer
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        for name in ("student", "teacher_0"):
            add_lora(tr, name, rank=4, alpha=8, init_std=0.3, generator=gen)
    return tr


def _policy(tr, latents0, **kw):
    return SD3Policy(tr, tuple(latents0.shape[1:]), "cpu", torch.float32, **kw)


def _count_calls(tr):
    rows = []
    handle = tr.register_forward_hook(lambda mod, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[0]),
                                      with_kwargs=True)
    return rows, handle


def test_scale_one_is_one_conditional_forward(two_adapters, embeds, latents0):
    tr = two_adapters
    pol = _policy(tr, latents0, guidance={"student": 1.0, "teacher_0": 4.5, None: 4.5})
    cond = model_inputs(embeds, 4.5, torch.float32, "cpu", with_uncond=True)  # uncond rows present
    assert cond.has_uncond and pol.needs_uncond
    rows, handle = _count_calls(tr)
    with torch.no_grad(), pol.active("student"):
        v = pol.velocity(latents0, 0.6, cond)
    handle.remove()
    assert rows == [2]  # one forward of the B = 2 conditional rows
    with torch.no_grad():
        switch_adapter(tr, "student")
        want = _raw(tr, latents0, 0.6, embeds.prompt_embeds, embeds.pooled_prompt_embeds)
    assert torch.equal(v, want)


def test_each_role_uses_its_own_scale(two_adapters, embeds, latents0):
    tr = two_adapters
    scales = {"student": 4.5, "teacher_0": 1.0, None: 2.0}
    pol = _policy(tr, latents0, guidance=scales)
    cond = model_inputs(embeds, 4.5, torch.float32, "cpu", with_uncond=pol.needs_uncond)
    for role, g in scales.items():
        rows, handle = _count_calls(tr)
        with torch.no_grad(), pol.active(role):
            v = pol.velocity(latents0, 0.4, cond)
            v_c = _raw(tr, latents0, 0.4, embeds.prompt_embeds, embeds.pooled_prompt_embeds)
            v_u = _raw(tr, latents0, 0.4, embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)
        handle.remove()
        assert rows[0] == (2 if g == 1.0 else 4), role
        torch.testing.assert_close(v, v_u + g * (v_c - v_u), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no guidance scale"):
        with pol.active("teacher_9"):
            pass
    with pytest.raises(ValueError, match="finite number >= 0"):
        _policy(tr, latents0, guidance={"student": float("nan"), None: 1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        _policy(tr, latents0, guidance={"student": -0.5, None: 1.0})


def _grad(tr, fn):
    params = lora_parameters(tr, "student")
    for p in params:
        p.grad = None
    fn().backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("g", [4.5, 0.5])
def test_detached_uncond_gradient_is_g_times_the_conditional_gradient(two_adapters, embeds, latents0, g):
    """detach_uncond: grad = g * grad v_c (the conditional path alone); default: the exact
    (1 - g) grad v_u + g grad v_c.  Both written out from plain forwards of each branch."""
    tr = two_adapters
    w = torch.randn(latents0.shape, generator=torch.Generator().manual_seed(8))  # a fixed linear functional
    cond = model_inputs(embeds, g, torch.float32, "cpu")
    switch_adapter(tr, "student")

    def v_c():
        return _raw(tr, latents0, 0.6, embeds.prompt_embeds, embeds.pooled_prompt_embeds)

    def v_u():
        return _raw(tr, latents0, 0.6, embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)

    grad_c = _grad(tr, lambda: (w * v_c()).sum())
    grad_u = _grad(tr, lambda: (w * v_u()).sum())
    grads = {}
    for detach in (True, False):
        pol = _policy(tr, latents0, guidance={"student": g, None: g}, detach_uncond=detach)
        with pol.active("student"):
            grads[detach] = _grad(tr, lambda: (w * pol.velocity(latents0, 0.6, cond)).sum())
    # float32: one batched forward of 2B rows vs separate forwards differ by ~1e-6 per element, which
    # the factors g and 1 - g (up to 4.5) amplify; the gradients themselves are O(1)
    scale = float(grad_c.abs().max())
    torch.testing.assert_close(grads[True], g * grad_c, rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(grads[False], (1 - g) * grad_u + g * grad_c, rtol=0, atol=2e-5 * scale)
    # the two differ by (1 - g) grad v_u, which is not small here
    assert float((grads[True] - grads[False]).norm()) > 0.1 * float(grads[False].norm())
    with torch.no_grad():  # the value is the same either way
        pol_d = _policy(tr, latents0, guidance={"student": g, None: g}, detach_uncond=True)
        pol_e = _policy(tr, latents0, guidance={"student": g, None: g})
        with pol_d.active("student"):
            a = pol_d.velocity(latents0, 0.6, cond)
        with pol_e.active("student"):
            b = pol_e.velocity(latents0, 0.6, cond)
    assert torch.equal(a, b)


def test_guidance_config_fields(tmp_path):
    from scale.config import ScaleConfig

    cfg = ScaleConfig(tasks=["a", "b"]).validate()
    assert cfg.teacher_guidance() == [4.5, 4.5] and cfg.reference_guidance_scale == 4.5 and not cfg.detach_uncond
    assert ScaleConfig(tasks=["a", "b"], teacher_guidance_scales=[1.0]).validate().teacher_guidance() == [1.0, 1.0]
    assert ScaleConfig(tasks=["a", "b"], teacher_guidance_scales=[1.0, 4.5]).validate().teacher_guidance() == [1.0, 4.5]
    for bad, match in ((dict(teacher_guidance_scales=[1.0, 2.0, 3.0]), "one value per task"),
                       (dict(teacher_guidance_scales=[-1.0]), "finite numbers >= 0"),
                       (dict(teacher_guidance_scales=[float("inf")]), "finite numbers >= 0"),
                       (dict(reference_guidance_scale=-2.0), "reference_guidance_scale must be >= 0"),
                       (dict(reference_guidance_scale=float("nan")), "reference_guidance_scale must be a finite")):
        with pytest.raises(ValueError, match=match):
            ScaleConfig(tasks=["a", "b"], **bad).validate()


def test_setup_gives_each_role_its_scale(workspace, tmp_path):
    """A run's policy: the student at guidance_scale, each teacher at its own, the reference at its own;
    an update runs and trains with them."""
    from scale.train import Trainer
    from tests.scale.train_helpers import tiny_config

    cfg = tiny_config(workspace, tmp_path / "run", guidance_scale=1.0, teacher_guidance_scales=[1.0, 3.0],
                      reference_guidance_scale=2.0, detach_uncond=True, distill_steps=1)
    trainer = Trainer(cfg)
    pol = trainer.setup.policy
    assert pol.guidance == {"student": 1.0, "teacher_0": 1.0, "teacher_1": 3.0, None: 2.0} and pol.detach_uncond
    assert trainer.setup.cache.guidance  # teacher_1 and the reference guide: the negatives are encoded
    assert trainer.run().status == "finished"


from tests.scale.train_helpers import workspace  # noqa: E402,F401  (fixture)
