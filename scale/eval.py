r"""Evaluation of a student on held-out prompts: rewards of ODE samples, path KL to each teacher, grids.

For each task :math:`k` with held-out prompts :math:`\mathcal C_k^{held}` (config
``heldout_prompt_files``):

.. math::
    \bar R_k = \frac{1}{|\mathcal C_k^{held}|}\sum_{c\in\mathcal C_k^{held}} R_k\big(\mathrm{ODE}_{N_{eval}}(x_0; c)\big),
    \qquad
    \mathrm{KL}_k = \mathbb E_{x\sim\pi_\theta}\sum_{n: s_n>0}\frac{\|c_v^{(n)}(v_\theta - v_{T_k})(x_n)\|^2}{2 s_n^2}

the reward of samples of the first-order (Euler) ODE sampler with ``eval_steps`` steps on the
scheduler's grid (40 by default, the papers' evaluation sampler) and the path KL of the training
process (its kernel and grid) to the task's teacher (:func:`opd_ref.engine.path_divergence`). The
noise is fixed per (task, chunk), so values at different updates are directly comparable (common
random numbers). Per task a grid of the first ``eval_grid_images`` held-out prompts.

During training (``eval_every``) every evaluation is appended to ``RUN/eval.jsonl`` (with the EMA
weights when ``ema_decay > 0``); ``opd-scale eval --run RUN`` evaluates a finished run's student.

Reference: ``diffusionopd`` (40-step ODE evaluation, held-out rewards), ``nft``, ``flowgrpo``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from opd_ref.engine import path_divergence
from scale.setup import STUDENT, Setup, derive_seed

__all__ = ["EVAL_FILE", "evaluate", "append_eval", "truncate_eval", "run_eval", "run_config"]

EVAL_FILE = "eval.jsonl"


def _task_reward(task: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The task's reward on decoded images (the one place the reward protocol is called here)."""
    r = torch.as_tensor(task.reward(images, list(prompts), getattr(prompts, "metadata", None)))
    r = r.reshape(-1).to(torch.float64)
    if r.shape != (len(prompts),) or not bool(torch.isfinite(r).all()):
        raise ValueError(f"reward of task {task.name!r} must return ({len(prompts)},) finite values, got "
                         f"shape {tuple(r.shape)}")
    return r


def _images(setup: Setup, prompts: Sequence[str], adapter: Optional[str], num_steps: int, seed: int) -> torch.Tensor:
    from scale.io import sample_images

    cfg = setup.cfg
    return sample_images(setup.pipe, setup.cache, prompts, adapter, num_steps=num_steps, resolution=cfg.resolution,
                         guidance_scale=cfg.guidance_scale, seed=seed, kernel="ode")


@torch.no_grad()
def evaluate(setup: Setup, adapter: str = STUDENT, *, num_steps: Optional[int] = None,
             grid_dir: Optional[Path] = None, kl: bool = True) -> Dict[str, float]:
    r"""Per task: the mean reward of ``num_steps``-step ODE samples on the held-out prompts (tasks
    with a reward), the held-out path KL to the task's teacher (tasks with a teacher) and a grid.

    .. math::
        \bar R_k = \tfrac{1}{|\mathcal C_k|}\textstyle\sum_c R_k(\mathrm{ODE}(x_0; c)),\qquad
        \mathrm{KL}_k = \mathbb E\sum_n \|c_v(v_\theta - v_{T_k})\|^2 / (2 s_n^2)

    Args:
        setup: the run's :class:`~scale.setup.Setup` (held-out prompts, teachers, rewards).
        adapter: the student's adapter (its weights as they are: swap EMA weights in first).
        num_steps: ODE steps (default ``setup.cfg.eval_steps``).
        grid_dir: write ``TASK.png`` grids here (main process; ``None`` or ``eval_grid_images = 0``: none).
        kl: measure the held-out path KL (the trainer passes ``False`` when it has just measured it).

    Returns:
        ``reward/TASK``, ``reward/mean``, ``kl/TASK`` (``match/TASK`` for the ODE kernel), ``kl/mean``.

    Raises:
        ValueError: no held-out prompts (config ``heldout_prompt_files``).

    Reference: ``diffusionopd``, ``nft``.
    """
    from scale.io import save_grid
    from scale.updates import _prompt_batch, heldout_tasks

    cfg = setup.cfg
    if not any(setup.heldout):
        raise ValueError("evaluation needs held-out prompts: set config heldout_prompt_files")
    steps = int(num_steps or cfg.eval_steps)
    mb, out = cfg.micro_batch_size, {}
    # rewards: this process's chunks of each task's held-out prompts
    sums: Dict[str, float] = {}
    for k, (task, prompts) in enumerate(zip(setup.tasks, setup.heldout)):
        if task.reward is None:
            continue
        chunks = [_prompt_batch(prompts, range(i, min(i + mb, len(prompts)))) for i in range(0, len(prompts), mb)]
        total = 0.0
        for c in range(setup.rank, len(chunks), setup.world):
            images = _images(setup, chunks[c], adapter, steps, derive_seed(cfg.seed, 3000, k, c))
            total += float(_task_reward(task, images, chunks[c]).sum())
        sums[f"reward/{task.name}"] = total / len(prompts)
    out.update(setup.collective.reduce(sums))
    if sums:
        out["reward/mean"] = sum(out[key] for key in sums) / len(sums)
    # path KL to each teacher on the training grid and kernel
    if kl and cfg.loss != "crd":  # every task has a teacher adapter (a LoRA file or stage 1's)
        name = "match" if setup.spec.kernel.kind == "ode" else "kl"
        div = path_divergence(setup.policy, adapter, heldout_tasks(setup), setup.sigmas, setup.spec.kernel,
                              collective=setup.collective)
        out.update({f"{name}/{task}": value for task, value in div.items()})
        out[f"{name}/mean"] = sum(div.values()) / len(div)
    if grid_dir is not None and cfg.eval_grid_images > 0 and setup.is_main:
        for k, (task, prompts) in enumerate(zip(setup.tasks, setup.heldout)):
            shown = prompts[: cfg.eval_grid_images]
            save_grid(_images(setup, shown, adapter, steps, derive_seed(cfg.seed, 3001, k)), Path(grid_dir) / f"{task.name}.png")
    return out


