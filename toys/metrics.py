r"""Metrics of the toy experiments: exact KL, energy distance, mass per mode, forgetting.

Notation map: :math:`p_\theta` student density, :math:`p^*_k` tilted target of task ``k``.
Reference: ``diffusionopd`` (evaluation), Székely & Rizzo (energy distance).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["euler_flow_log_prob", "sampler_kl", "ode_likelihood_gap", "grid_kl", "energy_distance", "mode_masses", "mass_error", "forgetting", "quadrature_grid"]


def quadrature_grid(center: Tensor, half_width: float, n: int = 241) -> Tuple[Tensor, float]:
    r"""Tensor-product grid on the square :math:`c + [-h, h]^2` with ``n`` points per axis.

    Returns:
        points ``(n*n, 2)`` float64 and the cell area :math:`(2h/(n-1))^2`.

    Reference: used by :func:`grid_kl` (``diffusionopd`` per-task KL).
    """
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


def euler_flow_log_prob(velocity: Callable[[Tensor, float], Tensor], n: int, n_steps: int,
                        generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    r"""Samples of the ``n_steps``-step Euler (ODE) sampler of ``velocity`` and their exact log-density.

    The sampler is the map :math:`x_{n+1} = x_n + (\sigma_{n+1}-\sigma_n) v(x_n, \sigma_n)` from
    :math:`x_0\sim\mathcal N(0, I)` at :math:`\sigma = 1`; by the change of variables

    .. math:: \log p(x_N) = \log\mathcal N(x_0; 0, I) - \sum_n \log\big|\det \partial x_{n+1}/\partial x_n\big|,

    with the 2x2 Jacobians from autograd (one backward per output coordinate).  Exact for the
    discrete sampler, so the student's density needs no likelihood ODE solve.

    Args:
        velocity: ``v(x (B, d), sigma) -> (B, d)``.
        n: number of samples; n_steps: Euler steps on the uniform grid 1 -> 0.
        generator: seeds the initial noise.

    Returns:
        ``(x (n, d), log_p (n,))``, detached.

    Reference: ``diffusionopd`` (ODE sampler of the student), change of variables.
    """
    from opd_ref.engine import KernelSpec
    from opd_ref.engine.grid import sigma_grid

    sig = sigma_grid(n_steps, dtype=dtype)
    ode = KernelSpec("ode")
    levels = ode.check_grid(sig)
    x = torch.randn(n, 2, generator=generator, dtype=dtype)
    log_p = -0.5 * (x**2).sum(1) - x.shape[1] * 0.5 * math.log(2 * math.pi)
    d = x.shape[1]
    for k in range(n_steps):
        # one forward of d copies of the batch and one backward: copy i's gradient of its output
        # coordinate i is row i of each sample's Jacobian (samples do not interact)
        xr = x.detach().repeat(d, 1).requires_grad_(True)
        with torch.enable_grad():
            x_next = ode.coefficients(levels[k], levels[k + 1]).mean(xr, velocity(xr, levels[k]))  # Euler step
            picked = torch.cat([x_next[i * n:(i + 1) * n, i] for i in range(d)])
            (g,) = torch.autograd.grad(picked.sum(), xr)
        jac = g.reshape(d, n, d).transpose(0, 1)  # (n, d, d), row i = d x_next_i / d x
        log_p = log_p - torch.linalg.slogdet(jac)[1]
        x = x_next[:n].detach()
    return x, log_p.detach()


def sampler_kl(velocity: Callable[[Tensor, float], Tensor], target_log_prob: Callable[[Tensor], Tensor], *,
               n: int = 1000, n_steps: int = 32, seed: int = 0) -> Tuple[float, float]:
    r"""Reverse KL of the Euler sampler of ``velocity`` to a target with exact log-density.

    .. math:: \mathrm{KL}(p_\theta\|p^*) = \mathbb E_{x\sim p_\theta}[\log p_\theta(x) - \log p^*(x)]

    averaged over ``n`` sampler outputs with exact densities (:func:`euler_flow_log_prob`).

    Returns:
        ``(kl, standard_error)``.

    Reference: ``diffusionopd`` (per-task reverse KL).
    """
    gen = torch.Generator().manual_seed(int(seed))
    x, lp = euler_flow_log_prob(velocity, n, n_steps, gen)
    with torch.no_grad():
        d = lp - target_log_prob(x).double()
    return float(d.mean()), float(d.std() / math.sqrt(n))


def ode_likelihood_gap(velocity: Callable[[Tensor, float], Tensor], *, n: int = 100, n_steps: int = 24,
                       ode_steps: int = 20, seed: int = 0) -> Tuple[float, float]:
    r"""Mean gap between the exact density of the ``n_steps`` Euler sampler and the continuous-time
    flow's likelihood (:func:`opd_ref.elbo.ode_log_likelihood`, RK4) at the sampler's outputs.

    .. math:: \Delta = \frac1n\sum_i \big[\log p^{\mathrm{Euler}}_\theta(x_i) - \log p^{\mathrm{ODE}}_\theta(x_i)\big]
              \approx \mathrm{KL}(p^{\mathrm{Euler}}_\theta\|p^{\mathrm{ODE}}_\theta) \ge 0

    It is the discretisation part of :func:`sampler_kl`: the per-task KL of student (a) measured with
    the sampler's density differs from the one measured with the ODE likelihood by this amount.

    Returns:
        ``(gap, standard_error)``.

    Reference: ``crd`` / FFJORD (ODE likelihood), ``diffusionopd``.
    """
    from opd_ref.elbo import ode_log_likelihood

    gen = torch.Generator().manual_seed(int(seed))
    x, lp = euler_flow_log_prob(velocity, n, n_steps, gen)
    d = lp - ode_log_likelihood(velocity, x, n_steps=ode_steps).detach()
    return float(d.mean()), float(d.std() / math.sqrt(n))


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
    r"""Total-variation distance :math:`\tfrac12\sum_j|\hat w_j - w^*_j|` between :func:`mode_masses` of
    ``x`` (``(n, d)``) and the exact target weights :math:`w^*`.

    Reference: ``diffusionopd`` (mass per mode vs the exact tilted weights, toy metric).
    """
    return float(0.5 * (mode_masses(x, target) - target.weights.detach()).abs().sum())


def forgetting(curve: Sequence[float], stage_end: int) -> float:
    r"""Forgetting of a task on a lower-is-better metric curve :math:`m_0, \dots, m_T`:
    :math:`m_T - m_{\text{stage end}}`; positive means the task was forgotten.

    Args:
        curve: metric values at the checkpoints; stage_end: index of the end of the task's own stage.

    Reference: ``diffusionopd`` (catastrophic forgetting of cascade RL).
    """
    if not 0 <= stage_end < len(curve):
        raise ValueError(f"stage_end must index curve (len {len(curve)}), got {stage_end}")
    return float(curve[-1] - curve[stage_end])
