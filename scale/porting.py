r"""What Flow-GRPO's ``beta`` and ``clip_range`` become in this suite's exact quantities.

Flow-GRPO's code takes the log-density of an SDE step as a **mean over the** :math:`D` **latent
dims** and its KL to the reference as the mean over dims of
:math:`(\mu_\theta - \mu_{ref})^2 / (2\sigma_t^2)` with the diffusion coefficient
:math:`\sigma_t = s/\sqrt{|\Delta t|}` (no :math:`|\Delta t|`). This suite uses the exact per-step
KL :math:`\|\mu_\theta - \mu_{ref}\|^2 / (2 s^2)` and the exact ratio of the step's densities, so
with :math:`\kappa_n = D\,\sigma_{t,n}^2 / s_n^2 = D / |\Delta t_n|`:

.. math::
    \mathrm{KL}^{exact}_n = \kappa_n\,\mathrm{KL}^{flowgrpo}_n,\qquad
    \log r^{exact}_n = D \log r^{flowgrpo}_n

Flow-GRPO's :math:`\beta\,\mathrm{KL}^{flowgrpo}_n` is therefore :math:`(\beta/\kappa_n)\,
\mathrm{KL}^{exact}_n`, a different weight per step; its clip
:math:`|r^{flowgrpo} - 1| \le \epsilon` bounds the summed log-ratio to about :math:`\pm D\epsilon`,
so the same :math:`\epsilon` on the exact ratio is :math:`D` times tighter.  ``kl_form = flowgrpo``
and ``ratio_form = flowgrpo`` (preset ``flowgrpo-sd35``) reproduce Flow-GRPO's per-step loss exactly.

Reference: ``flowgrpo``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

__all__ = ["flowgrpo_equivalents", "sd35_sigmas"]


def sd35_sigmas(num_steps: int = 10) -> torch.Tensor:
    """SD3.5's sigma grid (``FlowMatchEulerDiscreteScheduler(shift=3.0)``, static shift, as in the
    SD3.5-Medium scheduler config) for ``num_steps`` steps, built by :func:`scale.pipeline.scheduler_sigmas`."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from scale.pipeline import scheduler_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return scheduler_sigmas(SimpleNamespace(scheduler=scheduler), num_steps)


def flowgrpo_equivalents(sigmas: Optional[torch.Tensor] = None, noise_level: float = 0.7, dims: int = 16 * 64 * 64,
                         beta: float = 0.04, clip_range: float = 1e-4) -> Dict[str, Any]:
    r"""Flow-GRPO's ``beta`` and ``clip_range`` in the suite's exact quantities, per step of the grid.

    .. math::
        \kappa_n = \frac{D\,\sigma_{t,n}^2}{s_n^2} = \frac{D}{|\Delta t_n|},\qquad
        \beta^{exact}_n = \beta / \kappa_n,\qquad
        |\log r^{exact}| \le D\,\log(1 + \epsilon)\ \text{(upper clip of Flow-GRPO's ratio)}

    Args:
        sigmas: the grid (default: :func:`sd35_sigmas` with 10 steps, Flow-GRPO's SD3.5 training grid).
        noise_level: the SDE noise level :math:`a` (Flow-GRPO: 0.7).
        dims: :math:`D` latent dims (SD3.5 at 512 px: 16 x 64 x 64 = 65536).
        beta, clip_range: Flow-GRPO's values (GenEval setting: 0.04, 1e-4).

    Returns:
        dict: ``kappa`` (per stochastic step), ``kappa_min``/``kappa_max``, ``beta_exact`` per step,
        ``summed_log_ratio_bound`` (:math:`D\log(1+\epsilon)`), ``exact_log_ratio_bound``
        (:math:`\log(1+\epsilon)`, what ``clip_range`` means here) and ``tightening`` (their ratio).

    Reference: ``flowgrpo``.
    """
    from opd_ref.engine import KernelSpec

    if sigmas is None:
        sigmas = sd35_sigmas(10)
    kernel = KernelSpec("sde", noise_level, "flowgrpo")
    levels = kernel.check_grid(sigmas)
    kappa: List[float] = []
    dts: List[float] = []
    for s, sn in zip(levels, levels[1:]):
        c = kernel.coefficients(s, sn)
        if c.stochastic:
            kappa.append(dims * c.std_t**2 / c.std**2)
            dts.append(s - sn)
    upper = math.log1p(clip_range)
    return {
        "dims": dims, "noise_level": noise_level, "beta": beta, "clip_range": clip_range,
        "dt": dts, "kappa": kappa, "kappa_min": min(kappa), "kappa_max": max(kappa),
        "beta_exact": [beta / k for k in kappa],
        "summed_log_ratio_bound": dims * upper, "exact_log_ratio_bound": upper, "tightening": float(dims),
    }
