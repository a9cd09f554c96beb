"""Verified, crash-safe checkpoints, the run-directory lock and SIGTERM / Ctrl-C handling for ``opd-scale train``.

Layout of ``RUN/checkpoints/``::

    LATEST            the name of the committed checkpoint (one line; replaced atomically)
    000007/           a numbered checkpoint: state.pt, meta.json, manifest.json
    000006/           the previous one (the last ``keep`` are kept)
    corrupt-000005/   a checkpoint that failed verification on resume, moved aside for inspection

``state.pt`` holds the trainable LoRA tensors by parameter name, the optimizer state, the position
and the RNG states of torch / python / numpy / named ``torch.Generator`` objects; ``meta.json`` the
position in words; ``manifest.json`` the size and sha256 of both.

Commit protocol (:func:`save_checkpoint`): write and fsync the files in a temporary ``.tmp-*``
folder, rename it to the next number, then replace ``LATEST`` atomically (write, fsync,
``os.replace``), and only then delete checkpoints older than the last ``keep``.  At every instant
``LATEST`` names a complete checkpoint (or there is none yet): a crash before the pointer moves
leaves the previous one committed, and the leftovers (``.tmp-*``, an uncommitted newer number) are
removed by the next save or load.  :func:`load_checkpoint` verifies the manifest; when the latest
checkpoint fails, it warns (naming the file and why), moves it aside and falls back to the newest
valid older one; when none is valid it raises :class:`CheckpointError` naming the files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "RunDirError",
    "RunBusyError",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "verify_checkpoint",
    "has_checkpoint",
    "write_file_atomic",
    "RunLock",
    "StopSignal",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "LATEST"
TMP_PREFIX = ".tmp-"
_NUMBERED = re.compile(r"^\d{6}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing file, wrong size or checksum, unreadable, wrong shape);
    the message names the file."""


class RunDirError(OSError):
    """Writing the run directory failed (disk full, permissions); the message names the path and says
    what is still intact."""


