"""``opd-scale`` output redirected to a file: no cursor-up codes from nested progress bars, no
torchvision notes from transformers, the CLIP truncation warning once (scale/logs.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import sys

import pytest
from scale.cli import main
model, out = sys.argv[1], sys.argv[2]
assert main(["build-tiny", model]) == 0
long = "a photo of a small red cube on a large blue table next to a green ball under a lamp"
for k in range(2):  # two sample commands, each loads the pipeline and encodes a prompt longer than CLIP's
    assert main(["sample", "--model", model, "--prompt", f"{long} {k}", "--resolution", "8", "--num-steps", "1",
                 "--max-sequence-length", "8", "--out", f"{out}/{k}.png"]) == 0
"""


@pytest.mark.slow
def test_redirected_output_has_no_cursor_codes_and_each_warning_once(tmp_path):
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as fh:  # stdout and stderr both to a file: not a terminal
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tiny"), str(tmp_path)], stdout=fh,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\x1b[A" not in text, text  # nested tqdm bars (pipeline components around weights) are off
    assert "torchvision" not in text, text
    # diffusers logs each truncation (CLIP's 16 tokens, T5's max_sequence_length) on every encoding
    # (here two): each is shown once
    assert text.count("truncated because CLIP can only handle") == 1, text
    assert text.count("truncated because `max_sequence_length`") == 1, text
