r"""Flow-matching transition kernels with state-independent covariance (derivation D2).

Notation map (paper symbol -> name here): :math:`x_\sigma` -> ``x``, :math:`v_\theta(x_\sigma,\sigma)`
-> ``v``, :math:`\sigma_{t}` -> ``sigma``, :math:`\sigma_{t-1}` (the next, smaller noise level) ->
``sigma_next``, noise level :math:`a` (Flow-GRPO's ``noise_level`` / :math:`\eta` in CPS) ->
``noise_level``, :math:`\Delta t = \sigma_{next} - \sigma < 0` -> ``dt``.

Convention (docs/conventions.md): ``x_sigma = (1 - sigma) x_data + sigma eps``, ``v = eps - x_data``,
sampling runs sigma: 1 -> 0.  Half-precision (bf16/fp16) states or velocities are computed on in
float32, so the coefficients never take the rounding of a bf16 sigma (the mean is then float32).
Every kernel is Gaussian ``N(mean(x, v), std^2 I)`` whose std does not
depend on the state or on the model, so student and teacher kernels taken at the same state share
their covariance and their KL is closed form (D1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
from torch import Tensor

from opd_ref._checks import (
    SigmaLike,
    as_batch_tensor,
    check_nonneg,
    check_same_shape,
    check_sigma_pair,
    check_tensor,
)

__all__ = [
    "GaussianStep",
    "sde_step",
    "cps_step",
    "ode_step",
    "sde_std_t",
    "sde_kl_coefficient",
    "kernel_coefficients",
    "cps_kl_coefficient",
    "sigma_to_t",
    "t_to_sigma",
]


@dataclass(frozen=True)
class GaussianStep:
    r"""A Gaussian transition kernel :math:`\mathcal N(\mathrm{mean}, \mathrm{std}^2 I)`.

    With :math:`\mu` = ``mean`` and :math:`s` = ``std`` broadcast to it, the density (for
    :math:`s > 0`) and the reparameterised sample (:meth:`sample`) are

    .. math::
        \pi(x'|x) = \mathcal N\big(x';\,\mu,\,\mathrm{diag}(s^2)\big)
            = \prod_i \frac{1}{\sqrt{2\pi}\,s_i}\exp\Big(-\frac{(x'_i - \mu_i)^2}{2 s_i^2}\Big),
        \qquad x' = \mu + s\odot\varepsilon,\quad \varepsilon\sim\mathcal N(0, I)

    Args:
        mean: ``(B, *event)`` kernel mean.
        std: standard deviation, a float or a tensor broadcastable to ``mean`` (typically
            ``(B, 1, ..., 1)``); it may be zero (a deterministic step), in which case the step has no
            density.  A 1-D std always means one std per sample: ``(B,)`` is stored as
            ``(B, 1, ..., 1)`` (for per-dimension stds pass ``(1, *event)``), so every function reads
            it the same way.

    Reference: ``diffusionopd`` (Gaussian transition kernels of the SDE sampler).
    """

    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        check_tensor("GaussianStep.mean", self.mean)
        if isinstance(self.std, (int, float)) and not isinstance(self.std, bool):
            # a plain number is a shared std: store it as a 0-d tensor like the mean
            object.__setattr__(
                self, "std", torch.tensor(float(self.std), dtype=self.mean.dtype, device=self.mean.device)
            )
        check_tensor("GaussianStep.std", self.std, min_dim=0)
        if self.std.dim() == 1 and self.mean.dim() > 1:
            if self.std.shape[0] != self.mean.shape[0]:
                raise ValueError(
                    f"GaussianStep.std of shape {tuple(self.std.shape)} is ambiguous: a 1-D std is one std per "
                    f"sample and needs shape ({self.mean.shape[0]},) for mean {tuple(self.mean.shape)}; pass "
                    f"per-dimension stds as (1, *event)"
                )
            object.__setattr__(self, "std", self.std.reshape((-1,) + (1,) * (self.mean.dim() - 1)))
        try:
            shape = torch.broadcast_shapes(self.std.shape, self.mean.shape)
        except RuntimeError:
            shape = None
        if shape != self.mean.shape:
            raise ValueError(
                f"GaussianStep.std must be broadcastable to mean's shape {tuple(self.mean.shape)}, "
                f"got {tuple(self.std.shape)}"
            )
        if not bool((self.std >= 0).all()):
            raise ValueError(f"GaussianStep.std must be >= 0, got min {float(self.std.min()):.3g}")

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        r"""Reparameterised sample :math:`x' = \mathrm{mean} + \mathrm{std}\,\varepsilon`,
        :math:`\varepsilon \sim \mathcal N(0, I)` drawn with ``generator``; gradients flow to
        ``mean`` and ``std``.

        Returns:
            ``(B, *event)`` tensor.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + self.std * eps

    def detach(self) -> "GaussianStep":
        """The same kernel with mean and std cut from the autograd graph."""
        return GaussianStep(self.mean.detach(), self.std.detach())


def _prepare(x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, allow_one: bool):
    x = check_tensor("x", x)
    v = check_tensor("v", v)
    check_same_shape("x", x, "v", v)
    if x.dtype in (torch.float16, torch.bfloat16) or v.dtype in (torch.float16, torch.bfloat16):
        # the coefficients (sigma, std_t, sqrt|dt|) are computed in float32 at least: in bf16 a sigma
        # of 0.995 rounds to 0.9961 and the SDE std of the step 0.995 -> 0.99 is off by 41 %
        x, v = x.to(torch.promote_types(x.dtype, torch.float32)), v.to(torch.promote_types(v.dtype, torch.float32))
    # the coefficients are computed in float64 from the given sigmas and cast once: rounding sigma to
    # float32 first made 1 - sigma (sigma = 1 - 1e-7) and sigma' - sigma (tiny steps) wrong by up to 20 %
    ref = torch.zeros((x.shape[0],) + (1,) * (x.dim() - 1), dtype=torch.float64, device=x.device)
    s = as_batch_tensor("sigma", sigma, ref)
    sn = as_batch_tensor("sigma_next", sigma_next, ref)
    check_sigma_pair(s, sn, allow_one=allow_one)
    return x, v, s, sn, ref


def ode_step(x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    r"""Deterministic Euler step of the probability-flow ODE (the diffusers Euler step).

    .. math::
        x' = x + (\sigma' - \sigma)\, v

    Args:
        x: ``(B, *event)`` state at noise level ``sigma``.
        v: ``(B, *event)`` velocity ``v(x, sigma)``.
        sigma: float or ``(B,)`` in ``(0, 1]``.
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.

    Returns:
        ``(B, *event)`` next state.

    Reference: ``flowgrpo`` (a = 0 limit), diffusers ``FlowMatchEulerDiscreteScheduler.step``.
    """
    x, v, s, sn, _ = _prepare(x, v, sigma, sigma_next, allow_one=True)
    return x + (sn - s).to(x.dtype) * v


def sde_std_t(
    sigma: SigmaLike,
    noise_level: SigmaLike,
    *,
    sigma_next: Optional[SigmaLike] = None,
    sigma_one: Literal["error", "flowgrpo"] = "error",
) -> Tensor:
    r"""Flow-GRPO's diffusion coefficient :math:`\sigma_t^{\mathrm{SDE}} = a\sqrt{\sigma/(1-\sigma)}`.

    .. math::
        \sigma_t^{\mathrm{SDE}} = a\sqrt{\frac{\sigma}{1-\sigma}}
        \quad\Big(\text{flowgrpo convention at } \sigma = 1:\ a\sqrt{\tfrac{\sigma}{1-\sigma'}}\Big)

    With ``sigma_one="flowgrpo"`` the denominator uses ``sigma_next`` where ``sigma == 1`` (the
    public code uses the second grid sigma ``sigmas[1]``, which is ``sigma_next`` of the first step),
    which keeps the first step finite.

    Args:
        sigma: float, 0-d or 1-D tensor of noise levels in ``(0, 1)`` (``(0, 1]`` with the opt-in).
        noise_level: ``a >= 0``, a float or a tensor broadcastable against ``sigma``.
        sigma_next: float or tensor like ``sigma`` in ``[0, sigma)``; required for
            ``sigma_one="flowgrpo"``.
        sigma_one: ``"error"`` (sigma must be < 1) or ``"flowgrpo"``.

    Returns:
        Tensor of ``std_t`` with the broadcast shape of ``sigma`` and ``noise_level`` (float64 when
        both are Python floats).

    Reference: ``flowgrpo`` (SDE sampler, eq. for the marginal-preserving SDE).
    """
    if sigma_one not in ("error", "flowgrpo"):
        raise ValueError(f"sigma_one must be 'error' or 'flowgrpo', got {sigma_one!r}")
    s = _as_level("sigma", sigma)
    a = _as_level("noise_level", noise_level, like=s)
    if not bool((a >= 0).all()):
        raise ValueError(f"noise_level must be >= 0, got {a.detach().flatten()[:6].tolist()}")
    if sigma_next is None:
        if sigma_one == "flowgrpo":
            raise ValueError("sde_std_t: sigma_one='flowgrpo' needs sigma_next")
        sn = torch.zeros_like(s)
    else:
        sn = _as_level("sigma_next", sigma_next, like=s)
    try:
        shape = torch.broadcast_shapes(s.shape, sn.shape)
    except RuntimeError as err:
        raise ValueError(
            f"sigma_next must be broadcastable against sigma, got {tuple(sn.shape)} and {tuple(s.shape)}"
        ) from err
    check_sigma_pair(s.expand(shape), sn.expand(shape), allow_one=sigma_one == "flowgrpo")
    # computed in float64 from the given levels (1 - sigma near 1 is where float32 loses digits); the
    # result has the dtype of the tensor arguments (float64 when all are Python floats)
    tensors = [t for t in (sigma, noise_level, sigma_next) if isinstance(t, Tensor)]
    dtype = torch.float64
    if tensors:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    f64 = torch.float64
    return _std_t(s.to(f64), a.to(f64), sn.to(f64), sigma_one).to(dtype)


def _as_level(name: str, value: SigmaLike, like: Optional[Tensor] = None) -> Tensor:
    """A finite float tensor from a float or tensor (dtype of ``like`` for plain numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    # a Python number is kept in float64 (rounding 0.999999 to float32 moved 1 - sigma by 1.3 %)
    t = torch.as_tensor(value, dtype=torch.float64 if not isinstance(value, Tensor) else None)
    if not torch.is_floating_point(t):
        t = t.to(like.dtype if like is not None else torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().flatten()[:6].tolist()}")
    return t


def _std_t(s: Tensor, a: Tensor, sn: Tensor, sigma_one: str) -> Tensor:
    """The formula of :func:`sde_std_t` on already validated tensors."""
    denom_sigma = torch.where(s >= 1.0, sn, s) if sigma_one == "flowgrpo" else s
    return a * torch.sqrt(s / (1.0 - denom_sigma))


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    *,
    sigma_one: Literal["error", "flowgrpo"] = "error",
) -> GaussianStep:
    r"""Flow-GRPO's marginal-preserving SDE step (Euler–Maruyama), a Gaussian kernel.

    .. math::
        \sigma_t^{\mathrm{SDE}} = a\sqrt{\tfrac{\sigma}{1-\sigma}},\quad \Delta t = \sigma'-\sigma<0,

        \mathrm{mean} = x + \Delta t\Big[v + \tfrac{(\sigma_t^{\mathrm{SDE}})^2}{2\sigma}
            \big(x + (1-\sigma) v\big)\Big],\qquad
        \mathrm{std} = \sigma_t^{\mathrm{SDE}}\sqrt{-\Delta t}.

    ``x + (1 - sigma) v`` is the posterior mean of the noise, so the drift is the ODE velocity plus
    ``-(std_t^2 / 2) * score``.  With ``noise_level = 0`` the mean is the Euler step (:func:`ode_step`)
    and the std is zero.

    Args:
        x: ``(B, *event)`` state at ``sigma``.
        v: ``(B, *event)`` velocity at ``(x, sigma)``.
        sigma: float or ``(B,)`` in ``(0, 1)``; 1 only with ``sigma_one="flowgrpo"``.
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.
        noise_level: ``a >= 0``, float or ``(B,)``.
        sigma_one: ``"error"`` (default) raises at sigma = 1; ``"flowgrpo"`` uses the next grid
            sigma in the denominator of ``std_t`` there, as the public Flow-GRPO code does.

    Returns:
        :class:`GaussianStep` with ``mean`` ``(B, *event)`` and ``std`` ``(B, 1, ..., 1)``.

    Reference: ``flowgrpo`` (SDE sampler), ``diffusionopd`` (transition kernel).
    """
    if sigma_one not in ("error", "flowgrpo"):
        raise ValueError(f"sigma_one must be 'error' or 'flowgrpo', got {sigma_one!r}")
    x, v, s, sn, ref = _prepare(x, v, sigma, sigma_next, allow_one=sigma_one == "flowgrpo")
    a = check_nonneg("noise_level", noise_level, ref)
    c_x, c_v, std = _mean_coefficients(s, sn, a, "sde", sigma_one)
    return GaussianStep(_linear_mean(c_x, c_v, x, v), _batch_std(std.to(x.dtype), x))


def cps_step(
    x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike, noise_level: SigmaLike
) -> GaussianStep:
    r"""Coefficients-preserving sampling (CPS) step, a Gaussian kernel.

    .. math::
        s = \sigma' \sin(a\pi/2),\qquad \hat x_0 = x - \sigma v,\qquad \hat\varepsilon = x + (1-\sigma) v,

        \mathrm{mean} = (1-\sigma')\hat x_0 + \sqrt{\sigma'^2 - s^2}\,\hat\varepsilon,\qquad
        \mathrm{std} = s.

    The sample ``mean + s eps`` has exactly the coefficients ``(1 - sigma')`` on data and total noise
    variance ``sigma'^2``.  With ``noise_level = 0`` it is the Euler step.

    Args:
        x: ``(B, *event)`` state at ``sigma``.
        v: ``(B, *event)`` velocity.
        sigma: float or ``(B,)`` in ``(0, 1]`` (sigma = 1 is fine: nothing divides by 1 - sigma).
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.
        noise_level: ``a`` in ``[0, 1]``.

    Returns:
        :class:`GaussianStep` with ``std`` ``(B, 1, ..., 1)``.

    Reference: ``diffusionopd`` (CPS kernel), Wang & Yu, "Coefficients-Preserving Sampling" (2025).
    """
    x, v, s, sn, ref = _prepare(x, v, sigma, sigma_next, allow_one=True)
    a = check_nonneg("noise_level", noise_level, ref, upper=1.0)
    c_x, c_v, std = _mean_coefficients(s, sn, a, "cps", "error")
    return GaussianStep(_linear_mean(c_x, c_v, x, v), _batch_std(std.to(x.dtype), x))


def _linear_mean(c_x: Tensor, c_v: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """``c_x x + c_v v`` with float64 coefficients cast to the state's dtype (``x + c_v v`` when c_x = 1,
    the diffusers Euler step bit for bit)."""
    c_v = c_v.to(x.dtype)
    if bool((c_x == 1.0).all()):
        return x + c_v * v
    return c_x.to(x.dtype) * x + c_v * v


def kernel_coefficients(
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    *,
    kind: Literal["sde", "cps"] = "sde",
    sigma_one: Literal["error", "flowgrpo"] = "error",
    batch: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The kernel of one step written as :math:`\mathcal N(c_x x + c_v v,\ s^2 I)`, in float64.

    The mean of :func:`sde_step` and :func:`cps_step` is linear in the state and the velocity, so two
    kernels at the same state differ in their means by :math:`c_v(v_1 - v_2)` exactly:

    .. math::
        \text{SDE: } k = \frac{\sigma_t^2}{2\sigma},\ c_x = 1 + \Delta t\,k,\
            c_v = \Delta t\,\big(1 + k(1-\sigma)\big),\ s = \sigma_t\sqrt{-\Delta t};\qquad
        \text{CPS: } s = \sigma'\sin\tfrac{a\pi}{2},\ \rho = \sqrt{\sigma'^2 - s^2},\
            c_x = 1 - \sigma' + \rho,\ c_v = \rho(1-\sigma) - (1-\sigma')\sigma

    Args:
        sigma: float or ``(B,)`` noise level (as in :func:`sde_step` / :func:`cps_step`).
        sigma_next: float or ``(B,)`` in ``[0, sigma)``.
        noise_level: ``a >= 0`` (``<= 1`` for CPS), float or ``(B,)``.
        kind: ``"sde"`` or ``"cps"``.
        sigma_one: the SDE's rule at sigma = 1 (see :func:`sde_step`).
        batch: ``B`` when every other argument is a float.

    Returns:
        ``(c_x, c_v, s)``, each a float64 ``(B,)`` tensor (computed from the given sigmas, whatever the
        dtype of the states they will be applied to).

    Reference: ``flowgrpo`` (SDE kernel), ``diffusionopd`` (CPS kernel).
    """
    if kind not in ("sde", "cps"):
        raise ValueError(f"kind must be 'sde' or 'cps' (the ODE step has no density), got {kind!r}")
    if sigma_one not in ("error", "flowgrpo"):
        raise ValueError(f"sigma_one must be 'error' or 'flowgrpo', got {sigma_one!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    for val in (sigma, sigma_next, noise_level):
        if isinstance(val, Tensor) and val.dim() == 1:
            batch = val.shape[0]
            break
    ref = torch.zeros(batch, 1, dtype=torch.float64)
    s, sn, a = _coefficients_f64(ref, sigma, sigma_next, noise_level, kind, sigma_one)
    return tuple(t.flatten().expand(batch).clone() for t in _mean_coefficients(s, sn, a, kind, sigma_one))


def _coefficients_f64(ref: Tensor, sigma, sigma_next, noise_level, kind: str, sigma_one: str):
    """Validated float64 ``(sigma, sigma_next, a)`` shaped like ``ref`` ``(B, 1, ..., 1)``."""
    s = as_batch_tensor("sigma", sigma, ref)
    sn = as_batch_tensor("sigma_next", sigma_next, ref)
    check_sigma_pair(s, sn, allow_one=kind == "cps" or sigma_one == "flowgrpo")
    a = check_nonneg("noise_level", noise_level, ref, upper=1.0 if kind == "cps" else None)
    return s, sn, a


def _mean_coefficients(s: Tensor, sn: Tensor, a: Tensor, kind: str, sigma_one: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(c_x, c_v, std)`` of :func:`kernel_coefficients` on validated float64 tensors."""
    if kind == "sde":
        std_t = _std_t(s, a, sn, sigma_one)
        dt = sn - s
        k = std_t**2 / (2.0 * s)
        return 1.0 + dt * k, dt * (1.0 + k * (1.0 - s)), std_t * torch.sqrt(-dt)
    std = sn * torch.sin(a * (math.pi / 2.0))
    rho = torch.sqrt(torch.clamp(sn**2 - std**2, min=0.0))
    return (1.0 - sn) + rho, rho * (1.0 - s) - (1.0 - sn) * s, std


def _batch_std(std: Tensor, x: Tensor) -> Tensor:
    """Expand a ``(1 or B, 1, ..., 1)`` std to ``(B, 1, ..., 1)``."""
    return std.expand((x.shape[0],) + (1,) * (x.dim() - 1))


def sde_kl_coefficient(sigma: SigmaLike, sigma_next: SigmaLike, noise_level: SigmaLike) -> Tensor:
    r"""Coefficient :math:`c` with :math:`\mathrm{KL}(p_s\|p_t) = c\,\|v_s - v_t\|^2` for two SDE
    kernels at the same state (D2).

    .. math::
        c = \frac{(1 + a^2/2)^2\, |\Delta t|\, (1-\sigma)}{2 a^2 \sigma}

    Args:
        sigma, sigma_next: floats or ``(B,)`` tensors, ``0 < sigma_next < sigma < 1`` (``sigma_next``
            may be 0).
        noise_level: ``a > 0``.

    Returns:
        ``(B,)`` (or ``(1,)`` for scalars) float64 tensor.

    Reference: ``diffusionopd`` (closed-form KL of the SDE kernels).
    """
    ref = _ref_for(sigma, sigma_next, noise_level)
    s = as_batch_tensor("sigma", sigma, ref).flatten()
    sn = as_batch_tensor("sigma_next", sigma_next, ref).flatten()
    check_sigma_pair(s, sn, allow_one=False)
    a = check_nonneg("noise_level", noise_level, ref).flatten()
    if not bool((a > 0).all()):
        raise ValueError("noise_level must be > 0 for a KL between SDE kernels (std is 0 at a = 0)")
    return (1.0 + a**2 / 2.0) ** 2 * (s - sn) * (1.0 - s) / (2.0 * a**2 * s)


def cps_kl_coefficient(sigma: SigmaLike, sigma_next: SigmaLike, noise_level: SigmaLike) -> Tensor:
    r"""Coefficient :math:`c` with :math:`\mathrm{KL}(p_s\|p_t) = c\,\|v_s - v_t\|^2` for two CPS
    kernels at the same state (D2).

    .. math::
        c = \frac{\big((1-\sigma)\sqrt{\sigma'^2 - s^2} - \sigma(1-\sigma')\big)^2}{2 s^2},
        \qquad s = \sigma'\sin(a\pi/2).

    Args:
        sigma, sigma_next: floats or ``(B,)`` tensors, ``0 < sigma_next < sigma <= 1``.
        noise_level: ``a`` in ``(0, 1]``.

    Returns:
        ``(B,)`` (or ``(1,)``) tensor.

    Reference: ``diffusionopd``.
    """
    ref = _ref_for(sigma, sigma_next, noise_level)
    s = as_batch_tensor("sigma", sigma, ref).flatten()
    sn = as_batch_tensor("sigma_next", sigma_next, ref).flatten()
    check_sigma_pair(s, sn, allow_one=True)
    a = check_nonneg("noise_level", noise_level, ref, upper=1.0).flatten()
    std = sn * torch.sin(a * (math.pi / 2.0))
    if not bool((std > 0).all()):
        raise ValueError("CPS KL needs sigma_next > 0 and noise_level > 0 (std is 0 otherwise)")
    coef = (1.0 - s) * torch.sqrt(sn**2 - std**2) - s * (1.0 - sn)
    return coef**2 / (2.0 * std**2)


def _ref_for(*values: SigmaLike) -> Tensor:
    """A float64 (B, 1) reference tensor sized by the first batched tensor argument."""
    batch = 1
    for val in values:
        if isinstance(val, Tensor) and val.dim() == 1:
            batch = val.shape[0]
            break
    return torch.zeros(batch, 1, dtype=torch.float64)


def sigma_to_t(sigma: SigmaLike) -> Tensor | float:
    r"""Convert the diffusers noise level to the seeds' time.

    .. math::
        t = 1 - \sigma,\qquad u_t = x_1 - x_0 = -v

    The seeds write ``x_0`` = noise and ``x_1`` = data with ``x_t = t x_1 + (1 - t) x_0``; here
    ``x_sigma = (1 - sigma) x_data + sigma eps``, so the same point is ``t = 1 - sigma`` and the
    seeds' velocity ``u_t = x_1 - x_0`` is ``-v``.

    Args:
        sigma: float or tensor in ``[0, 1]``.

    Returns:
        ``1 - sigma`` of the same type.

    Reference: ``diffusionopd`` (time convention), ``flowgrpo``.
    """
    _check_unit("sigma", sigma)
    return 1.0 - sigma


def t_to_sigma(t: SigmaLike) -> Tensor | float:
    r"""Inverse of :func:`sigma_to_t`: :math:`\sigma = 1 - t`.

    .. math::
        \sigma = 1 - t

    Args:
        t: float or tensor in ``[0, 1]``.

    Returns:
        ``1 - t``.

    Reference: ``diffusionopd``.
    """
    _check_unit("t", t)
    return 1.0 - t


def _check_unit(name: str, value: SigmaLike) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor) and not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
    t = torch.as_tensor(value).to(torch.float64)
    if not bool(torch.isfinite(t).all()) or not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
