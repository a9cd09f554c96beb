r"""Trainers for the toy experiments: every on-policy distillation method and the RL baselines.

All per-step losses come from :mod:`opd_ref` (``opd_kl_loss``, ``ode_matching_loss``,
``ppo_surrogate_loss``, the D5 estimator surrogates); this module only owns state (optimiser,
counters) and the rollouts' bookkeeping.

Methods (``TrainConfig.method``):

============  ==============================================================================
``opd_kl``    DiffusionOPD closed-form per-step KL on SDE rollouts (pathwise, D1/D2/D5)
``opd_ode``   DiffusionOPD direct transition matching on ODE rollouts (D4)
``ppo``       PPO-OPD: PPO surrogate with dense advantage ``-KL_theta`` (D5)
``k1``        k1 REINFORCE with detached sampled log-ratio (``tm-opd``)
``vopd``      k1 minus its closed-form value (``vopd``)
``grpo``      Flow-GRPO: group-normalised terminal-reward advantages, clipped ratio, plus the
              closed-form per-step KL to the reference kernel (``flowgrpo``)
============  ==============================================================================

Objective per task :math:`k` (D3: the path KL is the sum of per-step KLs along student rollouts)

.. math::
    L_k(\theta) = \mathbb E_{x_{0:N}\sim\pi_\theta}\Big[\sum_{n=0}^{N-1}\ell_n(\theta; x_n)\Big],\qquad
    L(\theta) = \frac1K\sum_k L_k(\theta)

and one optimiser step of multi-task training accumulates :math:`\nabla L_k / K` over the tasks
in round-robin order (D13), which is :math:`\nabla L`.

Reference: ``diffusionopd``, ``flowgrpo``, ``tm-opd``, ``vopd``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from opd_ref import gaussian_log_prob, ode_matching_loss, opd_kl_loss, ppo_surrogate_loss, ode_step, sde_step
from opd_ref.estimators import estimator_surrogate
from toys.samplers import sigma_grid

__all__ = [
    "METHODS",
    "TrainConfig",
    "Trajectory",
    "Trainer",
    "sigma_grid",
    "task_schedule",
    "group_advantages",
]

METHODS = ("opd_kl", "opd_ode", "ppo", "k1", "vopd", "grpo")
SCHEDULES = ("round_robin", "cascade")

Velocity = Callable[[Tensor, object], Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        method: one of :data:`METHODS`.
        n_steps: sampler steps ``N`` on the uniform sigma grid 1 -> 0.
        noise_level: SDE noise level ``a`` (ignored by ``opd_ode``).
        batch_size: rollouts per task per update.
        lr: Adam learning rate.
        clip_range: PPO/GRPO clip epsilon.
        kl_coef: GRPO weight of the per-step KL to the reference (``None``: the task's beta).
        group_size: GRPO group size for advantage normalisation (divides ``batch_size``).
        inner_updates: GRPO optimiser steps per batch of rollouts (ratio != 1 after the first).
    """

    method: str = "opd_kl"
    n_steps: int = 10
    noise_level: float = 0.7
    batch_size: int = 256
    lr: float = 1e-2
    clip_range: float = 0.2
    kl_coef: Optional[float] = None
    group_size: int = 16
    inner_updates: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("n_steps", "batch_size", "group_size", "inner_updates"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not self.noise_level > 0 and self.method != "opd_ode":
            raise ValueError(f"noise_level must be > 0 for method {self.method!r}, got {self.noise_level!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.method == "grpo" and self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size})")

    def to_dict(self) -> dict:
        return asdict(self)


def task_schedule(kind: str, n_tasks: int, n_updates: int) -> List[List[int]]:
    r"""Tasks visited by each optimiser update.

    ``round_robin``: every update accumulates all tasks ``[0, ..., K-1]`` (D13), ``n_updates`` updates.
    ``cascade``: ``K`` stages of ``n_updates`` single-task updates, task ``k`` in stage ``k`` (the same
    number of rollouts as ``round_robin``).

    .. math:: \text{round robin: } (0, \dots, K-1)^{n},\qquad \text{cascade: } 0^{n}\,1^{n}\cdots(K-1)^{n}

    Returns:
        list of per-update task lists.

    Reference: ``diffusionopd`` (round-robin multi-task OPD, cascade RL baseline).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    if n_tasks < 1 or n_updates < 1:
        raise ValueError(f"n_tasks and n_updates must be >= 1, got {n_tasks}, {n_updates}")
    if kind == "round_robin":
        return [list(range(n_tasks)) for _ in range(n_updates)]
    return [[k] for k in range(n_tasks) for _ in range(n_updates)]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    r"""GRPO advantages: rewards standardised within consecutive groups of ``group_size``.

    .. math:: A_i = \frac{r_i - \mathrm{mean}_{g(i)}(r)}{\mathrm{std}_{g(i)}(r) + \epsilon}

    Args:
        rewards: ``(B,)`` with ``B`` a multiple of ``group_size``.

    Returns:
        ``(B,)``.

    Reference: ``flowgrpo``.
    """
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (B,) with B a multiple of {group_size}, got {tuple(rewards.shape)}")
    g = rewards.reshape(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


@dataclass
class Trajectory:
    """A batch of student rollouts (no graph): states ``xs[n]`` at ``sigmas[n]``, ``n = 0..N``."""

    xs: List[Tensor]
    sigmas: Tensor
    old_log_probs: List[Tensor] = field(default_factory=list)
    rewards: Optional[Tensor] = None


class Trainer:
    """Owns the optimiser and the counters; each update runs fresh on-policy rollouts.

    Args:
        student: module with ``velocity(x, sigma, task)`` (see :mod:`toys.students`).
        teachers: per-task teacher velocities ``v_T(x, sigma)`` (exact tilted flows or RL-trained).
        cfg: :class:`TrainConfig`.
        reference: reference velocity ``v_ref(x, sigma)`` (GRPO's KL anchor).
        rewards: per-task reward callables ``r(x) -> (B,)`` (GRPO).
        betas: per-task reward temperatures (GRPO's default ``kl_coef``).
        seed: seed of the rollout generator.

    Counters: ``forward_passes`` (student velocity evaluations, one per sample per step),
    ``teacher_passes``, ``seconds`` (wall clock inside :meth:`update`), ``updates``,
    ``task_updates`` (per-task count of updates that included the task).

    Reference: ``diffusionopd`` (two-stage recipe, round-robin multi-task OPD), ``flowgrpo``.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[Velocity], cfg: TrainConfig, *,
                 reference: Optional[Velocity] = None, rewards: Optional[Sequence[Callable]] = None,
                 betas: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.student, self.cfg = student, cfg
        self.teachers = list(teachers)
        self.n_tasks = len(self.teachers) if self.teachers else len(rewards or [])
        if cfg.method == "grpo":
            if reference is None or rewards is None:
                raise ValueError("method 'grpo' needs reference and rewards")
            self.n_tasks = len(rewards)
        elif not self.teachers:
            raise ValueError(f"method {cfg.method!r} needs teachers")
        self.reference, self.rewards = reference, list(rewards or [])
        self.betas = list(betas or [1.0] * self.n_tasks)
        params = [p for p in student.parameters() if p.requires_grad]
        self.dtype = params[0].dtype
        self.opt = torch.optim.Adam(params, lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.sigmas = sigma_grid(cfg.n_steps, dtype=self.dtype)
        self.forward_passes = 0
        self.teacher_passes = 0
        self.seconds = 0.0
        self.updates = 0
        self.task_updates = [0] * self.n_tasks
        self.dim = int(getattr(student, "dim", 2))

    # ----------------------------------------------------------------- rollouts
    def _kernel(self, x: Tensor, v: Tensor, n: int):
        s, sn = self.sigmas[n], self.sigmas[n + 1]
        return sde_step(x, v, float(s), float(sn), self.cfg.noise_level, sigma_one="flowgrpo")

    def rollout(self, task: int, batch_size: Optional[int] = None) -> Trajectory:
        """Sample student rollouts from ``N(0, I)`` at sigma = 1 (SDE, or ODE for ``opd_ode``)."""
        B = batch_size or self.cfg.batch_size
        x = torch.randn(B, self.dim, generator=self.gen, dtype=self.dtype)
        xs, old_lp = [x], []
        with torch.no_grad():
            for n in range(self.cfg.n_steps):
                v = self.student.velocity(x, float(self.sigmas[n]), task)
                self.forward_passes += B
                if self.cfg.method == "opd_ode":
                    x = ode_step(x, v, float(self.sigmas[n]), float(self.sigmas[n + 1]))
                else:
                    step = self._kernel(x, v, n)
                    x = step.sample(self.gen)
                    if self.cfg.method == "grpo":
                        old_lp.append(gaussian_log_prob(x, step))
                xs.append(x)
        traj = Trajectory(xs, self.sigmas, old_lp)
        if self.cfg.method == "grpo":
            traj.rewards = self.rewards[task](xs[-1])
        return traj

    # ------------------------------------------------------------------- losses
    def task_loss(self, task: int, traj: Trajectory) -> Tensor:
        r"""Scalar :math:`\hat L_k`: batch mean of the sum over steps of the method's per-step loss."""
        cfg, total = self.cfg, 0.0
        if cfg.method == "grpo":
            adv = group_advantages(traj.rewards, cfg.group_size)
            kl_coef = self.betas[task] if cfg.kl_coef is None else cfg.kl_coef
        for n in range(cfg.n_steps):
            x, x_next = traj.xs[n], traj.xs[n + 1]
            s, sn = float(self.sigmas[n]), float(self.sigmas[n + 1])
            v = self.student.velocity(x, s, task)
            self.forward_passes += x.shape[0]
            if cfg.method == "grpo":
                step = self._kernel(x, v, n)
                with torch.no_grad():
                    ref_mean = self._kernel(x, self.reference(x, s), n).mean
                lp = gaussian_log_prob(x_next, step)
                loss_n = ppo_surrogate_loss(lp, traj.old_log_probs[n], adv, cfg.clip_range)
                loss_n = loss_n + kl_coef * opd_kl_loss(step, ref_mean)
            else:
                with torch.no_grad():
                    v_t = self.teachers[task](x, s)
                self.teacher_passes += x.shape[0]
                if cfg.method == "opd_ode":
                    loss_n = ode_matching_loss(ode_step(x, v, s, sn), ode_step(x, v_t, s, sn))
                else:
                    step = self._kernel(x, v, n)
                    t_mean = self._kernel(x, v_t, n).mean
                    name = "pathwise" if cfg.method == "opd_kl" else cfg.method
                    loss_n = estimator_surrogate(name, step, t_mean, x_next)
            total = total + loss_n.mean()
        return total

    # ------------------------------------------------------------------ updates
    def accumulate(self, tasks: Sequence[int], trajs: Optional[Dict[int, Trajectory]] = None) -> Dict[int, float]:
        r"""Round-robin gradient accumulation (D13): for each task in order, backpropagate
        :math:`\hat L_k / K` into ``.grad`` (no optimiser step). Returns the per-task losses."""
        losses = {}
        for k in tasks:
            traj = trajs[k] if trajs is not None else self.rollout(k)
            loss = self.task_loss(k, traj) / len(tasks)
            loss.backward()
            losses[k] = float(loss.detach()) * len(tasks)
        return losses

    def update(self, tasks: Sequence[int]) -> Dict[int, float]:
        """One optimiser step on the listed tasks (round-robin accumulation); GRPO takes
        ``inner_updates`` steps on the same rollouts. Returns per-task losses."""
        t0 = time.perf_counter()
        trajs = {k: self.rollout(k) for k in tasks}
        reps = self.cfg.inner_updates if self.cfg.method == "grpo" else 1
        for _ in range(reps):
            self.opt.zero_grad(set_to_none=True)
            losses = self.accumulate(tasks, trajs)
            self.opt.step()
            self.updates += 1
        for k in tasks:
            self.task_updates[k] += 1
        self.seconds += time.perf_counter() - t0
        return losses

    def counters(self) -> dict:
        """``forward_passes``, ``teacher_passes``, ``seconds`` and ``updates`` so far (plain dict)."""
        return {"forward_passes": self.forward_passes, "teacher_passes": self.teacher_passes,
                "seconds": self.seconds, "updates": self.updates}
