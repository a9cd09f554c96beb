"""The run directory of ``opd-scale train``: metrics, checkpoints, LoRA files, sample grids.

``RUN/config.json``, ``RUN/metrics.jsonl`` (one JSON record per update or evaluation),
``RUN/checkpoints/`` (numbered, verified by sha256, committed by an atomic ``LATEST`` pointer: see
:mod:`scale.checkpoint`; every LoRA tensor, the optimizer, the RNG states and the position),
``RUN/run.lock`` (held while a run uses the directory),
``RUN/teachers/<task>/`` and ``RUN/student/`` (diffusers LoRA files that
``StableDiffusion3Pipeline.load_lora_weights`` loads), ``RUN/samples/*.png``.  Only the main process
writes.

Reference: ``diffusionopd`` (released LoRAs are diffusers files), ``flowgrpo``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from opd_ref.engine import KernelSpec, RolloutBatch, policy_rollout
from scale.checkpoint import (
    CheckpointError,
    RunDirError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_file_atomic,
)
from scale.setup import STUDENT, Setup, derive_seed

CHECKPOINTS = "checkpoints"

__all__ = ["CHECKPOINTS", "log", "truncate_metrics", "save_state", "load_state", "save_adapter", "sample_grid", "save_grid",
           "sample_images"]


def log(setup: Setup, record: Dict[str, Any]) -> None:
    """Append one record to ``metrics.jsonl`` (main process).

    Raises:
        RunDirError: the write failed (e.g. disk full); the message names the file.
    """
    if setup.is_main:
        path = setup.run_dir / "metrics.jsonl"
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as err:
            raise RunDirError(err.errno, f"could not append to {str(path)!r}: {err.strerror or err}; the last "
                              "checkpoint is intact: free space and continue with --resume") from err


def truncate_metrics(setup: Setup, phase: int, step: int) -> None:
    """Drop the metrics records written after the checkpoint at ``(phase, step)`` (main process); a
    partial last line (a write cut short by a crash) is dropped with a warning.

    Raises:
        ValueError: a line other than the last is not JSON (named with its number).
    """
    path = setup.run_dir / "metrics.jsonl"
    if not setup.is_main or not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{str(path)!r}: dropping a partial last line ({len(line)} characters; a write "
                              "cut short)", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{str(path)!r} line {i + 1} is not JSON: {line[:80]!r}") from None
        pos = (rec["phase"], rec["step"])
        # an eval at step 0 of a phase is logged after that phase's first checkpoint: it is redone
        if pos < (phase, step) or (pos == (phase, step) and (step > 0 or rec.get("event") != "eval")):
            keep.append(line)
    write_file_atomic(path, "".join(line + "\n" for line in keep))


def save_state(setup: Setup, phase: int, step: int, phase_name: str,
               optimizer: Optional[torch.optim.Optimizer], extra: Optional[Dict[str, Any]] = None) -> None:
    """Commit a checkpoint (main process) of every LoRA tensor, the optimizer, RNG states, the position
    and ``extra`` (the loop's own state) under ``RUN/checkpoints`` (:func:`scale.checkpoint.save_checkpoint`)."""
    if setup.is_main:
        lora = {n: p.detach().cpu().clone() for n, p in setup.transformer.named_parameters() if "lora_" in n}
        state = {"phase": phase, "step": step, "lora": lora, "rng": capture_rng_state(), "world_size": setup.world,
                 "optimizer": optimizer.state_dict() if optimizer is not None else None, "extra": dict(extra or {})}
        save_checkpoint(setup.run_dir / CHECKPOINTS, state,
                        {"phase": phase, "phase_name": phase_name, "step": step, "time": time.time()},
                        keep=setup.cfg.keep_checkpoints)
    setup.acc.wait_for_everyone()


def load_state(setup: Setup) -> Tuple[int, int, Optional[dict], Dict[str, Any]]:
    """Restore the LoRA tensors and RNG states of the run's verified checkpoint and drop later metrics;
    without any checkpoint (a run stopped before its first) the run starts from update 0.

    Returns:
        ``(phase, step, optimizer state dict or None, extra)``. (The world size may differ from the
        checkpoint's: samples are a function of (seed, update, task, micro-batch), not of it.)

    Raises:
        CheckpointError: no valid checkpoint although some exist, or tensors that do not fit the model.
    """
    ckpt, where = load_checkpoint(setup.run_dir / CHECKPOINTS)
    if ckpt is None:
        truncate_metrics(setup, 0, 0)
        return 0, 0, None, {}
    params = dict(setup.transformer.named_parameters())
    missing = [n for n in ckpt["lora"] if n not in params]
    if missing:
        raise CheckpointError(f"checkpoint {str(where)!r}: LoRA tensors not in the model: {missing[:5]} ...")
    wrong = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in ckpt["lora"].items()
             if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        n, got, want = wrong[0]
        raise CheckpointError(f"checkpoint {str(where)!r}: LoRA tensor {n} has shape {got}, the model's is {want} "
                              f"({len(wrong)} tensors differ)")
    with torch.no_grad():
        for n, t in ckpt["lora"].items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    restore_rng_state(ckpt["rng"])
    truncate_metrics(setup, ckpt["phase"], ckpt["step"])
    return ckpt["phase"], ckpt["step"], ckpt["optimizer"], ckpt.get("extra", {})


def save_adapter(setup: Setup, adapter: str, out_dir: Path) -> None:
    """Write ``adapter`` as a diffusers LoRA file (main process)."""
    from scale.lora import save_lora

    if setup.is_main:
        save_lora(setup.transformer, adapter, out_dir)
    setup.acc.wait_for_everyone()


def save_grid(images: Tensor, path: str | os.PathLike, ncols: Optional[int] = None) -> Path:
    """Tile ``(B, 3, H, W)`` images in ``[0, 1]`` into one PNG (rows of ``ncols``)."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(b)))
    nrows = int(math.ceil(b / ncols))
    grid = torch.ones(3, nrows * h, ncols * w)
    for i in range(b):
        r, c = divmod(i, ncols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@torch.no_grad()
def sample_images(pipe: Any, cache: Any, prompts: Sequence[str], adapter: Optional[str], *, num_steps: int,
                  resolution: int, guidance_scale: float, seed: int, kernel: str = "ode",
                  noise_level: float = 0.0) -> Tensor:
    """Images of ``adapter`` (``None`` = base) for ``prompts``: an engine rollout from noise drawn
    with ``seed`` on the scheduler grid (the ODE by default = the pipeline's Euler sampler), decoded.

    Returns:
        ``(B, 3, H, W)`` images in ``[0, 1]``.
    """
    from scale.pipeline import decode, model_inputs, scheduler_sigmas
    from scale.policy import SD3Policy

    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    f, p = int(pipe.vae_scale_factor), int(transformer.config.patch_size)
    if resolution % (f * p):
        raise ValueError(f"resolution must be a multiple of {f * p} (VAE factor x patch size), got {resolution}")
    side = resolution // f
    policy = SD3Policy(transformer, (int(transformer.config.in_channels), side, side), device, dtype)
    sigmas = scheduler_sigmas(pipe, num_steps, image_seq_len=(side // p) ** 2)
    cond = model_inputs(cache.encode(list(prompts)), guidance_scale, dtype, device)
    batch = RolloutBatch(cond, len(prompts), torch.Generator(device=device).manual_seed(int(seed)))
    traj = policy_rollout(policy, adapter, batch, sigmas, KernelSpec(kernel, noise_level, "flowgrpo"))
    return decode(pipe, traj.final)


def sample_grid(setup: Setup, path: Path, adapter: Optional[str] = STUDENT) -> Path:
    """ODE samples of ``adapter`` for the first prompts of the tasks (fixed noise) as one PNG."""
    cfg, tasks = setup.cfg, setup.tasks
    n = len(tasks)
    prompts = [tasks[i % n].prompts[(i // n) % len(tasks[i % n].prompts)] for i in range(cfg.num_sample_prompts)]
    images = sample_images(setup.pipe, setup.cache, prompts, adapter, num_steps=cfg.num_steps,
                           resolution=cfg.resolution, guidance_scale=cfg.guidance_scale,
                           seed=derive_seed(cfg.seed, 2000))
    return save_grid(images, path)
