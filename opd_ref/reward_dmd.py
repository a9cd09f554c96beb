r"""Distribution matching read as a reward (R_dm) and RTDMD's hybrid gradient (derivation D16).

**(i) DMD as a reward** (``rdm``).  For a generator with density :math:`p_\theta` and a teacher
:math:`p_T`, the reward :math:`r_\theta(x) = -\log\frac{p_\theta(x)}{p_T(x)}` (held fixed when
differentiating) gives :math:`\mathbb E_{p_\theta}[r_\theta] = -\mathrm{KL}(p_\theta\|p_T)` and the
REINFORCE estimator of :math:`\nabla\mathrm{KL}`

.. math::
    \hat g_{RF} = -r_\theta(x)\,\nabla_\theta\log p_\theta(x),\qquad
    \mathbb E[\hat g_{RF}] = \nabla_\theta\mathrm{KL}(p_\theta\|p_T)
        = \mathbb E_z\Big[(s_\theta - s_T)(x)^\top\frac{\partial x}{\partial\theta}\Big]

(the score-function term :math:`\mathbb E[\nabla\log p_\theta] = 0`), the pathwise DMD gradient of
D10.  Group normalisation (R_dm's GNDM) replaces :math:`r_i` by the group advantage: the
leave-in group mean as baseline scales the mean by :math:`(G-1)/G` exactly (the sample's own reward is
in the mean); dividing by the group std rescales the gradient by about :math:`1/\mathrm{std}(r)`, a
:math:`\theta`-dependent step size, not a bias of direction at leading order.

**(ii) RTDMD's hybrid gradient** (``rtdmd``).  A few-step generator whose steps
:math:`0..N-2` are Gaussian kernels and whose last step :math:`x_N = f_\theta(x_{N-1})` is
deterministic: with :math:`x_{N-1}` drawn from the stochastic steps,

.. math::
    \nabla_\theta\mathbb E[r(x_N)] = \mathbb E\Big[r(x_N)\sum_{n<N-1}\nabla_\theta\log\pi_\theta(x_{n+1}|x_n)
        + \nabla_\theta r\big(f_\theta(x_{N-1})\big)\big|_{x_{N-1}\ \mathrm{fixed}}\Big],

(product rule on :math:`\int p_\theta(x_{N-1})\,r(f_\theta(x_{N-1}))`), unbiased; the reward-tilted
objective :math:`\mathbb E[r] - \beta\,\mathrm{KL}(p_\theta\|p_T)` adds :math:`-\beta` times the DMD
gradient.  A constant baseline :math:`b` in :math:`r - b` leaves the mean unchanged.

Notation map: ``a``, ``b`` -> the affine step parameters :math:`x_{n+1} = a_n x_n + b_n + s_n\varepsilon_n`
(``std`` = :math:`s_n`), ``noise[0]`` -> :math:`x_0 \sim \mathcal N(0, I)`, ``noise[n+1]`` ->
:math:`\varepsilon_n`.

Reference: ``rdm``, ``rtdmd``, ``dmd``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref._checks import check_same_shape, check_tensor, promote
from opd_ref.distribution_matching import distribution_matching_surrogate
from opd_ref.divergences import gaussian_log_prob
from opd_ref.engine.objectives import group_advantages
from opd_ref.kernels import GaussianStep

__all__ = [
    "NORMALISATIONS",
    "dmd_reward",
    "rdm_reinforce_surrogate",
    "gaussian_dmd_gradient",
    "gaussian_dmd_variances",
    "affine_chain_marginal",
    "rtdmd_surrogate",
]

NORMALISATIONS = ("none", "mean", "mean_std")
Reward = Callable[[Tensor], Tensor]


def dmd_reward(log_p_theta: Tensor, log_p_teacher: Tensor) -> Tensor:
    r"""R_dm's reward, detached: :math:`r_\theta(x) = -(\log p_\theta(x) - \log p_T(x))`.

    .. math:: \mathbb E_{p_\theta}[r_\theta] = -\mathrm{KL}(p_\theta\|p_T)

    Args:
        log_p_theta: ``(B,)`` student log-density at its samples.
        log_p_teacher: ``(B,)`` teacher log-density there.

    Returns:
        ``(B,)`` detached.

    Reference: ``rdm``.
    """
    log_p_theta = check_tensor("log_p_theta", log_p_theta)
    log_p_teacher = check_tensor("log_p_teacher", log_p_teacher)
    check_same_shape("log_p_theta", log_p_theta, "log_p_teacher", log_p_teacher)
    return -(log_p_theta - log_p_teacher).detach()


def rdm_reinforce_surrogate(log_prob: Tensor, reward: Tensor, *, normalise: str = "none",
                            group_size: int | None = None) -> Tensor:
    r"""Surrogate whose gradient is REINFORCE on the reward :math:`r` (gradient *descent* on :math:`-\mathbb E r`).

    .. math::
        \ell_i = -\mathrm{sg}[A_i]\,\log p_\theta(x_i),\qquad
        A = r\ (\texttt{none}),\quad A_i = r_i - \bar r_{g(i)}\ (\texttt{mean}),\quad
        A_i = \frac{r_i - \bar r_{g(i)}}{\mathrm{std}_g(r) + 10^{-4}}\ (\texttt{mean\_std})

    (groups of ``group_size`` consecutive samples; ``mean_std`` is the engine's
    :func:`~opd_ref.engine.objectives.group_advantages`).  With :math:`r = -\log(p_\theta/p_T)`
    (:func:`dmd_reward`), ``none`` has mean :math:`\nabla\mathrm{KL}`; ``mean`` has mean
    :math:`\tfrac{G-1}{G}\nabla\mathrm{KL}`.

    Args:
        log_prob: ``(B,)`` :math:`\log p_\theta(x_i)` with the gradient (the samples detached).
        reward: ``(B,)`` rewards (detached here).
        normalise: one of :data:`NORMALISATIONS`.
        group_size: ``G >= 2`` dividing ``B`` (for ``mean`` / ``mean_std``).

    Returns:
        ``(B,)``.

    Reference: ``rdm`` (GNDM), ``flowgrpo`` (group normaliser).
    """
    log_prob = check_tensor("log_prob", log_prob)
    reward = check_tensor("reward", reward).detach()
    check_same_shape("log_prob", log_prob, "reward", reward)
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if normalise == "none":
        adv = reward
    else:
        B = reward.shape[0]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or B % group_size:
            raise ValueError(f"group_size must be an int >= 2 dividing the batch {B}, got {group_size!r}")
        groups = reward.reshape(-1, group_size)
        if normalise == "mean":
            adv = (groups - groups.mean(-1, keepdim=True)).reshape(-1)
        else:
            adv = group_advantages(groups).reshape(-1)
    return -adv * log_prob


def _gaussian_args(mean, std, mean_T, std_T) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    mean = check_tensor("mean", mean, min_dim=0)
    args = [mean]
    for name, t in (("std", std), ("mean_T", mean_T), ("std_T", std_T)):
        t = check_tensor(name, t, min_dim=0)
        check_same_shape("mean", mean, name, t)
        args.append(t)
    for name, t in (("std", args[1]), ("std_T", args[3])):
        if not bool((t > 0).all()):
            raise ValueError(f"{name} must be > 0, got min {float(t.min()):.4g}")
    return promote(*args)


def _in_float64(out: Dict[str, Tensor], like: Tensor) -> Dict[str, Tensor]:
    r"""Outputs computed in float64 (the squared ratios of stds overflow float32 already at
    :math:`s/s_T \sim 10^{19}`), rounded once to the inputs' dtype."""
    return {k: v.to(like.dtype) for k, v in out.items()}


