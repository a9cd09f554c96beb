r"""Model handling for the scale path: loading, cached prompt embeddings, LoRA adapters, velocities.

Student and teachers are LoRA adapters (peft, through diffusers' ``PeftAdapterMixin``) on one frozen
``SD3Transformer2DModel``; the reference model is the same base with every adapter disabled.  Teacher
LoRAs load from diffusers-format ``.safetensors`` files (those :func:`save_lora` writes, which
``StableDiffusion3Pipeline.load_lora_weights`` also reads).

Which adapter *trains* is decided by the ``requires_grad`` flags of its parameters only:
:func:`add_lora` makes the new adapter trainable, :func:`load_lora` loads a frozen one, and
:func:`predict_velocity` switches the active adapter for one forward pass and leaves every flag and the
active adapter as it found them (peft's ``set_adapter`` / ``disable_adapters`` would otherwise flip
them as a side effect).

Notation map: the model's velocity :math:`v_\theta(x_\sigma, \sigma, c)` -> :func:`predict_velocity`;
the diffusers ``timestep`` fed to the transformer is :math:`1000\,\sigma`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from opd_ref._checks import check_batch_vector, check_tensor

__all__ = [
    "FLOW_GRPO_TARGETS",
    "LORA_WEIGHT_NAME",
    "PromptEmbeds",
    "PromptCache",
    "load_pipeline",
    "add_lora",
    "load_lora",
    "save_lora",
    "lora_parameters",
    "predict_velocity",
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


# --------------------------------------------------------------------------------------------------
# loading


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

    Reference: ``flowgrpo``, ``diffusionopd`` (SD3.5-Medium).
    """
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


# --------------------------------------------------------------------------------------------------
# prompt embeddings


@dataclass
class PromptEmbeds:
    r"""Text conditioning :math:`c` of a batch of prompts, as ``StableDiffusion3Pipeline.encode_prompt``
    returns it; the negative fields are the unconditional :math:`\varnothing` of CFG (``flowgrpo``).

    Attributes:
        prompt_embeds: ``(B, L, D)`` CLIP (padded) and T5 token embeddings, concatenated on ``L``.
        pooled_prompt_embeds: ``(B, P)`` the two CLIP pooled projections concatenated.
        negative_prompt_embeds: ``(B, L, D)`` embeddings of the empty prompt (CFG), or ``None``.
        negative_pooled_prompt_embeds: ``(B, P)`` or ``None``.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    negative_prompt_embeds: Optional[Tensor] = None
    negative_pooled_prompt_embeds: Optional[Tensor] = None

    def __post_init__(self) -> None:
        b = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != b:
                raise ValueError(
                    f"PromptEmbeds.{name} must have batch size {b} like prompt_embeds, got shape {tuple(t.shape)}"
                )
        if (self.negative_prompt_embeds is None) != (self.negative_pooled_prompt_embeds is None):
            raise ValueError("PromptEmbeds: give both negative embeddings or neither")

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(*(None if t is None else fn(t) for t in self._fields()))

    def _fields(self):
        return (
            self.prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_prompt_embeds,
            self.negative_pooled_prompt_embeds,
        )

    def select(self, idx) -> "PromptEmbeds":
        """Rows ``idx`` (int, slice, list or index tensor) of every field; an int keeps the batch dim."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEmbeds":
        """Move every field to ``device`` and/or cast to ``dtype``."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        """Each row repeated ``n`` times in place (``[p0, p0, p1, p1, ...]`` for ``n = 2``): a group of
        ``n`` rollouts per prompt."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch dimension."""
        if not parts:
            raise ValueError("PromptEmbeds.cat needs at least one part")
        fields = list(zip(*(p._fields() for p in parts)))
        return PromptEmbeds(*(None if f[0] is None else torch.cat(f, dim=0) for f in fields))


