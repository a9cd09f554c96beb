r"""Bregman density-ratio matching, Di-Bregman (derivation D11).

With the density ratio :math:`r(x) = p_\theta(x)/p_T(x)` and a strictly convex :math:`h`, the
objective is the expected pointwise Bregman divergence of :math:`r` to 1 under the teacher:

.. math::
    \mathcal L_h(\theta) = \mathbb E_{p_T}\big[D_h(r\,\|\,1)\big],\qquad
    D_h(r\|r^*) = h(r) - h(r^*) - h'(r^*)(r - r^*).

Since :math:`\mathbb E_{p_T}[r - 1] = 0`, :math:`\mathcal L_h = \mathbb E_{p_T}[h(r)] - h(1)`, the
f-divergence with generator :math:`h`.  For a generator :math:`x = G_\theta(z)`,

.. math::
    \nabla_\theta \mathcal L_h = \mathbb E_{z}\Big[h''(r)\,r\;\nabla_x \log r(x)^\top
        \frac{\partial x}{\partial\theta}\Big],\qquad \nabla_x\log r = s_{fake} - s_{real},

the DMD gradient (D10) reweighted by :math:`h''(r)\,r` (equal to 1 for :math:`h = r\log r`).
Applied to the noised marginals at level sigma it is the per-noise-level Di-Bregman gradient.

Notation map: ``log_ratio`` -> :math:`\log r` (taken in log space for stability), ``h`` -> a
:class:`BregmanH` (``KL``, ``REVERSE_KL``, ``PEARSON_CHI2``, ``JENSEN_SHANNON``).
Named divergences are between the student :math:`p_\theta` and the teacher :math:`p_T`:
``KL`` is :math:`\mathrm{KL}(p_\theta\|p_T)` (DMD's mode-seeking KL) and ``REVERSE_KL`` is
:math:`\mathrm{KL}(p_T\|p_\theta)`, following dibregman's naming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from opd_ref._checks import as_batch_tensor, check_tensor
from opd_ref.distribution_matching import distribution_matching_surrogate

__all__ = [
    "BregmanH",
    "KL",
    "REVERSE_KL",
    "PEARSON_CHI2",
    "JENSEN_SHANNON",
    "H_FAMILY",
    "get_h",
    "bregman_divergence",
    "bregman_gradient_weight",
    "bregman_generator_surrogate",
]


@dataclass(frozen=True)
class BregmanH:
    """A convex generator :math:`h` with :math:`h(1) = 0`, given as functions of :math:`\\log r`.

    With :math:`\\ell = \\log r` and :math:`r = p_\\theta / p_T`, the fields compute

    .. math::
        \\mathtt{h}(\\ell) = h(e^\\ell),\\quad \\mathtt{h\\_prime}(\\ell) = h'(e^\\ell),\\quad
        \\mathtt{grad\\_weight}(\\ell) = h''(e^\\ell)\\,e^\\ell,\\qquad
        \\mathbb E_{p_T}[D_h(r\\|1)] = \\mathbb E_{p_T}[h(r)] \\ \\ (h(1) = 0,\\ \\mathbb E_{p_T}[r] = 1)

    Attributes:
        name: key in :data:`H_FAMILY`.
        divergence: the divergence :math:`\\mathbb E_{p_T}[D_h(r\\|1)]` equals (text).
        h: :math:`\\log r \\mapsto h(r)`.
        h_prime: :math:`\\log r \\mapsto h'(r)`.
        grad_weight: :math:`\\log r \\mapsto h''(r)\\,r`.
        divergence_fn: optional :math:`(\\log r, \\log r^*) \\mapsto D_h(r\\|r^*)` in a form without
            overflow or cancellation (the family's members have one); ``None`` uses the definition
            :math:`h(r) - h(r^*) - h'(r^*)(r - r^*)`, which loses precision near :math:`r = r^*` and gives
            ``inf - inf`` where :math:`r` overflows.
        divergence_grad: optional :math:`(\\log r, \\log r^*) \\mapsto (\\partial D/\\partial\\log r,
            \\partial D/\\partial\\log r^*) = \\big(r\\,(h'(r) - h'(r^*)),\\ -h''(r^*)\\,r^*(r - r^*)\\big)` in a
            stable form; with ``divergence_fn`` it is the backward pass of :func:`bregman_divergence`
            (autograd through the stable forward gave NaN, ``inf * 0``, wherever :math:`D` overflows).

    Reference: ``dibregman``.
    """

    name: str
    divergence: str
    h: Callable[[Tensor], Tensor]
    h_prime: Callable[[Tensor], Tensor]
    grad_weight: Callable[[Tensor], Tensor]
    divergence_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    divergence_grad: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None

    def __post_init__(self) -> None:
        for field_name in ("name", "divergence"):
            if not isinstance(getattr(self, field_name), str):
                raise TypeError(f"BregmanH.{field_name} must be a str, got {type(getattr(self, field_name)).__name__}")
        for field_name in ("h", "h_prime", "grad_weight"):
            if not callable(getattr(self, field_name)):
                raise TypeError(f"BregmanH.{field_name} must be callable, got {type(getattr(self, field_name)).__name__}")
        for field_name in ("divergence_fn", "divergence_grad"):
            if getattr(self, field_name) is not None and not callable(getattr(self, field_name)):
                raise TypeError(
                    f"BregmanH.{field_name} must be callable or None, got {type(getattr(self, field_name)).__name__}"
                )


_LOG2 = math.log(2.0)

# Stable closed forms of D_h(r || r*) in log space, d = log r - log r*.  Near d = 0 the definition
# cancels to second order (relative error ~ eps / d^2), so |d| < 1 uses a power series (or, for JS,
# Gauss-Legendre quadrature of an integral form); large |d| works with logarithms so that an
# overflowing r never meets another inf.  Each branch sees only inputs safe for it (where-gradients
# stay finite).
_SERIES_TERMS = 20
_GL_NODES, _GL_WEIGHTS = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(12))


def _split(small: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
    """``d`` where ``small`` (else 0), and ``d`` where not ``small`` (else 1): safe branch inputs."""
    return torch.where(small, d, torch.zeros_like(d)), torch.where(small, torch.ones_like(d), d)


def _series(d: Tensor, coef: Callable[[int], float]) -> Tensor:
    r""":math:`\sum_{n=2}^{N} c_n d^n` by Horner (``|d| < 1``: truncation below ``1 / N!``)."""
    acc = torch.zeros_like(d)
    for n in range(_SERIES_TERMS, 1, -1):
        acc = acc * d + coef(n)
    return acc * d * d


def _exp_of_log(log_value: Tensor, positive: Tensor) -> Tensor:
    """``exp(log_value)`` where ``positive``, exactly 0 elsewhere (``log_value`` may be -inf there)."""
    safe = torch.where(positive, log_value, torch.zeros_like(log_value))
    return torch.where(positive, torch.exp(safe), torch.zeros_like(safe))


def _kl_divergence(lr: Tensor, lrs: Tensor) -> Tensor:
    r""":math:`D = e^{\ell^*}\varphi(d)`, :math:`\varphi(d) = e^d(d - 1) + 1 = \sum_{n\ge2}(n-1)d^n/n!`;
    for :math:`d \ge 1`, :math:`\log D = \ell + \log(d - 1 + e^{-d})`."""
    d = lr - lrs
    small = d.abs() < 1.0
    d_s, d_l = _split(small, d)
    phi_small = _series(d_s, lambda n: (n - 1) / math.factorial(n))
    big = d_l > 0
    d_b = torch.where(big, d_l, torch.ones_like(d_l))
    d_n = torch.where(big, -torch.ones_like(d_l), d_l)
    log_d_large = torch.where(
        big, lr + torch.log(d_b - 1.0 + torch.exp(-d_b)), lrs + torch.log1p(torch.exp(d_n) * (d_n - 1.0))
    )
    positive = torch.where(small, phi_small > 0, torch.ones_like(small))
    log_d_small = lrs + torch.log(torch.where(positive, phi_small, torch.ones_like(d)))
    return _exp_of_log(torch.where(small, log_d_small, log_d_large), positive)


def _reverse_kl_divergence(lr: Tensor, lrs: Tensor) -> Tensor:
    r""":math:`D = e^d - 1 - d = \sum_{n\ge2} d^n/n!` (independent of :math:`r^*`)."""
    d = lr - lrs
    small = d.abs() < 1.0
    d_s, d_l = _split(small, d)
    return torch.where(small, _series(d_s, lambda n: 1.0 / math.factorial(n)), torch.expm1(d_l) - d_l)


def _pearson_divergence(lr: Tensor, lrs: Tensor) -> Tensor:
    r""":math:`D = (r - r^*)^2 = \exp\big(2\max(\ell, \ell^*) + 2\log(1 - e^{-|d|})\big)`."""
    d = lr - lrs
    nonzero = d != 0
    d_abs = torch.where(nonzero, d.abs(), torch.ones_like(d))
    return _exp_of_log(2.0 * (torch.maximum(lr, lrs) + torch.log(-torch.expm1(-d_abs))), nonzero)


def _js_divergence(lr: Tensor, lrs: Tensor) -> Tensor:
    r"""Jensen-Shannon :math:`D`: quadrature of :math:`\tfrac12\int_0^d \sigma(\ell^*+u)(e^{d-u}-1)\,du` for
    :math:`|d| < 1`, else :math:`2D = \mathrm{sign}(d)\,(r|A| - |B|)` with
    :math:`|A| = |\mathrm{sp}(-\ell^*) - \mathrm{sp}(-\ell)| = \mathrm{sp}(y)`,
    :math:`|B| = |\mathrm{sp}(\ell) - \mathrm{sp}(\ell^*)| = \mathrm{sp}(z)`, where (``hi``/``lo`` the larger and
    smaller of :math:`\ell, \ell^*`, :math:`\delta = |d|`, :math:`L = \log(1 - e^{-\delta})`)

    .. math::
        y = -\mathrm{lo} - \mathrm{sp}(-\mathrm{hi}) + L,\qquad z = \mathrm{hi} - \mathrm{sp}(\mathrm{lo}) + L,\qquad
        \log(r|A|) = \max(d, 0) - \mathrm{sp}(-\mathrm{hi}) + L + \big[\log\mathrm{sp}(y) - y\big].

    Each is evaluated in the branch that does not subtract two large numbers: with
    :math:`\ell = 1.5\cdot10^{28}`, :math:`\ell^* = 2\cdot10^{30}` the former
    :math:`\ell + \log|A|` cancelled to :math:`\pm10^{21}` in float32 and gave :math:`-\infty` for
    :math:`D \approx 10^{30}`."""
    sp = torch.nn.functional.softplus
    d = lr - lrs
    small = d.abs() < 1.0
    d_s, d_l = _split(small, d)
    nodes = _GL_NODES.to(dtype=d.dtype, device=d.device)
    weights = _GL_WEIGHTS.to(dtype=d.dtype, device=d.device)
    u = 0.5 * d_s[..., None] * (nodes + 1.0)  # GL nodes on [0, d]
    integrand = torch.sigmoid(lrs[..., None] + u) * torch.expm1(d_s[..., None] - u)
    js_small = 0.25 * d_s * (weights * integrand).sum(-1)
    hi = torch.maximum(lr, lrs)
    lo = torch.minimum(lr, lrs)
    delta = d_l.abs()  # >= 1 where used
    L = torch.log(-torch.expm1(-delta))
    # z = hi - sp(lo) + L = delta - sp(-lo) + L; the second form where sp(lo) ~ lo is large (lo > 0)
    z = torch.where(lo > 0, delta - sp(-lo), hi - sp(lo)) + L
    js_large = 0.5 * torch.sign(d_l) * (torch.exp(_js_log_ra(lr, lrs)) - sp(z))
    return torch.where(small, js_small, js_large)


def _js_log_ra(lr: Tensor, lrs: Tensor) -> Tensor:
    r""":math:`\log(r|A|)`, :math:`|A| = |\mathrm{sp}(-\ell^*) - \mathrm{sp}(-\ell)| = \mathrm{sp}(y)`, for :math:`|d| \ge 1`
    (1 is used where :math:`|d| < 1`).  For :math:`y > 0`, :math:`\log\mathrm{sp}(y)` is moderate and
    :math:`\log r` is added as is; for :math:`y \le 0`, :math:`\log r + y = \max(d, 0) - \mathrm{sp}(-\mathrm{hi}) + L`
    exactly and :math:`\log\mathrm{sp}(y) - y \in (\log\log 2, 0]`."""
    sp = torch.nn.functional.softplus
    d = lr - lrs
    d_l = torch.where(d.abs() < 1.0, torch.ones_like(d), d)
    hi = torch.maximum(lr, lrs)
    lo = torch.minimum(lr, lrs)
    delta = d_l.abs()
    L = torch.log(-torch.expm1(-delta))
    y = torch.where(hi > 0, -lo - sp(-hi), delta - sp(hi)) + L
    neg = y <= 0
    y_n = torch.where(neg, y, -torch.ones_like(y))
    y_p = torch.where(neg, torch.ones_like(y), y)
    tiny = y_n < -30.0
    corr = torch.where(tiny, -0.5 * torch.exp(torch.where(tiny, y_n, torch.zeros_like(y_n))),
                       torch.log(sp(torch.where(tiny, -torch.ones_like(y_n), y_n))) - y_n)
    return torch.where(neg, torch.clamp(d_l, min=0.0) - sp(-hi) + L + corr, lr + torch.log(sp(y_p)))


def _signed_exp(sign: Tensor, log_abs: Tensor) -> Tensor:
    """``sign * exp(log_abs)``, exactly 0 where ``sign == 0`` (``log_abs`` may be -inf or anything there)."""
    nonzero = sign != 0
    return torch.where(nonzero, sign * torch.exp(torch.where(nonzero, log_abs, torch.zeros_like(log_abs))),
                       torch.zeros_like(log_abs))


def _log_r_gap(lr: Tensor, lrs: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``sign(d)`` and :math:`\log|r - r^*| = \max(\ell, \ell^*) + \log(1 - e^{-|d|})` (any value where d = 0)."""
    d = lr - lrs
    d_abs = torch.where(d != 0, d.abs(), torch.ones_like(d))
    return torch.sign(d), torch.maximum(lr, lrs) + torch.log(-torch.expm1(-d_abs))


def _kl_grad(lr: Tensor, lrs: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`\partial_\ell D = e^\ell d`, :math:`\partial_{\ell^*} D = -(r - r^*)`."""
    d = lr - lrs
    sign, log_gap = _log_r_gap(lr, lrs)
    return _signed_exp(torch.sign(d), lr + torch.log(torch.where(d != 0, d.abs(), torch.ones_like(d)))), -_signed_exp(sign, log_gap)


def _reverse_kl_grad(lr: Tensor, lrs: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`\partial_\ell D = e^d - 1 = -\partial_{\ell^*} D`."""
    g = torch.expm1(lr - lrs)
    return g, -g


def _pearson_grad(lr: Tensor, lrs: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`\partial_\ell D = 2r(r - r^*)`, :math:`\partial_{\ell^*} D = -2r^*(r - r^*)`."""
    sign, log_gap = _log_r_gap(lr, lrs)
    return 2.0 * _signed_exp(sign, lr + log_gap), -2.0 * _signed_exp(sign, lrs + log_gap)


def _js_grad(lr: Tensor, lrs: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`\partial_\ell D = \tfrac12 r A`, :math:`A = \mathrm{sp}(-\ell^*) - \mathrm{sp}(-\ell)
    = \log(1 + \sigma(-\ell)(e^d - 1))`, so :math:`rA = \sigma(\ell)(e^d - 1)\,\frac{\log(1+u)}{u}` with
    :math:`u = \sigma(-\ell)(e^d - 1)` for :math:`|d| < 1` (:func:`_js_log_ra` beyond);
    :math:`\partial_{\ell^*} D = -\tfrac12\sigma(-\ell^*)(r - r^*)`, whose log is
    :math:`\max(d, 0) - \mathrm{sp}(-\ell^*) + \log(1 - e^{-|d|})`."""
    sp = torch.nn.functional.softplus
    d = lr - lrs
    small = d.abs() < 1.0
    d_s, _ = _split(small, d)
    em1 = torch.expm1(d_s)
    u = torch.sigmoid(-lr) * em1
    u_safe = torch.where(u == 0, torch.ones_like(u), u)
    ratio = torch.where(u == 0, torch.ones_like(u), torch.log1p(u_safe) / u_safe)
    ra_small = torch.sigmoid(lr) * em1 * ratio
    ra_large = _signed_exp(torch.sign(d), _js_log_ra(lr, lrs))
    d_abs = torch.where(d != 0, d.abs(), torch.ones_like(d))
    g_star = -0.5 * _signed_exp(torch.sign(d), torch.clamp(d, min=0.0) - sp(-lrs) + torch.log(-torch.expm1(-d_abs)))
    return 0.5 * torch.where(small, ra_small, ra_large), g_star


class _StableBregman(torch.autograd.Function):
    """:math:`D_h(r\\|r^*)` from ``h.divergence_fn`` with the analytic gradient ``h.divergence_grad``."""

    @staticmethod
    def forward(ctx, lr: Tensor, lrs: Tensor, h: "BregmanH") -> Tensor:
        ctx.save_for_backward(lr, lrs)
        ctx.h = h
        return h.divergence_fn(lr, lrs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        lr, lrs = ctx.saved_tensors
        g_lr, g_lrs = ctx.h.divergence_grad(lr, lrs)
        # grad_out * g with 0 where grad_out is 0 (an unused output must not turn an infinite g into NaN)
        def chain(g: Tensor, like: Tensor) -> Tensor:
            prod = torch.where(grad_out == 0, torch.zeros_like(g), grad_out * g)
            return prod.to(like.dtype)

        return chain(g_lr, lr), chain(g_lrs, lrs), None


#: :math:`h = r\log r`: :math:`\mathrm{KL}(p_\theta\|p_T)`, weight 1 (DMD).
KL = BregmanH(
    "kl",
    "KL(p_theta || p_T)",
    h=lambda lr: torch.exp(lr) * lr,
    h_prime=lambda lr: lr + 1.0,
    grad_weight=lambda lr: torch.ones_like(lr),
    divergence_fn=_kl_divergence,
    divergence_grad=_kl_grad,
)
#: :math:`h = -\log r`: :math:`\mathrm{KL}(p_T\|p_\theta)`, weight :math:`1/r`.
REVERSE_KL = BregmanH(
    "reverse_kl",
    "KL(p_T || p_theta)",
    h=lambda lr: -lr,
    h_prime=lambda lr: -torch.exp(-lr),
    grad_weight=lambda lr: torch.exp(-lr),
    divergence_fn=_reverse_kl_divergence,
    divergence_grad=_reverse_kl_grad,
)
#: :math:`h = (r-1)^2`: Pearson :math:`\chi^2(p_\theta\|p_T)`, weight :math:`2r`.
PEARSON_CHI2 = BregmanH(
    "pearson_chi2",
    "Pearson chi^2(p_theta || p_T) = E_T[(r - 1)^2]",
    h=lambda lr: torch.expm1(lr) ** 2,
    h_prime=lambda lr: 2.0 * torch.expm1(lr),
    grad_weight=lambda lr: 2.0 * torch.exp(lr),
    divergence_fn=_pearson_divergence,
    divergence_grad=_pearson_grad,
)
#: :math:`h = \tfrac12[r\log\tfrac{2r}{1+r} + \log\tfrac{2}{1+r}]`: Jensen–Shannon, weight
#: :math:`1/(2(1+r))`.
JENSEN_SHANNON = BregmanH(
    "jensen_shannon",
    "JS(p_theta, p_T) = 1/2 KL(p_theta || m) + 1/2 KL(p_T || m), m = (p_theta + p_T)/2",
    h=lambda lr: 0.5 * (torch.exp(lr) * (_LOG2 + lr - torch.nn.functional.softplus(lr))
                        + _LOG2 - torch.nn.functional.softplus(lr)),
    h_prime=lambda lr: 0.5 * (_LOG2 + lr - torch.nn.functional.softplus(lr)),
    grad_weight=lambda lr: 0.5 * torch.sigmoid(-lr),
    divergence_fn=_js_divergence,
    divergence_grad=_js_grad,
)

H_FAMILY = {h.name: h for h in (KL, REVERSE_KL, PEARSON_CHI2, JENSEN_SHANNON)}


def get_h(h: Union[str, BregmanH]) -> BregmanH:
    r"""Look up a convex generator :math:`h` of the family by name.

    .. math::
        \text{kl}: h = r\log r,\quad \text{reverse\_kl}: h = -\log r,\quad
        \text{pearson\_chi2}: h = (r-1)^2,\quad
        \text{jensen\_shannon}: h = \tfrac12\Big[r\log\frac{2r}{1+r} + \log\frac{2}{1+r}\Big]

    Args:
        h: a :class:`BregmanH` (returned as is) or one of ``"kl"``, ``"reverse_kl"``,
            ``"pearson_chi2"``, ``"jensen_shannon"``.

    Returns:
        The :class:`BregmanH`; an unknown name raises ``ValueError`` listing the names.

    Reference: ``dibregman``.
    """
    if isinstance(h, BregmanH):
        return h
    if isinstance(h, str) and h in H_FAMILY:
        return H_FAMILY[h]
    raise ValueError(f"h must be a BregmanH or one of {sorted(H_FAMILY)}, got {h!r}")


def bregman_divergence(log_ratio: Tensor, h: Union[str, BregmanH], log_ratio_star: Optional[Tensor] = None) -> Tensor:
    r"""Pointwise Bregman divergence :math:`D_h(r\,\|\,r^*)`, elementwise.

    .. math::
        D_h(r\|r^*) = h(r) - h(r^*) - h'(r^*)\,(r - r^*) \;\ge 0

    With ``log_ratio_star=None`` it is :math:`D_h(r\|1)`; its expectation under :math:`p_T` is the
    named divergence of ``h`` (see :class:`BregmanH`).  Di-Bregman's general form uses a normalised
    reward ratio :math:`r^*`.

    Args:
        log_ratio: :math:`\log r`, any shape.
        h: a :class:`BregmanH` or its name.
        log_ratio_star: :math:`\log r^*`, same shape, or ``None`` for :math:`r^* = 1`.

    Returns:
        Tensor of the shape of ``log_ratio``.

    Reference: ``dibregman``.
    """
    h = get_h(h)
    log_ratio = check_tensor("log_ratio", log_ratio, min_dim=0)
    if log_ratio_star is None:
        log_ratio_star = torch.zeros_like(log_ratio)
    else:
        log_ratio_star = check_tensor("log_ratio_star", log_ratio_star, min_dim=0)
        if log_ratio_star.shape != log_ratio.shape:
            raise ValueError(
                f"log_ratio_star must have the shape of log_ratio {tuple(log_ratio.shape)}, "
                f"got {tuple(log_ratio_star.shape)}"
            )
    if h.divergence_fn is not None and h.divergence_grad is not None:
        return _StableBregman.apply(log_ratio, log_ratio_star, h)
    if h.divergence_fn is not None:
        return h.divergence_fn(log_ratio, log_ratio_star)
    r_minus_rs = torch.exp(log_ratio) - torch.exp(log_ratio_star)
    return h.h(log_ratio) - h.h(log_ratio_star) - h.h_prime(log_ratio_star) * r_minus_rs


def bregman_gradient_weight(log_ratio: Tensor, h: Union[str, BregmanH]) -> Tensor:
    r"""The Di-Bregman gradient weight :math:`h''(r)\,r`, elementwise.

    .. math::
        r\log r \mapsto 1,\quad -\log r \mapsto 1/r,\quad (r-1)^2 \mapsto 2r,\quad
        \mathrm{JS} \mapsto \frac{1}{2(1+r)}

    Args:
        log_ratio: :math:`\log r`, any shape.
        h: a :class:`BregmanH` or its name.

    Returns:
        Tensor of the shape of ``log_ratio`` (non-negative).

    Reference: ``dibregman``.
    """
    h = get_h(h)
    return h.grad_weight(check_tensor("log_ratio", log_ratio, min_dim=0))


def bregman_generator_surrogate(
    x_sigma: Tensor,
    score_fake: Tensor,
    score_real: Tensor,
    log_ratio: Tensor,
    h: Union[str, BregmanH],
    weight: Union[float, Tensor] = 1.0,
) -> Tensor:
    r"""Surrogate whose autograd gradient is the Di-Bregman generator gradient, per sample.

    .. math::
        \nabla_\theta \ell_i = w(\sigma_i)\,h''(r_i)\,r_i\,
            (s_{fake} - s_{real})(x_{\sigma,i})^\top \frac{\partial x_{\sigma,i}}{\partial\theta},
        \qquad r_i = \frac{p_{\theta,\sigma}(x_{\sigma,i})}{p_{T,\sigma}(x_{\sigma,i})}

    An unbiased estimate of :math:`\nabla_\theta\,\mathbb E_\sigma[w\,\mathbb E_{p_{T,\sigma}}
    D_h(r_\sigma\|1)]`; equals :func:`~opd_ref.distribution_matching.distribution_matching_surrogate`
    for ``h = KL``.

    Args:
        x_sigma: ``(B, *event)`` noised generator output, with the gradient.
        score_fake: ``(B, *event)`` generator-marginal score at ``x_sigma`` (detached).
        score_real: ``(B, *event)`` teacher score at ``x_sigma`` (detached).
        log_ratio: ``(B,)`` :math:`\log r` at ``x_sigma`` (exact on toys, a discriminator at scale).
        h: a :class:`BregmanH` or its name.
        weight: float or ``(B,)`` noise-level weight :math:`w(\sigma) \ge 0`.

    Returns:
        ``(B,)``.

    Reference: ``dibregman``.
    """
    h = get_h(h)
    x_sigma = check_tensor("x_sigma", x_sigma)
    log_ratio = check_tensor("log_ratio", log_ratio)
    if log_ratio.shape != (x_sigma.shape[0],):
        raise ValueError(f"log_ratio must have shape ({x_sigma.shape[0]},), got {tuple(log_ratio.shape)}")
    # the weight w h''(r) r in float64: in float32, 2 r (Pearson) overflowed at log r = 89 and was
    # rejected as a non-finite weight although the float64 surrogate is finite
    f64 = torch.float64
    w = as_batch_tensor("weight", weight.detach() if isinstance(weight, Tensor) else weight, x_sigma.detach().to(f64))
    if not bool((w >= 0).all()):
        raise ValueError(f"weight must be >= 0, got min {float(w.min()):.4g}")
    w = w.reshape(-1) if w.numel() != 1 else w.reshape(())
    grad_weight = h.grad_weight(log_ratio.detach().to(f64))
    if not bool(torch.isfinite(grad_weight).all()):
        raise ValueError(
            f"log_ratio up to {float(log_ratio.abs().max()):.4g} makes the {h.name} gradient weight h''(r) r "
            f"overflow float64 (the Di-Bregman gradient is not representable there)"
        )
    return distribution_matching_surrogate(x_sigma, score_fake, score_real, weight=w * grad_weight)
