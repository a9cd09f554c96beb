"""Run directories that never give a silent wrong result: verified checkpoints with a crash-safe commit,
corrupt / truncated / missing checkpoints, disk full, a lock against two runs, config-only directories,
path spelling, partial metrics lines, divergence (exit 3), Ctrl-C (exit 130), flags given twice or abbreviated.

Each test drives the real trainer on the tiny pipeline (a run of 3 updates takes well under a second)."""

from __future__ import annotations

import errno
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

import scale.checkpoint as ckpt_mod
from scale.checkpoint import CheckpointError, RunBusyError, load_checkpoint, save_checkpoint
from scale.cli import EXIT_DIVERGED, EXIT_IO, EXIT_SIGINT, main
from scale.train import DivergedError, Trainer
from tests.scale.train_helpers import lora_file_tensors, read_metrics, tiny_config, workspace  # noqa: F401

OVER = dict(distill_steps=3, checkpoint_every=1)


def _signal_at(step, sig=signal.SIGTERM):
    def callback(trainer, phase_name, s):
        if s == step:
            os.kill(os.getpid(), sig)
    return callback


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in recs]


@pytest.fixture(scope="module")
def full_run(workspace, tmp_path_factory):
    """The uninterrupted 3-update run every resumed run below must equal."""
    run = tmp_path_factory.mktemp("full") / "run"
    Trainer(tiny_config(workspace, run, **OVER)).run()
    return run


def _assert_same_as(full, run):
    a, b = lora_file_tensors(full / "student"), lora_file_tensors(run / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(read_metrics(full)) == _strip(read_metrics(run))


def _interrupted(workspace, run, at=2):
    res = Trainer(tiny_config(workspace, run, **OVER), callbacks=[_signal_at(at)]).run()
    assert res.status == "interrupted" and res.step == at
    return run / "checkpoints"


# ---- checkpoints: checksums, fall-back, clear errors ---------------------------------------------


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_with_a_warning_and_resume_exactly(workspace, tmp_path,
                                                                                         full_run):
    """64 flipped bytes in state.pt: the sha256 check names the file, the run falls back to the previous
    checkpoint (moved-aside bad one kept) and the result equals the uninterrupted run."""
    run = tmp_path / "run"
    root = _interrupted(workspace, run)
    state = root / "000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[200:264] = bytes(b ^ 0xFF for b in data[200:264])
    state.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"000002/state\.pt.*sha256.*falling back to .*000001.*update 1"):
        res = Trainer(tiny_config(workspace, run, **OVER), resume=True).run()
    assert res.status == "finished"
    assert (root / "corrupt-000002").is_dir()
    _assert_same_as(full_run, run)


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing_manifest"])
def test_no_valid_checkpoint_is_a_clear_error_naming_the_file(workspace, tmp_path, capsys, damage):
    run = tmp_path / "run"
    root = _interrupted(workspace, run, at=1)  # one checkpoint only: nothing to fall back to
    target = root / "000001" / ("manifest.json" if damage == "missing_manifest" else "state.pt")
    if damage == "missing_manifest":
        target.unlink()
    else:
        target.write_bytes(b"" if damage == "empty" else target.read_bytes()[:100])
    assert main(["train", "--resume", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and str(target) in err and "Traceback" not in err


def _commit_killed_at(root: Path, k: int) -> int:
    """Commit checkpoint 1, then in a forked child commit checkpoint 2 and die (``os._exit``, no
    cleanup) right after the k-th file-system step (a file write, a directory fsync, a rename or the
    pointer replace). Returns the child's exit status (0: the commit had fewer than k steps)."""
    save_checkpoint(root, {"step": 1, "w": torch.ones(3)}, {"phase": 0, "step": 1})
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def killer(real):
                def step(*args, **kwargs):
                    out = real(*args, **kwargs)
                    calls[0] += 1
                    if calls[0] == k:
                        os._exit(9)
                    return out
                return step

            ckpt_mod._write_bytes = killer(ckpt_mod._write_bytes)
            ckpt_mod._fsync_dir = killer(ckpt_mod._fsync_dir)
            ckpt_mod.os.rename, ckpt_mod.os.replace = killer(os.rename), killer(os.replace)
            save_checkpoint(root, {"step": 2, "w": torch.zeros(3)}, {"phase": 0, "step": 2})
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_crash_at_any_point_of_a_commit_leaves_a_valid_checkpoint(tmp_path):
    """After a kill at every step of a commit, a valid checkpoint loads (1 before the pointer moved,
    2 after), and the next save removes every leftover and keeps the last 2."""
    k, seen = 0, set()
    while True:
        k += 1
        root = tmp_path / f"kill{k}"
        if _commit_killed_at(root, k) == 0:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # LATEST always names a complete checkpoint: no fall-back needed
            state, where = load_checkpoint(root)
        assert state["step"] in (1, 2) and where.name == f"{state['step']:06d}", k
        seen.add(state["step"])
        save_checkpoint(root, {"step": 3}, {"phase": 0, "step": 3})
        assert sorted(p.name for p in root.iterdir()) == [where.name, f"{int(where.name) + 1:06d}", "LATEST"], k
        assert load_checkpoint(root)[0]["step"] == 3
    assert k > 6 and seen == {1, 2}  # every step of the protocol was hit, both sides of the commit


def test_disk_full_during_a_checkpoint_is_a_clear_error_and_the_previous_one_resumes(workspace, tmp_path, capsys,
                                                                                    monkeypatch, full_run):
    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, run, **OVER).to_dict()))
    real = ckpt_mod._write_bytes
    calls = []

    def full_disk(p, data):
        calls.append(p)
        if len(calls) > 3 and Path(p).name == "state.pt":  # the second checkpoint's state.pt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(p, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full_disk)
    assert main(["train", "--config", str(path)]) == EXIT_IO
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(run / "checkpoints" / "000002") in err
    assert "previous checkpoint is intact" in err and "update 1" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["000001", "LATEST"]
    monkeypatch.setattr(ckpt_mod, "_write_bytes", real)  # space freed
    assert main(["train", "--resume", "--output-dir", str(run)]) == 0
    _assert_same_as(full_run, run)


