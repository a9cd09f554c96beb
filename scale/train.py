r"""The two-stage DiffusionOPD recipe on SD3 / SD3.5, trained by the one engine of ``opd_ref``.

Stage 1 (optional, ``stage1_steps > 0``): one teacher LoRA per task without a teacher file, trained
with Flow-GRPO on the task's reward (:func:`opd_ref.engine.grpo_update`: group-normalised
advantages, the clipped ratio, plus :math:`\beta` times the per-step KL to the reference), or
with ``teacher_algorithm`` = ``grpo_guard`` (GRPO-Guard's normalised ratio) or ``nft``
(DiffusionNFT on the forward process, :func:`opd_ref.engine.nft_update`), D18.

Stage 2: the student LoRA is distilled from all teachers on its own rollouts
(:func:`opd_ref.engine.distill_update`): per trained step :math:`n \in \mathcal T` of a stored
trajectory, student and teacher kernels at the same state, one round-robin cycle over the :math:`K`
tasks per update,

.. math::
    \mathcal L(\theta) = \frac1K\sum_{k=1}^K \mathbb E_{c\sim\mathcal C_k,\ x\sim\pi_\theta}
        \sum_{n\in\mathcal T} \ell_n\big(\pi_\theta(\cdot|x_n, c), \pi_{T_k}(\cdot|x_n, c)\big)

with :math:`\ell` the config's ``loss`` (an engine method: ``opd_kl``, ``opd_ode``, ``ppo_opd``, ``k1``,
``vopd``), or ``loss = "crd"``: the student on the task rewards (:func:`opd_ref.engine.crd_update`).
Each trained step is back-propagated on its own while its adapter is active; gradients are summed
over processes once per update.

This module is the loop; the rooms around it: :mod:`scale.setup` (validate, load, build),
:mod:`scale.updates` (the engine's inputs of one update), :mod:`scale.io` (run directory),
:mod:`scale.policy` (the model as an engine policy).

Reference: ``diffusionopd`` (two-stage recipe, multi-task OPD), ``flowgrpo`` (GRPO, SDE sampler).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from opd_ref.engine import (AdvantageSpec, NonFiniteError, crd_update, distill_update, grpo_update, nft_update,
                            path_divergence)
from scale import io
from scale.checkpoint import StopSignal, describe, list_checkpoints
from scale.config import ScaleConfig
from scale.ema import LoraEMA
from scale.eval import append_eval, evaluate, truncate_eval
from scale.setup import STUDENT, build_setup
from scale.trackers import Trackers
from scale.updates import ImageReward, distill_tasks, heldout_tasks, reward_groups

__all__ = ["STUDENT", "Trainer", "TrainResult", "DivergedError", "train"]


class DivergedError(RuntimeError):
    """The run diverged: a non-finite loss, gradient or velocity (:class:`opd_ref.engine.NonFiniteError`,
    chained as ``__cause__``), or the held-out KL grew past ``max_heldout_kl_ratio``.  Nothing of the
    diverged state is saved; the message names where and the last good checkpoint, which stays committed."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns."""

    run_dir: Path
    status: str  # "finished" or "interrupted"
    phase: int
    step: int
    last_metrics: Dict[str, float] = field(default_factory=dict)
    signal: Optional[int] = None  # the signal that interrupted the run (SIGTERM, SIGINT)


