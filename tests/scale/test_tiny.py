"""The tiny SD3.5-style pipeline: architecture, offline save -> from_pretrained round trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scale.tiny import TINY_SIZES, build_tiny_pipeline, make_tiny_pipeline


def _all_modules(pipe):
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        yield name, getattr(pipe, name)


def test_hub_is_offline_in_scale_tests():
    import huggingface_hub.constants as hc

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert hc.HF_HUB_OFFLINE is True


def test_saved_and_reloaded_pipeline_gives_identical_outputs(tiny_model_dir):
    """The full pipeline call (tokenizers, 3 text encoders, transformer, scheduler, VAE) of the
    in-memory pipeline and of the one reloaded with from_pretrained are bit-identical."""
    from diffusers import StableDiffusion3Pipeline

    built = make_tiny_pipeline(seed=0)
    loaded = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    images = []
    for pipe in (built, loaded):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            ["a red cat", "a blue dog"],
            num_inference_steps=3,
            guidance_scale=4.5,
            max_sequence_length=8,
            output_type="pt",
            generator=torch.Generator().manual_seed(7),
        )
        images.append(out.images)
    assert images[0].shape == (2, 3, TINY_SIZES["latent_size"], TINY_SIZES["latent_size"])
    assert torch.equal(images[0], images[1])
    # not a degenerate constant image: the comparison above can fail
    assert float(images[0].std()) > 1e-3
    assert not torch.equal(images[0][0], images[0][1])


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir, tmp_path):
    other = build_tiny_pipeline(tmp_path / "seed1", seed=1)
    w0 = load_file(str(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    w1 = load_file(str(other / "transformer" / "diffusion_pytorch_model.safetensors"))
    again = make_tiny_pipeline(seed=0).transformer.state_dict()
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], again[k]) for k in w0)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_architecture_is_sd35_style(tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    cfg = pipe.transformer.config
    assert cfg.qk_norm == "rms_norm"
    assert tuple(cfg.dual_attention_layers) == (0,)
    assert pipe.transformer.transformer_blocks[0].attn2 is not None  # the MMDiT-X extra attention
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.text_encoder_3.config.d_model == cfg.joint_attention_dim >= hidden
    proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert cfg.pooled_projection_dim == proj
    assert pipe.scheduler.config.shift == 3.0
    assert not pipe.scheduler.config.use_dynamic_shifting
    # every component was saved and comes back in eval mode (the text encoders have dropout)
    for name, module in _all_modules(pipe):
        assert not any(m.training for m in module.modules()), name


def test_in_memory_vocabularies_tokenize_offline(tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=pipe.tokenizer_max_length).input_ids
    assert len(ids) == TINY_SIZES["clip_max_length"]
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a red cat"
    t5 = pipe.tokenizer_3("A red cat!").input_ids
    assert t5[-1] == pipe.tokenizer_3.eos_token_id
    assert pipe.tokenizer_3.unk_token_id not in t5
    assert pipe.tokenizer_3.decode(t5, skip_special_tokens=True) == "A red cat!"
    assert max(t5) < pipe.text_encoder_3.config.vocab_size


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="empty or absent"):
        build_tiny_pipeline(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(TypeError, match="seed"):
        make_tiny_pipeline(seed=1.5)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    def broken(self, save_directory, **kwargs):
        (Path(save_directory) / "model_index.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusion3Pipeline, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_pipeline(tmp_path / "pipe")
    assert list(tmp_path.iterdir()) == []
