r"""The toys' policy adapter for the engine (:class:`opd_ref.engine.Policy`): students, exact teachers, p_ref.

:class:`ToyPolicy` exposes a toy student, its teachers and the exact reference to
:mod:`opd_ref.engine` under adapter names:

* ``"student"`` — the trained student (:class:`~toys.students.ResidualMLPStudent`,
  :class:`~toys.students.GMMStudent` or their stacked versions), conditioned on ``cond`` = task index;
* ``"teacher_k"`` — task ``k``'s teacher: the exact flow of :math:`p^*_k = p_{ref}e^{r_k/\beta_k}/Z_k`
  (a :class:`~toys.gmm.GaussianMixture`), or an RL-trained model;
* ``None`` — the exact reference :math:`p_{ref}` (the frozen base).

**Stacked runs.**  A policy carries ``R`` independent runs (seeds, or seed x task pairs): a state
batch of ``R * B`` rows is run-major, rows ``r*B .. (r+1)*B - 1`` belong to run ``r``, which uses its
own student parameters (and, if given per run, its own teacher and reward).  The engine sees one
rollout of ``R * B`` samples; giving each batch weight ``R`` makes the engine's sample mean the sum of
the runs' own sample means, so each run's gradient is exactly its own, and Adam (elementwise) trains
each run as on its own.  This is the toys' main performance lever: the cost of a toy update is
Python overhead per call, not arithmetic.

Forward passes are counted per run (samples x steps, as for a single run): ``forward_passes[adapter]``.

Reference: ``diffusionopd`` (student and teachers as adapters on one frozen base).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from toys.gmm import GaussianMixture, mixture_posterior

__all__ = ["ToyPolicy", "STUDENT", "teacher_name", "stacked_mixtures_velocity"]

STUDENT = "student"

Teacher = Union[GaussianMixture, Sequence[GaussianMixture], nn.Module, Callable[[Tensor, float], Tensor]]


def teacher_name(task: int) -> str:
    """The adapter name of task ``task``'s teacher, ``"teacher_{task}"``."""
    return f"teacher_{int(task)}"


def stacked_mixtures_velocity(mixtures: Sequence[GaussianMixture]) -> Callable[[Tensor, float], Tensor]:
    r"""The exact flow velocity of ``R`` mixtures (same number of components), each on its own block.

    .. math:: v_r(x, \sigma) = \mathbb E_r[\varepsilon|x] - \mathbb E_r[x_0|x]\ \text{for rows of run } r

    Returns:
        ``v(xs (R, B, d), sigma) -> (R, B, d)``.
    """
    log_w = torch.stack([m.log_weights for m in mixtures])
    means = torch.stack([m.means for m in mixtures])
    covs = torch.stack([m.covs for m in mixtures])

    def velocity(xs: Tensor, sigma: float) -> Tensor:
        s = torch.full((1,), float(sigma), dtype=xs.dtype, device=xs.device)
        _, eps_hat, x0_hat = mixture_posterior(log_w, means, covs, xs, s)
        return eps_hat - x0_hat

    return velocity


