r"""Per-step on-policy distillation losses (derivations D4, D5).

Each loss returns one value per sample, shape ``(B,)``; reduce (mean, sum, weighting over steps) in
the trainer.  Notation map: student kernel :math:`\pi_\theta(x'|x)` -> ``student``, teacher kernel
mean :math:`\mu_T(x)` -> ``teacher_mean``, PPO ratio :math:`r = \pi_\theta/\pi_{\theta_{old}}`.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor

from opd_ref._checks import (
    SigmaLike,
    as_batch_tensor,
    check_batch_vector,
    check_same_shape,
    check_sigma_pair,
    check_tensor,
    sum_event,
)
from opd_ref.divergences import same_cov_kl
from opd_ref.kernels import GaussianStep, _coefficients_f64, _mean_coefficients

__all__ = [
    "opd_kl_loss",
    "ode_matching_loss",
    "ppo_surrogate_loss",
    "sde_kl_rescaled",
    "deterministic_limit_weight",
]


def opd_kl_loss(student: GaussianStep, teacher_mean: Tensor, *, detach_teacher: bool = True) -> Tensor:
    r"""Closed-form per-step reverse KL between the student's and the teacher's kernels (pathwise).

    Student and teacher are taken at the same state ``x`` (on the student's rollout) and share the
    kernel std, so (D1, D2)

    .. math::
        \ell(\theta) = \mathrm{KL}\big(\pi_\theta(\cdot|x)\,\|\,\pi_T(\cdot|x)\big)
            = \frac{\|\mu_\theta(x) - \mu_T(x)\|^2}{2 s^2}.

    Its gradient is the pathwise estimator of D5 (zero conditional variance given ``x``).

    Args:
        student: the student's kernel at ``x`` (mean carries the gradient), std ``(B, 1, ...)`` > 0.
        teacher_mean: ``(B, *event)`` the teacher kernel's mean at the same ``x``.
        detach_teacher: cut ``teacher_mean`` from the graph (default), so only the student trains.

    Returns:
        ``(B,)`` KL per sample, summed over event dims.

    Reference: ``diffusionopd`` (closed-form KL objective), ``tm-opd``.
    """
    if not isinstance(student, GaussianStep):
        raise TypeError(f"student must be a GaussianStep, got {type(student).__name__}")
    teacher_mean = check_tensor("teacher_mean", teacher_mean)
    check_same_shape("student.mean", student.mean, "teacher_mean", teacher_mean)
    if detach_teacher:
        teacher_mean = teacher_mean.detach()
    return same_cov_kl(student.mean, teacher_mean, student.std)


def ode_matching_loss(x_next_student: Tensor, x_next_teacher: Tensor, *, detach_teacher: bool = True) -> Tensor:
    r"""Direct transition matching for the deterministic (ODE) sampler.

    .. math::
        \ell(\theta) = \tfrac12 \|x'_\theta - x'_T\|^2

    It is the ``a -> 0`` limit of ``s^2 KL`` between SDE kernels (D4): same gradient direction as the
    step-variance-rescaled closed-form KL.

    Args:
        x_next_student: ``(B, *event)`` the student's next state (e.g. :func:`~opd_ref.kernels.ode_step`).
        x_next_teacher: ``(B, *event)`` the teacher's next state from the same ``x``.
        detach_teacher: cut the teacher from the graph (default).

    Returns:
        ``(B,)`` summed over event dims.

    Reference: ``diffusionopd`` (ODE direct matching).
    """
    x_s = check_tensor("x_next_student", x_next_student)
    x_t = check_tensor("x_next_teacher", x_next_teacher)
    check_same_shape("x_next_student", x_s, "x_next_teacher", x_t)
    if detach_teacher:
        x_t = x_t.detach()
    return 0.5 * sum_event((x_s - x_t) ** 2)


def ppo_surrogate_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    clip_range: Optional[float] = None,
) -> Tensor:
    r"""PPO clipped surrogate, per sample.

    .. math::
        r = \exp(\log\pi_\theta - \log\pi_{\theta_{old}}),\qquad
        \ell = -\min\big(r A,\ \mathrm{clip}(r, 1-\epsilon, 1+\epsilon) A\big)

    ``advantage`` may carry gradient (e.g. ``A = -KL_theta``, D5): it is not detached.  With
    ``clip_range=None`` no clipping is applied (``ell = -r A``).

    Args:
        log_prob: ``(B,)`` log-prob of the sampled action under the current policy (with grad).
        old_log_prob: ``(B,)`` log-prob under the behaviour policy (treated as a constant: detached).
        advantage: ``(B,)``.
        clip_range: ``epsilon > 0`` or ``None``.

    Returns:
        ``(B,)`` loss per sample.

    Reference: ``flowgrpo`` (clipped objective), ``diffusionopd`` (PPO baseline), Schulman et al. (2017).
    """
    check_clip_range(clip_range)
    log_prob = check_batch_vector("log_prob", log_prob)
    old_log_prob = check_batch_vector("old_log_prob", old_log_prob, log_prob.shape[0])
    advantage = check_batch_vector("advantage", advantage, log_prob.shape[0])
    return clipped_surrogate(log_prob - old_log_prob.detach(), advantage, clip_range)


def check_clip_range(clip_range: object) -> None:
    """Require ``clip_range`` to be ``None`` or a positive finite float (``ValueError`` naming it)."""
    if clip_range is not None and (
        isinstance(clip_range, bool)
        or not isinstance(clip_range, (int, float))
        or not 0 < clip_range < float("inf")
    ):
        raise ValueError(f"clip_range must be a positive finite float or None, got {clip_range!r}")


def clipped_surrogate(log_ratio: Tensor, advantage: Tensor, clip_range: Optional[float]) -> Tensor:
    r"""The PPO formula on validated inputs (no checks): the engine's GRPO objective calls it too.

    .. math::
        \ell = -\min\big(rA,\ \mathrm{clip}(r, 1-\epsilon, 1+\epsilon)A\big),\qquad r = e^{\log r},
        \qquad \ell = 0 \text{ where } A = 0

    A zero advantage (a group whose rewards are all equal) gives exactly 0, also where the ratio
    overflows (``inf * 0`` would be NaN).

    Args:
        log_ratio: ``(B,)`` :math:`\log\pi_\theta - \log\pi_{old}` (with grad).
        advantage: ``(B,)``.
        clip_range: :math:`\epsilon` or ``None``.

    Returns:
        ``(B,)``.

    Reference: ``flowgrpo``.
    """
    # where A = 0 the log-ratio is masked *before* exp, so neither the value nor the gradient sees inf * 0;
    # r A is formed as sign(A) exp(log r + log|A|), finite wherever the product is (r may overflow alone)
    zero = advantage == 0
    log_ratio = torch.where(zero, torch.zeros_like(log_ratio), log_ratio)
    log_abs_adv = torch.log(torch.where(zero, torch.ones_like(advantage), advantage.abs()))

    def unclipped(lr: Tensor) -> Tensor:
        return torch.where(zero, torch.zeros_like(lr), torch.sign(advantage) * torch.exp(lr + log_abs_adv))

    if clip_range is None:
        return -unclipped(log_ratio)
    # the ratio is clipped in log space, and the branch min() does not pick gets a safe input: the
    # gradient 0 * exp(log r) of an unused overflowing exp was 0 * inf = NaN
    lo = math.log(1.0 - clip_range) if clip_range < 1.0 else -math.inf
    clipped = torch.exp(torch.clamp(log_ratio, lo, math.log1p(clip_range))) * advantage
    with torch.no_grad():
        use_clip = clipped < unclipped(log_ratio)
    return -torch.where(use_clip, clipped, unclipped(torch.where(use_clip, torch.zeros_like(log_ratio), log_ratio)))


def deterministic_limit_weight(sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    r"""Per-step weight left by rescaling the SDE KL by :math:`a^2` instead of :math:`s^2` (D4).

    .. math::
        w(\sigma, \sigma') = \frac{a^2}{s^2} = \frac{1-\sigma}{\sigma\,|\Delta t|},
        \qquad s^2 = a^2\,\frac{\sigma}{1-\sigma}\,|\Delta t|,\quad \Delta t = \sigma'-\sigma

    so that :math:`a^2\,\mathrm{KL} = w\cdot s^2\,\mathrm{KL}`, and as :math:`a\to 0`,
    :math:`a^2\,\mathrm{KL}\to w\cdot\tfrac12\|x'_\theta-x'_T\|^2`.

    Args:
        sigma: float or ``(B,)`` in ``(0, 1)``.
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.

    Returns:
        ``(B,)`` (or ``(1,)`` for floats) float64 weights.

    Reference: ``diffusionopd`` (deterministic regime), ``flowgrpo`` (SDE coefficient).
    """
    batch = next((v.shape[0] for v in (sigma, sigma_next) if isinstance(v, Tensor) and v.dim() == 1), 1)
    ref = torch.zeros(batch, 1, dtype=torch.float64)
    s = as_batch_tensor("sigma", sigma, ref).flatten()
    sn = as_batch_tensor("sigma_next", sigma_next, ref).flatten()
    check_sigma_pair(s, sn, allow_one=False)
    return (1.0 - s) / (s * (s - sn))


def sde_kl_rescaled(
    x: Tensor,
    v_student: Tensor,
    v_teacher: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    *,
    rescale: Literal["step_variance", "noise_level_squared"] = "step_variance",
    detach_teacher: bool = True,
) -> Tensor:
    r"""The closed-form SDE KL between student and teacher kernels at the same state, rescaled (D4).

    With both kernels from :func:`~opd_ref.kernels.sde_step` (same ``x``, ``sigma``, ``a``), step std
    :math:`s` and means :math:`\mu_\theta, \mu_T`:

    .. math::
        s^2\,\mathrm{KL} = \tfrac12\|\mu_\theta - \mu_T\|^2
            = \big(1+\tfrac{a^2}{2}\big)^2\,\tfrac12\|x'_\theta - x'_T\|^2_{\mathrm{Euler}},
        \qquad
        a^2\,\mathrm{KL} = \frac{1-\sigma}{\sigma|\Delta t|}\; s^2\,\mathrm{KL}.

    Both are computed without dividing by :math:`s^2`, so they are finite at ``a = 0``, where
    ``"step_variance"`` equals :func:`ode_matching_loss` of the two Euler steps exactly and
    ``"noise_level_squared"`` equals it times :func:`deterministic_limit_weight`.

    Args:
        x: ``(B, *event)`` shared state.
        v_student: ``(B, *event)`` student velocity (carries the gradient).
        v_teacher: ``(B, *event)`` teacher velocity.
        sigma: float or ``(B,)`` in ``(0, 1)``.
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.
        noise_level: ``a >= 0``.
        rescale: ``"step_variance"`` (multiply by :math:`s^2`) or ``"noise_level_squared"``
            (multiply by :math:`a^2`).
        detach_teacher: cut the teacher from the graph (default).

    Returns:
        ``(B,)`` rescaled KL, summed over event dims.

    Reference: ``diffusionopd`` (closed-form KL and ODE direct matching), ``flowgrpo`` (SDE kernel).
    """
    if rescale not in ("step_variance", "noise_level_squared"):
        raise ValueError(f"rescale must be 'step_variance' or 'noise_level_squared', got {rescale!r}")
    x = check_tensor("x", x)
    v_student = check_tensor("v_student", v_student)
    v_teacher = check_tensor("v_teacher", v_teacher)
    check_same_shape("x", x, "v_student", v_student)
    check_same_shape("x", x, "v_teacher", v_teacher)
    if detach_teacher:
        v_teacher = v_teacher.detach()
    ref = torch.zeros((x.shape[0],) + (1,) * (x.dim() - 1), dtype=torch.float64, device=x.device)
    s, sn, a = _coefficients_f64(ref, sigma, sigma_next, noise_level, "sde", "error")
    _, c_v, _ = _mean_coefficients(s, sn, a, "sde", "error")
    # the two means differ by c_v (v_s - v_t) exactly: no difference of two nearly equal means
    dtype = torch.promote_types(torch.promote_types(v_student.dtype, v_teacher.dtype), torch.float32)
    gap = c_v.to(dtype) * (v_student.to(dtype) - v_teacher.to(dtype))
    s2_kl = 0.5 * sum_event(gap**2)
    if rescale == "step_variance":
        return s2_kl
    w = deterministic_limit_weight(sigma, sigma_next).to(dtype=s2_kl.dtype, device=s2_kl.device)
    return w * s2_kl