def gaussian_dmd_gradient(mean: Tensor, std: Tensor, mean_T: Tensor, std_T: Tensor) -> Dict[str, Tensor]:
    r"""The common mean of the REINFORCE (R_dm) and pathwise (DMD) estimators for a diagonal Gaussian
    generator :math:`x = m + s\odot z` against a diagonal Gaussian teacher, in :math:`(m, \log s)`.

    .. math::
        \frac{\partial\,\mathrm{KL}}{\partial m} = \frac{m - m_T}{s_T^2},\qquad
        \frac{\partial\,\mathrm{KL}}{\partial\log s} = \frac{s^2}{s_T^2} - 1

    Args:
        mean, std, mean_T, std_T: ``(d,)`` (or any equal shape).

    Returns:
        ``{"mean": ..., "log_std": ...}``.

    Reference: ``rdm``, ``dmd``.
    """
    m, s, mT, sT = (t.double() for t in _gaussian_args(mean, std, mean_T, std_T))
    like = promote(mean, std, mean_T, std_T)[0]
    return _in_float64({"mean": (m - mT) / sT**2, "log_std": s**2 / sT**2 - 1.0}, like)


def gaussian_dmd_variances(mean: Tensor, std: Tensor, mean_T: Tensor, std_T: Tensor) -> Dict[str, Tensor]:
    r"""Per-coordinate variances of the one-sample estimators of :math:`\partial\mathrm{KL}/\partial m_j`.

    With :math:`z \sim \mathcal N(0, I)` and :math:`\log\frac{p_\theta}{p_T}(x) = \sum_k L_k`,
    :math:`L_k = \alpha_{0k} + \alpha_{1k} z_k + \alpha_{2k} z_k^2`
    (:math:`\alpha_0 = \log\frac{s_T}{s} + \frac{(m-m_T)^2}{2s_T^2}`, :math:`\alpha_1 = \frac{s(m-m_T)}{s_T^2}`,
    :math:`\alpha_2 = \tfrac12(\frac{s^2}{s_T^2} - 1)`), REINFORCE is :math:`\hat g_j = z_j\sum_k L_k / s_j`
    and pathwise DMD is :math:`(s_\theta - s_T)_j = z_j(\frac{s_j}{s_{T,j}^2} - \frac1{s_j}) + \frac{m_j - m_{T,j}}{s_{T,j}^2}`:

    .. math::
        \mathrm{Var}_{RF,j} = \frac{\mathbb E[L_j^2 z_j^2] + 2\,\mathbb E[L_j z_j^2]\,\mu_R + (\mathrm{v}_R + \mu_R^2)
            - \alpha_{1j}^2}{s_j^2},\quad
        \mathrm{Var}_{path,j} = \Big(\frac{s_j}{s_{T,j}^2} - \frac{1}{s_j}\Big)^2,

    :math:`\mathbb E[L_j^2 z_j^2] = \alpha_0^2 + 3\alpha_1^2 + 15\alpha_2^2 + 6\alpha_0\alpha_2`,
    :math:`\mathbb E[L_j z_j^2] = \alpha_0 + 3\alpha_2`, :math:`\mu_R, \mathrm{v}_R` the mean and variance
    of :math:`\sum_{k\ne j} L_k` (:math:`\sum \alpha_{0k}+\alpha_{2k}`, :math:`\sum \alpha_{1k}^2 + 2\alpha_{2k}^2`).
    Both vanish at the optimum (all :math:`\alpha = 0`); with the right std (:math:`s = s_T`) and a mean gap
    the pathwise variance is 0 while REINFORCE's is :math:`2\alpha_1^2/s^2 + O(\text{gap}^4)`.

    Args:
        mean, std, mean_T, std_T: ``(d,)``.

    Returns:
        ``{"reinforce": (d,), "pathwise": (d,)}``.

    Reference: ``rdm``, ``dmd``.
    """
    m, s, mT, sT = (t.double() for t in _gaussian_args(mean, std, mean_T, std_T))
    like = promote(mean, std, mean_T, std_T)[0]
    a0 = torch.log(sT / s) + (m - mT) ** 2 / (2.0 * sT**2)
    a1 = s * (m - mT) / sT**2
    a2 = 0.5 * (s**2 / sT**2 - 1.0)
    mu_r = (a0 + a2).sum() - (a0 + a2)
    v_r = (a1**2 + 2.0 * a2**2).sum() - (a1**2 + 2.0 * a2**2)
    second = (a0**2 + 3.0 * a1**2 + 15.0 * a2**2 + 6.0 * a0 * a2) + 2.0 * (a0 + 3.0 * a2) * mu_r + v_r + mu_r**2
    return _in_float64({"reinforce": (second - a1**2) / s**2, "pathwise": (s / sT**2 - 1.0 / s) ** 2}, like)


