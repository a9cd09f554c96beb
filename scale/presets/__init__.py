"""Config presets for ``opd-scale train --preset NAME`` (JSON files in this folder; a config file,
``--set`` and the flags override them).

* ``sd35m-512-diffusionopd`` — the DiffusionOPD SD3.5-Medium 512 px setting: from the paper, 512 px,
  LoRA r 32 / alpha 64, a 40-step first-order ODE evaluation sampler; the rest (10 SDE rollout steps at
  noise level 0.7, CFG 4.5, AdamW 3e-4 / weight decay 1e-4, gradient clipping 1.0, 128 T5 tokens,
  bfloat16) are the Flow-GRPO / DiffusionNFT SD3.5 settings the paper follows; closed-form per-step KL
  (``opd_kl``); EMA 0.9 for evaluation (Flow-GRPO's). Give ``--model``, tasks, prompts, teachers.
* ``flowgrpo-sd35`` — stage 1 with Flow-GRPO's semantics exactly: ``kl_form = ratio_form = flowgrpo``
  (per-dim mean KL without ``|dt|``, ratio of per-dim mean log-densities), ``kl_beta`` 0.04,
  ``clip_range`` 1e-4, advantages clipped to 5, groups of 16, SD3.5 512 px, 10 steps, a = 0.7.
* ``tiny`` — the tiny random-weight pipeline of ``opd-scale build-tiny`` (8 px, 4 steps, rank-4 LoRA,
  stage 1 + stage 2 in seconds on a CPU, evaluation every 2 updates, EMA on).

Reference: ``diffusionopd``, ``flowgrpo``, ``nft``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

__all__ = ["PRESET_DIR", "preset_names", "preset_config"]

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> List[str]:
    """The names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_config(name: str):
    """The :class:`~scale.config.ScaleConfig` of preset ``name`` (a bundled name or a JSON/TOML path).

    Raises:
        ValueError: neither a bundled preset nor an existing file (the names are listed).
    """
    from scale.config import load_config

    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--preset {name!r}: no such preset; presets: {preset_names()} (or a .json/.toml path)")
    return load_config(path)
