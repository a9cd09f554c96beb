r"""Density ratio by classification: the noise-conditioned logistic discriminator (derivation D14).

A discriminator :math:`d_\phi(x, \sigma)` (a logit) is trained to tell noised student samples
:math:`x_\sigma \sim p_{\theta,\sigma}` (label 1, :math:`n_\theta` of them) from noised teacher samples
:math:`x_\sigma \sim p_{T,\sigma}` (label 0, :math:`n_T` of them) by the pooled logistic loss

.. math::
    \mathcal L(d) = \frac{1}{n_\theta + n_T}\Big[\sum_{i=1}^{n_\theta}\operatorname{sp}(-d(x^\theta_i))
        + \sum_{j=1}^{n_T}\operatorname{sp}(d(x^T_j))\Big],\qquad \operatorname{sp}(u) = \log(1 + e^u).

Its population version :math:`\int \pi_\theta p_{\theta,\sigma}\operatorname{sp}(-d) + \pi_T
p_{T,\sigma}\operatorname{sp}(d)\,dx` (:math:`\pi_\theta = n_\theta/(n_\theta + n_T)`) is minimised
pointwise, at every :math:`x`, by the Bayes-optimal logit

.. math::
    d^*(x, \sigma) = \log\frac{p_{\theta,\sigma}(x)}{p_{T,\sigma}(x)} + \log\frac{n_\theta}{n_T},

so a trained discriminator estimates the log density ratio that DMD (D10) and Di-Bregman (D11) need,
and its input gradient estimates :math:`\nabla_x\log r = s_{fake} - s_{real}` (Diffusion-GAN; Di-Bregman's
"r estimated via a lightweight discriminator").  The non-saturating generator loss of Diffusion-GAN
at that logit is :math:`\operatorname{sp}(\log r)` (the teacher's class probability is
:math:`1/(1 + r)`); its gradient :math:`\frac{r}{1+r}\nabla_x\log r` is the Di-Bregman gradient with
weight :math:`h''(r)\,r = r/(1+r)`, the gradient of :math:`\mathrm{KL}(p_\theta\|p_T) - 2\,\mathrm{JS}(p_\theta, p_T)`.

Notation map: ``logit_student`` / ``logit_teacher`` -> :math:`d` at student / teacher samples,
``n_student`` / ``n_teacher`` -> :math:`n_\theta` / :math:`n_T`, ``log_ratio`` -> :math:`\log r`.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple, Union

import torch
from torch import Tensor
from torch.nn.functional import softplus

from opd_ref._checks import as_batch_tensor, check_tensor

__all__ = [
    "discriminator_logistic_loss",
    "log_prior_ratio",
    "bayes_optimal_logit",
    "logit_to_log_ratio",
    "discriminator_log_ratio",
    "gan_generator_loss",
]


def _check_count(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be a positive int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n}")
    return n


def log_prior_ratio(n_student: int, n_teacher: int) -> float:
    r"""The log prior ratio :math:`\log(n_\theta / n_T)` the Bayes-optimal logit carries.

    .. math::
        \log\frac{\pi_\theta}{\pi_T} = \log\frac{n_\theta}{n_T}

    Args:
        n_student: number :math:`n_\theta` of student samples per discriminator batch (positive int).
        n_teacher: number :math:`n_T` of teacher samples per discriminator batch (positive int).

    Returns:
        A Python float.

    Reference: ``diffusiongan``.
    """
    return math.log(_check_count("n_student", n_student)) - math.log(_check_count("n_teacher", n_teacher))


def discriminator_logistic_loss(logit_student: Tensor, logit_teacher: Tensor) -> Tensor:
    r"""Pooled logistic (binary cross-entropy) loss of a student-vs-teacher discriminator.

    .. math::
        \mathcal L = \frac{1}{n_\theta + n_T}\Big[\sum_{i=1}^{n_\theta}\operatorname{sp}(-d^\theta_i)
            + \sum_{j=1}^{n_T}\operatorname{sp}(d^T_j)\Big]

    Student samples have label 1 (the logit is the student's log-odds).  The pooled mean makes the
    class prior :math:`n_\theta/(n_\theta + n_T)`; its minimiser is :func:`bayes_optimal_logit`.

    Args:
        logit_student: ``(n_student,)`` logits :math:`d(x^\theta_i, \sigma_i)` at noised student samples.
        logit_teacher: ``(n_teacher,)`` logits :math:`d(x^T_j, \sigma_j)` at noised teacher samples.

    Returns:
        0-d tensor.

    Reference: ``diffusiongan``, ``dibregman``.
    """
    logit_student = check_tensor("logit_student", logit_student)
    logit_teacher = check_tensor("logit_teacher", logit_teacher)
    for name, t in (("logit_student", logit_student), ("logit_teacher", logit_teacher)):
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (n,), got {tuple(t.shape)}")
    n = logit_student.shape[0] + logit_teacher.shape[0]
    if n == 0:
        raise ValueError("logit_student and logit_teacher are both empty: the loss is a mean over no samples")
    return (softplus(-logit_student).sum() + softplus(logit_teacher).sum()) / n


def bayes_optimal_logit(
    log_p_student: Tensor, log_p_teacher: Tensor, n_student: int = 1, n_teacher: int = 1
) -> Tensor:
    r"""The logit minimising the population logistic loss at every point.

    .. math::
        d^*(x, \sigma) = \log p_{\theta,\sigma}(x) - \log p_{T,\sigma}(x) + \log\frac{n_\theta}{n_T}

    Args:
        log_p_student: :math:`\log p_{\theta,\sigma}(x)`, any shape.
        log_p_teacher: :math:`\log p_{T,\sigma}(x)`, same shape.
        n_student, n_teacher: class counts of the discriminator batch (default balanced).

    Returns:
        Tensor of the shape of ``log_p_student``.

    Reference: ``diffusiongan``.
    """
    log_p_student = check_tensor("log_p_student", log_p_student, min_dim=0)
    log_p_teacher = check_tensor("log_p_teacher", log_p_teacher, min_dim=0)
    if log_p_student.shape != log_p_teacher.shape:
        raise ValueError(
            f"log_p_teacher must have the shape of log_p_student {tuple(log_p_student.shape)}, "
            f"got {tuple(log_p_teacher.shape)}"
        )
    return log_p_student - log_p_teacher + log_prior_ratio(n_student, n_teacher)


def logit_to_log_ratio(logit: Tensor, n_student: int = 1, n_teacher: int = 1) -> Tensor:
    r"""The log density ratio a discriminator logit estimates: the logit minus the log prior ratio.

    .. math::
        \log\hat r(x, \sigma) = d(x, \sigma) - \log\frac{n_\theta}{n_T}

    Args:
        logit: discriminator logits, any shape (keeps its autograd graph).
        n_student, n_teacher: class counts the discriminator was trained with.

    Returns:
        Tensor of the shape of ``logit``.

    Reference: ``diffusiongan``, ``dibregman``.
    """
    return check_tensor("logit", logit, min_dim=0) - log_prior_ratio(n_student, n_teacher)


def discriminator_log_ratio(
    logit_fn: Callable[[Tensor, Tensor], Tensor],
    x_sigma: Tensor,
    sigma: Union[float, Tensor],
    n_student: int = 1,
    n_teacher: int = 1,
) -> Tuple[Tensor, Tensor]:
    r"""Log-ratio and its input gradient from a discriminator: the learned inputs of D10/D11.

    .. math::
        \log\hat r = d(x_\sigma, \sigma) - \log\frac{n_\theta}{n_T},\qquad
        \nabla_x\log\hat r = \nabla_x d(x_\sigma, \sigma)\ \ (\approx s_{fake} - s_{real})

    Both are returned detached: pass ``grad`` as ``score_fake`` and zeros as ``score_real`` to
    :func:`opd_ref.bregman.bregman_generator_surrogate` (the gradient only uses their difference).

    Args:
        logit_fn: ``(x, sigma) -> (B,)`` logits, e.g. an MLP on :math:`(x, \sigma)`; called once.
        x_sigma: ``(B, *event)`` points (their graph, if any, is not used).
        sigma: float or ``(B,)`` noise levels, passed to ``logit_fn`` as a ``(B,)`` tensor.
        n_student, n_teacher: class counts the discriminator was trained with.

    Returns:
        ``(log_ratio, grad)`` of shapes ``(B,)`` and ``(B, *event)``.

    Reference: ``diffusiongan``, ``dibregman``.
    """
    if not callable(logit_fn):
        raise TypeError(f"logit_fn must be callable, got {type(logit_fn).__name__}")
    x = check_tensor("x_sigma", x_sigma).detach().requires_grad_(True)
    s = as_batch_tensor("sigma", sigma.detach() if isinstance(sigma, Tensor) else sigma, x).reshape(-1)
    s = s.expand(x.shape[0]) if s.numel() == 1 else s
    with torch.enable_grad():
        logit = logit_fn(x, s)
        if logit.shape != (x.shape[0],):
            raise ValueError(f"logit_fn must return shape ({x.shape[0]},), got {tuple(logit.shape)}")
        (grad,) = torch.autograd.grad(logit.sum(), x)
    return logit_to_log_ratio(logit.detach(), n_student, n_teacher), grad.detach()


def gan_generator_loss(log_ratio: Tensor) -> Tensor:
    r"""Diffusion-GAN's non-saturating generator loss at noised generator samples, per sample.

    .. math::
        \ell_i = -\log D_{real}(x_{\sigma,i}) = \operatorname{sp}(\log r_i) = \log(1 + r_i),\qquad
        \nabla_x\ell_i = \frac{r_i}{1 + r_i}\,\nabla_x\log r_i

    with :math:`D_{real} = 1/(1 + r)` the teacher-class probability of a balanced discriminator.  At
    the Bayes-optimal logit the batch mean's gradient is the Di-Bregman gradient with weight
    :math:`h''(r)\,r = r/(1+r)`, i.e. :math:`\nabla_\theta[\mathrm{KL}(p_{\theta,\sigma}\|p_{T,\sigma})
    - 2\,\mathrm{JS}(p_{\theta,\sigma}, p_{T,\sigma})]` (D14).

    Args:
        log_ratio: ``(B,)`` :math:`\log r` at the generator's noised samples, carrying the graph to the
            generator (e.g. a frozen discriminator's logit minus the log prior ratio).

    Returns:
        ``(B,)``.

    Reference: ``diffusiongan``.
    """
    log_ratio = check_tensor("log_ratio", log_ratio)
    if log_ratio.dim() != 1:
        raise ValueError(f"log_ratio must have shape (B,), got {tuple(log_ratio.shape)}")
    return softplus(log_ratio)