def test_disk_full_writing_config_leaves_a_reusable_directory(workspace, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, run, distill_steps=1).to_dict()))
    real = ckpt_mod._write_bytes

    def full_disk(p, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full_disk)
    assert main(["train", "--config", str(path)]) == EXIT_IO
    assert str(run / "config.json") in capsys.readouterr().err
    assert not (run / "config.json").exists()  # never an empty config.json
    monkeypatch.setattr(ckpt_mod, "_write_bytes", real)
    assert main(["train", "--config", str(path)]) == 0  # the same command works once there is space


def test_checkpoint_tensor_of_the_wrong_shape_is_a_clear_error(workspace, tmp_path):
    run = tmp_path / "run"
    root = _interrupted(workspace, run, at=1)
    state, _ = load_checkpoint(root)
    name = next(n for n in state["lora"] if "lora_A" in n)
    state["lora"][name] = torch.zeros(3, 5)
    save_checkpoint(root, state, {"phase": 0, "step": 1})
    with pytest.raises(CheckpointError, match=r"has shape \(3, 5\), the model's is"):
        Trainer(tiny_config(workspace, run, **OVER), resume=True).run()


# ---- run directories --------------------------------------------------------------------------


def test_a_directory_with_a_config_but_no_checkpoint_resumes_from_update_0(workspace, tmp_path, full_run):
    """A run killed before its first checkpoint leaves config.json (and maybe metrics): --resume
    starts from update 0 and equals the uninterrupted run; a fresh run there is refused."""
    run = tmp_path / "run"
    Trainer(tiny_config(workspace, run, **OVER)).close()  # built (config.json written), never ran
    (run / "metrics.jsonl").write_text('{"event": "eval", "phase": 0, "step": 0}\n')  # a killed run's record
    with pytest.raises(ValueError, match="not empty: pass --resume"):
        Trainer(tiny_config(workspace, run, **OVER))
    assert Trainer(tiny_config(workspace, run, **OVER), resume=True).run().status == "finished"
    _assert_same_as(full_run, run)


