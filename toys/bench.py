"""``opd-toys bench``: cost to reach a fixed per-task KL, as ratios to DiffusionOPD-KL in the same run.

Two parts, both written to one Markdown file (default ``docs/benchmarks.md``):

1. Single task, parametric GMM student (b), exact KL (quadrature): every OPD estimator (closed-form
   KL, ODE matching, PPO-OPD, k1, vOPD) and GRPO, swept over the noise level ``a`` and the batch
   size.  For each method: student forward passes and seconds until ``KL <= KL_TARGET``, as ratios
   to DiffusionOPD-KL with the same seed, ``a`` and batch; mean +- std over seeds.
2. Multi-task, task-conditioned student (a): multi-task OPD with exact teachers, with GRPO-trained
   stage-1 teachers (their cost added), joint multi-reward GRPO and cascade GRPO, until the mean
   per-task KL (exact Euler-sampler density) is <= ``MT_TARGET``.

Memory: peak bytes of tensors autograd saves for one trained step's backward (a saved-tensor hook), per method,
plus the peak RSS of the process.  Not a timed test: run it by hand, on an idle machine for
meaningful seconds (forward-pass ratios do not depend on the load).
"""

from __future__ import annotations

import os
import pathlib
import platform
import resource
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toys.experiments import default_setting
from toys.experiments.multitask import per_task_kl, train_rl_teachers
from toys.experiments.training import exact_kl
from toys.students import GMMStudent, ResidualMLPStudent
from toys.train import Trainer, TrainConfig, task_schedule

__all__ = ["run_bench", "cost_to_target", "saved_tensor_bytes"]

KL_TARGET = 0.3  # nats, single task (start: KL(p_ref || p*_0) = 4.38)
MT_TARGET = 1.0  # nats, mean per-task KL, multi-task (start ~4.7 with the 24-step sampler)
SINGLE_METHODS = ("opd_kl", "opd_ode", "ppo_opd", "k1", "vopd", "grpo")


def saved_tensor_bytes(tr: Trainer, task: int = 0) -> int:
    """Peak bytes of the tensors autograd saves for one trained step's backward during one update.

    The engine back-propagates each trained step on its own, so a step's graph is freed before the
    next step's student forward builds the next one: the peak is the largest single step's graph."""
    current, peak = 0, 0
    policy = tr.policy
    velocity = policy.velocity

    def pack(t):
        nonlocal current, peak
        current += t.numel() * t.element_size()
        peak = max(peak, current)
        return t

    def tracked(x, sigma, cond):
        nonlocal current
        if torch.is_grad_enabled() and policy._active == "student":
            current = 0  # a new trained step's graph starts with the student's forward
        return velocity(x, sigma, cond)

    policy.velocity = tracked
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tr.update([task])
    finally:
        del policy.velocity
    return peak


def cost_to_target(method: str, setting, seed: int, a: float, batch: int, *, max_updates: int,
                   check_every: int, lr: float = 0.05) -> dict:
    """Train a GMM student on task 0 until exact KL <= KL_TARGET (or ``max_updates``)."""
    torch.manual_seed(seed)
    st = GMMStudent(setting.p_ref, 1)
    cfg = TrainConfig(method=method, noise_level=a, batch_size=batch, lr=lr, group_size=min(16, batch),
                      inner_updates=2 if method == "grpo" else 1)
    tr = Trainer(st, [setting.targets[0]], cfg, reference=setting.p_ref,
                 rewards=[setting.rewards[0]], betas=[setting.betas[0]], seed=seed)
    kl = exact_kl(st, setting.targets[0], setting, n=121)
    for i in range(1, max_updates + 1):
        tr.update([0])
        if i % check_every == 0:
            kl = exact_kl(st, setting.targets[0], setting, n=121)
            if kl <= KL_TARGET:
                return {"reached": True, "forward_passes": tr.forward_passes, "seconds": tr.seconds, "kl": kl}
    return {"reached": False, "forward_passes": tr.forward_passes, "seconds": tr.seconds, "kl": kl}


