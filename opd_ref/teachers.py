r"""Teacher algorithms of the two-stage recipe (derivation D18): DiffusionNFT and GRPO-Guard.

**DiffusionNFT** (``diffusionnft``) trains on the *forward* process: a generated clean sample
:math:`x_0` (from any sampler) is noised, :math:`x_\sigma = (1-\sigma)x_0 + \sigma\varepsilon`,
with the conditional velocity :math:`u = \varepsilon - x_0` as regression target.  The trained
velocity :math:`v_\theta` enters through the *implicit* positive and negative velocities

.. math::
    v^+ = (1-\beta)\,v_{old} + \beta\,v_\theta,\qquad v^- = (1+\beta)\,v_{old} - \beta\,v_\theta,

reflections of each other about :math:`v_{old}` (:math:`v^+ + v^- = 2v_{old}`), mixed by the
normalised reward :math:`r\in[0,1]`:

.. math:: \ell = r\,\|v^+ - u\|^2 + (1-r)\,\|v^- - u\|^2 .

Identity (exact): with :math:`d = v_\theta - v_{old}` and
:math:`g = (2r-1)(u - v_{old})/\beta`,

.. math:: \ell = \beta^2\|d - g\|^2 + \|v_{old} - u\|^2 - \beta^2\|g\|^2,

so NFT is weighted flow matching of :math:`v_\theta` onto :math:`v_{old} + g`
(:func:`nft_regression_target`).  Its optimum given :math:`x_\sigma`, with :math:`x_0\sim\pi_{old}`
and :math:`v_{old} = \mathbb E[u|x_\sigma]` the old policy's exact velocity, is

.. math::
    v^\star(x_\sigma) = v_{old} + \frac2\beta\big(\mathbb E[r u|x_\sigma] - \mathbb E[r|x_\sigma]\,v_{old}\big)
        = v_{old} + \frac2\beta\,\mathrm{Cov}(r, u\,|\,x_\sigma)
        = v_{old} + \frac2\beta\,\partial_\lambda v_{\pi_{old}e^{\lambda r}}\big|_{\lambda=0},

the **first-order (linear-response) tilt** of the old policy by :math:`e^{(2/\beta) r}`
(:func:`nft_optimum`): exact to first order in :math:`1/\beta`, with an :math:`O(\beta^{-2})` gap
to the exact tilt's velocity (zero for a Gaussian old policy and a reward linear in :math:`x_0`,
where the tilt velocity is affine in :math:`\lambda`).

**GRPO-Guard** (``grpoguard``) adds *regulated clipping* to Flow-GRPO.  At a stored draw
:math:`x' = \mu_{old} + s\varepsilon` with :math:`\Delta = \mu_\theta - \mu_{old} = c_v(v_\theta - v_{old})`
the per-step log-ratio is

.. math::
    \log r = \frac{\Delta^\top(2s\varepsilon - \Delta)}{2s^2},\qquad
    \mathbb E[\log r\,|\,x] = -\frac{\|\Delta\|^2}{2s^2},\quad \mathrm{Std}[\log r\,|\,x] = \frac{\|\Delta\|}{s}:

left-shifted, by an amount that grows as :math:`s` shrinks (low-noise steps), so positive-advantage
samples rarely reach the clip :math:`1+\epsilon`.  The normalised log-ratio removes the shift (its
gradient stopped) and rescales each step by :math:`\kappa = s/|c_v|` (the gradient reweighting):

.. math::
    \log\tilde r = \kappa\Big(\log r + \frac{\mathrm{sg}\|\Delta\|^2}{2s^2}\Big)
        = \kappa\,\frac{\Delta^\top\varepsilon}{s}\ \text{(value)},\qquad
    \mathbb E[\log\tilde r\,|\,x] = 0,\quad \mathrm{Std}[\log\tilde r\,|\,x] = \|v_\theta - v_{old}\|

at every step (:func:`guard_log_ratio`); its gradient at :math:`\theta_{old}` is :math:`\kappa`
times Flow-GRPO's, i.e. :math:`\varepsilon^\top\partial v/\partial\theta` with the same weight at
every noise level.  (The scale :math:`\kappa` is this suite's choice of "step-consistent"; the paper's
exact constant is not restated here.)

Reference: ``diffusionnft``, ``grpoguard``, ``flowgrpo``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from opd_ref._checks import check_batch_vector, check_same_shape, check_tensor, promote, sum_event

__all__ = [
    "nft_implicit_velocities",
    "nft_loss",
    "nft_regression_target",
    "nft_optimum",
    "guard_log_ratio",
]


def _sum_event(t: Tensor) -> Tensor:
    return sum_event(t)


def _r_column(r: Tensor, like: Tensor) -> Tensor:
    return r.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _check_float(name: str, value: object, *, positive: bool = False, nonzero: bool = False) -> float:
    """A finite Python number (not a bool); ``> 0`` or ``!= 0`` where asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (nonzero and value == 0):
        want = "> 0" if positive else "!= 0" if nonzero else "finite"
        raise ValueError(f"{name} must be a finite float {want}, got {value!r}")
    return value


