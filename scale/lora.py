r"""LoRA adapters on the frozen SD3 / SD3.5 transformer: add, load, save, parameters, switching.

Student and teachers are LoRA adapters (peft, through diffusers' ``PeftAdapterMixin``) on one frozen
``SD3Transformer2DModel``; the reference model is the same base with every adapter disabled.  Teacher
LoRAs load from diffusers-format ``.safetensors`` files (those :func:`save_lora` writes, which
``StableDiffusion3Pipeline.load_lora_weights`` also reads).

Which adapter *trains* is decided by the ``requires_grad`` flags of its parameters only:
:func:`add_lora` makes the new adapter trainable, :func:`load_lora` loads a frozen one, and
:func:`switch_adapter` / :func:`adapter_active` change the active adapter while keeping every flag as
it was (peft's ``set_adapter`` / ``disable_adapters`` would otherwise flip them as a side effect).

Reference: ``flowgrpo`` (LoRA r 32, alpha 64 on the attention projections), ``diffusionopd``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "FLOW_GRPO_TARGETS",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "load_lora",
    "save_lora",
    "lora_parameters",
    "adapter_names",
    "switch_adapter",
    "adapter_active",
]

#: Flow-GRPO's LoRA targets for SD3.5 (the attention projections of both streams).
FLOW_GRPO_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]

#: File name diffusers uses for LoRA weights (``save_lora_weights`` / ``load_lora_weights``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _tuner_layers(transformer) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(transformer) -> list[str]:
    """The names of the adapters on ``transformer`` (peft's ``peft_config`` keys)."""
    return list(getattr(transformer, "peft_config", {}) or {})


def _lora_named(transformer) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in transformer.named_parameters() if ".lora_" in n]


def _check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    return name


@contextlib.contextmanager
def _flags_preserved(transformer) -> Iterator[None]:
    """Keep every LoRA parameter's ``requires_grad`` and the active adapter(s) as they were."""
    flags = [(p, p.requires_grad) for _, p in _lora_named(transformer)]
    active = list(transformer.active_adapters()) if adapter_names(transformer) else []
    try:
        yield
    finally:
        if active:
            transformer.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)


