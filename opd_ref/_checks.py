"""Input validation shared by every public function of :mod:`opd_ref`.

Each check raises a ``TypeError``/``ValueError`` that names the argument and shows what was
received (shape, value), so that bad input never turns into a silent NaN or a wrong answer.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

SigmaLike = Union[float, int, Tensor]


def check_tensor(name: str, x: object, *, min_dim: int = 1) -> Tensor:
    """Require a finite floating-point tensor with at least ``min_dim`` dims (batch first)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dim(s) (B, *event), got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (shape {tuple(x.shape)})")
    return x


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Require two tensors of identical shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_batch_vector(name: str, x: object, batch: int | None = None) -> Tensor:
    """Require a finite 1-D floating tensor of shape ``(B,)`` (``batch`` if given)."""
    x = check_tensor(name, x, min_dim=1)
    if x.dim() != 1 or (batch is not None and x.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    return x


def as_batch_tensor(name: str, value: SigmaLike, like: Tensor) -> Tensor:
    """Turn a float, 0-d or ``(B,)`` tensor into a tensor broadcastable against ``like`` (B, *event).

    The result has shape ``(B, 1, ..., 1)`` (or ``(1, ..., 1)`` for a scalar), the dtype and device
    of ``like``, and is finite; otherwise a ``ValueError`` names ``name`` and what was received.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool {value!r}")
    if isinstance(value, (int, float)):
        t = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    elif isinstance(value, Tensor):
        if not torch.is_floating_point(value):
            value = value.to(like.dtype)
        t = value.to(device=like.device, dtype=like.dtype if value.dtype != like.dtype else value.dtype)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {_show(t)}")
    if t.dim() == 0:
        return t.reshape((1,) * like.dim())
    if t.dim() == 1 and t.shape[0] == like.shape[0]:
        return t.reshape((-1,) + (1,) * (like.dim() - 1))
    raise ValueError(
        f"{name} must be a float or a tensor of shape () or ({like.shape[0]},) matching the batch, "
        f"got shape {tuple(t.shape)}"
    )


def check_sigma_pair(
    sigma: Tensor, sigma_next: Tensor, *, allow_one: bool, sigma_name: str = "sigma"
) -> None:
    """Require ``0 < sigma <= 1`` (``< 1`` unless ``allow_one``) and ``0 <= sigma_next < sigma``."""
    hi_ok = (sigma <= 1.0) if allow_one else (sigma < 1.0)
    if not bool(((sigma > 0.0) & hi_ok).all()):
        rng = "(0, 1]" if allow_one else "(0, 1)"
        hint = (
            ""
            if allow_one
            else " (sigma = 1 makes the SDE std infinite; pass sigma_one='flowgrpo' to use "
            "Flow-GRPO's convention, which puts the next grid sigma in the denominator)"
        )
        raise ValueError(f"{sigma_name} must lie in {rng}, got {_show(sigma)}{hint}")
    if not bool(((sigma_next >= 0.0) & (sigma_next < sigma)).all()):
        raise ValueError(
            f"sigma_next must lie in [0, sigma) (sampling runs sigma: 1 -> 0), got sigma_next="
            f"{_show(sigma_next)} with {sigma_name}={_show(sigma)}"
        )


def check_nonneg(name: str, value: SigmaLike, like: Tensor, *, upper: float | None = None) -> Tensor:
    """A non-negative (and at most ``upper``) scalar or per-sample parameter, broadcast like ``like``."""
    t = as_batch_tensor(name, value, like)
    if not bool((t >= 0).all()) or (upper is not None and not bool((t <= upper).all())):
        rng = f"[0, {upper:g}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {rng}, got {_show(t)}")
    return t


def check_positive_std(name: str, std: Tensor, mean: Tensor) -> Tensor:
    """Require a strictly positive, finite std broadcastable to ``mean``; return it broadcast."""
    std = check_tensor(name, std, min_dim=0)
    try:
        b = torch.broadcast_shapes(std.shape, mean.shape)
    except RuntimeError:
        b = None
    if b != mean.shape:
        raise ValueError(
            f"{name} must be broadcastable to the mean's shape {tuple(mean.shape)}, got {tuple(std.shape)}"
        )
    if not bool((std > 0).all()):
        raise ValueError(
            f"{name} must be strictly positive for a density or KL (a deterministic step has no "
            f"log-prob), got min {float(std.min()):.3g}"
        )
    return std.expand_as(mean)


def promote(*tensors: Tensor) -> tuple:
    """The tensors cast to their common floating dtype (mixed float32/float64 inputs of one call)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def sum_event(t: Tensor) -> Tensor:
    """Sum over the event dims of a ``(B, *event)`` tensor (a ``(B,)`` tensor is returned as is);
    works for an empty batch, where ``reshape(B, -1)`` cannot infer the size."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(dim=1)


def mean_event(t: Tensor) -> Tensor:
    """Mean over the event dims of a ``(B, *event)`` tensor (empty batches included)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).mean(dim=1)


def _show(t: Tensor) -> str:
    flat = t.detach().flatten()
    if flat.numel() == 1:
        return f"{float(flat[0]):.6g}"
    vals = ", ".join(f"{float(v):.4g}" for v in flat[:6])
    more = ", ..." if flat.numel() > 6 else ""
    return f"[{vals}{more}] (shape {tuple(t.shape)})"
