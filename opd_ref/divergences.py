r"""Gaussian log-densities and closed-form KL divergences (derivation D1).

Everything here is per sample and **summed** over event dims (true densities), except the functions
whose names say otherwise (``*_dim_mean``, ``flowgrpo_*``), which reproduce what public codes compute.
"""

from __future__ import annotations

import math
from typing import Literal, Tuple

import torch
from torch import Tensor

from opd_ref._checks import (
    SigmaLike,
    as_batch_tensor,
    check_positive_std,
    check_same_shape,
    check_tensor,
    mean_event,
    sum_event,
)
from opd_ref.kernels import GaussianStep, _coefficients_f64, _mean_coefficients

__all__ = [
    "gaussian_log_prob",
    "gaussian_log_prob_dim_mean",
    "cps_log_prob_flowgrpo",
    "same_cov_kl",
    "diag_gaussian_kl",
    "flowgrpo_step_kl",
    "kernel_kl",
    "kernel_log_ratio",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


_sum_event = sum_event
_mean_event = mean_event


def _compute_dtype(*objs: object) -> torch.dtype:
    """The dtype a KL is computed in: the promotion of the floating tensors among ``objs``, at least float32.

    Python-float stds take no part (they are exact numbers, not rounded inputs) and half-precision
    inputs are computed in float32.
    """
    dtype = torch.float32
    for o in objs:
        if isinstance(o, Tensor) and torch.is_floating_point(o):
            dtype = torch.promote_types(dtype, o.dtype)
    return dtype


def _as_std(name: str, std: object, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """A strictly positive std broadcast to ``mean``, in the computing ``dtype``.

    Floats and 0-d tensors are shared by all samples; a 1-D tensor of length ``B`` is read as one std
    per sample (``(B,)`` -> ``(B, 1, ..., 1)``) whenever ``mean`` has event dims, never as a per-dim
    std; any other tensor must broadcast to ``mean`` (e.g. ``(B, 1, ..., 1)`` or ``(B, *event)``).
    A Python float is converted in ``dtype`` directly (before, it was rounded to the mean's dtype: a
    float std 1e-3 of a float32 mean against the same float std of a float64 mean gave a KL of 4.5e-15
    instead of 0).
    """
    if isinstance(std, bool) or not isinstance(std, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(std).__name__}")
    like = torch.empty(mean.shape, dtype=dtype, device=mean.device)
    if isinstance(std, Tensor) and torch.is_floating_point(std):
        std = std.to(dtype)
    if not isinstance(std, Tensor) or std.dim() == 0 or (std.dim() == 1 and mean.dim() > 1):
        std = as_batch_tensor(name, std, like)
    return check_positive_std(name, std, like)


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
    dtype = _compute_dtype(mean_p, mean_q, std)
    std = _as_std("std", std, mean_p, dtype)
    mean_p, mean_q = mean_p.to(dtype), mean_q.to(dtype)
    return 0.5 * _sum_event(((mean_p - mean_q) / std) ** 2)


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
    dtype = _compute_dtype(mean_p, std_p, mean_q, std_q)
    std_p = _as_std("std_p", std_p, mean_p, dtype)
    std_q = _as_std("std_q", std_q, mean_q, dtype)
    mean_p, mean_q = mean_p.to(dtype), mean_q.to(dtype)
    log_ratio = torch.log(std_q) - torch.log(std_p)  # log(s_q / s_p)
    # s_p^2/(2 s_q^2) - 1/2 = expm1(-2 log_ratio) / 2, exact 0 when the stds agree
    terms = log_ratio + 0.5 * torch.expm1(-2.0 * log_ratio) + 0.5 * ((mean_p - mean_q) / std_q) ** 2
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
    dtype = _compute_dtype(mean_p, mean_q, std_t)
    std_t = _as_std("std_t", std_t, mean_p, dtype)
    mean_p, mean_q = mean_p.to(dtype), mean_q.to(dtype)
    return 0.5 * _mean_event(((mean_p - mean_q) / std_t) ** 2)


def _velocity_gap(
    v_student: Tensor, v_teacher: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, noise_level: SigmaLike,
    kind: str, sigma_one: str, *others: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validated ``delta = (c_v / s)(v_s - v_t)`` (at least float32) and float64 ``(c_x, c_v / s, 1 / s)``."""
    v_student = check_tensor("v_student", v_student)
    v_teacher = check_tensor("v_teacher", v_teacher)
    check_same_shape("v_student", v_student, "v_teacher", v_teacher)
    if kind not in ("sde", "cps"):
        raise ValueError(f"kind must be 'sde' or 'cps' (the ODE step has no density), got {kind!r}")
    if sigma_one not in ("error", "flowgrpo"):
        raise ValueError(f"sigma_one must be 'error' or 'flowgrpo', got {sigma_one!r}")
    dtype = torch.promote_types(torch.promote_types(v_student.dtype, v_teacher.dtype), torch.float32)
    for other in others:
        dtype = torch.promote_types(dtype, other.dtype)
    ref = torch.zeros((v_student.shape[0],) + (1,) * (v_student.dim() - 1), dtype=torch.float64, device=v_student.device)
    s, sn, a = _coefficients_f64(ref, sigma, sigma_next, noise_level, kind, sigma_one)
    c_x, c_v, std = _mean_coefficients(s, sn, a, kind, sigma_one)
    if not bool((std > 0).all()):
        raise ValueError(
            f"noise_level and sigma_next must make the step std > 0 for a KL or log-ratio (got std "
            f"{float(std.min()):.3g}: noise_level = 0, or sigma_next = 0 for CPS)"
        )
    # the coefficients stay float64 until this one cast: only v_s - v_t is formed in the input precision
    gain = c_v / std
    delta = gain.to(dtype) * (v_student.to(dtype) - v_teacher.to(dtype))
    return delta, c_x, gain, 1.0 / std


def kernel_kl(
    v_student: Tensor,
    v_teacher: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    *,
    kind: Literal["sde", "cps"] = "sde",
    sigma_one: Literal["error", "flowgrpo"] = "error",
) -> Tensor:
    r"""Per-step KL between the student's and the teacher's kernels at the same state, from the
    velocity gap (no subtraction of two nearly equal means).

    Both kernels are :math:`\mathcal N(c_x x + c_v v, s^2 I)` (:func:`~opd_ref.kernels.kernel_coefficients`),
    so the state cancels exactly:

    .. math::
        \mathrm{KL}\big(\pi_\theta(\cdot|x)\,\|\,\pi_T(\cdot|x)\big)
            = \frac{c_v^2}{2 s^2}\,\|v_\theta - v_T\|^2
            = \tfrac12\sum_i \Big(\frac{c_v}{s}(v_{\theta,i} - v_{T,i})\Big)^2

    The coefficient :math:`c_v / s` is computed in float64 from the given sigmas and only the velocity
    difference is taken in the inputs' precision (at least float32): in float32 the relative error stays
    below 1e-4 for sigma in [1e-6, 0.9999] and steps down to 1e-5, where :func:`opd_kl_loss` on two
    float32 means loses up to all digits (measured on the Conventions page).

    Args:
        v_student: ``(B, *event)`` student velocity at ``x`` (carries the gradient).
        v_teacher: ``(B, *event)`` teacher velocity at the same ``x`` (not detached: detach it if only
            the student trains).
        sigma: float or ``(B,)``, as in :func:`~opd_ref.kernels.sde_step` / :func:`~opd_ref.kernels.cps_step`.
        sigma_next: float or ``(B,)`` in ``[0, sigma)`` (``> 0`` for CPS).
        noise_level: ``a > 0`` (``<= 1`` for CPS).
        kind: ``"sde"`` (default) or ``"cps"``.
        sigma_one: the SDE's rule at sigma = 1 (``"error"`` or ``"flowgrpo"``).

    Returns:
        ``(B,)`` KL per sample, summed over event dims (float32 for half-precision inputs).

    Reference: ``diffusionopd`` (closed-form per-step KL), ``flowgrpo`` (SDE kernel).
    """
    delta, _, _, _ = _velocity_gap(v_student, v_teacher, sigma, sigma_next, noise_level, kind, sigma_one)
    return 0.5 * _sum_event(delta**2)


def kernel_log_ratio(
    x_next: Tensor,
    x: Tensor,
    v_student: Tensor,
    v_teacher: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    *,
    kind: Literal["sde", "cps"] = "sde",
    sigma_one: Literal["error", "flowgrpo"] = "error",
) -> Tensor:
    r"""Log-ratio :math:`\log\pi_\theta(x'|x) - \log\pi_T(x'|x)` of two kernels at the same state, from
    the velocity gap and the student's standardised residual (no difference of two summed log-densities).

    With :math:`\delta = c_v(v_\theta - v_T)/s` and :math:`\varepsilon = (x' - c_x x - c_v v_\theta)/s`:

    .. math::
        \log\frac{\pi_\theta(x'|x)}{\pi_T(x'|x)} = \sum_i \frac{(x'_i-\mu_{T,i})^2 - (x'_i-\mu_{\theta,i})^2}{2s^2}
            = \sum_i \delta_i\Big(\varepsilon_i + \frac{\delta_i}{2}\Big)

    Its mean over :math:`x' \sim \pi_\theta` is :func:`kernel_kl`.  With ``v_teacher`` the behaviour
    policy's velocity it is the PPO log-ratio; with the teacher's it is the k1 advantage.  In float32 at
    ``D = 65536`` its absolute error stays below 1e-5, where the difference of two
    :func:`gaussian_log_prob` values is off by about 4e-3.

    Args:
        x_next: ``(B, *event)`` the sampled next state.
        x: ``(B, *event)`` the shared current state.
        v_student: ``(B, *event)`` student velocity at ``x``.
        v_teacher: ``(B, *event)`` the other policy's velocity at ``x``.
        sigma, sigma_next, noise_level, kind, sigma_one: as in :func:`kernel_kl`.

    Returns:
        ``(B,)`` log-ratio per sample, summed over event dims.

    Reference: ``tm-opd`` (sampled per-token log-ratio), ``flowgrpo`` (PPO ratio), ``diffusionopd``.
    """
    x_next = check_tensor("x_next", x_next)
    x = check_tensor("x", x)
    check_same_shape("x_next", x_next, "x", x)
    delta, c_x, gain, inv_std = _velocity_gap(
        v_student, v_teacher, sigma, sigma_next, noise_level, kind, sigma_one, x, x_next
    )
    check_same_shape("x", x, "v_student", v_student)
    # the residual x' - c_x x - c_v v_s is a difference of nearby numbers divided by a small s, and the
    # sum has D terms of both signs: both are formed in float64 (in float32 they cost 4e-5 at
    # sigma = 1e-3, D = 65536) and only the result is rounded to the inputs' precision
    # each input is cast once, so that its gradient is accumulated in float64 and rounded once (two
    # casts of v_student rounded two gradients beyond the float32 range to +inf and -inf: NaN)
    f64 = torch.float64
    v_s = v_student.to(f64)
    eps = (x_next.to(f64) - c_x * x.to(f64)) * inv_std - gain * v_s
    delta64 = gain * (v_s - v_teacher.to(f64))
    return _sum_event(delta64 * (eps + 0.5 * delta64)).to(delta.dtype)
