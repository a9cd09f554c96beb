r"""Rewards for stage 1 (GRPO teachers) and CRD: a small protocol, weight-free built-ins, adapters
on the user's local reward models, user callables, weighted sums.

Protocol: a reward is a callable ``reward(images, prompts, metadata) -> Tensor`` with ``images`` a
``(B, 3, H, W)`` float tensor in ``[0, 1]``, ``prompts`` a list of ``B`` strings and ``metadata`` a list
of ``B`` dicts (the prompt file's per-prompt metadata, ``{}`` for plain-text files: see
:mod:`scale.data`), returning ``(B,)`` (higher is better).  Two-argument callables
``reward(images, prompts)`` keep working: a callable receives the metadata when its signature has a
parameter named ``metadata``, a ``*args``, or three required positional parameters
(:func:`accepts_metadata`).  :func:`get_reward` resolves a spec to such a callable and wraps it in a
check of the output (shape ``(B,)``, finite), so a faulty reward fails loudly instead of training on NaN.

Reward specs (:func:`parse_reward_spec`):

* a built-in name (no weights, usable in tests): ``"jpeg_compressibility"`` (minus the JPEG size in
  kB at quality 95, DDPO / Flow-GRPO's compressibility task), ``"brightness"`` (the mean pixel
  value), ``"color"`` (minus the mean squared distance to a target RGB colour, default red);
* an adapter on a local model directory, ``"NAME:DIRECTORY"`` (loaded with ``transformers``,
  ``local_files_only``: nothing is downloaded; :mod:`scale.reward_models`): ``pickscore``, ``hpsv2``
  (HPSv2 and HPSv2.1), ``clipscore``, ``aesthetic``; and ``"ocr:module:function"`` /
  ``"geneval:module:function"``, Flow-GRPO's OCR and GenEval rewards around the user's recogniser /
  evaluator with a stated input contract;
* ``"module:function"`` or ``"module:Class"``: the user's own reward (a class is instantiated with
  the keyword arguments of :func:`get_reward`);
* a weighted sum of the above, ``"0.5*pickscore:/m/ps + 0.5*aesthetic:/m/aes"`` (terms joined by
  ``+`` with spaces around it or followed by a weight ``w*``; a term without a weight has weight 1).

An adapter name takes precedence over a module of the same name.

Reference: ``flowgrpo`` (compressibility, PickScore, aesthetic, OCR and GenEval rewards), DDPO (JPEG
compressibility).
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Reward",
    "BUILTIN_REWARDS",
    "jpeg_compressibility",
    "brightness",
    "ColorReward",
    "CheckedReward",
    "WeightedReward",
    "RewardTerm",
    "ADAPTERS",
    "accepts_metadata",
    "parse_reward_spec",
    "get_reward",
    "check_images",
]


@runtime_checkable
class Reward(Protocol):
    r"""A reward :math:`r(x, c)`: ``(images (B, 3, H, W) in [0, 1], prompts: list of B str[, metadata:
    list of B dicts]) -> (B,)``, higher is better (``flowgrpo``).

    Args:
        images: ``(B, 3, H, W)`` float tensor in ``[0, 1]``.
        prompts: ``B`` prompts.
        metadata: ``B`` dicts (optional for the callable: see :func:`accepts_metadata`).
    """

    def __call__(self, images: Tensor, prompts: Sequence[str], *metadata: Any) -> Tensor: ...


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


def accepts_metadata(fn: Callable) -> bool:
    r"""Whether ``fn`` takes the metadata as a third argument: a parameter named ``metadata``, a
    ``*args``, or at least three positional parameters without a default (``flowgrpo``'s
    ``reward_fn(images, prompts, metadata)``); else ``fn(images, prompts)`` is called.

    .. math:: r(x, c, m)\ \text{or}\ r(x, c)

    Args:
        fn: the reward callable (a function, or an instance with ``__call__``).

    Returns:
        ``True`` when ``fn`` is called with the metadata.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    if "metadata" in sig.parameters or any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 3


def _check_metadata(metadata: object, b: int) -> List[Dict[str, Any]]:
    if metadata is None:
        return [{} for _ in range(b)]
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence) or len(metadata) != b \
            or not all(isinstance(m, Mapping) for m in metadata):
        raise ValueError(f"metadata must be a list of {b} dicts (one per image), got {type(metadata).__name__}"
                         + (f" of length {len(metadata)}" if isinstance(metadata, Sequence) else ""))
    return list(metadata)


