r"""Likelihoods of flow models: exact ODE log-likelihood and the ELBO density-ratio estimate (D9).

**ODE likelihood.**  The probability-flow ODE :math:`dx/d\sigma = v(x,\sigma)` transports
:math:`p_0` (data) to :math:`p_1 = \mathcal N(0, I)`; along a trajectory the continuity equation gives
:math:`\frac{d}{d\sigma}\log p_\sigma(x_\sigma) = -\nabla\cdot v(x_\sigma,\sigma)`, hence

.. math::
    \log p_0(x) = \log\mathcal N(x_1; 0, I) + \int_0^1 \nabla\cdot v(x_\sigma, \sigma)\,d\sigma,
    \qquad x_0 = x .

:func:`ode_log_likelihood` integrates the augmented state :math:`(x_\sigma, \ell_\sigma)` with classical
fixed-step RK4 on a sigma grid and takes the divergence exactly by autograd (one backward pass per
dimension; meant for low dimensions).

**ELBO.**  For :math:`x_\sigma = (1-\sigma)x + \sigma\varepsilon` the log-SNR is
:math:`\lambda = 2\log\frac{1-\sigma}{\sigma}`, :math:`-d\lambda/d\sigma = \frac{2}{\sigma(1-\sigma)}`, and
:math:`\hat\varepsilon - \varepsilon = (1-\sigma)(v_\theta - (\varepsilon - x))`; the continuous-time
ELBO (likelihood weighting) is, up to a constant :math:`c(x)` shared by all models,

.. math::
    \log p_\theta(x) \ge c(x) - \int_0^1 \frac{1-\sigma}{\sigma}\,
        \mathbb E_\varepsilon\big\|v_\theta(x_\sigma,\sigma) - (\varepsilon - x)\big\|^2 d\sigma ,

so the difference of weighted denoising losses estimates the density ratio:

.. math::
    \log\frac{p_\theta(x)}{p_{ref}(x)} \approx -\int_0^1 \frac{1-\sigma}{\sigma}\,\mathbb E_\varepsilon\Big[
        \|v_\theta - (\varepsilon-x)\|^2 - \|v_{ref} - (\varepsilon-x)\|^2\Big] d\sigma .

The bound is tight (zero gap) when the velocity is the exact marginal velocity of the model's own
SDE path measure, so for exact flows the ratio estimate is unbiased up to quadrature; for inexact
velocity fields (any trained network) it is biased.  Notation map: :math:`v_\theta` ->
``velocity_theta``, :math:`v_{ref}` -> ``velocity_ref``, :math:`\varepsilon` -> ``eps``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from opd_ref._checks import check_tensor, promote

__all__ = [
    "exact_divergence",
    "ode_log_likelihood",
    "elbo_weight",
    "weighted_denoising_loss",
    "elbo_log_ratio",
    "elbo_log_ratio_mc",
    "gauss_legendre_sigmas",
    "gauss_hermite_normal",
]

Velocity = Callable[[Tensor, float], Tensor]
_LOG_2PI = math.log(2.0 * math.pi)


def _check_velocity(name: str, velocity: object) -> None:
    if not callable(velocity):
        raise TypeError(f"{name} must be a callable v(x, sigma), got {type(velocity).__name__}")


def _check_x(x: object) -> Tensor:
    x = check_tensor("x", x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, d), got {tuple(x.shape)}")
    return x


def exact_divergence(velocity: Velocity, x: Tensor, sigma: float) -> Tuple[Tensor, Tensor]:
    r"""Velocity and its exact divergence by autograd (``d`` backward passes).

    .. math::
        \nabla\cdot v(x,\sigma) = \sum_{i=1}^d \frac{\partial v_i}{\partial x_i}(x,\sigma)

    Args:
        velocity: ``v(x (B, d), sigma: float) -> (B, d)``.
        x: ``(B, d)``.
        sigma: noise level.

    Returns:
        ``(v (B, d), div (B,))``, both detached.

    Reference: ``crd`` (model likelihoods of flow models); Chen et al. (neural ODEs).
    """
    _check_velocity("velocity", velocity)
    x = _check_x(x)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise TypeError(f"sigma must be a finite float, got {sigma!r}")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        v = velocity(xr, sigma)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            raise ValueError(f"velocity returned {getattr(v, 'shape', type(v))}, expected {tuple(x.shape)}")
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(x.shape[1]):
            (g,) = torch.autograd.grad(v[:, i].sum(), xr, retain_graph=i + 1 < x.shape[1])
            div = div + g[:, i]
    return v.detach(), div.detach()


def ode_log_likelihood(
    velocity: Velocity,
    x: Tensor,
    sigmas: Optional[Tensor] = None,
    *,
    n_steps: int = 100,
) -> Tensor:
    r"""Exact (up to RK4 error) log-likelihood of the probability-flow ODE model.

    .. math::
        \log p_0(x) = \log\mathcal N(x_1; 0, I) + \int_0^1 \nabla\cdot v(x_\sigma,\sigma)\,d\sigma,\qquad
        \frac{dx_\sigma}{d\sigma} = v(x_\sigma, \sigma),\ x_0 = x

    integrated with classical RK4 on the increasing grid ``sigmas`` (from 0 to 1).  The global error
    is :math:`O(h^4)` for smooth velocities.

    Args:
        velocity: ``v(x (B, d), sigma: float) -> (B, d)``; must be defined on ``[0, 1]``.
        x: ``(B, d)`` data points.
        sigmas: optional increasing ``(M + 1,)`` grid with ``sigmas[0] = 0`` and ``sigmas[-1] = 1``.
        n_steps: number of uniform steps when ``sigmas`` is not given.

    Returns:
        ``(B,)`` log-densities.

    Reference: ``crd`` (likelihoods of flow models); Grathwohl et al. (FFJORD).
    """
    _check_velocity("velocity", velocity)
    x = _check_x(x)
    if sigmas is None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        grid = [i / n_steps for i in range(n_steps + 1)]
    else:
        if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
            raise ValueError(f"sigmas must be a 1-D tensor of >= 2 points, got {getattr(sigmas, 'shape', type(sigmas))}")
        grid = [float(s) for s in sigmas.detach().to(torch.float64)]
        if abs(grid[0]) > 0 or abs(grid[-1] - 1.0) > 0 or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"sigmas must increase strictly from 0 to 1, got {grid[:4]} ... {grid[-2:]}")
    xs = x.detach()
    ell = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h = s1 - s0
        k1, d1 = exact_divergence(velocity, xs, s0)
        k2, d2 = exact_divergence(velocity, xs + 0.5 * h * k1, s0 + 0.5 * h)
        k3, d3 = exact_divergence(velocity, xs + 0.5 * h * k2, s0 + 0.5 * h)
        k4, d4 = exact_divergence(velocity, xs + h * k3, s1)
        xs = xs + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        ell = ell + h / 6.0 * (d1 + 2 * d2 + 2 * d3 + d4)
    log_prior = -0.5 * (xs**2).sum(-1) - 0.5 * x.shape[1] * _LOG_2PI
    return log_prior + ell


def elbo_weight(sigma: Tensor | float) -> Tensor | float:
    r"""Likelihood weighting of the velocity-parameterised denoising loss.

    .. math::
        w(\sigma) = -\frac12\frac{d\lambda}{d\sigma}(1-\sigma)^2 = \frac{1-\sigma}{\sigma},
        \qquad \lambda = 2\log\frac{1-\sigma}{\sigma}

    Args:
        sigma: float or tensor in ``(0, 1]``.

    Returns:
        same type as ``sigma``.

    Reference: ``crd`` (ELBO-based implicit rewards); Kingma & Gao (2023).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if isinstance(sigma, Tensor) and not torch.is_floating_point(sigma):
        raise TypeError(f"sigma must be a floating-point tensor, got dtype {sigma.dtype}")
    t = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()) or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1], got {sigma!r}")
    return (1.0 - sigma) / sigma