def append_eval(setup: Setup, record: Dict[str, Any]) -> None:
    """Append one record to ``RUN/eval.jsonl`` (main process)."""
    from scale.checkpoint import RunDirError

    if setup.is_main:
        path = setup.run_dir / EVAL_FILE
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as err:
            raise RunDirError(err.errno, f"could not append to {str(path)!r}: {err.strerror or err}") from err


def truncate_eval(setup: Setup, phase: int, step: int) -> None:
    """On resume: drop the ``eval.jsonl`` records written after the checkpoint at ``(phase, step)``
    (an evaluation at update 0 of a phase is redone; a partial last line is dropped with a warning)."""
    from scale.checkpoint import write_file_atomic

    path = setup.run_dir / EVAL_FILE
    if not setup.is_main or not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep: List[str] = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{str(path)!r}: dropping a partial last line", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{str(path)!r} line {i + 1} is not JSON: {line[:80]!r}") from None
        pos = (rec["phase"], rec["step"])
        if pos < (phase, step) or (pos == (phase, step) and step > 0):
            keep.append(line)
    write_file_atomic(path, "".join(line + "\n" for line in keep))


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()):
    """The :class:`~scale.config.ScaleConfig` of a run from ``RUN/config.json``, with ``--set`` overrides.

    Raises:
        FileNotFoundError: no ``config.json`` in ``run_dir``.
    """
    from scale.config import load_config

    return load_config(run_config_file(run_dir), overrides)


def run_config_file(run_dir: str | Path) -> Path:
    """``RUN/config.json`` of a training run (what ``sample --run`` and ``eval --run`` read).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.json`` (not a run directory).
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run {str(run_dir)!r}: {str(path)!r} does not exist (not a run directory)")
    return path


def _next_dir(root: Path) -> Path:
    n = 0
    while (root / f"eval_{n:03d}").exists():
        n += 1
    return root / f"eval_{n:03d}"


def run_eval(run_dir: str | Path, *, lora: Optional[str] = None, ema: bool = False, num_steps: Optional[int] = None,
             out_dir: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """``opd-scale eval --run RUN``: evaluate the run's student (``RUN/student``, ``RUN/student_ema``
    with ``ema``, or ``lora``) with :func:`evaluate` against the run's teachers (its teacher LoRA files,
    or the stage-1 teachers in ``RUN/teachers/``), on the run's held-out prompts and rewards.

    Writes ``OUT/config.json`` (the evaluation's config), ``OUT/eval.json`` and ``OUT/grids/TASK.png``;
    ``OUT`` defaults to ``RUN/evals/eval_NNN`` (the next free number).

    Returns:
        the evaluation dict (also in ``eval.json``) with ``lora`` and ``eval_steps``.
    """
    import dataclasses

    from scale.lora import load_lora
    from scale.setup import build_setup

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    student = Path(lora) if lora else run_dir / ("student_ema" if ema else "student")
    if not student.exists():
        raise FileNotFoundError(f"eval: student LoRA {str(student)!r} not found (a finished run writes "
                                f"student/{', and student_ema/ with ema_decay > 0' if ema else ''})")
    teachers = list(cfg.teacher_loras or [""] * len(cfg.tasks))
    if cfg.loss != "crd":
        for k, name in enumerate(cfg.tasks):
            if not teachers[k]:
                teachers[k] = str(run_dir / "teachers" / name)
    out = Path(out_dir) if out_dir else _next_dir(run_dir / "evals")
    cfg = dataclasses.replace(cfg, output_dir=str(out), teacher_loras=teachers, stage1_steps=0, distill_steps=0,
                              report_to="none", eval_steps=int(num_steps or cfg.eval_steps))
    setup = build_setup(cfg)
    try:
        load_lora(setup.transformer, str(student), "eval_student")
        setup.policy.add_role("eval_student", cfg.guidance_scale)  # evaluated in the student's role
        result = evaluate(setup, "eval_student", grid_dir=out / "grids")
        result = {"lora": str(student), "eval_steps": cfg.eval_steps, **result}
        if setup.is_main:
            (out / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    finally:
        if setup.lock is not None:
            setup.lock.release()
    return result
