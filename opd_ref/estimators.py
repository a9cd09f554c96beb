r"""Gradient estimators of the per-step reverse KL and their exact conditional moments (D5, D6).

Setting: at a fixed state ``x`` the student's kernel is :math:`\mathcal N(\mu_\theta, s^2 I)`, the
teacher's :math:`\mathcal N(\mu_T, s^2 I)`; the action is :math:`x' = \mu_\theta + s\varepsilon`,
:math:`\varepsilon\sim\mathcal N(0, I)`.  With :math:`J = \partial\mu_\theta/\partial\theta` (``D x P``),
:math:`\delta = (\mu_\theta - \mu_T)/s` and :math:`\mathrm{KL} = \|\delta\|^2/2`, every estimator
below has conditional mean :math:`\nabla_\theta\mathrm{KL} = J^\top\delta/s` and

============  =========================================================  ==========================================
estimator     per-sample gradient                                         conditional covariance
============  =========================================================  ==========================================
pathwise      :math:`J^\top\delta/s`                                      :math:`0`
ppo           :math:`J^\top\delta/s + \mathrm{KL}\,J^\top\varepsilon/s`   :math:`\mathrm{KL}^2 J^\top J/s^2`
k1            :math:`(\mathrm{KL}+\delta^\top\varepsilon) J^\top\varepsilon/s`  :math:`J^\top((\mathrm{KL}^2+2\mathrm{KL})I+\delta\delta^\top)J/s^2`
vopd          :math:`(\delta^\top\varepsilon)\, J^\top\varepsilon/s`      :math:`J^\top(2\mathrm{KL}\,I+\delta\delta^\top)J/s^2`
============  =========================================================  ==========================================

The surrogate functions return ``(B,)`` losses whose autograd gradient (per sample) *is* the
estimator; :func:`analytic_moments` gives the closed-form means and covariances (Isserlis' theorem).

Notation map: ``delta`` = :math:`\delta`, ``J`` = :math:`J`, ``s`` = step std, ``eps`` = :math:`\varepsilon`.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref._checks import check_positive_std, check_same_shape, check_tensor, sum_event
from opd_ref.divergences import gaussian_log_prob
from opd_ref.kernels import GaussianStep
from opd_ref.losses import check_clip_range, clipped_surrogate, opd_kl_loss

__all__ = [
    "ESTIMATORS",
    "pathwise_surrogate",
    "ppo_kl_surrogate",
    "k1_surrogate",
    "vopd_surrogate",
    "estimator_surrogate",
    "analytic_moments",
    "per_sample_grads",
]

ESTIMATORS: Tuple[str, ...] = ("pathwise", "ppo", "k1", "vopd")


_NO_ACTION = object()


def _check(student: GaussianStep, teacher_mean: Tensor, x_next: object = _NO_ACTION) -> None:
    if not isinstance(student, GaussianStep):
        raise TypeError(f"student must be a GaussianStep, got {type(student).__name__}")
    check_tensor("teacher_mean", teacher_mean)
    check_same_shape("student.mean", student.mean, "teacher_mean", teacher_mean)
    if x_next is not _NO_ACTION:
        check_tensor("x_next", x_next)
        check_same_shape("student.mean", student.mean, "x_next", x_next)


def pathwise_surrogate(student: GaussianStep, teacher_mean: Tensor) -> Tensor:
    r"""Pathwise estimator: the closed-form KL itself, :math:`\ell = \|\mu_\theta-\mu_T\|^2/(2s^2)`.

    .. math::
        \ell = \frac{\|\mu_\theta - \mathrm{sg}(\mu_T)\|^2}{2 s^2},\qquad
        \nabla_\theta\ell = \frac{J^\top(\mu_\theta - \mu_T)}{s^2} = J^\top\delta/s

    Args:
        student: student kernel at ``x`` (mean with grad).
        teacher_mean: ``(B, *event)``.

    Returns:
        ``(B,)`` whose gradient is :math:`J^\top\delta/s`.

    Reference: ``diffusionopd``.
    """
    _check(student, teacher_mean)
    return opd_kl_loss(student, teacher_mean)


def ppo_kl_surrogate(
    student: GaussianStep, teacher_mean: Tensor, x_next: Tensor, clip_range: float | None = None
) -> Tensor:
    r"""PPO-OPD: PPO surrogate with dense advantage :math:`A = -\mathrm{KL}_\theta(x)` (not detached),
    evaluated at :math:`\theta = \theta_{old}` (ratio 1).

    .. math::
        \nabla\ell_{PPO} = \nabla\mathrm{KL} + \mathrm{KL}\,\nabla\log\pi_\theta(x'|x)

    Args:
        student: student kernel (mean with grad).
        teacher_mean: ``(B, *event)``.
        x_next: ``(B, *event)`` the sampled action (detached inside).
        clip_range: PPO epsilon or ``None``; at ratio 1 clipping never binds.

    Returns:
        ``(B,)``.

    Reference: ``diffusionopd`` (PPO baseline), ``flowgrpo``.
    """
    check_clip_range(clip_range)
    _check(student, teacher_mean, x_next)
    student, x_next, dtype = _promoted(student, teacher_mean, x_next)
    advantage = -opd_kl_loss(student, teacher_mean.to(torch.float64))
    return clipped_surrogate(_score_at_old(student, x_next), advantage, clip_range).to(dtype)


def _score_at_old(student: GaussianStep, x_next: Tensor) -> Tensor:
    r"""``(B,)`` :math:`\log\pi_\theta(x') - \mathrm{sg}[\log\pi_\theta(x')]`: value exactly 0 (the log-ratio at
    :math:`\theta = \theta_{old}`), gradient :math:`\nabla_\theta\log\pi_\theta(x'|x)`.

    Written as :math:`\sum_i -\mathrm{sg}(z_i)(z_i - \mathrm{sg}(z_i)) - (\log s_i - \mathrm{sg}\log s_i)` with
    :math:`z = (x' - \mu_\theta)/s`, so a log-density beyond the float range never enters as ``inf - inf``.
    """
    std = check_positive_std("student.std", student.std, student.mean)
    z = (x_next.detach() - student.mean) / std
    log_std = torch.log(std)
    return sum_event(-z.detach() * (z - z.detach()) - (log_std - log_std.detach()))


def _promoted(student: GaussianStep, teacher_mean: Tensor, x_next: Tensor) -> Tuple[GaussianStep, Tensor, torch.dtype]:
    """The student kernel and action in float64 (differentiable casts), and the inputs' common dtype.

    The surrogates are formed in float64 and rounded once: their gradient ``A z / s`` with a detached
    advantage ``A`` beyond the float32 range was ``inf * 0 = NaN`` in float32 where ``z`` is 0, and the
    float64 product rounds to the right float32 value (0, finite, or inf beyond the range).
    """
    dtype = torch.promote_types(torch.promote_types(student.mean.dtype, teacher_mean.dtype), x_next.dtype)
    f64 = torch.float64
    return GaussianStep(student.mean.to(f64), student.std.to(f64)), x_next.to(f64), dtype


def _standardised_gaps(student: GaussianStep, teacher_mean: Tensor, x_next: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Detached :math:`\delta = (\mu_\theta - \mu_T)/s` and :math:`\varepsilon = (x' - \mu_\theta)/s`, elementwise.

    Both come from differences of nearby numbers taken once, so the log-ratio below never subtracts two
    large summed log-densities (in float32 at ``D = 65536`` that cancellation cost 0.2 nats).
    """
    with torch.no_grad():
        # float64: the per-dim products delta_i eps_i of extreme inputs overflow float32 and summed to
        # inf - inf; the (detached) advantage is rounded to the loss dtype only at the end
        f64 = torch.float64
        std = check_positive_std("student.std", student.std, student.mean).detach().to(f64)
        mean = student.mean.detach().to(f64)
        return (mean - teacher_mean.detach().to(f64)) / std, (x_next.detach().to(f64) - mean) / std


def _log_ratio(student: GaussianStep, teacher_mean: Tensor, x_next: Tensor) -> Tensor:
    r"""Detached sampled log-ratio :math:`\log\pi_\theta(x') - \log\pi_T(x') = \sum_i \delta_i(\varepsilon_i + \delta_i/2)`
    (same std), from the gaps without cancellation."""
    delta, eps = _standardised_gaps(student, teacher_mean, x_next)
    return sum_event(delta * (eps + 0.5 * delta))


def k1_surrogate(student: GaussianStep, teacher_mean: Tensor, x_next: Tensor) -> Tensor:
    r"""k1 REINFORCE (LLM-style OPD): advantage :math:`-(\log\pi_\theta - \log\pi_T)(x')`, detached.

    .. math::
        \ell = (\log\pi_\theta(x') - \log\pi_T(x'))_{\mathrm{sg}}\,\log\pi_\theta(x'|x),
        \qquad \nabla\ell = (\mathrm{KL} + \delta^\top\varepsilon)\,J^\top\varepsilon/s

    Args:
        student: student kernel (mean with grad).
        teacher_mean: ``(B, *event)``.
        x_next: ``(B, *event)`` sampled action.

    Returns:
        ``(B,)``.

    Reference: ``tm-opd`` (per-token reverse KL with the k1 estimator).
    """
    _check(student, teacher_mean, x_next)
    student, x_next, dtype = _promoted(student, teacher_mean, x_next)
    log_prob = gaussian_log_prob(x_next.detach(), student)
    return (_log_ratio(student, teacher_mean, x_next.detach()) * log_prob).to(dtype)


def vopd_surrogate(student: GaussianStep, teacher_mean: Tensor, x_next: Tensor) -> Tensor:
    r"""vOPD: k1 with its closed-form value as control variate, advantage
    :math:`-(\log\pi_\theta-\log\pi_T)(x') + \mathrm{KL}`, detached.

    .. math::
        \nabla\ell = (\delta^\top\varepsilon)\,J^\top\varepsilon/s

    Args:
        student: student kernel (mean with grad).
        teacher_mean: ``(B, *event)``.
        x_next: ``(B, *event)`` sampled action.

    Returns:
        ``(B,)``.

    Reference: ``vopd``.
    """
    _check(student, teacher_mean, x_next)
    student, x_next, dtype = _promoted(student, teacher_mean, x_next)
    log_prob = gaussian_log_prob(x_next.detach(), student)
    # the advantage log-ratio - KL is delta . eps exactly: formed directly, it has no cancellation
    delta, eps = _standardised_gaps(student, teacher_mean, x_next)
    return (sum_event(delta * eps) * log_prob).to(dtype)


def estimator_surrogate(
    name: str, student: GaussianStep, teacher_mean: Tensor, x_next: Tensor | None = None
) -> Tensor:
    r"""Dispatch to the surrogate named ``name`` (one of :data:`ESTIMATORS`), whose per-sample
    gradient is the estimator :math:`g_{\mathrm{name}}` of :math:`\nabla_\theta\mathrm{KL}` (D5).

    With :math:`\varepsilon = (x' - \mu_\theta)/s` and :math:`\delta = (\mu_\theta - \mu_T)/s`:

    .. math::
        g_{\mathrm{pathwise}} = J^\top\delta/s,\qquad
        g_{\mathrm{ppo}} = J^\top\delta/s + \mathrm{KL}\,J^\top\varepsilon/s,\qquad
        g_{\mathrm{k1}} = (\mathrm{KL} + \delta^\top\varepsilon)\,J^\top\varepsilon/s,\qquad
        g_{\mathrm{vopd}} = (\delta^\top\varepsilon)\,J^\top\varepsilon/s

    Args:
        name: ``"pathwise"``, ``"ppo"``, ``"k1"`` or ``"vopd"``.
        student, teacher_mean, x_next: as in the individual surrogates (``x_next`` unused by pathwise).

    Returns:
        ``(B,)`` surrogate loss.

    Reference: ``diffusionopd``, ``tm-opd``, ``vopd``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {ESTIMATORS}, got {type(name).__name__}")
    if name not in ESTIMATORS:
        raise ValueError(f"name must be one of {ESTIMATORS}, got {name!r}")
    if name == "pathwise":
        return pathwise_surrogate(student, teacher_mean)
    if x_next is None:
        raise ValueError(f"estimator {name!r} needs the sampled action x_next")
    if name == "ppo":
        return ppo_kl_surrogate(student, teacher_mean, x_next)
    if name == "k1":
        return k1_surrogate(student, teacher_mean, x_next)
    return vopd_surrogate(student, teacher_mean, x_next)


def analytic_moments(J: Tensor, delta: Tensor, s: Tensor | float) -> Dict[str, Tuple[Tensor, Tensor]]:
    r"""Exact conditional mean and covariance of each estimator given the state (D6).

    .. math::
        \mathbb E[g] = J^\top\delta/s,\quad
        \mathrm{Cov}_{ppo} = \frac{\mathrm{KL}^2}{s^2}J^\top J,\quad
        \mathrm{Cov}_{k1} = \frac{J^\top((\mathrm{KL}^2+2\mathrm{KL})I+\delta\delta^\top)J}{s^2},\quad
        \mathrm{Cov}_{vopd} = \frac{J^\top(2\mathrm{KL}\,I+\delta\delta^\top)J}{s^2}

    Args:
        J: ``(D, P)`` Jacobian of the student mean w.r.t. the parameters.
        delta: ``(D,)`` standardised mean gap ``(mu_theta - mu_T) / s``.
        s: positive step std (float or 0-d tensor).

    Returns:
        dict ``name -> (mean (P,), cov (P, P))`` for every name in :data:`ESTIMATORS`.

    Reference: ``diffusionopd`` (variance argument), ``vopd``; Isserlis' theorem.
    """
    J = check_tensor("J", J, min_dim=2)
    delta = check_tensor("delta", delta)
    if J.dim() != 2 or delta.dim() != 1 or J.shape[0] != delta.shape[0]:
        raise ValueError(f"J must be (D, P) and delta (D,), got {tuple(J.shape)} and {tuple(delta.shape)}")
    if isinstance(s, bool) or not isinstance(s, (int, float, Tensor)):
        raise TypeError(f"s must be a float or a 0-d tensor, got {type(s).__name__}")
    if isinstance(s, Tensor) and not torch.is_floating_point(s):
        raise TypeError(f"s must be a float or a floating 0-d tensor, got dtype {s.dtype}")
    s_t = torch.as_tensor(s, dtype=torch.float64, device=J.device)
    if s_t.dim() != 0 or not bool(torch.isfinite(s_t)) or not bool(s_t > 0):
        raise ValueError(f"s must be a positive finite scalar, got {s!r}")
    # computed in float64 (products of KL^2 and J^T J overflow float32 long before the result does,
    # and inf - inf was NaN) and returned in the inputs' precision
    out_dtype = torch.promote_types(J.dtype, delta.dtype)
    J, delta = J.to(torch.float64), delta.to(torch.float64)
    kl = 0.5 * (delta @ delta)
    mean = J.T @ delta / s_t
    JtJ = J.T @ J
    Jd = J.T @ delta
    outer = torch.outer(Jd, Jd)
    zero = torch.zeros_like(JtJ)
    moments = {
        "pathwise": (mean, zero),
        "ppo": (mean, kl**2 * JtJ / s_t**2),
        "k1": (mean, ((kl**2 + 2 * kl) * JtJ + outer) / s_t**2),
        "vopd": (mean, (2 * kl * JtJ + outer) / s_t**2),
    }
    return {k: (m.to(out_dtype), c.to(out_dtype)) for k, (m, c) in moments.items()}


def per_sample_grads(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    r"""Gradient of each entry of a ``(B,)`` loss w.r.t. ``params``, flattened and concatenated:
    row ``b`` is :math:`\nabla_\theta \ell_b` (the per-sample estimator of D5/D6, ``diffusionopd``).

    .. math::
        G_{b,\cdot} = g_b = \nabla_\theta \ell_b
            = \big[\mathrm{vec}(\nabla_{\theta_1}\ell_b), \dots, \mathrm{vec}(\nabla_{\theta_K}\ell_b)\big]
            \in \mathbb R^P,\qquad b = 1, \dots, B

    A parameter that ``loss[b]`` does not use contributes zeros.

    Args:
        loss: ``(B,)`` per-sample losses built from ``params`` (each sample's graph may share params).
        params: parameters (leaf tensors with ``requires_grad``).

    Returns:
        ``(B, P)`` per-sample gradients, ``P`` the total number of parameter entries.

    Reference: used by the D5/D6 tests and figures.
    """
    loss = check_tensor("loss", loss)
    if loss.dim() != 1:
        raise ValueError(f"loss must have shape (B,), got {tuple(loss.shape)}")
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty sequence of tensors with requires_grad=True")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: it was not built from params")
    rows = [torch.zeros(0, sum(p.numel() for p in params), dtype=loss.dtype, device=loss.device)]
    for i in range(loss.shape[0]):
        grads = torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
        ]))
    return torch.cat([rows[0]] + [r[None] for r in rows[1:]])