def weighted_denoising_loss(
    velocity: Velocity, x: Tensor, sigma: float, eps: Tensor, *, weight: Optional[float] = None
) -> Tensor:
    r"""Weighted flow-matching loss of one noise level and noise draw(s).

    .. math::
        \ell(x, \sigma, \varepsilon) = w(\sigma)\,\big\|v(x_\sigma,\sigma) - (\varepsilon - x)\big\|^2,
        \qquad x_\sigma = (1-\sigma)x + \sigma\varepsilon

    Args:
        velocity: ``v(x (N, d), sigma: float) -> (N, d)``.
        x: ``(B, d)`` data points.
        sigma: noise level in ``(0, 1)``.
        eps: ``(M, B, d)`` or ``(B, d)`` noise draws.
        weight: ``w(sigma)``; default :func:`elbo_weight`.

    Returns:
        ``(M, B)`` (or ``(B,)``) losses, summed over dims.

    Reference: ``crd``, ``flowgrpo`` (flow-matching loss).
    """
    _check_velocity("velocity", velocity)
    x = _check_x(x)
    eps = check_tensor("eps", eps, min_dim=2)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float, got {type(sigma).__name__}")
    squeeze = eps.dim() == 2
    e = eps[None] if squeeze else eps
    if e.dim() != 3 or e.shape[1:] != x.shape:
        raise ValueError(f"eps must have shape (M, {x.shape[0]}, {x.shape[1]}) or {tuple(x.shape)}, got {tuple(eps.shape)}")
    if not 0.0 < float(sigma) < 1.0:
        raise ValueError(f"sigma must lie in (0, 1), got {sigma!r}")
    w = elbo_weight(float(sigma)) if weight is None else float(weight)
    M, B, d = e.shape
    x_s = (1.0 - sigma) * x[None] + sigma * e
    v = velocity(x_s.reshape(M * B, d), float(sigma)).reshape(M, B, d)
    loss = w * ((v - (e - x[None])) ** 2).sum(-1)
    return loss[0] if squeeze else loss


