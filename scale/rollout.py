r"""Rollouts of SD3 / SD3.5 with the ``opd_ref`` transition kernels on the scheduler's sigma grid.

Every step calls :func:`opd_ref.sde_step`, :func:`opd_ref.cps_step` or :func:`opd_ref.ode_step`
(derivation D2) in float32 on the velocity of :func:`scale.model.predict_velocity`; the states, kernel
means, stds and log-probs (:func:`opd_ref.gaussian_log_prob`, summed over latent dims) are stored, so a
trainer can revisit any subset of steps and backpropagate each on its own.  At ``noise_level = 0``
(``kernel="ode"``) the rollout is the Euler sampler of ``StableDiffusion3Pipeline`` (tested equal).

The SD3 grid starts at sigma = 1, where the SDE's :math:`\sigma_t^{SDE} = a\sqrt{\sigma/(1-\sigma)}`
is infinite; as DESIGN.md D2 says, the rollout opts into Flow-GRPO's convention
(``sigma_one="flowgrpo"``: the denominator uses the next grid sigma).

Notation map: states :math:`x_{\sigma_k}` -> ``Trajectory.latents[k]``, kernel
:math:`\mathcal N(\mu_k, s_k^2 I)` -> ``means[k]``, ``stds[k]``, noise level :math:`a` -> ``noise_level``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from opd_ref import cps_step, gaussian_log_prob, ode_step, sde_step
from scale.model import PromptEmbeds, _adapter_active, predict_velocity

__all__ = ["Trajectory", "scheduler_sigmas", "rollout", "kernel_step", "decode", "KERNELS"]

KERNELS = ("sde", "cps", "ode")


def scheduler_sigmas(pipe, num_steps: int, image_seq_len: Optional[int] = None) -> Tensor:
    r"""The pipeline scheduler's own sigma grid for ``num_steps`` steps, with the final 0 appended.

    Built on a fresh copy of ``pipe.scheduler`` (its state is left alone) exactly as
    ``StableDiffusion3Pipeline.__call__`` builds it: ``set_timesteps(num_steps)``, with the
    resolution-dependent shift ``mu`` when the scheduler uses dynamic shifting (then
    ``image_seq_len`` = number of latent patches is required).  SD3.5's scheduler uses the static
    shift 3: :math:`\sigma = 3s / (1 + 2s)` on a uniform grid :math:`s`.

    Args:
        pipe: ``StableDiffusion3Pipeline``.
        num_steps: number of sampling steps ``T >= 1``.
        image_seq_len: latent patches ``(H / p) (W / p)``; only for dynamic shifting.

    Returns:
        ``(T + 1,)`` float32 tensor, decreasing from ``sigma_0`` (1 for SD3) to ``sigma_T = 0``.

    Reference: ``flowgrpo`` (rollouts on the SD3.5 scheduler grid).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("image_seq_len is required: the scheduler uses dynamic shifting")
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        cfg = scheduler.config
        kwargs["mu"] = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    sigmas = scheduler.sigmas.to(torch.float32).clone()
    if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0:
        raise ValueError(
            f"the scheduler's grid has shape {tuple(sigmas.shape)} and ends at {float(sigmas[-1])}; "
            f"expected ({num_steps + 1},) ending at 0"
        )
    return sigmas


@dataclass
class Trajectory:
    r"""The stored states and kernels of a batch of rollouts (``T`` steps, batch ``B``).

    Reference: ``flowgrpo`` (stored rollouts and log-probs), ``diffusionopd``.

    Attributes:
        latents: ``(T + 1, B, C, H, W)`` float32 states; ``latents[0]`` is the initial noise,
            ``latents[T]`` the final latent.
        means: ``(T, B, C, H, W)`` kernel means :math:`\mu_k` (for the ODE: the next state).
        stds: ``(T, B, 1, 1, 1)`` kernel stds :math:`s_k` (0 for the ODE and where the step is
            deterministic, e.g. CPS into sigma = 0).
        log_probs: ``(T, B)`` :math:`\log \pi(x_{k+1} | x_k)` summed over latent dims (NaN where the
            step is deterministic), or ``None`` for ``kernel="ode"``.
        sigmas: ``(T + 1,)`` the grid.
        kernel: ``"sde"``, ``"cps"`` or ``"ode"``.
        noise_level: the noise level ``a``.
    """

    latents: Tensor
    means: Tensor
    stds: Tensor
    log_probs: Optional[Tensor]
    sigmas: Tensor
    kernel: str = "sde"
    noise_level: float = 0.0

    @property
    def num_steps(self) -> int:
        return int(self.means.shape[0])

    @property
    def final(self) -> Tensor:
        """``(B, C, H, W)`` the last state (the generated latent)."""
        return self.latents[-1]

    def stochastic_steps(self) -> Tensor:
        """``(T,)`` bool: the steps whose kernel has a density (std > 0 for every sample)."""
        return (self.stds.flatten(1) > 0).all(dim=1)


