r"""One rollout loop and one :class:`Trajectory` for every model, from a 2D toy to SD3.5.

A rollout runs the grid :math:`\sigma_0 > \dots > \sigma_N` from :math:`x_0` and draws

.. math::
    x_{n+1} = c_x^{(n)} x_n + c_v^{(n)} v(x_n, \sigma_n) + s_n\,\varepsilon_n,\qquad
    \varepsilon_n\sim\mathcal N(0, I),\qquad
    \log\pi(x_{n+1}|x_n) = -\tfrac12\|\varepsilon_n\|^2 - D\log s_n - \tfrac D2\log 2\pi

with the coefficients of :class:`~opd_ref.engine.kernel.KernelSpec` (derivation D2).  It stores the
states, the velocities and the standard-normal draws :math:`\varepsilon_n`, so any stored transition
can be re-evaluated later with gradient (:meth:`Trajectory.transition`) and the log-ratio of two
kernels at a stored state is computed from velocity differences and :math:`\varepsilon_n`, without
cancellation.  Deterministic steps (ODE, the last CPS step, the SDE's first step under
``sigma_one="ode"``) have ``stochastic[n] = False``, ``stds[n] = 0``, ``noises[n] = 0`` and
``log_probs[n] = 0``.

Notation map: :math:`x_n` -> ``states[n]``, :math:`v(x_n,\sigma_n)` -> ``velocities[n]``,
:math:`\varepsilon_n` -> ``noises[n]``, :math:`s_n` -> ``stds[n]``.

Reference: ``flowgrpo`` (stored SDE rollouts), ``diffusionopd`` (student rollouts, CPS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor

from opd_ref.engine.kernel import KernelSpec, StepCoefficients

__all__ = ["Velocity", "Trajectory", "Transition", "NonFiniteError", "rollout", "check_finite"]

Velocity = Callable[[Tensor, float], Tensor]


class NonFiniteError(FloatingPointError):
    r"""A non-finite velocity or loss in the engine's hot loop; the message names what, where and when.

    .. math:: \exists i:\ \ell_i \notin \mathbb R

    Reference: ``diffusionopd``.

    Attributes:
        what: the quantity (``"velocity"``, ``"loss"``, ...).
        step: the rollout step index, or ``None``.
        task: the task index, or ``None``.
        update: the update counter, or ``None``.
    """

    def __init__(self, what: str, *, step: Optional[int] = None, task: Optional[int] = None,
                 update: Optional[int] = None, phase: str = "") -> None:
        self.what, self.step, self.task, self.update, self.phase = what, step, task, update, phase
        where = ", ".join(f"{k} {v}" for k, v in (("phase", phase or None), ("update", update), ("task", task),
                                                   ("step", step)) if v is not None)
        super().__init__(f"non-finite {what}" + (f" at {where}" if where else "")
                         + ": the run diverged (lower the learning rate, or check the model and inputs)")

    def at(self, **where) -> "NonFiniteError":
        """The same error with more context filled in (fields already set are kept)."""
        kw = {k: getattr(self, k) for k in ("step", "task", "update", "phase")}
        kw.update({k: v for k, v in where.items() if kw.get(k) in (None, "")})
        return NonFiniteError(self.what, **kw)


def check_finite(t: Tensor, what: str, step: Optional[int] = None) -> Tensor:
    r"""One full-tensor scan: raise :class:`NonFiniteError` naming ``what`` and ``step`` if ``t`` has a NaN/inf.

    .. math:: \forall i:\ t_i \in \mathbb R

    Args:
        t: the tensor.
        what: its name in the message.
        step: the rollout step, or ``None``.

    Returns:
        ``t`` unchanged.

    Reference: ``diffusionopd``.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor ({what}), got {type(t).__name__}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(what, step=step)
    return t


@dataclass(frozen=True)
class Transition:
    r"""One stored step :math:`x_n \to x_{n+1}` of a :class:`Trajectory`, to re-evaluate with gradient.

    .. math:: x_{n+1} = c_x x_n + c_v v_{old} + s\,\varepsilon_n

    Reference: ``flowgrpo`` (stored transitions).

    Attributes:
        index: the step index ``n``.
        coef: the kernel of the step (:class:`~opd_ref.engine.kernel.StepCoefficients`).
        x: ``(B, *event)`` the state :math:`x_n`.
        x_next: ``(B, *event)`` the drawn state :math:`x_{n+1}`.
        v_old: ``(B, *event)`` the velocity that drew it (the behaviour policy).
        noise: ``(B, *event)`` the standard-normal draw :math:`\varepsilon_n` (zeros if deterministic).
    """

    index: int
    coef: StepCoefficients
    x: Tensor
    x_next: Tensor
    v_old: Tensor
    noise: Tensor

    @property
    def sigma(self) -> float:
        return self.coef.sigma

    @property
    def sigma_next(self) -> float:
        return self.coef.sigma_next