class CheckedReward:
    r"""A reward wrapped with a check of its inputs and output :math:`r \in \mathbb R^B` (finite),
    returned as float32 (``flowgrpo`` reward protocol).  The metadata is passed on to callables that
    take it (:func:`accepts_metadata`).

    .. math:: r = f(x, c, m)\ \text{or}\ f(x, c),\quad r \in \mathbb R^B

    Args:
        fn: the reward callable.
        name: the spec it came from (for messages).

    Attributes:
        with_metadata: whether ``fn`` receives the metadata.
    """

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.with_metadata = accepts_metadata(fn)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]] = None) -> Tensor:
        check_images(images, prompts)
        b = images.shape[0]
        metadata = _check_metadata(metadata, b)
        out = self.fn(images, list(prompts), metadata) if self.with_metadata else self.fn(images, list(prompts))
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out)
        if out.shape != (b,):
            raise ValueError(f"reward {self.name!r} must return shape ({b},), got {tuple(out.shape)}")
        out = out.to(device=images.device, dtype=torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"reward {self.name!r} returned non-finite values: {out.tolist()}")
        return out

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"


class WeightedReward:
    r"""A weighted sum of rewards (``flowgrpo``'s multi-reward ``{"pickscore": 0.5, ...}``; DiffusionOPD's
    aesthetics teacher: PickScore, CLIPScore and HPSv2.1 at 1:1:1, ``diffusionopd``).

    .. math:: r(x, c, m) = \sum_j w_j\, r_j(x, c, m)

    Args:
        terms: ``(w_j, r_j)`` pairs, each ``r_j`` a :class:`CheckedReward`.
    """

    def __init__(self, terms: Sequence[tuple]):
        self.terms = list(terms)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> Tensor:
        return sum(w * r(images, prompts, metadata) for w, r in self.terms)

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)


