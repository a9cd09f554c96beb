r"""Path-space KL of Markov chains with Gaussian kernels: the chain rule (derivation D3).

For two Markov chains :math:`P` (student) and :math:`Q` (teacher) on :math:`x_0, \dots, x_N` with a
common initial law and kernels :math:`p_n(x_{n+1}|x_n)`, :math:`q_n(x_{n+1}|x_n)`, the chain rule of
the KL divergence gives

.. math::
    \mathrm{KL}(P\|Q) = \mathbb E_P\Big[\sum_{n=0}^{N-1}\log\frac{p_n(x_{n+1}|x_n)}{q_n(x_{n+1}|x_n)}\Big]
        = \mathbb E_P\Big[\sum_{n=0}^{N-1}\mathrm{KL}\big(p_n(\cdot|x_n)\,\|\,q_n(\cdot|x_n)\big)\Big],

so the reverse KL of on-policy distillation is the expected sum of closed-form per-step KLs along
student rollouts.  For Gaussian kernels each term is :func:`opd_ref.divergences.diag_gaussian_kl`
(or :func:`~opd_ref.divergences.same_cov_kl` when the stds agree).

For *linear-Gaussian* chains, :math:`x_{n+1} = A_n x_n + b_n + s_n\xi_n`, both path measures are joint
Gaussians; :func:`linear_gaussian_path_kl` computes :math:`\mathrm{KL}(P\|Q)` from the two joint
covariances directly (no chain rule), which is the exact reference for the tests.

Notation map: :math:`A_n, b_n, s_n` -> ``LinearGaussianChain.A, .b, .std``; :math:`m_0, S_0` ->
``mean0, cov0`` (initial law).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from opd_ref._checks import check_tensor, promote
from opd_ref.divergences import diag_gaussian_kl

__all__ = [
    "per_step_kls",
    "path_kl",
    "sequence_log_ratio",
    "LinearGaussianChain",
    "linear_gaussian_marginals",
    "linear_gaussian_joint",
    "gaussian_kl_full",
    "linear_gaussian_path_kl",
]


def per_step_kls(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    r"""Per-step closed-form KLs :math:`\mathrm{KL}(p_n(\cdot|x_n)\|q_n(\cdot|x_n))` along rollouts.

    .. math::
        \mathrm{KL}_n = \sum_i\Big[\log\frac{s_{q,n}}{s_{p,n}} + \frac{s_{p,n}^2 + (\mu_{p,n,i}-\mu_{q,n,i})^2}{2s_{q,n}^2}
            - \frac12\Big]

    Args:
        mean_p: ``(N, B, *event)`` student kernel means at the student's states.
        std_p: ``(N, B)`` or broadcastable to ``mean_p``; strictly positive.
        mean_q: ``(N, B, *event)`` teacher kernel means at the same states.
        std_q: like ``std_p``.

    Returns:
        ``(N, B)`` per-step KLs, summed over event dims.

    Reference: ``diffusionopd`` (per-step closed-form KL), ``tm-opd`` (per-token reverse KL).
    """
    mean_p = check_tensor("mean_p", mean_p, min_dim=2)
    mean_q = check_tensor("mean_q", mean_q, min_dim=2)
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean_p and mean_q must have the same shape, got {tuple(mean_p.shape)} and {tuple(mean_q.shape)}")
    N, B = mean_p.shape[:2]
    event = mean_p.shape[2:]
    flat = lambda t: t.reshape((N * B,) + tuple(event))  # noqa: E731
    std_p, std_q = _std_like("std_p", std_p, mean_p), _std_like("std_q", std_q, mean_p)
    kl = diag_gaussian_kl(flat(mean_p), flat(std_p), flat(mean_q), flat(std_q))
    return kl.reshape(N, B)


def _std_like(name: str, std: object, mean: Tensor) -> Tensor:
    std = check_tensor(name, std, min_dim=0)
    if std.dim() == 2 and std.shape == mean.shape[:2]:
        std = std.reshape(std.shape + (1,) * (mean.dim() - 2))
    try:
        return std.expand_as(mean)
    except RuntimeError:
        raise ValueError(
            f"{name} must have shape (N, B) or be broadcastable to {tuple(mean.shape)}, got {tuple(std.shape)}"
        ) from None


def path_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    r"""Sum of per-step KLs along each rollout; its mean over rollouts estimates the path KL (D3).

    .. math::
        \widehat{\mathrm{KL}}(P\|Q)(x_{0:N}) = \sum_{n=0}^{N-1}\mathrm{KL}\big(p_n(\cdot|x_n)\|q_n(\cdot|x_n)\big),
        \qquad \mathbb E_P[\widehat{\mathrm{KL}}] = \mathrm{KL}(P\|Q)

    Args:
        mean_p, std_p, mean_q, std_q: as in :func:`per_step_kls`.

    Returns:
        ``(B,)``.

    Reference: ``diffusionopd`` (chain rule), ``tm-opd``.
    """
    return per_step_kls(mean_p, std_p, mean_q, std_q).sum(0)


def sequence_log_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Monte-Carlo sequence log-ratio :math:`\sum_n \log p_n(x_{n+1}|x_n) - \log q_n(x_{n+1}|x_n)`.

    .. math::
        \ell(x_{0:N}) = \sum_{n=0}^{N-1}\big[\log p_n(x_{n+1}|x_n) - \log q_n(x_{n+1}|x_n)\big],
        \qquad \mathbb E_P[\ell] = \mathrm{KL}(P\|Q)

    For same-std Gaussian kernels :math:`\ell - \sum_n\mathrm{KL}_n = \sum_n\delta_n^\top\xi_n` with
    :math:`\delta_n = (\mu_{p,n}-\mu_{q,n})/s_n`: mean zero, variance :math:`2\,\mathbb E_P[\sum_n\mathrm{KL}_n]`.

    Args:
        log_p: ``(N, B)`` student log-probs of the sampled transitions.
        log_q: ``(N, B)`` teacher log-probs of the same transitions.

    Returns:
        ``(B,)``.

    Reference: ``tm-opd`` (sequence-level reverse KL), ``diffusionopd``.
    """
    log_p = check_tensor("log_p", log_p, min_dim=2)
    log_q = check_tensor("log_q", log_q, min_dim=2)
    if log_p.shape != log_q.shape or log_p.dim() != 2:
        raise ValueError(f"log_p and log_q must both have shape (N, B), got {tuple(log_p.shape)} and {tuple(log_q.shape)}")
    return (log_p - log_q).sum(0)


