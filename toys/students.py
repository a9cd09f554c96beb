r"""Students for the toy on-policy distillation experiments (docs/toys.md).

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

from toys.gmm import GaussianMixture, mixture_posterior

__all__ = ["ResidualMLPStudent", "GMMStudent", "StackedMLPStudent", "StackedGMMStudent", "check_task", "stacked_mlp"]

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


def _features(x: Tensor, sigma: SigmaLike, task: int, n_tasks: int) -> Tensor:
    """The MLP input :math:`[x, \\sigma, e_k]`, ``(*, d + 1 + K)`` for ``x`` ``(*, d)``."""
    onehot = torch.zeros(x.shape[:-1] + (n_tasks,), dtype=x.dtype, device=x.device)
    onehot[..., task] = 1.0
    if isinstance(sigma, Tensor):
        s = _sigma_column(sigma, x) if x.dim() == 2 else sigma.to(x.dtype).expand(x.shape[:-1])[..., None]
    else:
        s = torch.full(x.shape[:-1] + (1,), float(sigma), dtype=x.dtype, device=x.device)
    return torch.cat([x, s, onehot], dim=-1)


def stacked_mlp(params: list, h: Tensor) -> Tensor:
    r"""``R`` SiLU MLPs with stacked parameters applied to their own inputs.

    .. math:: h^{(l+1)}_{r} = \phi\big(h^{(l)}_{r} W^{(l)\top}_{r} + b^{(l)}_{r}\big)\ (\text{no }\phi\text{ on the last layer})

    Args:
        params: ``[W_1 (R, o, i), b_1 (R, o), W_2, b_2, ...]`` (``torch.nn.Linear`` layout per run).
        h: ``(R, B, i)`` inputs, row block ``r`` for MLP ``r``.

    Returns:
        ``(R, B, o_last)``.
    """
    n_lin = len(params) // 2
    for i in range(n_lin):
        W, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b[:, None, :], h, W.transpose(1, 2))
        if i < n_lin - 1:
            h = nn.functional.silu(h)
    return h


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
        return self.mlp(_features(x, sigma, task, self.n_tasks))

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
        h = stacked_mlp(params, _features(x, sigma, task, self.n_tasks)[:, None, :])[:, 0]
        return self.base.velocity(x, sigma) + h

    forward = velocity


def _covs(raw: Tensor) -> Tensor:
    r"""Covariances :math:`L L^\top + 10^{-6} I` from raw lower-triangular factors ``(*, d, d)`` (softplus diagonal)."""
    L = torch.tril(raw, diagonal=-1) + torch.diag_embed(nn.functional.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)))
    return L @ L.transpose(-1, -2) + 1e-6 * torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)


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
        return GaussianMixture(torch.softmax(self.logits[task], dim=0), self.means[task], _covs(self.chol_raw[task]),
                               validate=False)

    def velocity(self, x: Tensor, sigma: SigmaLike, task: int = 0) -> Tensor:
        r""":math:`v_{p_{\theta,k}}(x, \sigma)`, ``(B, d)``, differentiable in the parameters."""
        _check_x(x, self.dim)
        return self.mixture(task).velocity(x, sigma)

    forward = velocity


# ------------------------------------------------------------------------------------ stacked runs
def _check_stack(xs: object, n_runs: int, dim: int) -> Tensor:
    if not isinstance(xs, Tensor) or xs.dim() != 3 or xs.shape[0] != n_runs or xs.shape[2] != dim:
        raise ValueError(f"xs must have shape ({n_runs}, B, {dim}), got {tuple(getattr(xs, 'shape', ()))}")
    return xs


class StackedMLPStudent(nn.Module):
    r"""``R`` independent :class:`ResidualMLPStudent` s (runs, e.g. seeds) in one module: one forward
    evaluates every run on its own block of states.

    .. math:: v_{\theta_r}(x, \sigma, k) = v_{ref}(x, \sigma) + f_{\theta_r}(x, \sigma, e_k),\qquad r = 1..R

    Parameters are stacked copies (``(R, *p.shape)``) of the given students', so with an optimiser that
    acts elementwise (Adam) and a loss that sums the runs' losses, training the stack trains each run
    exactly as on its own.

    Args:
        students: ``R`` students with the same base, width, depth and number of tasks.

    Reference: ``diffusionopd`` (LoRA student on a frozen base).
    """

    def __init__(self, students: "list[ResidualMLPStudent]") -> None:
        super().__init__()
        if not students or not all(isinstance(st, ResidualMLPStudent) for st in students):
            raise TypeError("students must be a non-empty list of ResidualMLPStudent")
        first = students[0]
        shapes = [[tuple(p.shape) for p in st.mlp.parameters()] for st in students]
        if any(sh != shapes[0] for sh in shapes) or any(st.base is not first.base for st in students):
            raise ValueError("students must share the base mixture and the MLP shape")
        self.base, self.n_tasks, self.dim, self.n_runs = first.base, first.n_tasks, first.dim, len(students)
        self.__dict__["_template"] = first  # not a submodule: its parameters are not the stack's
        self.params = nn.ParameterList(
            [nn.Parameter(torch.stack([list(st.mlp.parameters())[i].detach() for st in students]).clone())
             for i in range(len(shapes[0]))])

    def velocity(self, xs: Tensor, sigma: float, task: int = 0) -> Tensor:
        """``(R, B, d)`` velocities of the ``R`` runs at their states ``xs`` ``(R, B, d)``."""
        base = self.base.velocity(xs.reshape(-1, self.dim), sigma).reshape(xs.shape)
        return base + self.residual(xs, sigma, task)

    def residual(self, xs: Tensor, sigma: float, task: int = 0) -> Tensor:
        """``(R, B, d)`` the runs' residuals :math:`f_{\\theta_r}(x, \\sigma, e_k)` at ``xs`` ``(R, B, d)``."""
        xs = _check_stack(xs, self.n_runs, self.dim)
        check_task(task, self.n_tasks)
        return stacked_mlp(list(self.params), _features(xs, sigma, task, self.n_tasks))

    def run(self, r: int) -> ResidualMLPStudent:
        """Run ``r`` as a stand-alone :class:`ResidualMLPStudent` (a detached copy of its parameters)."""
        import copy

        st = copy.deepcopy(self._template)
        with torch.no_grad():
            for p, q in zip(st.mlp.parameters(), self.params):
                p.copy_(q[r])
        return st

    forward = velocity


