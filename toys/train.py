r"""The toys' trainer: a thin owner of the optimiser and the counters around :mod:`opd_ref.engine`.

Everything from the noise draw to ``optimizer.step()`` is the engine's (the very code that trains
SD3.5): :func:`opd_ref.engine.distill_update` for the OPD methods, :func:`opd_ref.engine.grpo_update`
(PPO epochs = ``inner_updates``, the closed-form per-step KL to the reference, Flow-GRPO's group
normaliser :class:`opd_ref.engine.AdvantageSpec`) for GRPO.  The toy side is the policy
(:class:`toys.policy.ToyPolicy`: student, exact teachers, exact reference) and the rewards.

Methods (``TrainConfig.method``, the engine's names, :data:`opd_ref.engine.METHODS`):

============  ==============================================================================
``opd_kl``    DiffusionOPD closed-form per-step KL on SDE rollouts (pathwise, D1/D2/D5)
``opd_ode``   DiffusionOPD direct transition matching on ODE rollouts (D4)
``ppo_opd``   PPO-OPD: PPO surrogate with dense advantage ``-KL_theta`` (D5)
``k1``        k1 REINFORCE with detached sampled log-ratio (``tm-opd``)
``vopd``      k1 minus its closed-form value (``vopd``)
``grpo``      Flow-GRPO: group-normalised terminal-reward advantages, clipped ratio, plus the
              closed-form per-step KL to the reference kernel (``flowgrpo``)
============  ==============================================================================

Teacher algorithms (:data:`TEACHER_METHODS`, D18, accepted by :class:`TrainConfig` but not swept by
the training experiment): ``grpo_guard`` (GRPO-Guard's normalised ratio in
:func:`opd_ref.engine.grpo_update`) and ``nft`` (:func:`opd_ref.engine.nft_update`, anchored to the
reference with weight ``kl_coef``).

Objective per task :math:`k` (D3: the path KL is the sum of per-step KLs along student rollouts)

.. math::
    L_k(\theta) = \mathbb E_{x_{0:N}\sim\pi_\theta}\Big[\sum_{n=0}^{N-1}\ell_n(\theta; x_n)\Big],\qquad
    L(\theta) = \frac1K\sum_k L_k(\theta)

and one optimiser step of multi-task training accumulates :math:`\nabla L_k / K` over the tasks in
round-robin order (D13), which is :math:`\nabla L`.  Rollouts start from :math:`\mathcal N(0, I)` at
:math:`\sigma = 1` on the uniform grid with the SDE kernel (``sigma_one="flowgrpo"``), or the ODE
for ``opd_ode``.

Reference: ``diffusionopd``, ``flowgrpo``, ``tm-opd``, ``vopd``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from opd_ref.engine import (
    AdvantageSpec,
    DistillTask,
    KernelSpec,
    ObjectiveSpec,
    RolloutBatch,
    UpdateSpec,
    distill_update,
    grpo_update,
    nft_update,
)
from opd_ref.engine.grid import sigma_grid
from toys.policy import STUDENT, ToyPolicy, teacher_name

__all__ = [
    "METHODS",
    "ABLATION_METHODS",
    "TRAIN_METHODS",
    "TEACHER_METHODS",
    "TrainConfig",
    "Trainer",
    "task_schedule",
]

#: the engine's method names that the toys train with (CRD has its own experiment)
METHODS = ("opd_kl", "opd_ode", "ppo_opd", "k1", "vopd", "grpo")
#: the distillation-objective ablation (D16; ``toys.experiments.objective_ablation``), also accepted
ABLATION_METHODS = ("fwd_kl", "dmd", "bregman_kl", "bregman_reverse_kl", "bregman_pearson_chi2",
                    "bregman_jensen_shannon")
#: reward-trained teacher algorithms besides ``grpo`` (D18)
TEACHER_METHODS = ("grpo_guard", "nft")
REWARD_METHODS = ("grpo",) + TEACHER_METHODS
TRAIN_METHODS = METHODS + ABLATION_METHODS + TEACHER_METHODS
SCHEDULES = ("round_robin", "cascade")

Reward = Callable[[Tensor], Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        method: one of :data:`METHODS` or :data:`ABLATION_METHODS`.
        n_steps: sampler steps ``N`` on the uniform sigma grid 1 -> 0.
        noise_level: SDE noise level ``a`` (ignored by ``opd_ode``).
        batch_size: rollouts per task per update.
        lr: Adam learning rate.
        clip_range: PPO/GRPO clip epsilon.
        kl_coef: GRPO weight of the per-step KL to the reference (``None``: the task's beta).
        group_size: GRPO group size for advantage normalisation (divides ``batch_size``; Flow-GRPO's
            normaliser, population std + 1e-4, :class:`opd_ref.engine.AdvantageSpec`).
        inner_updates: GRPO optimiser steps (PPO epochs) per batch of rollouts (ratio != 1 after the first).
        nft_beta: DiffusionNFT's :math:`\beta` (``nft``).
        nft_reward_scale: NFT's reward scale :math:`S` in the [0, 1] map (``None``: the batch std).
        nft_reward_clip: NFT's clip level :math:`k` of the [0, 1] map.
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
    nft_beta: float = 1.0
    nft_reward_scale: Optional[float] = None
    nft_reward_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise ValueError(f"method must be one of {TRAIN_METHODS}, got {self.method!r}")
        for name in ("n_steps", "batch_size", "group_size", "inner_updates"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not self.noise_level > 0 and self.method != "opd_ode":
            raise ValueError(f"noise_level must be > 0 for method {self.method!r}, got {self.noise_level!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.method in REWARD_METHODS and self.batch_size % self.group_size:
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


class Trainer:
    """Owns the optimiser and the counters; each update is one engine update on fresh on-policy rollouts.

    Args:
        student: the student (single-run or stacked, see :class:`toys.policy.ToyPolicy`).
        teachers: per task, its teacher (exact tilted flow, per-run list, RL-trained model).
        cfg: :class:`TrainConfig`.
        reference: :math:`p_{ref}` (GRPO's KL anchor; also the policy's adapter ``None``).
        rewards: per task, ``r(x (B, d)) -> (B,)`` or a list of one reward per stacked run (GRPO).
        betas: per task reward temperatures (GRPO's default ``kl_coef``; equal over the tasks of one update).
        seed: seed of the rollout generator.

    Counters (per run): ``forward_passes`` (student velocity evaluations, samples x steps, rollout
    and loss), ``teacher_passes``, ``reference_passes``, ``seconds`` (wall clock inside
    :meth:`update`, for all stacked runs together), ``updates`` (optimiser steps), ``task_updates``
    (per-task count of updates that included the task).

    Reference: ``diffusionopd`` (two-stage recipe, round-robin multi-task OPD), ``flowgrpo``.
    """

    def __init__(self, student: nn.Module, teachers: Sequence, cfg: TrainConfig, *,
                 reference=None, rewards: Optional[Sequence[Union[Reward, Sequence[Reward]]]] = None,
                 betas: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        if cfg.method in REWARD_METHODS:
            if reference is None or rewards is None:
                raise ValueError(f"method {cfg.method!r} needs reference and rewards")
            self.n_tasks = len(rewards)
        elif not teachers:
            raise ValueError(f"method {cfg.method!r} needs teachers")
        else:
            self.n_tasks = len(teachers)
        self.policy = ToyPolicy(student, [] if cfg.method in REWARD_METHODS else teachers, reference)
        self.student, self.n_runs = student, self.policy.n_runs
        self.rewards = list(rewards or [])
        self.betas = list(betas or [1.0] * self.n_tasks)
        self.sigmas = sigma_grid(cfg.n_steps, dtype=torch.float64)
        kernel = KernelSpec("ode") if cfg.method == "opd_ode" else KernelSpec("sde", cfg.noise_level, "flowgrpo")
        self._kernel = kernel
        self._specs: Dict[float, UpdateSpec] = {}
        self.opt = torch.optim.Adam(self.policy.trainable_parameters(STUDENT), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.advantages = AdvantageSpec(group_size=cfg.group_size)
        self.seconds = 0.0
        self.updates = 0
        self.task_updates = [0] * self.n_tasks
        self.last_stats: Dict[str, float] = {}

    def spec(self, tasks: Sequence[int]) -> UpdateSpec:
        """The engine :class:`~opd_ref.engine.UpdateSpec` of an update over ``tasks``."""
        cfg = self.cfg
        kl = 0.0
        if cfg.method in REWARD_METHODS:
            kls = {self.betas[k] if cfg.kl_coef is None else cfg.kl_coef for k in tasks}
            if len(kls) != 1:
                raise ValueError(f"GRPO tasks of one update must share the KL coefficient, got {sorted(kls)}")
            kl = float(kls.pop())
        if kl not in self._specs:
            objective = ObjectiveSpec(cfg.method, clip_range=cfg.clip_range, kl_beta=kl, nft_beta=cfg.nft_beta)
            self._specs[kl] = UpdateSpec(self.sigmas, self._kernel, objective)
        return self._specs[kl]

    def _reward(self, x: Tensor, batch: RolloutBatch) -> Tensor:
        r = self.rewards[batch.cond]
        if callable(r):
            return r(x)
        xs = x.reshape(self.n_runs, -1, x.shape[-1])
        return torch.cat([r[i](xs[i]) for i in range(self.n_runs)])

    def batch(self, task: int, weight: float) -> RolloutBatch:
        """The rollout batch of ``task`` for all stacked runs (``R * batch_size`` samples, weight ``R * weight``)."""
        return RolloutBatch(task, self.n_runs * self.cfg.batch_size, self.gen, self.n_runs * weight)

    def update(self, tasks: Sequence[int]) -> Dict[str, float]:
        """One engine update on the listed tasks (round-robin accumulation, one optimiser step; GRPO:
        ``inner_updates`` steps on the same rollouts). Returns the engine's statistics."""
        t0 = time.perf_counter()
        spec = self.spec(tasks)
        if self.cfg.method == "nft":
            groups = [[self.batch(k, 1.0 / len(tasks))] for k in tasks]
            stats = nft_update(self.policy, STUDENT, groups, self._reward, spec, self.opt,
                               epochs=self.cfg.inner_updates, reward_scale=self.cfg.nft_reward_scale,
                               reward_clip=self.cfg.nft_reward_clip, group_size=self.cfg.group_size)
            self.updates += self.cfg.inner_updates
        elif self.cfg.method in REWARD_METHODS:
            groups = [[self.batch(k, 1.0 / len(tasks))] for k in tasks]
            stats = grpo_update(self.policy, STUDENT, groups, self._reward, spec, self.opt,
                                epochs=self.cfg.inner_updates, advantages=self.advantages)
            self.updates += self.cfg.inner_updates
        else:
            batches = [DistillTask(teacher_name(k), [self.batch(k, 1.0)], str(k)) for k in tasks]
            stats = distill_update(self.policy, STUDENT, batches, spec, self.opt)
            self.updates += 1
        for k in tasks:
            self.task_updates[k] += 1
        self.seconds += time.perf_counter() - t0
        self.last_stats = stats
        return stats

    @property
    def forward_passes(self) -> int:
        """Student velocity evaluations per run (samples x steps)."""
        return self.policy.forward_passes[STUDENT]

    @property
    def teacher_passes(self) -> int:
        """Teacher velocity evaluations per run."""
        return sum(v for k, v in self.policy.forward_passes.items() if k is not None and k.startswith("teacher_"))

    @property
    def reference_passes(self) -> int:
        """Reference (p_ref) velocity evaluations per run."""
        return self.policy.forward_passes[None]

    def counters(self) -> dict:
        """``forward_passes``, ``teacher_passes``, ``seconds`` and ``updates`` so far (plain dict)."""
        return {"forward_passes": self.forward_passes, "teacher_passes": self.teacher_passes,
                "seconds": self.seconds, "updates": self.updates}
