r"""Di[M]O: one-step distillation of a masked diffusion model by token-level distribution matching (D19).

A masked diffusion model (MDM) has no probability-flow ODE and no score; Di[M]O (``dimo``) trains a
one-step generator :math:`\theta` by matching, token by token, the teacher MDM :math:`\phi` and the
generator's own posterior at *re-masked generator samples*:

1. draw an initial state :math:`x_{init}` (a hybrid of random and mask tokens), the generator's
   logits :math:`z_\theta = z_\theta(x_{init}) \in \mathbb R^{L\times V}` and tokens
   :math:`x_\theta^i \sim \mathrm{softmax}(z_\theta^i)`;
2. re-mask them by the forward process, :math:`\tilde x_t`, with masked positions :math:`M`;
3. at each :math:`i \in M` compare the teacher's token distribution
   :math:`p_\phi^i = p_\phi(x^i|\tilde x_t)` with the generator's posterior
   :math:`p_\theta(x^i|\tilde x_t)`, intractable, estimated by an auxiliary MDM :math:`p_\psi^i`
   trained on generator samples (:func:`dimo_psi_loss`), through the generalised Jeffrey divergence

.. math::
    D_\beta\big(p_\phi^i\,\|\,p_\psi^i\big) = (1-\beta)\,\mathrm{KL}\big(p_\phi^i\,\|\,p_\psi^i\big)
        + \beta\,\mathrm{KL}\big(p_\psi^i\,\|\,p_\phi^i\big),\qquad \beta\in[0, 1]

(:math:`\beta = 0` forward KL, mode covering; :math:`\beta = 1` reverse KL, mode seeking);

4. step the generator's logits along the gradient of :math:`D_\beta` with respect to the auxiliary
   model's logits :math:`z_\psi^i` (:func:`jeffrey_logit_gradient`, :func:`dimo_generator_surrogate`):

.. math::
    \frac{\partial D_\beta}{\partial z_\psi^i} = (1-\beta)\,(p_\psi^i - p_\phi^i)
        + \beta\,p_\psi^i\odot\Big(\log\frac{p_\psi^i}{p_\phi^i} - \mathrm{KL}\big(p_\psi^i\|p_\phi^i\big)\Big).

With the exact posterior as :math:`\psi`, the expected update is exactly the gradient of the
*frozen-state* objective :math:`\mathbb E_{\tilde x\sim\mathrm{sg}\,q_\theta}\sum_{i\in M}
D_\beta(p_\phi^i\|p_\theta(\cdot|\tilde x)^i)` when the generator's masked tokens are independent of
:math:`x_{init}` given :math:`\tilde x` (always for a fully masked prior); with a hybrid prior it
replaces the posterior's logits by the generator's own (derivation D19, tested by enumeration).

Everything is framework-generic: logits in, losses out.  Shapes: logits ``(B, L, V)`` (batch,
positions, vocabulary; a model's extra mask-token logit must be dropped first), ``mask`` ``(B, L)``
bool (True = masked, the positions that count).  Per-sample values are **summed** over positions
(Di[M]O's code averages; divide by the number of tokens for its scale).

Notation map: ``teacher_logits`` -> :math:`z_\phi`, ``psi_logits`` -> :math:`z_\psi`,
``generator_logits`` -> :math:`z_\theta`, ``beta`` -> :math:`\beta`, ``mask`` -> :math:`M`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from opd_ref._checks import check_same_shape, check_tensor

__all__ = [
    "generalized_jeffrey",
    "jeffrey_logit_gradient",
    "dimo_generator_surrogate",
    "dimo_psi_loss",
]


def _check_logits(name: str, logits: object) -> Tensor:
    logits = check_tensor(name, logits, min_dim=3)
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape (B, L, V), got {tuple(logits.shape)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"{name} must have a vocabulary of at least 2 tokens (last dim), got {tuple(logits.shape)}")
    return logits


def _check_mask(mask: Optional[Tensor], like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype bool (True = masked position), got {mask.dtype}")
    if mask.shape != like.shape[:2]:
        raise ValueError(f"mask must have shape (B, L) = {tuple(like.shape[:2])}, got {tuple(mask.shape)}")
    return mask


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float in [0, 1], got {type(beta).__name__} {beta!r}")
    if not (0.0 <= float(beta) <= 1.0):
        raise ValueError(
            f"beta must lie in [0, 1] (outside it (1-beta) KL(p_phi||p_psi) + beta KL(p_psi||p_phi) is not a "
            f"divergence), got {beta!r}"
        )
    return float(beta)


def _pair(teacher_logits: object, psi_logits: object, mask: Optional[Tensor]):
    teacher_logits = _check_logits("teacher_logits", teacher_logits)
    psi_logits = _check_logits("psi_logits", psi_logits)
    check_same_shape("teacher_logits", teacher_logits, "psi_logits", psi_logits)
    return teacher_logits, psi_logits, _check_mask(mask, teacher_logits)


def _token_kls(teacher_logits: Tensor, psi_logits: Tensor):
    # in float64: each KL is a sum of p (log p_phi - log p_psi) whose terms cancel to second order when
    # the two distributions are close; in float32, logits of size 1e-3 gave a KL of 1.46e-6 for 1.31e-6
    f64 = torch.float64
    log_p_phi = torch.log_softmax(teacher_logits.to(f64), -1)
    log_p_psi = torch.log_softmax(psi_logits.to(f64), -1)
    fkl = (log_p_phi.exp() * (log_p_phi - log_p_psi)).sum(-1)  # KL(p_phi || p_psi), (B, L)
    rkl = (log_p_psi.exp() * (log_p_psi - log_p_phi)).sum(-1)  # KL(p_psi || p_phi), (B, L)
    return log_p_phi, log_p_psi, fkl, rkl


def generalized_jeffrey(teacher_logits: Tensor, psi_logits: Tensor, beta: float,
                        mask: Optional[Tensor] = None) -> Tensor:
    r"""Di[M]O's token-level generalised Jeffrey divergence, summed over the masked positions.

    .. math::
        D_\beta(\tilde x) = \sum_{i\in M}\Big[(1-\beta)\,\mathrm{KL}\big(p_\phi^i\|p_\psi^i\big)
            + \beta\,\mathrm{KL}\big(p_\psi^i\|p_\phi^i\big)\Big],\qquad
        p^i = \mathrm{softmax}(z^i)

    ``beta = 0`` is the token-level forward KL :math:`\mathrm{KL}(p_\phi\|p_\psi)` (Di[M]O's
    ``FKL``, teacher first, mode covering), ``beta = 1`` the reverse KL
    :math:`\mathrm{KL}(p_\psi\|p_\phi)` (``RKL``, generator first, mode seeking), ``beta = 1/2``
    half the symmetric Jeffreys divergence.  Non-negative, and zero iff :math:`p_\psi^i = p_\phi^i`
    at every masked position (for :math:`0 \le \beta \le 1`).

    Args:
        teacher_logits: ``(B, L, V)`` teacher MDM logits :math:`z_\phi` at the re-masked state.
        psi_logits: ``(B, L, V)`` auxiliary-model logits :math:`z_\psi` at the same state.
        beta: :math:`\beta \in [0, 1]` (0: forward KL, 1: reverse KL).
        mask: ``(B, L)`` bool, True where the token is masked (counted); ``None`` counts every position.

    Returns:
        ``(B,)`` divergence per sample.

    Reference: ``dimo``.
    """
    teacher_logits, psi_logits, mask = _pair(teacher_logits, psi_logits, mask)
    beta = _check_beta(beta)
    _, _, fkl, rkl = _token_kls(teacher_logits, psi_logits)
    dtype = torch.promote_types(teacher_logits.dtype, psi_logits.dtype)
    return (((1.0 - beta) * fkl + beta * rkl) * mask).sum(-1).to(dtype)


def jeffrey_logit_gradient(teacher_logits: Tensor, psi_logits: Tensor, beta: float,
                           mask: Optional[Tensor] = None) -> Tensor:
    r"""Closed-form gradient of :func:`generalized_jeffrey` with respect to the auxiliary logits.

    .. math::
        g^i = \frac{\partial D_\beta}{\partial z_\psi^i}
            = (1-\beta)\,(p_\psi^i - p_\phi^i)
            + \beta\,p_\psi^i\odot\Big(\log p_\psi^i - \log p_\phi^i - \mathrm{KL}\big(p_\psi^i\|p_\phi^i\big)\Big)
            \quad (i \in M),\qquad g^i = 0\ \ (i \notin M)

    Each :math:`g^i` sums to zero over the vocabulary (logits are defined up to a constant) and
    vanishes iff :math:`p_\psi^i = p_\phi^i`.  This is the direction Di[M]O applies to the
    generator's logits (:func:`dimo_generator_surrogate`).

    Args:
        teacher_logits: ``(B, L, V)`` :math:`z_\phi`.
        psi_logits: ``(B, L, V)`` :math:`z_\psi`.
        beta: :math:`\beta \in [0, 1]`.
        mask: ``(B, L)`` bool or ``None``.

    Returns:
        ``(B, L, V)``, detached.

    Reference: ``dimo``.
    """
    teacher_logits, psi_logits, mask = _pair(teacher_logits, psi_logits, mask)
    beta = _check_beta(beta)
    dtype = torch.promote_types(teacher_logits.dtype, psi_logits.dtype)
    return _logit_gradient64(teacher_logits, psi_logits, beta, mask).to(dtype)


def _logit_gradient64(teacher_logits: Tensor, psi_logits: Tensor, beta: float, mask: Tensor) -> Tensor:
    """:func:`jeffrey_logit_gradient` on validated inputs, in float64, detached."""
    with torch.no_grad():
        log_p_phi, log_p_psi, _, rkl = _token_kls(teacher_logits, psi_logits)
        p_psi = log_p_psi.exp()
        g_fkl = p_psi - log_p_phi.exp()
        g_rkl = p_psi * (log_p_psi - log_p_phi - rkl[..., None])
        return ((1.0 - beta) * g_fkl + beta * g_rkl) * mask[..., None]


def dimo_generator_surrogate(generator_logits: Tensor, teacher_logits: Tensor, psi_logits: Tensor,
                             mask: Tensor, beta: float) -> Tensor:
    r"""Surrogate whose autograd gradient is Di[M]O's generator update, per sample.

    .. math::
        \ell = \sum_{i\in M}\big\langle \mathrm{sg}\big[g^i\big],\, z_\theta^i\big\rangle,\qquad
        \nabla_\theta\,\ell = \sum_{i\in M} (g^i)^\top\frac{\partial z_\theta^i}{\partial\theta},
        \qquad g^i = \frac{\partial D_\beta(p_\phi^i\|p_\psi^i)}{\partial z_\psi^i}

    with :math:`g` from :func:`jeffrey_logit_gradient` at the re-masked state
    :math:`\tilde x` built from the generator's own sample.  Its *value* is not a divergence (use
    :func:`generalized_jeffrey` to monitor).  Di[M]O's code writes the same gradient as
    :math:`\tfrac12\lVert z_\theta - \mathrm{sg}[z_\theta - g]\rVert^2`.

    Args:
        generator_logits: ``(B, L, V)`` :math:`z_\theta(x_{init})`, with the gradient to the
            generator (position ``i`` of the generator output is position ``i`` of the state).
        teacher_logits: ``(B, L, V)`` :math:`z_\phi(\tilde x)` (detached here).
        psi_logits: ``(B, L, V)`` :math:`z_\psi(\tilde x)` (detached here).
        mask: ``(B, L)`` bool, True at the re-masked positions :math:`M`.
        beta: :math:`\beta \in [0, 1]`.

    Returns:
        ``(B,)``.

    Reference: ``dimo``.
    """
    generator_logits = _check_logits("generator_logits", generator_logits)
    if mask is None:
        raise TypeError("mask must be a (B, L) bool tensor of the re-masked positions, got None")
    teacher_logits, psi_logits, mask = _pair(teacher_logits, psi_logits, mask)
    beta = _check_beta(beta)
    check_same_shape("generator_logits", generator_logits, "teacher_logits", teacher_logits)
    # g and <g, z_theta> in float64, rounded once: g sums to 0 over the vocabulary, so the inner
    # product cancels where z_theta is nearly constant along it
    g = _logit_gradient64(teacher_logits, psi_logits, beta, mask)
    return (g * generator_logits.to(torch.float64)).sum((-1, -2)).to(generator_logits.dtype)


def dimo_psi_loss(psi_logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    r"""Di[M]O's auxiliary-model loss: cross-entropy of :math:`p_\psi` on generator samples at the
    re-masked positions, per sample.

    .. math::
        \mathcal L_\psi = \sum_{i\in M} -\sum_{v} y^i(v)\,\log\mathrm{softmax}(z_\psi^i)(v),
        \qquad
        \mathbb E\,\mathcal L_\psi - \mathbb E\,\mathcal L_\psi\big|_{p_\psi = p_\theta(\cdot|\tilde x)}
            = \mathbb E_{\tilde x}\sum_{i\in M}\mathrm{KL}\big(p_\theta(\cdot|\tilde x)^i\,\|\,p_\psi^i\big)

    with the hard target :math:`y^i = e_{x_\theta^i}` (the generated token; Di[M]O's default) or the
    soft target :math:`y^i = \mathrm{softmax}(z_\theta(x_{init})^i)` (the generator's token
    distribution, lower variance: its conditional mean given :math:`\tilde x` is the same).  Either
    way the minimiser is the exact generator posterior :math:`p_\theta(x^i|\tilde x)` (tested by
    enumeration).  Di[M]O's code adds label smoothing 0.1 to the hard target, which moves the
    minimiser to :math:`0.9\,p_\theta + 0.1/K` over its :math:`K = V + 1` classes; not done
    here.

    Args:
        psi_logits: ``(B, L, V)`` :math:`z_\psi(\tilde x)`, with the gradient to :math:`\psi`.
        target: ``(B, L)`` long generated tokens, or ``(B, L, V)`` probabilities (detached here).
        mask: ``(B, L)`` bool, True at the re-masked positions.

    Returns:
        ``(B,)``.

    Reference: ``dimo``.
    """
    psi_logits = _check_logits("psi_logits", psi_logits)
    if mask is None:
        raise TypeError("mask must be a (B, L) bool tensor of the re-masked positions, got None")
    mask = _check_mask(mask, psi_logits)
    n_vocab = psi_logits.shape[-1]
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor (tokens or probabilities), got {type(target).__name__}")
    if target.dtype == torch.long:
        if target.shape != psi_logits.shape[:2]:
            raise ValueError(f"target tokens must have shape (B, L) = {tuple(psi_logits.shape[:2])}, got {tuple(target.shape)}")
        if bool(((target < 0) | (target >= n_vocab)).any()):
            raise ValueError(f"target tokens must lie in [0, {n_vocab}), got min {int(target.min())}, max {int(target.max())}")
        y = torch.nn.functional.one_hot(target, n_vocab).to(psi_logits.dtype)
    else:
        y = check_tensor("target", target, min_dim=3).detach()
        check_same_shape("target", y, "psi_logits", psi_logits)
        if bool((y < 0).any()) or not torch.allclose(y.sum(-1), torch.ones_like(y[..., 0]), atol=1e-6, rtol=0):
            raise ValueError("target probabilities must be non-negative and sum to 1 over the vocabulary (last dim)")
    ce = -(y * torch.log_softmax(psi_logits, -1)).sum(-1)
    return (ce * mask).sum(-1)
