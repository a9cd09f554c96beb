r"""Reward-tilted targets: the KL decomposition and importance-weighted estimators (derivation D7).

The target of KL-regularised reward fine-tuning is :math:`p^*(x) = p_{ref}(x)\,e^{r(x)/\beta}/Z` with
:math:`Z = \mathbb E_{p_{ref}}[e^{r/\beta}]`.  For any model :math:`q = p_\theta`,

.. math::
    \log\frac{q(x)}{p^*(x)} = \log\frac{q(x)}{p_{ref}(x)} - \frac{r(x)}{\beta} + \log Z
    \quad\Longrightarrow\quad
    \mathrm{KL}(q\|p^*) = \mathrm{KL}(q\|p_{ref}) - \frac{\mathbb E_q[r]}{\beta} + \log Z,

and :math:`\log Z` does not depend on :math:`\theta`, so minimising the reverse KL to :math:`p^*` is
maximising :math:`\mathbb E_q[r] - \beta\,\mathrm{KL}(q\|p_{ref})`.  Rewards under :math:`q` can be
estimated from reference samples: :math:`\mathbb E_q[r] = \mathbb E_{p_{ref}}[(q/p_{ref})\,r]`.

Everything here is a pure function of log-densities and rewards (per sample, ``(B,)``); the exact
densities come from the caller (e.g. ``toys.gmm``).  Notation map: :math:`q` -> ``log_q``,
:math:`p_{ref}` -> ``log_ref``, :math:`r` -> ``reward``, :math:`\beta` -> ``beta``,
:math:`\log Z` -> ``log_z``.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

from opd_ref._checks import check_batch_vector

__all__ = [
    "tilted_log_ratio",
    "tilted_kl_decomposition",
    "importance_weighted_reward",
    "self_normalised_weights",
    "log_partition_estimate",
]

ScalarLike = Union[float, Tensor]


def _beta(beta: object) -> ScalarLike:
    """Check ``beta`` is a finite scalar > 0 and return it unchanged (a tensor keeps its graph)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, Tensor)):
        raise TypeError(f"beta must be a positive float, got {type(beta).__name__}")
    if isinstance(beta, Tensor) and beta.numel() != 1:
        raise ValueError(f"beta must be a scalar, got shape {tuple(beta.shape)}")
    b = float(beta.detach()) if isinstance(beta, Tensor) else float(beta)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"beta must be a finite float > 0, got {b!r}")
    return beta


def _scalar(name: str, value: object) -> ScalarLike:
    """A finite float or a finite 0-d / one-element floating tensor, returned unchanged (graph kept)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not torch.is_floating_point(value):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        finite = bool(torch.isfinite(value))
    else:
        finite = math.isfinite(value)
    if not finite:
        raise ValueError(f"{name} must be finite, got {float(value)!r}")
    return value


def _tensor_or_float(name: str, value: object) -> ScalarLike:
    """A finite float or finite floating tensor of any shape (for the broadcasting decomposition)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if not torch.is_floating_point(value):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains non-finite values (shape {tuple(value.shape)})")
    elif not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _same_batch(**vectors: Tensor) -> int:
    batch = None
    for name, v in vectors.items():
        check_batch_vector(name, v, batch)
        batch = v.shape[0]
    assert batch is not None
    return batch


def tilted_log_ratio(
    log_q: Tensor, log_ref: Tensor, reward: Tensor, beta: ScalarLike, log_z: ScalarLike
) -> Tensor:
    r"""Pointwise log-ratio to the tilted target, :math:`\log q - \log p^*`.

    .. math::
        \log\frac{q(x)}{p^*(x)} = \log q(x) - \log p_{ref}(x) - \frac{r(x)}{\beta} + \log Z

    Its mean under :math:`x\sim q` is :math:`\mathrm{KL}(q\|p^*)`.

    Args:
        log_q: ``(B,)`` :math:`\log q(x)`.
        log_ref: ``(B,)`` :math:`\log p_{ref}(x)`.
        reward: ``(B,)`` :math:`r(x)`.
        beta: temperature ``> 0``.
        log_z: :math:`\log Z` (float or 0-d tensor).

    Returns:
        ``(B,)``.

    Reference: ``rtdmd``, ``crd`` (reward-tilted target :math:`p_{ref}e^{r/\beta}/Z`).
    """
    _same_batch(log_q=log_q, log_ref=log_ref, reward=reward)
    b = _beta(beta)
    # a (B, 1) log_z would broadcast (B,) to (B, B): only a scalar is accepted
    log_z = _scalar("log_z", log_z)
    return log_q - log_ref - reward / b + log_z


