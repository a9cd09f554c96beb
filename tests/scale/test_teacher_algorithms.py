"""Stage 1 of ``opd-scale train`` with each teacher algorithm (D18) on the tiny pipeline: one update
runs through the engine and moves the teacher adapter; a bad algorithm name is refused by name."""

from __future__ import annotations

import pytest
import torch

from scale.config import TEACHER_ALGORITHMS, ScaleConfig
from scale.train import Trainer
from tests.scale.train_helpers import read_metrics, tiny_config, workspace  # noqa: F401  (fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo_guard", "nft"])
def test_stage1_teacher_algorithm_runs_one_update(workspace, tmp_path, algorithm):
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, tasks=["bright"], prompt_files=workspace["prompt_files"][:1], teacher_loras=[""],
                      rewards=["brightness"], stage1_steps=1, group_size=2, batch_size=2, distill_steps=1,
                      num_steps=2, ppo_epochs=2, clip_range=0.2, teacher_algorithm=algorithm, nft_beta=0.5)
    trainer = Trainer(cfg)
    assert trainer.setup.grpo_spec.objective.name == algorithm
    t0 = {n: p.detach().clone() for n, p in trainer.setup.transformer.named_parameters() if ".teacher_0." in n}
    assert t0
    assert trainer.run().status == "finished"
    moved = [n for n, p in trainer.setup.transformer.named_parameters() if n in t0 and not torch.equal(t0[n], p.detach())]
    assert moved, f"{algorithm}: the teacher adapter did not move"
    rows = [r for r in read_metrics(run) if r.get("phase_name") == "grpo/bright"]
    assert [r["step"] for r in rows] == [1] and all(0.0 <= r["reward"] <= 1.0 for r in rows)
    if algorithm == "nft":
        assert 0.0 <= rows[0]["r_mean"] <= 1.0 and rows[0]["anchor"] >= 0.0


def test_teacher_algorithm_is_validated():
    assert set(TEACHER_ALGORITHMS) == {"grpo", "grpo_guard", "nft"}
    with pytest.raises(ValueError, match="teacher_algorithm"):
        ScaleConfig(model="m", teacher_algorithm="ppo").validate()
    with pytest.raises(ValueError, match="nft_beta"):
        ScaleConfig(model="m", teacher_algorithm="nft", nft_beta=0.0).validate()
    with pytest.raises(ValueError, match="teacher_algorithm 'grpo_guard' needs kernel"):
        ScaleConfig(model="m", teacher_algorithm="grpo_guard", kernel="ode", loss="opd_ode", stage1_steps=1).validate()
    # without stage 1 the teacher algorithm's kernel does not matter
    ScaleConfig(model="m", teacher_algorithm="grpo_guard", kernel="ode", loss="opd_ode").validate()
