r"""Concave quadratic rewards on :math:`\mathbb R^d` whose exponential tilts of a GMM are GMMs (D7).

Every reward here is written in the canonical form

.. math::
    r(x) = -\tfrac12 x^\top A x + h^\top x + r_0,\qquad A \succeq 0,

so :math:`\exp(r/\beta)` times a Gaussian is an unnormalised Gaussian and the tilt
:math:`p\,e^{r/\beta}/Z` of a Gaussian mixture is again a Gaussian mixture with closed-form weights and
:math:`\log Z` (:meth:`toys.gmm.GaussianMixture.tilt`).  Sums and non-negative multiples of such rewards
stay in the family, which gives the joint multi-reward target :math:`p\,e^{\sum_k w_k r_k/\beta}/Z`.

Notation map: :math:`b` -> ``b`` (linear), :math:`c, P` -> ``c, P`` (quadratic centre and curvature),
:math:`A, h, r_0` -> ``A, h, r0`` (canonical form).

Reference: ``rtdmd`` / ``crd`` / ``diffusionopd`` (reward-tilted target :math:`p^* \propto p_{ref}e^{r/\beta}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "QuadraticFormReward",
    "LinearReward",
    "QuadraticReward",
    "sum_rewards",
    "as_quadratic_form",
]


def _vector(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (d,), got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != 1 or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape (d,), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got {value.detach().tolist()}")
    return value


def _psd_matrix(name: str, value: object, d: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({d}, {d}), got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite")
    m = value.detach().to(torch.float64)
    scale = max(1.0, float(m.abs().max()))
    if float((m - m.T).abs().max()) > 1e-6 * scale:
        raise ValueError(f"{name} must be symmetric, got {m.tolist()}")
    eig_min = float(torch.linalg.eigvalsh(0.5 * (m + m.T)).min())
    if eig_min < -1e-9 * scale:
        raise ValueError(
            f"{name} must be positive semi-definite (the reward must be concave for the tilt to be "
            f"normalisable), got smallest eigenvalue {eig_min:.6g}"
        )
    return value


@dataclass(frozen=True)
class QuadraticFormReward:
    r"""A concave quadratic reward :math:`r(x) = -\tfrac12 x^\top A x + h^\top x + r_0`, :math:`A\succeq 0`.

    Args:
        A: ``(d, d)`` symmetric positive semi-definite curvature.
        h: ``(d,)`` linear coefficient.
        r0: scalar offset (does not change the tilted density, only :math:`\log Z`).

    Calling it on ``x`` of shape ``(B, d)`` returns ``(B,)``.  ``r1 + r2`` and ``w * r`` (``w >= 0``)
    give the canonical form of the sum / multiple.

    Reference: ``rtdmd``, ``crd`` (reward-tilted targets).
    """

    A: Tensor
    h: Tensor
    r0: float = 0.0

    def __post_init__(self) -> None:
        h = _vector("h", self.h)
        _psd_matrix("A", self.A, h.shape[0])
        if not isinstance(self.r0, (int, float)) or isinstance(self.r0, bool):
            raise TypeError(f"r0 must be a float, got {type(self.r0).__name__}")

    @property
    def dim(self) -> int:
        """Event dimension ``d``."""
        return int(self.h.shape[0])

    def canonical(self) -> Tuple[Tensor, Tensor, float]:
        """``(A, h, r0)`` of the canonical form."""
        return self.A, self.h, float(self.r0)

    def _check_x(self, x: object) -> Tensor:
        if not isinstance(x, Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating-point torch.Tensor of shape (B, {self.dim})")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def __call__(self, x: Tensor) -> Tensor:
        r"""Evaluate :math:`r(x)` for ``x`` of shape ``(B, d)``; returns ``(B,)``."""
        x = self._check_x(x)
        A, h = self.A.to(x), self.h.to(x)
        return -0.5 * ((x @ A) * x).sum(-1) + x @ h + self.r0

    def grad(self, x: Tensor) -> Tensor:
        r""":math:`\nabla r(x) = h - A x`, shape ``(B, d)``."""
        x = self._check_x(x)
        return self.h.to(x) - x @ self.A.to(x)

    def __add__(self, other: object) -> "QuadraticFormReward":
        if not hasattr(other, "canonical"):
            return NotImplemented
        A2, h2, r2 = other.canonical()  # type: ignore[union-attr]
        if h2.shape != self.h.shape:
            raise ValueError(f"cannot add rewards of dims {self.dim} and {h2.shape[0]}")
        return QuadraticFormReward(self.A + A2.to(self.A), self.h + h2.to(self.h), float(self.r0) + r2)

    __radd__ = __add__

    def __mul__(self, w: object) -> "QuadraticFormReward":
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            return NotImplemented
        if not w >= 0:
            raise ValueError(f"a reward may only be scaled by w >= 0 (to stay concave), got {w!r}")
        return QuadraticFormReward(w * self.A, w * self.h, w * float(self.r0))

    __rmul__ = __mul__


def LinearReward(b: Tensor) -> QuadraticFormReward:
    r"""Linear reward :math:`r(x) = b^\top x` (canonical form :math:`A = 0, h = b, r_0 = 0`).

    Args:
        b: ``(d,)``.

    Returns:
        :class:`QuadraticFormReward`.

    Reference: ``rtdmd`` (tilted target); D7 in docs/derivations/.
    """
    b = _vector("b", b)
    return _Linear(torch.zeros(b.shape[0], b.shape[0], dtype=b.dtype), b, 0.0, b)


def QuadraticReward(c: Tensor, P: Tensor) -> QuadraticFormReward:
    r"""Concave quadratic reward :math:`r(x) = -\tfrac12 (x-c)^\top P (x-c)`, :math:`P \succeq 0`.

    Canonical form: :math:`A = P`, :math:`h = P c`, :math:`r_0 = -\tfrac12 c^\top P c`.

    Args:
        c: ``(d,)`` centre (the reward's maximiser when ``P`` is definite).
        P: ``(d, d)`` symmetric positive semi-definite; a non-PSD ``P`` (non-concave reward, whose
            tilt is not normalisable in general) raises ``ValueError``.

    Returns:
        :class:`QuadraticFormReward`.

    Reference: ``rtdmd``; D7 in docs/derivations/.
    """
    c = _vector("c", c)
    P = _psd_matrix("P", P, c.shape[0])
    P = P.to(c.dtype)
    return _Quadratic(P, P @ c, float(-0.5 * c.detach() @ P.detach() @ c.detach()), c, P)


class _Linear(QuadraticFormReward):
    """A :class:`QuadraticFormReward` that remembers ``b`` (for repr and introspection)."""

    def __init__(self, A: Tensor, h: Tensor, r0: float, b: Tensor) -> None:
        super().__init__(A, h, r0)
        object.__setattr__(self, "b", b)

    def __repr__(self) -> str:
        return f"LinearReward(b={self.b.tolist()})"


class _Quadratic(QuadraticFormReward):
    """A :class:`QuadraticFormReward` that remembers ``(c, P)``."""

    def __init__(self, A: Tensor, h: Tensor, r0: float, c: Tensor, P: Tensor) -> None:
        super().__init__(A, h, r0)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "P", P)

    def __repr__(self) -> str:
        return f"QuadraticReward(c={self.c.tolist()}, P={self.P.tolist()})"


RewardLike = Union[QuadraticFormReward, Sequence[QuadraticFormReward]]


def sum_rewards(
    rewards: Sequence[QuadraticFormReward], weights: Optional[Sequence[float]] = None
) -> QuadraticFormReward:
    r"""The joint reward :math:`r = \sum_k w_k r_k` (default :math:`w_k = 1`), in canonical form.

    Tilting by it gives the joint multi-reward target :math:`p\,e^{\sum_k w_k r_k/\beta}/Z`.

    Args:
        rewards: non-empty sequence of rewards of equal dimension.
        weights: optional non-negative weights, one per reward.

    Returns:
        :class:`QuadraticFormReward`.

    Reference: ``diffusionopd`` (multi-reward / multi-task targets).
    """
    rewards = list(rewards)
    if not rewards:
        raise ValueError("rewards must be a non-empty sequence")
    if weights is None:
        weights = [1.0] * len(rewards)
    weights = list(weights)
    if len(weights) != len(rewards):
        raise ValueError(f"weights must have one entry per reward ({len(rewards)}), got {len(weights)}")
    total = as_quadratic_form(rewards[0]) * float(weights[0])
    for r, w in zip(rewards[1:], weights[1:]):
        total = total + as_quadratic_form(r) * float(w)
    return total


def as_quadratic_form(reward: object) -> QuadraticFormReward:
    """Coerce a reward (or a sequence of rewards, summed) into a :class:`QuadraticFormReward`."""
    if isinstance(reward, QuadraticFormReward):
        return QuadraticFormReward(*reward.canonical())
    if isinstance(reward, (list, tuple)):
        return sum_rewards(reward)
    if hasattr(reward, "canonical"):
        return QuadraticFormReward(*reward.canonical())  # type: ignore[union-attr]
    raise TypeError(
        "reward must be a LinearReward, QuadraticReward, QuadraticFormReward or a sequence of them, "
        f"got {type(reward).__name__}"
    )