@dataclass(frozen=True)
class Trajectory:
    r"""A batch of ``B`` rollouts of ``N`` steps, as drawn (no autograd graph unless asked for).

    .. math:: \log\pi(x_{n+1}|x_n) = -\tfrac12\|\varepsilon_n\|^2 - D\log s_n - \tfrac D2\log 2\pi

    Reference: ``flowgrpo``, ``diffusionopd``.

    Attributes:
        states: ``(N + 1, B, *event)`` :math:`x_0, \dots, x_N` (``states[-1]`` is the sample).
        velocities: ``(N, B, *event)`` :math:`v(x_n, \sigma_n)` of the policy that drew the rollout.
        noises: ``(N, B, *event)`` :math:`\varepsilon_n` (zeros on deterministic steps).
        log_probs: ``(N, B)`` :math:`\log\pi(x_{n+1}|x_n)` summed over event dims (0 if deterministic).
        sigmas: ``(N + 1,)`` float64 grid.
        stds: ``(N,)`` float64 step stds :math:`s_n` (shared by the batch).
        stochastic: ``(N,)`` bool, whether step ``n`` has a density.
        kernel: the :class:`~opd_ref.engine.kernel.KernelSpec` that drew it.
        coefs: the per-step :class:`~opd_ref.engine.kernel.StepCoefficients`.
    """

    states: Tensor
    velocities: Tensor
    noises: Tensor
    log_probs: Tensor
    sigmas: Tensor
    stds: Tensor
    stochastic: Tensor
    kernel: KernelSpec
    coefs: tuple

    @property
    def final(self) -> Tensor:
        """``(B, *event)`` the last state."""
        return self.states[-1]

    @property
    def n_steps(self) -> int:
        """Number of steps ``N``."""
        return len(self.coefs)

    @property
    def means(self) -> Tensor:
        r"""``(N, B, *event)`` kernel means :math:`c_x x_n + c_v v_n` (computed on access)."""
        return torch.stack([c.mean(self.states[n], self.velocities[n]) for n, c in enumerate(self.coefs)])

    def transition(self, n: int) -> Transition:
        """The stored step ``n`` (see :class:`Transition`)."""
        return Transition(n, self.coefs[n], self.states[n], self.states[n + 1], self.velocities[n], self.noises[n])

    def total_log_prob(self) -> Tensor:
        """``(B,)`` :math:`\\sum_n \\log\\pi(x_{n+1}|x_n)` over the stochastic steps."""
        return self.log_probs.sum(0)


def rollout(
    velocity: Velocity,
    x0: Tensor,
    sigmas: Tensor,
    kernel: KernelSpec,
    generator: Optional[torch.Generator] = None,
    *,
    grad: bool = False,
) -> Trajectory:
    r"""Roll out the chain :math:`x_{n+1}\sim\pi(\cdot|x_n)` of a velocity field on a sigma grid.

    .. math::
        x_{n+1} = c_x x_n + c_v v(x_n,\sigma_n) + s_n\varepsilon_n,\qquad
        \log\pi(x_{n+1}|x_n) = -\tfrac12\|\varepsilon_n\|^2 - D\log s_n - \tfrac D2\log 2\pi

    The arguments are validated once here; inside the loop only the velocity is scanned for
    non-finite values (once per step).

    Args:
        velocity: ``v(x (B, *event), sigma: float) -> (B, *event)``.
        x0: ``(B, *event)`` floating states at ``sigmas[0]`` (``N(0, I)`` when ``sigmas[0] == 1``).
        sigmas: ``(N + 1,)`` strictly decreasing grid in ``[0, 1]``.
        kernel: :class:`~opd_ref.engine.kernel.KernelSpec`.
        generator: ``torch.Generator`` for the step noise (on ``x0``'s device).
        grad: keep the autograd graph through the whole rollout (default: no graph).

    Returns:
        :class:`Trajectory` (states in ``x0``'s dtype).

    Raises:
        NonFiniteError: a velocity had a NaN/inf (the message names the step).

    Reference: ``flowgrpo`` (SDE rollouts), ``diffusionopd`` (student rollouts, CPS).
    """
    if not isinstance(kernel, KernelSpec):
        raise TypeError(f"kernel must be a KernelSpec, got {type(kernel).__name__}")
    if not callable(velocity):
        raise TypeError(f"velocity must be callable v(x, sigma), got {type(velocity).__name__}")
    if not isinstance(x0, Tensor) or not torch.is_floating_point(x0) or x0.dim() < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a floating (B, *event) tensor with B >= 1, got {getattr(x0, 'shape', type(x0))}")
    check_finite(x0, "x0")
    levels = kernel.check_grid(sigmas)
    coefs = tuple(kernel.coefficients(s, sn) for s, sn in zip(levels, levels[1:]))
    n_event = x0[0].numel()
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    b = x0.shape[0]
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        x = x0
        states: List[Tensor] = [x]
        vels: List[Tensor] = []
        noises: List[Tensor] = []
        lps: List[Tensor] = []
        for n, c in enumerate(coefs):
            v = velocity(x, c.sigma)
            if not isinstance(v, Tensor) or v.shape != x.shape:
                raise ValueError(f"velocity returned {getattr(v, 'shape', type(v))} at step {n}, expected {tuple(x.shape)}")
            check_finite(v, "velocity", n)
            v = v.to(x.dtype)
            mean = c.mean(x, v)
            if c.stochastic:
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x_next = mean + c.std * eps
                lp = -0.5 * eps.flatten(1).pow(2).sum(1) - n_event * (math.log(c.std) + half_log_2pi)
            else:
                eps = torch.zeros_like(x)
                x_next = mean
                lp = torch.zeros(b, dtype=x.dtype, device=x.device)
            states.append(x_next)
            vels.append(v)
            noises.append(eps)
            lps.append(lp)
            x = x_next
    return Trajectory(
        states=torch.stack(states),
        velocities=torch.stack(vels),
        noises=torch.stack(noises),
        log_probs=torch.stack(lps),
        sigmas=torch.tensor(levels, dtype=torch.float64),
        stds=torch.tensor([c.std for c in coefs], dtype=torch.float64),
        stochastic=torch.tensor([c.stochastic for c in coefs]),
        kernel=kernel,
        coefs=coefs,
    )
