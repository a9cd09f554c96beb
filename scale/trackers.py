r"""Trackers next to ``metrics.jsonl``: TensorBoard or Weights & Biases through accelerate's tracker
classes (``report_to = tensorboard | wandb | none``), on the main process only.

Every numeric value of a ``metrics.jsonl`` / ``eval.jsonl`` record is logged as a scalar under
``PHASE/KEY`` (e.g. ``distill/loss``, ``grpo/geneval/clip_frac``, ``eval/reward/geneval``) at the
run's global update count :math:`g = \sum_{p' < p} U_{p'} + u` (phase :math:`p`, update :math:`u`,
:math:`U_{p'}` updates per earlier phase). TensorBoard writes ``RUN/tensorboard/opd/events.out.tfevents.*``;
wandb follows its own settings (``WANDB_MODE=offline`` for no network).

Reference: ``flowgrpo`` (wandb), diffusers' training scripts (``--report_to``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["Trackers", "check_available"]


def check_available(report_to: str) -> None:
    """Raise ``ValueError`` naming the package when ``report_to``'s tracker is not installed."""
    import importlib.util

    if report_to not in ("none", "tensorboard", "wandb"):
        raise ValueError(f"report_to must be none, tensorboard or wandb, got {report_to!r}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if module is not None and importlib.util.find_spec(module) is None:
        extra = ' (pip install "opd-ref[track]")' if module == "tensorboard" else ""
        raise ValueError(f"report_to {report_to!r} needs the {module!r} package: pip install {module}{extra}")


class Trackers:
    """The run's trackers (none, tensorboard or wandb).

    Args:
        report_to: ``"none"``, ``"tensorboard"`` or ``"wandb"``.
        run_dir: the run directory (TensorBoard logs under ``run_dir / "tensorboard"``).
        config: the run's config dict (stored as hyper-parameters).
        is_main: only the main process logs.

    Raises:
        ValueError: an unknown ``report_to``, or its package is not installed (named).
    """

    def __init__(self, report_to: str, run_dir: Path, config: Dict[str, Any], is_main: bool = True):
        self.tracker = None
        check_available(report_to)
        if report_to == "none" or not is_main:
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        if report_to == "tensorboard":
            tracker = TensorBoardTracker("opd", str(Path(run_dir) / "tensorboard"))
        else:
            tracker = WandBTracker("opd-scale", dir=str(run_dir))
        if hasattr(tracker, "start"):  # accelerate >= 1.4 starts trackers explicitly
            tracker.start()
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        try:
            tracker.store_init_configuration(flat)
        except Exception as err:  # noqa: BLE001 - hyper-parameters are a convenience, never a reason to stop a run
            warnings.warn(f"{report_to}: the config was not stored as hyper-parameters ({err})", RuntimeWarning,
                          stacklevel=2)
        self.tracker = tracker

    def log(self, prefix: str, record: Dict[str, Any], step: int) -> None:
        """Log every finite numeric value of ``record`` as ``prefix/KEY`` at global ``step``."""
        if self.tracker is None:
            return
        values = {f"{prefix}/{k}": float(v) for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("phase", "step")
                  and math.isfinite(float(v))}
        if values:
            self.tracker.log(values, step=int(step))
            writer = getattr(self.tracker, "writer", None)
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