def _chain_args(a: Tensor, b: Tensor, std: Sequence[float]) -> Tuple[Tensor, Tensor, Tuple[float, ...]]:
    a = check_tensor("a", a)
    b = check_tensor("b", b)
    check_same_shape("a", a, "b", b)
    if isinstance(std, (str, bytes)) or not isinstance(std, (Sequence, Tensor)):
        raise TypeError(f"std must be a sequence of {a.shape[0]} floats (one per step), got {type(std).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float, Tensor)) for v in std):
        raise TypeError(f"std must hold floats, got {list(std)!r:.80}")
    std = tuple(float(s) for s in std)
    if len(std) != a.shape[0] or not all(math.isfinite(s) and s >= 0 for s in std):
        raise ValueError(f"std must hold {a.shape[0]} finite stds >= 0 (one per step), got {std}")
    return a, b, std


def affine_chain_marginal(a: Tensor, b: Tensor, std: Sequence[float]) -> Tuple[Tensor, Tensor]:
    r"""Mean and variance of :math:`x_N` for the chain :math:`x_{n+1} = a_n x_n + b_n + s_n\varepsilon_n`,
    :math:`x_0\sim\mathcal N(0, I)` (diagonal, per coordinate).

    .. math:: \mu_{n+1} = a_n\mu_n + b_n,\qquad v_{n+1} = a_n^2 v_n + s_n^2,\qquad \mu_0 = 0,\ v_0 = 1

    Args:
        a, b: ``(N, d)`` step parameters (with the gradient).
        std: ``N`` step stds :math:`s_n \ge 0`.

    Returns:
        ``(mean (d,), var (d,))``.

    Reference: ``rtdmd``.
    """
    a, b, std = _chain_args(a, b, std)
    dtype = torch.promote_types(a.dtype, b.dtype)
    # in float64 (the products of N step factors leave the float32 range first), rounded once
    mu, var = _affine_chain_marginal(a.double(), b.double(), std)
    return mu.to(dtype), var.to(dtype)


def _affine_chain_marginal(a: Tensor, b: Tensor, std: Tuple[float, ...]) -> Tuple[Tensor, Tensor]:
    mu = torch.zeros_like(a[0])
    var = torch.ones_like(a[0])
    for n, s in enumerate(std):
        mu = a[n] * mu + b[n]
        var = a[n] ** 2 * var + s * s
    return mu, var


def rtdmd_surrogate(a: Tensor, b: Tensor, std: Sequence[float], noise: Tensor, reward: Reward, *,
                    baseline: float = 0.0, pathwise_last: bool = True, beta: float = 0.0,
                    teacher: Tuple[Tensor, Tensor] | None = None) -> Tensor:
    r"""Surrogate whose gradient is minus RTDMD's estimator of :math:`\nabla(\mathbb E[r(x_N)] - \beta\,\mathrm{KL})`.

    .. math::
        \ell_i = -\Big(\mathrm{sg}[r(x_N) - b]\sum_{n\in\mathcal S}\log\pi_\theta(x_{n+1}|x_n)
            + \mathbb 1_{\text{pathwise\_last}}\, r\big(a_{N-1}\,\mathrm{sg}[x_{N-1}] + b_{N-1}\big)\Big)
            + \beta\,\big\langle\mathrm{sg}[s_\theta - s_T](\tilde x_N), \tilde x_N\big\rangle

    :math:`\mathcal S` = the stochastic steps (``pathwise_last``: all but the last, whose std must be 0
    -- RTDMD's hybrid; else all steps, stds > 0 -- pure REINFORCE); the states are detached except in
    the last step's pathwise term; :math:`\tilde x_N` is the fully reparametrised sample (DMD's
    pathwise gradient, D10) with the exact fake score of the Gaussian marginal
    (:func:`affine_chain_marginal`) and the teacher's :math:`\mathcal N(m_T, v_T)` score.

    Args:
        a, b: ``(N, d)`` step parameters.
        std: ``N`` step stds.
        noise: ``(N + 1, B, d)``: ``noise[0]`` the initial state, ``noise[n + 1]`` the step noises.
        reward: ``r(x (B, d)) -> (B,)``, differentiable in ``x``.
        baseline: constant :math:`b` subtracted from the reward in the score-function term.
        pathwise_last: RTDMD's hybrid (``True``) or pure REINFORCE (``False``).
        beta: weight :math:`\beta \ge 0` of the KL term; needs ``teacher`` when > 0.
        teacher: ``(mean (d,), var (d,))`` of the Gaussian teacher :math:`p_T`.

    Returns:
        ``(B,)``.

    Reference: ``rtdmd``, ``dmd``.
    """
    a, b, std = _chain_args(a, b, std)
    noise = check_tensor("noise", noise, min_dim=3)
    if noise.shape[0] != len(std) + 1 or noise.shape[2:] != a.shape[1:]:
        raise ValueError(f"noise must have shape ({len(std) + 1}, B, {tuple(a.shape[1:])}), got {tuple(noise.shape)}")
    if not callable(reward):
        raise TypeError(f"reward must be a callable x (B, d) -> (B,), got {type(reward).__name__}")
    if not isinstance(pathwise_last, bool):
        raise TypeError(f"pathwise_last must be a bool, got {type(pathwise_last).__name__}")
    for name, value in (("baseline", baseline), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a finite float, got {type(value).__name__} {value!r:.40}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    N = len(std)
    if pathwise_last and std[-1] != 0.0:
        raise ValueError(f"pathwise_last needs a deterministic last step (std[-1] = 0), got {std[-1]}")
    if not pathwise_last and min(std) <= 0.0:
        raise ValueError(f"pure REINFORCE needs every step stochastic (std > 0), got {std}")
    if beta < 0 or (beta > 0 and teacher is None):
        raise ValueError(f"beta must be >= 0, with teacher given when > 0; got beta={beta!r}, teacher={teacher!r}")
    if teacher is not None:
        if not isinstance(teacher, (tuple, list)) or len(teacher) != 2:
            raise TypeError(f"teacher must be a (mean (d,), var (d,)) pair, got {type(teacher).__name__}")
        m_T = check_tensor("teacher", teacher[0], min_dim=0)
        v_T = check_tensor("teacher", teacher[1], min_dim=0)
        for t in (m_T, v_T):
            if t.shape != a.shape[1:]:
                raise ValueError(f"teacher's mean and var must have shape {tuple(a.shape[1:])}, got {tuple(t.shape)}")
        if not bool((v_T > 0).all()):
            raise ValueError(f"teacher's var must be > 0, got min {float(v_T.min()):.4g}")
        teacher = (m_T.double(), v_T.double())
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), noise.dtype)
    # in float64 (log-densities times rewards of large states leave the float32 range, and differ by
    # terms of that size), rounded once; ``reward`` receives float64 states
    B = noise.shape[1]

    def checked_reward(x: Tensor) -> Tensor:
        r = reward(x)
        if not isinstance(r, Tensor) or r.shape != (B,):
            raise ValueError(f"reward must return a ({B},) tensor, got {getattr(r, 'shape', type(r).__name__)}")
        return r

    loss = _rtdmd_surrogate(a.double(), b.double(), std, noise.double(), checked_reward, float(baseline),
                            pathwise_last, float(beta), teacher)
    return loss.to(dtype)


