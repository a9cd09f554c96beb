r"""The bound transition kernel of the engine: kind, noise level and sigma = 1 rule, validated once.

:class:`KernelSpec` turns one grid step :math:`\sigma \to \sigma'` into the *scalar* coefficients of
the Gaussian kernel of derivation D2, whose mean is linear in the state and the velocity and whose
std depends on neither:

.. math::
    \pi(x'|x) = \mathcal N\big(c_x\,x + c_v\,v(x, \sigma),\ s^2 I\big)

* SDE (``flowgrpo``): :math:`\sigma_t = a\sqrt{\sigma/(1-\sigma)}`, :math:`\Delta t = \sigma'-\sigma`,
  :math:`k = \sigma_t^2/(2\sigma)`, :math:`c_x = 1 + \Delta t\,k`, :math:`c_v = \Delta t\,(1 + k(1-\sigma))`,
  :math:`s = \sigma_t\sqrt{-\Delta t}`;
* CPS (``diffusionopd``): :math:`s = \sigma'\sin(a\pi/2)`, :math:`\rho = \sqrt{\sigma'^2 - s^2}`,
  :math:`c_x = (1-\sigma') + \rho`, :math:`c_v = -(1-\sigma')\sigma + \rho(1-\sigma)`;
* ODE: :math:`c_x = 1`, :math:`c_v = \Delta t`, :math:`s = 0` (the diffusers Euler step).

These are :func:`opd_ref.kernels.sde_step` / :func:`~opd_ref.kernels.cps_step` /
:func:`~opd_ref.kernels.ode_step` with the algebra expanded (tested equal).  The coefficients are
Python floats (float64) computed from the grid's float64 sigmas, whatever the dtype of the state, and
two kernels at the same state differ in their means by :math:`c_v (v_1 - v_2)` exactly: the engine
computes KLs and log-ratios from that difference, never by subtracting two nearly equal means.

**sigma = 1 (SDE only).** :math:`\sigma_t` is infinite at :math:`\sigma = 1`. ``sigma_one`` says
what a step *from* 1 does: ``"flowgrpo"`` (default; what Flow-GRPO's code and the SD3.5 trainers do)
puts :math:`\sigma'` in the denominator, ``"ode"`` takes that step with the deterministic Euler step
(it then has no density and no KL), ``"error"`` refuses a grid that starts at 1.

Reference: ``flowgrpo`` (SDE kernel), ``diffusionopd`` (CPS kernel, transition kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["KERNEL_KINDS", "SIGMA_ONE_RULES", "KernelSpec", "StepCoefficients"]

KERNEL_KINDS = ("sde", "cps", "ode")
SIGMA_ONE_RULES = ("flowgrpo", "ode", "error")


@dataclass(frozen=True)
class StepCoefficients:
    r"""The kernel of one grid step as Python floats.

    .. math:: \pi(x'|x) = \mathcal N(c_x x + c_v v,\ s^2 I),\qquad \sigma_t = s/\sqrt{|\Delta t|}

    Reference: ``flowgrpo``, ``diffusionopd``.

    Attributes:
        sigma, sigma_next: the step :math:`\sigma \to \sigma'`.
        c_x: coefficient of the state in the mean.
        c_v: coefficient of the velocity in the mean (:math:`\partial\mu/\partial v`).
        std: the step std :math:`s` (0 for a deterministic step).
        std_t: the SDE diffusion coefficient :math:`\sigma_t = s/\sqrt{|\Delta t|}` (0 for CPS/ODE).
    """

    sigma: float
    sigma_next: float
    c_x: float
    c_v: float
    std: float
    std_t: float = 0.0

    @property
    def stochastic(self) -> bool:
        """Whether the step has a density (``std > 0``)."""
        return self.std > 0.0

    def mean(self, x: Tensor, v: Tensor) -> Tensor:
        r"""The kernel mean :math:`c_x x + c_v v` (for the ODE exactly ``x + dt * v``, the diffusers
        Euler step, bit for bit)."""
        if self.c_x == 1.0:
            return x + self.c_v * v
        return self.c_x * x + self.c_v * v


@dataclass(frozen=True)
class KernelSpec:
    r"""A transition kernel bound to its settings, validated once here (the hot loop does not).

    .. math::
        \pi(x'|x) = \mathcal N\big(c_x(\sigma,\sigma')\,x + c_v(\sigma,\sigma')\,v,\ s(\sigma,\sigma')^2 I\big)

    Args:
        kind: ``"sde"`` (Flow-GRPO), ``"cps"`` (coefficients-preserving) or ``"ode"`` (Euler).
        noise_level: :math:`a`; ``> 0`` for SDE, in ``(0, 1]`` for CPS, ignored (0) for ODE.
        sigma_one: what an SDE step from :math:`\sigma = 1` does: ``"flowgrpo"``, ``"ode"`` or ``"error"``.

    Reference: ``flowgrpo``, ``diffusionopd``.
    """

    kind: Literal["sde", "cps", "ode"] = "sde"
    noise_level: float = 0.7
    sigma_one: Literal["flowgrpo", "ode", "error"] = "flowgrpo"

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"KernelSpec.kind must be one of {KERNEL_KINDS}, got {self.kind!r}")
        if self.sigma_one not in SIGMA_ONE_RULES:
            raise ValueError(f"KernelSpec.sigma_one must be one of {SIGMA_ONE_RULES}, got {self.sigma_one!r}")
        a = self.noise_level
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"KernelSpec.noise_level must be a finite float, got {a!r}")
        if self.kind == "ode":
            object.__setattr__(self, "noise_level", 0.0)
        elif not a > 0:
            raise ValueError(
                f"KernelSpec.noise_level must be > 0 for kind {self.kind!r} (a = 0 is the ODE: use kind='ode'), got {a!r}"
            )
        elif self.kind == "cps" and a > 1:
            raise ValueError(f"KernelSpec.noise_level must lie in (0, 1] for kind 'cps', got {a!r}")
        else:
            object.__setattr__(self, "noise_level", float(a))

    def check_grid(self, sigmas: Tensor) -> list:
        """Validate a grid for this kernel; return its noise levels as Python floats (float64).

        Args:
            sigmas: ``(N + 1,)`` grid.

        Returns:
            the ``N + 1`` levels as floats.

        Raises:
            ValueError: not a strictly decreasing 1-D grid of >= 2 levels in ``[0, 1]``, or a grid that starts at 1 with ``sigma_one="error"`` under the SDE.
        """
        if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
            raise ValueError(
                f"sigmas must be a 1-D tensor of at least 2 noise levels, got {getattr(sigmas, 'shape', type(sigmas))}"
            )
        levels = [float(s) for s in sigmas.detach().cpu().double()]
        if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in levels):
            raise ValueError(f"sigmas must lie in [0, 1], got {levels[:8]}")
        if not all(b < a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"sigmas must be strictly decreasing (sampling runs 1 -> 0), got {levels[:8]}")
        if levels[0] == 0.0:
            raise ValueError(f"sigmas must start above 0, got {levels[:8]}")
        if self.kind == "sde" and levels[0] >= 1.0 and self.sigma_one == "error":
            raise ValueError(
                "sigmas starts at 1, where the SDE std is infinite, and KernelSpec.sigma_one='error': "
                "use sigma_one='flowgrpo' or 'ode', or start the grid below 1"
            )
        return levels

    def coefficients(self, sigma: float, sigma_next: float) -> StepCoefficients:
        r"""The kernel of the step :math:`\sigma\to\sigma'` (floats from :meth:`check_grid`; not re-checked).

        .. math::
            \text{SDE: } c_x = 1 + \Delta t\,\tfrac{\sigma_t^2}{2\sigma},\quad
            c_v = \Delta t\big(1 + \tfrac{\sigma_t^2}{2\sigma}(1-\sigma)\big),\quad s = \sigma_t\sqrt{-\Delta t}

        Args:
            sigma: current noise level in ``(0, 1]``.
            sigma_next: next noise level in ``[0, sigma)``.

        Returns:
            :class:`StepCoefficients`.
        """
        s, sn = sigma, sigma_next
        dt = sn - s
        if self.kind == "ode" or (self.kind == "sde" and s >= 1.0 and self.sigma_one == "ode"):
            return StepCoefficients(s, sn, 1.0, dt, 0.0)
        a = self.noise_level
        if self.kind == "sde":
            denom = sn if s >= 1.0 else s  # flowgrpo's rule at sigma = 1
            std_t = a * math.sqrt(s / (1.0 - denom))
            k = std_t * std_t / (2.0 * s)
            return StepCoefficients(s, sn, 1.0 + dt * k, dt * (1.0 + k * (1.0 - s)), std_t * math.sqrt(-dt), std_t)
        std = sn * math.sin(a * math.pi / 2.0)
        rho = math.sqrt(max(sn * sn - std * std, 0.0))
        return StepCoefficients(s, sn, (1.0 - sn) + rho, -(1.0 - sn) * s + rho * (1.0 - s), std)
