"""Shared setup of the trainer tests: perturbed teacher LoRAs, prompt files, a tiny run config.

The teachers are LoRA adapters on the tiny pipeline whose ``lora_B`` is drawn at random
(``add_lora(..., init_std=...)``), so they differ from the base and from each other; the student starts
at the base (``lora_B = 0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEACHER_STD = 0.3


def make_workspace(root: Path, model_dir: Path, n_tasks: int = 2) -> dict:
    """Write ``n_tasks`` teacher LoRAs, prompt files and a held-out prompt file under ``root``."""
    from scale.lora import add_lora, save_lora
    from scale.pipeline import load_pipeline

    root.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model_dir)
    gen = torch.Generator().manual_seed(11)
    teachers, prompt_files = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for k in range(n_tasks):
            add_lora(pipe.transformer, f"t{k}", rank=4, alpha=8, init_std=TEACHER_STD, generator=gen)
            teachers.append(str(save_lora(pipe.transformer, f"t{k}", root / f"teacher{k}")))
    for k in range(n_tasks):
        path = root / f"prompts{k}.txt"
        path.write_text("\n".join(f"task {k} picture {i}" for i in range(4)) + "\n")
        prompt_files.append(str(path))
    heldout = root / "heldout.txt"
    heldout.write_text("a held out prompt\nsomething else entirely\n")
    return {"model": str(model_dir), "teachers": teachers, "prompt_files": prompt_files, "heldout": str(heldout),
            "root": root}


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    """Teachers and prompts for the tests of one module."""
    return make_workspace(tmp_path_factory.mktemp("ws"), tiny_model_dir)


def tiny_config(ws: dict, output_dir: Path, **over):
    """A ScaleConfig for 2 tasks on the tiny pipeline: 8 px, 3 rollout steps, rank-4 LoRA, 2 prompts per
    task per update (micro-batches of 1), every step trained."""
    from scale.config import ScaleConfig

    n = len(ws["teachers"])
    base = dict(
        model=ws["model"], output_dir=str(output_dir), resolution=8, num_steps=3, lora_rank=4, lora_alpha=8,
        batch_size=2, micro_batch_size=1, max_sequence_length=8, tasks=[f"task{k}" for k in range(n)],
        prompt_files=ws["prompt_files"], teacher_loras=ws["teachers"], learning_rate=1e-2, distill_steps=3,
        checkpoint_every=0, sample_every=0, num_sample_prompts=2,
    )
    base.update(over)
    return ScaleConfig(**base).validate()


def read_metrics(run_dir: Path) -> list:
    """The records of ``run_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def lora_file_tensors(path: Path) -> dict:
    """The tensors of a diffusers LoRA directory/file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    return load_file(str(path))
