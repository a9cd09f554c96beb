r"""What one update of ``opd-scale train`` hands the engine: rollout batches, tasks, groups, rewards.

Every batch's noise comes from a generator seeded by ``(seed, phase, update, task, micro-batch)`` and
every prompt draw from ``(seed, 7, phase, update, task)``, so a run resumes exactly and splits over
processes without changing any sample: process ``r`` of ``W`` takes micro-batches (stage 2) or prompt
groups (stage 1, CRD) ``r, r + W, ...``.  Batch weights are each batch's share of its task's sample
average over all processes (:class:`~opd_ref.engine.RolloutBatch`):

.. math::
    w_b = \frac{B_{micro}}{B}\ \text{(stage 2)},\qquad w_b = \frac{B_{micro}}{B\,G}\ \text{(stage 1, CRD)}

with :math:`B` prompts per task and update and :math:`G` rollouts per prompt group.

Reference: ``diffusionopd`` (round robin over tasks), ``flowgrpo`` (prompt groups).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor

from opd_ref.engine import DistillTask, RolloutBatch
from scale.data import PromptBatch
from scale.pipeline import ModelInputs, decode, model_inputs
from scale.setup import Setup, derive_seed

__all__ = ["ImageReward", "condition", "generator", "prompt_indices", "distill_tasks", "reward_groups",
           "heldout_tasks"]


class ImageReward:
    """The engine's ``reward(final_states, batch)``: decode the latents with the VAE, then the task's
    reward ``reward(images, prompts, metadata)`` on the batch's prompts (``batch.meta``, a
    :class:`~scale.data.PromptBatch` carrying their metadata).

    Args:
        pipe: the pipeline (its VAE decodes).
        reward: ``reward(images (B, 3, H, W) in [0, 1], prompts[, metadata]) -> (B,)`` (:mod:`scale.rewards`;
            a callable that is not a ``CheckedReward`` is wrapped in one).
    """

    def __init__(self, pipe, reward: Callable):
        from scale.rewards import CheckedReward

        self.pipe = pipe
        self.reward = reward if isinstance(reward, CheckedReward) else CheckedReward(reward, repr(reward))

    def __call__(self, final: Tensor, batch: RolloutBatch) -> Tensor:
        return self.reward(decode(self.pipe, final), list(batch.meta), getattr(batch.meta, "metadata", None))


def condition(setup: Setup, prompts: Sequence[str]) -> ModelInputs:
    """The transformer inputs of ``prompts`` (cached embeddings, CFG rows, model dtype), built once per batch."""
    return model_inputs(setup.cache.encode(list(prompts)), setup.cfg.guidance_scale, setup.policy.dtype,
                        setup.device, with_uncond=setup.policy.needs_uncond)


def _prompt_batch(prompts: Sequence[str], indices: Sequence[int]) -> PromptBatch:
    """The prompts at ``indices`` with their metadata (``{}`` each for a plain list)."""
    meta = getattr(prompts, "metadata", None)
    return PromptBatch([prompts[i] for i in indices], None if meta is None else [meta[i] for i in indices])


def generator(setup: Setup, *parts: int) -> torch.Generator:
    """A fresh generator on the model's device seeded by ``(seed, *parts)``."""
    return torch.Generator(device=setup.device).manual_seed(derive_seed(setup.cfg.seed, *parts))


def prompt_indices(setup: Setup, phase: int, update: int, task: int, count: int) -> List[int]:
    """``count`` prompt indices (with replacement) of task ``task`` for ``update``; the same on every process."""
    gen = torch.Generator().manual_seed(derive_seed(setup.cfg.seed, 7, phase, update, task))
    return torch.randint(len(setup.tasks[task].prompts), (count,), generator=gen).tolist()


def distill_tasks(setup: Setup, phase: int, update: int) -> List[DistillTask]:
    """Stage 2: per task, this process's micro-batches of ``batch_size`` prompts, one rollout each."""
    cfg, mb = setup.cfg, setup.cfg.micro_batch_size
    out = []
    for k, task in enumerate(setup.tasks):
        idx = prompt_indices(setup, phase, update, k, cfg.batch_size)
        batches = []
        for m in range(setup.rank, cfg.batch_size // mb, setup.world):
            prompts = _prompt_batch(task.prompts, idx[m * mb : (m + 1) * mb])
            batches.append(RolloutBatch(condition(setup, prompts), mb, generator(setup, phase, update, k, m),
                                        mb / cfg.batch_size, prompts))
        out.append(DistillTask(task.adapter, batches, task.name))
    return out


def reward_groups(setup: Setup, phase: int, k: int, update: int) -> List[List[RolloutBatch]]:
    """Stage 1 and CRD: this process's prompt groups of task ``k``, ``group_size`` rollouts of one prompt
    each, in micro-batches."""
    cfg, mb = setup.cfg, setup.cfg.micro_batch_size
    task = setup.tasks[k]
    idx = prompt_indices(setup, phase, update, k, cfg.batch_size)
    groups = []
    for p in range(setup.rank, cfg.batch_size, setup.world):
        prompts = _prompt_batch(task.prompts, [idx[p]] * mb)
        cond = condition(setup, prompts)
        groups.append([RolloutBatch(cond, mb, generator(setup, phase, update, k, p, c),
                                    mb / (cfg.batch_size * cfg.group_size), prompts)
                       for c in range(cfg.group_size // mb)])
    return groups


def heldout_tasks(setup: Setup) -> List[DistillTask]:
    """Per task, this process's chunks of the held-out prompts with fixed noise (common random
    numbers: values at different updates are directly comparable)."""
    mb = setup.cfg.micro_batch_size
    out = []
    for k, (task, prompts) in enumerate(zip(setup.tasks, setup.heldout)):
        chunks = [_prompt_batch(prompts, range(i, min(i + mb, len(prompts)))) for i in range(0, len(prompts), mb)]
        batches = [RolloutBatch(condition(setup, chunks[c]), len(chunks[c]), generator(setup, 1000, 0, k, c),
                                len(chunks[c]) / len(prompts), chunks[c])
                   for c in range(setup.rank, len(chunks), setup.world)]
        out.append(DistillTask(task.adapter, batches, task.name))
    return out
