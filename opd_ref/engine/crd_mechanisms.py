r"""CRD's mechanisms as switches of the engine's CRD update (derivation D17).

:func:`opd_ref.engine.crd_update` matches the centred implicit reward to the centred reward (D8).
How the implicit reward is formed and what else the loss contains are the switches of
:class:`CRDMechanisms` (carried by :class:`~opd_ref.engine.ObjectiveSpec` as ``crd``):

* ``ratio_to`` — **sampler decoupled from the reference.**  ``"reference"`` (decoupled): the
  log-ratio is taken against the fixed pretrained reference while the rollouts come from the
  student, so :math:`\hat r = \beta\log(p_\theta/p_{ref})` carries the whole accumulated tilt and
  the fixed point is :math:`p^* \propto p_{ref}e^{r/\beta}`.  ``"sampler"`` (coupled): the
  reference of the log-ratio *is* the policy that drew the rollouts (:math:`\theta_{old}`); at
  :math:`\theta = \theta_{old}` the implicit reward is identically 0 (the signal collapses) and the
  gradient becomes plain REINFORCE on the centred reward,
  :math:`-\beta\sum_i \tilde R_i\nabla\log p_\theta(x_i)`, with no pull back at all.
* ``guidance`` — the reference velocity is the CFG-guided one,
  :math:`v_{ref}^{w} = v_{ref}(\cdot,\varnothing) + w\,(v_{ref}(\cdot, c) - v_{ref}(\cdot,\varnothing))`
  (the policy provides it through ``policy.with_guidance(cond, w)``); used wherever the update needs
  the reference: the log-ratio (``ratio_to="reference"``) and the KL anchor.
* ``kl_beta`` — **KL anchor**: :math:`\beta_{KL}\,\omega_i\sum_n\mathrm{KL}(\pi_\theta(\cdot|x_n)\|\pi^{w}_{ref}(\cdot|x_n))`
  added per sample along the rollout (closed form, D1/D2).
* ``adaptive_kl`` — **reward-adaptive KL strength** (the rule of CRD's public trainer): the
  per-sample anchor weight grows linearly with the sample's reward rank inside its group,

  .. math::
      \omega_i = \omega_{min} + (1 - \omega_{min})\,u_i,\qquad
      u_i = \tfrac12 + \tfrac{1}{2k}\,\mathrm{clip}(A_i, -k, k) \in [0, 1],

  :math:`A_i` the group-standardised reward, so the highest-reward samples — where a proxy reward is
  most likely exploited — are held hardest to the reference (``adaptive_kl=False``: :math:`\omega_i = 1`).
* ``implicit`` — ``"path"``: :math:`\hat r = \beta\sum_n\log\pi_\theta/\pi_{ref}` along the stored
  transitions (D3); ``"elbo"``: the forward-process (ELBO) implicit reward of the CRD paper (D9),
  on the final samples :math:`x`, with :math:`J` Gauss-Legendre levels :math:`(\sigma_j,\omega_j)`
  and one noise draw per level,

  .. math::
      \hat r = -\beta\sum_j \omega_j\,\frac{1-\sigma_j}{\sigma_j}\Big[\|v_\theta(x_{\sigma_j}) - (\varepsilon_j - x)\|^2
          - \|v_{ref}(x_{\sigma_j}) - (\varepsilon_j - x)\|^2\Big],\quad x_{\sigma} = (1-\sigma)x + \sigma\varepsilon .

Reference: ``crd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["CRDMechanisms", "RATIO_REFERENCES", "IMPLICIT_REWARDS", "adaptive_kl_weights", "guided_condition",
           "elbo_levels", "elbo_term"]

RATIO_REFERENCES = ("reference", "sampler")
IMPLICIT_REWARDS = ("path", "elbo")


def _number(name: str, value: object, lo: float, lo_open: bool, hi: float = math.inf, hi_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"CRDMechanisms.{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and math.isfinite(v)
    if not ok:
        raise ValueError(f"CRDMechanisms.{name} must lie in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {value!r}")
    return v


@dataclass(frozen=True)
class CRDMechanisms:
    r"""The switches of CRD's update (see the module docstring for each one's mathematics).

    .. math::
        \ell_i = \tfrac12\big[(\hat r_i - \bar{\hat r}_g) - (R_i - \bar R_g)\big]^2
            + \beta_{KL}\,\omega_i\sum_{n\in\mathcal T}\mathrm{KL}\big(\pi_\theta(\cdot|x^{(i)}_n)\,\|\,\pi^{w}_{ref}(\cdot|x^{(i)}_n)\big)

    Args:
        ratio_to: ``"reference"`` (decoupled, default) or ``"sampler"`` (coupled: the log-ratio's
            reference is the rollout policy :math:`\theta_{old}`).
        guidance: CFG scale :math:`w` of the reference velocity, or ``None`` (the policy's own
            reference velocity).
        kl_beta: :math:`\beta_{KL} \ge 0`, weight of the KL anchor (0: no anchor).
        adaptive_kl: reward-adaptive anchor weights :math:`\omega_i` (:func:`adaptive_kl_weights`).
        kl_floor: :math:`\omega_{min} \in [0, 1]`.
        adv_clip: :math:`k > 0`, clip of the standardised reward in :math:`u_i`.
        implicit: ``"path"`` (default) or ``"elbo"``.
        elbo_levels: :math:`J \ge 1` Gauss-Legendre levels of the ELBO implicit reward.

    Reference: ``crd``.
    """

    ratio_to: str = "reference"
    guidance: Optional[float] = None
    kl_beta: float = 0.0
    adaptive_kl: bool = False
    kl_floor: float = 0.01
    adv_clip: float = 5.0
    implicit: str = "path"
    elbo_levels: int = 4

    def __post_init__(self) -> None:
        if self.ratio_to not in RATIO_REFERENCES:
            raise ValueError(f"CRDMechanisms.ratio_to must be one of {RATIO_REFERENCES}, got {self.ratio_to!r}")
        if self.implicit not in IMPLICIT_REWARDS:
            raise ValueError(f"CRDMechanisms.implicit must be one of {IMPLICIT_REWARDS}, got {self.implicit!r}")
        if self.guidance is not None:
            _number("guidance", self.guidance, 0.0, False)
        _number("kl_beta", self.kl_beta, 0.0, False)
        _number("kl_floor", self.kl_floor, 0.0, False, 1.0, False)
        _number("adv_clip", self.adv_clip, 0.0, True)
        if not isinstance(self.adaptive_kl, bool):
            raise TypeError(f"CRDMechanisms.adaptive_kl must be a bool, got {type(self.adaptive_kl).__name__}")
        n = self.elbo_levels
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"CRDMechanisms.elbo_levels must be an int >= 1, got {n!r}")
        if self.adaptive_kl and self.kl_beta == 0:
            raise ValueError("CRDMechanisms.adaptive_kl needs kl_beta > 0 (it scales the KL anchor)")


def adaptive_kl_weights(advantage: Tensor, floor: float, clip: float) -> Tensor:
    r"""Reward-adaptive KL weights from group-standardised rewards (detached).

    .. math::
        \omega_i = \omega_{min} + (1-\omega_{min})\Big(\tfrac12 + \tfrac{1}{2k}\mathrm{clip}(A_i, -k, k)\Big)

    Args:
        advantage: ``(B,)`` group-standardised rewards :math:`A_i`.
        floor: :math:`\omega_{min} \in [0, 1]`.
        clip: :math:`k > 0`.

    Returns:
        ``(B,)`` weights in :math:`[\omega_{min}, 1]`.

    Reference: ``crd`` (reward-adaptive KL of the public CRD trainer).
    """
    u = 0.5 + 0.5 * advantage.detach().clamp(-clip, clip) / clip
    return floor + (1.0 - floor) * u


def guided_condition(policy: Any, cond: Any, guidance: Optional[float]) -> Any:
    r"""The condition under which the reference's velocity is the CFG-guided one.

    .. math:: v(x, \sigma, \mathrm{cond}') = v(x,\sigma,\varnothing) + w\,\big(v(x,\sigma,c) - v(x,\sigma,\varnothing)\big)

    Args:
        policy: needs ``with_guidance(cond, w)`` when ``guidance`` is not ``None``.
        cond: the batch's condition.
        guidance: :math:`w` or ``None`` (``cond`` unchanged).

    Returns:
        the condition to pass to ``policy.velocity`` with the reference active.

    Reference: ``crd`` (KL anchored to the CFG-guided pretrained model).
    """
    if guidance is None:
        return cond
    if not hasattr(policy, "with_guidance"):
        raise TypeError(f"CRDMechanisms.guidance={guidance} needs a policy with with_guidance(cond, w); "
                        f"{type(policy).__name__} has none")
    return policy.with_guidance(cond, float(guidance))


def elbo_levels(n: int, dtype: torch.dtype = torch.float64) -> tuple:
    r"""``n`` Gauss-Legendre levels on :math:`(0, 1)` with their ELBO weights folded in.

    .. math:: (\sigma_j,\ \omega_j\,w(\sigma_j)),\qquad w(\sigma) = \frac{1-\sigma}{\sigma}

    Args:
        n: number of levels :math:`J \ge 1`.
        dtype: dtype of the quadrature.

    Returns:
        a tuple of ``(sigma_j, omega_j w(sigma_j))`` float pairs.

    Reference: ``crd``; D9 (:func:`opd_ref.elbo.elbo_log_ratio`).
    """
    from opd_ref.elbo import elbo_weight, gauss_legendre_sigmas

    nodes, weights = gauss_legendre_sigmas(n, dtype=dtype)
    return tuple((float(s), float(om) * float(elbo_weight(float(s)))) for s, om in zip(nodes, weights))


def elbo_term(v: Tensor, v_anchor: Tensor, target: Tensor, weight: float) -> Tensor:
    r"""One level's term of the ELBO log-ratio, per sample, summed over event dims.

    .. math:: \ell_j = -\omega_j w(\sigma_j)\big[\|v - u\|^2 - \|v_{anchor} - u\|^2\big],\qquad u = \varepsilon - x

    Args:
        v: ``(B, *event)`` the student's velocity at :math:`x_{\sigma_j}` (carries the gradient).
        v_anchor: ``(B, *event)`` the reference's (or :math:`\theta_{old}`'s) velocity there (detached).
        target: ``(B, *event)`` :math:`u = \varepsilon - x`.
        weight: :math:`\omega_j w(\sigma_j)`.

    Returns:
        ``(B,)``.

    Reference: ``crd``; D9.
    """
    d = (v - v_anchor).flatten(1)
    # ||v - u||^2 - ||v_a - u||^2 = (v - v_a) . (v + v_a - 2u), without cancellation when v ~ v_a
    return -weight * (d * (v + v_anchor - 2.0 * target).flatten(1)).sum(1)