def mt_cost_to_target(method: str, setting, seed: int, *, max_updates: int, check_every: int,
                      teacher_updates: int, a: float = 0.5, batch: int = 64, n_eval: int = 400) -> dict:
    """Multi-task student (a) until the mean per-task KL <= MT_TARGET; RL-teacher cost included."""
    K = setting.n_tasks
    torch.manual_seed(seed)
    st = ResidualMLPStudent(setting.p_ref, K, hidden=64)
    fp0, s0 = 0, 0.0
    if method == "opd_rl_teachers":
        teachers, fp0, s0 = train_rl_teachers(setting, [seed], teacher_updates, batch, a, 0.02)
    else:
        teachers = list(setting.targets)
    rl = method in ("joint", "cascade")
    cfg = TrainConfig(method="grpo" if rl else "opd_kl", noise_level=a, batch_size=batch, lr=0.02,
                      inner_updates=2 if rl else 1)
    tr = Trainer(st, [] if rl else teachers, cfg, reference=setting.p_ref, rewards=setting.rewards,
                 betas=setting.betas, seed=seed)
    sched = task_schedule("cascade" if method == "cascade" else "round_robin", K, max_updates)
    every = check_every * (K if method == "cascade" else 1)
    kls = per_task_kl(st, setting, n_eval, seed)
    for i, tasks in enumerate(sched, start=1):
        tr.update(tasks)
        if i % every == 0:
            kls = per_task_kl(st, setting, n_eval, seed)
            # cascade only counts once every task has been trained (its last stage)
            if float(np.mean(kls)) <= MT_TARGET and (method != "cascade" or i > len(sched) * (K - 1) // K):
                return {"reached": True, "forward_passes": fp0 + tr.forward_passes, "seconds": s0 + tr.seconds,
                        "kl": kls, "teacher_fp": fp0}
    return {"reached": False, "forward_passes": fp0 + tr.forward_passes, "seconds": s0 + tr.seconds, "kl": kls,
            "teacher_fp": fp0}


def _ratio_cell(rows: List[dict], base: List[dict], key: str) -> str:
    r = np.array([x[key] / b[key] for x, b in zip(rows, base)])
    unreached = sum(not x["reached"] for x in rows)
    cell = f"{r.mean():.2f} ± {r.std():.2f}"
    if unreached:
        cell = f"≥ {cell} ({unreached}/{len(rows)} not reached)"
    return cell


def run_bench(out: pathlib.Path, seeds: Sequence[int] = (0, 1, 2), quick: bool = False,
              a_values: Optional[Sequence[float]] = None, batches: Optional[Sequence[int]] = None) -> str:
    """Run both benchmark parts and write the Markdown report to ``out``; returns its text."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(pathlib.Path(out), list(seeds), quick, a_values, batches)
    finally:
        torch.set_num_threads(threads)


def _run(out, seeds, quick, a_values, batches) -> str:
    setting = default_setting()
    t_start = time.perf_counter()
    a_values = list(a_values or [0.2, 0.7])
    batches = list(batches or ([32] if quick else [32, 256]))
    max_updates, check_every = (60, 5) if quick else (150, 5)
    single: Dict[tuple, Dict[str, List[dict]]] = {}
    jobs = [(a, b, m, s) for a in a_values for b in batches for m in SINGLE_METHODS for s in seeds]
    for a, b, m, s in tqdm(jobs, desc="bench single-task"):
        single.setdefault((a, b), {}).setdefault(m, []).append(
            cost_to_target(m, setting, s, a, b, max_updates=max_updates, check_every=check_every))
    mem = {}
    for m in SINGLE_METHODS:
        st = GMMStudent(setting.p_ref, 1)
        tr = Trainer(st, [setting.targets[0]], TrainConfig(method=m, noise_level=0.5, batch_size=64,
                     group_size=16), reference=setting.p_ref, rewards=[setting.rewards[0]],
                     betas=[setting.betas[0]])
        mem[m] = saved_tensor_bytes(tr)
    mt_methods = ["opd", "opd_rl_teachers", "joint", "cascade"]
    mt_seeds = seeds[:2] if not quick else seeds[:1]
    mt_max, mt_every, t_upd = (30, 10, 30) if quick else (90, 10, 90)
    mt: Dict[str, List[dict]] = {m: [] for m in mt_methods}
    for m, s in tqdm([(m, s) for m in mt_methods for s in mt_seeds], desc="bench multi-task"):
        mt[m].append(mt_cost_to_target(m, setting, s, max_updates=mt_max, check_every=mt_every, teacher_updates=t_upd))
    elapsed = time.perf_counter() - t_start
    text = _report(setting, seeds, mt_seeds, a_values, batches, single, mem, mt, max_updates, mt_max, t_upd, elapsed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_keep_reading(out, text))
    return text


READING_MARKER = "<!-- reading: written by hand, kept when `opd-toys bench` rewrites this file -->"


def _keep_reading(out: pathlib.Path, text: str) -> str:
    """``text`` followed by the hand-written reading of an existing report (everything from
    :data:`READING_MARKER` on), so a rerun refreshes the numbers without deleting the interpretation."""
    if out.is_file():
        old = out.read_text()
        if READING_MARKER in old:
            return text.rstrip("\n") + "\n\n" + old[old.index(READING_MARKER):]
    return text


def _report(setting, seeds, mt_seeds, a_values, batches, single, mem, mt, max_updates, mt_max, t_upd, elapsed) -> str:
    from toys.figures import LABELS

    L = ["# Benchmarks: cost to a fixed KL (toy, exact 2D flows)", "",
         "Produced by `opd-toys bench` (`toys/bench.py`); numbers below are from the run recorded at the end. "
         "The scale-side benchmark is in [benchmarks_scale.md](benchmarks_scale.md).", "",
         "All costs are **ratios to DiffusionOPD-KL (closed-form per-step KL on SDE rollouts) measured in the same "
         "run with the same seed**, mean ± std over seeds; > 1 means more expensive than DiffusionOPD-KL. "
         "Forward passes = student velocity evaluations (samples × steps, rollout and loss); seconds = wall clock "
         "inside the trainer (excludes evaluation). '≥ … (n not reached)' means some runs hit the update cap, "
         "so the ratio is a lower bound.", "",
         f"## 1. Single task: parametric GMM student, exact KL ≤ {KL_TARGET} nats (start 4.38 nats)", "",
         f"Task 0 of the shared setting, 10 SDE steps, Adam lr 0.05, cap {max_updates} updates, check every 5; "
         f"seeds {seeds}.", ""]
    others = [m for m in SINGLE_METHODS if m != "opd_kl"]
    L.append("| a | batch | DiffusionOPD-KL forward passes (abs.) | " + " | ".join(
        f"{LABELS[m]} fwd ratio" for m in others) + " |")
    L.append("|---|---|---|" + "---|" * len(others))
    for (a, b), res in single.items():
        base = res["opd_kl"]
        fp = np.array([x["forward_passes"] for x in base])
        nb = sum(not x["reached"] for x in base)
        L.append(f"| {a} | {b} | {fp.mean():.0f} ± {fp.std():.0f}{' (%d not reached: ratios unreliable)' % nb if nb else ''} | "
                 + " | ".join(_ratio_cell(res[m], base, "forward_passes") for m in others) + " |")
    L += ["", "Seconds to target, same ratios:", "",
          "| a | batch | DiffusionOPD-KL seconds (abs.) | " + " | ".join(f"{LABELS[m]}" for m in others) + " |",
          "|---|---|---|" + "---|" * len(others)]
    for (a, b), res in single.items():
        sec = np.array([x["seconds"] for x in res["opd_kl"]])
        L.append(f"| {a} | {b} | {sec.mean():.2f} ± {sec.std():.2f} | "
                 + " | ".join(_ratio_cell(res[m], res["opd_kl"], "seconds") for m in others) + " |")
    L += ["", "Memory: peak bytes autograd saves for one trained step's backward during one update (batch 64, 10 "
          "steps, GMM student; the engine back-propagates each step on its own, so this does not grow with the "
          "number of steps):", "",
          "| method | saved tensors (KiB) | ratio to DiffusionOPD-KL |", "|---|---|---|"]
    for m, v in mem.items():
        L.append(f"| {LABELS[m]} | {v / 1024:.1f} | {v / mem['opd_kl']:.2f} |")
    L += ["", f"Peak RSS of the bench process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(interpreter + torch; the toy's activations are a few MiB at most).", "",
          f"## 2. Multi-task: task-conditioned student (a), mean per-task KL ≤ {MT_TARGET} nats", "",
          f"K = 3 tasks, a = 0.5, batch 64 per task, Adam lr 0.02, cap {mt_max} updates "
          f"(round-robin: every update accumulates the 3 tasks; cascade: {mt_max} single-task updates per stage, "
          f"only counted as reached in its last stage); RL-trained teachers: {t_upd} GRPO updates per task, "
          f"their forward passes and seconds added to OPD's. Seeds {mt_seeds}. KL of the 24-step Euler sampler "
          "with exact densities (400 samples).", "",
          "| method | reached | forward passes ratio | seconds ratio | final per-task KL (nats) |", "|---|---|---|---|---|"]
    for m, rows in mt.items():
        reached = sum(x["reached"] for x in rows)
        kl = np.array([x["kl"] for x in rows]).mean(0)
        L.append(f"| {LABELS[m]} | {reached}/{len(rows)} | {_ratio_cell(rows, mt['opd'], 'forward_passes')} | "
                 f"{_ratio_cell(rows, mt['opd'], 'seconds')} | {', '.join(f'{v:.2f}' for v in kl)} |")
    L += ["", f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s total, torch "
          f"{torch.__version__}, {platform.machine()}, 1 torch thread, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end.", ""]
    return "\n".join(L)
