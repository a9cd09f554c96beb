"""Atomic, exactly-resumable training checkpoints and SIGTERM handling for ``opd-scale train``.

A checkpoint directory holds ``state.pt`` (trainable LoRA tensors by parameter name, optimizer state,
update counter and stage, RNG states of torch / python / numpy / named ``torch.Generator`` objects)
and ``meta.json``. It is written to a temporary sibling directory first and moved into place with
``os.replace``, so a crash mid-write never leaves a half checkpoint behind: the previous one stays.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

__all__ = [
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "atomic_write_dir",
    "StopSignal",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """Snapshot every random number generator the trainer uses.

    Args:
        generators: named ``torch.Generator`` objects owned by the trainer.

    Returns:
        dict with the global torch (and CUDA, when available), python and numpy states and one entry
        per named generator.
    """
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng_state`; every named generator must be present in ``state``.

    Raises:
        ValueError: a generator named in ``generators`` is missing from the checkpoint.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"checkpoint has no state for generator {name!r} (has {sorted(saved)})")
        gen.set_state(saved[name])


class atomic_write_dir:
    """Context manager: yields a fresh temporary directory next to ``target``; on success it replaces
    ``target`` (``os.replace`` after moving any old one aside), on error it is deleted.

    Example::

        with atomic_write_dir(run / "checkpoint") as tmp:
            torch.save(state, tmp / "state.pt")
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_checkpoint(directory: str | Path, state: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write ``state`` (anything ``torch.save`` takes) and a small JSON ``meta`` to ``directory``.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    with atomic_write_dir(directory) as tmp:
        torch.save(dict(state), tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(dict(meta or {}), indent=2, sort_keys=True) + "\n")
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete checkpoint."""
    directory = Path(directory)
    return (directory / STATE_FILE).is_file() and (directory / META_FILE).is_file()


def load_checkpoint(directory: str | Path) -> Dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote (on CPU).

    Raises:
        FileNotFoundError: no complete checkpoint in ``directory``.
    """
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r} (expected {STATE_FILE} and {META_FILE})")
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


class StopSignal:
    """Turns SIGTERM (and SIGINT when ``catch_int``) into a flag the training loop polls between
    updates, so the loop can write a checkpoint and exit cleanly. Restores the old handlers on exit.

    Only installable from the main thread; elsewhere it is a no-op flag.
    """

    def __init__(self, catch_int: bool = False):
        self.signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_int else [])
        self.requested: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = signum

    def __enter__(self) -> "StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False
