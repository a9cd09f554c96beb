r"""``opd-scale gpu-check``: one script for the first machine with a GPU (no downloads).

On CUDA it builds a **full-size SD3.5-Medium transformer** from its config with random weights
(:data:`scale.bench.SD35_MEDIUM_TRANSFORMER`: 24 MMDiT-X blocks, width 1536 = 24 heads x 64, dual
attention in blocks 0-12, qk RMS-norm, patch 2, 16 latent channels, ``pos_embed_max_size`` 384) in
bfloat16, with tiny random text encoders whose output widths are SD3.5's (CLIP-L/G projections 768 +
1280 = 2048 pooled, T5 width 4096) and a tiny 16-channel VAE with SD3.5's factor 8, saves the
pipeline to a temporary directory and measures, at 512 px (64 x 64 latents, 1024 image tokens):

1. **the bf16 kernel vs the scheduler at a = 0**: the engine's ODE rollout (float32 states) against
   ``StableDiffusion3Pipeline.__call__`` (``FlowMatchEulerDiscreteScheduler.step``, bf16 latents
   between steps) from the same initial latents and prompt embeddings, 10 steps: the largest
   difference of the states relative to the final latents' RMS (on the CPU in float32 the two are
   bit-identical, which the CPU test asserts);
2. **one distillation update** (OPD-KL, 10 SDE steps, a = 0.7, trained steps 0, 4, 8) and the
   **peak memory with and without gradient checkpointing at micro-batch 1 and 4**;
3. ``opd-scale bench`` on that model: the **update overhead ratio** (update time / the sum of its
   model calls), memory 40 / 10 steps, PPO-OPD and GRPO against OPD-KL, images/s and MFU;
4. the **achieved TFLOP/s** of the update: FLOPs counted by ``FlopCounterMode`` on the meta device,
   :math:`K n F_{fwd} (T + 4 S)` (rollout, teacher, student forward + backward = 3 forwards), over its
   wall time.

It writes one JSON file (``--out``). On a CPU (or with ``--tiny``) the same code runs on the tiny
pipeline of ``opd-scale build-tiny``, which CI does. Budget: under 8 minutes on one H100/H200.

Reference: ``diffusionopd`` (SD3.5-Medium, 512 px), ``flowgrpo``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["build_check_pipeline", "kernel_vs_scheduler", "memory_matrix", "update_flops", "run_gpu_check"]

#: the widths the SD3.5-Medium transformer expects from its text encoders and VAE
SD35_TEXT = dict(clip_l_projection=768, clip_g_projection=1280, t5_d_model=4096, latent_channels=16)


def build_check_pipeline(out_dir: str | os.PathLike, full: bool, seed: int = 0) -> Path:
    """Write the check's pipeline: ``full``: the SD3.5-Medium transformer (random, bfloat16, built on
    CUDA) with tiny text encoders / VAE of SD3.5's widths; else the tiny pipeline
    (:func:`scale.tiny.build_tiny_pipeline`).

    Returns:
        the directory (``StableDiffusion3Pipeline.from_pretrained`` loads it offline).
    """
    out = Path(out_dir)
    if not full:
        from scale.tiny import build_tiny_pipeline

        return build_tiny_pipeline(out, seed=seed)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from scale.bench import SD35_MEDIUM_TRANSFORMER
    from scale.tiny import _clip_tokenizer, _t5_tokenizer

    t = SD35_TEXT
    clip_tok, t5_tok = _clip_tokenizer(77), _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cuda"):
            transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).to(torch.bfloat16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                            latent_channels=t["latent_channels"], norm_num_groups=8, sample_size=512,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=proj, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, hidden_act="gelu"))
            for proj in (t["clip_l_projection"], t["clip_g_projection"])]
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t["t5_d_model"], d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id,
                                     eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=clip_tok, text_encoder_2=encoders[1], tokenizer_2=_clip_tokenizer(77),
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(out)
    del pipe, transformer
    gc.collect()
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def kernel_vs_scheduler(model: str, dtype: torch.dtype, device: torch.device, resolution: int,
                        num_steps: int = 10, max_sequence_length: int = 32) -> Dict[str, Any]:
    r"""The engine's ODE rollout against ``StableDiffusion3Pipeline.__call__`` (the scheduler's Euler
    step) from the same latents and embeddings, in the model's ``dtype``:

    .. math:: e_k = \max|x^{engine}_k - x^{pipe}_k| / \mathrm{RMS}(x^{pipe}_N)

    Returns:
        ``max_abs_diff_final``, ``rel_diff_per_step`` (:math:`e_k`), ``rel_diff_max``, ``bit_identical``.
    """
    from opd_ref.engine import KernelSpec, rollout
    from scale.pipeline import load_pipeline, model_inputs, scheduler_sigmas
    from scale.policy import SD3Policy
    from scale.text import PromptCache

    pipe = load_pipeline(model, dtype=dtype, device=device)
    tr = pipe.transformer
    f, p = int(pipe.vae_scale_factor), int(tr.config.patch_size)
    side = resolution // f
    emb = PromptCache(pipe, max_sequence_length=max_sequence_length, guidance=True).encode(["a red cat", "a blue dog"])
    gen = torch.Generator(device=device).manual_seed(7)
    x0 = torch.randn(2, int(tr.config.in_channels), side, side, generator=gen, device=device, dtype=torch.float32)
    seen = []
    final = pipe(prompt_embeds=emb.prompt_embeds, pooled_prompt_embeds=emb.pooled_prompt_embeds,
                 negative_prompt_embeds=emb.negative_prompt_embeds,
                 negative_pooled_prompt_embeds=emb.negative_pooled_prompt_embeds, latents=x0.to(dtype).clone(),
                 num_inference_steps=num_steps, guidance_scale=4.5, height=resolution, width=resolution,
                 output_type="latent", callback_on_step_end=lambda pp, i, t, kw: seen.append(kw["latents"].float().clone()) or {}
                 ).images.float()
    policy = SD3Policy(tr, tuple(x0.shape[1:]), device, dtype)
    cond = model_inputs(emb, 4.5, dtype, device)
    sig = scheduler_sigmas(pipe, num_steps, image_seq_len=(side // p) ** 2).to(device)
    with policy.active(None):
        traj = rollout(lambda x, s: policy.velocity(x, s, cond), x0.to(dtype).float(), sig, KernelSpec("ode"), None)
    rms = float(final.pow(2).mean().sqrt())
    per_step = [float((traj.states[k + 1] - seen[k]).abs().max()) / rms for k in range(num_steps)]
    out = {"num_steps": num_steps, "dtype": str(dtype), "max_abs_diff_final": float((traj.final - final).abs().max()),
           "final_rms": rms, "rel_diff_per_step": per_step, "rel_diff_max": max(per_step),
           "bit_identical": bool(all(torch.equal(traj.states[k + 1], seen[k]) for k in range(num_steps)))}
    del pipe, tr, policy, traj
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def update_flops(model: str, micro_batch_size: int, latent_side: int, text_len: int, rollout_steps: int,
                 trained_steps: int, tasks: int = 1, micro_batches: int = 1) -> float:
    r"""FLOPs of one OPD-KL update, counted by ``FlopCounterMode`` on the meta device (no weights):

    .. math:: F = K\,n\,F_{fwd}(2B)\,(T + 4S)

    (:math:`F_{fwd}(2B)` one CFG forward of :math:`B` samples; :math:`T` rollout forwards, per trained
    step a teacher forward and the student's forward + backward, the backward = 2 forwards).
    """
    from diffusers import SD3Transformer2DModel

    from scale.bench import count_forward_flops

    config = json.loads((Path(model) / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        meta = SD3Transformer2DModel(**config)
    fwd = count_forward_flops(meta, 2 * micro_batch_size, latent_side, text_len, int(config["joint_attention_dim"]),
                              int(config["pooled_projection_dim"]))
    return float(tasks * micro_batches * fwd * (rollout_steps + 4 * trained_steps))


def memory_matrix(model: str, teacher: str, prompts: str, resolution: int, dtype: str,
                  batches=(1, 4), max_sequence_length: int = 32) -> Dict[str, Any]:
    """Peak memory of one OPD-KL update (10 SDE steps, trained steps 0, 4, 8) with and without gradient
    checkpointing at each micro-batch size, and the wall time of one update without it (after a
    warm-up update whose optimizer state is then allocated)."""
    from scale.bench import _Peak, _sync
    from scale.config import ScaleConfig
    from scale.train import Trainer

    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="opd_gpucheck_runs_") as tmp:
        for mb in batches:
            for ckpt in (False, True):
                cfg = ScaleConfig(model=model, output_dir=str(Path(tmp) / f"mb{mb}_{int(ckpt)}"), resolution=resolution,
                                  num_steps=10, batch_size=mb, micro_batch_size=mb, tasks=["t"], prompt_files=[prompts],
                                  teacher_loras=[teacher], train_steps=[0, 4, 8], dtype=dtype, checkpoint_every=0,
                                  sample_every=0, max_sequence_length=max_sequence_length, gradient_checkpointing=ckpt)
                trainer = Trainer(cfg)
                trainer.optimizer = trainer.make_optimizer("student")
                dev = trainer.setup.device
                trainer.distill_update(0, 0)
                with _Peak(dev) as peak:
                    trainer.distill_update(0, 1)
                _sync(dev)
                t0 = time.perf_counter()
                stats = trainer.distill_update(0, 2)
                _sync(dev)
                key = f"micro_batch_{mb}" + ("_checkpointing" if ckpt else "")
                out[key] = {"peak_bytes": peak.working, "update_s": time.perf_counter() - t0,
                            "loss": float(stats["loss"]), "method": peak.method}
                if dev.type == "cuda":
                    out[key]["max_allocated_bytes_total"] = float(torch.cuda.max_memory_allocated(dev))
                trainer.close()
                del trainer
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        for mb in batches:
            plain, ck = out[f"micro_batch_{mb}"], out[f"micro_batch_{mb}_checkpointing"]
            out[f"ratio_checkpointing_over_plain_mb{mb}"] = ck["peak_bytes"] / plain["peak_bytes"]
    return out


def run_gpu_check(out: Optional[str | os.PathLike] = "gpu_check.json", *, tiny: bool = False, repeats: int = 3,
                  resolution: Optional[int] = None, batches=(1, 4)) -> Dict[str, Any]:
    """Run every check (see the module docstring) and write the JSON to ``out`` (``None``: do not write).

    Args:
        out: the JSON path.
        tiny: the tiny pipeline even on CUDA.
        repeats: timed repetitions of ``opd-scale bench`` (medians).
        resolution: image side (default 512 full-size, the tiny pipeline's native size otherwise).
        batches: micro-batch sizes of the memory matrix.

    Returns:
        the results dict (what the JSON holds).
    """
    import diffusers

    from scale.bench import _setup, run_bench

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    full = cuda and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = "bfloat16" if cuda else "float32"
    results: Dict[str, Any] = {
        "full_size_sd35_medium": full, "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda, "dtype": dtype_name,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    seq = 128 if full else 8
    tmp = Path(tempfile.mkdtemp(prefix="opd_gpucheck_"))
    try:
        t0 = time.perf_counter()
        model = str(build_check_pipeline(tmp / "pipe", full))
        results["build_s"] = time.perf_counter() - t0
        env = _setup(tmp, model, resolution if resolution else (512 if full else None))
        res = env["resolution"]
        results["resolution"] = res
        t0 = time.perf_counter()
        results["kernel_vs_scheduler"] = kernel_vs_scheduler(model, getattr(torch, dtype_name), device, res,
                                                             max_sequence_length=seq)
        results["kernel_vs_scheduler"]["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["memory"] = memory_matrix(model, env["teacher"], str(tmp / "prompts.txt"), res, dtype_name, batches, seq)
        results["memory"]["seconds"] = time.perf_counter() - t0
        text_len = 77 + seq
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        latent_side = res // 2 ** (len(vae["block_out_channels"]) - 1)
        flops = {}
        for mb in batches:
            f = update_flops(model, mb, latent_side, text_len, 10, 3)
            flops[f"micro_batch_{mb}"] = {"update_flops": f,
                                          "achieved_tflops": f / results["memory"][f"micro_batch_{mb}"]["update_s"] / 1e12}
        results["throughput"] = flops
        t0 = time.perf_counter()
        results["bench"] = run_bench(model=model, resolution=res, repeats=repeats, micro_batch_size=1, dtype=dtype_name,
                                     max_sequence_length=seq)
        results["bench"]["seconds"] = time.perf_counter() - t0
        results["overhead_ratio"] = results["bench"]["overhead"]["ratio"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results