def _rtdmd_surrogate(a, b, std, noise, reward, baseline, pathwise_last, beta, teacher) -> Tensor:
    N = len(std)
    x = noise[0]
    log_pi = torch.zeros(noise.shape[1], dtype=a.dtype, device=a.device)
    stochastic = N - 1 if pathwise_last else N
    for n in range(stochastic):
        mean = a[n] * x + b[n]
        x_next = (mean + std[n] * noise[n + 1]).detach()
        log_pi = log_pi + gaussian_log_prob(x_next, GaussianStep(mean, torch.full_like(mean, std[n])))
        x = x_next
    if pathwise_last:
        x_final = a[N - 1] * x + b[N - 1]
        r = reward(x_final)
        loss = -((r.detach() - baseline) * log_pi + r)
    else:
        loss = -(reward(x).detach() - baseline) * log_pi
    if beta > 0:
        x_path = noise[0]
        for n in range(N):
            x_path = a[n] * x_path + b[n] + std[n] * noise[n + 1]
        mu, var = _affine_chain_marginal(a, b, std)
        m_T, v_T = teacher
        score_fake = -(x_path - mu) / var
        score_real = -(x_path - m_T) / v_T
        loss = loss + beta * distribution_matching_surrogate(x_path, score_fake.detach(), score_real.detach())
    return loss
