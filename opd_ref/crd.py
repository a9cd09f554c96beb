r"""Centered reward distillation (derivation D8).

The reward-tilted target :math:`p^*(x|c) = p_{ref}(x|c)\,e^{r(x,c)/\beta} / Z(c)` (D7) is the unique
density whose *implicit reward* equals the true reward up to a per-prompt constant:

.. math::
    \hat r_\theta(x, c) := \beta \log\frac{p_\theta(x|c)}{p_{ref}(x|c)}
        = r(x, c) - \beta \log Z(c) \quad\text{iff}\quad p_\theta(\cdot|c) = p^*(\cdot|c).

``beta log Z(c)`` is intractable but constant within a prompt, so centering both rewards within a
group of samples that share the prompt removes it exactly (``crd``).  Notation map: ``r_hat`` ->
:math:`\hat r_\theta`, ``reward`` -> :math:`r`, ``group_ids`` -> the prompt index :math:`c` of each
sample, ``normalizer`` -> :math:`\beta \log Z(c)`.

All losses are per sample, shape ``(B,)``; reduce in the trainer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from opd_ref._checks import _show, check_batch_vector, check_tensor

__all__ = [
    "implicit_reward",
    "implicit_reward_from_steps",
    "group_mean",
    "center_in_groups",
    "crd_loss",
    "uncentered_reward_loss",
    "group_softmax_weights",
    "unit_interval_advantage",
]


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a positive float, got {type(beta).__name__}")
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite float > 0 (KL strength), got {beta!r}")
    return float(beta)


def implicit_reward(log_p_theta: Tensor, log_p_ref: Tensor, beta: float) -> Tensor:
    r"""Implicit reward from exact (or estimated) log-densities of the final sample.

    .. math::
        \hat r_\theta(x, c) = \beta\,\big[\log p_\theta(x|c) - \log p_{ref}(x|c)\big]

    Args:
        log_p_theta: ``(B,)`` student log-density of each sample (carries the gradient).
        log_p_ref: ``(B,)`` reference log-density (detached: the reference is frozen).
        beta: KL strength, ``> 0``.

    Returns:
        ``(B,)`` implicit rewards.

    Reference: ``crd`` (implicit reward of KL-regularised reward maximisation).
    """
    beta = _check_beta(beta)
    log_p_theta = check_batch_vector("log_p_theta", log_p_theta)
    log_p_ref = check_batch_vector("log_p_ref", log_p_ref, log_p_theta.shape[0])
    return beta * (log_p_theta - log_p_ref.detach())


def implicit_reward_from_steps(step_log_ratio: Tensor, beta: float) -> Tensor:
    r"""Implicit reward from per-step log-ratio terms, summed over steps.

    .. math::
        \hat r_\theta = \beta \sum_{t=1}^{T} \ell_t,\qquad
        \ell_t = \log\frac{\pi_\theta(x_{t+1}|x_t, c)}{\pi_{ref}(x_{t+1}|x_t, c)}
        \ \text{(path log-ratio, D3)}

    The same sum takes the per-noise-level terms of the diffusion ELBO estimate at scale,
    :math:`\ell_t = -w(\sigma_t)\,[\mathcal L^{\theta}_{dsm}(\sigma_t) - \mathcal L^{ref}_{dsm}(\sigma_t)]`
    (D9); supplying the right ELBO weight ``w`` is the caller's job.

    Args:
        step_log_ratio: ``(B, T)`` per-step log-ratio terms (carry the gradient).
        beta: KL strength, ``> 0``.

    Returns:
        ``(B,)``.

    Reference: ``crd``; ``diffusionopd`` (per-step kernels).
    """
    beta = _check_beta(beta)
    step_log_ratio = check_tensor("step_log_ratio", step_log_ratio, min_dim=2)
    if step_log_ratio.dim() != 2:
        raise ValueError(f"step_log_ratio must have shape (B, T), got {tuple(step_log_ratio.shape)}")
    return beta * step_log_ratio.sum(dim=1)


def _groups(group_ids: object, batch: int) -> Tuple[Tensor, Tensor]:
    """Validate ``group_ids`` and return (inverse index (B,), group sizes (G,))."""
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor of integer ids, got {type(group_ids).__name__}")
    if torch.is_floating_point(group_ids) or group_ids.dtype == torch.bool or torch.is_complex(group_ids):
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(
            f"group_ids must have shape ({batch},) (one prompt id per sample), got {tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        lonely = torch.unique(group_ids)[counts < 2]
        raise ValueError(
            "every prompt group needs at least 2 samples (centering a group of size 1 leaves 0 and "
            f"removes all signal); group_ids with a single sample: {_show(lonely.to(torch.float64))}"
        )
    return inverse, counts


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    r"""Mean of each sample's prompt group, broadcast back to the samples.

    .. math::
        \bar v_i = \frac{1}{|g(i)|}\sum_{j \in g(i)} v_j

    Args:
        values: ``(B,)``.
        group_ids: ``(B,)`` integer prompt ids (any labels); every group needs >= 2 samples.

    Returns:
        ``(B,)``.

    Reference: ``crd`` (within-prompt centering).
    """
    values = check_batch_vector("values", values)
    inverse, counts = _groups(group_ids, values.shape[0])
    sums = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device).index_add(0, inverse, values)
    return (sums / counts.to(values.dtype))[inverse]


def center_in_groups(values: Tensor, group_ids: Tensor) -> Tensor:
    r"""Subtract each prompt group's mean: :math:`v_i - \bar v_{g(i)}`.

    .. math::
        \tilde v_i = v_i - \bar v_{g(i)},\qquad \bar v_{g(i)} = \frac{1}{|g(i)|}\sum_{j \in g(i)} v_j

    Any per-prompt constant :math:`a(c)` added to ``values`` cancels exactly.

    Args:
        values: ``(B,)``.
        group_ids: ``(B,)`` integer prompt ids; every group needs >= 2 samples.

    Returns:
        ``(B,)`` centered values (each group sums to 0).

    Reference: ``crd``.
    """
    return values - group_mean(values, group_ids)


def _check_weights(weights: Optional[Tensor], batch: int) -> Optional[Tensor]:
    if weights is None:
        return None
    weights = check_batch_vector("weights", weights, batch)
    if not bool((weights >= 0).all()):
        raise ValueError(f"weights must be >= 0, got {_show(weights)}")
    return weights.detach()


def crd_loss(
    r_hat: Tensor, reward: Tensor, group_ids: Tensor, weights: Optional[Tensor] = None
) -> Tensor:
    r"""Centered reward-matching loss of CRD, per sample.

    .. math::
        \ell_i = \tfrac12\, w_i\,\Big[(\hat r_i - \bar{\hat r}_{g(i)}) - (r_i - \bar r_{g(i)})\Big]^2

    Because :math:`\hat r = r - \beta\log Z(c)` at the optimum (D8) and centering removes every
    per-prompt constant, the loss is exactly 0 (with zero gradient) at :math:`p_\theta = p^*` for any
    grouping, and it is invariant to per-prompt constants added to ``r`` or ``r_hat``.  With the
    samples drawn from a fixed sampler :math:`q` (e.g. the reference, or a lagged student) its
    expectation over a large group is :math:`\tfrac12\mathrm{Var}_q[\beta\log(p_\theta/p^*)]`, which is
    0 iff :math:`p_\theta = p^*` on the support of :math:`q`.

    Args:
        r_hat: ``(B,)`` implicit reward (:func:`implicit_reward`), carries the gradient.
        reward: ``(B,)`` true reward (detached).
        group_ids: ``(B,)`` integer prompt ids; every group needs >= 2 samples.
        weights: optional ``(B,)`` non-negative per-sample weights (detached), e.g.
            :func:`group_softmax_weights`; ``None`` means 1.

    Returns:
        ``(B,)`` loss per sample.

    Reference: ``crd``.
    """
    r_hat = check_batch_vector("r_hat", r_hat)
    reward = check_batch_vector("reward", reward, r_hat.shape[0])
    weights = _check_weights(weights, r_hat.shape[0])
    # in float64, rounded once: the centred residual of rewards near 1e30 is exact enough there, but its
    # float32 rounding error (1e23) squared overflowed a loss that is finite
    dtype = torch.promote_types(r_hat.dtype, reward.dtype)
    f64 = torch.float64
    residual = center_in_groups(r_hat.to(f64), group_ids) - center_in_groups(reward.detach().to(f64), group_ids)
    loss = 0.5 * residual**2
    loss = loss if weights is None else weights.to(f64) * loss
    return loss.to(dtype if weights is None else torch.promote_types(dtype, weights.dtype))


def uncentered_reward_loss(
    r_hat: Tensor, reward: Tensor, normalizer: Optional[Tensor] = None
) -> Tensor:
    r"""Uncentered reward matching (the comparison CRD improves on), per sample.

    .. math::
        \ell_i = \tfrac12\,\big[\hat r_i - r_i + \beta\log Z(c_i)\big]^2

    With ``normalizer=None`` the unknown :math:`\beta\log Z(c)` is dropped (taken as 0): the target
    :math:`\hat r = r` is then unattainable by a normalised density whenever :math:`\log Z(c) \neq 0`,
    and on samples from a fixed sampler the minimiser is biased (measured in
    ``toys.experiments.crd_centering``).  Passing the exact ``normalizer`` (an oracle only toys have)
    makes the loss 0 at :math:`p^*`.

    Args:
        r_hat: ``(B,)`` implicit reward, carries the gradient.
        reward: ``(B,)`` true reward (detached).
        normalizer: optional ``(B,)`` :math:`\beta\log Z(c_i)` of each sample's prompt.

    Returns:
        ``(B,)``.

    Reference: ``crd`` (the ill-posed uncentered objective).
    """
    r_hat = check_batch_vector("r_hat", r_hat)
    reward = check_batch_vector("reward", reward, r_hat.shape[0]).detach()
    if normalizer is not None:
        reward = reward - check_batch_vector("normalizer", normalizer, r_hat.shape[0]).detach()
    return 0.5 * (r_hat - reward) ** 2


def group_softmax_weights(reward: Tensor, group_ids: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Within-group softmax weights of the rewards, rescaled to mean 1 in every group (detached).

    .. math::
        w_i = |g(i)|\;\frac{\exp(r_i/\tau)}{\sum_{j\in g(i)} \exp(r_j/\tau)}

    They emphasise the high-reward samples of each prompt (the self-normalised importance weights
    of :math:`p^* \propto p_{ref} e^{r/\tau}` when the group is drawn from :math:`p_{ref}` and
    :math:`\tau = \beta`).  Invariant to per-prompt constants in ``reward``; since they only
    reweight the squared residuals, :func:`crd_loss` stays 0 at :math:`p^*`.

    Args:
        reward: ``(B,)`` true rewards.
        group_ids: ``(B,)`` integer prompt ids; every group needs >= 2 samples.
        temperature: :math:`\tau > 0`.

    Returns:
        ``(B,)`` non-negative weights, mean 1 within every group.

    Reference: ``crd`` and public reward-weighted reimplementations (group softmax weighting).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    reward = check_batch_vector("reward", reward).detach()
    inverse, counts = _groups(group_ids, reward.shape[0])
    z = reward / temperature
    g_max = torch.full((counts.shape[0],), -float("inf"), dtype=z.dtype, device=z.device)
    g_max = g_max.scatter_reduce(0, inverse, z, reduce="amax")
    e = torch.exp(z - g_max[inverse])
    sums = torch.zeros(counts.shape[0], dtype=z.dtype, device=z.device).index_add(0, inverse, e)
    return counts.to(z.dtype)[inverse] * e / sums[inverse]


def unit_interval_advantage(
    reward: Tensor, group_ids: Tensor, scale: Optional[float] = None, clip: float = 1.0
) -> Tensor:
    r"""The [0, 1] advantage map (DiffusionNFT-style "optimality probability").

    .. math::
        A_i = r_i - \bar r_{g(i)},\qquad
        m_i = \tfrac12 + \tfrac12\,\mathrm{clip}\big(A_i / s,\,-k,\,k\big) / k \in [0, 1]

    with scale :math:`s` (``None``: the standard deviation of the centered advantages over the whole
    batch) and clip level :math:`k`.  Used as the reward fed to :func:`crd_loss` it changes the
    target to :math:`p_{ref}\,e^{m/\beta}/Z`: an affine map of the advantage only rescales
    :math:`\beta` (by :math:`2ks`), but clipping saturates the rewards beyond :math:`\pm ks` — the
    target is then no longer the tilt by :math:`r`.

    Args:
        reward: ``(B,)`` true rewards.
        group_ids: ``(B,)`` integer prompt ids; every group needs >= 2 samples.
        scale: positive float or ``None``.
        clip: :math:`k > 0`.

    Returns:
        ``(B,)`` values in [0, 1] (detached).

    Reference: ``nft`` (optimality probability), ``crd`` reimplementations.
    """
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise ValueError(f"clip must be a float > 0, got {clip!r}")
    adv = center_in_groups(check_batch_vector("reward", reward).detach(), group_ids)
    if scale is None:
        s = float(adv.std()) if adv.numel() > 1 else 0.0
        if not s > 0:
            raise ValueError("scale=None needs advantages with a positive std; every group is constant")
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a float > 0 or None, got {scale!r}")
        s = float(scale)
    return 0.5 + 0.5 * torch.clamp(adv / s, -clip, clip) / clip
