r"""The two-stage DiffusionOPD recipe on SD3 / SD3.5 with LoRA adapters on one frozen base.

Stage 1 (optional, ``stage1_steps > 0``): one task teacher LoRA per task, trained with GRPO on the
task's reward (Flow-GRPO): group-normalised advantages
:math:`A_i = (r_i - \bar r)/(\mathrm{std}(r) + \epsilon)`, the clipped ratio
:func:`opd_ref.ppo_surrogate_loss`, plus :math:`\beta` times the per-step KL to the reference (the
base with adapters disabled): exact :func:`opd_ref.same_cov_kl` (``kl_form="exact"``) or the public
code's :func:`opd_ref.flowgrpo_step_kl` (``kl_form="flowgrpo"``).

Stage 2: the student LoRA is distilled from all teachers on its *own* rollouts. Per trained step
:math:`t` of a stored trajectory, student and teacher kernels are taken at the same state
:math:`x_t` and (D1, D2, D3)

.. math::
    \mathcal L(\theta) = \frac{1}{K}\sum_{k=1}^{K} \mathbb E_{c\sim\mathcal C_k,\ x\sim\pi_\theta}
        \frac{1}{|\mathcal T|}\sum_{t\in\mathcal T}
        \mathrm{KL}\big(\pi_\theta(\cdot|x_t, c)\,\|\,\pi_{T_k}(\cdot|x_t, c)\big),

with the per-step loss from :func:`opd_ref.opd_kl_loss` (SDE/CPS), :func:`opd_ref.ode_matching_loss`
(ODE, D4) or :func:`opd_ref.estimators.ppo_kl_surrogate` (PPO-OPD, D5). One update is a round-robin
cycle over the :math:`K` tasks with the gradients accumulated over the cycle, i.e. the gradient of the
task-averaged objective (D13). Rollouts run under ``no_grad`` and are stored; each trained step is
re-evaluated with grad and back-propagated on its own, so peak memory does not grow with the number
of rollout steps. Gradients are summed over processes once per update (data parallel through
``accelerate``).

Notation map: :math:`\pi_\theta` -> adapter ``"student"``, :math:`\pi_{T_k}` -> ``"teacher_k"``,
reference -> adapter ``None``; :math:`\mathcal T` -> ``config.train_steps``.

Reference: ``diffusionopd`` (two-stage recipe, multi-task OPD), ``flowgrpo`` (GRPO, SDE sampler).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from opd_ref import (
    GaussianStep,
    cps_step,
    flowgrpo_step_kl,
    gaussian_log_prob,
    ode_matching_loss,
    ode_step,
    opd_kl_loss,
    ppo_surrogate_loss,
    same_cov_kl,
    sde_std_t,
    sde_step,
)
from opd_ref.estimators import ppo_kl_surrogate
from scale.checkpoint import StopSignal, capture_rng_state, has_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from scale.config import ScaleConfig
from scale.rollout import kernel_step

__all__ = [
    "STUDENT",
    "Task",
    "Trainer",
    "TrainResult",
    "train",
    "distill_step_loss",
    "grpo_step_loss",
    "derive_seed",
    "read_prompts",
    "save_grid",
    "sample_images",
]

STUDENT = "student"
# config keys that may change between an interrupted run and its --resume (they do not change what
# an update computes)
RESUMABLE_CHANGES = ("distill_steps", "checkpoint_every", "sample_every", "eval_every")


# ------------------------------------------------------------------------------------------------
# per-step losses: thin glue around opd_ref (the math lives there)
# ------------------------------------------------------------------------------------------------


def distill_step_loss(
    loss: str,
    kernel: str,
    x: Tensor,
    x_next: Tensor,
    v_student: Tensor,
    v_teacher: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
) -> Tuple[Tensor, Tensor]:
    r"""Stage-2 per-step loss at the student's state ``x`` and the per-step divergence to log.

    .. math::
        \texttt{opd\_kl}:\ \frac{\|\mu_\theta - \mu_T\|^2}{2 s^2},\qquad
        \texttt{ode}:\ \tfrac12\|x'_\theta - x'_T\|^2,\qquad
        \texttt{ppo\_opd}:\ -r A,\ A = -\mathrm{KL}_\theta,\ r = 1

    Args:
        loss: ``"opd_kl"``, ``"ode"`` or ``"ppo_opd"``.
        kernel: rollout kernel (``"ode"`` for ``loss="ode"``, else ``"sde"``/``"cps"``).
        x: ``(B, C, H, W)`` stored state; ``x_next`` the stored next state (the sampled action).
        v_student: ``(B, C, H, W)`` student velocity (with grad); ``v_teacher`` the teacher's.
        sigma, sigma_next: ``(B,)``.
        noise_level: ``a``.

    Returns:
        ``(loss (B,), divergence (B,))``: the divergence is the closed-form KL (stochastic kernels)
        or the matching loss (ODE), detached.

    Reference: ``diffusionopd`` (closed-form KL, ODE matching, PPO baseline).
    """
    x = x.float()
    if loss == "ode":
        per = ode_matching_loss(ode_step(x, v_student, sigma, sigma_next), ode_step(x, v_teacher, sigma, sigma_next))
        return per, per.detach()
    student = kernel_step(kernel, x, v_student, sigma, sigma_next, noise_level)
    teacher_mean = kernel_step(kernel, x, v_teacher, sigma, sigma_next, noise_level).mean
    if loss == "opd_kl":
        per = opd_kl_loss(student, teacher_mean)
        return per, per.detach()
    if loss == "ppo_opd":
        per = ppo_kl_surrogate(student, teacher_mean, x_next.float())
        return per, opd_kl_loss(student.detach(), teacher_mean).detach()
    raise ValueError(f"loss must be 'opd_kl', 'ode' or 'ppo_opd', got {loss!r}")


def grpo_step_loss(
    kernel: str,
    x: Tensor,
    x_next: Tensor,
    v_theta: Tensor,
    v_ref: Optional[Tensor],
    old_log_prob: Tensor,
    advantage: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
    clip_range: float,
    kl_beta: float,
    kl_form: str = "exact",
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Stage-1 (Flow-GRPO) per-step loss of the policy being trained.

    .. math::
        \ell = -\min\big(r A,\ \mathrm{clip}(r, 1-\epsilon, 1+\epsilon) A\big)
            + \beta\,\mathrm{KL}\big(\pi_\theta(\cdot|x_t)\,\|\,\pi_{ref}(\cdot|x_t)\big),
        \qquad r = \frac{\pi_\theta(x_{t+1}|x_t)}{\pi_{old}(x_{t+1}|x_t)}

    Args:
        kernel: ``"sde"`` or ``"cps"``.
        x, x_next: ``(B, C, H, W)`` stored transition.
        v_theta: ``(B, C, H, W)`` velocity of the policy (with grad); ``v_ref``: reference velocity or
            ``None`` when ``kl_beta == 0``.
        old_log_prob: ``(B,)`` behaviour log-prob stored by the rollout (summed over dims).
        advantage: ``(B,)``.
        sigma, sigma_next: ``(B,)``.
        noise_level: ``a``; clip_range: ``epsilon``; kl_beta: ``beta``.
        kl_form: ``"exact"`` (:func:`opd_ref.same_cov_kl`) or ``"flowgrpo"``
            (:func:`opd_ref.flowgrpo_step_kl`, SDE only).

    Returns:
        ``(loss (B,), kl (B,) detached, ratio (B,) detached)``.

    Reference: ``flowgrpo``.
    """
    x = x.float()
    step = kernel_step(kernel, x, v_theta, sigma, sigma_next, noise_level)
    log_prob = gaussian_log_prob(x_next.float(), step)
    per = ppo_surrogate_loss(log_prob, old_log_prob.float(), advantage.float(), clip_range)
    kl = torch.zeros_like(per)
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError("grpo_step_loss: v_ref is required when kl_beta > 0")
        ref_mean = kernel_step(kernel, x, v_ref, sigma, sigma_next, noise_level).mean
        if kl_form == "exact":
            kl = same_cov_kl(step.mean, ref_mean.detach(), step.std)
        elif kl_form == "flowgrpo":
            if kernel != "sde":
                raise ValueError(f"kl_form 'flowgrpo' is defined for the sde kernel only, got kernel {kernel!r}")
            std_t = sde_std_t(sigma, torch.full_like(sigma, noise_level), sigma_next=sigma_next, sigma_one="flowgrpo")
            kl = flowgrpo_step_kl(step.mean, ref_mean.detach(), std_t)
        else:
            raise ValueError(f"kl_form must be 'exact' or 'flowgrpo', got {kl_form!r}")
        per = per + kl_beta * kl
    ratio = torch.exp(log_prob - old_log_prob.float()).detach()
    return per, kl.detach(), ratio


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by integer ``parts`` (numpy ``SeedSequence``): every rollout's noise
    is a function of (seed, phase, update, task, micro-batch) only, so runs resume exactly and split
    over processes without changing any sample."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**31], dtype=np.uint64)))


