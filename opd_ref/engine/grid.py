r"""Noise-level grids for rollouts: uniform, or time-shifted as in SD3.

Reference: ``flowgrpo`` (SD3.5 sampler grids).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sigma_grid"]


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

    Reference: ``flowgrpo``.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    for name, val in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("shift", shift)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(val).__name__} {val!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not (0.0 <= sigma_min < sigma_max <= 1.0):
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be > 0, got {shift!r}")
    u = torch.linspace(sigma_max, sigma_min, n_steps + 1, dtype=torch.float64)
    s = shift * u / (1.0 + (shift - 1.0) * u)
    return s.to(dtype)