def kernel_step(
    kernel: str,
    x: Tensor,
    v: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
):
    r"""One transition kernel :math:`\mathcal N(\mu(x, v, \sigma, \sigma'), s^2 I)` of ``opd_ref`` at
    the state ``x`` with velocity ``v``, in float32.

    ``"sde"`` -> :func:`opd_ref.sde_step` with ``sigma_one="flowgrpo"`` (sigma = 1 allowed),
    ``"cps"`` -> :func:`opd_ref.cps_step`, ``"ode"`` -> :func:`opd_ref.ode_step` (a deterministic
    ``GaussianStep`` with std 0 is returned for uniformity).  The trainer calls this with the
    student's and the teachers' velocities at stored states, so rollouts and losses share one kernel.

    Args:
        kernel: ``"sde"``, ``"cps"`` or ``"ode"``.
        x: ``(B, C, H, W)`` state.
        v: ``(B, C, H, W)`` velocity (any float dtype; computed on in float32).
        sigma, sigma_next: ``(B,)`` or scalar noise levels.
        noise_level: ``a``.

    Returns:
        :class:`opd_ref.GaussianStep` with float32 ``mean`` and ``std`` ``(B, 1, 1, 1)``.

    Reference: ``flowgrpo`` (SDE), ``diffusionopd`` (CPS, SDE kernels).
    """
    from opd_ref import GaussianStep

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    x = x.to(torch.float32)
    v = v.to(torch.float32)
    sigma = sigma.to(torch.float32) if isinstance(sigma, Tensor) else float(sigma)
    sigma_next = sigma_next.to(torch.float32) if isinstance(sigma_next, Tensor) else float(sigma_next)
    if kernel == "sde":
        return sde_step(x, v, sigma, sigma_next, noise_level, sigma_one="flowgrpo")
    if kernel == "cps":
        return cps_step(x, v, sigma, sigma_next, noise_level)
    mean = ode_step(x, v, sigma, sigma_next)
    return GaussianStep(mean, torch.zeros((x.shape[0],) + (1,) * (x.dim() - 1), dtype=torch.float32, device=x.device))


def _check_noise_level(kernel: str, noise_level: float) -> float:
    """The noise level ``a`` the kernel uses: ignored (0) for the ODE, in (0, 1] for CPS, > 0 for SDE."""
    if kernel == "ode":
        return 0.0
    a = float(noise_level)
    if not a > 0.0:
        raise ValueError(
            f"kernel={kernel!r} needs noise_level > 0 (a = 0 is the ODE: use kernel='ode'), got {noise_level!r}"
        )
    if kernel == "cps" and a > 1.0:
        raise ValueError(f"kernel='cps' needs noise_level in (0, 1], got {noise_level!r}")
    return a