@dataclass(frozen=True)
class LinearGaussianChain:
    r"""Kernels :math:`x_{n+1} = A_n x_n + b_n + s_n\xi_n`, :math:`\xi_n\sim\mathcal N(0, I)`.

    .. math::
        x_{n+1} = A_n x_n + b_n + s_n\xi_n,\quad \xi_n\sim\mathcal N(0, I_d),\qquad
        \text{i.e. } x_{n+1}\,|\,x_n \sim \mathcal N\big(A_n x_n + b_n,\ s_n^2 I_d\big),\quad n = 0, \dots, N-1

    Args:
        A: ``(N, d, d)``.
        b: ``(N, d)``.
        std: ``(N,)`` step stds ``>= 0`` (a 0 is a deterministic step: marginals are fine, the
            path KL then needs both chains to agree on that step, else the joint covariance is singular).

    Reference: ``diffusionopd`` (SDE kernels of single-Gaussian flows are affine in :math:`x`).
    """

    A: Tensor
    b: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        A = check_tensor("A", self.A, min_dim=3)
        b = check_tensor("b", self.b, min_dim=2)
        s = check_tensor("std", self.std, min_dim=1)
        N, d = A.shape[0], A.shape[1]
        if A.shape != (N, d, d) or b.shape != (N, d) or s.shape != (N,):
            raise ValueError(
                f"need A (N, d, d), b (N, d), std (N,); got {tuple(A.shape)}, {tuple(b.shape)}, {tuple(s.shape)}"
            )
        if not bool((s >= 0).all()):
            raise ValueError(f"std must be >= 0 at every step, got min {float(s.min()):.3g}")
        A, b, s = promote(A, b, s)
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "std", s)

    @property
    def n_steps(self) -> int:
        """Number of steps ``N``."""
        return int(self.A.shape[0])

    @property
    def dim(self) -> int:
        """Dimension ``d``."""
        return int(self.A.shape[1])


