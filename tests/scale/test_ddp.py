"""Two-process data parallel (torchrun, gloo) gives the same student LoRA after a step as one process
with the same global batch: the samples are a function of (seed, update, task, micro-batch), each
process takes every other micro-batch, and the gradients are summed over processes once per update."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scale.train import Trainer
from tests.scale.train_helpers import lora_file_tensors, tiny_config, workspace  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(workspace, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    over = dict(distill_steps=1, batch_size=2, micro_batch_size=1)
    cfg = tiny_config(workspace, tmp_path / "ddp", **over)
    cfg_path = cfg.save(tmp_path / "ddp.json")
    info = tmp_path / "info.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "scale" / "ddp_worker.py"),
         str(cfg_path), str(info)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads(info.read_text())
    # really two cooperating processes, not two independent copies
    assert meta["world_size"] == 2 and sorted(meta["ranks"]) == [0, 1] and meta["backend"] == "gloo"

    Trainer(tiny_config(workspace, tmp_path / "single", **over)).run()
    # what two independent copies would give: one process on half the global batch
    Trainer(tiny_config(workspace, tmp_path / "half", **{**over, "batch_size": 1})).run()
    a, b = lora_file_tensors(tmp_path / "ddp" / "student"), lora_file_tensors(tmp_path / "single" / "student")
    half = lora_file_tensors(tmp_path / "half" / "student")
    assert a.keys() == b.keys() == half.keys()
    # Adam's first step is lr * g / (|g| + eps): where |g| is tiny, the different float summation order
    # of the per-micro-batch gradients moves it by up to ~1e-6 (lr = 1e-2); half a batch moves it by ~lr
    atol = 1e-5
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < atol, worst
    assert max(float((a[k] - half[k]).abs().max()) for k in a) > 100 * atol
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # the step did something


@pytest.mark.slow
def test_sigterm_under_launch_checkpoints_and_exits_143_without_a_traceback(workspace, tmp_path):
    # plain torchrun's agent answers SIGTERM with SignalException: a traceback and exit 1; `opd-scale
    # launch` runs torchrun in-process and turns the signal into 128 + 15 once the workers have checkpointed
    import signal
    import time

    run = tmp_path / "run"
    cfg_path = tiny_config(workspace, run, distill_steps=500, batch_size=2).save(tmp_path / "cfg.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "scale.cli", "launch", "--nproc-per-node", "2", "--", "train", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"event": "update"' in metrics.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "continue with --resume" in err
    assert (run / "checkpoints" / "LATEST").is_file()
    step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"update"' in line)
    # the checkpoint resumes: finish one more update under the same launcher
    done = subprocess.run([sys.executable, "-m", "scale.cli", "launch", "--nproc-per-node", "2", "--", "train",
                           "--resume", "--output-dir", str(run), "--distill-steps", str(step + 1)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "student" / "pytorch_lora_weights.safetensors").is_file()


def test_launch_usage_errors_exit_2():
    from scale.cli import main

    assert main(["launch", "--nproc-per-node", "2"]) == 2
    assert main(["launch", "--"]) == 2
