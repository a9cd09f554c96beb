r"""Everything an ``opd-scale train`` run builds before its first update, validated before any output.

:func:`build_setup` checks the config, the prompt files, the rewards and the teacher LoRAs (they must
fit the transformer), loads the pipeline, adds the adapters (``teacher_k`` per task, ``student``),
encodes every prompt once, builds the engine's :class:`~opd_ref.engine.UpdateSpec` of each stage on
the scheduler's grid, and only then creates the run directory: bad input leaves nothing behind.

Notation map: :math:`\pi_\theta` -> adapter ``"student"``, :math:`\pi_{T_k}` -> ``"teacher_k"``,
reference -> adapter ``None``; :math:`\mathcal T` -> ``Setup.spec.trained_steps``.

Reference: ``diffusionopd`` (two-stage recipe), ``flowgrpo`` (GRPO, SDE sampler).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch

from opd_ref.engine import ObjectiveSpec, UpdateSpec
from scale.config import ScaleConfig
from scale.data import PromptBatch
from scale.policy import AccelerateCollective, SD3Policy

__all__ = ["STUDENT", "RESUMABLE_CHANGES", "LOCATION_KEYS", "Task", "Setup", "build_setup", "derive_seed", "read_prompts"]

STUDENT = "student"
# config keys that may change between an interrupted run and its --resume (they do not change what
# an update computes)
RESUMABLE_CHANGES = ("distill_steps", "checkpoint_every", "sample_every", "eval_every", "keep_checkpoints",
                     "max_heldout_kl_ratio", "prompt_cache", "report_to", "eval_steps", "eval_grid_images")
# where the run is, not what it computes: a run directory resumes however its path is spelled or
# after it was moved
LOCATION_KEYS = ("output_dir",)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by integer ``parts`` (numpy ``SeedSequence``): every rollout's noise
    is a function of (seed, phase, update, task, micro-batch) only, so runs resume exactly and split
    over processes without changing any sample."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**31], dtype=np.uint64)))


def read_prompts(path: str | os.PathLike, what: str) -> List[str]:
    """The prompts of a prompt file (:func:`scale.data.load_prompts`: ``.txt`` one per line, ``.jsonl``
    with metadata) as a :class:`~scale.data.PromptBatch`: a list of strings whose ``metadata`` attribute
    holds each prompt's metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no prompt or a malformed line (``what`` names its role, e.g. the task).
    """
    from scale.data import load_prompts

    data = load_prompts(path, what)
    return PromptBatch(data.prompts, data.metadata)


@dataclass
class Task:
    """One task: its prompts, its teacher adapter and (stage 1, CRD) its reward."""

    name: str
    prompts: List[str]
    adapter: str
    teacher_lora: str = ""
    reward_spec: str = ""
    reward: Optional[Callable] = None


@dataclass
class Setup:
    """What :func:`build_setup` builds (see the module docstring)."""

    cfg: ScaleConfig
    acc: Any
    collective: AccelerateCollective
    run_dir: Path
    tasks: List[Task]
    heldout: List[List[str]]
    pipe: Any
    policy: SD3Policy
    cache: Any
    sigmas: torch.Tensor
    spec: UpdateSpec  # stage 2 (distillation or CRD)
    grpo_spec: Optional[UpdateSpec]  # stage 1
    phases: List[Tuple[str, int]]  # ("grpo", k) per stage-1 task, then ("distill", -1)
    rank: int = 0  # this process, of ``world``
    world: int = 1
    is_main: bool = True  # the process that writes the run directory
    lock: Any = None  # the main process's RunLock on run_dir (released by Trainer.close)

    @property
    def transformer(self):
        """The frozen base transformer carrying every adapter."""
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.policy.device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _tasks(cfg: ScaleConfig, device: Any = None) -> List[Task]:
    stage1 = cfg.stage1_steps > 0
    teacher_loras = cfg.teacher_loras or [""] * len(cfg.tasks)
    rewards = cfg.rewards or [""] * len(cfg.tasks)
    tasks = []
    for k, name in enumerate(cfg.tasks):
        task = Task(name, read_prompts(cfg.prompt_files[k], f"task {name!r}"), f"teacher_{k}", teacher_loras[k], rewards[k])
        if cfg.loss == "crd":
            if not task.reward_spec:
                raise ValueError(f"loss 'crd' trains on rewards: task {name!r} has no reward (config rewards)")
            task.teacher_lora = ""
        elif not task.teacher_lora:
            if not stage1:
                raise ValueError(
                    f"task {name!r} has no teacher LoRA (config teacher_loras) and stage 1 is off "
                    "(config stage1_steps = 0): give a LoRA file or a reward and stage1_steps > 0"
                )
            if not task.reward_spec:
                raise ValueError(f"task {name!r} is trained in stage 1 but has no reward (config rewards)")
        elif not Path(task.teacher_lora).exists():
            raise FileNotFoundError(f"teacher LoRA for task {name!r} not found: {task.teacher_lora!r}")
        if task.reward_spec:
            from scale.rewards import get_reward

            task.reward = get_reward(task.reward_spec, device=device)
        tasks.append(task)
    return tasks


def _check_run_dir(cfg: ScaleConfig, run_dir: Path, resume: bool) -> None:
    """Fresh run: ``run_dir`` absent or empty (a lone ``run.lock`` counts as empty). ``--resume``: a
    ``config.json`` that matches ``cfg`` except :data:`RESUMABLE_CHANGES` and :data:`LOCATION_KEYS`
    (a checkpoint is not needed: without one the run starts from update 0)."""
    from scale.checkpoint import RunLock

    if resume:
        path = run_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no run in {str(run_dir)!r} (no config.json)")
        if (run_dir / "checkpoint" / "state.pt").is_file() and not (run_dir / "checkpoints").exists():
            raise ValueError(f"--resume: {str(run_dir)!r} holds a checkpoint/ folder of an older opd-scale "
                             "(no checksums); start a new run")
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"--resume: {str(path)!r} is not valid JSON ({err})") from None
        now = cfg.to_dict()
        skip = RESUMABLE_CHANGES + LOCATION_KEYS
        changed = sorted(k for k in now if k not in skip and saved.get(k, now[k]) != now[k])
        if changed:
            raise ValueError(
                f"--resume: config differs from the run's config.json in {changed}; only "
                f"{list(RESUMABLE_CHANGES)} may change"
            )
    elif run_dir.exists() and (not run_dir.is_dir() or any(p.name != RunLock.FILE for p in run_dir.iterdir())):
        raise ValueError(
            f"output_dir {str(run_dir)!r} exists and is not empty: pass --resume to continue that run "
            "or choose a new directory"
        )


def _open_run_dir(cfg: ScaleConfig, run_dir: Path, resume: bool):
    """Create ``run_dir``, take its lock, check it again under the lock (another run may have started
    since the first check) and, for a fresh run, write ``config.json`` atomically.

    Returns:
        the held :class:`~scale.checkpoint.RunLock`.
    """
    from scale.checkpoint import RunDirError, RunLock, write_file_atomic

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(err.errno, f"could not create output_dir {str(run_dir)!r}: {err.strerror or err}") from err
    lock = RunLock(run_dir).acquire()
    try:
        _check_run_dir(cfg, run_dir, resume)
        if not resume:
            write_file_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_batches(cfg: ScaleConfig, world: int) -> None:
    stage1, crd = cfg.stage1_steps > 0, cfg.loss == "crd"
    if not crd and cfg.distill_steps > 0 and (cfg.batch_size % cfg.micro_batch_size
                                              or (cfg.batch_size // cfg.micro_batch_size) % world):
        raise ValueError(
            f"stage 2 needs batch_size ({cfg.batch_size}) = a multiple of micro_batch_size "
            f"({cfg.micro_batch_size}) whose micro-batches split evenly over {world} processes"
        )
    if (stage1 or crd) and (cfg.batch_size % world or cfg.group_size % cfg.micro_batch_size or cfg.group_size < 2):
        raise ValueError(
            f"stage 1 and CRD need batch_size ({cfg.batch_size}) divisible by the {world} processes and "
            f"group_size ({cfg.group_size}) >= 2 divisible by micro_batch_size ({cfg.micro_batch_size})"
        )


def _add_adapters(cfg: ScaleConfig, transformer, tasks: List[Task]) -> None:
    from scale.lora import add_lora, load_lora

    for task in tasks:
        if task.teacher_lora:
            load_lora(transformer, task.teacher_lora, task.adapter)
    # identical LoRA initialisation on every process (lora_A random, lora_B zero)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, 99))
        for task in tasks:
            if not task.teacher_lora and cfg.loss != "crd":
                add_lora(transformer, task.adapter, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         target_modules=cfg.lora_targets)
        add_lora(transformer, STUDENT, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)


def build_setup(config: ScaleConfig, resume: bool = False, accelerator: Any = None) -> Setup:
    """Validate, load and build a run (see the module docstring); create its directory last.

    Args:
        config: the run's :class:`~scale.config.ScaleConfig`.
        resume: continue the run in ``config.output_dir`` (its config.json must match).
        accelerator: an ``accelerate.Accelerator`` (``None``: ``Accelerator(cpu=True)`` without CUDA).

    Returns:
        :class:`Setup`.
    """
    cfg = config.validate()
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if not cfg.tasks:
        raise ValueError("config tasks is empty: give at least one task (tasks, prompt_files, teacher_loras)")
    if len(cfg.prompt_files) != len(cfg.tasks):
        raise ValueError(f"config prompt_files needs one file per task ({len(cfg.tasks)}), got {cfg.prompt_files}")
    if not cfg.model:
        raise ValueError("config model is empty: pass --model DIR_OR_HUB_ID (an SD3 / SD3.5 diffusers pipeline)")
    tasks = _tasks(cfg, accelerator.device)
    files = cfg.heldout_prompt_files * (len(cfg.tasks) if len(cfg.heldout_prompt_files) == 1 else 1)
    # held-out prompts per task (the KL to teacher k is measured on prompts of task k)
    heldout = [read_prompts(f, f"held-out evaluation of task {t!r}") for f, t in zip(files, cfg.tasks)]
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process and (run_dir / "run.lock").is_file():  # in use: say so before anything else
        from scale.checkpoint import RunLock

        RunLock(run_dir).acquire().release()
    _check_run_dir(cfg, run_dir, resume)
    _check_batches(cfg, accelerator.num_processes)
    if cfg.report_to != "none":  # the tracker's package, before anything is written
        from scale.trackers import check_available

        check_available(cfg.report_to)

    from scale.pipeline import load_pipeline, scheduler_sigmas
    from scale.text import PromptCache

    device = accelerator.device
    dtype = _resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    tcfg = pipe.transformer.config
    vae_f, patch = int(pipe.vae_scale_factor), int(tcfg.patch_size)
    if cfg.resolution % (vae_f * patch):
        raise ValueError(f"config resolution must be a multiple of {vae_f * patch} (VAE factor x patch size), "
                         f"got {cfg.resolution}")
    side = cfg.resolution // vae_f
    _add_adapters(cfg, pipe.transformer, tasks)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    # guidance per role: the student, each teacher as it was trained, the reference
    guidance = {STUDENT: cfg.guidance_scale, None: cfg.reference_guidance_scale}
    guidance.update({task.adapter: g for task, g in zip(tasks, cfg.teacher_guidance())})
    policy = SD3Policy(pipe.transformer, (int(tcfg.in_channels), side, side), device, pipe.transformer.dtype,
                       guidance=guidance, detach_uncond=cfg.detach_uncond)
    cache = PromptCache(pipe, max_sequence_length=cfg.max_sequence_length, guidance=policy.needs_uncond)
    every_prompt = sorted({p for t in tasks for p in t.prompts} | {p for ps in heldout for p in ps})
    if cfg.prompt_cache:  # memory-mapped on disk: each process encodes its share once, all read
        cache.attach(cfg.prompt_cache, every_prompt, accelerator.process_index, accelerator.num_processes,
                     accelerator.wait_for_everyone)
    else:  # in host memory (pinned on CUDA)
        cache.encode(every_prompt)
    if device.type == "cuda":  # the text encoders (T5-XXL: ~9.5 GB in bf16) are done: offload
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to("cpu")
        torch.cuda.empty_cache()
    sigmas = scheduler_sigmas(pipe, cfg.num_steps, image_seq_len=(side // patch) ** 2).to(device)
    kernel, steps = cfg.kernel_spec(), tuple(cfg.train_steps)
    spec = UpdateSpec(sigmas, kernel, ObjectiveSpec(cfg.loss, crd_beta=cfg.crd_beta, crd=cfg.crd_mechanisms()), steps, cfg.max_grad_norm)
    phases = [] if cfg.loss == "crd" else [("grpo", k) for k, t in enumerate(tasks) if not t.teacher_lora]
    grpo_spec = None
    if phases:
        grpo = ObjectiveSpec(cfg.teacher_algorithm, clip_range=cfg.clip_range, kl_beta=cfg.kl_beta, kl_form=cfg.kl_form,
                             nft_beta=cfg.nft_beta, ratio_form=cfg.ratio_form)
        grpo_spec = UpdateSpec(sigmas, kernel, grpo, steps, cfg.max_grad_norm)
    phases.append(("distill", -1))

    # ---- run directory (only now: everything above validated, on every process) ---------------
    accelerator.wait_for_everyone()
    lock = _open_run_dir(cfg, run_dir, resume) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return Setup(cfg, accelerator, AccelerateCollective(accelerator), run_dir, tasks, heldout, pipe, policy, cache,
                 sigmas, spec, grpo_spec, phases, accelerator.process_index, accelerator.num_processes,
                 accelerator.is_main_process, lock)