class Trainer:
    """One ``opd-scale train`` run: :func:`scale.setup.build_setup`, then :meth:`run`.

    Args:
        config: the run's :class:`~scale.config.ScaleConfig`.
        resume: continue the run in ``config.output_dir`` from its checkpoint.
        accelerator: an ``accelerate.Accelerator`` (default: ``Accelerator(cpu=True)`` without CUDA).
        callbacks: ``f(trainer, phase_name, step)`` after each update (tests send SIGTERM from one).
        step_hook: passed to :func:`opd_ref.engine.distill_update` as ``on_step`` (stage 2).
    """

    def __init__(self, config: ScaleConfig, *, resume: bool = False, accelerator: Any = None,
                 callbacks: Sequence[Callable] = (), step_hook: Optional[Callable[[Dict[str, Any]], None]] = None):
        self.setup = build_setup(config, resume, accelerator)
        self.cfg = self.setup.cfg
        self.resume, self.callbacks, self.step_hook = resume, list(callbacks), step_hook
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.guard: Dict[str, float] = {}  # divergence guard state (the held-out KL before stage 2), checkpointed
        self.ema: Optional[LoraEMA] = None  # EMA of the student LoRA (ema_decay > 0), checkpointed
        if self.cfg.ema_decay > 0:
            self.ema = LoraEMA({n: p for n, p in self.setup.transformer.named_parameters()
                                if "lora_" in n and f".{STUDENT}." in n}, self.cfg.ema_decay)
        self.trackers: Optional[Trackers] = None

    def ema_weights(self):
        """Context in which the student adapter holds its EMA weights (no-op without EMA)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def global_step(self, phase: int, step: int) -> int:
        """Updates done over all phases before ``phase``, plus ``step`` (the trackers' x axis)."""
        done = sum(self.cfg.stage1_steps if kind == "grpo" else self.cfg.distill_steps
                   for kind, _ in self.setup.phases[:phase])
        return done + step

    def _log(self, record: Dict[str, Any], prefix: str) -> None:
        io.log(self.setup, record)
        if self.trackers is not None:
            self.trackers.log(prefix, record, self.global_step(record["phase"], record["step"]))

    def make_optimizer(self, adapter: str) -> torch.optim.Optimizer:
        """AdamW over ``adapter``'s LoRA parameters (multi-tensor ``foreach`` kernels also on CPU)."""
        cfg = self.cfg
        return torch.optim.AdamW(self.setup.policy.trainable_parameters(adapter), lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                 eps=cfg.adam_eps, foreach=True)

    # ---- one update of each kind (the engine does the work) ------------------------------------
    def distill_update(self, phase: int, update: int) -> Dict[str, float]:
        """Stage 2: one round-robin cycle over the tasks, one optimizer step."""
        s = self.setup
        return distill_update(s.policy, STUDENT, distill_tasks(s, phase, update), s.spec, self.optimizer,
                              collective=s.collective, on_step=self.step_hook)

    def grpo_update(self, phase: int, k: int, update: int) -> Dict[str, float]:
        """Stage 1: ``batch_size`` prompts x ``group_size`` rollouts of task ``k``'s teacher, ``ppo_epochs`` steps
        of ``teacher_algorithm`` (Flow-GRPO, GRPO-Guard, or DiffusionNFT through :func:`opd_ref.engine.nft_update`)."""
        s, task = self.setup, self.setup.tasks[k]
        if self.cfg.teacher_algorithm == "nft":
            return nft_update(s.policy, task.adapter, reward_groups(s, phase, k, update), ImageReward(s.pipe, task.reward),
                              s.grpo_spec, self.optimizer, epochs=self.cfg.ppo_epochs, collective=s.collective)
        return grpo_update(s.policy, task.adapter, reward_groups(s, phase, k, update), ImageReward(s.pipe, task.reward),
                           s.grpo_spec, self.optimizer, epochs=self.cfg.ppo_epochs,
                           advantages=AdvantageSpec(ddof=0, eps=self.cfg.adv_eps, clip=self.cfg.adv_clip or None),
                           collective=s.collective)

    def crd_update(self, phase: int, update: int) -> Dict[str, float]:
        """CRD: the student on the task rewards, round robin over the tasks, one optimizer step."""
        s = self.setup
        tasks = [(reward_groups(s, phase, k, update), ImageReward(s.pipe, t.reward)) for k, t in enumerate(s.tasks)]
        return crd_update(s.policy, STUDENT, tasks, s.spec, self.optimizer, names=[t.name for t in s.tasks],
                          collective=s.collective)

    @torch.no_grad()
    def heldout_divergence(self) -> Dict[str, float]:
        """Per task, the student-teacher path KL (ODE: matching loss) summed over the stochastic steps
        of fixed-noise student rollouts on the held-out prompts, averaged over prompts (chain rule D3)."""
        s = self.setup
        if not any(s.heldout) or self.cfg.loss == "crd":
            return {}
        name = "heldout_match" if self.cfg.kernel == "ode" else "heldout_kl"
        div = path_divergence(s.policy, STUDENT, heldout_tasks(s), s.sigmas, s.spec.kernel, collective=s.collective)
        out = {f"{name}/{task}": value for task, value in div.items()}
        out[f"{name}/mean"] = sum(div.values()) / len(s.tasks)
        return out

    def phase_name(self, phase: int) -> str:
        if phase >= len(self.setup.phases):
            return "done"
        kind, k = self.setup.phases[phase]
        return f"grpo/{self.setup.tasks[k].name}" if kind == "grpo" else "distill"

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.setup.device)
        if self.setup.world > 1:
            flag = self.setup.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _eval(self, phase: int, step: int) -> None:
        if not any(self.setup.heldout):
            return
        try:
            div = self.heldout_divergence()
        except NonFiniteError as err:
            raise DivergedError(f"{err.at(update=step, phase=self.phase_name(phase))} (held-out evaluation after "
                                f"update {step}). {self._last_good()}") from err
        self._log({"phase": phase, "step": step, "event": "eval", **div}, "heldout")
        self._full_eval(phase, step, div)
        mean = next((v for k, v in div.items() if k.endswith("/mean")), None)
        if mean is None:
            return
        if step == 0:
            self.guard["heldout_start"] = mean
        ratio, start = self.cfg.max_heldout_kl_ratio, self.guard.get("heldout_start")
        if ratio and start is not None and mean > ratio * start:
            raise DivergedError(f"held-out divergence {mean:.6g} at update {step} exceeds max_heldout_kl_ratio = "
                                f"{ratio:g} times its value before stage 2 ({start:.6g}): the run is diverging "
                                f"(lower the learning rate). {self._last_good()}")

    def _full_eval(self, phase: int, step: int, div: Dict[str, float]) -> None:
        """Rewards of ``eval_steps``-step ODE samples, the held-out path KL and grids (EMA weights when
        on) appended to ``RUN/eval.jsonl`` (:func:`scale.eval.evaluate`)."""
        s = self.setup
        grid_dir = s.run_dir / "eval" / f"step_{step:06d}"
        try:
            with self.ema_weights():
                res = evaluate(s, STUDENT, grid_dir=grid_dir, kl=self.ema is not None)
        except NonFiniteError as err:
            raise DivergedError(f"{err.at(update=step, phase=self.phase_name(phase))} (evaluation after update "
                                f"{step}). {self._last_good()}") from err
        if self.ema is None:  # the student's own weights: the held-out KL just measured
            res.update({key.replace("heldout_", "", 1): v for key, v in div.items()})
        record = {"phase": phase, "step": step, "weights": "ema" if self.ema is not None else "student",
                  "eval_steps": self.cfg.eval_steps, **res}
        append_eval(s, record)
        if self.trackers is not None:
            self.trackers.log("eval", record, self.global_step(phase, step))

    def _last_good(self) -> str:
        found = list_checkpoints(self.setup.run_dir / io.CHECKPOINTS)
        pointer = self.setup.run_dir / io.CHECKPOINTS / "LATEST"
        name = pointer.read_text().strip() if pointer.is_file() else None
        good = next((p for p in found if p.name == name), None)
        if good is None:
            return "No checkpoint was written before (a --resume starts from update 0)."
        return f"The last good checkpoint is kept: {describe(good)}."

    def close(self) -> None:
        """Release the run directory's lock (done by :meth:`run` when it returns or raises)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.setup.lock is not None:
            self.setup.lock.release()

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Run (or continue) every phase; checkpoint every ``checkpoint_every`` updates, at each phase
        end and on SIGTERM / Ctrl-C (then return with ``status="interrupted"``).

        Raises:
            DivergedError: a non-finite loss / gradient / velocity or a held-out KL past the guard;
                the last good checkpoint stays the committed one.
        """
        try:
            with StopSignal(catch_int=True) as stop:
                return self._run(stop)
        finally:
            self.close()

    def _run(self, stop: StopSignal) -> TrainResult:
        from tqdm.auto import tqdm

        s, cfg = self.setup, self.cfg
        phase, step, opt_state, extra = io.load_state(s) if self.resume else (0, 0, None, {})
        self.guard = dict(extra.get("guard", {}))
        if self.resume:
            truncate_eval(s, phase, step)
            if self.ema is not None and "ema" in extra:
                self.ema.load_state_dict(extra["ema"])
        self.trackers = Trackers(cfg.report_to, s.run_dir, cfg.to_dict(), s.is_main)
        last: Dict[str, float] = {}

        def checkpoint(phase: int, step: int, name: str, optimizer) -> None:
            state = {"guard": self.guard}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            io.save_state(s, phase, step, name, optimizer, state)

        while phase < len(s.phases):
            kind, k = s.phases[phase]
            adapter = STUDENT if kind == "distill" else s.tasks[k].adapter
            self.optimizer = self.make_optimizer(adapter)
            if opt_state is not None:
                self.optimizer.load_state_dict(opt_state)
                opt_state = None
            total = cfg.stage1_steps if kind == "grpo" else cfg.distill_steps
            name = self.phase_name(phase)
            bar = tqdm(total=total, initial=step, desc=name, disable=not s.is_main, dynamic_ncols=True)
            try:
                if kind == "distill" and step == 0:
                    self._eval(phase, 0)
                while step < total:
                    t0 = time.perf_counter()
                    try:
                        if kind == "grpo":
                            stats = self.grpo_update(phase, k, step)
                        elif cfg.loss == "crd":
                            stats = self.crd_update(phase, step)
                        else:
                            stats = self.distill_update(phase, step)
                    except NonFiniteError as err:
                        err = err.at(update=step + 1, task=None if k < 0 else k, phase=name)
                        raise DivergedError(f"{err}. {self._last_good()}") from err
                    if kind == "distill" and self.ema is not None:
                        self.ema.update()
                    step += 1
                    stats["time_s"] = time.perf_counter() - t0
                    last = stats
                    self._log({"phase": phase, "phase_name": name, "step": step, "event": "update", **stats}, name)
                    bar.update(1)
                    bar.set_postfix({key: f"{val:.4g}" for key, val in stats.items() if key in ("loss", "reward", "grad_norm")})
                    if kind == "distill" and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                        self._eval(phase, step)
                    if kind == "distill" and cfg.sample_every and step % cfg.sample_every == 0 and s.is_main:
                        with self.ema_weights():
                            io.sample_grid(s, s.run_dir / "samples" / f"step_{step:06d}.png")
                    for cb in self.callbacks:
                        cb(self, name, step)
                    if self._stop_requested(stop):
                        checkpoint(phase, step, name, self.optimizer)
                        return TrainResult(s.run_dir, "interrupted", phase, step, last, stop.requested)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                        checkpoint(phase, step, name, self.optimizer)
                if kind == "grpo":  # phase end: save what it trained
                    io.save_adapter(s, adapter, s.run_dir / "teachers" / s.tasks[k].name)
                else:
                    self._eval(phase, step)
                    with self.ema_weights():
                        if s.is_main:
                            io.sample_grid(s, s.run_dir / "samples" / "final.png")
                        if self.ema is not None:
                            io.save_adapter(s, STUDENT, s.run_dir / "student_ema")
                    io.save_adapter(s, STUDENT, s.run_dir / "student")
            finally:
                bar.close()
            phase, step, self.optimizer = phase + 1, 0, None
            checkpoint(phase, step, self.phase_name(phase), None)
            if phase < len(s.phases) and self._stop_requested(stop):
                return TrainResult(s.run_dir, "interrupted", phase, step, last, stop.requested)
        return TrainResult(s.run_dir, "finished", phase, step, last)


def train(config: ScaleConfig, *, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Validate, build and run a :class:`Trainer` (see there for ``kwargs``)."""
    return Trainer(config, resume=resume, **kwargs).run()
