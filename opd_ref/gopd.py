r"""Generalized on-policy distillation, G-OPD / ExOPD (derivation D12).

OPD is KL-regularised RL with the dense reward :math:`\log\pi_T - \log\pi_{ref}` and weight 1:

.. math::
    \mathcal J_\lambda(\theta) = \mathbb E_{p_\theta}\Big[\log\frac{p_\theta}{p_{ref}}
        - \lambda\,\log\frac{p_T}{p_{ref}}\Big]
      = \mathrm{KL}(p_\theta\,\|\,p_\lambda) - \log Z_\lambda,\qquad
    p_\lambda = \frac{p_{ref}\,(p_T/p_{ref})^\lambda}{Z_\lambda}.

So the optimum is :math:`p_\lambda`; :math:`\lambda = 1` gives :math:`p_T` and
:math:`\mathcal J_1 = \mathrm{KL}(p_\theta\|p_T)` (plain OPD); :math:`\lambda > 1` extrapolates past
the teacher, :math:`\lambda \in (0, 1)` interpolates.  If :math:`p_T = p_{ref}e^{r/\beta}/Z` (a
reward-tilted teacher), :math:`p_\lambda = p_{ref}e^{\lambda r/\beta}/Z'`: the tilt with
:math:`\beta/\lambda`, a closed-form GMM on the toys.

Notation map: ``lam`` -> :math:`\lambda`; ``log_p_teacher`` -> :math:`\log p_T`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from opd_ref._checks import check_batch_vector, check_positive_std, check_same_shape, check_tensor, promote
from opd_ref.divergences import same_cov_kl
from opd_ref.kernels import GaussianStep

__all__ = [
    "gopd_reward",
    "gopd_log_target",
    "gopd_sample_loss",
    "gopd_step_loss",
    "gopd_target_gaussian",
]


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float, got {type(lam).__name__}")
    if not (0.0 <= lam < float("inf")):
        raise ValueError(f"lam (reward scale lambda) must be a finite float >= 0, got {lam!r}")
    return float(lam)


def gopd_reward(log_p_teacher: Tensor, log_p_ref: Tensor, lam: float = 1.0) -> Tensor:
    r"""The G-OPD reward :math:`\lambda\,[\log p_T(x) - \log p_{ref}(x)]`, per sample.

    .. math::
        r_\lambda(x_b) = \lambda\,\big[\log p_T(x_b) - \log p_{ref}(x_b)\big]

    Args:
        log_p_teacher: ``(B,)``.
        log_p_ref: ``(B,)``.
        lam: reward scale :math:`\lambda \ge 0` (1 = OPD).

    Returns:
        ``(B,)``.

    Reference: ``gopd``.
    """
    lam = _check_lam(lam)
    log_p_teacher = check_batch_vector("log_p_teacher", log_p_teacher)
    log_p_ref = check_batch_vector("log_p_ref", log_p_ref, log_p_teacher.shape[0])
    return lam * (log_p_teacher - log_p_ref)


def gopd_log_target(log_p_teacher: Tensor, log_p_ref: Tensor, lam: float = 1.0) -> Tensor:
    r"""Unnormalised log-density of the G-OPD optimum, :math:`\log p_{ref} + \lambda\log(p_T/p_{ref})`.

    .. math::
        \log\tilde p_\lambda = (1-\lambda)\log p_{ref} + \lambda \log p_T
        = \log p_\lambda + \log Z_\lambda

    Args:
        log_p_teacher: ``(B,)``.
        log_p_ref: ``(B,)``.
        lam: :math:`\lambda \ge 0`.

    Returns:
        ``(B,)``.

    Reference: ``gopd``.
    """
    return log_p_ref + gopd_reward(log_p_teacher, log_p_ref, lam)


def gopd_sample_loss(log_p_theta: Tensor, log_p_teacher: Tensor, log_p_ref: Tensor, lam: float = 1.0) -> Tensor:
    r"""Per-sample G-OPD objective on student samples :math:`x \sim p_\theta`.

    .. math::
        \ell(x) = \log p_\theta(x) - \log p_{ref}(x) - \lambda\,[\log p_T(x) - \log p_{ref}(x)],\qquad
        \mathbb E_{p_\theta}[\ell] = \mathrm{KL}(p_\theta\|p_\lambda) - \log Z_\lambda

    At :math:`\lambda = 1`, :math:`\ell = \log p_\theta - \log p_T`, the k1 integrand of OPD.  Its
    gradient needs the sampling path (pathwise, or a score-function surrogate in the trainer).

    Args:
        log_p_theta: ``(B,)`` student log-density of its own samples (carries the gradient).
        log_p_teacher: ``(B,)`` (detached).
        log_p_ref: ``(B,)`` (detached).
        lam: :math:`\lambda \ge 0`.

    Returns:
        ``(B,)``.

    Reference: ``gopd``, ``tm-opd`` (:math:`\lambda = 1`).
    """
    lam = _check_lam(lam)
    log_p_theta = check_batch_vector("log_p_theta", log_p_theta)
    log_p_teacher = check_batch_vector("log_p_teacher", log_p_teacher, log_p_theta.shape[0]).detach()
    log_p_ref = check_batch_vector("log_p_ref", log_p_ref, log_p_theta.shape[0]).detach()
    # two log-ratios, each a difference of log-densities of the same sample: no large intermediate
    # such as log_p_ref + lam * (...) that could overflow and meet another inf
    return (log_p_theta - log_p_ref) - lam * (log_p_teacher - log_p_ref)


def gopd_step_loss(student: GaussianStep, teacher_mean: Tensor, ref_mean: Tensor, lam: float = 1.0) -> Tensor:
    r"""Closed-form per-step G-OPD loss for kernels sharing the student's std.

    .. math::
        \ell = \mathrm{KL}(\pi_\theta\|\pi_{ref}) - \lambda\,\mathbb E_{\pi_\theta}
            \Big[\log\frac{\pi_T}{\pi_{ref}}\Big]
        = \lambda\,\mathrm{KL}(\pi_\theta\|\pi_T) + (1-\lambda)\,\mathrm{KL}(\pi_\theta\|\pi_{ref})
        = \frac{\|\mu_\theta - \mu_\lambda\|^2}{2s^2} + \lambda(1-\lambda)\frac{\|\mu_T-\mu_{ref}\|^2}{2s^2}

    with :math:`\mu_\lambda = \lambda\mu_T + (1-\lambda)\mu_{ref}`: the per-step optimum is the
    same-covariance kernel :math:`\propto \pi_{ref}^{1-\lambda}\pi_T^\lambda`.  ``lam=1`` is
    :func:`~opd_ref.losses.opd_kl_loss`.

    Args:
        student: student kernel at ``x`` (mean carries the gradient).
        teacher_mean: ``(B, *event)`` teacher kernel mean at ``x`` (detached).
        ref_mean: ``(B, *event)`` reference kernel mean at ``x`` (detached).
        lam: :math:`\lambda \ge 0`.

    Returns:
        ``(B,)``.

    Reference: ``gopd``, ``diffusionopd``.
    """
    lam = _check_lam(lam)
    if not isinstance(student, GaussianStep):
        raise TypeError(f"student must be a GaussianStep, got {type(student).__name__}")
    teacher_mean = check_tensor("teacher_mean", teacher_mean)
    ref_mean = check_tensor("ref_mean", ref_mean)
    check_same_shape("student.mean", student.mean, "teacher_mean", teacher_mean)
    check_same_shape("student.mean", student.mean, "ref_mean", ref_mean)
    if lam == 1.0:
        return same_cov_kl(student.mean, teacher_mean.detach(), student.std)
    check_positive_std("student.std", student.std, student.mean)
    out_dtype = torch.promote_types(torch.promote_types(student.mean.dtype, teacher_mean.dtype), ref_mean.dtype)
    # in float64 (rounded once at the end), and lam KL_T + (1 - lam) KL_ref summed elementwise with a per-sample scale c, so that two KLs that
    # overflow separately never give inf - inf (lam > 1) when their combination is finite
    # the std is cast before it is broadcast: the gradient of a shared std is a sum over the event and
    # batch, formed in float64 (in float32, per-entry gradients beyond the range summed to inf - inf)
    mean = student.mean.to(torch.float64)
    std = torch.broadcast_to(student.std.to(torch.float64), mean.shape)
    gap_t = ((mean - teacher_mean.detach().to(torch.float64)) / std).flatten(1)
    gap_r = ((mean - ref_mean.detach().to(torch.float64)) / std).flatten(1)
    if gap_t.shape[1] == 0:  # no event entries: both KLs are empty sums
        return gap_t.sum(1).to(out_dtype)
    c = torch.cat([gap_t, gap_r], 1).abs().amax(1, keepdim=True)
    c = torch.where(c > 0, c, torch.ones_like(c)).detach()
    q = (lam * (gap_t / c) ** 2 + (1.0 - lam) * (gap_r / c) ** 2).sum(1)
    c = c.squeeze(1)
    return (0.5 * q * c * c).to(out_dtype)


def gopd_target_gaussian(
    mean_teacher: Tensor, cov_teacher: Tensor, mean_ref: Tensor, cov_ref: Tensor, lam: float
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The G-OPD optimum for Gaussian teacher and reference, with its normaliser.

    .. math::
        p_\lambda = \mathcal N(m_\lambda, \Sigma_\lambda),\quad
        \Sigma_\lambda^{-1} = \lambda\Sigma_T^{-1} + (1-\lambda)\Sigma_{ref}^{-1},\quad
        m_\lambda = \Sigma_\lambda\big(\lambda\Sigma_T^{-1}m_T + (1-\lambda)\Sigma_{ref}^{-1}m_{ref}\big),

    .. math::
        \log Z_\lambda = \log\!\int p_{ref}^{1-\lambda}p_T^{\lambda}
        = \tfrac12 \eta^\top\Sigma_\lambda\eta + \tfrac12\log|2\pi\Sigma_\lambda|
          - \lambda\big(\tfrac12 m_T^\top\Sigma_T^{-1}m_T + \tfrac12\log|2\pi\Sigma_T|\big)
          - (1-\lambda)\big(\tfrac12 m_{ref}^\top\Sigma_{ref}^{-1}m_{ref} + \tfrac12\log|2\pi\Sigma_{ref}|\big)

    with :math:`\eta = \Sigma_\lambda^{-1}m_\lambda`.  Requires
    :math:`\lambda\Sigma_T^{-1} + (1-\lambda)\Sigma_{ref}^{-1} \succ 0` (always true for
    :math:`\lambda \in [0, 1]`; for :math:`\lambda > 1` the teacher must not be too much wider than
    the reference), otherwise :math:`p_\lambda` is not normalisable and a ``ValueError`` is raised.

    Args:
        mean_teacher: ``(d,)``.
        cov_teacher: ``(d, d)`` symmetric positive definite.
        mean_ref: ``(d,)``.
        cov_ref: ``(d, d)`` symmetric positive definite.
        lam: :math:`\lambda \ge 0`.

    Returns:
        ``(mean (d,), cov (d, d), log_Z ())``.

    Reference: ``gopd``.
    """
    lam = _check_lam(lam)
    m_t = check_tensor("mean_teacher", mean_teacher)
    m_r = check_tensor("mean_ref", mean_ref)
    d = m_t.shape[0]
    if m_t.dim() != 1 or m_r.shape != (d,):
        raise ValueError(f"mean_teacher and mean_ref must have shape (d,), got {tuple(m_t.shape)}, {tuple(m_r.shape)}")
    S_t = check_tensor("cov_teacher", cov_teacher, min_dim=2)
    S_r = check_tensor("cov_ref", cov_ref, min_dim=2)
    for name, S in (("cov_teacher", S_t), ("cov_ref", S_r)):
        if S.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(S.shape)}")
    m_t, m_r, S_t, S_r = promote(m_t, m_r, S_t, S_r)
    P_t, P_r = torch.linalg.inv(S_t), torch.linalg.inv(S_r)
    P = lam * P_t + (1.0 - lam) * P_r
    P = 0.5 * (P + P.T)
    L, info = torch.linalg.cholesky_ex(P)
    if int(info) != 0:
        raise ValueError(
            f"lam={lam} gives a precision lam*inv(cov_teacher) + (1-lam)*inv(cov_ref) that is not positive "
            f"definite (eigenvalues {torch.linalg.eigvalsh(P).tolist()}): p_ref (p_T/p_ref)^lam is not normalisable"
        )
    eta = lam * P_t @ m_t + (1.0 - lam) * P_r @ m_r
    cov = torch.cholesky_inverse(L)
    mean = cov @ eta
    log2pi = d * math.log(2.0 * math.pi)

    def _half_quad_logdet(m: Tensor, Pm: Tensor, S: Tensor) -> Tensor:
        return 0.5 * m @ Pm @ m + 0.5 * (log2pi + torch.logdet(S))

    log_z = (
        0.5 * eta @ mean
        + 0.5 * (log2pi - 2.0 * torch.log(torch.diagonal(L)).sum())
        - lam * _half_quad_logdet(m_t, P_t, S_t)
        - (1.0 - lam) * _half_quad_logdet(m_r, P_r, S_r)
    )
    return mean, cov, log_z