class StackedGMMStudent(nn.Module):
    r"""``R`` independent :class:`GMMStudent` s (runs) in one module, all started at ``init``.

    .. math:: v_{\theta_r}(\cdot, \sigma, k) = v_{p_{\theta_r,k}}(\cdot, \sigma),\qquad r = 1..R

    Args:
        init: the mixture every run and task starts at.
        n_runs: ``R``.
        n_tasks: tasks per run.

    Reference: ``diffusionopd`` (student initialised at the reference model).
    """

    def __init__(self, init: GaussianMixture, n_runs: int, n_tasks: int = 1) -> None:
        super().__init__()
        if isinstance(n_runs, bool) or not isinstance(n_runs, int) or n_runs < 1:
            raise ValueError(f"n_runs must be a positive int, got {n_runs!r}")
        one = GMMStudent(init, n_tasks)
        self.n_runs, self.n_tasks, self.dim = n_runs, n_tasks, one.dim
        rep = lambda t: nn.Parameter(t.detach().unsqueeze(0).repeat((n_runs,) + (1,) * t.dim()).clone())  # noqa: E731
        self.logits, self.means, self.chol_raw = rep(one.logits), rep(one.means), rep(one.chol_raw)

    def velocity(self, xs: Tensor, sigma: float, task: int = 0) -> Tensor:
        """``(R, B, d)`` exact flow velocities of the runs' task-``task`` mixtures at ``xs`` ``(R, B, d)``."""
        xs = _check_stack(xs, self.n_runs, self.dim)
        check_task(task, self.n_tasks)
        s = torch.full((1,), float(sigma), dtype=xs.dtype, device=xs.device)
        log_w = torch.log(torch.softmax(self.logits[:, task], dim=-1))
        _, eps_hat, x0_hat = mixture_posterior(log_w, self.means[:, task], _covs(self.chol_raw[:, task]), xs, s)
        return eps_hat - x0_hat

    def log_prob(self, x: Tensor) -> Tensor:
        r"""``(R, T, B)`` exact log-densities :math:`\log p_{\theta_r,k}(x_{r,k,b})` for ``x`` ``(R, T, B, d)``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[:2] != (self.n_runs, self.n_tasks) or x.shape[3] != self.dim:
            raise ValueError(f"x must have shape ({self.n_runs}, {self.n_tasks}, B, {self.dim}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        s = torch.zeros(1, dtype=x.dtype, device=x.device)
        log_w = torch.log(torch.softmax(self.logits, dim=-1))
        return mixture_posterior(log_w, self.means, _covs(self.chol_raw), x, s, log_p_only=True)[0]

    def run(self, r: int) -> GMMStudent:
        """Run ``r`` as a stand-alone :class:`GMMStudent` (a detached copy of its parameters)."""
        st = GMMStudent.__new__(GMMStudent)
        nn.Module.__init__(st)
        st.n_tasks, st.dim = self.n_tasks, self.dim
        st.logits = nn.Parameter(self.logits[r].detach().clone())
        st.means = nn.Parameter(self.means[r].detach().clone())
        st.chol_raw = nn.Parameter(self.chol_raw[r].detach().clone())
        return st

    forward = velocity
