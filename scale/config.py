"""One typed configuration for ``opd-scale train`` (DiffusionOPD two-stage recipe on SD3 / SD3.5).

Defaults follow the public Flow-GRPO / DiffusionOPD settings for SD3.5-Medium (512 px, 10 rollout
steps, noise level 0.7, CFG 4.5, LoRA r 32 / alpha 64 on Flow-GRPO's attention targets). A config
loads from a JSON or TOML file and is overridden on the command line with ``--set key=value`` or
``--key value``; an unknown key is an error that names it.

Reference: ``diffusionopd`` (two-stage recipe, multi-task OPD), ``flowgrpo`` (GRPO, SDE sampler).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple

from opd_ref.engine import (IMPLICIT_REWARDS, KERNEL_KINDS, KL_FORMS, OBJECTIVES, RATIO_FORMS, RATIO_REFERENCES,
                             CRDMechanisms, KernelSpec)
from scale.lora import FLOW_GRPO_TARGETS  # Flow-GRPO's SD3.5 LoRA targets (no heavy import)

__all__ = ["ScaleConfig", "FLOW_GRPO_TARGETS", "load_config", "apply_overrides", "parse_value", "field_docs"]

#: stage-2 losses: the engine's distillation objectives, and CRD (the student on the task rewards)
LOSSES = tuple(name for name, obj in OBJECTIVES.items() if obj.family in ("distill", "crd"))
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: stage-1 teacher algorithms: the engine's reward objectives (grpo, grpo_guard) and DiffusionNFT (D18)
TEACHER_ALGORITHMS = tuple(name for name, obj in OBJECTIVES.items() if obj.family in ("rl", "nft"))
#: trackers next to metrics.jsonl (through accelerate's tracker classes)
REPORT_TO = ("none", "tensorboard", "wandb")


def knob(default: Any, doc: str) -> Any:
    """A config field and its documentation (what it is, where the default comes from): the one text
    that ``help(ScaleConfig)`` and ``opd-scale train --help`` show.  A list default is copied per
    instance."""
    if isinstance(default, (list, tuple)):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ScaleConfig:
    """Every knob of ``opd-scale train``; each field's documentation (its ``knob``) says what it is
    and where the default comes from, and is listed under Attributes below."""

    # ---- model and run ----------------------------------------------------------------------
    model: str = knob("", "local diffusers directory (or cached hub id) of an SD3 / SD3.5 pipeline; required")
    output_dir: str = knob("runs/opd", "run directory: config.json, metrics.jsonl, samples/, checkpoint/, student/")
    dtype: str = knob("auto", "weights dtype: auto = bfloat16 on CUDA (Flow-GRPO mixed precision), float32 on CPU")
    seed: int = knob(0, "master seed; every rollout's noise is derived from (seed, update, task, micro-batch)")

    # ---- sampler (rollouts) -----------------------------------------------------------------
    resolution: int = knob(512, "image side in pixels (Flow-GRPO / DiffusionOPD SD3.5-Medium: 512)")
    num_steps: int = knob(10, "rollout steps on the scheduler's sigma grid (Flow-GRPO training sampler: 10)")
    kernel: str = knob("sde", "transition kernel of the rollouts (opd_ref.engine.KERNEL_KINDS): sde (Flow-GRPO), cps, ode")
    noise_level: float = knob(0.7, "SDE noise level a (Flow-GRPO: 0.7); ignored by the ode kernel")
    guidance_scale: float = knob(4.5, "classifier-free guidance of the student (rollouts, samples; Flow-GRPO: 4.5); "
                                 "1 = no CFG (one conditional forward)")
    teacher_guidance_scales: List[float] = knob([], "per task, or one for all: the guidance each teacher was trained "
                                                "with; [] = 4.5 each (GRPO-Guard / Flow-GRPO teachers); DiffusionNFT "
                                                "teachers: 1.0 (trained CFG-free)")
    reference_guidance_scale: float = knob(4.5, "guidance of the frozen base (stage-1 KL, CRD; Flow-GRPO: the "
                                           "policy's 4.5)")
    detach_uncond: bool = knob(False, "stop the gradient through the unconditional CFG branch as Flow-GRPO's code "
                               "does (gradient g * dv_cond); false = the exact gradient through both branches")
    max_sequence_length: int = knob(128, "T5 tokens per prompt (Flow-GRPO uses 128 for SD3.5)")
    train_steps: List[int] = knob([], "rollout step indices trained; [] = every stochastic step")

    # ---- LoRA ---------------------------------------------------------------------------------
    lora_rank: int = knob(32, "LoRA rank r (Flow-GRPO / DiffusionOPD: 32)")
    lora_alpha: int = knob(64, "LoRA alpha (scale alpha / r = 2; Flow-GRPO: 64)")
    lora_targets: List[str] = knob(FLOW_GRPO_TARGETS, "transformer modules given LoRA adapters (Flow-GRPO's SD3.5 attention targets)")

    # ---- optimisation ---------------------------------------------------------------------------
    learning_rate: float = knob(3e-4, "AdamW learning rate (Flow-GRPO SD3.5 LoRA: 3e-4)")
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2")
    weight_decay: float = knob(1e-4, "AdamW weight decay (Flow-GRPO: 1e-4)")
    adam_eps: float = knob(1e-8, "AdamW epsilon")
    max_grad_norm: float = knob(1.0, "gradient clipping of the LoRA parameters (Flow-GRPO: 1.0); 0 = off")
    batch_size: int = knob(8, "prompts per task per update over all processes (stage 2: one rollout each)")
    micro_batch_size: int = knob(1, "samples per forward pass; (batch_size / micro_batch_size) % world_size == 0")
    gradient_checkpointing: bool = knob(False, "recompute transformer activations in backward (saves memory on GPU)")

    # ---- stage 1: GRPO task teachers (optional) ---------------------------------------------
    stage1_steps: int = knob(0, "GRPO updates per task teacher; 0 skips stage 1 (teachers given as LoRA files)")
    rewards: List[str] = knob([], "per task: a reward spec: built-in name, \"module:function\", an adapter on a local "
                              "model directory (\"pickscore:/models/ps\"), or a weighted sum "
                              "(\"0.5*pickscore:/m/ps + 0.5*aesthetic:/m/aes\")")
    group_size: int = knob(16, "rollouts per prompt for group-normalised advantages (Flow-GRPO: 16-24)")
    clip_range: float = knob(1e-4, "PPO ratio clip epsilon (Flow-GRPO: 1e-4). With ratio_form = exact the ratio is of the "
                             "step's density (log-ratio summed over D = 65536 dims at 512 px): the same 1e-4 is D times "
                             "tighter than Flow-GRPO's clip, which bounds the summed log-ratio to about +-6.55; "
                             "ratio_form = flowgrpo gives Flow-GRPO's ratio")
    kl_beta: float = knob(0.04, "weight of the KL to the reference (Flow-GRPO GenEval setting: 0.04). With kl_form = exact "
                          "the KL is D/|dt| times Flow-GRPO's form (2.4e5 to 7.3e6 on the 10-step SD3.5 grid, a = 0.7), "
                          "so Flow-GRPO's 0.04 is 5.4e-9 to 1.6e-7 here (per step; scale.porting); kl_form = flowgrpo "
                          "keeps Flow-GRPO's meaning")
    kl_form: str = knob("exact", "exact = the true per-step KL; flowgrpo = Flow-GRPO code's form (mean over dims, no |dt|)")
    adv_eps: float = knob(1e-4, "epsilon in (r - mean) / (std + eps) (Flow-GRPO: 1e-4)")
    ppo_epochs: int = knob(1, "optimisation passes over each rollout batch (ratio != 1 only when > 1)")
    teacher_algorithm: str = knob("grpo", "stage-1 algorithm: grpo (Flow-GRPO), grpo_guard (GRPO-Guard regulated clipping), nft (DiffusionNFT, forward process; kl_beta = weight of ||v - v_ref||^2)")
    nft_beta: float = knob(1.0, "DiffusionNFT beta of the implicit velocities v+- = v_old +- beta (v - v_old) (teacher_algorithm = nft)")

    # ---- stage 2: multi-teacher on-policy distillation ------------------------------------
    distill_steps: int = knob(100, "stage-2 updates; one update = one round-robin cycle over all tasks")
    loss: str = knob("opd_kl", "engine method: opd_kl (closed-form KL), opd_ode (ODE matching), ppo_opd, k1, vopd, crd")
    tasks: List[str] = knob([], "task names (one teacher LoRA per task)")
    prompt_files: List[str] = knob([], "per task: .txt one prompt per line (Flow-GRPO OCR / pickscore splits) or "
                                   ".jsonl one {\"prompt\": ..., ...} object per line, the other keys are the "
                                   "reward's metadata (Flow-GRPO GenEval *_metadata.jsonl)")
    prompt_cache: str = knob("", "\"\" = prompt embeddings in host memory (pinned on CUDA); a directory = a "
                             "memory-mapped cache on disk, written once (each process encodes its share) and "
                             "read by every later run with the same prompts")
    teacher_loras: List[str] = knob([], "per task: diffusers LoRA file/dir (\"\" = stage 1)")
    heldout_prompt_files: List[str] = knob([], "held-out KL prompts: one file per task, or one for all ([] = off)")
    crd_beta: float = knob(1.0, "CRD KL strength beta of the implicit reward (loss = crd; uses group_size, rewards)")
    crd_ratio_to: str = knob("reference", "CRD log-ratio against: reference (decoupled from the sampler) or sampler (coupled: theta_old)")
    crd_guidance: float = knob(0.0, "CFG scale of CRD's reference (log-ratio and KL anchor); 0 = reference_guidance_scale, else > 1")
    crd_kl_beta: float = knob(0.0, "CRD KL anchor: weight of the per-step KL to the (guided) reference; 0 = off")
    crd_adaptive_kl: bool = knob(False, "CRD reward-adaptive KL: anchor weight floor + (1 - floor) x reward rank in [0, 1]")
    crd_kl_floor: float = knob(0.01, "CRD reward-adaptive KL: the weight of the lowest-reward samples, in [0, 1]")
    crd_implicit: str = knob("path", "CRD implicit reward: path (summed per-step log-ratio) or elbo (forward-process ELBO)")
    crd_elbo_levels: int = knob(4, "CRD ELBO implicit reward: Gauss-Legendre noise levels per sample")

    # ---- durability and logging -------------------------------------------------------------
    checkpoint_every: int = knob(50, "verified checkpoint every N updates (and always on SIGTERM / Ctrl-C); 0 = only at stage ends")
    keep_checkpoints: int = knob(2, "numbered checkpoints kept in checkpoints/ (the fall-back when the latest is corrupt)")
    max_heldout_kl_ratio: float = knob(0.0, "stop (exit 3) when the held-out KL exceeds this times its value before stage 2; 0 = off")
    sample_every: int = knob(50, "write a sample grid every N updates; 0 = only at the end")
    num_sample_prompts: int = knob(4, "prompts (first of each task) in each sample grid")
    eval_every: int = knob(0, "held-out KL every N updates (0 = only before and after training)")

    # ---- evaluation, EMA, trackers, Flow-GRPO semantics ---------------------------------------
    eval_steps: int = knob(40, "ODE steps of the evaluation sampler (rewards and grids on the held-out prompts; DiffusionNFT / DiffusionOPD: 40)")
    eval_grid_images: int = knob(4, "held-out prompts per task in each evaluation grid (eval/...png); 0 = no grids")
    adv_clip: float = knob(5.0, "clip group advantages to [-c, c] (Flow-GRPO adv_clip_max: 5); 0 = off")
    ratio_form: str = knob("exact", "PPO ratio of stage 1: exact = the step density's ratio (log-ratio summed over dims); "
                           "flowgrpo = Flow-GRPO code's (exp of the per-dim mean log-ratio)")
    ema_decay: float = knob(0.0, "EMA of the student LoRA, ema <- d ema + (1 - d) theta after each stage-2 update; used "
                            "for evaluation, samples and student_ema/ (0 = off; Flow-GRPO: 0.9)")
    report_to: str = knob("none", "trackers next to metrics.jsonl: none, tensorboard (RUN/tensorboard/) or wandb (through accelerate)")

    def validate(self) -> "ScaleConfig":
        """Check every value's type and range (path-like values become ``str``); raise
        ``ValueError`` naming the key and the value."""
        for key, typ in _field_types().items():
            val = getattr(self, key)
            if isinstance(val, os.PathLike):
                val = os.fspath(val)
            elif isinstance(val, (list, tuple)):
                val = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in val]
            setattr(self, key, parse_value(key, val))
        for key, typ in _field_types().items():
            if typ is float and not math.isfinite(getattr(self, key)):
                raise ValueError(f"config {key} must be a finite number, got {getattr(self, key)!r}")
        positive = (
            "resolution", "num_steps", "lora_rank", "lora_alpha", "batch_size", "micro_batch_size",
            "group_size", "max_sequence_length", "num_sample_prompts", "ppo_epochs", "keep_checkpoints",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"config {key} must be > 0, got {getattr(self, key)!r}")
        nonneg = ("stage1_steps", "distill_steps", "checkpoint_every", "sample_every", "eval_every",
                  "max_grad_norm", "weight_decay", "kl_beta", "guidance_scale")
        for key in nonneg:
            if getattr(self, key) < 0:
                raise ValueError(f"config {key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("learning_rate", "adam_eps", "clip_range", "adv_eps", "crd_beta", "nft_beta"):
            val = getattr(self, key)
            if not (math.isfinite(val) and val > 0):
                raise ValueError(f"config {key} must be a finite number > 0, got {val!r}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"config {key} must lie in [0, 1), got {getattr(self, key)!r}")
        for g in self.teacher_guidance_scales:
            if not (math.isfinite(g) and g >= 0):
                raise ValueError(f"config teacher_guidance_scales entries must be finite numbers >= 0, got {g!r}")
        if self.reference_guidance_scale < 0:
            raise ValueError(f"config reference_guidance_scale must be >= 0, got {self.reference_guidance_scale!r}")
        if len(self.teacher_guidance_scales) not in (0, 1, len(self.tasks)):
            raise ValueError(f"config teacher_guidance_scales needs one value per task ({len(self.tasks)}) or one for "
                             f"all, got {self.teacher_guidance_scales}")
        from scale.rewards import parse_reward_spec

        for spec in self.rewards:
            if spec:
                parse_reward_spec(spec)
        for key, allowed in (("crd_ratio_to", RATIO_REFERENCES), ("crd_implicit", IMPLICIT_REWARDS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.crd_guidance != 0 and not self.crd_guidance > 1:
            raise ValueError(f"config crd_guidance must be 0 (reference_guidance_scale) or > 1, got {self.crd_guidance!r}")
        if self.crd_guidance > 1 and self.guidance_scale == 1 and self.reference_guidance_scale == 1:
            raise ValueError(f"config crd_guidance={self.crd_guidance} needs the negative prompt embeddings: "
                             f"guidance_scale or reference_guidance_scale != 1, got {self.guidance_scale!r} and "
                             f"{self.reference_guidance_scale!r}")
        try:
            self.crd_mechanisms()
        except ValueError as err:
            raise ValueError(f"config crd_*: {err}") from None
        if self.max_heldout_kl_ratio != 0 and not self.max_heldout_kl_ratio > 1:
            raise ValueError(f"config max_heldout_kl_ratio must be 0 (off) or > 1, got {self.max_heldout_kl_ratio!r}")
        if self.loss == "ode":
            raise ValueError("config loss 'ode' is now called 'opd_ode' (the engine's method name)")
        for key, allowed in (("kernel", KERNEL_KINDS), ("loss", LOSSES), ("kl_form", KL_FORMS), ("dtype", DTYPES),
                             ("teacher_algorithm", TEACHER_ALGORITHMS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key} must be one of {allowed}, got {getattr(self, key)!r}")
        try:
            self.kernel_spec()
        except ValueError as err:
            raise ValueError(f"config kernel {self.kernel!r} / noise_level {self.noise_level!r}: {err}") from None
        if self.kernel not in OBJECTIVES[self.loss].kernels:
            raise ValueError(f"config loss {self.loss!r} needs kernel in {OBJECTIVES[self.loss].kernels}, "
                             f"got kernel {self.kernel!r}")
        if self.stage1_steps > 0 and self.kernel not in OBJECTIVES[self.teacher_algorithm].kernels:
            raise ValueError(f"config teacher_algorithm {self.teacher_algorithm!r} needs kernel in "
                             f"{OBJECTIVES[self.teacher_algorithm].kernels}, got kernel {self.kernel!r}")
        for idx in self.train_steps:
            if not 0 <= idx < self.num_steps:
                raise ValueError(f"config train_steps entries must lie in [0, num_steps={self.num_steps}), got {idx}")
        if len(set(self.train_steps)) != len(self.train_steps):
            raise ValueError(f"config train_steps has duplicates: {self.train_steps}")
        n = len(self.tasks)
        if len(self.heldout_prompt_files) not in (0, 1, n):
            raise ValueError(
                f"config heldout_prompt_files needs one file per task ({n}) or one for all, got {self.heldout_prompt_files}"
            )
        for key in ("prompt_files", "teacher_loras", "rewards"):
            val = getattr(self, key)
            if val and len(val) != n:
                raise ValueError(f"config {key} needs one entry per task ({n} tasks {self.tasks}), got {len(val)}: {val}")
        if len(set(self.tasks)) != n:
            raise ValueError(f"config tasks must be distinct names, got {self.tasks}")
        for key in ("eval_steps",):
            if getattr(self, key) <= 0:
                raise ValueError(f"config {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("eval_grid_images", "adv_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"config {key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"config ema_decay must lie in [0, 1) (0 = off), got {self.ema_decay!r}")
        for key, allowed in (("ratio_form", RATIO_FORMS), ("report_to", REPORT_TO)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key} must be one of {allowed}, got {getattr(self, key)!r}")
        return self

    def teacher_guidance(self) -> List[float]:
        """The guidance scale of each task's teacher (``teacher_guidance_scales`` expanded; 4.5 each by default)."""
        g = self.teacher_guidance_scales
        return [4.5] * len(self.tasks) if not g else g * len(self.tasks) if len(g) == 1 else list(g)
    def crd_mechanisms(self) -> CRDMechanisms:
        """CRD's mechanisms (the ``crd_*`` fields) as the engine's :class:`~opd_ref.engine.CRDMechanisms`."""
        return CRDMechanisms(ratio_to=self.crd_ratio_to, guidance=self.crd_guidance if self.crd_guidance > 0 else None,
                             kl_beta=self.crd_kl_beta, adaptive_kl=self.crd_adaptive_kl, kl_floor=self.crd_kl_floor,
                             implicit=self.crd_implicit, elbo_levels=self.crd_elbo_levels)

    def kernel_spec(self) -> KernelSpec:
        """The rollout kernel: ``kernel`` and ``noise_level`` with Flow-GRPO's sigma = 1 rule (the SD3
        grid starts at 1)."""
        return KernelSpec(self.kernel, self.noise_level, "flowgrpo")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the config as indented JSON (what ``config.json`` of a run holds)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def field_docs() -> List[Tuple[str, str, Any, str]]:
    """``(name, type, default, documentation)`` of every :class:`ScaleConfig` field, in order."""
    rows = []
    for f in dataclasses.fields(ScaleConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, str(f.type), default, f.metadata["doc"]))
    return rows


