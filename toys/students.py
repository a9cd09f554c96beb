r"""Students for the toy on-policy distillation experiments (DESIGN.md §4).

Two students, both exposing ``velocity(x, sigma, task) -> (B, d)``:

(a) :class:`ResidualMLPStudent` — the exact reference velocity :math:`v_{ref}` of the frozen base
    plus a zero-initialised residual MLP conditioned on :math:`(x, \sigma, k)`:

    .. math:: v_\theta(x, \sigma, k) = v_{ref}(x, \sigma) + f_\theta(x, \sigma, e_k),\qquad f_{\theta_0} \equiv 0,

    the toy analogue of a LoRA on a frozen base (at initialisation the student *is* the base).

(b) :class:`GMMStudent` — a parametric Gaussian mixture per task whose exact probability-flow
    velocity is the student, :math:`v_\theta(\cdot, \sigma, k) = v_{p_{\theta,k}}(\cdot, \sigma)`, so its
    density, and hence its KL to a tilted target, is exact.

Notation map: :math:`e_k` -> one-hot ``task``; :math:`p_{\theta,k}` -> ``GMMStudent.mixture(k)``.
Reference: ``diffusionopd`` (task-conditioned student, LoRA on a frozen base).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from toys.gmm import GaussianMixture

__all__ = ["ResidualMLPStudent", "GMMStudent", "check_task"]

SigmaLike = Union[float, Tensor]


def check_task(task: object, n_tasks: int) -> int:
    """Validate a task index: an ``int`` in ``[0, n_tasks)``.

    Raises:
        TypeError / ValueError naming ``task`` and the value received.
    """
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int, got {type(task).__name__}")
    if not 0 <= task < n_tasks:
        raise ValueError(f"task must lie in [0, {n_tasks}), got {task}")
    return task


def _check_x(x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (B, {dim}), got {tuple(x.shape)}")
    return x


def _sigma_column(sigma: SigmaLike, x: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a ({x.shape[0]},) tensor, got shape {tuple(s.shape)}")
    return s[:, None]


class ResidualMLPStudent(nn.Module):
    r"""Student (a): frozen exact base velocity plus a zero-initialised task-conditioned residual MLP.

    .. math:: v_\theta(x,\sigma,k) = v_{ref}(x,\sigma) + W_L\,\phi(\dots\phi(W_1[x, \sigma, e_k]))

    with :math:`W_L = 0` at initialisation.

    Args:
        base: the frozen reference :class:`~toys.gmm.GaussianMixture` (its exact velocity is used).
        n_tasks: number of tasks ``K`` (one-hot conditioning).
        hidden: MLP width.
        depth: number of hidden layers (>= 1).
        dtype: parameter dtype.

    Reference: ``diffusionopd`` (LoRA student on a frozen base).
    """

    def __init__(self, base: GaussianMixture, n_tasks: int, hidden: int = 64, depth: int = 2,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if n_tasks < 1 or depth < 1 or hidden < 1:
            raise ValueError(f"n_tasks, hidden and depth must be >= 1, got {n_tasks}, {hidden}, {depth}")
        self.base = base
        self.n_tasks = n_tasks
        self.dim = int(base.means.shape[1])
        layers: list[nn.Module] = []
        width = self.dim + 1 + n_tasks
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, dtype=dtype), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, self.dim, dtype=dtype)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)

    def residual(self, x: Tensor, sigma: SigmaLike, task: int) -> Tensor:
        """The residual :math:`f_\\theta(x, \\sigma, e_k)`, ``(B, d)``."""
        x = _check_x(x, self.dim)
        check_task(task, self.n_tasks)
        s = _sigma_column(sigma, x)
        onehot = torch.zeros(x.shape[0], self.n_tasks, dtype=x.dtype, device=x.device)
        onehot[:, task] = 1.0
        return self.mlp(torch.cat([x, s, onehot], dim=1))

    def velocity(self, x: Tensor, sigma: SigmaLike, task: int = 0) -> Tensor:
        r""":math:`v_\theta(x, \sigma, k)`, ``(B, d)``; the frozen base has no trainable parameters
        (gradients reach ``x``, e.g. for the sampler's Jacobian, but no base tensor)."""
        return self.base.velocity(x, sigma) + self.residual(x, sigma, task)

    def replicated_params(self, n: int) -> list:
        """``n`` independent copies of the MLP parameters as leaves of shape ``(n, *p.shape)``, in the
        order of ``self.parameters()`` (for per-sample gradients in one backward pass)."""
        return [p.detach().unsqueeze(0).expand((n,) + tuple(p.shape)).clone().requires_grad_(True)
                for p in self.mlp.parameters()]

    def velocity_per_sample(self, x: Tensor, sigma: SigmaLike, task: int, params: list) -> Tensor:
        r"""Velocity where sample ``i`` uses its own parameter copy ``params[.][i]`` (from
        :meth:`replicated_params`); ``loss.sum()`` then backpropagates per-sample gradients."""
        x = _check_x(x, self.dim)
        check_task(task, self.n_tasks)
        onehot = torch.zeros(x.shape[0], self.n_tasks, dtype=x.dtype, device=x.device)
        onehot[:, task] = 1.0
        h = torch.cat([x, _sigma_column(sigma, x), onehot], dim=1)
        n_lin = len(params) // 2
        for i in range(n_lin):
            W, b = params[2 * i], params[2 * i + 1]
            h = torch.einsum("boi,bi->bo", W, h) + b
            if i < n_lin - 1:
                h = nn.functional.silu(h)
        return self.base.velocity(x, sigma) + h

    forward = velocity


class GMMStudent(nn.Module):
    r"""Student (b): one parametric Gaussian mixture per task, the student's velocity being its exact
    probability-flow velocity.

    Parametrisation per task ``k``: weights :math:`\mathrm{softmax}(\ell_k)`, means :math:`m_k`,
    covariances :math:`L_k L_k^\top + 10^{-6} I` with :math:`L_k` lower-triangular, softplus diagonal.

    Args:
        init: mixture to start from (every task starts at it, e.g. ``p_ref``).
        n_tasks: number of tasks.

    Reference: ``diffusionopd`` (student initialised at the reference model).
    """

    def __init__(self, init: GaussianMixture, n_tasks: int = 1) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.n_tasks = n_tasks
        w, m, c = init.weights.detach(), init.means.detach(), init.covs.detach()
        self.dim = int(m.shape[1])
        L = torch.linalg.cholesky(c - 1e-6 * torch.eye(self.dim, dtype=c.dtype))
        diag = torch.diagonal(L, dim1=-2, dim2=-1)
        raw_diag = diag + torch.log(-torch.expm1(-diag))  # softplus^{-1}
        raw = torch.tril(L, diagonal=-1) + torch.diag_embed(raw_diag)
        rep = lambda t: t.unsqueeze(0).repeat((n_tasks,) + (1,) * t.dim()).clone()
        self.logits = nn.Parameter(rep(torch.log(w)))
        self.means = nn.Parameter(rep(m))
        self.chol_raw = nn.Parameter(rep(raw))

    def mixture(self, task: int = 0) -> GaussianMixture:
        """The task's mixture :math:`p_{\\theta,k}` as a differentiable :class:`GaussianMixture`."""
        check_task(task, self.n_tasks)
        raw = self.chol_raw[task]
        L = torch.tril(raw, diagonal=-1) + torch.diag_embed(nn.functional.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)))
        covs = L @ L.transpose(-1, -2) + 1e-6 * torch.eye(self.dim, dtype=raw.dtype)
        return GaussianMixture(torch.softmax(self.logits[task], dim=0), self.means[task], covs, validate=False)

    def velocity(self, x: Tensor, sigma: SigmaLike, task: int = 0) -> Tensor:
        r""":math:`v_{p_{\theta,k}}(x, \sigma)`, ``(B, d)``, differentiable in the parameters."""
        _check_x(x, self.dim)
        return self.mixture(task).velocity(x, sigma)

    forward = velocity