def elbo_log_ratio(
    velocity_theta: Velocity,
    velocity_ref: Velocity,
    x: Tensor,
    sigma_nodes: Tensor,
    sigma_weights: Tensor,
    eps: Tensor,
    eps_weights: Optional[Tensor] = None,
    *,
    weighting: Optional[Callable[[float], float]] = None,
) -> Tensor:
    r"""ELBO estimate of :math:`\log p_\theta(x) - \log p_{ref}(x)` by a difference of weighted
    denoising losses, with common random numbers (same :math:`\sigma`, :math:`\varepsilon` for both).

    .. math::
        \widehat{\log\frac{p_\theta}{p_{ref}}}(x) = -\sum_j \omega_j\,w(\sigma_j)\sum_m \nu_m
        \Big[\|v_\theta(x_{\sigma_j}^{(m)}) - (\varepsilon_m - x)\|^2
             - \|v_{ref}(x_{\sigma_j}^{(m)}) - (\varepsilon_m - x)\|^2\Big]

    with quadrature nodes/weights :math:`(\sigma_j, \omega_j)` on ``(0, 1)`` (e.g.
    :func:`gauss_legendre_sigmas`, or uniform random sigmas with weights ``1/J``) and noise nodes/weights
    :math:`(\varepsilon_m, \nu_m)` (e.g. :func:`gauss_hermite_normal`, or Monte-Carlo draws with
    weights ``1/M``).

    Args:
        velocity_theta: ``v_theta(x, sigma) -> (N, d)``.
        velocity_ref: ``v_ref(x, sigma) -> (N, d)``.
        x: ``(B, d)`` points.
        sigma_nodes: ``(J,)`` in ``(0, 1)``.
        sigma_weights: ``(J,)``.
        eps: ``(M, d)`` (shared by every point) or ``(M, B, d)``.
        eps_weights: ``(M,)``; default ``1/M``.
        weighting: ``w(sigma)``; default the likelihood weighting :func:`elbo_weight` (other choices,
            e.g. ``lambda s: 1.0``, are not ELBOs and are biased; kept to measure that bias).

    Returns:
        ``(B,)`` estimates.

    Reference: ``crd`` (implicit reward :math:`\beta\log p_\theta/p_{ref}` from ELBOs),
    ``diffusionopd``.
    """
    _check_velocity("velocity_theta", velocity_theta)
    _check_velocity("velocity_ref", velocity_ref)
    x = _check_x(x)
    B, d = x.shape
    sigma_nodes = check_tensor("sigma_nodes", sigma_nodes)
    sigma_weights = check_tensor("sigma_weights", sigma_weights)
    if sigma_nodes.dim() != 1 or sigma_weights.shape != sigma_nodes.shape:
        raise ValueError(
            f"sigma_nodes and sigma_weights must both have shape (J,), got {tuple(sigma_nodes.shape)}, {tuple(sigma_weights.shape)}"
        )
    eps = check_tensor("eps", eps, min_dim=2)
    if eps.dim() == 2:
        if eps.shape[1] != d:
            raise ValueError(f"eps must have shape (M, {d}) or (M, {B}, {d}), got {tuple(eps.shape)}")
        eps = eps[:, None, :].expand(eps.shape[0], B, d)
    if eps.dim() != 3 or eps.shape[1:] != (B, d):
        raise ValueError(f"eps must have shape (M, {d}) or (M, {B}, {d}), got {tuple(eps.shape)}")
    M = eps.shape[0]
    if eps_weights is None:
        eps_weights = torch.full((M,), 1.0 / M, dtype=x.dtype)
    eps_weights = check_tensor("eps_weights", eps_weights)
    if eps_weights.shape != (M,):
        raise ValueError(f"eps_weights must have shape ({M},), got {tuple(eps_weights.shape)}")
    x, eps, eps_weights = promote(x, eps, eps_weights)
    total = torch.zeros(B, dtype=x.dtype)
    for s, om in zip(sigma_nodes.tolist(), sigma_weights.tolist()):
        w = elbo_weight(s) if weighting is None else float(weighting(s))
        l_t = weighted_denoising_loss(velocity_theta, x, s, eps, weight=w)
        l_r = weighted_denoising_loss(velocity_ref, x, s, eps, weight=w)
        total = total - om * (eps_weights.to(x.dtype) @ (l_t - l_r))
    return total


