r"""Score-based distribution matching: the DMD / Diff-Instruct generator gradient (derivation D10).

A one-step (or few-step) generator :math:`x = G_\theta(z)` has output density :math:`p_\theta`; its
noised marginal at level sigma is :math:`p_{\theta,\sigma}`, the law of
:math:`x_\sigma = (1-\sigma) x + \sigma\epsilon`.  With the fake score
:math:`s_{fake} = \nabla\log p_{\theta,\sigma}` and the teacher (real) score
:math:`s_{real} = \nabla\log p_{T,\sigma}`,

.. math::
    \nabla_\theta\,\mathrm{KL}(p_{\theta,\sigma}\,\|\,p_{T,\sigma})
        = \mathbb E_{z,\epsilon}\Big[\big(s_{fake} - s_{real}\big)(x_\sigma)^\top
          \frac{\partial x_\sigma}{\partial\theta}\Big],

because the term :math:`\mathbb E[\nabla_\theta \log p_{\theta,\sigma}]` at fixed :math:`x_\sigma`
(the score of the family) vanishes.  Both scores are held fixed (detached) when differentiating.
Notation map: ``x_sigma`` -> :math:`x_\sigma` (built from the generator output, carries the
gradient), ``score_fake`` / ``score_real`` -> :math:`s_{fake}` / :math:`s_{real}` at ``x_sigma``,
``weight`` -> :math:`w(\sigma)`.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from opd_ref._checks import as_batch_tensor, check_same_shape, check_tensor

__all__ = ["distribution_matching_surrogate", "dmd_normalized_weight"]


def distribution_matching_surrogate(
    x_sigma: Tensor, score_fake: Tensor, score_real: Tensor, weight: Union[float, Tensor] = 1.0
) -> Tensor:
    r"""Surrogate whose autograd gradient is the DMD / Diff-Instruct generator gradient, per sample.

    .. math::
        \ell_i = \big\langle \mathrm{sg}\big[w(\sigma_i)\,(s_{fake} - s_{real})(x_{\sigma,i})\big],\,
            x_{\sigma,i} \big\rangle,
        \qquad
        \nabla_\theta \ell_i = w(\sigma_i)\,(s_{fake} - s_{real})(x_{\sigma,i})^\top
            \frac{\partial x_{\sigma,i}}{\partial\theta}

    (``sg`` = stop-gradient).  Its batch mean is an unbiased estimate of
    :math:`\nabla_\theta\,\mathbb E_\sigma[w(\sigma)\,\mathrm{KL}(p_{\theta,\sigma}\|p_{T,\sigma})]`;
    the *value* of the surrogate is not a divergence.  DMD writes the gradient with
    :math:`\partial x/\partial\theta` of the clean output: since
    :math:`\partial x_\sigma/\partial\theta = (1-\sigma)\,\partial x/\partial\theta`, passing the clean
    ``x`` with weight :math:`w(1-\sigma)` gives the same gradient.

    Args:
        x_sigma: ``(B, *event)`` noised generator output :math:`(1-\sigma)G_\theta(z)+\sigma\epsilon`,
            with the gradient to the generator.
        score_fake: ``(B, *event)`` score of the generator's noised marginal at ``x_sigma``
            (an exact score on toys, the fake-score network at scale); detached here.
        score_real: ``(B, *event)`` teacher score at ``x_sigma``; detached here.
        weight: float, or ``(B,)`` per-sample :math:`w(\sigma_i) \ge 0` (detached).

    Returns:
        ``(B,)``.

    Reference: ``dmd``, ``dmd2``, ``diffinstruct``.
    """
    x_sigma = check_tensor("x_sigma", x_sigma)
    score_fake = check_tensor("score_fake", score_fake)
    score_real = check_tensor("score_real", score_real)
    check_same_shape("x_sigma", x_sigma, "score_fake", score_fake)
    check_same_shape("x_sigma", x_sigma, "score_real", score_real)
    # the weight and <direction, x> in float64, rounded to the output dtype once: in float32, terms of
    # 1e30 x 1e30 of both signs overflowed to inf - inf = NaN although the product is just beyond the
    # float range, and a weight beyond the float32 range (Di-Bregman's 2 r at log r = 100) became inf
    f64 = torch.float64
    w = as_batch_tensor("weight", weight.detach() if isinstance(weight, Tensor) else weight, x_sigma.detach().to(f64))
    if not bool((w >= 0).all()):
        raise ValueError(f"weight must be >= 0, got min {float(w.min()):.4g}")
    direction = (w * (score_fake.detach().to(f64) - score_real.detach().to(f64))).flatten(1)
    dtype = torch.promote_types(torch.promote_types(x_sigma.dtype, score_fake.dtype), score_real.dtype)
    return (direction * x_sigma.to(f64).flatten(1)).sum(dim=1).to(dtype)


def dmd_normalized_weight(x: Tensor, x0_real: Tensor, sigma: Union[float, Tensor]) -> Tensor:
    r"""DMD's per-sample gradient normalisation, expressed as the score weight for the clean output.

    DMD / DMD2 step the generator output :math:`x` along
    :math:`(\hat x_0^{fake} - \hat x_0^{real}) / \mathrm{mean}_d|x - \hat x_0^{real}|`, with the
    denoisers :math:`\hat x_0 = \mathbb E[x|x_\sigma] = (x_\sigma + \sigma^2 s(x_\sigma))/(1-\sigma)`
    (Tweedie in this package's convention).  Hence
    :math:`\hat x_0^{fake} - \hat x_0^{real} = \frac{\sigma^2}{1-\sigma}(s_{fake} - s_{real})` and
    DMD's update is :func:`distribution_matching_surrogate` on the *clean* ``x`` with

    .. math::
        w_i = \frac{\sigma_i^2}{(1-\sigma_i)\,\frac1D\sum_d |x_{i,d} - \hat x^{real}_{0,i,d}|}

    Args:
        x: ``(B, *event)`` generator output (clean).
        x0_real: ``(B, *event)`` teacher denoiser :math:`\hat x_0^{real}(x_\sigma)`.
        sigma: float or ``(B,)`` noise levels in ``(0, 1)``.

    Returns:
        ``(B,)`` detached weights.

    Reference: ``dmd`` (gradient normalisation), ``dmd2`` (public implementation).
    """
    x = check_tensor("x", x).detach()
    x0_real = check_tensor("x0_real", x0_real).detach()
    check_same_shape("x", x, "x0_real", x0_real)
    # sigma in float64 (1 - sigma of a float32-rounded sigma near 1 was off by up to 20 %)
    s = as_batch_tensor("sigma", sigma.detach() if isinstance(sigma, Tensor) else sigma, x.to(torch.float64)).flatten()
    if not bool(((s > 0) & (s < 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1), got min {float(s.min()):.4g}, max {float(s.max()):.4g}")
    norm = (x.to(torch.float64) - x0_real.to(torch.float64)).abs().flatten(1).mean(dim=1)
    if not bool((norm > 0).all()):
        raise ValueError("mean |x - x0_real| is 0 for some sample: DMD's normalisation is undefined there")
    return (s**2 / ((1.0 - s) * norm)).to(torch.promote_types(x.dtype, x0_real.dtype))
