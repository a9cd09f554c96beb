r"""Metrics of the toy experiments: exact KL, energy distance, mass per mode, forgetting.

Notation map: :math:`p_\theta` student density, :math:`p^*_k` tilted target of task ``k``.
Reference: ``diffusionopd`` (evaluation), Székely & Rizzo (energy distance).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["grid_kl", "energy_distance", "mode_masses", "mass_error", "forgetting", "quadrature_grid"]


def quadrature_grid(center: Tensor, half_width: float, n: int = 241) -> Tuple[Tensor, float]:
    """Tensor-product midpoint grid on a square: points ``(n*n, 2)`` and the cell area."""
    ticks = [torch.linspace(float(c) - half_width, float(c) + half_width, n, dtype=torch.float64) for c in center]
    gx, gy = torch.meshgrid(ticks[0], ticks[1], indexing="ij")
    h = 2 * half_width / (n - 1)
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1), h * h


def grid_kl(log_p: Callable[[Tensor], Tensor], log_q: Callable[[Tensor], Tensor], *,
            center: Tensor, half_width: float, n: int = 241) -> Tuple[float, float]:
    r"""Reverse KL between two 2D densities known in closed form, by quadrature on a fine grid.

    .. math:: \mathrm{KL}(p\|q) = \int p(x)\,(\log p(x) - \log q(x))\,dx \approx
              \sum_i h^2\,p(x_i)\,(\log p(x_i) - \log q(x_i))

    Deterministic (no Monte Carlo); the returned mass :math:`\sum_i h^2 p(x_i)` certifies that the
    square covers ``p`` (it should be 1 to ~1e-6).

    Args:
        log_p, log_q: ``(M, 2) -> (M,)`` exact log-densities (e.g. ``GaussianMixture.log_prob``).
        center: ``(2,)`` grid centre; half_width: half side of the square; n: points per axis.

    Returns:
        ``(kl, mass)`` floats.

    Reference: ``diffusionopd`` (per-task reverse KL to the target).
    """
    if n < 3 or not half_width > 0:
        raise ValueError(f"n must be >= 3 and half_width > 0, got {n}, {half_width}")
    pts, area = quadrature_grid(center, half_width, n)
    with torch.no_grad():
        lp, lq = log_p(pts).double(), log_q(pts).double()
    p = torch.exp(lp)
    integrand = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return float(area * integrand.sum()), float(area * p.sum())


def energy_distance(x: Tensor, y: Tensor) -> float:
    r"""Energy distance :math:`2\mathbb E\|X-Y\| - \mathbb E\|X-X'\| - \mathbb E\|Y-Y'\|` (V-statistic).

    Args:
        x: ``(n, d)``; y: ``(m, d)``.

    Returns:
        float (0 iff the samples' empirical laws coincide).

    Reference: Székely & Rizzo (2013).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (n, d) and (m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_masses(x: Tensor, target) -> Tensor:
    r"""Mass per mode of samples ``x``, measured with the target mixture's responsibilities.

    .. math:: \hat w_j = \frac1n\sum_i \frac{w_j\,\mathcal N(x_i; \mu_j, \Sigma_j)}{\sum_l w_l\,\mathcal N(x_i;\mu_l,\Sigma_l)}

    For ``x ~ target`` its expectation is exactly ``target.weights`` (soft assignment, no overlap bias).

    Args:
        x: ``(n, d)`` samples; target: :class:`~toys.gmm.GaussianMixture`.

    Returns:
        ``(K,)`` masses summing to 1.
    """
    comp = torch.distributions.MultivariateNormal(target.means.detach(), covariance_matrix=target.covs.detach())
    logits = torch.log(target.weights.detach()) + comp.log_prob(x.detach()[:, None, :])
    return torch.softmax(logits, dim=1).mean(0)


def mass_error(x: Tensor, target) -> float:
    """Total-variation distance between :func:`mode_masses` of ``x`` and the exact target weights."""
    return float(0.5 * (mode_masses(x, target) - target.weights.detach()).abs().sum())


def forgetting(curve: Sequence[float], stage_end: int) -> float:
    """Forgetting of a task on a (lower-is-better) metric curve: final value minus the value at the
    end of the task's own stage (index ``stage_end``); positive means the task was forgotten."""
    if not 0 <= stage_end < len(curve):
        raise ValueError(f"stage_end must index curve (len {len(curve)}), got {stage_end}")
    return float(curve[-1] - curve[stage_end])