class ToyPolicy:
    r"""A toy student with exact teachers and the exact reference as an engine
    :class:`~opd_ref.engine.Policy` (see the module docstring for adapters and stacked runs).

    .. math::
        v_{\texttt{student}}(x, \sigma, k) = v_\theta(x,\sigma,k),\quad
        v_{\texttt{teacher\_k}}(x, \sigma) = v_{p^*_k}(x,\sigma),\quad v_{None}(x, \sigma) = v_{p_{ref}}(x,\sigma)

    Args:
        student: a single-run student (``velocity(x (B, d), sigma, task)``) or a stacked one
            (:class:`~toys.students.StackedMLPStudent` / :class:`~toys.students.StackedGMMStudent`,
            ``n_runs`` and ``velocity(xs (R, B, d), sigma, task)``).
        teachers: per task ``k``, its teacher: a :class:`~toys.gmm.GaussianMixture` (exact flow,
            shared by the runs), a list of ``R`` mixtures (one per run), a stacked single-task model
            (e.g. per-run RL-trained teachers, called with task 0), or a callable ``v(x (N, d), sigma)``.
        reference: :math:`p_{ref}` (the adapter ``None``).

    Reference: ``diffusionopd``.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[Teacher] = (), reference: Optional[GaussianMixture] = None):
        if not hasattr(student, "velocity"):
            raise TypeError(f"student must have velocity(x, sigma, task), got {type(student).__name__}")
        self.student = student
        self.stacked = hasattr(student, "n_runs")
        self.n_runs = int(student.n_runs) if self.stacked else 1
        self.dim = int(student.dim)
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("student has no trainable parameters")
        self.state_dtype = params[0].dtype
        self.device = params[0].device
        self.event_shape = (self.dim,)
        self.reference = reference
        self._fns: Dict[Optional[str], Callable[[Tensor, float, object], Tensor]] = {STUDENT: self._student_velocity}
        for k, t in enumerate(teachers):
            self._fns[teacher_name(k)] = self._teacher_fn(t, k)
        self._ref_cache: Dict[tuple, tuple] = {}
        self._residual_on_reference = (reference is not None and hasattr(student, "residual")
                                       and getattr(student, "base", None) is reference)
        if reference is not None:
            self._fns[None] = lambda x, sigma, cond: self._reference_velocity(x, sigma)
        self._active: Optional[str] = STUDENT
        self.forward_passes: Dict[Optional[str], int] = defaultdict(int)

    # ------------------------------------------------------------------ adapters
    def _blocks(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.n_runs:
            raise ValueError(f"x has {x.shape[0]} rows, not a multiple of the {self.n_runs} stacked runs")
        return x.reshape(self.n_runs, -1, self.dim)

    def _student_velocity(self, x: Tensor, sigma: float, cond: object) -> Tensor:
        if self._residual_on_reference:  # v_ref + f_theta, with v_ref shared with the reference adapter
            f = (self.student.residual(self._blocks(x), sigma, cond).reshape(x.shape) if self.stacked
                 else self.student.residual(x, sigma, cond))
            return self._reference_velocity(x, sigma) + f
        if self.stacked:
            return self.student.velocity(self._blocks(x), sigma, cond).reshape(x.shape)
        return self.student.velocity(x, sigma, cond)

    def _reference_velocity(self, x: Tensor, sigma: float) -> Tensor:
        r""":math:`v_{ref}(x, \sigma)`, remembered for the stored states it was last asked at: the engine asks
        for the reference and the student (= reference + residual) at the same stored state (GRPO's KL
        term, every PPO epoch).  An entry holds the state tensor itself, so its memory cannot be reused
        by another tensor while the entry lives; a state that carries a gradient is never cached."""
        if x.requires_grad:
            return self.reference.velocity(x, sigma)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, float(sigma))
        hit = self._ref_cache.get(key)
        if hit is not None and hit[0]._version == x._version:
            return hit[1]
        v = self.reference.velocity(x, sigma)
        if len(self._ref_cache) >= 64:
            self._ref_cache.pop(next(iter(self._ref_cache)))
        self._ref_cache[key] = (x, v)
        return v

    def _teacher_fn(self, t: Teacher, k: int) -> Callable[[Tensor, float, object], Tensor]:
        if isinstance(t, GaussianMixture):
            return lambda x, sigma, cond: t.velocity(x, sigma)
        if isinstance(t, (list, tuple)):
            if len(t) != self.n_runs or not all(isinstance(m, GaussianMixture) for m in t):
                raise ValueError(f"teachers[{k}] must be one GaussianMixture per run ({self.n_runs}), got {len(t)} items")
            v = stacked_mixtures_velocity(t)
            return lambda x, sigma, cond: v(self._blocks(x), sigma).reshape(x.shape)
        if hasattr(t, "n_runs"):
            if t.n_runs != self.n_runs:
                raise ValueError(f"teachers[{k}] stacks {t.n_runs} runs, the student {self.n_runs}")
            return lambda x, sigma, cond: t.velocity(self._blocks(x), sigma, 0).reshape(x.shape)
        if callable(t):
            return lambda x, sigma, cond: t(x, sigma)
        raise TypeError(f"teachers[{k}] must be a GaussianMixture, a list of them, a stacked model or a callable, "
                        f"got {type(t).__name__}")

    # ------------------------------------------------------------------ the Policy protocol
    def velocity(self, x: Tensor, sigma: float, cond: object) -> Tensor:
        """``(R * B, d)`` velocity of the active adapter (``cond``: task index); counts ``B`` per run."""
        v = self._fns[self._active](x, sigma, cond)
        self.forward_passes[self._active] += x.shape[0] // self.n_runs
        return v

    @contextmanager
    def active(self, adapter: Optional[str]) -> Iterator[None]:
        """Make ``adapter`` (``"student"``, ``"teacher_k"`` or ``None`` = p_ref) active inside the context."""
        if adapter not in self._fns:
            raise ValueError(f"unknown adapter {adapter!r}; this policy has {sorted(map(str, self._fns))}")
        prev, self._active = self._active, adapter
        try:
            yield
        finally:
            self._active = prev

    def trainable_parameters(self, adapter: str) -> list:
        """The student's trainable parameters (only ``"student"`` is trained)."""
        if adapter != STUDENT:
            raise ValueError(f"only the adapter {STUDENT!r} is trainable here, got {adapter!r}")
        return [p for p in self.student.parameters() if p.requires_grad]

    @property
    def adapters(self) -> tuple:
        """The adapter names this policy provides."""
        return tuple(self._fns)
