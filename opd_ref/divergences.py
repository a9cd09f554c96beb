r"""Gaussian log-densities and closed-form KL divergences (derivation D1).

Everything here is per sample and **summed** over event dims (true densities), except the functions
whose names say otherwise (``*_dim_mean``, ``flowgrpo_*``), which reproduce what public codes compute.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_ref._checks import as_batch_tensor, check_positive_std, check_same_shape, check_tensor
from opd_ref.kernels import GaussianStep

__all__ = [
    "gaussian_log_prob",
    "gaussian_log_prob_dim_mean",
    "cps_log_prob_flowgrpo",
    "same_cov_kl",
    "diag_gaussian_kl",
    "flowgrpo_step_kl",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _sum_event(t: Tensor) -> Tensor:
    """Sum over event dims; a ``(B,)`` tensor has a scalar event and is returned as is."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _mean_event(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _as_std(name: str, std: object, mean: Tensor) -> Tensor:
    """A strictly positive std broadcast to ``mean``.

    Floats and 0-d tensors are shared by all samples; a 1-D tensor of length ``B`` is read as one std
    per sample (``(B,)`` -> ``(B, 1, ..., 1)``) whenever ``mean`` has event dims, never as a per-dim
    std; any other tensor must broadcast to ``mean`` (e.g. ``(B, 1, ..., 1)`` or ``(B, *event)``).
    """
    if isinstance(std, bool) or not isinstance(std, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(std).__name__}")
    if not isinstance(std, Tensor) or std.dim() == 0 or (std.dim() == 1 and mean.dim() > 1):
        std = as_batch_tensor(name, std, mean)
    return check_positive_std(name, std, mean)


def _log_prob_terms(x_next: Tensor, step: GaussianStep) -> Tensor:
    if not isinstance(step, GaussianStep):
        raise TypeError(f"step must be a GaussianStep, got {type(step).__name__}")
    x_next = check_tensor("x_next", x_next)
    check_same_shape("x_next", x_next, "step.mean", step.mean)
    std = check_positive_std("step.std", step.std, step.mean)
    z = (x_next - step.mean) / std
    return -0.5 * z**2 - torch.log(std) - _LOG_SQRT_2PI


def gaussian_log_prob(x_next: Tensor, step: GaussianStep) -> Tensor:
    r"""Log-density of ``x_next`` under the kernel ``step``, summed over event dims.

    .. math::
        \log \pi(x'|x) = \sum_{i}\Big[-\frac{(x'_i - \mu_i)^2}{2 s_i^2} - \log s_i
            - \tfrac12\log 2\pi\Big]

    Args:
        x_next: ``(B, *event)`` sample.
        step: :class:`~opd_ref.kernels.GaussianStep` with strictly positive std.

    Returns:
        ``(B,)`` log-probabilities.

    Reference: ``diffusionopd``, ``flowgrpo`` (which average instead; see
    :func:`gaussian_log_prob_dim_mean`).
    """
    return _sum_event(_log_prob_terms(x_next, step))


def gaussian_log_prob_dim_mean(x_next: Tensor, step: GaussianStep) -> Tensor:
    r"""The per-dimension **mean** of the Gaussian log-density, as Flow-GRPO / DDPO / DiffusionOPD's
    public code compute it: :math:`\frac1D \log\pi(x'|x)`.

    .. math::
        \frac1D \log\pi(x'|x) = \frac1D\sum_{i=1}^{D}\Big[-\frac{(x'_i - \mu_i)^2}{2 s_i^2} - \log s_i
            - \tfrac12\log 2\pi\Big]

    Not a log-density: it equals :func:`gaussian_log_prob` divided by the number of event dims ``D``.
    The ratio ``exp(lp - lp_old)`` built from it is the true ratio raised to the power ``1/D``.

    Args:
        x_next: ``(B, *event)``.
        step: kernel with positive std.

    Returns:
        ``(B,)``.

    Reference: ``flowgrpo`` (public code).
    """
    return _mean_event(_log_prob_terms(x_next, step))


def cps_log_prob_flowgrpo(x_next: Tensor, step: GaussianStep) -> Tensor:
    r"""The CPS "log-prob" of the public CPS / DiffusionOPD code: :math:`-\frac1D\sum_i (x'_i-\mu_i)^2`.

    .. math::
        \widetilde{\log\pi}_{\mathrm{CPS}}(x'|x) = -\frac1D\sum_{i=1}^{D}(x'_i - \mu_i)^2

    It drops the variance ``2 s^2`` from the quadratic term, the ``-log s`` term and the constant,
    and averages over dims.  Kept only to measure its difference to :func:`gaussian_log_prob`.

    Args:
        x_next: ``(B, *event)``.
        step: kernel (its std is ignored, as in the public code).

    Returns:
        ``(B,)``.

    Reference: ``diffusionopd`` (public code), Wang & Yu (CPS).
    """
    if not isinstance(step, GaussianStep):
        raise TypeError(f"step must be a GaussianStep, got {type(step).__name__}")
    x_next = check_tensor("x_next", x_next)
    check_same_shape("x_next", x_next, "step.mean", step.mean)
    return -_mean_event((x_next - step.mean) ** 2)