def read_prompts(path: str | os.PathLike, what: str) -> List[str]:
    """Non-empty stripped lines of a prompt file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no prompt (``what`` names its role, e.g. the task).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file for {what} not found: {str(path)!r}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file for {what} is empty (no non-blank line): {str(path)!r}")
    return prompts


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
def sample_images(
    pipe: Any,
    cache: Any,
    prompts: Sequence[str],
    adapter: Optional[str],
    *,
    num_steps: int,
    resolution: int,
    guidance_scale: float,
    seed: int,
    kernel: str = "ode",
    noise_level: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Images of ``adapter`` (``None`` = base) for ``prompts``: noise from ``seed``, a
    :func:`scale.rollout.rollout` on the scheduler grid (ODE by default = the pipeline's Euler
    sampler), then :func:`scale.rollout.decode`.

    Returns:
        ``(B, 3, H, W)`` images in ``[0, 1]``.
    """
    from scale.rollout import decode, rollout, scheduler_sigmas

    transformer = pipe.transformer
    device = transformer.device
    f = int(pipe.vae_scale_factor)
    p = int(transformer.config.patch_size)
    if resolution % (f * p):
        raise ValueError(f"resolution must be a multiple of {f * p} (VAE factor x patch size), got {resolution}")
    shape = (len(prompts), int(transformer.config.in_channels), resolution // f, resolution // f)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    latents0 = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    sigmas = scheduler_sigmas(pipe, num_steps, image_seq_len=(resolution // f // p) ** 2).to(device)
    embeds = cache.encode(list(prompts)).to(device, dtype or transformer.dtype)
    traj = rollout(transformer, embeds, sigmas, latents0, kernel=kernel, noise_level=noise_level,
                   guidance_scale=guidance_scale, adapter=adapter, generator=gen)
    return decode(pipe, traj.latents[-1])


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class Task:
    """One distillation task: its prompts, its teacher adapter and (stage 1) its reward."""

    name: str
    prompts: List[str]
    adapter: str
    teacher_lora: str = ""
    reward_spec: str = ""
    reward: Optional[Callable] = None


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns."""

    run_dir: Path
    status: str  # "finished" or "interrupted"
    phase: int
    step: int
    last_metrics: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, adapters, optimizer, RNG and run directory of one ``opd-scale train`` run.

    Everything the run needs is validated in the constructor *before* the run directory is created
    (model directory, prompt files, rewards, teacher LoRAs fit the transformer), so bad input leaves
    nothing behind.

    Args:
        config: the run's :class:`~scale.config.ScaleConfig`.
        resume: continue the run in ``config.output_dir`` from its checkpoint.
        accelerator: an ``accelerate.Accelerator`` (one is created when ``None``:
            ``Accelerator(cpu=True)`` without CUDA).
        callbacks: callables ``f(trainer, phase_name, step)`` run after each update (tests use it
            to send SIGTERM mid-run).
        step_hook: callable receiving a dict per trained step of stage 2 (state, sigmas, prompt
            embeddings, per-sample loss) — used by the tests to recompute the loss independently.

    Reference: ``diffusionopd``, ``flowgrpo``.
    """

    def __init__(
        self,
        config: ScaleConfig,
        *,
        resume: bool = False,
        accelerator: Any = None,
        callbacks: Sequence[Callable] = (),
        step_hook: Optional[Callable[[Dict[str, Any]], None]] = None,
    ):
        self.cfg = cfg = config.validate()
        self.resume = resume
        self.callbacks = list(callbacks)
        self.step_hook = step_hook
        self.run_dir = Path(cfg.output_dir)
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.acc = accelerator

        # ---- cheap validation (no model load) --------------------------------------------------
        if not cfg.tasks:
            raise ValueError("config tasks is empty: give at least one task (tasks, prompt_files, teacher_loras)")
        if len(cfg.prompt_files) != len(cfg.tasks):
            raise ValueError(f"config prompt_files needs one file per task ({len(cfg.tasks)}), got {cfg.prompt_files}")
        if not cfg.model:
            raise ValueError("config model is empty: pass --model DIR_OR_HUB_ID (an SD3 / SD3.5 diffusers pipeline)")
        stage1 = cfg.stage1_steps > 0
        teacher_loras = cfg.teacher_loras or [""] * len(cfg.tasks)
        rewards = cfg.rewards or [""] * len(cfg.tasks)
        self.tasks: List[Task] = []
        for k, name in enumerate(cfg.tasks):
            prompts = read_prompts(cfg.prompt_files[k], f"task {name!r}")
            task = Task(name, prompts, f"teacher_{k}", teacher_loras[k], rewards[k])
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

                task.reward = get_reward(task.reward_spec)
            self.tasks.append(task)
        files = cfg.heldout_prompt_files
        if len(files) == 1:
            files = files * len(cfg.tasks)
        # held-out prompts per task (the KL to teacher k is measured on prompts of task k)
        self.heldout: List[List[str]] = [read_prompts(f, f"held-out evaluation of task {t!r}") for f, t in zip(files, cfg.tasks)]
        self.heldout_prompts = sorted({p for ps in self.heldout for p in ps})
        if resume:
            if not (self.run_dir / "config.json").is_file() or not has_checkpoint(self.run_dir / "checkpoint"):
                raise FileNotFoundError(f"--resume: no run with a checkpoint in {str(self.run_dir)!r}")
            saved = json.loads((self.run_dir / "config.json").read_text())
            now = cfg.to_dict()
            changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
            if changed:
                raise ValueError(
                    f"--resume: config differs from the run's config.json in {changed}; only "
                    f"{list(RESUMABLE_CHANGES)} may change"
                )
        elif self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise ValueError(
                f"output_dir {str(self.run_dir)!r} exists and is not empty: pass --resume to continue that run "
                "or choose a new directory"
            )

        # ---- accelerator and model ------------------------------------------------------------
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.device = accelerator.device
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        self.is_main = accelerator.is_main_process
        if cfg.loss != "crd" and cfg.distill_steps > 0 and (cfg.batch_size % cfg.micro_batch_size
                                  or (cfg.batch_size // cfg.micro_batch_size) % self.world):
            raise ValueError(
                f"stage 2 needs batch_size ({cfg.batch_size}) = a multiple of micro_batch_size "
                f"({cfg.micro_batch_size}) whose micro-batches split evenly over {self.world} processes"
            )
        if (stage1 or cfg.loss == "crd") and (cfg.batch_size % self.world or cfg.group_size % cfg.micro_batch_size):
            raise ValueError(
                f"stage 1 needs batch_size ({cfg.batch_size}) divisible by the {self.world} processes and "
                f"group_size ({cfg.group_size}) divisible by micro_batch_size ({cfg.micro_batch_size})"
            )

        from scale.model import PromptCache, add_lora, load_lora, load_pipeline

        self.pipe = load_pipeline(cfg.model, dtype=self.dtype, device=self.device)
        self.transformer = self.pipe.transformer
        tcfg = self.transformer.config
        factor = int(self.pipe.vae_scale_factor) * int(tcfg.patch_size)
        if cfg.resolution % factor:
            raise ValueError(f"config resolution must be a multiple of {factor} (VAE factor x patch size), got {cfg.resolution}")
        self.latent_shape = (int(tcfg.in_channels), cfg.resolution // int(self.pipe.vae_scale_factor),
                             cfg.resolution // int(self.pipe.vae_scale_factor))
        for task in self.tasks:
            if task.teacher_lora:
                load_lora(self.transformer, task.teacher_lora, task.adapter)
        # identical LoRA initialisation on every process (lora_A random, lora_B zero)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, 99))
            for task in self.tasks:
                if not task.teacher_lora and cfg.loss != "crd":
                    add_lora(self.transformer, task.adapter, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                             target_modules=cfg.lora_targets)
            add_lora(self.transformer, STUDENT, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # looked up once: ``transformer.dtype`` walks every module (the trainer never recasts the model)
        self._transformer_dtype = self.transformer.dtype
        self.cache = PromptCache(self.pipe, max_sequence_length=cfg.max_sequence_length, guidance=cfg.guidance_scale > 1)
        # encode every prompt once now (the text encoders are not needed afterwards)
        all_prompts = sorted({p for t in self.tasks for p in t.prompts} | set(self.heldout_prompts))
        self.cache.encode(all_prompts)
        if self.device.type == "cuda":  # the text encoders (T5-XXL: ~9.5 GB in bf16) are done: offload
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(self.pipe, name, None) is not None:
                    getattr(self.pipe, name).to("cpu")
            torch.cuda.empty_cache()

        from scale.rollout import scheduler_sigmas

        seq_len = (self.latent_shape[1] // int(tcfg.patch_size)) ** 2
        self.sigmas = scheduler_sigmas(self.pipe, cfg.num_steps, image_seq_len=seq_len).float().to(self.device)
        self.trained = cfg.trained_step_indices()
        self.phases: List[Tuple[str, int]] = [] if cfg.loss == "crd" else [
            ("grpo", k) for k, t in enumerate(self.tasks) if not t.teacher_lora]
        self.phases.append(("distill", -1))
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.current_adapter: Optional[str] = None
        self._adapter_params: Dict[str, List[torch.nn.Parameter]] = {}

        # ---- run directory (only now: everything above validated, on every process) -----------
        self.acc.wait_for_everyone()
        if self.is_main and not resume:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        self.acc.wait_for_everyone()

    # ---- parameters --------------------------------------------------------------------------
    def adapter_parameters(self, adapter: str) -> List[torch.nn.Parameter]:
        """The LoRA parameters of ``adapter`` (by name, whatever their ``requires_grad``)."""
        from scale.model import lora_parameters

        if adapter not in self._adapter_params:  # cached: walking named_parameters is slow
            self._adapter_params[adapter] = lora_parameters(self.transformer, adapter)
        return self._adapter_params[adapter]

    def lora_state(self) -> Dict[str, Tensor]:
        """Every LoRA tensor of the transformer (all adapters), by parameter name, on CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.transformer.named_parameters() if "lora_" in n}

    def _load_lora_state(self, state: Dict[str, Tensor]) -> None:
        params = dict(self.transformer.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"checkpoint LoRA tensors not in the model: {missing[:5]} ...")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def optimizer(self, adapter: str) -> torch.optim.Optimizer:
        """The AdamW optimizer of ``adapter``'s LoRA parameters (created on first use)."""
        if adapter not in self.optimizers:
            self.optimizers[adapter] = self._make_optimizer(adapter)
        return self.optimizers[adapter]

    def _make_optimizer(self, adapter: str) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.AdamW(
            self.adapter_parameters(adapter), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
        )

    # ---- building blocks -------------------------------------------------------------------
    def generator(self, *parts: int) -> torch.Generator:
        """A fresh generator on the model's device seeded by ``(seed, *parts)``."""
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, *parts))

    def prompt_indices(self, phase: int, update: int, task: int, count: int) -> List[int]:
        """``count`` prompt indices (with replacement) of task ``task`` for update ``update``; the
        same on every process."""
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 7, phase, update, task))
        return torch.randint(len(self.tasks[task].prompts), (count,), generator=gen).tolist()

    def velocity(self, x: Tensor, sigma: Tensor, embeds: Any, adapter: Optional[str]) -> Tensor:
        """CFG velocity of ``adapter`` (``None`` = reference) at ``(x, sigma)``, float32."""
        from scale.model import predict_velocity

        if adapter is not None and torch.is_grad_enabled():
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(True)
        return predict_velocity(self.transformer, x, sigma, embeds, self.cfg.guidance_scale, adapter,
                                dtype=self._transformer_dtype)

    def rollout(self, embeds: Any, n: int, gen: torch.Generator, adapter: Optional[str], kernel: Optional[str] = None,
                sigmas: Optional[Tensor] = None):
        """Initial noise from ``gen`` then a stored no-grad rollout (:func:`scale.rollout.rollout`)."""
        from scale.rollout import rollout

        latents0 = torch.randn((n,) + self.latent_shape, generator=gen, device=self.device, dtype=torch.float32)
        return rollout(self.transformer, embeds, self.sigmas if sigmas is None else sigmas, latents0,
                       kernel=kernel or self.cfg.kernel, noise_level=self.cfg.noise_level,
                       guidance_scale=self.cfg.guidance_scale, adapter=adapter, generator=gen)

    def _embeds(self, prompts: List[str]):
        return self.cache.encode(prompts).to(self.device, self.dtype)

    def _sig(self, t: int, b: int) -> Tuple[Tensor, Tensor]:
        return self.sigmas[t].expand(b).clone(), self.sigmas[t + 1].expand(b).clone()

    def _sync_grads(self, params: List[torch.nn.Parameter]) -> None:
        """Sum gradients over processes (one all-reduce of a flat buffer per update)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world == 1:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        flat = self.acc.reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _reduce_stats(self, stats: Dict[str, float]) -> Dict[str, float]:
        if self.world == 1 or not stats:
            return dict(stats)
        keys = sorted(stats)
        vec = self.acc.reduce(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device), reduction="sum")
        return {k: float(v) for k, v in zip(keys, vec.tolist())}

    def _optimizer_step(self, adapter: str) -> float:
        params = self.adapter_parameters(adapter)
        self._sync_grads(params)
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
        opt = self.optimizer(adapter)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # ---- stage 2 -------------------------------------------------------------------------
    def distill_update(self, update: int) -> Dict[str, float]:
        """One stage-2 update: a round-robin cycle over the tasks, gradients accumulated over it,
        then one optimizer step. Returns the update's metrics (summed over processes)."""
        cfg = self.cfg
        n_micro = cfg.batch_size // cfg.micro_batch_size
        weight = 1.0 / (len(self.tasks) * n_micro * len(self.trained))
        stats: Dict[str, float] = defaultdict(float)
        phase = len(self.phases) - 1
        for k, task in enumerate(self.tasks):
            idx = self.prompt_indices(phase, update, k, cfg.batch_size)
            for m in range(self.rank, n_micro, self.world):
                prompts = [task.prompts[i] for i in idx[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]]
                embeds = self._embeds(prompts)
                traj = self.rollout(embeds, len(prompts), self.generator(phase, update, k, m), STUDENT)
                for t in self.trained:
                    x, x_next = traj.latents[t].float(), traj.latents[t + 1].float()
                    sigma, sigma_next = self._sig(t, x.shape[0])
                    with torch.no_grad():
                        v_teacher = self.velocity(x, sigma, embeds, task.adapter)
                    v_student = self.velocity(x, sigma, embeds, STUDENT)
                    per, div = distill_step_loss(cfg.loss, cfg.kernel, x, x_next, v_student, v_teacher, sigma, sigma_next,
                                                 cfg.noise_level)
                    (per.mean() * weight).backward()
                    if self.step_hook is not None:
                        self.step_hook({"task": k, "t": t, "x": x, "x_next": x_next, "sigma": sigma,
                                        "sigma_next": sigma_next, "embeds": embeds, "loss": per.detach(), "update": update})
                    stats["loss"] += float(per.detach().mean()) * weight
                    # per-task divergence summed over trained steps, averaged over prompts
                    stats[f"div/{task.name}"] += float(div.mean()) / n_micro
        stats = self._reduce_stats(stats)
        stats["grad_norm"] = self._optimizer_step(STUDENT)
        return stats

    @torch.no_grad()
    def heldout_divergence(self) -> Dict[str, float]:
        """Student-teacher divergence on the held-out prompts of each task: for task ``k``, the sum over all
        stochastic rollout steps of the per-step KL (stochastic kernels; by the chain rule D3 its
        expectation is the path-space KL; CPS's deterministic last step is left out) or matching loss (ODE), averaged over prompts. The rollout noise is fixed
        (common random numbers), so values at different updates are directly comparable."""
        cfg = self.cfg
        if not self.heldout_prompts or cfg.loss == "crd":
            return {}
        out: Dict[str, float] = defaultdict(float)
        mb = cfg.micro_batch_size
        name = "heldout_kl" if cfg.kernel != "ode" else "heldout_match"
        for k, task in enumerate(self.tasks):
            prompts = self.heldout[k]
            chunks = [prompts[i : i + mb] for i in range(0, len(prompts), mb)]
            for c in range(self.rank, len(chunks), self.world):
                embeds = self._embeds(chunks[c])
                traj = self.rollout(embeds, len(chunks[c]), self.generator(1000, 0, k, c), STUDENT)
                # CPS's last step is deterministic (std 0 at sigma_next = 0): no KL there
                for t in range(cfg.num_steps - 1 if cfg.kernel == "cps" else cfg.num_steps):
                    x = traj.latents[t].float()
                    sigma, sigma_next = self._sig(t, x.shape[0])
                    v_s = self.velocity(x, sigma, embeds, STUDENT)
                    v_t = self.velocity(x, sigma, embeds, task.adapter)
                    loss = "ode" if cfg.kernel == "ode" else "opd_kl"
                    _, div = distill_step_loss(loss, cfg.kernel, x, traj.latents[t + 1], v_s, v_t, sigma, sigma_next,
                                               cfg.noise_level)
                    out[f"{name}/{task.name}"] += float(div.sum()) / len(prompts)
        out = self._reduce_stats(out)
        out[f"{name}/mean"] = sum(out.values()) / len(self.tasks)
        return out

    # ---- stage 1 -------------------------------------------------------------------------
    def _group_rollouts(self, phase: int, k: int, update: int, adapter: str) -> Tuple[List[Any], float]:
        """This process's share of ``batch_size`` prompts of task ``k``, each with ``group_size``
        rollouts of ``adapter`` (micro-batches of ``micro_batch_size``) and their rewards.

        Returns:
            (list of ``(prompts, embeds, [trajectory per micro-batch], rewards (group_size,))``, sum of
            the group mean rewards).
        """
        from scale.rollout import decode

        cfg = self.cfg
        task = self.tasks[k]
        idx = self.prompt_indices(phase, update, k, cfg.batch_size)
        mb = cfg.micro_batch_size
        groups, reward_sum = [], 0.0
        for p in range(self.rank, cfg.batch_size, self.world):
            prompts = [task.prompts[idx[p]]] * mb
            embeds = self._embeds(prompts)
            trajs, rewards = [], []
            for c in range(cfg.group_size // mb):
                traj = self.rollout(embeds, mb, self.generator(phase, update, k, p, c), adapter)
                images = decode(self.pipe, traj.latents[-1])
                rewards.append(torch.as_tensor(task.reward(images, prompts), dtype=torch.float32,
                                               device=self.device).reshape(-1))
                trajs.append(traj)
            r = torch.cat(rewards)
            groups.append((prompts, embeds, trajs, r))
            reward_sum += float(r.mean())
        return groups, reward_sum

    def grpo_update(self, phase: int, k: int, update: int) -> Dict[str, float]:
        """One GRPO update of task ``k``'s teacher: ``batch_size`` prompts x ``group_size`` rollouts,
        group-normalised rewards, ``ppo_epochs`` optimizer steps over the stored rollouts."""
        cfg = self.cfg
        task = self.tasks[k]
        mb = cfg.micro_batch_size
        groups, reward_sum = self._group_rollouts(phase, k, update, task.adapter)
        weight = mb / (cfg.batch_size * cfg.group_size * len(self.trained))
        stats = {"reward": reward_sum / cfg.batch_size}
        for _epoch in range(cfg.ppo_epochs):
            ep: Dict[str, float] = defaultdict(float)
            for _prompts, embeds, trajs, r in groups:
                adv = ((r - r.mean()) / (r.std(unbiased=False) + cfg.adv_eps)).split(mb)
                for traj, a in zip(trajs, adv):
                    for t in self.trained:
                        x, x_next = traj.latents[t].float(), traj.latents[t + 1].float()
                        sigma, sigma_next = self._sig(t, x.shape[0])
                        v_ref = None
                        if cfg.kl_beta > 0:
                            with torch.no_grad():
                                v_ref = self.velocity(x, sigma, embeds, None)
                        v_theta = self.velocity(x, sigma, embeds, task.adapter)
                        per, kl, ratio = grpo_step_loss(cfg.kernel, x, x_next, v_theta, v_ref, traj.log_probs[t], a, sigma,
                                                        sigma_next, cfg.noise_level, cfg.clip_range, cfg.kl_beta, cfg.kl_form)
                        (per.mean() * weight).backward()
                        ep["loss"] += float(per.detach().mean()) * weight
                        ep["kl_ref"] += float(kl.mean()) * weight * len(self.trained)
            ep = self._reduce_stats(ep)
            ep["grad_norm"] = self._optimizer_step(task.adapter)
        stats = self._reduce_stats(stats)
        stats.update(ep)
        return stats

    def crd_update(self, update: int) -> Dict[str, float]:
        r"""One CRD update of the student directly on the task rewards (baseline to the two-stage
        recipe), round-robin over tasks with accumulation over the cycle.

        Implicit reward over the trained steps
        :math:`\hat r = \beta\sum_{t}[\log\pi_\theta - \log\pi_{ref}](x_{t+1}|x_t)`
        (:func:`opd_ref.crd.implicit_reward_from_steps`), loss :func:`opd_ref.crd.crd_loss` per group.
        Memory stays per-step: the loss at step ``t`` is evaluated on
        :math:`\hat r` whose value is the full sum but whose gradient flows through step ``t`` only;
        the sum over ``t`` of these gradients is exactly the gradient of ``crd_loss``.
        """
        from opd_ref.crd import crd_loss, implicit_reward_from_steps

        cfg = self.cfg
        phase = len(self.phases) - 1
        mb = cfg.micro_batch_size
        weight = 1.0 / (len(self.tasks) * cfg.batch_size * cfg.group_size)
        stats: Dict[str, float] = defaultdict(float)
        for k, task in enumerate(self.tasks):
            groups, reward_sum = self._group_rollouts(phase, k, update, STUDENT)
            stats[f"reward/{task.name}"] += reward_sum / cfg.batch_size
            for _prompts, embeds, trajs, r in groups:
                # pass 1 (no grad): per-step log-ratios at theta_old and the reference means
                ref_means, log_ratio = [], []
                with torch.no_grad():
                    for traj in trajs:
                        rm, lr = [], []
                        for t in self.trained:
                            x, x_next = traj.latents[t].float(), traj.latents[t + 1].float()
                            sigma, sigma_next = self._sig(t, x.shape[0])
                            ref = kernel_step(cfg.kernel, x, self.velocity(x, sigma, embeds, None), sigma, sigma_next,
                                              cfg.noise_level)
                            rm.append(ref.mean)
                            lr.append(traj.log_probs[t] - gaussian_log_prob(x_next, ref))
                        ref_means.append(rm)
                        log_ratio.append(torch.stack(lr, dim=1))  # (mb, n_t)
                step_lr = torch.cat(log_ratio)  # (group_size, n_t)
                group_ids = torch.zeros(cfg.group_size, dtype=torch.long, device=self.device)
                with torch.no_grad():
                    full = crd_loss(implicit_reward_from_steps(step_lr, cfg.crd_beta), r, group_ids)
                stats["loss"] += float(full.sum()) * weight
                stats[f"implicit_reward_std/{task.name}"] += float(
                    implicit_reward_from_steps(step_lr, cfg.crd_beta).std()) / cfg.batch_size
                # pass 2: per trained step, gradient through that step's log-ratio only
                for c, traj in enumerate(trajs):
                    rows = slice(c * mb, (c + 1) * mb)
                    for j, t in enumerate(self.trained):
                        x, x_next = traj.latents[t].float(), traj.latents[t + 1].float()
                        sigma, sigma_next = self._sig(t, x.shape[0])
                        step = kernel_step(cfg.kernel, x, self.velocity(x, sigma, embeds, STUDENT), sigma, sigma_next,
                                           cfg.noise_level)
                        ref = type(step)(ref_means[c][j], step.std.detach())
                        lr_t = gaussian_log_prob(x_next, step) - gaussian_log_prob(x_next, ref)
                        step_lr_t = step_lr.clone()  # value: all steps at theta_old; grad: step t only
                        step_lr_t[rows, j] = step_lr[rows, j] + (lr_t - lr_t.detach())
                        loss = crd_loss(implicit_reward_from_steps(step_lr_t, cfg.crd_beta), r, group_ids)
                        (loss.sum() * weight).backward()
        stats = self._reduce_stats(stats)
        stats["grad_norm"] = self._optimizer_step(STUDENT)
        return stats

    # ---- outputs -------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path, adapter: Optional[str] = STUDENT) -> Path:
        """ODE samples of ``adapter`` for the first prompts of the tasks (fixed noise) as one PNG."""
        n = len(self.tasks)
        prompts = [self.tasks[i % n].prompts[(i // n) % len(self.tasks[i % n].prompts)]
                   for i in range(self.cfg.num_sample_prompts)]
        images = sample_images(self.pipe, self.cache, prompts, adapter, num_steps=self.cfg.num_steps,
                               resolution=self.cfg.resolution, guidance_scale=self.cfg.guidance_scale,
                               seed=derive_seed(self.cfg.seed, 2000), dtype=self.dtype)
        return save_grid(images, path)

    def _log(self, record: Dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _truncate_metrics(self, phase: int, step: int) -> None:
        """Drop the metrics records written after the checkpoint at ``(phase, step)`` (main process)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else None
            if rec is None:
                continue
            pos = (rec["phase"], rec["step"])
            # an eval at step 0 of a phase is logged after that phase's first checkpoint: it is redone
            if pos < (phase, step) or (pos == (phase, step) and (step > 0 or rec.get("event") != "eval")):
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))

    def save_checkpoint(self, phase: int, step: int) -> None:
        """Atomic checkpoint (main process) of every LoRA tensor, the optimizer, RNG states and position."""
        if self.is_main:
            state = {"phase": phase, "step": step, "lora": self.lora_state(),
                     "optimizer": (self.optimizers[self.current_adapter].state_dict()
                                   if self.current_adapter in self.optimizers else None),
                     "rng": capture_rng_state(), "world_size": self.world}
            save_checkpoint(self.run_dir / "checkpoint", state,
                            {"phase": phase, "phase_name": self._phase_name(phase), "step": step, "time": time.time()})
        self.acc.wait_for_everyone()

    def _phase_name(self, phase: int) -> str:
        if phase >= len(self.phases):
            return "done"
        kind, k = self.phases[phase]
        return f"grpo/{self.tasks[k].name}" if kind == "grpo" else "distill"

    def _phase_steps(self, phase: int) -> int:
        return self.cfg.stage1_steps if self.phases[phase][0] == "grpo" else self.cfg.distill_steps

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        if self.world > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # ---- main loop -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Run (or continue) every phase; checkpoint every ``checkpoint_every`` updates, at each phase
        end and on SIGTERM (then return with ``status="interrupted"``)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        phase, step = 0, 0
        opt_state = None
        if self.resume:
            ckpt = load_checkpoint(self.run_dir / "checkpoint")
            if ckpt["world_size"] != self.world:
                pass  # allowed: samples are a function of (seed, update, task, micro-batch), not of the world size
            phase, step = ckpt["phase"], ckpt["step"]
            self._load_lora_state(ckpt["lora"])
            restore_rng_state(ckpt["rng"])
            opt_state = ckpt["optimizer"]
            self._truncate_metrics(phase, step)
        last: Dict[str, float] = {}
        with StopSignal() as stop:
            while phase < len(self.phases):
                kind, k = self.phases[phase]
                adapter = STUDENT if kind == "distill" else self.tasks[k].adapter
                self.optimizers = {adapter: self._make_optimizer(adapter)}
                self.current_adapter = adapter
                if opt_state is not None:
                    self.optimizers[adapter].load_state_dict(opt_state)
                    opt_state = None
                total = self._phase_steps(phase)
                if kind == "distill" and step == 0 and self.heldout_prompts:
                    self._log({"phase": phase, "step": 0, "event": "eval", **self.heldout_divergence()})
                bar = tqdm(total=total, initial=step, desc=self._phase_name(phase), disable=not self.is_main, dynamic_ncols=True)
                while step < total:
                    t0 = time.perf_counter()
                    if kind == "distill":
                        stats = self.crd_update(step) if cfg.loss == "crd" else self.distill_update(step)
                    else:
                        stats = self.grpo_update(phase, k, step)
                    step += 1
                    stats["time_s"] = time.perf_counter() - t0
                    last = stats
                    self._log({"phase": phase, "phase_name": self._phase_name(phase), "step": step, "event": "update", **stats})
                    bar.update(1)
                    bar.set_postfix({key: f"{val:.4g}" for key, val in stats.items() if key in ("loss", "reward", "grad_norm")})
                    if kind == "distill" and cfg.eval_every and step % cfg.eval_every == 0 and step < total and self.heldout_prompts:
                        self._log({"phase": phase, "step": step, "event": "eval", **self.heldout_divergence()})
                    if kind == "distill" and cfg.sample_every and step % cfg.sample_every == 0 and self.is_main:
                        self.sample_grid(self.run_dir / "samples" / f"step_{step:06d}.png")
                    for cb in self.callbacks:
                        cb(self, self._phase_name(phase), step)
                    if self._stop_requested(stop):
                        self.save_checkpoint(phase, step)
                        bar.close()
                        return TrainResult(self.run_dir, "interrupted", phase, step, last)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                        self.save_checkpoint(phase, step)
                bar.close()
                # phase end
                if kind == "grpo":
                    self._save_adapter(self.tasks[k].adapter, self.run_dir / "teachers" / self.tasks[k].name)
                else:
                    if self.heldout_prompts:
                        self._log({"phase": phase, "step": step, "event": "eval", **self.heldout_divergence()})
                    if self.is_main:
                        self.sample_grid(self.run_dir / "samples" / "final.png")
                    self._save_adapter(STUDENT, self.run_dir / "student")
                phase, step = phase + 1, 0
                self.optimizers = {}
                self.current_adapter = None
                self.save_checkpoint(phase, step)
        return TrainResult(self.run_dir, "finished", phase, step, last)

    def _save_adapter(self, adapter: str, out_dir: Path) -> None:
        from scale.model import save_lora

        if self.is_main:
            save_lora(self.transformer, adapter, out_dir)
        self.acc.wait_for_everyone()


def train(config: ScaleConfig, *, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Validate, build and run a :class:`Trainer` (see there for ``kwargs``)."""
    return Trainer(config, resume=resume, **kwargs).run()