class PromptCache:
    r"""Encode prompts once with the pipeline's three text encoders and keep the embeddings
    :math:`c = [\mathrm{pad}(\mathrm{CLIP_L} \| \mathrm{CLIP_G});\ \mathrm{T5}]` (tokens) and
    :math:`[\mathrm{pool}_L \| \mathrm{pool}_G]` (pooled).

    Each distinct prompt is encoded once (text encoders under ``no_grad``); later calls assemble the
    batch from the cache.  With ``guidance=True`` the negative (empty) prompt is encoded once as well,
    as ``StableDiffusion3Pipeline`` does for classifier-free guidance.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
        guidance: also provide the negative embeddings (needed for CFG, ``guidance_scale > 1``).
        negative_prompt: the unconditional prompt (default ``""``, as the pipeline).
        batch_size: prompts per text-encoder call when many new prompts arrive at once (a progress bar
            shows when there is more than one batch).

    Reference: ``flowgrpo`` (CFG with the empty prompt during rollouts).
    """

    def __init__(
        self,
        pipe,
        max_sequence_length: int = 256,
        guidance: bool = True,
        negative_prompt: str = "",
        batch_size: int = 32,
    ):
        for name, value in (("max_sequence_length", max_sequence_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.batch_size = batch_size
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance = bool(guidance)
        self.negative_prompt = negative_prompt
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._negative: Optional[tuple[Tensor, Tensor]] = None

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings of ``prompts`` (a list of ``B`` strings), from the cache where possible.

        Returns:
            :class:`PromptEmbeds` with batch ``B`` (negative fields set when ``guidance``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must all be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        starts = range(0, len(new), self.batch_size)
        if len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding prompts", unit="batch")
        for start in starts:
            chunk = new[start : start + self.batch_size]
            embeds, pooled = self._encode(chunk)
            for i, p in enumerate(chunk):
                self._cache[p] = (embeds[i : i + 1].clone(), pooled[i : i + 1].clone())
        pos = torch.cat([self._cache[p][0] for p in prompts], dim=0)
        pooled = torch.cat([self._cache[p][1] for p in prompts], dim=0)
        if not self.guidance:
            return PromptEmbeds(pos, pooled)
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt])
        neg, neg_pooled = self._negative
        b = len(prompts)
        return PromptEmbeds(pos, pooled, neg.expand(b, -1, -1), neg_pooled.expand(b, -1))


# --------------------------------------------------------------------------------------------------
# LoRA adapters


def _tuner_layers(transformer) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_names(transformer) -> list[str]:
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
    active = list(transformer.active_adapters()) if _adapter_names(transformer) else []
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
    if adapter_name in _adapter_names(transformer):
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
    if adapter_name not in _adapter_names(transformer):
        raise ValueError(
            f"adapter_name {adapter_name!r} is not on the transformer; adapters: {_adapter_names(transformer)}"
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
    if adapter_name in _adapter_names(transformer):
        raise ValueError(f"adapter_name {adapter_name!r} already exists on the transformer")
    file, state, config = _read_lora_file(Path(path).expanduser())
    source = f"LoRA file {str(file)!r}"
    state = _transformer_keys(state, source)
    _check_lora_fits(transformer, state, source)
    with _flags_preserved(transformer), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    if adapter_name not in _adapter_names(transformer):
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
# velocity


def _lora_index(transformer) -> tuple[list, list[torch.nn.Parameter]]:
    """The peft tuner layers and LoRA parameters of ``transformer``, cached until its set of adapters
    changes (walking every module on each forward would cost more than a tiny model's forward)."""
    config = getattr(transformer, "peft_config", {}) or {}
    key = tuple((name, id(cfg)) for name, cfg in config.items())
    cached = transformer.__dict__.get("_opd_lora_index")
    if cached is None or cached[0] != key:
        cached = (key, _tuner_layers(transformer), [p for _, p in _lora_named(transformer)])
        transformer.__dict__["_opd_lora_index"] = cached
    return cached[1], cached[2]


@contextlib.contextmanager
def _adapter_active(transformer, adapter: Optional[str]) -> Iterator[None]:
    """Activate ``adapter`` (``None``: disable all adapters = the reference model) for the block,
    keeping every ``requires_grad`` flag as it was (also during the block).

    Uses peft's per-layer ``set_adapter`` / ``enable_adapters`` (public ``BaseTunerLayer`` API) on the
    cached layers; both flip ``requires_grad`` as a side effect, which is undone right away."""
    names = _adapter_names(transformer)
    if adapter is not None and adapter not in names:
        raise ValueError(f"adapter {adapter!r} is not on the transformer; adapters: {names}")
    layers, params = _lora_index(transformer) if names else ([], [])
    if not layers:
        yield
        return
    flags = [p.requires_grad for p in params]
    active = list(layers[0].active_adapters)
    enabled = not layers[0].disable_adapters

    def switch(to_active: list[str], to_enabled: bool) -> None:
        for layer in layers:  # only the calls that change something (each walks the layer's params)
            if to_enabled and layer.disable_adapters:
                layer.enable_adapters(True)
            if list(layer.active_adapters) != to_active:
                layer.set_adapter(to_active)
            if not to_enabled and not layer.disable_adapters:
                layer.enable_adapters(False)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

    try:
        switch([adapter] if adapter is not None else active, adapter is not None)
        yield
    finally:
        switch(active, enabled)


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
    r"""Velocity :math:`v(x_\sigma, \sigma, c)` of the base with ``adapter`` (or of the reference).

    With ``guidance_scale`` :math:`g > 1` classifier-free guidance, as the SD3 pipeline computes it
    (one batched forward over ``[uncond, cond]``):

    .. math::
        v = v(x, \sigma, \varnothing) + g\,\big(v(x, \sigma, c) - v(x, \sigma, \varnothing)\big)

    The transformer runs in its own dtype; inputs are cast to it and the result is returned in
    float32 so that the kernels (``opd_ref.kernels``) run in float32.  Gradients flow to whatever
    parameters have ``requires_grad`` when grad mode is on.

    Args:
        transformer: ``SD3Transformer2DModel`` (with or without peft adapters).
        latents: ``(B, C, H, W)`` state :math:`x_\sigma`.
        sigma: ``(B,)`` float tensor in ``[0, 1]``; the transformer gets ``timestep = 1000 sigma``.
        embeds: :class:`PromptEmbeds` with batch ``B`` (with negatives when ``guidance_scale > 1``).
        guidance_scale: CFG scale :math:`g`; ``<= 1`` means a single conditional forward.
        adapter: adapter name to use, or ``None`` for the reference (all adapters disabled).
        num_train_timesteps: the scheduler's ``num_train_timesteps`` (1000 for SD3).
        dtype: the transformer's dtype when the caller already knows it (``None``: looked up with
            ``transformer.dtype``, which walks every module and costs about as much as a tiny model's
            adapter switch; rollouts and the trainer look it up once instead of on every call).

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
    g = float(guidance_scale)
    cfg = g > 1.0
    if cfg and not embeds.has_negative:
        raise ValueError(
            f"guidance_scale={g} > 1 needs negative embeddings (PromptCache(..., guidance=True))"
        )
    if dtype is None:
        dtype = transformer.dtype
    x = latents.to(dtype)
    t = (sigma.to(torch.float32) * num_train_timesteps).to(latents.device)
    if cfg:
        x = torch.cat([x, x], dim=0)
        t = torch.cat([t, t], dim=0)
        hidden = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds], dim=0)
        pooled = torch.cat([embeds.negative_pooled_prompt_embeds, embeds.pooled_prompt_embeds], dim=0)
    else:
        hidden, pooled = embeds.prompt_embeds, embeds.pooled_prompt_embeds
    with _adapter_active(transformer, adapter):
        out = transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=hidden.to(device=x.device, dtype=dtype),
            pooled_projections=pooled.to(device=x.device, dtype=dtype),
            return_dict=False,
        )[0]
    out = out.to(torch.float32)
    if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + g * (cond - uncond)
    return out