#: adapter name -> what follows the colon (``"dir"``: a local model directory; ``"callable"``: the
#: user's ``module:function``), see :mod:`scale.reward_models`.
ADAPTERS: Dict[str, str] = {
    "pickscore": "dir",
    "hpsv2": "dir",
    "clipscore": "dir",
    "aesthetic": "dir",
    "ocr": "callable",
    "geneval": "callable",
}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_SPLIT = re.compile(r"\s+\+\s+|(?<![0-9.][eE])\+(?=\s*" + _NUMBER + r"\s*\*)")
_WEIGHTED = re.compile(r"^\s*(" + _NUMBER + r")\s*\*\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class RewardTerm:
    r"""One term :math:`w_j r_j` of a reward spec (``flowgrpo``).

    .. math:: w_j\, r_j

    Attributes:
        weight: :math:`w_j` (finite).
        kind: ``"builtin"``, ``"adapter"`` or ``"module"``.
        name: the built-in or adapter name, or ``module:attr``.
        argument: the adapter's directory or ``module:function`` (``""`` otherwise).
        text: the term as written.
    """

    weight: float
    kind: str
    name: str
    argument: str
    text: str


def parse_reward_spec(spec: str) -> List[RewardTerm]:
    r"""Split a reward spec into its weighted terms (syntax only: no file is opened, no module
    imported), e.g. ``"0.5*pickscore:/m/ps + 0.5*aesthetic:/m/aes"`` (``flowgrpo`` multi-reward).

    .. math:: r = \sum_j w_j\, r_j

    Args:
        spec: the spec (see the module docs).

    Returns:
        the :class:`RewardTerm` list (one term for a plain spec, weight 1).

    Raises:
        ValueError: empty spec or term, a non-finite weight, an unknown built-in name (the message
            lists the built-ins and adapters), an adapter without its directory / callable, a
            malformed ``module:function``; the message names the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    if spec.strip().startswith("+") or spec.strip().endswith("+"):
        raise ValueError(f"reward spec {spec!r} has an empty term (a '+' at its start or end)")
    terms = []
    for part in _SPLIT.split(spec.strip()):
        text = part.strip()
        weight = 1.0
        m = _WEIGHTED.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2).strip()
        if not text:
            raise ValueError(f"reward spec {spec!r} has an empty term")
        if not math.isfinite(weight):
            raise ValueError(f"reward spec {spec!r}: weight {weight!r} of {text!r} must be finite")
        if ":" not in text:
            if text in ADAPTERS:
                what = "model directory" if ADAPTERS[text] == "dir" else "module:function"
                raise ValueError(f"reward {text!r} in spec {spec!r} is an adapter and needs its {what}: "
                                 f"'{text}:{'/path/to/model' if ADAPTERS[text] == 'dir' else 'my_module:fn'}'")
            if text not in BUILTIN_REWARDS:
                raise ValueError(
                    f"unknown reward {text!r} in spec {spec!r}: use one of the built-ins {sorted(BUILTIN_REWARDS)}, "
                    f"an adapter 'NAME:DIR' with NAME in {sorted(ADAPTERS)}, or 'module:function' for your own reward"
                )
            terms.append(RewardTerm(weight, "builtin", text, "", part.strip()))
            continue
        head, _, rest = text.partition(":")
        if head in ADAPTERS:
            if not rest.strip():
                raise ValueError(f"reward adapter {head!r} in spec {spec!r} needs its "
                                 f"{'model directory' if ADAPTERS[head] == 'dir' else 'module:function'} after the colon")
            if ADAPTERS[head] == "callable" and (":" not in rest or not all(rest.partition(":")[::2])):
                raise ValueError(f"reward adapter {head!r} in spec {spec!r} takes 'module:function', got {rest!r}")
            terms.append(RewardTerm(weight, "adapter", head, rest.strip(), part.strip()))
            continue
        if not head or not rest:
            raise ValueError(f"reward spec {spec!r}: term {text!r} must look like 'module:function'")
        terms.append(RewardTerm(weight, "module", text, "", part.strip()))
    return terms


def _import_attr(target: str, spec: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _resolve_term(term: RewardTerm, spec: str, device: Any, kwargs: Dict[str, Any]) -> CheckedReward:
    if term.kind == "builtin":
        try:
            fn = BUILTIN_REWARDS[term.name](**kwargs)
        except TypeError as err:
            raise ValueError(f"bad arguments {kwargs} for reward {term.name!r}: {err}") from err
        return CheckedReward(fn, term.name)
    if term.kind == "adapter":
        from scale import reward_models

        label = f"{term.name}:{term.argument}"
        if ADAPTERS[term.name] == "callable":
            fn = reward_models.load_callable_adapter(term.name, _import_attr(term.argument, spec), label)
        else:
            fn = reward_models.load_model_adapter(term.name, term.argument, label,
                                                  device="cpu" if device is None else device, **kwargs)
        return CheckedReward(fn, label)
    obj = _import_attr(term.name, spec)
    if isinstance(obj, type):
        if device is not None:
            kwargs = {**kwargs, "device": device}
        try:
            obj = obj(**kwargs)
        except TypeError as err:
            raise ValueError(f"reward {spec!r}: cannot instantiate with {kwargs}: {err}") from err
    elif kwargs:
        raise ValueError(f"reward {spec!r} is a function; keyword arguments {sorted(kwargs)} are not accepted")
    if not callable(obj):
        raise TypeError(f"reward {spec!r} is not callable (got {type(obj).__name__})")
    return CheckedReward(obj, term.name)


def get_reward(spec: str, device: Any = None, **kwargs) -> CheckedReward:
    r"""Resolve a reward spec :math:`r(x, c, m)` (see the module docs and :func:`parse_reward_spec`):
    a built-in name, an adapter on a local model directory, ``"module:function"`` /
    ``"module:Class"``, or a weighted sum of these.

    .. math:: r = \sum_j w_j\, r_j

    Args:
        spec: e.g. ``"brightness"``, ``"pickscore:/models/pickscore"``, ``"pkg.module:attr"``,
            ``"0.5*pickscore:/m/ps + 0.5*aesthetic:/m/aes"``.
        device: where reward models run (adapters; default the CPU) and, when given, the ``device=``
            keyword of a user class.
        **kwargs: passed to the built-in's factory (``quality=``, ``target=``), the adapter or the
            class; only for a spec of one term.

    Returns:
        :class:`CheckedReward` (of a :class:`WeightedReward` for a sum).

    Raises:
        ValueError: the spec's syntax (:func:`parse_reward_spec`), module or attribute not found,
            bad keyword arguments, an adapter's directory missing or not a model of its kind (the
            message names the spec).
        FileNotFoundError: an adapter's directory does not exist (named with the spec).
        TypeError: the attribute is not callable.

    Reference: ``flowgrpo`` (reward functions, multi-reward sums), ``diffusionopd``.
    """
    terms = parse_reward_spec(spec)
    spec = spec.strip()
    if len(terms) > 1 and kwargs:
        raise ValueError(f"reward {spec!r} is a sum of {len(terms)} terms; keyword arguments {sorted(kwargs)} "
                         "are only accepted for a single reward")
    if len(terms) == 1 and terms[0].weight == 1.0:
        return _resolve_term(terms[0], spec, device, kwargs)
    summed = WeightedReward([(t.weight, _resolve_term(t, spec, device, dict(kwargs))) for t in terms])
    return CheckedReward(summed, spec)