def add_lora(
    transformer,
    adapter_name: str,
    rank: int = 32,
    alpha: float = 64,
    target_modules: Sequence[str] = FLOW_GRPO_TARGETS,
    init_std: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = torch.float32,
) -> None:
    r"""Add a new LoRA adapter :math:`W + \tfrac{\alpha}{r} B A` to ``transformer`` (trainable).

    peft's gaussian init draws :math:`A \sim \mathcal N(0, 1/r)` and sets :math:`B = 0`, so a fresh
    adapter equals the base.  ``init_std`` additionally draws :math:`B \sim \mathcal N(0,
    \mathrm{init\_std}^2)` (with ``generator``), for tests that need adapters that differ from the base
    and from each other.  The adapter that was active before stays active; other adapters keep
    their ``requires_grad`` flags; the new adapter's parameters have ``requires_grad=True``.

    Args:
        transformer: ``SD3Transformer2DModel``.
        adapter_name: new, unique name (no '.').
        rank: LoRA rank ``r`` (Flow-GRPO / DiffusionOPD: 32).
        alpha: LoRA alpha (Flow-GRPO / DiffusionOPD: 64).
        target_modules: module-name suffixes to adapt (default :data:`FLOW_GRPO_TARGETS`).
        init_std: optional std of a random ``lora_B``; ``None`` keeps peft's zero init.
        generator: RNG for ``init_std`` (CPU generator).
        dtype: dtype of the new adapter's parameters (default float32: trainable master weights stay
            in float32 when the base runs in bf16/fp16; peft casts the layer input to it and the
            result back to the base dtype); ``None`` keeps the base's dtype.

    Raises:
        ValueError: duplicate name, rank < 1, alpha <= 0, init_std < 0, no module matches the targets.

    Reference: ``flowgrpo`` (LoRA r 32, alpha 64 on the attention projections), ``diffusionopd``.
    """
    from peft import LoraConfig

    adapter_name = _check_adapter_name(adapter_name)
    if adapter_name in adapter_names(transformer):
        raise ValueError(f"adapter_name {adapter_name!r} already exists on the transformer")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not float(alpha) > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if init_std is not None and not float(init_std) >= 0:
        raise ValueError(f"init_std must be >= 0 or None, got {init_std!r}")
    targets = list(target_modules)
    names = [n for n, _ in transformer.named_modules()]
    if not any(n == t or n.endswith("." + t) for t in targets for n in names):
        raise ValueError(f"target_modules {targets} match no module of the transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with _flags_preserved(transformer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=adapter_name)
    params = lora_parameters(transformer, adapter_name)
    for p in params:
        if dtype is not None:
            p.data = p.data.to(dtype)
        p.requires_grad_(True)
    if init_std is not None and float(init_std) > 0:
        with torch.no_grad():
            for name, p in _lora_named(transformer):
                if f".lora_B.{adapter_name}." in name:
                    noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                    p.copy_((float(init_std) * noise).to(p.dtype))


def lora_parameters(transformer, adapter_name: str) -> list[torch.nn.Parameter]:
    r"""The LoRA parameters :math:`\theta = \{A_l, B_l\}_l` (``lora_A`` and ``lora_B`` of every adapted
    module) of one adapter.

    Args:
        transformer: model with peft adapters.
        adapter_name: the adapter.

    Returns:
        List of parameters in ``named_parameters`` order.

    Raises:
        ValueError: no adapter with that name (the message lists the existing ones).

    Reference: ``flowgrpo`` (only the LoRA parameters train).
    """
    adapter_name = _check_adapter_name(adapter_name)
    if adapter_name not in adapter_names(transformer):
        raise ValueError(
            f"adapter_name {adapter_name!r} is not on the transformer; adapters: {adapter_names(transformer)}"
        )
    return [p for n, p in _lora_named(transformer) if f".{adapter_name}." in n]


def _read_lora_file(path: Path) -> tuple[Path, dict[str, Tensor], Optional[dict]]:
    """The ``.safetensors`` file of ``path`` (a file or a directory holding one), its tensors and its
    LoRA config (diffusers' safetensors metadata, or a PEFT ``adapter_config.json`` beside it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        for preferred in (path / LORA_WEIGHT_NAME, path / "adapter_model.safetensors"):
            if preferred.is_file():
                files = [preferred]
                break
        if len(files) != 1:
            raise FileNotFoundError(
                f"LoRA directory {str(path)!r} must hold {LORA_WEIGHT_NAME}, adapter_model.safetensors or "
                f"exactly one .safetensors file, found {[f.name for f in files]}"
            )
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file must be a .safetensors file (diffusers or PEFT format), got {str(path)!r}")
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta_text = (f.metadata() or {}).get("lora_adapter_metadata")
    config = None
    if meta_text:
        config = json.loads(meta_text)
        if any(k.startswith("transformer.") for k in config):
            config = {k[len("transformer.") :]: v for k, v in config.items() if k.startswith("transformer.")}
    elif (path.parent / "adapter_config.json").is_file():  # PEFT save_pretrained (Flow-GRPO checkpoints)
        config = json.loads((path.parent / "adapter_config.json").read_text())
    if config is not None:
        import dataclasses

        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)}
        config = {k: v for k, v in config.items() if k in known}
    return path, state, config


def _transformer_keys(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Strip the ``transformer.`` (diffusers pipeline) or ``base_model.model.`` (PEFT) prefix; LoRA
    weights for other components (text encoders) are an error."""
    out = {}
    for key, value in state.items():
        name = key
        for prefix in ("base_model.model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name.startswith(("text_encoder", "unet.")):
            raise ValueError(
                f"{source} holds LoRA weights for {name.split('.')[0]!r} ({key!r}); only transformer LoRAs "
                "are supported (student and teachers adapt the transformer)"
            )
        out[name] = value
    return out


def _check_lora_fits(transformer, state: dict[str, Tensor], source: str) -> None:
    """Every ``<module>.lora_A/B.weight`` key names a Linear of ``transformer`` with matching shapes."""
    modules = dict(transformer.named_modules())
    lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys or len(lora_keys) != len(state):
        other = [k for k in state if k not in lora_keys][:3]
        raise ValueError(
            f"{source} is not a LoRA file of this format: expected only '<module>.lora_A/B.weight' keys, "
            f"got {other or 'no LoRA keys'}"
        )
    for key in lora_keys:
        which = "lora_A" if ".lora_A." in key else "lora_B"
        module_name = key.split(f".{which}.")[0]
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(
                f"{source} does not fit this transformer (another architecture?): key {key!r} names "
                f"module {module_name!r}, which is not a Linear layer of the transformer"
            )
        w = state[key]
        if which == "lora_A":
            ok, want = w.dim() == 2 and w.shape[1] == base.in_features, f"(r, {base.in_features})"
        else:
            ok, want = w.dim() == 2 and w.shape[0] == base.out_features, f"({base.out_features}, r)"
        if not ok:
            raise ValueError(
                f"{source} does not fit this transformer (another architecture?): {key!r} has shape "
                f"{tuple(w.shape)}, module {module_name!r} needs {want}"
            )


def load_lora(transformer, path: str | os.PathLike, adapter_name: str) -> None:
    r"""Load a LoRA file (e.g. a teacher) as a new, frozen adapter :math:`W + \tfrac{\alpha}{r} B A`.

    Accepts what :func:`save_lora` / ``StableDiffusion3Pipeline.save_lora_weights`` write (keys
    prefixed ``transformer.``, LoRA config in the safetensors metadata), what diffusers'
    ``save_lora_adapter`` writes (no prefix) and PEFT ``save_pretrained`` directories
    (``adapter_model.safetensors`` + ``adapter_config.json``, keys prefixed ``base_model.model.``, as
    Flow-GRPO's checkpoints).  Without a stored config, diffusers takes the rank from the shapes and
    ``alpha = rank``.  Keys and shapes are checked against ``transformer`` first, so a LoRA for another
    architecture fails with a clear error and leaves nothing loaded.

    Args:
        transformer: ``SD3Transformer2DModel``.
        path: a ``.safetensors`` file or a directory holding one.
        adapter_name: new adapter name.

    Raises:
        FileNotFoundError: missing file.
        ValueError: not LoRA weights, keys or shapes that do not fit, duplicate adapter name.

    Reference: ``diffusionopd`` (task teachers are LoRAs on the same base).
    """
    adapter_name = _check_adapter_name(adapter_name)
    if adapter_name in adapter_names(transformer):
        raise ValueError(f"adapter_name {adapter_name!r} already exists on the transformer")
    file, state, config = _read_lora_file(Path(path).expanduser())
    source = f"LoRA file {str(file)!r}"
    state = _transformer_keys(state, source)
    _check_lora_fits(transformer, state, source)
    with _flags_preserved(transformer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    if adapter_name not in adapter_names(transformer):
        raise ValueError(f"{source} loaded no weights into the transformer")
    for p in lora_parameters(transformer, adapter_name):
        p.requires_grad_(False)


def save_lora(transformer, adapter_name: str, out_dir: str | os.PathLike) -> Path:
    r"""Save one adapter :math:`(A, B, \alpha, r)` in diffusers format, loadable by
    ``StableDiffusion3Pipeline.load_lora_weights`` and by :func:`load_lora`.

    Writes ``out_dir/pytorch_lora_weights.safetensors`` with keys prefixed ``transformer.`` and the
    LoRA config (rank, alpha, targets) in the safetensors metadata, weights in float32.

    Args:
        transformer: model holding the adapter.
        adapter_name: the adapter to save.
        out_dir: directory (created).

    Returns:
        Path of the written file.

    Reference: ``diffusionopd`` (released teacher/student LoRAs are diffusers-format files).
    """
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    lora_parameters(transformer, adapter_name)  # validates the name
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        out,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return out / LORA_WEIGHT_NAME


# --------------------------------------------------------------------------------------------------
# switching the active adapter


def _lora_index(transformer) -> tuple[list, list[torch.nn.Parameter]]:
    """The peft tuner layers and LoRA parameters of ``transformer``, cached until its set of adapters
    changes (walking every module on each switch would cost more than a tiny model's forward)."""
    config = getattr(transformer, "peft_config", {}) or {}
    key = tuple((name, id(cfg)) for name, cfg in config.items())
    cached = transformer.__dict__.get("_opd_lora_index")
    if cached is None or cached[0] != key:
        cached = (key, _tuner_layers(transformer), [p for _, p in _lora_named(transformer)])
        transformer.__dict__["_opd_lora_index"] = cached
    return cached[1], cached[2]


def _active_state(layers: list) -> tuple[list[str], bool]:
    return list(layers[0].active_adapters), not layers[0].disable_adapters


def _set_state(layers: list, params: list, to_active: list[str], to_enabled: bool) -> None:
    """Put every tuner layer in the state ``(active adapters, enabled)``; keep every ``requires_grad``.

    peft's ``set_adapter`` / ``enable_adapters`` set the layer's ``_active_adapter`` /
    ``_disable_adapters`` and flip ``requires_grad`` of the adapters' weights, which is undone at once;
    setting the two fields directly has the same net effect without walking every weight twice (about
    1 ms of Python per switch on the tiny model).  The public getters check that it took (else the
    public calls run)."""
    if all(hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters") for layer in layers[:1]):
        for layer in layers:
            layer._active_adapter = list(to_active)
            layer._disable_adapters = not to_enabled
        first = layers[0]
        if list(first.active_adapters) == list(to_active) and first.disable_adapters == (not to_enabled):
            return
    changed = False
    flags = [p.requires_grad for p in params]
    for layer in layers:  # only the calls that change something (each walks the layer's params)
        if to_enabled and layer.disable_adapters:
            layer.enable_adapters(True)
            changed = True
        if list(layer.active_adapters) != to_active:
            layer.set_adapter(to_active)
            changed = True
        if not to_enabled and not layer.disable_adapters:
            layer.enable_adapters(False)
            changed = True
    if changed:  # peft's set_adapter / enable_adapters flip requires_grad as a side effect: undo it
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def switch_adapter(transformer, adapter: Optional[str]) -> None:
    r"""Make ``adapter`` the active one (``None``: disable every adapter, i.e. the reference
    :math:`v_{ref}`), keeping every ``requires_grad`` flag; a no-op when it already is.

    .. math:: v_\theta = v_{W + \frac{\alpha}{r} B_{adapter} A_{adapter}}

    Uses peft's per-layer ``set_adapter`` / ``enable_adapters`` (public ``BaseTunerLayer`` API) on the
    cached tuner layers, and only where a layer's state differs.

    Args:
        transformer: ``SD3Transformer2DModel`` with peft adapters (or none: then only ``None`` is valid).
        adapter: adapter name or ``None``.

    Raises:
        ValueError: no adapter with that name (the message lists the existing ones).

    Reference: ``diffusionopd`` (student and teachers as adapters of one base).
    """
    names = adapter_names(transformer)
    if adapter is not None and adapter not in names:
        raise ValueError(f"adapter {adapter!r} is not on the transformer; adapters: {names}")
    layers, params = _lora_index(transformer) if names else ([], [])
    if layers:
        active = _active_state(layers)[0]
        _set_state(layers, params, [adapter] if adapter is not None else active, adapter is not None)


@contextlib.contextmanager
def adapter_active(transformer, adapter: Optional[str]) -> Iterator[None]:
    r"""Context manager: :func:`switch_adapter` to ``adapter`` for the block, then back to the adapter
    state found on entry (flags kept throughout).

    .. math:: v \leftarrow v_{adapter}\ \text{inside the block},\qquad v \leftarrow v_{before}\ \text{after}

    Args:
        transformer: ``SD3Transformer2DModel``.
        adapter: adapter name or ``None`` (the reference).

    Reference: ``diffusionopd``.
    """
    layers, params = _lora_index(transformer) if adapter_names(transformer) else ([], [])
    before = _active_state(layers) if layers else None
    switch_adapter(transformer, adapter)
    try:
        yield
    finally:
        if before is not None:
            _set_state(layers, params, *before)
