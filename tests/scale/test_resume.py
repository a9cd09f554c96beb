"""Durability: a run interrupted by SIGTERM and resumed equals the uninterrupted run bit for bit;
checkpoints are atomic; RNG states round-trip; resuming with a changed config is refused."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from scale.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from scale.train import Trainer
from tests.scale.train_helpers import (  # noqa: F401  (fixtures)
    lora_file_tensors,
    read_metrics,
    tiny_config,
    workspace,
)


def _sigterm_at(step):
    def callback(trainer, phase_name, s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the trainer's handler turns it into a flag
    return callback


def test_interrupted_then_resumed_equals_uninterrupted(workspace, tmp_path):
    over = dict(distill_steps=3, checkpoint_every=1, heldout_prompt_files=[workspace["heldout"]])
    full = tmp_path / "full"
    Trainer(tiny_config(workspace, full, **over)).run()

    part = tmp_path / "part"
    res = Trainer(tiny_config(workspace, part, **over), callbacks=[_sigterm_at(2)]).run()
    assert res.status == "interrupted" and (res.phase, res.step) == (0, 2)
    state, where = load_checkpoint(part / "checkpoints")
    assert state["step"] == 2 and where.name == "000002"
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["000001", "000002", "LATEST"]
    assert not (part / "student").exists()
    assert not [p for p in part.iterdir() if p.name.startswith(".")]  # no temp dir left
    # the handler was restored: SIGTERM is back to the default disposition
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    res = Trainer(tiny_config(workspace, part, **over), resume=True).run()
    assert res.status == "finished"
    a, b = lora_file_tensors(full / "student"), lora_file_tensors(part / "student")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(full)) == strip(read_metrics(part))


def test_resume_with_changed_config_is_refused(workspace, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="--resume"):
        Trainer(tiny_config(workspace, run), resume=True)
    assert not run.exists()
    Trainer(tiny_config(workspace, run, distill_steps=1)).run()
    with pytest.raises(ValueError, match="learning_rate"):
        Trainer(tiny_config(workspace, run, distill_steps=2, learning_rate=0.5), resume=True)
    # distill_steps may change; a finished run resumes as a no-op (nothing appended)
    res = Trainer(tiny_config(workspace, run, distill_steps=2), resume=True).run()
    assert res.status == "finished"
    assert [r["step"] for r in read_metrics(run) if r["event"] == "update"] == [1]


def test_rng_states_round_trip():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = capture_rng_state({"g": gen})
    first = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=gen))
    torch.manual_seed(9), random.seed(9), np.random.seed(9), gen.manual_seed(9)
    restore_rng_state(state, {"g": gen})
    again = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=gen))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(ValueError, match="'h'"):
        restore_rng_state(state, {"h": gen})