@torch.no_grad()
def rollout(
    transformer,
    embeds: PromptEmbeds,
    sigmas: Tensor,
    latents0: Tensor,
    *,
    kernel: Literal["sde", "cps", "ode"] = "sde",
    noise_level: float = 0.7,
    guidance_scale: float = 4.5,
    adapter: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> Trajectory:
    r"""Sample a batch of trajectories :math:`x_{\sigma_0} \to \dots \to x_{\sigma_T}` and store them.

    .. math::
        x_{k+1} \sim \mathcal N\big(\mu(x_k, v(x_k, \sigma_k), \sigma_k, \sigma_{k+1}),\ s_k^2 I\big),
        \qquad \log\pi_k = \log \mathcal N(x_{k+1}; \mu_k, s_k^2 I)\ \text{(summed over dims)}

    with :math:`\mu, s` from :func:`kernel_step` and :math:`v` from :func:`scale.model.predict_velocity`
    (CFG with ``guidance_scale``).  Runs under ``no_grad``; the states are float32 whatever the model
    dtype.

    Args:
        transformer: ``SD3Transformer2DModel``.
        embeds: :class:`PromptEmbeds`, batch ``B``.
        sigmas: ``(T + 1,)`` decreasing grid ending at 0 (:func:`scheduler_sigmas`).
        latents0: ``(B, C, H, W)`` initial noise at ``sigmas[0]``.
        kernel: ``"sde"`` (Flow-GRPO), ``"cps"`` or ``"ode"``.
        noise_level: ``a`` (> 0 for sde, in (0, 1] for cps; ignored by ode).
        guidance_scale: CFG scale.
        adapter: adapter that samples, or ``None`` for the reference.
        generator: RNG for the kernel noise (on the latents' device).

    Returns:
        :class:`Trajectory`.

    Reference: ``flowgrpo`` (SDE rollouts, stored log-probs), ``diffusionopd`` (student rollouts).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    a = _check_noise_level(kernel, noise_level)
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a (T + 1,) tensor with T >= 1, got {getattr(sigmas, 'shape', sigmas)!r}")
    sig = sigmas.detach().to(torch.float32).cpu()
    if not bool((sig[1:] < sig[:-1]).all()) or float(sig[0]) > 1.0 or float(sig[-1]) < 0.0:
        raise ValueError(f"sigmas must decrease strictly within [0, 1], got {sig.tolist()}")
    if not isinstance(latents0, Tensor) or latents0.dim() != 4:
        raise ValueError(f"latents0 must have shape (B, C, H, W), got {getattr(latents0, 'shape', latents0)!r}")
    b = latents0.shape[0]
    if embeds.batch_size != b:
        raise ValueError(f"embeds has batch size {embeds.batch_size}, latents0 has {b}")
    device = latents0.device
    x = latents0.to(torch.float32)
    states, means, stds, log_probs = [x], [], [], []
    # the adapter is switched (and the transformer's dtype looked up) once for the whole rollout, not
    # once per step: both walk the model's modules in Python (~0.5 ms each on the tiny model, whose
    # forward takes ~2 ms)
    dtype = transformer.dtype
    with _adapter_active(transformer, adapter):
        for k in range(sig.shape[0] - 1):
            sigma = sig[k].expand(b).to(device)
            sigma_next = sig[k + 1].expand(b).to(device)
            v = predict_velocity(transformer, x, sigma, embeds, guidance_scale, adapter, dtype=dtype)
            step = kernel_step(kernel, x, v, sigma, sigma_next, a)
            if kernel == "ode":
                x_next = step.mean
            else:
                x_next = step.sample(generator)
            if kernel != "ode":
                if bool((step.std > 0).all()):
                    log_probs.append(gaussian_log_prob(x_next, step))
                else:
                    log_probs.append(torch.full((b,), float("nan"), device=device))
            states.append(x_next)
            means.append(step.mean)
            stds.append(step.std)
            x = x_next
    return Trajectory(
        latents=torch.stack(states),
        means=torch.stack(means),
        stds=torch.stack(stds),
        log_probs=torch.stack(log_probs) if log_probs else None,
        sigmas=sig.to(device),
        kernel=kernel,
        noise_level=a,
    )


@torch.no_grad()
def decode(pipe, latents: Tensor) -> Tensor:
    r"""Decode latents to images in ``[0, 1]`` with the pipeline's VAE, as the pipeline does:

    .. math::
        \mathrm{img} = \mathrm{clip}\big(\tfrac12 \mathrm{VAE.decode}(x / c_{scale} + c_{shift}) + \tfrac12,\ 0, 1\big)

    Args:
        pipe: ``StableDiffusion3Pipeline``.
        latents: ``(B, C, H, W)``.

    Returns:
        ``(B, 3, H * f, W * f)`` float32 images in ``[0, 1]`` (``f`` = the VAE scale factor).

    Reference: ``flowgrpo`` (rewards on decoded images).
    """
    if not isinstance(latents, Tensor) or latents.dim() != 4:
        raise ValueError(f"latents must have shape (B, C, H, W), got {getattr(latents, 'shape', latents)!r}")
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.to(torch.float32) / 2 + 0.5).clamp(0, 1)