def test_a_second_run_into_a_directory_in_use_is_refused(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    first = Trainer(tiny_config(workspace, run, distill_steps=1))
    with pytest.raises(RunBusyError, match=rf"{run}.* in use by another run \(pid {os.getpid()}"):
        Trainer(tiny_config(workspace, run, distill_steps=1), resume=True)
    assert main(["train", "--resume", "--output-dir", str(run)]) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert first.run().status == "finished"  # the lock is released when the run ends
    assert Trainer(tiny_config(workspace, run, distill_steps=1), resume=True).run().status == "finished"


def test_resume_whatever_the_path_spelling_or_after_a_move(workspace, tmp_path, monkeypatch, full_run):
    run = tmp_path / "run"
    _interrupted(workspace, run, at=1)
    monkeypatch.chdir(tmp_path)
    res = Trainer(tiny_config(workspace, Path("./run"), **OVER), resume=True, callbacks=[_signal_at(2)]).run()
    assert res.status == "interrupted"
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    os.replace(run, moved)
    assert main(["train", "--resume", "--output-dir", "elsewhere/moved"]) == 0
    _assert_same_as(full_run, moved)


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(workspace, tmp_path, full_run):
    run = tmp_path / "run"
    _interrupted(workspace, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "update", "phase": 0, "st')  # a write cut short by a kill
    with pytest.warns(RuntimeWarning, match="partial last line"):
        Trainer(tiny_config(workspace, run, **OVER), resume=True).run()
    _assert_same_as(full_run, run)


# ---- divergence --------------------------------------------------------------------------------


def test_non_finite_training_stops_with_exit_3_keeping_the_last_good_checkpoint(workspace, tmp_path, capsys):
    """learning rate 1e5: the student's velocities overflow at update 3; exit 3 (not the bad-input 2)
    with a message naming update, task and step, the checkpoint of update 2 stays committed."""
    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, run, distill_steps=6, checkpoint_every=1,
                                           learning_rate=1e5).to_dict()))
    assert main(["train", "--config", str(path)]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged: non-finite" in err and "task " in err and "step " in err and "Traceback" not in err
    update = int(err.split("update ")[1].split(",")[0])
    state, where = load_checkpoint(run / "checkpoints")
    assert state["step"] == update - 1 >= 1
    assert f"last good checkpoint is kept: {where}" in err
    assert not (run / "student").exists()
    with pytest.raises(DivergedError) as info:  # the Python API chains the engine's NonFiniteError
        Trainer(tiny_config(workspace, run, distill_steps=6, checkpoint_every=1, learning_rate=1e5), resume=True).run()
    assert type(info.value.__cause__).__name__ == "NonFiniteError"


def test_heldout_kl_guard_stops_a_diverging_run(workspace, tmp_path):
    """learning rate 1e3 keeps the numbers finite while the held-out KL grows five-fold after one
    update: with max_heldout_kl_ratio = 2 the run stops; at the default rate the guard stays quiet."""
    over = dict(distill_steps=2, eval_every=1, heldout_prompt_files=[workspace["heldout"]], max_heldout_kl_ratio=2.0)
    with pytest.raises(DivergedError, match="exceeds max_heldout_kl_ratio = 2 times"):
        Trainer(tiny_config(workspace, tmp_path / "bad", learning_rate=1e3, **over)).run()
    evals = [r["heldout_kl/mean"] for r in read_metrics(tmp_path / "bad") if r["event"] == "eval"]
    assert len(evals) == 2 and evals[1] > 2 * evals[0]
    assert Trainer(tiny_config(workspace, tmp_path / "ok", **over)).run().status == "finished"


# ---- command line ------------------------------------------------------------------------------


def test_ctrl_c_checkpoints_and_exits_130_with_a_resume_hint(workspace, tmp_path, capsys, monkeypatch, full_run):
    import scale.train as train_mod

    run = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, run, **OVER).to_dict()))
    real_init = train_mod.Trainer.__init__

    def init_with_ctrl_c(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.callbacks.append(_signal_at(2, signal.SIGINT))

    monkeypatch.setattr(train_mod.Trainer, "__init__", init_with_ctrl_c)
    assert main(["train", "--config", str(path)]) == EXIT_SIGINT
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(run / "checkpoints")[0]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(train_mod.Trainer, "__init__", real_init)
    assert main(["train", "--resume", "--output-dir", str(run)]) == 0
    _assert_same_as(full_run, run)


@pytest.mark.parametrize("argv,match", [
    (["--learning-rate", "1e-2", "--set", "learning_rate=1e30"], "learning_rate' given twice"),
    (["--set", "seed=1", "--set", "seed=2"], "seed' given twice"),
])
def test_a_key_given_twice_is_an_error(workspace, tmp_path, capsys, argv, match):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_config(workspace, tmp_path / "run").to_dict()))
    assert main(["train", "--config", str(path), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["train", "--learning-rat", "1"], ["train", "--resum"], ["train", "--seed", "1", "--seed", "2"],
                                  ["sample", "--mod", "x", "--out", "y.png"]])
def test_abbreviated_or_repeated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