def _check_fields(**named: Tensor) -> Tuple[Tensor, ...]:
    """Finite floating ``(B, *event)`` tensors of one shape, cast to their common dtype."""
    items = list(named.items())
    out = [check_tensor(n, t) for n, t in items]
    for (n, _), t in zip(items[1:], out[1:]):
        check_same_shape(items[0][0], out[0], n, t)
    return promote(*out)


def _check_r(name: str, r: object, like: Tensor) -> Tensor:
    return check_batch_vector(name, r, like.shape[0])


def nft_implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    r"""DiffusionNFT's implicit positive and negative velocities.

    .. math:: v^+ = (1-\beta)v_{old} + \beta v_\theta,\qquad v^- = (1+\beta)v_{old} - \beta v_\theta

    Args:
        v_theta: ``(B, *event)`` trained velocity (with grad).
        v_old: ``(B, *event)`` the old (sampling) policy's velocity, detached.
        beta: :math:`\beta > 0`.

    Returns:
        ``(v_plus, v_minus)``, each ``(B, *event)``.

    Reference: ``diffusionnft``.
    """
    v_theta, v_old = _check_fields(v_theta=v_theta, v_old=v_old)
    return _nft_implicit_velocities(v_theta, v_old, _check_float("beta", beta, positive=True))


def _nft_implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    d = v_theta - v_old
    return v_old + beta * d, v_old - beta * d


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, beta: float) -> Tensor:
    r"""DiffusionNFT's per-sample loss on forward-noised samples (summed over event dims).

    .. math:: \ell = r\,\|v^+ - u\|^2 + (1-r)\,\|v^- - u\|^2,\qquad u = \varepsilon - x_0

    Args:
        v_theta: ``(B, *event)`` trained velocity at :math:`x_\sigma`.
        v_old: ``(B, *event)`` old velocity at :math:`x_\sigma` (detached).
        v_target: ``(B, *event)`` :math:`u = \varepsilon - x_0`.
        r: ``(B,)`` normalised rewards (in [0, 1] for NFT's optimality probability).
        beta: :math:`\beta > 0`.

    Returns:
        ``(B,)``.

    Reference: ``diffusionnft``.
    """
    v_theta, v_old, v_target = _check_fields(v_theta=v_theta, v_old=v_old, v_target=v_target)
    r = _check_r("r", r, v_theta)
    return _nft_loss(v_theta, v_old, v_target, r, _check_float("beta", beta, positive=True))


def _nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, beta: float) -> Tensor:
    """:func:`nft_loss` unchecked (the engine's ``nft`` objective, its inputs validated by its specs)."""
    v_plus, v_minus = _nft_implicit_velocities(v_theta, v_old, beta)
    rc = r.to(v_theta.dtype)
    return _weighted(rc, _sum_event((v_plus - v_target).pow(2))) + _weighted(1 - rc, _sum_event((v_minus - v_target).pow(2)))


def _weighted(w: Tensor, sq: Tensor) -> Tensor:
    """``w * sq``, exactly 0 where ``w = 0`` (r = 0 or 1 is NFT's usual edge; ``0 * inf`` would be NaN)."""
    return torch.where(w == 0, torch.zeros_like(sq), w * sq)