def _check_init(mean0: Tensor, cov0: Tensor, chain: LinearGaussianChain, name: str = "chain") -> tuple:
    """Validated ``(mean0, cov0, A, b, std)`` in one common dtype."""
    if not isinstance(chain, LinearGaussianChain):
        raise TypeError(f"{name} must be a LinearGaussianChain, got {type(chain).__name__}")
    d = chain.dim
    check_tensor("mean0", mean0)
    check_tensor("cov0", cov0, min_dim=2)
    if mean0.shape != (d,) or cov0.shape != (d, d):
        raise ValueError(f"need mean0 ({d},) and cov0 ({d}, {d}), got {tuple(mean0.shape)}, {tuple(cov0.shape)}")
    return promote(mean0, cov0, chain.A, chain.b, chain.std)


def linear_gaussian_marginals(mean0: Tensor, cov0: Tensor, chain: LinearGaussianChain) -> Tuple[Tensor, Tensor]:
    r"""Marginal laws :math:`x_n\sim\mathcal N(\mu_n, \Sigma_n)` of a linear-Gaussian chain.

    .. math::
        \mu_{n+1} = A_n\mu_n + b_n,\qquad \Sigma_{n+1} = A_n\Sigma_n A_n^\top + s_n^2 I

    Args:
        mean0: ``(d,)`` initial mean.
        cov0: ``(d, d)`` initial covariance.
        chain: :class:`LinearGaussianChain`.

    Returns:
        ``(means (N + 1, d), covs (N + 1, d, d))``.

    Reference: ``diffusionopd``.
    """
    mean0, cov0, A_all, b_all, std_all = _check_init(mean0, cov0, chain)
    eye = torch.eye(chain.dim, dtype=cov0.dtype)
    mus, covs = [mean0], [cov0]
    for n in range(chain.n_steps):
        A = A_all[n]
        mus.append(A @ mus[-1] + b_all[n])
        covs.append(A @ covs[-1] @ A.T + std_all[n] ** 2 * eye)
    return torch.stack(mus), torch.stack(covs)


def linear_gaussian_joint(mean0: Tensor, cov0: Tensor, chain: LinearGaussianChain) -> Tuple[Tensor, Tensor]:
    r"""Joint law of the whole path :math:`(x_0, \dots, x_N)` as one Gaussian in :math:`\mathbb R^{(N+1)d}`.

    .. math::
        \mathrm{Cov}(x_m, x_n) = \Sigma_m\,(A_{n-1}\cdots A_m)^\top\quad (m \le n)

    Args:
        mean0, cov0, chain: as in :func:`linear_gaussian_marginals`.

    Returns:
        ``(mean ((N + 1) d,), cov ((N + 1) d, (N + 1) d))``.

    Reference: ``diffusionopd`` (path measure of the sampler).
    """
    mus, covs = linear_gaussian_marginals(mean0, cov0, chain)
    N, d = chain.n_steps, chain.dim
    big = torch.zeros((N + 1) * d, (N + 1) * d, dtype=covs.dtype)
    for m in range(N + 1):
        block = covs[m]  # Cov(x_m, x_n) for n = m, then propagated forwards
        big[m * d : (m + 1) * d, m * d : (m + 1) * d] = block
        for n in range(m + 1, N + 1):
            block = block @ chain.A[n - 1].to(covs.dtype).T
            big[m * d : (m + 1) * d, n * d : (n + 1) * d] = block
            big[n * d : (n + 1) * d, m * d : (m + 1) * d] = block.T
    return mus.reshape(-1), big


