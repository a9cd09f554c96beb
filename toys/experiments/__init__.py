r"""The toy experiments run by ``opd-toys reproduce`` and the exact setting they share.

Each experiment module ``toys.experiments.<name>`` exposes
``run(out_dir, quick=True, seeds=(0,)) -> {"checks", "figures", "tables", "metrics"}``
(see :mod:`toys.reproduce`).

The setting (docs/toys.md, docs/reproduce.md): :math:`p_{ref}` an 8-mode 2D Gaussian mixture on a ring with unequal
weights and anisotropic covariances; ``K = 3`` tasks with concave rewards :math:`r_k` and temperatures
:math:`\beta_k`; the exact teachers are the flows of :math:`p^*_k = p_{ref}e^{r_k/\beta_k}/Z_k` (D7).

The continuous experiments share it; ``dimo`` (D19) uses its own exact discrete toy
(:mod:`toys.mdm`).

Reference: ``diffusionopd`` (task teachers), ``rtdmd`` (reward-tilted targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from toys.gmm import GaussianMixture
from toys.rewards import LinearReward, QuadraticReward

__all__ = ["Setting", "default_setting", "tilted_setting", "TASK_NAMES"]

TASK_NAMES = ("right (linear)", "upper-left (quadratic)", "down (linear)")


@dataclass
class Setting:
    """p_ref, the task rewards and temperatures, the exact tilted targets and their log Z."""

    p_ref: GaussianMixture
    rewards: list
    betas: List[float]
    targets: List[GaussianMixture]
    log_Z: List[float]
    half_width: float = 5.0

    @property
    def n_tasks(self) -> int:
        return len(self.rewards)

    @property
    def center(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)


def default_setting() -> Setting:
    r"""The shared toy: 8 modes on a ring of radius 2.5, weights and covariances that differ per
    mode; three tasks tilting it to clearly different targets."""
    dt = torch.float64
    K = 8
    ang = torch.arange(K, dtype=dt) * (2 * math.pi / K)
    means = 2.5 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    covs = []
    for j in range(K):
        rot = torch.tensor([[math.cos(ang[j]), -math.sin(ang[j])], [math.sin(ang[j]), math.cos(ang[j])]], dtype=dt)
        lam = torch.diag(torch.tensor([0.12 + 0.04 * (j % 3), 0.04 + 0.02 * (j % 2)], dtype=dt))
        covs.append(rot @ lam @ rot.T)
    weights = torch.tensor([1.0, 2.0, 1.5, 1.0, 2.5, 1.0, 1.5, 2.0], dtype=dt)
    p_ref = GaussianMixture(weights / weights.sum(), means, torch.stack(covs))
    rewards = [
        LinearReward(torch.tensor([1.2, 0.0], dtype=dt)),
        QuadraticReward(torch.tensor([-1.8, 1.8], dtype=dt), 0.6 * torch.eye(2, dtype=dt)),
        LinearReward(torch.tensor([0.3, -1.2], dtype=dt)),
    ]
    return tilted_setting(p_ref, rewards, [0.5, 0.5, 0.5])


def tilted_setting(p_ref: GaussianMixture, rewards: list, betas: List[float]) -> Setting:
    r"""The :class:`Setting` of ``p_ref`` and its tasks: exact targets :math:`p^*_k = p_{ref}e^{r_k/\beta_k}/Z_k`
    and :math:`\log Z_k` (D7)."""
    targets, log_Z = [], []
    for r, b in zip(rewards, betas):
        tgt, lz = p_ref.tilt(r, b)
        targets.append(tgt)
        log_Z.append(float(lz))
    return Setting(p_ref, rewards, betas, targets, log_Z)
