r"""Exact Gaussian-mixture flows: densities, marginals, velocities, scores, denoisers and tilts.

For data :math:`x_0 \sim p = \sum_k w_k \mathcal N(m_k, S_k)` and the flow
:math:`x_\sigma = (1-\sigma) x_0 + \sigma \varepsilon` (docs/conventions.md) every quantity is closed form:

.. math::
    p_\sigma = \sum_k w_k \mathcal N(\mu_k, C_k),\quad \mu_k = (1-\sigma) m_k,\quad
    C_k = (1-\sigma)^2 S_k + \sigma^2 I,

and with responsibilities :math:`\gamma_k(x) \propto w_k \mathcal N(x; \mu_k, C_k)` and
:math:`u_k = C_k^{-1}(x - \mu_k)`:

.. math::
    \nabla\log p_\sigma(x) = -\sum_k \gamma_k u_k,\quad
    \mathbb E[\varepsilon|x] = \sigma\sum_k\gamma_k u_k,\quad
    \mathbb E[x_0|x] = \sum_k \gamma_k\big(m_k + (1-\sigma) S_k u_k\big),

    v(x,\sigma) = \mathbb E[\varepsilon|x] - \mathbb E[x_0|x].

Everything is batched over ``x`` of shape ``(B, d)``, uses Cholesky factors and log-sum-exp, works in
float32 and float64, and is differentiable in ``x`` and in ``weights``, ``means``, ``covs`` (a
parametric-GMM student trains through :meth:`GaussianMixture.velocity`).  Nothing that carries a
gradient is cached: build the mixture inside the training step.

Notation map: :math:`w_k, m_k, S_k` -> ``weights, means, covs``; :math:`\gamma_k` -> ``resp``;
:math:`\sigma` -> ``sigma``.

Reference: ``diffusionopd`` (exact GMM teachers), ``flowgrpo`` (flow convention).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from opd_ref.chains import gaussian_kl_full
from opd_ref.gopd import gopd_target_gaussian
from toys.rewards import QuadraticFormReward, as_quadratic_form, sum_rewards

__all__ = ["GaussianMixture", "gaussian_kl", "geometric_tilt", "mixture_posterior", "noised_cov_inverse"]

SigmaLike = Union[float, int, Tensor]
_LOG_2PI = math.log(2.0 * math.pi)


def _weight_tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9


class GaussianMixture:
    r"""A Gaussian mixture :math:`p(x) = \sum_{k=1}^K w_k \mathcal N(x; m_k, S_k)` on :math:`\mathbb R^d`.

    Args:
        weights: ``(K,)`` non-negative, summing to 1 (tolerance 1e-5 in float32, 1e-9 in float64).
        means: ``(K, d)``.
        covs: ``(K, d, d)`` symmetric positive definite.
        validate: check the arguments (default).  Internal constructors skip it.

    Raises:
        TypeError: non-tensor or non-floating arguments, mixed dtypes.
        ValueError: wrong shapes, negative / non-normalised weights, non-symmetric or non-PD covs,
            non-finite values.

    Reference: ``diffusionopd`` (exact toy teachers); docs/toys.md.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, *, validate: bool = True) -> None:
        if validate:
            _validate(weights, means, covs)
        self.weights = weights
        self.means = means
        self.covs = covs

    # ------------------------------------------------------------------ basics
    @classmethod
    def from_params(cls, logits: Tensor, means: Tensor, scale_tril: Tensor) -> "GaussianMixture":
        r"""Build from unconstrained parameters (convenient for a parametric-GMM student).

        .. math::
            w = \mathrm{softmax}(\text{logits}),\qquad S_k = L_k L_k^\top

        Args:
            logits: ``(K,)``.
            means: ``(K, d)``.
            scale_tril: ``(K, d, d)``; its lower triangle is used (non-zero diagonal).

        Returns:
            :class:`GaussianMixture`; gradients flow to all three arguments.

        Reference: ``diffusionopd`` (parametric students).
        """
        if not isinstance(logits, Tensor) or logits.dim() != 1:
            raise ValueError(f"logits must be a (K,) tensor, got {getattr(logits, 'shape', type(logits))}")
        if not isinstance(scale_tril, Tensor) or scale_tril.dim() != 3:
            raise ValueError(
                f"scale_tril must be a (K, d, d) tensor, got {getattr(scale_tril, 'shape', type(scale_tril))}"
            )
        L = torch.tril(scale_tril)
        return cls(torch.softmax(logits, dim=0), means, L @ L.transpose(-1, -2))

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> "GaussianMixture":
        r"""A single Gaussian :math:`\mathcal N(m, S)` as a one-component mixture.

        Args:
            mean: ``(d,)``.
            cov: ``(d, d)`` symmetric positive definite.

        Returns:
            :class:`GaussianMixture` with ``K = 1``.
        """
        if not isinstance(mean, Tensor) or not isinstance(cov, Tensor):
            raise TypeError("mean and cov must be tensors")
        return cls(torch.ones(1, dtype=mean.dtype), mean[None], cov[None])

    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        """Event dimension ``d``."""
        return int(self.means.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def log_weights(self) -> Tensor:
        """``(K,)`` log-weights (``-inf`` for zero weights)."""
        return torch.log(self.weights)

    def to(self, dtype: torch.dtype) -> "GaussianMixture":
        """The same mixture in another floating dtype."""
        return GaussianMixture(
            self.weights.to(dtype), self.means.to(dtype), self.covs.to(dtype), validate=False
        )

    def detach(self) -> "GaussianMixture":
        """The same mixture cut from the autograd graph."""
        return GaussianMixture(
            self.weights.detach(), self.means.detach(), self.covs.detach(), validate=False
        )

    def mean(self) -> Tensor:
        r"""Mixture mean :math:`\sum_k w_k m_k`, shape ``(d,)``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        r"""Mixture covariance :math:`\sum_k w_k (S_k + m_k m_k^\top) - \bar m \bar m^\top`, ``(d, d)``."""
        mbar = self.mean()
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - mbar[:, None] * mbar[None, :]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim}, dtype={self.dtype})"

    # ------------------------------------------------------------------ densities
    def _check_x(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.dim}), got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the mixture is {self.dtype}; convert one of them "
                "(GaussianMixture.to(dtype))"
            )
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def component_log_prob(self, x: Tensor) -> Tensor:
        r"""Component log-densities :math:`\log\mathcal N(x; m_k, S_k)`.

        Args:
            x: ``(B, d)``.

        Returns:
            ``(B, K)``.
        """
        x = self._check_x(x)
        S_inv, logdet = _inv_logdet(self.covs)  # (K, d, d), (K,)
        diff = x[:, None, :] - self.means[None]  # (B, K, d)
        maha = _dot(diff, _matvec(S_inv[None], diff))
        return -0.5 * maha - 0.5 * logdet - 0.5 * self.dim * _LOG_2PI

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact log-density :math:`\log\sum_k w_k\mathcal N(x; m_k, S_k)` (log-sum-exp).

        Args:
            x: ``(B, d)`` of the mixture's dtype.

        Returns:
            ``(B,)``.
        """
        return torch.logsumexp(self.log_weights + self.component_log_prob(x), dim=-1)

    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, *, return_components: bool = False
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""``n`` i.i.d. samples: :math:`k \sim \mathrm{Cat}(w)`, :math:`x = m_k + L_k \xi`.

        Reparameterised in ``means`` and ``covs`` (not in ``weights``).

        Args:
            n: number of samples (>= 1).
            generator: optional ``torch.Generator`` (CPU).
            return_components: also return the ``(n,)`` component indices.

        Returns:
            ``(n, d)`` samples (and the indices).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        w = self.weights.detach().to(torch.float64).clamp_min(0.0)
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        xi = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        L = torch.linalg.cholesky(self.covs)
        x = self.means[k] + (L[k] @ xi.unsqueeze(-1)).squeeze(-1)
        return (x, k) if return_components else x

    # ------------------------------------------------------------------ the flow
    def marginal(self, sigma: SigmaLike) -> "GaussianMixture":
        r"""The exact marginal of :math:`x_\sigma = (1-\sigma) x_0 + \sigma\varepsilon`:

        .. math::
            p_\sigma = \sum_k w_k\,\mathcal N\big((1-\sigma) m_k,\ (1-\sigma)^2 S_k + \sigma^2 I\big).

        Args:
            sigma: float or 0-d tensor in ``[0, 1]`` (a tensor may carry a gradient).

        Returns:
            :class:`GaussianMixture`.
        """
        s = self._scalar_sigma(sigma)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.means.device)
        return GaussianMixture(
            self.weights, (1.0 - s) * self.means, (1.0 - s) ** 2 * self.covs + s**2 * eye, validate=False
        )

    def _scalar_sigma(self, sigma: SigmaLike) -> Tensor:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
            raise TypeError(f"sigma must be a float or a 0-d tensor, got {type(sigma).__name__}")
        s = torch.as_tensor(sigma, dtype=self.dtype)
        if s.dim() != 0:
            raise ValueError(f"sigma must be a scalar here, got shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s)) or not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"sigma must lie in [0, 1], got {float(s)!r}")
        return s

    def _batch_sigma(self, sigma: SigmaLike, batch: int) -> Tensor:
        """sigma as a ``(1,)`` or ``(B,)`` tensor of the mixture's dtype, checked to lie in [0, 1]."""
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
            raise TypeError(f"sigma must be a float or a (B,) tensor, got {type(sigma).__name__}")
        if isinstance(sigma, float) and 0.0 <= sigma <= 1.0:  # the common case, checked without tensor ops
            return torch.full((1,), sigma, dtype=self.dtype)
        s = torch.as_tensor(sigma, dtype=self.dtype)
        if s.dim() == 0:
            s = s.reshape(1)
        elif s.dim() != 1 or s.shape[0] != batch:
            raise ValueError(f"sigma must be a float or a tensor of shape ({batch},), got {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()) or not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError(f"sigma must lie in [0, 1], got {s.detach().flatten()[:6].tolist()}")
        return s

    def posterior(self, x: Tensor, sigma: SigmaLike) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Posterior pieces at noise level ``sigma``.

        Args:
            x: ``(B, d)`` noisy state :math:`x_\sigma`.
            sigma: float or ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(log_p, eps_hat, x0_hat)``: :math:`\log p_\sigma(x)` ``(B,)``,
            :math:`\mathbb E[\varepsilon|x]` ``(B, d)`` and :math:`\mathbb E[x_0|x]` ``(B, d)``.
        """
        x = self._check_x(x)
        s = self._batch_sigma(sigma, x.shape[0])  # (Bs,)
        inv = None
        if isinstance(sigma, float) and not (self.means.requires_grad or self.covs.requires_grad
                                             or self.weights.requires_grad):
            # a fixed mixture at a grid sigma: C_sigma^{-1} and log det C_sigma are reused (rollouts
            # visit the same few sigmas thousands of times)
            cache = self.__dict__.setdefault("_inv_cache", {})
            key = (sigma, id(self.covs), self.covs._version)  # an in-place edit of covs misses the cache
            inv = cache.get(key)
            if inv is None:
                if len(cache) > 256:
                    cache.clear()
                inv = cache[key] = noised_cov_inverse(self.covs, s)
        return mixture_posterior(self.log_weights, self.means, self.covs, x, s, inv)

    def velocity(self, x: Tensor, sigma: SigmaLike) -> Tensor:
        r"""Exact flow-matching velocity :math:`v(x,\sigma) = \mathbb E[\varepsilon - x_0 \mid x_\sigma = x]`.

        Args:
            x: ``(B, d)``.
            sigma: float or ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(B, d)``; differentiable in ``x`` and in the mixture parameters.
        """
        _, eps_hat, x0_hat = self.posterior(x, sigma)
        return eps_hat - x0_hat

    def score(self, x: Tensor, sigma: SigmaLike) -> Tensor:
        r"""Score of the marginal, :math:`\nabla_x\log p_\sigma(x) = -\sum_k\gamma_k C_k^{-1}(x-\mu_k)
        = -\mathbb E[\varepsilon|x]/\sigma`.

        Args:
            x: ``(B, d)``.
            sigma: float or ``(B,)`` in ``[0, 1]`` (at 0 the data score, by autograd of ``log_prob``).

        Returns:
            ``(B, d)``.
        """
        x = self._check_x(x)
        s = self._batch_sigma(sigma, x.shape[0])
        if bool((s > 0).all()):
            _, eps_hat, _ = self.posterior(x, sigma)
            return -eps_hat / s[:, None]
        x_req = x.detach().requires_grad_(True) if not x.requires_grad else x
        with torch.enable_grad():
            lp = self.posterior(x_req, sigma)[0]
            (g,) = torch.autograd.grad(lp.sum(), x_req, create_graph=torch.is_grad_enabled())
        return g

    def denoise(self, x: Tensor, sigma: SigmaLike) -> Tensor:
        r"""Denoiser :math:`\mathbb E[x_0|x_\sigma = x] = \sum_k\gamma_k\big(m_k + (1-\sigma)S_k u_k\big) = x - \sigma v`.

        Args:
            x: ``(B, d)``.
            sigma: float or ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(B, d)``.
        """
        return self.posterior(x, sigma)[2]

    def marginal_log_prob(self, x: Tensor, sigma: SigmaLike) -> Tensor:
        r"""Marginal log-density :math:`\log p_\sigma(x)` with a per-sample ``sigma``.

        Args:
            x: ``(B, d)``.
            sigma: float or ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(B,)``.
        """
        return self.posterior(x, sigma)[0]

    # ------------------------------------------------------------------ tilting (D7, D12)
    def tilt(
        self, reward: Union[QuadraticFormReward, Sequence[QuadraticFormReward]], beta: SigmaLike
    ) -> Tuple["GaussianMixture", Tensor]:
        r"""Exponential tilt :math:`p^*(x) = p(x)\,e^{r(x)/\beta}/Z` by a concave quadratic reward.

        With :math:`r(x) = -\tfrac12 x^\top A x + h^\top x + r_0`, :math:`Q = A/\beta`,
        :math:`g_k = \nabla r(m_k)/\beta`, :math:`S_k = L_k L_k^\top`,
        :math:`B_k = I + L_k^\top Q L_k`:

        .. math::
            S_k' = L_k B_k^{-1} L_k^\top,\quad m_k' = m_k + S_k' g_k,\quad
            \log c_k = \frac{r(m_k)}{\beta} + \tfrac12 g_k^\top S_k' g_k - \tfrac12\log\det B_k,

            w_k' = \frac{w_k c_k}{Z},\qquad \log Z = \operatorname{logsumexp}_k(\log w_k + \log c_k).

        Args:
            reward: a :func:`~toys.rewards.LinearReward`, :func:`~toys.rewards.QuadraticReward`,
                :class:`~toys.rewards.QuadraticFormReward`, or a sequence of them (tilt by the sum:
                the joint multi-reward target).
            beta: temperature ``> 0`` (float or 0-d tensor).

        Returns:
            ``(tilted, log_Z)``: the tilted :class:`GaussianMixture` and the 0-d tensor
            :math:`\log Z = \log\mathbb E_p[e^{r/\beta}]`.

        Reference: ``rtdmd``, ``crd``, ``diffusionopd`` (reward-tilted target, D7).
        """
        r = as_quadratic_form(reward)
        if r.dim != self.dim:
            raise ValueError(f"reward has dimension {r.dim} but the mixture has dimension {self.dim}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float, Tensor)):
            raise TypeError(f"beta must be a positive float, got {type(beta).__name__}")
        b = torch.as_tensor(beta, dtype=self.dtype)
        if b.dim() != 0 or not bool(torch.isfinite(b)) or not float(b) > 0:
            raise ValueError(f"beta must be a finite scalar > 0, got {beta!r}")
        A, h, r0 = r.canonical()
        Q = A.to(self.dtype) / b
        eta = h.to(self.dtype) / b
        L = torch.linalg.cholesky(self.covs)  # (K, d, d)
        eye = torch.eye(self.dim, dtype=self.dtype)
        Bk = eye + L.transpose(-1, -2) @ Q @ L  # (K, d, d), SPD
        LB = torch.linalg.cholesky(Bk)
        M = torch.linalg.solve_triangular(LB, L.transpose(-1, -2), upper=False)  # LB^{-1} L^T
        S_new = M.transpose(-1, -2) @ M
        S_new = 0.5 * (S_new + S_new.transpose(-1, -2))
        g = eta[None] - self.means @ Q  # (K, d) gradient of r/beta at m_k (Q symmetric)
        m_new = self.means + (S_new @ g.unsqueeze(-1)).squeeze(-1)
        r_m = -0.5 * ((self.means @ Q) * self.means).sum(-1) + self.means @ eta + r0 / b
        log_c = (
            r_m
            + 0.5 * (g * (S_new @ g.unsqueeze(-1)).squeeze(-1)).sum(-1)
            - torch.log(torch.diagonal(LB, dim1=-2, dim2=-1)).sum(-1)
        )
        joint = self.log_weights + log_c
        log_Z = torch.logsumexp(joint, dim=0)
        w_new = torch.exp(joint - log_Z)
        return GaussianMixture(w_new, m_new, S_new, validate=False), log_Z

    def tilt_sum(
        self,
        rewards: Sequence[QuadraticFormReward],
        beta: SigmaLike,
        weights: Optional[Sequence[float]] = None,
    ) -> Tuple["GaussianMixture", Tensor]:
        r"""Tilt by the weighted sum :math:`\sum_j \lambda_j r_j` (joint multi-reward target).

        .. math::
            p^* \propto p\,\exp\Big(\sum_j \lambda_j r_j/\beta\Big)

        Args:
            rewards: sequence of concave quadratic rewards.
            beta: temperature ``> 0``.
            weights: non-negative :math:`\lambda_j` (default all 1).

        Returns:
            ``(tilted, log_Z)`` as :meth:`tilt`.

        Reference: ``diffusionopd`` (multi-reward targets), ``rtdmd``.
        """
        return self.tilt(sum_rewards(rewards, weights), beta)

    def geometric_tilt(self, teacher: "GaussianMixture", lam: float) -> Tuple["GaussianMixture", Tensor]:
        r"""G-OPD target :math:`p_{ref}(p_T/p_{ref})^\lambda / Z` for single Gaussians (D12).

        See :func:`geometric_tilt`.  ``self`` is :math:`p_{ref}`.
        """
        return geometric_tilt(self, teacher, lam)

    # ------------------------------------------------------------------ KL
    def kl_exact(self, other: "GaussianMixture") -> Tensor:
        """Exact KL(self || other) for single Gaussians (``K = 1`` both); see :func:`gaussian_kl`."""
        return gaussian_kl(self, other)

    def kl_monte_carlo(
        self, other: "GaussianMixture", n: int, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        r"""Monte-Carlo :math:`\mathrm{KL}(p\|q) \approx \frac1n\sum_i [\log p(x_i) - \log q(x_i)]`,
        :math:`x_i\sim p`, with exact log-densities (GMM KLs have no closed form).

        Returns:
            ``(estimate, standard_error)`` 0-d tensors (standard error = sample sd / sqrt(n)).
        """
        if not isinstance(other, GaussianMixture) or other.dim != self.dim:
            raise ValueError("other must be a GaussianMixture of the same dimension")
        x = self.sample(n, generator)
        lr = self.log_prob(x) - other.to(self.dtype).log_prob(x)
        return lr.mean(), lr.std() / math.sqrt(n)


# ---------------------------------------------------------------------- free functions
def gaussian_kl(p: GaussianMixture, q: GaussianMixture) -> Tensor:
    r"""Exact KL between two single Gaussians (one-component mixtures), full covariances.

    .. math::
        \mathrm{KL}(\mathcal N(m_p,S_p)\|\mathcal N(m_q,S_q)) = \tfrac12\Big[\operatorname{tr}(S_q^{-1}S_p)
        + (m_q-m_p)^\top S_q^{-1}(m_q-m_p) - d + \log\frac{\det S_q}{\det S_p}\Big]

    Returns:
        0-d tensor.

    Reference: ``dmd`` / ``diffusionopd`` (Gaussian KLs).
    """
    _single_gaussians(
        ("p", p), ("q", q), why="the KL between mixtures has no closed form (use kl_monte_carlo or exact log-densities)"
    )
    return gaussian_kl_full(p.means[0], p.covs[0], q.means[0].to(p.dtype), q.covs[0].to(p.dtype))


def geometric_tilt(
    ref: GaussianMixture, teacher: GaussianMixture, lam: float
) -> Tuple[GaussianMixture, Tensor]:
    r"""The G-OPD target :math:`p^*_\lambda = p_{ref}^{1-\lambda} p_T^{\lambda} / Z_\lambda` (D12).

    For single Gaussians the log-density is quadratic, so with precisions
    :math:`\Lambda = (1-\lambda)\Lambda_{ref} + \lambda\Lambda_T` (must be positive definite, which can
    fail for :math:`\lambda > 1`):

    .. math::
        S^* = \Lambda^{-1},\quad m^* = S^*\big((1-\lambda)\Lambda_{ref} m_{ref} + \lambda\Lambda_T m_T\big),

        \log Z_\lambda = \log\!\int p_{ref}^{1-\lambda} p_T^{\lambda}\,dx .

    For mixtures the product is not a mixture in general; the case the toys need — the teacher is
    the reward tilt :math:`p_T = p_{ref} e^{r/\beta}/Z` — is ``ref.tilt(reward, beta / lam)`` (the
    target is :math:`p_{ref} e^{\lambda r/\beta}/Z'`), which is exact for any GMM.

    Computed by :func:`opd_ref.gopd.gopd_target_gaussian` (this wraps it for mixtures).

    Args:
        ref: one-component mixture :math:`p_{ref}`.
        teacher: one-component mixture :math:`p_T`.
        lam: reward scale :math:`\lambda \ge 0` (1 gives the teacher, 0 the reference).

    Returns:
        ``(target, log_Z)``.

    Reference: ``gopd`` (reward extrapolation), D12.
    """
    _single_gaussians(
        ("ref", ref),
        ("teacher", teacher),
        why="p_ref^(1-lam) p_T^lam is a GMM in closed form only for single Gaussians; for a reward-tilted "
        "teacher use ref.tilt(reward, beta / lam)",
    )
    dt = ref.dtype
    mean, cov, log_z = gopd_target_gaussian(
        teacher.means[0].to(dt), teacher.covs[0].to(dt), ref.means[0], ref.covs[0], lam
    )
    cov = 0.5 * (cov + cov.T)
    return GaussianMixture(torch.ones(1, dtype=dt), mean[None], cov[None], validate=False), log_z


def _single_gaussians(first: Tuple[str, object], second: Tuple[str, object], *, why: str) -> None:
    """Require two one-component mixtures of equal dimension (``why`` explains a rejected mixture)."""
    for name, g in (first, second):
        if not isinstance(g, GaussianMixture):
            raise TypeError(f"{name} must be a GaussianMixture, got {type(g).__name__}")
        if g.n_components != 1:
            raise ValueError(f"{name} has {g.n_components} components: {why}")
    (n1, g1), (n2, g2) = first, second
    if g1.dim != g2.dim:  # type: ignore[union-attr]
        raise ValueError(f"{n1} and {n2} have dimensions {g1.dim} and {g2.dim}")  # type: ignore[union-attr]


def noised_cov_inverse(covs: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`C^{-1}` and :math:`\log\det C` of the noised covariances :math:`C = (1-\sigma)^2 S_k + \sigma^2 I`.

    Args:
        covs: ``(*P, K, d, d)``.
        s: noise levels broadcastable to ``(*P, B)``.

    Returns:
        ``(C_inv (*P, Bs, K, d, d), logdet (*P, Bs, K))``.
    """
    eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device)
    a = (1.0 - s)[..., None, None, None]  # (.., Bs, 1, 1, 1)
    C = a**2 * covs[..., None, :, :, :] + (s**2)[..., None, None, None] * eye  # (*P, Bs, K, d, d)
    return _inv_logdet(C)


def mixture_posterior(log_weights: Tensor, means: Tensor, covs: Tensor, x: Tensor, s: Tensor,
                      inv: Optional[Tuple[Tensor, Tensor]] = None,
                      log_p_only: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Posterior pieces of the flow of one or several stacked mixtures (no validation: callers check).

    For :math:`x_\sigma = (1-\sigma)x_0 + \sigma\varepsilon`, :math:`x_0\sim\sum_k w_k\mathcal N(m_k, S_k)`:

    .. math::
        C_k = (1-\sigma)^2 S_k + \sigma^2 I,\quad u_k = C_k^{-1}(x - (1-\sigma)m_k),\quad
        \gamma_k \propto w_k\mathcal N(x; (1-\sigma)m_k, C_k),\quad
        \mathbb E[\varepsilon|x] = \sigma\textstyle\sum_k\gamma_k u_k,\quad
        \mathbb E[x_0|x] = \sum_k\gamma_k(m_k + (1-\sigma)S_k u_k)

    Args:
        log_weights: ``(*P, K)`` log mixture weights (``P`` = stacked mixtures, possibly empty).
        means: ``(*P, K, d)``.
        covs: ``(*P, K, d, d)``.
        x: ``(*P, B, d)`` states; batch ``b`` of mixture ``p`` uses mixture ``p``.
        s: noise levels broadcastable to ``(*P, B)`` (e.g. ``(1,)`` or ``(B,)``), in ``[0, 1]``.
        inv: :func:`noised_cov_inverse` of ``(covs, s)`` if already known.
        log_p_only: return ``(log_p, None, None)`` (skips the posterior means).

    Returns:
        ``(log_p (*P, B), eps_hat (*P, B, d), x0_hat (*P, B, d))``.

    Reference: ``diffusionopd`` (exact toy teachers).
    """
    d = means.shape[-1]
    C_inv, logdet = noised_cov_inverse(covs, s) if inv is None else inv
    diff = x[..., :, None, :] - (1.0 - s)[..., None, None] * means[..., None, :, :]  # (*P, B, K, d)
    u = _matvec(C_inv, diff)  # (*P, B, K, d) = C^{-1} diff
    comp = -0.5 * _dot(diff, u) - 0.5 * logdet - 0.5 * d * _LOG_2PI  # (*P, B, K)
    joint = log_weights[..., None, :] + comp
    log_p = torch.logsumexp(joint, dim=-1)
    if log_p_only:
        return log_p, None, None
    resp = torch.exp(joint - log_p[..., None])  # (*P, B, K)
    ru = (resp[..., None] * u).sum(-2)  # (*P, B, d)
    eps_hat = s[..., None] * ru
    Su = _matvec(covs[..., None, :, :, :], u)  # (*P, B, K, d)
    x0_k = means[..., None, :, :] + (1.0 - s)[..., None, None] * Su
    x0_hat = (resp[..., None] * x0_k).sum(-2)
    return log_p, eps_hat, x0_hat


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    """``M @ v`` for ``M`` ``(..., d, d)`` and ``v`` ``(..., d)`` (broadcast).  For ``d <= 4`` a sum of
    column-times-entry products (the toys' many tiny systems: several times faster than a reduction
    over a size-2 dim, and the same floating-point sum); larger ``d``: product and reduction."""
    d = M.shape[-1]
    if d > 4:
        return (M * v.unsqueeze(-2)).sum(-1)
    out = M[..., 0] * v[..., 0:1]
    for j in range(1, d):
        out = out + M[..., j] * v[..., j : j + 1]
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` over a short last dim (``<= 4``: unrolled, the same floating-point sum)."""
    d = a.shape[-1]
    if d > 4:
        return (a * b).sum(-1)
    out = a[..., 0] * b[..., 0]
    for j in range(1, d):
        out = out + a[..., j] * b[..., j]
    return out


def _inv_logdet(C: Tensor) -> Tuple[Tensor, Tensor]:
    """Inverse and log-determinant of SPD matrices ``(..., d, d)``.

    ``d <= 2``: closed form (adjugate), vectorised and differentiable, which keeps the many tiny
    per-sample systems of the toys fast; larger ``d``: Cholesky.
    """
    d = C.shape[-1]
    if d == 1:
        c = C[..., 0, 0]
        return (1.0 / c)[..., None, None], torch.log(c)
    if d == 2:
        a, b, c = C[..., 0, 0], 0.5 * (C[..., 0, 1] + C[..., 1, 0]), C[..., 1, 1]
        det = a * c - b * b
        inv = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
        return inv, torch.log(det)
    L = torch.linalg.cholesky(C)
    return torch.cholesky_inverse(L), 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def _validate(weights: object, means: object, covs: object) -> None:
    for name, t in (("weights", weights), ("means", means), ("covs", covs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not torch.is_floating_point(t):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    assert isinstance(weights, Tensor) and isinstance(means, Tensor) and isinstance(covs, Tensor)
    if not (weights.dtype == means.dtype == covs.dtype):
        raise TypeError(
            f"weights, means and covs must share a dtype, got {weights.dtype}, {means.dtype}, {covs.dtype}"
        )
    if weights.dim() != 1 or weights.shape[0] < 1:
        raise ValueError(f"weights must have shape (K,), got {tuple(weights.shape)}")
    K = weights.shape[0]
    if means.dim() != 2 or means.shape[0] != K or means.shape[1] < 1:
        raise ValueError(f"means must have shape ({K}, d), got {tuple(means.shape)}")
    d = means.shape[1]
    if covs.shape != (K, d, d):
        raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
    for name, t in (("weights", weights), ("means", means), ("covs", covs)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values")
    w = weights.detach()
    if bool((w < 0).any()):
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    total = float(w.to(torch.float64).sum())
    if abs(total - 1.0) > _weight_tol(weights.dtype):
        raise ValueError(f"weights must sum to 1, got sum {total!r} (weights {w.tolist()})")
    c = covs.detach()
    scale = max(1.0, float(c.abs().max()))
    asym = float((c - c.transpose(-1, -2)).abs().max())
    if asym > 1e-6 * scale:
        raise ValueError(f"covs must be symmetric, got max |S - S^T| = {asym:.3g}")
    _, info = torch.linalg.cholesky_ex(c)
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        raise ValueError(f"covs must be positive definite; component(s) {bad} are not")
