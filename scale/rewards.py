r"""Rewards for stage 1 (GRPO teachers): a small protocol, weight-free built-ins, user callables.

Protocol: a reward is any callable ``reward(images, prompts) -> Tensor`` with ``images`` a
``(B, 3, H, W)`` float tensor in ``[0, 1]`` and ``prompts`` a list of ``B`` strings, returning ``(B,)``
(higher is better).  :func:`get_reward` resolves a spec to such a callable and wraps it in a check of
the output (shape ``(B,)``, finite), so a faulty user reward fails loudly instead of training on NaN.

Built-ins (no weights, usable in tests):

* ``"jpeg_compressibility"``: minus the JPEG size in kB at quality 95 (DDPO / Flow-GRPO's
  compressibility task);
* ``"brightness"``: the mean pixel value;
* ``"color"``: minus the mean squared distance of the pixels to a target RGB colour
  (``get_reward("color", target=(r, g, b))``, default red).

Reward models that need weights (PickScore, HPSv2, the LAION aesthetic predictor, ...) are **not**
shipped: no weights can be downloaded here and a fake would be dishonest.  A user who has the weights
writes a function or class with the protocol's signature in their own module and passes
``"my_module:my_reward"`` (a class is instantiated with the keyword arguments of :func:`get_reward`).
A skeleton (the scoring line is the model's own; nothing here is shipped or tested)::

    # my_rewards.py -- on the user's machine, weights in a local directory
    class PickScore:
        def __init__(self, weights_dir="/models/PickScore_v1", device="cuda"):
            ...  # load processor and model from weights_dir, eval(), to(device)

        @torch.no_grad()
        def __call__(self, images, prompts):  # images (B, 3, H, W) in [0, 1]
            ...  # preprocess images and prompts, score them
            return scores  # (B,) tensor, higher is better

    reward = get_reward("my_rewards:PickScore", weights_dir="/models/PickScore_v1")

Reference: ``flowgrpo`` (compressibility, PickScore, aesthetic rewards), DDPO (JPEG compressibility).
"""

from __future__ import annotations

import importlib
import io
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Reward",
    "BUILTIN_REWARDS",
    "jpeg_compressibility",
    "brightness",
    "ColorReward",
    "CheckedReward",
    "get_reward",
    "check_images",
]


