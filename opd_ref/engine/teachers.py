r"""The DiffusionNFT update (D18): a teacher algorithm on the forward process.

GRPO-Guard needs no update of its own: it is the ``grpo_guard`` objective run by
:func:`~opd_ref.engine.updates.grpo_update`.

:func:`nft_update` — rollouts of the trained adapter with any kernel (the sampler is a black box; only
the clean outputs :math:`x_0` are kept), rewards mapped to :math:`r\in[0,1]` within each group
(:func:`opd_ref.crd.unit_interval_advantage`), then per trained grid level :math:`\sigma_n` a forward
noising :math:`x_{\sigma_n} = (1-\sigma_n)x_0 + \sigma_n\varepsilon` and the ``nft`` objective
(:func:`opd_ref.teachers.nft_loss`, optionally anchored to the reference), averaged over the levels:

.. math::
    L(\theta) = \sum_b w_b\,\frac1{B_b}\sum_{i\in b}\frac1{|\mathcal T|}\sum_{n\in\mathcal T}
        r_i\|v^+ - u_{i,n}\|^2 + (1-r_i)\|v^- - u_{i,n}\|^2 + \alpha\|v_\theta - v_{ref}\|^2

with :math:`v_{old}` the adapter's velocity at the start of the update (:math:`\theta_{old}`, stored
before the first optimiser step; DiffusionNFT's EMA old policy with decay 0).  Per level backward.

Reference: ``diffusionnft``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Optional, Sequence

import torch

from opd_ref.crd import unit_interval_advantage
from opd_ref.engine.objectives import StepInputs
from opd_ref.engine.policy import LOCAL, Collective, Policy, RolloutBatch
from opd_ref.engine.updates import (Reward, UpdateSpec, _check_loss, _rewards, _task_rollout, _velocity,
                                    optimizer_step)

__all__ = ["nft_update"]


def nft_update(
    policy: Policy,
    adapter: str,
    groups: Sequence[Sequence[RolloutBatch]],
    reward: Reward,
    spec: UpdateSpec,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    reward_scale: Optional[float] = None,
    reward_clip: float = 1.0,
    group_size: Optional[int] = None,
    collective: Collective = LOCAL,
) -> Dict[str, float]:
    r"""One DiffusionNFT update of ``adapter``: rollouts per group, rewards mapped to [0, 1] within
    groups, forward-noised samples at the trained levels, ``epochs`` optimiser steps.

    .. math::
        r_i = \tfrac12 + \tfrac12\,\mathrm{clip}\big((R_i - \bar R_g)/S, -k, k\big)/k,\qquad
        \ell_{i,n} = r_i\|v^+ - u\|^2 + (1-r_i)\|v^- - u\|^2\ [+\ \alpha\|v_\theta - v_{ref}\|^2]

    Args:
        policy: the :class:`~opd_ref.engine.policy.Policy`.
        adapter: the adapter trained (a teacher in stage 1).
        groups: per group (one prompt), its rollout batches; batch weights sum to 1 over all groups
            on all processes.
        reward: ``reward(final_states (B, *event), batch) -> (B,)``.
        spec: :class:`~opd_ref.engine.updates.UpdateSpec` with the ``nft`` objective
            (``nft_beta`` = :math:`\beta`, ``kl_beta`` = :math:`\alpha`); its kernel draws the rollouts,
            its trained steps name the noise levels :math:`\sigma_n`.
        optimizer: the optimiser of ``policy.trainable_parameters(adapter)``.
        epochs: optimiser steps over the same noised samples (:math:`v_{old}` fixed).
        reward_scale: :math:`S` (``None``: the std of this process's centred rewards).
        reward_clip: :math:`k > 0`.
        group_size: ``None``: each group's rewards are centred together; an int ``G``: in consecutive
            chunks of ``G`` within each group (a batch carrying several groups, e.g. stacked toy runs).
        collective: sums gradients/statistics over processes.

    Returns:
        statistics: ``reward``, ``r_mean``, ``loss`` (last epoch), ``anchor`` (if :math:`\alpha > 0`),
        ``grad_norm``.

    Reference: ``diffusionnft``.
    """
    if spec.objective.objective.family != "nft":
        raise ValueError(f"nft_update needs the 'nft' objective, got {spec.objective.name!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    levels = spec.kernel.check_grid(spec.sigmas)
    need_ref = spec.objective.kl_beta > 0
    # rollouts (black-box sampler), rewards, [0, 1] map within groups
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2):
        raise ValueError(f"group_size must be an int >= 2 or None, got {group_size!r}")
    finals, rewards, ids, flat = [], [], [], []
    base = 0
    for group in groups:
        total = sum(b.size for b in group)
        if group_size is not None and total % group_size:
            raise ValueError(f"a group of {total} rollouts is not a multiple of group_size {group_size}")
        gid = base + (torch.arange(total) // (group_size or total))
        ids.append(gid)
        base = int(gid.max()) + 1
        for batch in group:
            traj = _task_rollout(policy, adapter, batch, spec, None)
            finals.append(traj.final)
            rewards.append(_rewards(reward, traj, batch))
            flat.append(batch)
    R = torch.cat(rewards)
    r_all = unit_interval_advantage(R, torch.cat(ids).to(R.device), reward_scale, reward_clip)
    r_split = r_all.split([b.size for b in flat])
    # forward noising and old/reference velocities at theta_old (before any optimiser step)
    stored = []
    for batch, x0, r in zip(flat, finals, r_split):
        per_level = []
        for n in spec.trained_steps:
            sigma = levels[n]
            eps = torch.randn(x0.shape, generator=batch.generator, device=x0.device, dtype=x0.dtype)
            x = (1 - sigma) * x0 + sigma * eps
            v_old = _velocity(policy, adapter, x, sigma, batch.cond)
            v_ref = _velocity(policy, None, x, sigma, batch.cond) if need_ref else None
            per_level.append((n, sigma, x, eps - x0, v_old, v_ref))
        stored.append((batch, r.to(x0.dtype), per_level))
    stats: Dict[str, float] = {"reward": sum(float(r.mean()) * b.weight for r, b in zip(rewards, flat)),
                               "r_mean": sum(float(r.mean()) * b.weight for r, b in zip(r_split, flat))}
    n_t = len(spec.trained_steps)
    params = policy.trainable_parameters(adapter)
    for _ in range(epochs):
        ep: Dict[str, float] = defaultdict(float)
        for batch, r, per_level in stored:
            for n, sigma, x, u, v_old, v_ref in per_level:
                coef = spec.kernel.coefficients(levels[n], levels[n + 1])
                with policy.active(adapter):
                    v = policy.velocity(x, sigma, batch.cond)
                    out = spec.objective(StepInputs(coef, v, v_old, torch.zeros_like(x), u, r, v_ref))
                    _check_loss(out.loss, n, None)
                    (out.loss.mean() * (batch.weight / n_t)).backward()
                ep["loss"] += float(out.loss.detach().mean()) * batch.weight / n_t
                if "anchor" in out.stats:
                    ep["anchor"] += float(out.stats["anchor"].mean()) * batch.weight / n_t
        ep = collective.reduce(ep)
        ep["grad_norm"] = optimizer_step(params, optimizer, spec.max_grad_norm, collective)
    stats = collective.reduce(stats)
    stats.update(ep)
    return stats