ScaleConfig.__doc__ = inspect.cleandoc(ScaleConfig.__doc__) + "\n\nAttributes:\n" + "\n".join(
    f"    {name} ({typ}, default {default!r}): {doc}" for name, typ, default, doc in field_docs()
)


def _field_types() -> Dict[str, Any]:
    return typing.get_type_hints(ScaleConfig)


def parse_value(key: str, raw: Any) -> Any:
    """Coerce ``raw`` (a string from the command line, or a JSON/TOML value) to the type of ``key``.

    Lists accept a JSON list (``'["a", "b"]'``) or a comma-separated string (``a,b``; empty = ``[]``);
    booleans accept true/false/1/0/yes/no.

    Raises:
        ValueError: unknown key (named, with the known keys) or a value of the wrong type.
    """
    types = _field_types()
    if key not in types:
        raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(types))}")
    typ = types[key]
    origin = typing.get_origin(typ)
    try:
        if origin in (list, List):
            (item_type,) = typing.get_args(typ)
            if isinstance(raw, str):
                text = raw.strip()
                if text.startswith("["):
                    raw = json.loads(text)
                else:
                    raw = [] if text == "" else [part.strip() for part in text.split(",")]
            if not isinstance(raw, (list, tuple)):
                raise TypeError(f"expected a list, got {type(raw).__name__}")
            return [_scalar(item_type, item) for item in raw]
        return _scalar(typ, raw)
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"config key {key!r} expects {_type_name(typ)}, got {raw!r} ({err})") from None


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ))