def elbo_log_ratio_mc(
    velocity_theta: Callable[[Tensor, Tensor], Tensor],
    velocity_ref: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    n: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Monte-Carlo ELBO estimate of :math:`\log p_\theta(x)/p_{ref}(x)` as used at scale: one
    :math:`(\sigma, \varepsilon)` pair per draw, shared by both models.

    .. math::
        \widehat{\log\frac{p_\theta}{p_{ref}}}(x) = -\frac1n\sum_{j=1}^n \frac{1-\sigma_j}{\sigma_j}
        \Big[\|v_\theta(x_{\sigma_j}) - (\varepsilon_j - x)\|^2 - \|v_{ref}(x_{\sigma_j}) - (\varepsilon_j - x)\|^2\Big],
        \quad \sigma_j\sim U(0, 1),\ \varepsilon_j\sim\mathcal N(0, I)

    Unbiased for the integral of :func:`elbo_log_ratio`.

    Args:
        velocity_theta: ``v_theta(x (N, d), sigma (N,)) -> (N, d)`` (per-sample sigma).
        velocity_ref: ``v_ref(x (N, d), sigma (N,)) -> (N, d)``.
        x: ``(B, d)`` points.
        n: draws per point.
        generator: ``torch.Generator``.

    Returns:
        ``(estimate (B,), standard_error (B,))`` (sample sd over draws / sqrt(n)).

    Reference: ``crd`` (ELBO-based implicit reward), ``diffusionopd``.
    """
    _check_velocity("velocity_theta", velocity_theta)
    _check_velocity("velocity_ref", velocity_ref)
    x = _check_x(x)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    B, d = x.shape
    # drawn in float64 and cast, so one generator state gives the same draws for every dtype of x
    sigma = torch.rand(n, B, generator=generator, dtype=torch.float64).to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
    eps = torch.randn(n, B, d, generator=generator, dtype=torch.float64).to(x.dtype)
    xs = (1.0 - sigma[..., None]) * x[None] + sigma[..., None] * eps
    target = eps - x[None]
    flat_x, flat_s = xs.reshape(n * B, d), sigma.reshape(n * B)
    l_t = ((velocity_theta(flat_x, flat_s).reshape(n, B, d) - target) ** 2).sum(-1)
    l_r = ((velocity_ref(flat_x, flat_s).reshape(n, B, d) - target) ** 2).sum(-1)
    terms = -(1.0 - sigma) / sigma * (l_t - l_r)
    return terms.mean(0), terms.std(0) / math.sqrt(n)


def gauss_legendre_sigmas(n: int, *, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    r"""Gauss–Legendre nodes and weights on :math:`(0, 1)`: :math:`\int_0^1 f \approx \sum_j \omega_j f(\sigma_j)`.

    .. math::
        \sigma_j = \tfrac12(t_j + 1),\quad \omega_j = \tfrac12 u_j,\quad (t_j, u_j)\ \text{Legendre on } [-1, 1]

    Args:
        n: number of nodes.
        dtype: floating dtype.

    Returns:
        ``(nodes (n,), weights (n,))``.

    Reference: ``crd`` (quadrature of the ELBO integral).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    t, u = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (t + 1.0), dtype=dtype), torch.tensor(0.5 * u, dtype=dtype)


def gauss_hermite_normal(n: int, d: int, *, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    r"""Tensor-product Gauss–Hermite rule for :math:`\mathbb E_{\varepsilon\sim\mathcal N(0, I_d)}[f(\varepsilon)]`.

    .. math::
        \mathbb E[f(\varepsilon)] \approx \sum_m \nu_m f(\varepsilon_m),\quad n^d \text{ nodes}

    Args:
        n: nodes per dimension.
        d: dimension (``n ** d`` nodes in total: low ``d`` only).
        dtype: floating dtype.

    Returns:
        ``(nodes (n**d, d), weights (n**d,))``.

    Reference: ``crd`` (noise expectation of the ELBO).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(d, int) or d < 1:
        raise ValueError(f"n and d must be positive ints, got n={n!r}, d={d!r}")
    z, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / math.sqrt(2.0 * math.pi)
    nodes = np.array(list(itertools.product(z, repeat=d)))
    weights = np.array([float(np.prod(c)) for c in itertools.product(w, repeat=d)])
    return torch.tensor(nodes, dtype=dtype), torch.tensor(weights, dtype=dtype)
