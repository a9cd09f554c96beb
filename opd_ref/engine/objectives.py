r"""One registry of per-step objectives under one set of method names, and the group-advantage normaliser.

Every objective is a function of one :class:`StepInputs` (the student's kernel at a stored state,
the kernel it is compared with, the behaviour kernel that drew the action) that returns a
:class:`StepLoss`: a per-sample loss whose gradient is the method's estimator, plus detached
diagnostics.  A new objective is one function and one :func:`register` line.

All kernels at one state share their std :math:`s` (D2), so with the mean gaps
:math:`\Delta = \mu_\theta - \mu_{target} = c_v (v_\theta - v_{target})` and
:math:`\Delta_{old} = \mu_\theta - \mu_{old} = c_v (v_\theta - v_{old})` (computed from velocity
differences, without cancellation) and the stored draw :math:`x' = \mu_{old} + s\varepsilon`:

.. math::
    \mathrm{KL}(\pi_\theta\|\pi_{target}) = \frac{\|\Delta\|^2}{2s^2},\qquad
    \log\frac{\pi_\theta(x')}{\pi_{old}(x')} = \frac{\Delta_{old}^\top(2 s\varepsilon - \Delta_{old})}{2 s^2},\qquad
    \log\frac{\pi_\theta(x')}{\pi_{target}(x')} = \frac{\Delta^\top(2 (s\varepsilon - \Delta_{old}) + \Delta)}{2 s^2}

=============  ==================================================================================
name           per-step loss :math:`\ell` (gradient = the estimator)
=============  ==================================================================================
``opd_kl``     closed-form reverse KL to the teacher (pathwise, D1/D2/D5)           ``diffusionopd``
``opd_ode``    :math:`\tfrac12\|x'_\theta - x'_T\|^2` on ODE rollouts (D4)          ``diffusionopd``
``ppo_opd``    PPO surrogate with dense advantage :math:`-\mathrm{KL}_\theta` (D5)   ``diffusionopd``
``k1``         :math:`\mathrm{sg}[\log\pi_\theta/\pi_T](x')\,\log\pi_\theta(x')`     ``tm-opd``
``vopd``       k1 minus its closed-form value :math:`\mathrm{KL}`                    ``vopd``
``grpo``       clipped PPO on group advantages + :math:`\beta`-KL to the reference   ``flowgrpo``
``crd``        the step's log-ratio to the reference (the CRD update sums and centres it)  ``crd``
``fwd_kl``     forward KL: :math:`-\log\pi_\theta(x'_T)` at the teacher's draw
               :math:`x'_T = \mu_T + s\varepsilon` (mean :math:`\mathrm{KL}`, gradient unbiased)  ``diffusionopd``
``dmd``        DMD at the visited state: :math:`\langle\mathrm{sg}[s_\theta - s_T](x), \hat x_{0,\theta}\rangle`  ``dmd``
``bregman_H``  Di-Bregman on the kernel ratio :math:`r = \pi_\theta/\pi_T` at the draw, weight
               :math:`h''(r)r` (``H`` in ``kl``, ``reverse_kl``, ``pearson_chi2``, ``jensen_shannon``)  ``dibregman``
``grpo_guard`` ``grpo`` on GRPO-Guard's normalised log-ratio (regulated clipping, D18) ``grpoguard``
``nft``        DiffusionNFT on a forward-noised sample (the NFT update, D18)          ``diffusionnft``
=============  ==================================================================================

The ``fwd_kl``, ``dmd`` and ``bregman_H`` rows are the distillation-objective ablation (derivation D16, docs page
``d16-reward-dmd``): each one's expected gradient at a visited state is a positive multiple of the
closed-form KL's gradient (same-covariance kernels), so they differ only in per-step/per-sample
weights and in Monte-Carlo noise.

Reference: ``diffusionopd``, ``flowgrpo``, ``tm-opd``, ``vopd``, ``crd``, ``dmd``, ``dibregman``, ``grpoguard``, ``diffusionnft``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from opd_ref.bregman import H_FAMILY, bregman_generator_surrogate
from opd_ref.distribution_matching import distribution_matching_surrogate
from opd_ref.engine.crd_mechanisms import CRDMechanisms
from opd_ref.engine.kernel import StepCoefficients
from opd_ref.losses import clipped_surrogate
from opd_ref.teachers import _guard_log_ratio, _nft_loss

__all__ = [
    "StepInputs",
    "StepLoss",
    "ObjectiveSpec",
    "Objective",
    "OBJECTIVES",
    "METHODS",
    "register",
    "KL_FORMS",
    "RATIO_FORMS",
    "group_advantages",
]

KL_FORMS = ("exact", "flowgrpo")
#: the PPO ratio of ``grpo``: ``exact`` = of the step's density (log-ratio summed over the D dims);
#: ``flowgrpo`` = Flow-GRPO's code (exp of the log-ratio averaged over dims, i.e. the D-th root)
RATIO_FORMS = ("exact", "flowgrpo")


def _sum_event(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


@dataclass(frozen=True)
class StepInputs:
    r"""What a per-step objective sees at one stored transition :math:`x \to x'`.

    .. math::
        \Delta = c_v (v - v_{target}),\qquad \Delta_{old} = c_v (v - v_{old}),\qquad
        x' = \mu_{old} + s\varepsilon

    Reference: ``diffusionopd``.

    Attributes:
        coef: the step's kernel (:class:`~opd_ref.engine.kernel.StepCoefficients`; std ``s``).
        v: ``(B, *event)`` the trained policy's velocity at ``x`` (carries the gradient).
        v_old: ``(B, *event)`` the behaviour velocity that drew ``x'`` (detached).
        noise: ``(B, *event)`` the draw :math:`\varepsilon` with :math:`x' = \mu_{old} + s\varepsilon`.
        v_target: ``(B, *event)`` the teacher's (distillation) or reference's (RL, CRD) velocity at
            ``x`` (detached), or ``None``.
        advantage: ``(B,)`` detached advantages (RL; NFT: the normalised reward in [0, 1]), or ``None``.
        v_ref: ``(B, *event)`` the reference's velocity where an objective needs it besides
            ``v_target`` (NFT's anchor), or ``None``.
    """

    coef: StepCoefficients
    v: Tensor
    v_old: Tensor
    noise: Tensor
    v_target: Optional[Tensor] = None
    advantage: Optional[Tensor] = None
    v_ref: Optional[Tensor] = None

    @property
    def s(self) -> float:
        """The step std."""
        return self.coef.std

    def gap(self) -> Tensor:
        r""":math:`\mu_\theta - \mu_{target} = c_v (v - v_{target})`."""
        return self.coef.c_v * (self.v - self.v_target)

    def gap_old(self) -> Tensor:
        r""":math:`\mu_\theta - \mu_{old} = c_v (v - v_{old})` (0 with gradient at :math:`\theta = \theta_{old}`)."""
        return self.coef.c_v * (self.v - self.v_old)

    def kl(self) -> Tensor:
        r"""``(B,)`` :math:`\mathrm{KL}(\pi_\theta\|\pi_{target}) = \|\Delta\|^2/(2s^2)`, summed over dims."""
        return _sum_event(self.gap().pow(2)) / (2.0 * self.s**2)

    def log_ratio_old(self) -> Tensor:
        r"""``(B,)`` :math:`\log\pi_\theta(x') - \log\pi_{old}(x')`."""
        d = self.gap_old()
        return _sum_event(d * (2.0 * self.s * self.noise - d)) / (2.0 * self.s**2)

    def log_ratio_target(self) -> Tensor:
        r"""``(B,)`` :math:`\log\pi_\theta(x') - \log\pi_{target}(x')` at the stored draw."""
        d = self.gap()
        resid = self.s * self.noise - self.gap_old()  # x' - mu_theta
        return _sum_event(d * (2.0 * resid + d)) / (2.0 * self.s**2)


@dataclass
class StepLoss:
    r"""A per-step objective's output: per-sample :math:`\ell_i` whose gradient is the estimator.

    .. math:: \hat\nabla L = \nabla_\theta \tfrac1B\textstyle\sum_i \ell_i

    Reference: ``diffusionopd``.

    Attributes:
        loss: ``(B,)`` per-sample loss (its gradient is the method's estimator).
        stats: detached ``(B,)`` diagnostics by name (e.g. ``"kl"``, ``"ratio"``).
    """

    loss: Tensor
    stats: Dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveSpec:
    r"""A per-step objective by name with its hyper-parameters, validated once.

    .. math::
        \ell_{\texttt{grpo}} = -\min\big(rA, \mathrm{clip}(r, 1-\epsilon, 1+\epsilon)A\big)
            + \beta\,\mathrm{KL}_{form}(\pi_\theta\|\pi_{ref})

    Args:
        name: one of :data:`METHODS`.
        clip_range: PPO :math:`\epsilon > 0` (``grpo``); ``None`` for no clipping.
        kl_beta: :math:`\beta \ge 0`, weight of the per-step KL to the reference (``grpo``).
        kl_form: ``"exact"`` (the true per-step KL) or ``"flowgrpo"`` (Flow-GRPO's code: mean over
            dims, :math:`\|\Delta\|^2/(2\sigma_t^2)` without :math:`|\Delta t|`; SDE only).
        crd_beta: CRD's KL strength :math:`\beta > 0` in the implicit reward (``crd``).
        crd: CRD's mechanisms (:class:`~opd_ref.engine.crd_mechanisms.CRDMechanisms`; ``crd``, D17).
        nft_beta: DiffusionNFT's :math:`\beta > 0` of the implicit velocities (``nft``); ``nft``
            reads ``kl_beta`` as the weight of its anchor :math:`\|v_\theta - v_{ref}\|^2`.
        ratio_form: ``"exact"`` (:math:`r = \pi_\theta(x')/\pi_{old}(x')`, the log-ratio summed over
            the :math:`D` dims) or ``"flowgrpo"`` (Flow-GRPO's code: :math:`r = \exp(\frac1D
            \log\frac{\pi_\theta(x')}{\pi_{old}(x')})`, its log-prob being a mean over dims) (``grpo``).

    Reference: ``flowgrpo``, ``diffusionopd``, ``diffusionnft``.
    """

    name: str = "opd_kl"
    clip_range: Optional[float] = 0.2
    kl_beta: float = 0.0
    kl_form: str = "exact"
    crd_beta: float = 1.0
    crd: CRDMechanisms = CRDMechanisms()
    nft_beta: float = 1.0
    ratio_form: str = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.crd, CRDMechanisms):
            raise TypeError(f"ObjectiveSpec.crd must be a CRDMechanisms, got {type(self.crd).__name__}")
        if self.name not in OBJECTIVES:
            raise ValueError(f"ObjectiveSpec.name must be one of {tuple(OBJECTIVES)}, got {self.name!r}")
        c = self.clip_range
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf):
            raise ValueError(f"ObjectiveSpec.clip_range must be a positive finite float or None, got {c!r}")
        b = self.kl_beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < math.inf:
            raise ValueError(f"ObjectiveSpec.kl_beta must be a finite float >= 0, got {b!r}")
        b = self.crd_beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < math.inf:
            raise ValueError(f"ObjectiveSpec.crd_beta must be a positive finite float, got {b!r}")
        b = self.nft_beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < math.inf:
            raise ValueError(f"ObjectiveSpec.nft_beta must be a positive finite float, got {b!r}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"ObjectiveSpec.kl_form must be one of {KL_FORMS}, got {self.kl_form!r}")
        if self.ratio_form not in RATIO_FORMS:
            raise ValueError(f"ObjectiveSpec.ratio_form must be one of {RATIO_FORMS}, got {self.ratio_form!r}")

    @property
    def objective(self) -> "Objective":
        """The registry entry."""
        return OBJECTIVES[self.name]

    def __call__(self, inputs: StepInputs) -> StepLoss:
        return OBJECTIVES[self.name].fn(self, inputs)


@dataclass(frozen=True)
class Objective:
    r"""A registry entry: the function :math:`(\text{spec}, \text{inputs}) \mapsto \ell` of one method.

    .. math:: \ell = \mathrm{fn}(\text{spec}, \text{inputs})

    Reference: ``diffusionopd``, ``flowgrpo``.

    Attributes:
        name: the method name.
        fn: ``fn(spec, inputs) -> StepLoss``.
        family: ``"distill"`` (needs a teacher), ``"rl"`` (needs advantages and the reference) or
            ``"crd"`` (the CRD update).
        kernels: the rollout kernel kinds it is defined for.
        doc: one line.
    """

    name: str
    fn: Callable[[ObjectiveSpec, StepInputs], StepLoss]
    family: str
    kernels: tuple
    doc: str


OBJECTIVES: Dict[str, Objective] = {}


def register(name: str, family: str, kernels: tuple, doc: str) -> Callable:
    r"""Decorator: add ``fn(spec, inputs) -> StepLoss`` to :data:`OBJECTIVES` under ``name``.

    .. math:: \texttt{OBJECTIVES}[\mathrm{name}] = \ell_{\mathrm{name}}(\text{spec}, \text{inputs})

    Args:
        name: the method name (unique).
        family: ``"distill"``, ``"rl"`` or ``"crd"``.
        kernels: the kernel kinds it is defined for.
        doc: one line.

    Returns:
        the decorator (it returns ``fn`` unchanged).

    Reference: ``diffusionopd``.
    """

    def deco(fn: Callable) -> Callable:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, fn, family, kernels, doc)
        return fn

    return deco


# ------------------------------------------------------------------------------------ distillation
@register("opd_kl", "distill", ("sde", "cps"), "closed-form per-step reverse KL to the teacher (pathwise)")
def _opd_kl(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    kl = i.kl()
    return StepLoss(kl, {"kl": kl.detach()})


@register("opd_ode", "distill", ("ode",), "direct transition matching 1/2 ||x'_s - x'_t||^2 on ODE rollouts")
def _opd_ode(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    match = 0.5 * _sum_event(i.gap().pow(2))
    return StepLoss(match, {"match": match.detach()})


@register("ppo_opd", "distill", ("sde", "cps"), "PPO surrogate with dense advantage -KL (ratio 1 at theta_old)")
def _ppo_opd(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    kl = i.kl()
    ratio = torch.exp(i.log_ratio_old())
    return StepLoss(ratio * kl, {"kl": kl.detach()})  # -r A with A = -KL (not detached)


@register("k1", "distill", ("sde", "cps"), "k1 REINFORCE: detached sampled log-ratio times the log-prob")
def _k1(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    kl = i.kl().detach()
    lr = i.log_ratio_target().detach()
    return StepLoss(lr * i.log_ratio_old(), {"kl": kl})


@register("vopd", "distill", ("sde", "cps"), "vOPD: k1 with its closed-form value as control variate")
def _vopd(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    kl = i.kl().detach()
    lr = i.log_ratio_target().detach()
    return StepLoss((lr - kl) * i.log_ratio_old(), {"kl": kl})


# ------------------------------------------------------------------------------------ RL
@register("grpo", "rl", ("sde", "cps"), "Flow-GRPO: clipped ratio on group advantages + beta KL to the reference")
def _grpo(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    log_ratio = i.log_ratio_old()
    if spec.ratio_form == "flowgrpo":  # Flow-GRPO's log-prob is a mean over dims
        log_ratio = log_ratio / i.v[0].numel()
    return _clipped_rl_loss(spec, i, log_ratio)


def _clipped_rl_loss(spec: ObjectiveSpec, i: StepInputs, log_ratio: Tensor, kl_weight: float = 1.0) -> StepLoss:
    loss = clipped_surrogate(log_ratio, i.advantage, spec.clip_range)
    ratio = torch.exp(log_ratio.detach())
    stats = {"ratio": ratio}
    if spec.clip_range is not None:
        stats["clipped"] = ((ratio - 1.0).abs() > spec.clip_range).to(ratio.dtype)
    if spec.kl_beta > 0:
        if spec.kl_form == "exact":
            kl = i.kl()
        else:  # Flow-GRPO's code: mean over dims of Delta^2 / (2 std_t^2), no |dt|
            kl = i.gap().pow(2).flatten(1).mean(1) / (2.0 * i.coef.std_t**2)
        loss = loss + (kl_weight * spec.kl_beta) * kl
        stats["kl_ref"] = kl.detach()
    return StepLoss(loss, stats)


@register("crd", "crd", ("sde", "cps"), "CRD: the step's log-ratio to the reference (summed and centred by the update)")
def _crd(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    lr = i.log_ratio_target()
    return StepLoss(lr, {"log_ratio": lr.detach()})


# ------------------------------------------------------------------------------------ ablation (D16)
@register("fwd_kl", "distill", ("sde", "cps"), "forward KL: -log pi_theta at the teacher's draw mu_T + s eps (ML)")
def _fwd_kl(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    # -log pi_theta(x'_T) - D/2 log(2 pi e s^2), x'_T = mu_T + s eps: (|Delta|^2 - 2 s eps.Delta) / (2 s^2);
    # its mean over eps is KL(pi_T || pi_theta) = KL(pi_theta || pi_T) (same covariance)
    d = i.gap()
    loss = _sum_event(d * (d - 2.0 * i.s * i.noise)) / (2.0 * i.s**2)
    return StepLoss(loss, {"kl": i.kl().detach()})


@register("dmd", "distill", ("sde", "cps"), "DMD score difference at the visited state, pushed through x0_hat = x - sigma v")
def _dmd(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    # scores -(x + (1 - sigma) v) / sigma at the visited state, less their common term -x / sigma (it
    # cancels in s_theta - s_T); the generator output is x0_hat = x - sigma v, less the detached x
    sigma = i.coef.sigma
    c = (1.0 - sigma) / sigma
    loss = distribution_matching_surrogate(-sigma * i.v, -c * i.v.detach(), -c * i.v_target)
    return StepLoss(loss, {"kl": i.kl().detach()})


def _bregman_objective(h_name: str) -> Callable[[ObjectiveSpec, StepInputs], StepLoss]:
    h = H_FAMILY[h_name]

    def fn(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
        # the reparametrised draw x'_theta = mu_theta + s eps is the stored draw plus Delta_old; the
        # kernel scores at it differ by grad log r = Delta / s^2 (both scores less -(x' - mu_theta) / s^2)
        lr = i.log_ratio_target().detach()
        loss = bregman_generator_surrogate(i.gap_old(), i.gap().detach() / i.s**2, torch.zeros_like(i.v), lr, h)
        return StepLoss(loss, {"kl": i.kl().detach(), "log_ratio": lr})

    fn.__doc__ = f"Di-Bregman {h_name}: weight h''(r) r at the draw times the pathwise KL gradient."
    return fn


for _h_name in H_FAMILY:
    register(f"bregman_{_h_name}", "distill", ("sde", "cps"),
             f"Di-Bregman h={_h_name} on the step's kernel ratio pi_theta/pi_T at the draw")(_bregman_objective(_h_name))
# ------------------------------------------------------------------------------------ teacher algorithms (D18)
@register("grpo_guard", "rl", ("sde", "cps"), "GRPO-Guard: grpo on the normalised log-ratio (regulated clipping)")
def _grpo_guard(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    # the step's reweighting kappa = s / |c_v| also multiplies its KL term: the whole step gradient is
    # kappa times Flow-GRPO's at theta_old (the balance reward / KL of each step is kept)
    kappa = i.s / abs(i.coef.c_v)
    return _clipped_rl_loss(spec, i, _guard_log_ratio(i.gap_old(), i.noise, i.s, i.coef.c_v), kappa)


@register("nft", "nft", ("sde", "cps", "ode"), "DiffusionNFT on a forward-noised sample (+ kl_beta ||v - v_ref||^2)")
def _nft(spec: ObjectiveSpec, i: StepInputs) -> StepLoss:
    loss = _nft_loss(i.v, i.v_old, i.v_target, i.advantage, spec.nft_beta)
    stats = {"nft": loss.detach()}
    if spec.kl_beta > 0:
        anchor = _sum_event((i.v - i.v_ref).pow(2))
        loss = loss + spec.kl_beta * anchor
        stats["anchor"] = anchor.detach()
    return StepLoss(loss, stats)


METHODS = tuple(OBJECTIVES)


def group_advantages(rewards: Tensor, *, ddof: int = 0, eps: float = 1e-4) -> Tensor:
    r"""GRPO advantages of one group (or of each row of stacked groups): rewards standardised within the group.

    .. math::
        A_i = \frac{r_i - \bar r}{\mathrm{std}_{ddof}(r) + \epsilon},\qquad
        \mathrm{std}_{ddof}(r) = \sqrt{\tfrac{1}{G - ddof}\textstyle\sum_j (r_j - \bar r)^2}

    ``ddof = 0`` and ``eps = 1e-4`` are Flow-GRPO's (numpy ``std``, ``+ 1e-4``); a group whose rewards
    are all equal gets advantages 0.

    Args:
        rewards: ``(G,)`` finite rewards of one group, or ``(n_groups, G)`` for ``n_groups`` groups
            normalised separately (``G >= 2``; ``G > ddof``).
        ddof: delta degrees of freedom of the std (0 or 1).
        eps: :math:`\epsilon > 0` added to the std.

    Returns:
        advantages of the shape of ``rewards`` (detached).

    Reference: ``flowgrpo``.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() not in (1, 2) or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be a (G,) or (n_groups, G) tensor with G >= 2, got "
                         f"{getattr(rewards, 'shape', type(rewards))}")
    if not torch.is_floating_point(rewards) or not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards must be finite floating values, got {rewards.detach().flatten()[:6].tolist()}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    # in float64, rounded once: in float32 the squares of rewards of size 1e30 overflowed, the std was
    # inf and every advantage came out 0
    r = rewards.detach().to(torch.float64)
    centred = r - r.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).sum(-1, keepdim=True) / (r.shape[-1] - ddof))
    return (centred / (std + eps)).to(rewards.dtype)