class RunBusyError(RuntimeError):
    """Another process holds the run directory's lock."""


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_file_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``
    (a temporary sibling, fsync, ``os.replace``).

    Raises:
        RunDirError: the write failed (e.g. disk full); the message names ``path``; ``path`` is unchanged.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        _write_bytes(Path(tmp), data)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise RunDirError(err.errno, f"could not write {str(path)!r}: {err.strerror or err} "
                          "(the file is unchanged)") from err
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pointer(root: Path) -> Optional[str]:
    """The name in ``LATEST`` if it is a well-formed checkpoint name, else ``None``."""
    try:
        name = (root / POINTER_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _NUMBERED.match(name) else None


def list_checkpoints(root: str | Path) -> List[Path]:
    """The numbered checkpoint folders under ``root``, newest first (committed or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NUMBERED.match(p.name)), key=lambda p: p.name,
                  reverse=True)


def has_checkpoint(root: str | Path) -> bool:
    """Whether ``root`` holds any checkpoint (a pointer or a numbered folder), valid or not."""
    root = Path(root)
    return (root / POINTER_FILE).exists() or bool(list_checkpoints(root))


def _clean_stale(root: Path) -> None:
    """Remove ``.tmp-*`` leftovers and numbered folders newer than the committed one (never committed)."""
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    committed = _pointer(root)
    if committed is not None and (root / committed).is_dir():
        for p in list_checkpoints(root):
            if p.name > committed:
                shutil.rmtree(p, ignore_errors=True)


def describe(directory: Path) -> str:
    """``'RUN/checkpoints/000007 (phase 0 distill, update 12)'`` from its meta.json (best effort)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return f"{directory} (phase {meta['phase']} {meta.get('phase_name', '')}, update {meta['step']})"
    except (OSError, ValueError, KeyError):
        return str(directory)


def save_checkpoint(root: str | Path, state: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None,
                    keep: int = 2) -> Path:
    """Commit ``state`` (anything ``torch.save`` takes) and a small JSON ``meta`` as the next numbered
    checkpoint under ``root`` (protocol in the module docstring); keep the last ``keep``.

    Returns:
        the new checkpoint folder.

    Raises:
        RunDirError: a write failed (e.g. disk full): the message names the folder; the previous
            checkpoint stays committed and nothing of the new one is left.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    previous = _pointer(root)
    existing = list_checkpoints(root)
    name = f"{int(existing[0].name) + 1 if existing else 1:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=root))
    final = root / name
    try:
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        _write_bytes(tmp / STATE_FILE, buf.getvalue())
        _write_bytes(tmp / META_FILE, (json.dumps(dict(meta or {}), indent=2, sort_keys=True) + "\n").encode())
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in (STATE_FILE, META_FILE)}
        _write_bytes(tmp / MANIFEST_FILE, (json.dumps({"format": 1, "files": files}, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_file_atomic(root / POINTER_FILE, name + "\n")
        _fsync_dir(root)
    except BaseException as err:  # also KeyboardInterrupt: never leave a half checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and _pointer(root) != name:
            shutil.rmtree(final, ignore_errors=True)
        if isinstance(err, OSError):
            kept = describe(root / previous) if previous else "none (no checkpoint was committed before)"
            raise RunDirError(err.errno, f"could not write checkpoint {str(final)!r}: {err.strerror or err}. "
                              f"The previous checkpoint is intact: {kept}; free space and continue with "
                              "--resume") from err
        raise
    for old in [p for p in list_checkpoints(root) if p.name <= name][keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(directory: str | Path) -> Dict[str, Any]:
    """Check every file of a checkpoint against its manifest (size and sha256).

    Returns:
        its ``meta.json``.

    Raises:
        CheckpointError: naming the file that is missing, truncated or fails its checksum.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(manifest_path)!r} is missing (an incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint file {str(manifest_path)!r} is unreadable: {err}") from None
    for fname in (STATE_FILE, META_FILE):
        path = directory / fname
        if fname not in files:
            raise CheckpointError(f"checkpoint manifest {str(manifest_path)!r} does not list {fname}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
        size = path.stat().st_size
        if size != files[fname]["bytes"]:
            raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or padded: {size} bytes, "
                                  f"expected {files[fname]['bytes']}")
        if _sha256(path) != files[fname]["sha256"]:
            raise CheckpointError(f"checkpoint file {str(path)!r} fails its sha256 checksum (corrupted)")
    return json.loads((directory / META_FILE).read_text())


def _load_verified(directory: Path) -> Dict[str, Any]:
    verify_checkpoint(directory)
    try:
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a checksum-valid file torch cannot read (another torch?)
        raise CheckpointError(f"checkpoint file {str(directory / STATE_FILE)!r} cannot be loaded: {err}") from None


def load_checkpoint(root: str | Path) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """Load the committed checkpoint under ``root`` after verifying it; fall back (with a warning that
    names the failing file; the bad folder is moved to ``corrupt-NNNNNN``) to the newest valid older one.

    Returns:
        ``(state, folder)``, or ``(None, None)`` when ``root`` holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none is valid (the message names each failing file).
    """
    root = Path(root)
    if not has_checkpoint(root):
        return None, None
    _clean_stale(root)
    committed = _pointer(root)
    problems: List[str] = []
    if committed is None or not (root / committed).is_dir():
        problems.append(f"{str(root / POINTER_FILE)!r} is missing or does not name a checkpoint")
    candidates = [p for p in list_checkpoints(root) if committed is None or p.name <= committed]
    failed: List[Path] = []
    for directory in candidates:
        try:
            state = _load_verified(directory)
        except CheckpointError as err:
            problems.append(str(err))
            failed.append(directory)
            continue
        for bad in failed:  # moved aside only once a valid one takes over (else the error stays the same)
            shutil.rmtree(bad.with_name(f"corrupt-{bad.name}"), ignore_errors=True)
            os.replace(bad, bad.with_name(f"corrupt-{bad.name}"))
        if problems:
            write_file_atomic(root / POINTER_FILE, directory.name + "\n")
            warnings.warn("the latest checkpoint is not valid (" + "; ".join(problems) + "): falling back to "
                          f"{describe(directory)}; the bad one is kept as corrupt-NNNNNN", RuntimeWarning,
                          stacklevel=2)
        return state, directory
    raise CheckpointError(f"no valid checkpoint in {str(root)!r}: " + "; ".join(problems))


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/run.lock`` for as long as a run uses its directory.

    Raises (on :meth:`acquire`):
        RunBusyError: another process holds it (the message names the directory and its pid).
    """

    FILE = "run.lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.FILE
        self._fh = None

    def acquire(self) -> "RunLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunBusyError(f"output_dir {str(self.path.parent)!r} is in use by another run (pid {holder} "
                                   f"holds {self.FILE}): wait for it to end or choose another directory") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class StopSignal:
    """Turns SIGTERM (and SIGINT = Ctrl-C when ``catch_int``) into a flag the training loop polls
    between updates, so the loop can write a checkpoint and exit cleanly. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once (no checkpoint; the last committed one stays). Restores the old
    handlers on exit.

    Only installable from the main thread; elsewhere it is a no-op flag.
    """

    def __init__(self, catch_int: bool = False):
        self.signals = [signal.SIGTERM] + ([signal.SIGINT] if catch_int else [])
        self.requested: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
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
