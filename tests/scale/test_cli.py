"""``opd-scale``: build-tiny, train (config file + --set / --key overrides, errors, --resume), sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scale.cli import EXIT_INTERRUPTED, main
from tests.scale.train_helpers import read_metrics, tiny_config, workspace  # noqa: F401


def test_build_tiny_writes_a_loadable_pipeline(tmp_path):
    from scale.pipeline import load_pipeline

    assert main(["build-tiny", str(tmp_path / "tiny"), "--seed", "1"]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    pipe = load_pipeline(tmp_path / "tiny")
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert main(["build-tiny", str(tmp_path / "tiny")]) == 2  # not empty: refused


def test_train_from_file_with_overrides_then_sample(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, distill_steps=5)
    path = tmp_path / "cfg.json"
    cfg_dict = cfg.to_dict()
    del cfg_dict["output_dir"]
    path.write_text(json.dumps(cfg_dict))
    rc = main(["train", "--config", str(path), "--set", "distill_steps=1", "--output-dir", str(run),
               "--learning-rate", "0.003", "--set", "num_steps=2"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["distill_steps"], saved["learning_rate"], saved["num_steps"]) == (1, 0.003, 2)
    assert [r["step"] for r in read_metrics(run) if r["event"] == "update"] == [1]
    student = run / "student" / "pytorch_lora_weights.safetensors"
    assert student.is_file() and (run / "samples" / "final.png").is_file()

    # sample a grid from the base and from the student LoRA
    from PIL import Image

    out_base, out_student = tmp_path / "base.png", tmp_path / "student.png"
    common = ["--model", workspace["model"], "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a cow",
              "--resolution", "8", "--num-steps", "2", "--max-sequence-length", "8"]
    assert main(["sample", *common, "--out", str(out_base)]) == 0
    assert main(["sample", *common, "--lora", str(run / "student"), "--out", str(out_student)]) == 0
    a = torch.tensor(list(Image.open(out_base).getdata()), dtype=torch.float32)
    b = torch.tensor(list(Image.open(out_student).getdata()), dtype=torch.float32)
    assert Image.open(out_base).size == (16, 16)  # 3 images of 8 px in a 2 x 2 grid
    assert (a - b).abs().max() > 0  # the LoRA changes the images


def _png(path):
    from PIL import Image

    img = Image.open(path)
    return img.size, torch.tensor(np.asarray(img), dtype=torch.float32)


def test_sample_run_takes_the_run_settings_and_a_flag_overrides_them(workspace, tmp_path, capsys):
    """``sample --run RUN`` reproduces the run's own ``samples/final.png`` (the trainer's grid: its model,
    student, resolution, steps, guidance, T5 length, from the same noise seed and prompts); a flag given
    on the command line wins over the run's value."""
    from scale.setup import derive_seed

    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, distill_steps=1, num_steps=2, guidance_scale=3.0, num_sample_prompts=2)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(path)]) == 0, capsys.readouterr().err
    # the trainer's grid prompts: the first prompt of each task (scale.io.sample_grid), noise seed derived
    prompts = ["--prompt", "task 0 picture 0", "--prompt", "task 1 picture 0",
               "--seed", str(derive_seed(cfg.seed, 2000))]
    assert main(["sample", "--run", str(run), *prompts, "--out", str(tmp_path / "run.png")]) == 0
    size, from_run = _png(tmp_path / "run.png")
    final_size, final = _png(run / "samples" / "final.png")
    assert size == final_size == (16, 8)  # two 8 px images side by side
    assert (from_run - final).abs().max() <= 1  # uint8 rounding at most
    # an override wins: guidance 1 (no CFG) instead of the run's 3.0, all else from the run
    assert main(["sample", "--run", str(run), *prompts, "--guidance-scale", "1",
                 "--out", str(tmp_path / "g1.png")]) == 0
    explicit = ["--model", workspace["model"], "--lora", str(run / "student"), "--resolution", "8",
                "--num-steps", "2", "--max-sequence-length", "8", "--guidance-scale", "1"]
    assert main(["sample", *explicit, *prompts, "--out", str(tmp_path / "explicit.png")]) == 0
    g1, explicit_img = _png(tmp_path / "g1.png")[1], _png(tmp_path / "explicit.png")[1]
    assert torch.equal(g1, explicit_img)
    assert (g1 - final).abs().max() > 1  # the override changed the image
    # and the resolution flag wins too (16 px images)
    assert main(["sample", "--run", str(run), "--prompt", "x", "--resolution", "16",
                 "--out", str(tmp_path / "r16.png")]) == 0
    assert _png(tmp_path / "r16.png")[0] == (16, 16)
    capsys.readouterr()
    assert main(["sample", "--run", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "n.png")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["sample", "--prompt", "x", "--out", str(tmp_path / "n.png")]) == 2
    assert "--run" in capsys.readouterr().err


def test_train_errors_exit_2_naming_the_problem(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**tiny_config(workspace, run).to_dict()}))
    assert main(["train", "--config", str(path), "--set", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "none")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag", "1"])


def test_cli_resume_after_sigterm(workspace, tmp_path, monkeypatch):
    """The CLI returns 143 after a SIGTERM checkpoint and --resume (config from the run dir) finishes."""
    import os
    import signal

    import scale.train as train_mod

    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, run, distill_steps=2, num_steps=2).to_dict()))
    real_init = train_mod.Trainer.__init__

    def init_with_kill(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.callbacks.append(lambda tr, name, step: os.kill(os.getpid(), signal.SIGTERM) if step == 1 else None)

    monkeypatch.setattr(train_mod.Trainer, "__init__", init_with_kill)
    assert main(["train", "--config", str(path)]) == EXIT_INTERRUPTED
    monkeypatch.setattr(train_mod.Trainer, "__init__", real_init)
    assert main(["train", "--resume", "--output-dir", str(run)]) == 0
    assert [r["step"] for r in read_metrics(run) if r["event"] == "update"] == [1, 2]
    assert (run / "student" / "pytorch_lora_weights.safetensors").is_file()


# ---- bench building blocks -------------------------------------------------------------------


def test_flop_arithmetic_matches_the_flop_counter():
    """The hand formula of docs/scale.md (scale.bench.mmdit_forward_flops) equals torch's FlopCounterMode
    on an MMDiT-X transformer (dual attention, qk RMS-norm) within the per-sample terms it leaves out."""
    from diffusers import SD3Transformer2DModel

    from scale.bench import count_forward_flops, mmdit_forward_flops

    config = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=256, pooled_projection_dim=64,
                  pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    counted = count_forward_flops(model, batch=2, latent_hw=32, text_len=40, joint_dim=128, pooled_dim=64)
    by_hand = mmdit_forward_flops(config, image_tokens=(32 // 2) ** 2, text_tokens=40, batch=2)
    assert abs(by_hand / counted - 1) < 5e-3, (by_hand, counted)


def test_live_tensor_bytes_tracks_allocations_and_frees():
    from scale.bench import LiveTensorBytes

    with LiveTensorBytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        del a
        c = torch.ones(250)  # 1000 bytes, after a was freed
        del b, c
    assert live.peak == 8000 and live.current == 0
