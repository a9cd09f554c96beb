"""Model handling: loading, prompt cache, CFG velocities, LoRA adapters (add / save / load / round trip)."""

from __future__ import annotations

import json

import pytest
import torch

from scale.lora import FLOW_GRPO_TARGETS, add_lora, load_lora, lora_parameters, save_lora
from scale.pipeline import load_pipeline, predict_velocity
from scale.text import PromptCache, PromptEmbeds


def _sigma(b: int, value: float = 0.6) -> torch.Tensor:
    return torch.full((b,), value)


def _raw_forward(transformer, x, sigma, hidden, pooled):
    return transformer(
        hidden_states=x,
        timestep=sigma * 1000,
        encoder_hidden_states=hidden,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


# ----------------------------------------------------------------------------------------------
# loading


def test_load_pipeline_freezes_and_evals(tiny_pipe):
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(tiny_pipe, name)
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not any(m.training for m in module.modules()), name


def test_load_pipeline_bad_input(tmp_path, tiny_model_dir):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_pipeline(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        load_pipeline(other)
    (other / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid pipeline index"):
        load_pipeline(other)
    with pytest.raises(TypeError, match="model"):
        load_pipeline(3)
    # a hub id that is not in the local cache, under HF_HUB_OFFLINE=1
    with pytest.raises(FileNotFoundError, match="opd-ref-test/no-such-model"):
        load_pipeline("opd-ref-test/no-such-model")
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(tiny_model_dir, dtype=torch.int8)


# ----------------------------------------------------------------------------------------------
# prompt embeddings


def test_prompt_cache_encodes_each_prompt_once_and_matches_the_pipeline(tiny_pipe):
    calls = []
    original = tiny_pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    tiny_pipe.encode_prompt = counting
    cache = PromptCache(tiny_pipe, max_sequence_length=8, guidance=True)
    first = cache.encode(["a red cat", "a blue dog", "a red cat"])
    second = cache.encode(["a blue dog", "a red cat"])
    assert calls == [["a red cat", "a blue dog"], [""]]
    assert len(cache) == 2
    tiny_pipe.encode_prompt = original
    pe, ne, pp, npp = tiny_pipe.encode_prompt(
        prompt=["a blue dog", "a red cat"],
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=True,
        max_sequence_length=8,
    )
    torch.testing.assert_close(second.prompt_embeds, pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(second.pooled_prompt_embeds, pp, rtol=0, atol=1e-6)
    torch.testing.assert_close(second.negative_prompt_embeds, ne, rtol=0, atol=1e-6)
    torch.testing.assert_close(second.negative_pooled_prompt_embeds, npp, rtol=0, atol=1e-6)
    assert torch.equal(first.prompt_embeds[0], first.prompt_embeds[2])
    assert not torch.equal(first.prompt_embeds[0], first.prompt_embeds[1])
    # CLIP tokens (16) + T5 tokens (8), width = T5 d_model
    assert pe.shape == (2, 16 + 8, tiny_pipe.transformer.config.joint_attention_dim)
    # many new prompts are encoded in batches of batch_size, with the same embeddings
    calls.clear()
    tiny_pipe.encode_prompt = counting
    chunked = PromptCache(tiny_pipe, max_sequence_length=8, guidance=False, batch_size=2)
    five = [f"prompt {i}" for i in range(4)] + ["a blue dog"]
    out = chunked.encode(five)
    tiny_pipe.encode_prompt = original
    assert [len(c) for c in calls] == [2, 2, 1] and out.negative_prompt_embeds is None
    torch.testing.assert_close(out.prompt_embeds[-1], pe[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        PromptCache(tiny_pipe, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        cache.encode([])
    with pytest.raises(TypeError, match="list of strings"):
        cache.encode("a red cat")


def test_prompt_embeds_select_to_cat(embeds):
    one = embeds.select(1)
    assert one.batch_size == 1 and torch.equal(one.prompt_embeds[0], embeds.prompt_embeds[1])
    both = PromptEmbeds.cat([embeds.select(0), one])
    assert torch.equal(both.pooled_prompt_embeds, embeds.pooled_prompt_embeds)
    half = embeds.to(dtype=torch.bfloat16)
    assert half.negative_prompt_embeds.dtype == torch.bfloat16
    assert embeds.repeat_interleave(3).batch_size == 6
    with pytest.raises(ValueError, match="batch size"):
        PromptEmbeds(embeds.prompt_embeds, embeds.pooled_prompt_embeds[:1])


# ----------------------------------------------------------------------------------------------
# velocities and CFG


def test_cfg_velocity_equals_the_guidance_formula(tiny_pipe, embeds, latents0):
    tr = tiny_pipe.transformer
    s = _sigma(2)
    g = 4.5
    with torch.no_grad():
        v = predict_velocity(tr, latents0, s, embeds, g, None)
        cond = _raw_forward(tr, latents0, s, embeds.prompt_embeds, embeds.pooled_prompt_embeds)
        uncond = _raw_forward(tr, latents0, s, embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)
        v1 = predict_velocity(tr, latents0, s, embeds, 1.0, None)
    torch.testing.assert_close(v, uncond + g * (cond - uncond), rtol=0, atol=1e-5)
    assert torch.equal(v1, cond)  # g <= 1: one conditional forward
    assert v.dtype == torch.float32 and float((cond - uncond).abs().max()) > 1e-3
    no_neg = PromptEmbeds(embeds.prompt_embeds, embeds.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="negative"):
        predict_velocity(tr, latents0, s, no_neg, g, None)
    with pytest.raises(ValueError, match="sigma"):
        predict_velocity(tr, latents0, torch.full((3,), 0.5), embeds, g, None)
    with pytest.raises(ValueError, match="latents"):
        predict_velocity(tr, latents0[0], s, embeds, g, None)


def test_bf16_model_returns_float32_velocity_and_trains_float32_lora(tiny_pipe, embeds, latents0):
    tr = tiny_pipe.transformer
    s = _sigma(2)
    with torch.no_grad():
        v32 = predict_velocity(tr, latents0, s, embeds, 4.5, None)
        tr.to(torch.bfloat16)
        v16 = predict_velocity(tr, latents0, s, embeds, 4.5, None)
    assert v16.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: relative error ~ 2^-8 per op; a loose bound that still fails on garbage
    assert float((v16 - v32).norm() / v32.norm()) < 0.1
    # LoRA master weights stay float32 on the bf16 base, and get float32 gradients
    add_lora(tr, "student", rank=4, alpha=8, init_std=0.05)
    add_lora(tr, "base_dtype", rank=4, alpha=8, dtype=None)
    assert {p.dtype for p in lora_parameters(tr, "student")} == {torch.float32}
    assert {p.dtype for p in lora_parameters(tr, "base_dtype")} == {torch.bfloat16}
    v = predict_velocity(tr, latents0, s, embeds, 4.5, "student")
    v.square().mean().backward()
    grads = [p.grad for p in lora_parameters(tr, "student")]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert float((v.detach() - v16).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------------
# LoRA adapters


def test_adapters_reference_and_grad_flags(tiny_pipe, embeds, latents0):
    tr = tiny_pipe.transformer
    s = _sigma(2, 0.8)
    with torch.no_grad():
        v_base = predict_velocity(tr, latents0, s, embeds, 4.5, None)
    add_lora(tr, "zero", rank=4, alpha=8)  # peft zero-inits lora_B: equals the base
    add_lora(tr, "student", rank=4, alpha=8, init_std=0.05, generator=torch.Generator().manual_seed(0))
    add_lora(tr, "teacher", rank=4, alpha=8, init_std=0.05, generator=torch.Generator().manual_seed(1))
    assert all(p.requires_grad for name in ("zero", "student", "teacher") for p in lora_parameters(tr, name))
    for name in ("teacher", "zero"):  # teachers are frozen by the trainer; check flags are left alone
        for p in lora_parameters(tr, name):
            p.requires_grad_(False)
    # 2 blocks; the last one is context_pre_only (no to_add_out): 8 + 7 adapted Linear layers, A and B
    assert len(lora_parameters(tr, "student")) == 2 * 15
    flags = {n: p.requires_grad for n, p in tr.named_parameters()}
    active = tr.active_adapters()
    with torch.no_grad():
        v_ref = predict_velocity(tr, latents0, s, embeds, 4.5, None)
        v_zero = predict_velocity(tr, latents0, s, embeds, 4.5, "zero")
        v_t = predict_velocity(tr, latents0, s, embeds, 4.5, "teacher")
    assert torch.equal(v_ref, v_base)  # adapter None = base with adapters disabled
    assert torch.equal(v_zero, v_base)
    v_s = predict_velocity(tr, latents0, s, embeds, 4.5, "student")
    assert float((v_s - v_base).detach().abs().max()) > 1e-4
    assert float((v_s - v_t).detach().abs().max()) > 1e-4
    v_s.square().mean().backward()
    grads = {n: p.grad for n, p in tr.named_parameters() if ".lora_" in n and ".student." in n}
    assert all(g is not None for g in grads.values())
    # every adapted layer gets gradient except the last (context_pre_only) block's context query,
    # whose attention outputs are discarded by the model
    dead = {n for n, g in grads.items() if float(g.abs().sum()) == 0}
    assert dead == {f"transformer_blocks.1.attn.add_q_proj.lora_{m}.student.weight" for m in "AB"}
    assert all(p.grad is None for p in lora_parameters(tr, "teacher"))
    assert all(p.grad is None for n, p in tr.named_parameters() if ".lora_" not in n)
    assert {n: p.requires_grad for n, p in tr.named_parameters()} == flags
    assert tr.active_adapters() == active  # predict_velocity leaves the active adapter as it was
    with pytest.raises(ValueError, match="already exists"):
        add_lora(tr, "student")
    with pytest.raises(ValueError, match="not on the transformer"):
        lora_parameters(tr, "nobody")
    with pytest.raises(ValueError, match="not on the transformer"):
        predict_velocity(tr, latents0, s, embeds, 4.5, "nobody")
    with pytest.raises(ValueError, match="match no module"):
        add_lora(tr, "bad", target_modules=["attn.to_nothing"])


def test_saved_lora_loads_into_the_pipeline_and_reproduces_the_velocity(tiny_pipe, tiny_model_dir, embeds, latents0, tmp_path):
    """save_lora -> StableDiffusion3Pipeline.load_lora_weights (and -> load_lora) reproduce the
    adapter's velocity; alpha != rank, so a lost alpha (scale 1 instead of 2) would show."""
    from diffusers import StableDiffusion3Pipeline

    tr = tiny_pipe.transformer
    add_lora(tr, "student", rank=4, alpha=8, init_std=0.05, generator=torch.Generator().manual_seed(3))
    s = _sigma(2, 0.4)
    with torch.no_grad():
        v_s = predict_velocity(tr, latents0, s, embeds, 4.5, "student")
        v_base = predict_velocity(tr, latents0, s, embeds, 4.5, None)
    path = save_lora(tr, "student", tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    fresh.load_lora_weights(str(path.parent), adapter_name="loaded")
    with torch.no_grad():
        v_pipe = predict_velocity(fresh.transformer, latents0, s, embeds, 4.5, "loaded")
    torch.testing.assert_close(v_pipe, v_s, rtol=0, atol=1e-6)
    assert float((v_s - v_base).abs().max()) > 1e-3

    load_lora(tr, path, "copy")
    assert not any(p.requires_grad for p in lora_parameters(tr, "copy"))
    assert all(p.requires_grad for p in lora_parameters(tr, "student"))
    with torch.no_grad():
        v_copy = predict_velocity(tr, latents0, s, embeds, 4.5, "copy")
    torch.testing.assert_close(v_copy, v_s, rtol=0, atol=1e-6)
    # files written by diffusers' save_lora_adapter (no "transformer." prefix) load too
    tr.save_lora_adapter(str(tmp_path / "raw"), adapter_name="student", weight_name="raw.safetensors")
    load_lora(tr, tmp_path / "raw" / "raw.safetensors", "raw")
    with torch.no_grad():
        v_raw = predict_velocity(tr, latents0, s, embeds, 4.5, "raw")
    torch.testing.assert_close(v_raw, v_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["wider", "deeper"])
def test_teacher_lora_for_another_architecture_is_rejected(tiny_pipe, tmp_path, kind):
    from diffusers import SD3Transformer2DModel

    base = dict(tiny_pipe.transformer.config)
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    if kind == "wider":  # same module names, other widths
        base["attention_head_dim"] = 8
        base["caption_projection_dim"] = base["num_attention_heads"] * 8
        match = "has shape"
    else:  # same widths, a block the tiny transformer does not have
        base["num_layers"] = 3
        match = "not a Linear layer"
    other = SD3Transformer2DModel(**base).eval()
    add_lora(other, "teacher", rank=4, alpha=8, init_std=0.05)
    path = save_lora(other, "teacher", tmp_path / "teacher")
    tr = tiny_pipe.transformer
    with pytest.raises(ValueError, match=match):
        load_lora(tr, path, "teacher")
    assert "teacher" not in getattr(tr, "peft_config", {})  # nothing partially loaded
    assert not any(".lora_" in n for n, _ in tr.named_parameters())


def test_load_lora_bad_files(tiny_pipe, tmp_path):
    tr = tiny_pipe.transformer
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tr, tmp_path / "missing.safetensors", "t")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="exactly one"):
        load_lora(tr, tmp_path / "empty_dir", "t")
    from safetensors.torch import save_file

    save_file({"transformer.pos_embed.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA file"):
        load_lora(tr, tmp_path / "not_lora.safetensors", "t")
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}
    save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="only transformer LoRAs"):
        load_lora(tr, tmp_path / "te.safetensors", "t")
    assert not getattr(tr, "peft_config", {})


def test_peft_save_pretrained_lora_loads_with_its_alpha(tiny_pipe, tiny_model_dir, embeds, latents0, tmp_path):
    """A PEFT-format LoRA (get_peft_model + save_pretrained, as Flow-GRPO checkpoints are written):
    keys prefixed base_model.model., alpha in adapter_config.json (alpha / r = 4 here)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    other = SD3Transformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()
    peft_model = get_peft_model(
        other, LoraConfig(r=2, lora_alpha=8, init_lora_weights="gaussian", target_modules=FLOW_GRPO_TARGETS)
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    s = _sigma(2, 0.5)
    with torch.no_grad():
        inner = peft_model.base_model.model  # the LoRA layers are active in the PEFT-wrapped model
        cond = _raw_forward(inner, latents0, s, embeds.prompt_embeds, embeds.pooled_prompt_embeds)
        uncond = _raw_forward(inner, latents0, s, embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)
        want = uncond + 4.5 * (cond - uncond)
        load_lora(tiny_pipe.transformer, tmp_path / "peft", "teacher")
        got = predict_velocity(tiny_pipe.transformer, latents0, s, embeds, 4.5, "teacher")
        base = predict_velocity(tiny_pipe.transformer, latents0, s, embeds, 4.5, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float((got - base).abs().max()) > 1e-3


def test_flow_grpo_targets_are_the_attention_projections(tiny_pipe):
    add_lora(tiny_pipe.transformer, "s", rank=2, alpha=4)
    adapted = {n.split(".lora_A.")[0].split(".", 2)[2] for n, _ in tiny_pipe.transformer.named_parameters() if ".lora_A.s." in n}
    assert adapted == set(FLOW_GRPO_TARGETS)