def nft_regression_target(v_old: Tensor, v_target: Tensor, r: Tensor, beta: float) -> Tensor:
    r"""The flow-matching target that NFT regresses :math:`v_\theta` onto (the identity of the module doc).

    .. math::
        v_{old} + \frac{(2r-1)(u - v_{old})}{\beta},\qquad
        \ell = \beta^2\big\|v_\theta - v_{old} - \tfrac{(2r-1)(u - v_{old})}{\beta}\big\|^2 + \text{const}(\theta)

    Args:
        v_old, v_target: ``(B, *event)``; r: ``(B,)``; beta: :math:`\beta > 0`.

    Returns:
        ``(B, *event)``.

    Reference: ``diffusionnft``.
    """
    v_old, v_target = _check_fields(v_old=v_old, v_target=v_target)
    r = _check_r("r", r, v_old)
    beta = _check_float("beta", beta, positive=True)
    return v_old + (2 * _r_column(r, v_old) - 1) * (v_target - v_old) / beta


def nft_optimum(v_old: Tensor, r_mean: Tensor, ru_mean: Tensor, beta: float) -> Tensor:
    r"""NFT's optimal velocity at :math:`x_\sigma` from the posterior moments under the old policy.

    .. math::
        v^\star = v_{old} + \frac2\beta\big(\mathbb E[r u|x_\sigma] - \mathbb E[r|x_\sigma]\,v_{old}\big)

    Args:
        v_old: ``(B, *event)`` :math:`\mathbb E[u|x_\sigma]` (the old policy's exact velocity).
        r_mean: ``(B,)`` :math:`\mathbb E[r|x_\sigma]`.
        ru_mean: ``(B, *event)`` :math:`\mathbb E[r u|x_\sigma]`.
        beta: :math:`\beta > 0`.

    Returns:
        ``(B, *event)``.

    Reference: ``diffusionnft`` (optimal policy of the NFT objective).
    """
    v_old, ru_mean = _check_fields(v_old=v_old, ru_mean=ru_mean)
    r_mean = _check_r("r_mean", r_mean, v_old)
    beta = _check_float("beta", beta, positive=True)
    return v_old + (2.0 / beta) * (ru_mean - _r_column(r_mean, v_old) * v_old)


def guard_log_ratio(gap_old: Tensor, noise: Tensor, std: float, c_v: float) -> Tensor:
    r"""GRPO-Guard's normalised per-step log-ratio (mean shift removed with stopped gradient, step
    rescaled by :math:`\kappa = s/|c_v|`).

    .. math::
        \log\tilde r = \frac{s}{|c_v|}\Big(\frac{\Delta^\top(2s\varepsilon - \Delta)}{2s^2}
            + \frac{\mathrm{sg}\|\Delta\|^2}{2s^2}\Big)

    Args:
        gap_old: ``(B, *event)`` :math:`\Delta = \mu_\theta - \mu_{old} = c_v(v_\theta - v_{old})` (with grad).
        noise: ``(B, *event)`` the draw :math:`\varepsilon` of :math:`x' = \mu_{old} + s\varepsilon`.
        std: the step std :math:`s > 0`.
        c_v: the kernel's velocity coefficient :math:`c_v \ne 0`.

    Returns:
        ``(B,)``.

    Reference: ``grpoguard``, ``flowgrpo``.
    """
    gap_old, noise = _check_fields(gap_old=gap_old, noise=noise)
    std = _check_float("std", std, positive=True)
    return _guard_log_ratio(gap_old, noise, std, _check_float("c_v", c_v, nonzero=True))


def _guard_log_ratio(gap_old: Tensor, noise: Tensor, std: float, c_v: float) -> Tensor:
    r""":func:`guard_log_ratio` unchecked (the engine's ``grpo_guard`` objective).

    Evaluated without the cancellation of :math:`-\|\Delta\|^2 + \mathrm{sg}\|\Delta\|^2` (which in
    float32 loses every digit of :math:`\Delta^\top\varepsilon / s` once :math:`\|\Delta\| \gg s\|\varepsilon\|`):
    the value :math:`\kappa\,\Delta^\top\varepsilon/s` plus :math:`-\kappa\langle\Delta - \mathrm{sg}\Delta,
    \mathrm{sg}\Delta\rangle / s^2`, exactly 0 in value, which carries the gradient
    :math:`-\kappa\Delta/s^2` of :math:`-\|\Delta\|^2/(2s^2)`.
    """
    d = gap_old
    d0 = d.detach()
    value = _sum_event(d * noise) / std
    grad_of_shift = _sum_event((d - d0) * d0) / std**2
    return (std / abs(c_v)) * (value - grad_of_shift)