def gaussian_kl_full(mean_p: Tensor, cov_p: Tensor, mean_q: Tensor, cov_q: Tensor) -> Tensor:
    r"""KL between full-covariance Gaussians (Cholesky, float64 recommended).

    .. math::
        \mathrm{KL}(\mathcal N(\mu_p,\Sigma_p)\|\mathcal N(\mu_q,\Sigma_q)) = \tfrac12\Big[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p)
            + (\mu_q-\mu_p)^\top\Sigma_q^{-1}(\mu_q-\mu_p) - D + \log\frac{\det\Sigma_q}{\det\Sigma_p}\Big]

    Args:
        mean_p, mean_q: ``(D,)``.
        cov_p, cov_q: ``(D, D)`` symmetric positive definite.

    Returns:
        0-d tensor.

    Reference: ``diffusionopd`` (exact path KL of linear-Gaussian chains).
    """
    for name, t in (("mean_p", mean_p), ("mean_q", mean_q)):
        check_tensor(name, t)
    for name, t in (("cov_p", cov_p), ("cov_q", cov_q)):
        check_tensor(name, t, min_dim=2)
    D = mean_p.shape[0]
    if mean_p.shape != (D,) or mean_q.shape != (D,) or cov_p.shape != (D, D) or cov_q.shape != (D, D):
        raise ValueError(
            f"mean_p, cov_p, mean_q, cov_q must have shapes (D,), (D, D), (D,), (D, D); got "
            f"{tuple(mean_p.shape)}, {tuple(cov_p.shape)}, {tuple(mean_q.shape)}, {tuple(cov_q.shape)}"
        )
    mean_p, cov_p, mean_q, cov_q = promote(mean_p, cov_p, mean_q, cov_q)
    Lp, info_p = torch.linalg.cholesky_ex(cov_p)
    Lq, info_q = torch.linalg.cholesky_ex(cov_q)
    if int(info_p) or int(info_q):
        raise ValueError("cov_p and cov_q must be positive definite")
    M = torch.linalg.solve_triangular(Lq, Lp, upper=False)
    z = torch.linalg.solve_triangular(Lq, (mean_q - mean_p)[:, None], upper=False)
    logdet = 2.0 * (torch.log(torch.diagonal(Lq)).sum() - torch.log(torch.diagonal(Lp)).sum())
    return 0.5 * ((M**2).sum() + (z**2).sum() - D + logdet)


def linear_gaussian_path_kl(
    mean0: Tensor, cov0: Tensor, chain_p: LinearGaussianChain, chain_q: LinearGaussianChain
) -> Tensor:
    r"""Exact :math:`\mathrm{KL}(P\|Q)` of two linear-Gaussian chains from their joint covariances.

    .. math::
        \mathrm{KL}(P\|Q) = \mathrm{KL}\big(\mathcal N(\mu^P, \Sigma^P)\,\|\,\mathcal N(\mu^Q, \Sigma^Q)\big)
        \quad\text{on } \mathbb R^{(N+1)d}

    Computed without the chain rule: the reference against which the per-step sum is tested.

    Args:
        mean0: ``(d,)`` common initial mean.
        cov0: ``(d, d)`` common initial covariance (positive definite).
        chain_p: the student chain :math:`P`.
        chain_q: the teacher chain :math:`Q` (same ``N`` and ``d``).

    Returns:
        0-d tensor.

    Reference: ``diffusionopd`` (D3, chain rule).
    """
    for name, c in (("chain_p", chain_p), ("chain_q", chain_q)):
        if not isinstance(c, LinearGaussianChain):
            raise TypeError(f"{name} must be a LinearGaussianChain, got {type(c).__name__}")
    if chain_p.A.shape != chain_q.A.shape:
        raise ValueError(f"chains differ in (N, d, d): {tuple(chain_p.A.shape)} vs {tuple(chain_q.A.shape)}")
    mp, Sp = linear_gaussian_joint(mean0, cov0, chain_p)
    mq, Sq = linear_gaussian_joint(mean0, cov0, chain_q)
    return gaussian_kl_full(mp, Sp, mq, Sq)