def _scalar(typ: Any, raw: Any) -> Any:
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.strip().lower() in ("true", "1", "yes")
        raise TypeError(f"expected a boolean, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise TypeError("expected an integer, got a boolean")
        if isinstance(raw, float):
            if not raw.is_integer():
                raise TypeError(f"expected an integer, got {raw!r}")
            return int(raw)
        return int(raw)
    if typ is float:
        if isinstance(raw, bool):
            raise TypeError("expected a number, got a boolean")
        return float(raw)
    if typ is str:
        if not isinstance(raw, str):
            raise TypeError(f"expected a string, got {type(raw).__name__}")
        return raw
    raise TypeError(f"unsupported field type {typ!r}")


def apply_overrides(config: ScaleConfig, overrides: Mapping[str, Any] | Iterable[str]) -> ScaleConfig:
    """Return a copy of ``config`` with overrides applied and validated.

    Args:
        config: the base config.
        overrides: a mapping ``key -> value`` or an iterable of ``"key=value"`` strings (``--set``).

    Raises:
        ValueError: malformed ``key=value``, unknown key (named) or a bad value.
    """
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"override must look like key=value, got {item!r}")
            key, _, value = item.partition("=")
            items.append((key.strip().replace("-", "_"), value))
    values = {key: parse_value(key, value) for key, value in items}
    return dataclasses.replace(config, **values).validate()


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> ScaleConfig:
    """Load a config from a JSON (``.json``) or TOML (``.toml``) file, then apply ``overrides``.

    Args:
        path: config file, or ``None`` for the defaults.
        overrides: as in :func:`apply_overrides`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix, unparsable file, unknown key (named) or a bad value.
    """
    config = ScaleConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"config file {str(path)!r} is not valid JSON: {err}") from None
        elif path.suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        else:
            raise ValueError(f"config file must end in .json or .toml, got {str(path)!r}")
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a table/object, got {type(data).__name__}")
        config = dataclasses.replace(config, **{k: parse_value(k, v) for k, v in data.items()})
    return apply_overrides(config, overrides)
