r"""Di-Bregman with a normalised reward target, :math:`D_h(r\,\|\,r^*)` (derivation D15).

With the student-to-teacher ratio :math:`r = p_\theta/p_T` and the normalised reward ratio

.. math::
    r^*(x) = \frac{p^*(x)}{p_T(x)} = \frac{e^{R(x)/\beta}}{Z},\qquad p^* = \frac{p_T\,e^{R/\beta}}{Z},\quad
    Z = \mathbb E_{p_T}[e^{R/\beta}],

Di-Bregman's general objective is

.. math::
    \mathcal L_h(\theta) = \mathbb E_{p_T}\big[D_h(r\,\|\,r^*)\big],\qquad
    D_h(r\|r^*) = h(r) - h(r^*) - h'(r^*)(r - r^*) \ge 0.

It vanishes exactly at :math:`p_\theta = p^*` (strict convexity of :math:`h`), so the minimiser is the
reward-tilted teacher for every :math:`h`.  For a generator :math:`x = G_\theta(z)`,

.. math::
    \nabla_\theta\mathcal L_h = \int \big(h'(r) - h'(r^*)\big)\nabla_\theta p_\theta
    = \mathbb E_z\Big[\big(h''(r)\,r\,\nabla_x\log r - h''(r^*)\,r^*\,\nabla_x\log r^*\big)^\top
      \frac{\partial x}{\partial\theta}\Big],

with :math:`\nabla_x\log r = s_{fake} - s_{real}` and :math:`\nabla_x\log r^* = \nabla_x R/\beta`.  For
:math:`h = r\log r` it is DMD's gradient minus the reward gradient :math:`\nabla R/\beta`, the gradient
of :math:`\mathrm{KL}(p_\theta\|p^*)` (D7).  :math:`Z` matters for every :math:`h` except
:math:`r\log r`: with an unnormalised :math:`c\,r^*` the stationary point moves off :math:`p^*`.
Applied to noised marginals, :math:`r^*_\sigma = p^*_\sigma/p_{T,\sigma}` is the ratio of the noised
tilted target to the noised teacher (not :math:`e^{R/\beta}/Z`).

Notation map: ``reward`` -> :math:`R(x)`, ``beta`` -> :math:`\beta`, ``log_z`` -> :math:`\log Z`,
``log_ratio_star`` -> :math:`\log r^*`, ``grad_log_ratio_star`` -> :math:`\nabla_x\log r^*`.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from opd_ref._checks import as_batch_tensor, check_same_shape, check_tensor
from opd_ref.bregman import BregmanH, get_h
from opd_ref.distribution_matching import distribution_matching_surrogate

__all__ = ["normalized_reward_log_ratio", "reward_bregman_generator_surrogate"]


def normalized_reward_log_ratio(reward: Tensor, beta: float, log_z: Union[float, Tensor]) -> Tensor:
    r"""Log of the normalised reward ratio :math:`r^* = p^*/p_T`, elementwise.

    .. math::
        \log r^*(x) = \frac{R(x)}{\beta} - \log Z,\qquad \log Z = \log\mathbb E_{p_T}\big[e^{R/\beta}\big]

    Args:
        reward: :math:`R(x)`, any shape.
        beta: temperature, a float ``> 0``.
        log_z: :math:`\log Z` (float or 0-d tensor); exact on GMM toys, estimated otherwise.

    Returns:
        Tensor of the shape of ``reward``.

    Reference: ``dibregman``, ``rtdmd``.
    """
    reward = check_tensor("reward", reward, min_dim=0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float > 0, got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite float > 0, got {beta!r}")
    if isinstance(log_z, Tensor):
        if log_z.dim() != 0 or not bool(torch.isfinite(log_z)):
            raise ValueError(f"log_z must be a finite 0-d tensor or float, got {log_z!r}")
    elif isinstance(log_z, bool) or not isinstance(log_z, (int, float)):
        raise TypeError(f"log_z must be a float or a 0-d tensor, got {type(log_z).__name__}")
    elif not math.isfinite(log_z):
        raise ValueError(f"log_z must be finite, got {log_z!r}")
    return reward / beta - log_z


def reward_bregman_generator_surrogate(
    x_sigma: Tensor,
    score_fake: Tensor,
    score_real: Tensor,
    log_ratio: Tensor,
    log_ratio_star: Tensor,
    grad_log_ratio_star: Tensor,
    h: Union[str, BregmanH],
    weight: Union[float, Tensor] = 1.0,
) -> Tensor:
    r"""Surrogate whose autograd gradient is the gradient of :math:`\mathbb E_{p_T}[D_h(r\|r^*)]`, per sample.

    .. math::
        \nabla_\theta\ell_i = w_i\Big(h''(r_i)\,r_i\,(s_{fake} - s_{real})(x_i)
            - h''(r^*_i)\,r^*_i\,\nabla_x\log r^*(x_i)\Big)^\top\frac{\partial x_i}{\partial\theta}

    Its batch mean over generator samples is an unbiased estimate of
    :math:`\nabla_\theta\,\mathbb E_{p_T}[D_h(r\|r^*)]` (with :math:`r^* \equiv 1`,
    :math:`\nabla\log r^* = 0` it is :func:`opd_ref.bregman.bregman_generator_surrogate`).

    Args:
        x_sigma: ``(B, *event)`` generator output (noised or clean), with the gradient.
        score_fake: ``(B, *event)`` generator-marginal score at ``x_sigma`` (detached).
        score_real: ``(B, *event)`` teacher score at ``x_sigma`` (detached).
        log_ratio: ``(B,)`` :math:`\log r` at ``x_sigma``.
        log_ratio_star: ``(B,)`` :math:`\log r^*` at ``x_sigma`` (:func:`normalized_reward_log_ratio`
            at sigma = 0).
        grad_log_ratio_star: ``(B, *event)`` :math:`\nabla_x\log r^*` (:math:`\nabla R/\beta` at sigma = 0).
        h: a :class:`~opd_ref.bregman.BregmanH` or its name.
        weight: float or ``(B,)`` noise-level weight :math:`w(\sigma) \ge 0`.

    Returns:
        ``(B,)``.

    Reference: ``dibregman``.
    """
    h = get_h(h)
    x_sigma = check_tensor("x_sigma", x_sigma)
    named = (("score_fake", score_fake), ("score_real", score_real), ("grad_log_ratio_star", grad_log_ratio_star))
    for name, t in named:
        check_same_shape("x_sigma", x_sigma, name, check_tensor(name, t))
    for name, t in (("log_ratio", log_ratio), ("log_ratio_star", log_ratio_star)):
        if check_tensor(name, t).shape != (x_sigma.shape[0],):
            raise ValueError(f"{name} must have shape ({x_sigma.shape[0]},), got {tuple(t.shape)}")
    w = as_batch_tensor("weight", weight.detach() if isinstance(weight, Tensor) else weight, x_sigma)
    w = w.reshape(-1) if w.numel() != 1 else w.reshape(())
    # the two weighted directions are combined in float64 and dotted with x once: in float32 each part
    # alone can overflow to inf, and inf - inf is NaN where the difference is merely beyond the range
    f64 = torch.float64
    col = (-1,) + (1,) * (x_sigma.dim() - 1)
    weight_fake = h.grad_weight(log_ratio.detach().to(f64)).reshape(col)
    weight_star = h.grad_weight(log_ratio_star.detach().to(f64)).reshape(col)
    sf, sr, gs = (t.detach().to(f64) for _, t in named)
    direction = weight_fake * (sf - sr) - weight_star * gs
    dtype = x_sigma.dtype
    for t in (score_fake, score_real, grad_log_ratio_star, log_ratio, log_ratio_star):
        dtype = torch.promote_types(dtype, t.dtype)
    out = distribution_matching_surrogate(x_sigma, direction, torch.zeros_like(direction), weight=w)
    return out.to(dtype)