def same_cov_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float) -> Tensor:
    r"""KL between two Gaussians sharing the isotropic (per-sample) covariance ``std^2 I``.

    .. math::
        \mathrm{KL}\big(\mathcal N(m_p, s^2 I)\,\|\,\mathcal N(m_q, s^2 I)\big)
            = \frac{\|m_p - m_q\|^2}{2 s^2}

    The Monte-Carlo noise cancels analytically: no sample is drawn.

    Args:
        mean_p: ``(B, *event)``.
        mean_q: ``(B, *event)``.
        std: float, ``(B,)`` or a tensor broadcastable to the means; strictly positive.

    Returns:
        ``(B,)`` KL, summed over event dims.

    Reference: ``diffusionopd`` (closed-form per-step KL), ``tm-opd``.
    """
    mean_p = check_tensor("mean_p", mean_p)
    mean_q = check_tensor("mean_q", mean_q)
    check_same_shape("mean_p", mean_p, "mean_q", mean_q)
    std = _as_std("std", std, mean_p)
    return _sum_event((mean_p - mean_q) ** 2 / (2.0 * std**2))


def diag_gaussian_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    r"""KL between diagonal Gaussians, summed over event dims (general cross-check of D1).

    .. math::
        \mathrm{KL}(p\|q) = \sum_i \Big[\log\frac{s_{q,i}}{s_{p,i}}
            + \frac{s_{p,i}^2 + (m_{p,i}-m_{q,i})^2}{2 s_{q,i}^2} - \frac12\Big]

    Written with ``log(s_q/s_p)`` and ``expm1`` so that equal stds give exactly the same-covariance
    form.

    Args:
        mean_p, mean_q: ``(B, *event)``.
        std_p, std_q: strictly positive; float, ``(B,)`` (one per sample) or broadcastable to the
            means (e.g. ``(B, *event)`` for a general diagonal covariance).

    Returns:
        ``(B,)``.

    Reference: ``diffusionopd``.
    """
    mean_p = check_tensor("mean_p", mean_p)
    mean_q = check_tensor("mean_q", mean_q)
    check_same_shape("mean_p", mean_p, "mean_q", mean_q)
    std_p = _as_std("std_p", std_p, mean_p)
    std_q = _as_std("std_q", std_q, mean_q)
    log_ratio = torch.log(std_q) - torch.log(std_p)  # log(s_q / s_p)
    # s_p^2/(2 s_q^2) - 1/2 = expm1(-2 log_ratio) / 2, exact 0 when the stds agree
    terms = log_ratio + 0.5 * torch.expm1(-2.0 * log_ratio) + (mean_p - mean_q) ** 2 / (2.0 * std_q**2)
    return _sum_event(terms)


def flowgrpo_step_kl(mean_p: Tensor, mean_q: Tensor, std_t: Tensor | float) -> Tensor:
    r"""Flow-GRPO's public per-step "KL": mean over dims, divided by ``2 std_t^2`` without ``|dt|``.

    .. math::
        \mathrm{KL}_{\mathrm{flowgrpo}} = \frac{1}{D}\sum_i \frac{(m_{p,i}-m_{q,i})^2}{2 (\sigma_t^{\mathrm{SDE}})^2}
            = \frac{|\Delta t|}{D}\,\mathrm{KL}_{\mathrm{exact}}

    where the exact KL (:func:`same_cov_kl`) uses the step std ``std_t sqrt(|dt|)``.

    Args:
        mean_p, mean_q: ``(B, *event)``.
        std_t: the diffusion coefficient ``a sqrt(sigma/(1-sigma))`` (not the step std); float,
            ``(B,)`` or broadcastable.

    Returns:
        ``(B,)``.

    Reference: ``flowgrpo`` (public code, KL-to-reference term).
    """
    mean_p = check_tensor("mean_p", mean_p)
    mean_q = check_tensor("mean_q", mean_q)
    check_same_shape("mean_p", mean_p, "mean_q", mean_q)
    std_t = _as_std("std_t", std_t, mean_p)
    return _mean_event((mean_p - mean_q) ** 2 / (2.0 * std_t**2))
