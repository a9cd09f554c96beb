r"""The SD3 / SD3.5 pipeline: loading, the scheduler's sigma grid, the (CFG) velocity, decoding.

The model's velocity :math:`v_\theta(x_\sigma, \sigma, c)` is :func:`velocity` (the lean call the
policy makes in the hot loop, on inputs prepared once by :func:`model_inputs`) and
:func:`predict_velocity` (the public entry: validates its inputs and activates an adapter for the
call).  The diffusers ``timestep`` fed to the transformer is :math:`1000\,\sigma`.

Reference: ``flowgrpo``, ``diffusionopd`` (SD3.5-Medium).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from opd_ref._checks import check_batch_vector, check_tensor
from scale.lora import adapter_active
from scale.text import PromptEmbeds

__all__ = ["load_pipeline", "scheduler_sigmas", "decode", "ModelInputs", "model_inputs", "velocity",
           "predict_velocity"]

def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    r"""Load a ``StableDiffusion3Pipeline`` (SD3 / SD3.5) with every component frozen and in eval mode.

    The frozen transformer is the reference velocity :math:`v_{ref}(x_\sigma, \sigma, c)` on which
    student and teacher LoRAs are added.

    ``model`` is a local pipeline directory (what ``save_pretrained`` or :func:`scale.tiny.build_tiny_pipeline`
    writes, or a downloaded SD3.5-Medium snapshot) or a hub id that is already in the local cache
    (it works under ``HF_HUB_OFFLINE=1``).

    Args:
        model: directory or hub id.
        dtype: weights dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``).
        device: where to put the pipeline.

    Returns:
        The pipeline; ``transformer``, ``vae`` and the text encoders have ``requires_grad=False`` and
        are in ``eval()`` mode.

    Raises:
        TypeError: ``model`` is not a string or path.
        FileNotFoundError: ``model`` looks like a path and does not exist, or a hub id that is not
            available locally.
        ValueError: the directory is not a diffusers pipeline, or not an SD3 one; ``dtype`` is not a
            floating dtype.
        scale.versions.DependencyVersionError: diffusers or transformers older than the suite's floor.

    Reference: ``flowgrpo``, ``diffusionopd`` (SD3.5-Medium).
    """
    from scale.versions import check_versions

    check_versions()
    from diffusers import StableDiffusion3Pipeline

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a hub id (str), got {type(model).__name__}")
    path = Path(model).expanduser()
    text = str(model)
    # a hub id is "owner/name"; anything else that does not exist is a missing local directory
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None
    if path.exists():
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            raise ValueError(
                f"model {text!r} is not a diffusers pipeline directory (no model_index.json); build one "
                "with `opd-scale build-tiny DIR` or point to an SD3.5 snapshot"
            )
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"model {text!r}: model_index.json is not a valid pipeline index ({err})") from err
        if cls != "StableDiffusion3Pipeline":
            raise ValueError(
                f"model {text!r} holds a {cls!r} pipeline, expected 'StableDiffusion3Pipeline' (SD3 / SD3.5)"
            )
    elif not is_hub_id:
        raise FileNotFoundError(f"model directory {text!r} does not exist")
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype -> dtype; both work
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusion3Pipeline.from_pretrained(
                text if not path.exists() else path, torch_dtype=dtype
            )
    except (OSError, EnvironmentError) as err:
        if path.exists():
            raise ValueError(f"could not load the SD3 pipeline in {text!r}: {err}") from err
        raise FileNotFoundError(
            f"model {text!r} is neither a local directory nor a hub id available offline: {err}"
        ) from err
    pipe = pipe.to(device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@dataclass(frozen=True)
class ModelInputs:
    r"""The text inputs of one batch as the transformer takes them, built once per batch.

    When the unconditional branch is included the rows are ``[uncond; cond]`` (``2B``), as the SD3
    pipeline batches them; otherwise ``B`` conditional rows.

    Attributes:
        hidden: ``(B or 2B, L, D)`` token embeddings in the model's dtype and device.
        pooled: ``(B or 2B, P)`` pooled embeddings.
        guidance_scale: :math:`g`, the default scale of :func:`velocity` (a policy may pass its own
            per role).
        batch_size: ``B``.
        guidance_override: a scale that every role uses for this batch instead of its own (``None``:
            each role's scale); set by :meth:`scale.policy.SD3Policy.with_guidance` for CRD's
            CFG-guided reference.
    """

    hidden: Tensor
    pooled: Tensor
    guidance_scale: float
    batch_size: int
    guidance_override: Optional[float] = None

    @property
    def cfg(self) -> bool:
        """Whether the default velocity is guided (:math:`g \ne 1`; :math:`g = 1` is one conditional forward)."""
        return self.guidance_scale != 1.0

    @property
    def has_uncond(self) -> bool:
        """Whether the unconditional rows are included (``2B`` rows)."""
        return self.hidden.shape[0] == 2 * self.batch_size


def model_inputs(embeds: PromptEmbeds, guidance_scale: float, dtype: torch.dtype,
                 device: Union[torch.device, str], *, with_uncond: Optional[bool] = None) -> ModelInputs:
    r"""Cast and (for CFG) concatenate a batch's embeddings once: :math:`[c_\varnothing; c]`, moved to
    ``device`` (asynchronously when the embeddings are in pinned host memory).

    .. math:: \text{hidden} = [\varnothing; c] \ (g \ne 1),\qquad \text{hidden} = c\ (g = 1)

    Args:
        embeds: :class:`~scale.text.PromptEmbeds` of ``B`` prompts (on the host or the device).
        guidance_scale: :math:`g \ge 0` (``!= 1`` needs negative embeddings).
        dtype: the transformer's dtype; device: its device.
        with_uncond: include the unconditional rows (``None``: when :math:`g \ne 1`); ``True`` when
            another role that shares these inputs guides (per-role guidance, :class:`~scale.policy.SD3Policy`).

    Returns:
        :class:`ModelInputs`.

    Raises:
        TypeError: ``embeds`` is not a ``PromptEmbeds``.
        ValueError: CFG without negative embeddings, or ``g != 1`` with ``with_uncond=False``.

    Reference: ``flowgrpo`` (CFG with the empty prompt).
    """
    if not isinstance(embeds, PromptEmbeds):
        raise TypeError(f"embeds must be a PromptEmbeds, got {type(embeds).__name__}")
    g = float(guidance_scale)
    uncond = g != 1.0 if with_uncond is None else bool(with_uncond)
    if g != 1.0 and not uncond:
        raise ValueError(f"guidance_scale={g} != 1 needs the unconditional rows, got with_uncond=False")
    if uncond and not embeds.has_negative:
        raise ValueError(f"guidance_scale={g} (CFG) needs negative embeddings (PromptCache(..., guidance=True))")

    def move(*parts: Tensor) -> Tensor:  # each part to the device (asynchronously from pinned memory), then cat
        moved = [t.to(device=device, dtype=dtype, non_blocking=t.device.type == "cpu" and t.is_pinned()) for t in parts]
        return moved[0] if len(moved) == 1 else torch.cat(moved, dim=0)

    if uncond:
        hidden = move(embeds.negative_prompt_embeds, embeds.prompt_embeds)
        pooled = move(embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds)
    else:
        hidden, pooled = move(embeds.prompt_embeds), move(embeds.pooled_prompt_embeds)
    return ModelInputs(hidden, pooled, g, embeds.batch_size)


def velocity(transformer, x: Tensor, sigma: Union[float, Tensor], inputs: ModelInputs, dtype: torch.dtype,
             num_train_timesteps: int = 1000, *, guidance_scale: Optional[float] = None,
             detach_uncond: bool = False) -> Tensor:
    r"""The velocity of the transformer's *active* adapter, guided as the SD3 pipeline guides it:

    .. math::
        v = v(x, \sigma, \varnothing) + g\,\big(v(x, \sigma, c) - v(x, \sigma, \varnothing)\big)

    :math:`g = 1` is one conditional forward of ``B`` rows (the unconditional rows, if present, are
    not computed); otherwise one forward of the ``2B`` rows ``[uncond; cond]``.  With
    ``detach_uncond`` the unconditional branch is detached as Flow-GRPO's training code does
    (``noise_pred_uncond.detach()``): the value is unchanged and the gradient is
    :math:`g\,\partial v(x, \sigma, c)` only, instead of the exact
    :math:`(1 - g)\,\partial v(x, \sigma, \varnothing) + g\,\partial v(x, \sigma, c)`.

    No validation (the hot loop's call; :func:`predict_velocity` is the checked entry).  The
    transformer runs in ``dtype``; the result is float32.

    Args:
        transformer: ``SD3Transformer2DModel``.
        x: ``(B, C, H, W)`` state.
        sigma: a float or a ``(B,)`` tensor; the transformer gets ``timestep = 1000 sigma`` (float32).
        inputs: :class:`ModelInputs` of the batch.
        dtype: the transformer's dtype.
        num_train_timesteps: the scheduler's (1000 for SD3).
        guidance_scale: :math:`g` (``None``: ``inputs.guidance_scale``); ``!= 1`` needs ``inputs.has_uncond``.
        detach_uncond: stop the gradient through the unconditional branch (Flow-GRPO).

    Returns:
        ``(B, C, H, W)`` float32 velocity.

    Reference: ``flowgrpo`` (CFG during rollouts and training), ``diffusionopd``.
    """
    b = x.shape[0]
    g = inputs.guidance_scale if guidance_scale is None else guidance_scale
    if isinstance(sigma, Tensor):
        t = sigma.to(device=x.device, dtype=torch.float32) * num_train_timesteps
    else:
        t = torch.full((b,), float(sigma), dtype=torch.float32, device=x.device) * num_train_timesteps
    x = x.to(dtype)
    hidden, pooled = inputs.hidden, inputs.pooled
    guided = g != 1.0
    if guided:
        if not inputs.has_uncond:
            raise ValueError(f"guidance_scale={g} != 1 needs ModelInputs with the unconditional rows")
        x = torch.cat([x, x], dim=0)
        t = torch.cat([t, t], dim=0)
    elif inputs.has_uncond:  # g = 1: the conditional rows only
        hidden, pooled = hidden[b:], pooled[b:]
    out = transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                      pooled_projections=pooled, return_dict=False)[0].to(torch.float32)
    if guided:
        uncond, cond = out.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        out = uncond + g * (cond - uncond)
    return out


def predict_velocity(
    transformer,
    latents: Tensor,
    sigma: Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float,
    adapter: Optional[str],
    *,
    num_train_timesteps: int = 1000,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    r"""Velocity :math:`v(x_\sigma, \sigma, c)` of the base with ``adapter`` (or of the reference),
    validated; the active adapter is switched for the call and switched back after it.

    .. math::
        v = v(x, \sigma, \varnothing) + g\,\big(v(x, \sigma, c) - v(x, \sigma, \varnothing)\big)

    Gradients flow to whatever parameters have ``requires_grad`` when grad mode is on.  (The
    adapter is switched back before any backward runs, so do not combine this entry with gradient
    checkpointing; the trainer's :class:`~scale.policy.SD3Policy` keeps the adapter active instead.)

    Args:
        transformer: ``SD3Transformer2DModel`` (with or without peft adapters).
        latents: ``(B, C, H, W)`` state :math:`x_\sigma`.
        sigma: ``(B,)`` float tensor (or a float) in ``[0, 1]``.
        embeds: :class:`~scale.text.PromptEmbeds` with batch ``B`` (negatives when ``guidance_scale != 1``).
        guidance_scale: CFG scale :math:`g \ge 0`; ``1`` means a single conditional forward (``g < 1``
            interpolates towards the unconditional velocity, ``0`` is unconditional).
        adapter: adapter name to use, or ``None`` for the reference (all adapters disabled).
        num_train_timesteps: the scheduler's ``num_train_timesteps`` (1000 for SD3).
        dtype: the transformer's dtype (``None``: looked up, which walks every module).

    Returns:
        ``(B, C, H, W)`` float32 velocity.

    Reference: ``flowgrpo`` (CFG during rollouts and training), ``diffusionopd``.
    """
    latents = check_tensor("latents", latents)
    if latents.dim() != 4:
        raise ValueError(f"latents must have shape (B, C, H, W), got {tuple(latents.shape)}")
    b = latents.shape[0]
    if isinstance(sigma, (float, int)) and not isinstance(sigma, bool):
        sigma = torch.full((b,), float(sigma), dtype=torch.float32, device=latents.device)
    sigma = check_batch_vector("sigma", sigma, b)
    if not bool(((sigma >= 0) & (sigma <= 1)).all()):
        raise ValueError(f"sigma must lie in [0, 1], got {sigma.tolist()}")
    if not isinstance(embeds, PromptEmbeds):
        raise TypeError(f"embeds must be a PromptEmbeds, got {type(embeds).__name__}")
    if embeds.batch_size != b:
        raise ValueError(f"embeds has batch size {embeds.batch_size}, latents have {b}")
    dtype = transformer.dtype if dtype is None else dtype
    inputs = model_inputs(embeds, guidance_scale, dtype, latents.device)
    with adapter_active(transformer, adapter):
        return velocity(transformer, latents, sigma, inputs, dtype, num_train_timesteps)
