r"""ODE, SDE and CPS rollouts of any velocity field, built on :mod:`opd_ref.kernels` (no copies).

A rollout runs the grid ``sigmas[0] > sigmas[1] > ... > sigmas[N]`` (sampling runs sigma 1 -> 0) from
``x_init`` and records, for every step ``n``, the kernel
:math:`\pi(x_{n+1}|x_n) = \mathcal N(\mathrm{mean}_n, \mathrm{std}_n^2 I)` of
:func:`opd_ref.kernels.sde_step` / :func:`~opd_ref.kernels.cps_step` / :func:`~opd_ref.kernels.ode_step`
and the log-probability :func:`opd_ref.divergences.gaussian_log_prob` of the state actually drawn.

**sigma = 1 (SDE only).**  Flow-GRPO's diffusion coefficient :math:`a\sqrt{\sigma/(1-\sigma)}` is
infinite at :math:`\sigma = 1`.  Our default (``sigma_one="ode"``) takes the *first* step of a grid that
starts at 1 with the deterministic Euler step (:func:`~opd_ref.kernels.ode_step`) and every later step
with the SDE kernel.  Reasons: with the exact velocity the Euler step from :math:`\mathcal N(0, I)` is
the flow itself up to discretisation error, so the chain stays on the flow's marginals; no
convention-dependent first std enters the log-probs; and the CPS kernel, which is finite at 1, would
mix two samplers in one chain.  That first step is marked non-stochastic (``stochastic[0] = False``,
``stds[0] = 0``, ``log_probs[0] = 0``) and takes no part in per-step KLs.  ``sigma_one="flowgrpo"``
opts into Flow-GRPO's convention (next grid sigma in the denominator); ``sigma_one="error"`` raises.
A grid starting below 1 (e.g. :func:`sigma_grid` with ``sigma_max = 0.98``) avoids the question; the
caller then draws ``x_init`` from the right marginal.  The CPS step to :math:`\sigma' = 0` has std 0
and is also marked non-stochastic.

Notation map: :math:`x_n` -> ``states[n]``, :math:`\sigma_n` -> ``sigmas[n]``, noise level :math:`a` ->
``noise_level``.

Reference: ``flowgrpo`` (SDE sampler), ``diffusionopd`` (CPS kernel, student rollouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from opd_ref.divergences import gaussian_log_prob
from opd_ref.kernels import GaussianStep, cps_step, ode_step, sde_step

__all__ = [
    "Trajectory",
    "StepEvaluation",
    "sigma_grid",
    "rollout",
    "ode_rollout",
    "sde_rollout",
    "cps_rollout",
    "evaluate_along",
]

Velocity = Callable[[Tensor, float], Tensor]
Kind = Literal["ode", "sde", "cps"]
SigmaOne = Literal["ode", "flowgrpo", "error"]


@dataclass(frozen=True)
class Trajectory:
    r"""A rollout of ``N`` steps for a batch of ``B`` chains in ``d`` dims.

    Attributes:
        states: ``(N + 1, B, d)`` states :math:`x_0, \dots, x_N` (``states[-1]`` is the sample).
        means: ``(N, B, d)`` kernel means.
        stds: ``(N, B)`` kernel stds (0 for deterministic steps).
        log_probs: ``(N, B)`` :math:`\log\pi(x_{n+1}|x_n)` summed over dims; 0 where not stochastic.
        velocities: ``(N, B, d)`` the velocity field at :math:`(x_n, \sigma_n)`.
        sigmas: ``(N + 1,)`` the grid.
        stochastic: ``(N,)`` bool, whether step ``n`` has a density (std > 0).
        kind: ``"ode"``, ``"sde"`` or ``"cps"``.
        noise_level: :math:`a`.
        sigma_one: how a first step at sigma = 1 was taken (see the module docstring).
    """

    states: Tensor
    means: Tensor
    stds: Tensor
    log_probs: Tensor
    velocities: Tensor
    sigmas: Tensor
    stochastic: Tensor
    kind: str
    noise_level: float
    sigma_one: str

    @property
    def final(self) -> Tensor:
        """``(B, d)`` the last state (the sample at ``sigmas[-1]``)."""
        return self.states[-1]

    @property
    def n_steps(self) -> int:
        """Number of steps ``N``."""
        return int(self.means.shape[0])

    def total_log_prob(self) -> Tensor:
        """``(B,)`` sum of the per-step log-probs over the stochastic steps."""
        return (self.log_probs * self.stochastic[:, None].to(self.log_probs.dtype)).sum(0)


@dataclass(frozen=True)
class StepEvaluation:
    """Another velocity field's kernels along a fixed trajectory (see :func:`evaluate_along`).

    Attributes:
        means: ``(N, B, d)``.
        stds: ``(N, B)``.
        log_probs: ``(N, B)`` log-prob of the trajectory's next states (0 where not stochastic).
        velocities: ``(N, B, d)``.
    """

    means: Tensor
    stds: Tensor
    log_probs: Tensor
    velocities: Tensor


def sigma_grid(
    n_steps: int,
    *,
    sigma_max: float = 1.0,
    sigma_min: float = 0.0,
    shift: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""A decreasing grid of ``n_steps + 1`` noise levels, optionally time-shifted as in SD3.

    .. math::
        \sigma_n = \frac{s\,u_n}{1 + (s - 1) u_n},\qquad
        u_n = \sigma_{max} + \tfrac{n}{N}(\sigma_{min} - \sigma_{max})

    (``shift = s = 1`` gives the uniform grid; :math:`u \mapsto su/(1+(s-1)u)` fixes 0 and 1.)

    Args:
        n_steps: number of steps ``N >= 1``.
        sigma_max, sigma_min: end points, ``0 <= sigma_min < sigma_max <= 1``.
        shift: SD3 shift ``s > 0``.
        dtype: floating dtype.

    Returns:
        ``(N + 1,)`` tensor.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not (0.0 <= sigma_min < sigma_max <= 1.0):
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be > 0, got {shift!r}")
    u = torch.linspace(sigma_max, sigma_min, n_steps + 1, dtype=torch.float64)
    s = shift * u / (1.0 + (shift - 1.0) * u)
    return s.to(dtype)


def _check_grid(sigmas: object, x: Tensor) -> Tensor:
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of at least 2 noise levels, got {getattr(sigmas, 'shape', type(sigmas))}"
        )
    s = sigmas.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()) or float(s.max()) > 1.0 or float(s.min()) < 0.0:
        raise ValueError(f"sigmas must lie in [0, 1], got {s.tolist()[:8]}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing (sampling runs 1 -> 0), got {s.tolist()[:8]}")
    return sigmas.to(x.dtype)


def _step(
    kind: str, x: Tensor, v: Tensor, s: float, sn: float, a: float, first_at_one: bool, sigma_one: str
) -> Optional[GaussianStep]:
    """The kernel of one step (``None`` for a deterministic Euler step)."""
    if kind == "ode" or a == 0.0:
        return None
    if kind == "sde":
        if first_at_one:
            if sigma_one == "ode":
                return None
            if sigma_one == "error":
                raise ValueError(
                    "the grid starts at sigma = 1, where the SDE std is infinite; pass sigma_one='ode' "
                    "(Euler first step, default) or 'flowgrpo', or start the grid below 1"
                )
            return sde_step(x, v, s, sn, a, sigma_one="flowgrpo")
        return sde_step(x, v, s, sn, a)
    return cps_step(x, v, s, sn, a)


def rollout(
    velocity: Velocity,
    x_init: Tensor,
    sigmas: Tensor,
    kind: Kind = "sde",
    noise_level: float = 0.0,
    generator: Optional[torch.Generator] = None,
    *,
    sigma_one: SigmaOne = "ode",
    grad: bool = False,
) -> Trajectory:
    r"""Roll out the chain :math:`x_{n+1}\sim\pi(\cdot|x_n)` of a velocity field on a sigma grid.

    .. math::
        x_{n+1} = \mathrm{mean}(x_n, v(x_n,\sigma_n)) + \mathrm{std}_n\,\xi_n,\qquad
        \log\pi(x_{n+1}|x_n) = \log\mathcal N(x_{n+1};\mathrm{mean}_n,\mathrm{std}_n^2 I)

    with the kernels of :mod:`opd_ref.kernels` (ODE: Euler, std 0).

    Args:
        velocity: callable ``v(x (B, d), sigma: float) -> (B, d)``, e.g. ``GaussianMixture.velocity``.
        x_init: ``(B, d)`` states at ``sigmas[0]`` (``N(0, I)`` when ``sigmas[0] == 1``).
        sigmas: ``(N + 1,)`` strictly decreasing grid in ``[0, 1]``.
        kind: ``"ode"``, ``"sde"`` (Flow-GRPO) or ``"cps"``.
        noise_level: :math:`a \ge 0` (``<= 1`` for CPS); ignored for ``"ode"``.
        generator: ``torch.Generator`` for the step noise.
        sigma_one: first SDE step at sigma = 1: ``"ode"`` (default), ``"flowgrpo"`` or ``"error"``.
        grad: keep the autograd graph through the whole rollout (default: ``torch.no_grad``).

    Returns:
        :class:`Trajectory`.

    Reference: ``flowgrpo`` (SDE rollouts), ``diffusionopd`` (student rollouts, CPS).
    """
    if kind not in ("ode", "sde", "cps"):
        raise ValueError(f"kind must be 'ode', 'sde' or 'cps', got {kind!r}")
    if sigma_one not in ("ode", "flowgrpo", "error"):
        raise ValueError(f"sigma_one must be 'ode', 'flowgrpo' or 'error', got {sigma_one!r}")
    if not callable(velocity):
        raise TypeError(f"velocity must be callable v(x, sigma), got {type(velocity).__name__}")
    if not isinstance(x_init, Tensor) or not torch.is_floating_point(x_init) or x_init.dim() != 2:
        raise ValueError(f"x_init must be a floating (B, d) tensor, got {getattr(x_init, 'shape', type(x_init))}")
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not noise_level >= 0:
        raise ValueError(f"noise_level must be a float >= 0, got {noise_level!r}")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"noise_level must lie in [0, 1] for CPS, got {noise_level!r}")
    sig = _check_grid(sigmas, x_init)
    a = 0.0 if kind == "ode" else float(noise_level)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        x = x_init
        states, means, stds, lps, vels, stoch = [x], [], [], [], [], []
        sl = [float(s) for s in sig.detach().to(torch.float64)]
        for n in range(len(sl) - 1):
            s, sn = sl[n], sl[n + 1]
            v = velocity(x, s)
            if not isinstance(v, Tensor) or v.shape != x.shape:
                raise ValueError(f"velocity returned {getattr(v, 'shape', type(v))}, expected {tuple(x.shape)}")
            step = _step(kind, x, v, s, sn, a, n == 0 and s >= 1.0, sigma_one)
            if step is None or not bool((step.std > 0).all()):
                mean = ode_step(x, v, s, sn) if step is None else step.mean
                x_next, std, lp, is_st = mean, torch.zeros(x.shape[0], dtype=x.dtype), torch.zeros(x.shape[0], dtype=x.dtype), False
            else:
                mean = step.mean
                x_next = step.sample(generator)
                std = step.std.reshape(x.shape[0])
                lp = gaussian_log_prob(x_next, step)
                is_st = True
            states.append(x_next)
            means.append(mean)
            stds.append(std)
            lps.append(lp)
            vels.append(v)
            stoch.append(is_st)
            x = x_next
    return Trajectory(
        states=torch.stack(states),
        means=torch.stack(means),
        stds=torch.stack(stds),
        log_probs=torch.stack(lps),
        velocities=torch.stack(vels),
        sigmas=sig,
        stochastic=torch.tensor(stoch),
        kind=kind,
        noise_level=a,
        sigma_one=sigma_one,
    )


def ode_rollout(velocity: Velocity, x_init: Tensor, sigmas: Tensor, *, grad: bool = False) -> Trajectory:
    r"""Euler rollout of the probability-flow ODE, :math:`x_{n+1} = x_n + (\sigma_{n+1}-\sigma_n) v(x_n,\sigma_n)`.

    Args:
        velocity: ``v(x, sigma) -> (B, d)``.
        x_init: ``(B, d)``.
        sigmas: ``(N + 1,)`` decreasing grid.
        grad: keep the autograd graph.

    Returns:
        :class:`Trajectory` (all steps deterministic).

    Reference: ``flowgrpo`` (a = 0), diffusers Euler scheduler.
    """
    return rollout(velocity, x_init, sigmas, "ode", grad=grad)


def sde_rollout(
    velocity: Velocity,
    x_init: Tensor,
    sigmas: Tensor,
    noise_level: float,
    generator: Optional[torch.Generator] = None,
    *,
    sigma_one: SigmaOne = "ode",
    grad: bool = False,
) -> Trajectory:
    r"""Rollout with Flow-GRPO's SDE kernel (:func:`opd_ref.kernels.sde_step`).

    .. math::
        \mathrm{std}_n = a\sqrt{\sigma_n/(1-\sigma_n)}\sqrt{\sigma_n-\sigma_{n+1}}

    Args:
        velocity, x_init, sigmas, generator, grad: as in :func:`rollout`.
        noise_level: :math:`a \ge 0`.
        sigma_one: first step at sigma = 1 (see the module docstring).

    Returns:
        :class:`Trajectory`.

    Reference: ``flowgrpo``.
    """
    return rollout(velocity, x_init, sigmas, "sde", noise_level, generator, sigma_one=sigma_one, grad=grad)


def cps_rollout(
    velocity: Velocity,
    x_init: Tensor,
    sigmas: Tensor,
    noise_level: float,
    generator: Optional[torch.Generator] = None,
    *,
    grad: bool = False,
) -> Trajectory:
    r"""Rollout with the coefficients-preserving kernel (:func:`opd_ref.kernels.cps_step`).

    .. math::
        \mathrm{std}_n = \sigma_{n+1}\sin(a\pi/2)

    Args:
        velocity, x_init, sigmas, generator, grad: as in :func:`rollout`.
        noise_level: :math:`a\in[0, 1]`.

    Returns:
        :class:`Trajectory`.

    Reference: ``diffusionopd`` (CPS).
    """
    return rollout(velocity, x_init, sigmas, "cps", noise_level, generator, grad=grad)


def evaluate_along(velocity: Velocity, traj: Trajectory, *, grad: bool = False) -> StepEvaluation:
    r"""Another velocity field's kernels at the states of ``traj`` (same grid, kind, noise level).

    .. math::
        \log\pi'(x_{n+1}|x_n) = \log\mathcal N(x_{n+1}; \mathrm{mean}'(x_n, v'(x_n,\sigma_n)), \mathrm{std}_n^2 I)

    Used for on-policy quantities: the teacher's kernel at the student's states, the sequence
    log-ratio :math:`\sum_n \log\pi_\theta - \log\pi_T` along student rollouts (D3).

    Args:
        velocity: ``v'(x, sigma) -> (B, d)``.
        traj: a :class:`Trajectory`.
        grad: keep the autograd graph (the states themselves are used as stored).

    Returns:
        :class:`StepEvaluation`.

    Reference: ``diffusionopd``, ``tm-opd`` (teacher scoring of student rollouts).
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a Trajectory, got {type(traj).__name__}")
    sl = [float(s) for s in traj.sigmas.detach().to(torch.float64)]
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        means, stds, lps, vels = [], [], [], []
        for n in range(traj.n_steps):
            x = traj.states[n]
            v = velocity(x, sl[n])
            step = _step(traj.kind, x, v, sl[n], sl[n + 1], traj.noise_level, n == 0 and sl[n] >= 1.0, traj.sigma_one)
            if bool(traj.stochastic[n]):
                assert step is not None
                means.append(step.mean)
                stds.append(step.std.reshape(x.shape[0]))
                lps.append(gaussian_log_prob(traj.states[n + 1], step))
            else:
                means.append(ode_step(x, v, sl[n], sl[n + 1]) if step is None else step.mean)
                stds.append(torch.zeros(x.shape[0], dtype=x.dtype))
                lps.append(torch.zeros(x.shape[0], dtype=x.dtype))
            vels.append(v)
    return StepEvaluation(torch.stack(means), torch.stack(stds), torch.stack(lps), torch.stack(vels))