def tilted_kl_decomposition(
    kl_to_ref: ScalarLike, expected_reward: ScalarLike, beta: ScalarLike, log_z: ScalarLike
) -> ScalarLike:
    r"""Reverse KL to the tilted target from its three parts (D7).

    .. math::
        \mathrm{KL}(q\|p^*) = \mathrm{KL}(q\|p_{ref}) - \frac{\mathbb E_q[r]}{\beta} + \log Z

    Works on floats or tensors of any (broadcastable) shape, and keeps the autograd graph, so its
    gradient in :math:`q`'s parameters is :math:`\nabla\mathrm{KL}(q\|p_{ref}) - \nabla\mathbb E_q[r]/\beta`
    (:math:`\log Z` is a constant).

    Args:
        kl_to_ref: :math:`\mathrm{KL}(q\|p_{ref})`.
        expected_reward: :math:`\mathbb E_q[r]`.
        beta: temperature ``> 0``.
        log_z: :math:`\log Z`.

    Returns:
        :math:`\mathrm{KL}(q\|p^*)` (same type as the inputs).

    Reference: ``rtdmd``, ``crd``, ``diffusionopd`` (KL-regularised reward maximisation).
    """
    kl_to_ref = _tensor_or_float("kl_to_ref", kl_to_ref)
    expected_reward = _tensor_or_float("expected_reward", expected_reward)
    b = _beta(beta)
    log_z = _tensor_or_float("log_z", log_z)
    shapes = [tuple(t.shape) for t in (kl_to_ref, expected_reward, log_z) if isinstance(t, Tensor)]
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"kl_to_ref, expected_reward and log_z must broadcast together, got shapes {shapes}") from None
    return kl_to_ref - expected_reward / b + log_z


def importance_weighted_reward(
    log_q: Tensor, log_ref: Tensor, reward: Tensor
) -> Tuple[Tensor, Tensor]:
    r"""Unbiased importance-sampling estimate of :math:`\mathbb E_q[r]` from reference samples.

    .. math::
        \widehat{\mathbb E_q[r]} = \frac1B\sum_{i=1}^B \frac{q(x_i)}{p_{ref}(x_i)}\,r(x_i),
        \qquad x_i \sim p_{ref},

    with standard error :math:`\mathrm{sd}_i(w_i r_i)/\sqrt B` (sample sd).  The estimate is unbiased
    whenever :math:`q \ll p_{ref}`; it is differentiable in :math:`q`'s parameters through ``log_q``.

    Args:
        log_q: ``(B,)`` :math:`\log q(x_i)` at reference samples.
        log_ref: ``(B,)`` :math:`\log p_{ref}(x_i)`.
        reward: ``(B,)`` :math:`r(x_i)`.

    Returns:
        ``(estimate, standard_error)``, 0-d tensors; the standard error is ``inf`` for ``B = 1`` (no
        spread to estimate it from).

    Reference: ``rtdmd`` (importance form of the reward term), ``crd``.
    """
    batch = _same_batch(log_q=log_q, log_ref=log_ref, reward=reward)
    if batch == 0:
        raise ValueError("log_q must hold at least one sample (got shape (0,)): the estimate of an empty batch is undefined")
    terms = torch.exp(log_q - log_ref) * reward
    se = terms.detach().std() / math.sqrt(batch) if batch > 1 else torch.full_like(terms[0], float("inf"))
    return terms.mean(), se


def self_normalised_weights(log_w: Tensor) -> Tensor:
    r"""Self-normalised importance weights :math:`\bar w_i = w_i/\sum_j w_j` from log-weights.

    .. math::
        \bar w_i = \exp\big(\log w_i - \operatorname{logsumexp}_j \log w_j\big)

    For the tilted target from reference samples, :math:`\log w_i = r(x_i)/\beta` (the unknown
    :math:`Z` cancels); :math:`\sum_i\bar w_i f(x_i)` is a consistent estimate of
    :math:`\mathbb E_{p^*}[f]`.

    Args:
        log_w: ``(B,)`` unnormalised log-weights.

    Returns:
        ``(B,)`` non-negative weights summing to 1.

    Reference: ``rtdmd``, ``crd``.
    """
    check_batch_vector("log_w", log_w)
    return torch.softmax(log_w, dim=0)


def log_partition_estimate(reward: Tensor, beta: ScalarLike) -> Tensor:
    r"""Monte-Carlo :math:`\log Z = \log\mathbb E_{p_{ref}}[e^{r/\beta}]` from reference samples.

    .. math::
        \widehat{\log Z} = \operatorname{logsumexp}_i\big(r(x_i)/\beta\big) - \log B,\qquad x_i\sim p_{ref}

    Consistent; biased low for finite ``B`` (Jensen).

    Args:
        reward: ``(B,)`` rewards of reference samples.
        beta: temperature ``> 0``.

    Returns:
        0-d tensor.

    Reference: ``crd`` (the per-prompt normaliser :math:`\log Z(c)`), ``rtdmd``.
    """
    check_batch_vector("reward", reward)
    if reward.shape[0] == 0:
        raise ValueError("reward must hold at least one sample (got shape (0,)): log Z of an empty batch is undefined")
    b = _beta(beta)
    return torch.logsumexp(reward / b, dim=0) - math.log(reward.shape[0])
