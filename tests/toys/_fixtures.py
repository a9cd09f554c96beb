"""Shared GMMs and rewards for the toys tests (not a test module)."""

from __future__ import annotations

import torch

from toys.gmm import GaussianMixture

F64 = torch.float64


def three_mode_gmm(dtype: torch.dtype = F64) -> GaussianMixture:
    """A fixed, well-conditioned 2D mixture with three correlated components."""
    w = torch.tensor([0.3, 0.5, 0.2], dtype=dtype)
    m = torch.tensor([[-2.0, 0.0], [1.0, 1.5], [2.0, -1.0]], dtype=dtype)
    S = torch.tensor(
        [[[0.5, 0.2], [0.2, 0.3]], [[0.3, -0.1], [-0.1, 0.4]], [[0.2, 0.0], [0.0, 0.6]]], dtype=dtype
    )
    return GaussianMixture(w, m, S)


def random_gmm(seed: int, k: int = 3, d: int = 2, dtype: torch.dtype = F64) -> GaussianMixture:
    """A random mixture with weights bounded away from 0 and covariances with eigenvalues in [0.05, 2]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=F64) + 0.2
    w = w / w.sum()
    m = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=F64))
    ev = 0.05 + 1.95 * torch.rand(k, d, generator=g, dtype=F64)
    S = q @ torch.diag_embed(ev) @ q.transpose(-1, -2)
    S = 0.5 * (S + S.transpose(-1, -2))
    return GaussianMixture(w.to(dtype), m.to(dtype), S.to(dtype))


def gauss_hermite_expectation(p: GaussianMixture, f, n: int = 40):
    r"""``E_p[f(x)]`` by tensor-product Gauss–Hermite quadrature on every component of ``p``.

    ``f`` maps ``(N, d)`` to ``(N,)`` (or ``(N, ...)``); the result keeps autograd through ``p``'s
    means and covariances (nodes ``x = m_k + L_k z``).  Exact for polynomials of degree < 2n in x.
    """
    import itertools

    import numpy as np

    z1, w1 = np.polynomial.hermite_e.hermegauss(n)
    w1 = w1 / np.sqrt(2.0 * np.pi)
    d = p.dim
    z = torch.tensor(list(itertools.product(z1, repeat=d)), dtype=p.dtype)
    w = torch.tensor([float(np.prod(c)) for c in itertools.product(w1, repeat=d)], dtype=p.dtype)
    L = torch.linalg.cholesky(p.covs)
    total = 0.0
    for k in range(p.n_components):
        x = p.means[k] + z @ L[k].T
        fx = f(x)
        total = total + p.weights[k] * torch.tensordot(w, fx, dims=([0], [0]))
    return total