@runtime_checkable
class Reward(Protocol):
    r"""A reward :math:`r(x, c)`: ``(images (B, 3, H, W) in [0, 1], prompts: list of B str) -> (B,)``,
    higher is better (``flowgrpo``).

    Args:
        images: ``(B, 3, H, W)`` float tensor in ``[0, 1]``.
        prompts: ``B`` prompts.
    """

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def check_images(images: object, prompts: object) -> Tensor:
    r"""Validate a reward's inputs: images :math:`x \in [0, 1]^{B \times 3 \times H \times W}`, finite,
    and ``B`` prompts (``flowgrpo`` reward protocol).

    Args:
        images: ``(B, 3, H, W)`` float tensor.
        prompts: list of ``B`` strings.

    Returns:
        ``images`` unchanged.

    Raises:
        TypeError: not a floating tensor.
        ValueError: wrong shape, values outside ``[0, 1]`` or non-finite, prompts of another length.
    """
    if not isinstance(images, Tensor) or not torch.is_floating_point(images):
        raise TypeError(f"images must be a floating torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise ValueError(
            f"images must be finite and in [0, 1], got range [{float(images.min()):.4g}, {float(images.max()):.4g}]"
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != images.shape[0]:
        got = f"{type(prompts).__name__} of length {len(prompts)}" if isinstance(prompts, Sequence) else type(prompts).__name__
        raise ValueError(f"prompts must be a list of {images.shape[0]} strings (one per image), got {got}")
    return images


def _to_uint8(images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H, W, 3)`` uint8, rounding as PIL conversions do."""
    return (images.detach().to(torch.float32).cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def jpeg_compressibility(images: Tensor, prompts: Sequence[str], quality: int = 95) -> Tensor:
    r"""Minus the JPEG file size in kilobytes (DDPO's compressibility reward).

    .. math::
        r(x) = -\,|\mathrm{JPEG}_{q}(\mathrm{uint8}(255\,x))|\ /\ 1000 \quad\text{(bytes / 1000)}

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        prompts: ``B`` prompts (unused).
        quality: JPEG quality (DDPO / Flow-GRPO: 95).

    Returns:
        ``(B,)`` float32 on the images' device.

    Reference: ``flowgrpo`` (compressibility task), DDPO.
    """
    from PIL import Image

    check_images(images, prompts)
    sizes = []
    for arr in _to_uint8(images).numpy():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


def brightness(images: Tensor, prompts: Sequence[str]) -> Tensor:
    r"""Mean pixel value :math:`r(x) = \frac{1}{3HW}\sum_{c,h,w} x_{chw}` in ``[0, 1]``.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        prompts: ``B`` prompts (unused).

    Returns:
        ``(B,)`` float32.

    Reference: ``diffusionopd`` (simple image-statistic tasks for multi-teacher distillation).
    """
    check_images(images, prompts)
    return images.to(torch.float32).flatten(1).mean(dim=1)


class ColorReward:
    r"""Closeness to a target colour :math:`c \in [0, 1]^3`:

    .. math::
        r(x) = -\frac{1}{HW}\sum_{h,w} \|x_{:,h,w} - c\|^2

    Args:
        target: ``(r, g, b)`` in ``[0, 1]`` (default red).

    Reference: ``diffusionopd`` (image-statistic tasks for multi-teacher distillation).
    """

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)):
        t = torch.as_tensor([float(c) for c in target], dtype=torch.float32) if _is_seq(target) else None
        if t is None or t.shape != (3,) or not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"target must be three floats (r, g, b) in [0, 1], got {target!r}")
        self.target = t

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        c = self.target.to(images.device).view(1, 3, 1, 1)
        return -((images.to(torch.float32) - c) ** 2).sum(dim=1).flatten(1).mean(dim=1)

    def __repr__(self) -> str:
        return f"ColorReward(target={tuple(round(float(c), 4) for c in self.target)})"


def _is_seq(x: object) -> bool:
    return isinstance(x, (list, tuple, Tensor)) and not isinstance(x, str)


#: name -> factory taking the keyword arguments of :func:`get_reward`.
BUILTIN_REWARDS: dict[str, Callable[..., Callable]] = {
    "jpeg_compressibility": lambda quality=95: (
        lambda images, prompts: jpeg_compressibility(images, prompts, quality=quality)
    ),
    "brightness": lambda: brightness,
    "color": lambda target=(1.0, 0.0, 0.0): ColorReward(target),
}


class CheckedReward:
    r"""A reward wrapped with a check of its output :math:`r \in \mathbb R^B` (finite), returned as
    float32 (``flowgrpo`` reward protocol).

    Args:
        fn: the reward callable.
        name: the spec it came from (for messages).
    """

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        out = self.fn(images, list(prompts))
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out)
        b = images.shape[0]
        if out.shape != (b,):
            raise ValueError(f"reward {self.name!r} must return shape ({b},), got {tuple(out.shape)}")
        out = out.to(device=images.device, dtype=torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"reward {self.name!r} returned non-finite values: {out.tolist()}")
        return out

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"


def get_reward(spec: str, **kwargs) -> CheckedReward:
    r"""Resolve a reward spec :math:`r(x, c)`: a built-in name or ``"module:function"`` (or
    ``"module:Class"``).

    Args:
        spec: ``"jpeg_compressibility"``, ``"brightness"``, ``"color"``, or ``"pkg.module:attr"``
            naming a callable with the :class:`Reward` protocol (a class is instantiated).
        **kwargs: passed to the built-in's factory (``quality=``, ``target=``) or the class.

    Returns:
        :class:`CheckedReward`.

    Raises:
        ValueError: unknown built-in (the message lists them), module or attribute not found, bad
            keyword arguments.
        TypeError: the attribute is not callable.

    Reference: ``flowgrpo`` (reward functions), ``diffusionopd``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec not in BUILTIN_REWARDS:
            raise ValueError(
                f"unknown reward {spec!r}: use one of the built-ins {sorted(BUILTIN_REWARDS)} or "
                "'module:function' for your own reward (e.g. a PickScore wrapper with local weights)"
            )
        try:
            fn = BUILTIN_REWARDS[spec](**kwargs)
        except TypeError as err:
            raise ValueError(f"bad arguments {kwargs} for reward {spec!r}: {err}") from err
        return CheckedReward(fn, spec)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj(**kwargs)
        except TypeError as err:
            raise ValueError(f"reward {spec!r}: cannot instantiate with {kwargs}: {err}") from err
    elif kwargs:
        raise ValueError(f"reward {spec!r} is a function; keyword arguments {sorted(kwargs)} are not accepted")
    if not callable(obj):
        raise TypeError(f"reward {spec!r} is not callable (got {type(obj).__name__})")
    return CheckedReward(obj, spec)
