r"""Multi-task OPD (D13) vs joint multi-reward GRPO vs cascade GRPO, with forgetting.

One task-conditioned student (a) (exact :math:`v_{ref}` + zero-initialised residual MLP on
:math:`(x,\sigma,k)`) serves the ``K = 3`` tasks of the shared setting; every update is an
``opd_ref.engine`` update, with the seeds' students stacked in one rollout.

* ``opd``: DiffusionOPD closed-form KL, teachers = exact tilted flows :math:`v_{p^*_k}`, round-robin
  gradient accumulation over the tasks in every update (D13);
* ``opd_rl_teachers`` (full mode / bench): the same with teachers trained by GRPO in stage 1, their
  forward passes counted in OPD's budget;
* ``joint``: Flow-GRPO on each task's own reward with KL to the reference, tasks accumulated
  round-robin like OPD (the paper's "multi-task RL");
* ``cascade``: Flow-GRPO task after task (stage ``k`` trains task ``k`` only), same total rollouts.

Per-task reverse KL of the student's 24-step Euler sampler to :math:`p^*_k`, with exact densities
(:func:`toys.metrics.sampler_kl`), cross-checked against the continuous-time ODE likelihood of
``opd_ref.elbo`` (:func:`toys.metrics.ode_likelihood_gap`); forgetting = KL at the end minus KL at the end of the task's
own stage.  Reference: ``diffusionopd``, ``flowgrpo``.
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toys.experiments import TASK_NAMES, default_setting
from toys.figures import COLORS, LABELS, plot_density, plt, save
from toys.metrics import forgetting, mass_error, ode_likelihood_gap, sampler_kl
from opd_ref.engine import KernelSpec, rollout
from opd_ref.engine.grid import sigma_grid
from toys.students import ResidualMLPStudent, StackedMLPStudent
from toys.train import Trainer, TrainConfig, task_schedule

EVAL_STEPS = 24
GRPO_KL_COEF = None  # None: each task's beta, the coefficient whose KL-regularised optimum is p*_k


#: sizes of quick and full mode (tests shrink QUICK); quick mode uses at most ``max_seeds`` seeds
QUICK = dict(n_updates=40, n_evals=2, n_eval=300, max_seeds=2, batch_size=64, rl_teachers=False)
FULL = dict(n_updates=200, n_evals=5, n_eval=2000, max_seeds=None, batch_size=64, rl_teachers=True)


def per_task_kl(student, setting, n: int, seed: int) -> List[float]:
    """KL of the student's Euler sampler to each task's target (exact densities, ``n`` samples)."""
    return [sampler_kl(lambda x, s, k=k: student.velocity(x, s, k), setting.targets[k].log_prob,
                       n=n, n_steps=EVAL_STEPS, seed=seed)[0] for k in range(setting.n_tasks)]


def euler_samples(velocity, x0: torch.Tensor, n_steps: int = EVAL_STEPS) -> torch.Tensor:
    """Final states of the ``n_steps``-step Euler (ODE) sampler of ``velocity`` from ``x0`` (engine rollout)."""
    return rollout(velocity, x0, sigma_grid(n_steps), KernelSpec("ode")).final


def stacked_students(setting, seeds: Sequence[int], n_tasks: int, offset: int = 0) -> StackedMLPStudent:
    """One zero-initialised student (a) per seed (initialised under ``torch.manual_seed(seed + offset)``), stacked."""
    students = []
    for seed in seeds:
        torch.manual_seed(seed + offset)
        students.append(ResidualMLPStudent(setting.p_ref, n_tasks, hidden=64))
    return StackedMLPStudent(students)


def train_rl_teachers(setting, seeds: Sequence[int], n_updates: int, batch_size: int, noise_level: float, lr: float):
    """Stage 1 of the two-stage recipe: one single-task GRPO teacher (student (a)) per task and seed, the
    seeds stacked.

    Returns ``(stacked teachers per task, forward passes per seed, seconds per seed)``."""
    teachers, fp, secs = [], 0, 0.0
    for k in range(setting.n_tasks):
        t = stacked_students(setting, seeds, 1, offset=100 * k)
        tr = Trainer(t, [], TrainConfig(method="grpo", noise_level=noise_level, batch_size=batch_size, lr=lr,
                                        inner_updates=2, kl_coef=GRPO_KL_COEF),
                     reference=setting.p_ref, rewards=[setting.rewards[k]], betas=[setting.betas[k]],
                     seed=seeds[0] + 100 * k)
        for _ in range(n_updates):
            tr.update([0])
        fp, secs = fp + tr.forward_passes, secs + tr.seconds / len(seeds)
        teachers.append(t)
    return teachers, fp, secs


def train_multitask(method: str, setting, seeds: Sequence[int], *, n_updates: int, n_evals: int, batch_size: int,
                    noise_level: float, lr: float, n_eval: int, rl_teacher_updates: int = 0,
                    objective: str = "opd_kl") -> List[dict]:
    """Train one task-conditioned student per seed with ``method`` (seeds stacked in one engine rollout)
    and log per-task KL at checkpoints; returns one log per seed (``seconds`` amortised over the seeds).
    ``objective``: the per-step distillation objective of the OPD methods (the engine's name)."""
    K, S = setting.n_tasks, len(seeds)
    student = stacked_students(setting, seeds, K)
    base_fp, base_s = 0, 0.0
    if method == "opd_rl_teachers":
        teachers, base_fp, base_s = train_rl_teachers(setting, seeds, rl_teacher_updates, batch_size,
                                                      noise_level, lr)
    else:
        teachers = list(setting.targets)
    rl = method in ("joint", "cascade")
    cfg = TrainConfig(method="grpo" if rl else objective, noise_level=noise_level, batch_size=batch_size, lr=lr,
                      inner_updates=2 if rl else 1, kl_coef=GRPO_KL_COEF if rl else None)
    tr = Trainer(student, [] if rl else teachers, cfg, reference=setting.p_ref,
                 rewards=setting.rewards, betas=setting.betas, seed=seeds[0])
    schedule = task_schedule("cascade" if method == "cascade" else "round_robin", K, n_updates)
    if method == "cascade":
        evals = {len(schedule) * (j + 1) // (K * n_evals) for j in range(n_evals * K)}  # n_evals per stage
    else:
        evals = {len(schedule) * (j + 1) // n_evals for j in range(n_evals)}
    logs = [{"forward_passes": [base_fp], "seconds": [base_s], "tasks_seen": [[]],
             "kl": [per_task_kl(student.run(r), setting, n_eval, seed)]} for r, seed in enumerate(seeds)]
    for i, tasks in enumerate(schedule, start=1):
        tr.update(tasks)
        if i in evals:
            for r, (log, seed) in enumerate(zip(logs, seeds)):
                log["forward_passes"].append(base_fp + tr.forward_passes)
                log["seconds"].append(base_s + tr.seconds / S)
                log["kl"].append(per_task_kl(student.run(r), setting, n_eval, seed))
                log["tasks_seen"].append(list(tasks))
    for r, (log, seed) in enumerate(zip(logs, seeds)):
        st = student.run(r)
        log["task_updates"] = list(tr.task_updates)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            log["mass_error"] = []
            for k in range(K):
                x = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
                xs = euler_samples(lambda z, s, k=k: st.velocity(z, s, k), x)
                log["mass_error"].append(mass_error(xs, setting.targets[k]))
        log["student"] = st
    return logs


def run(out_dir: pathlib.Path, quick: bool = True, seeds: Sequence[int] = (0,)) -> dict:
    """Run the experiment (contract of :mod:`toys.reproduce`): write its PNGs into ``out_dir`` and return
    ``{"checks", "figures", "tables", "metrics"}``; ``quick`` selects :data:`QUICK` sizes, else :data:`FULL`.

    Reference: ``diffusionopd``.
    """
    out_dir = pathlib.Path(out_dir)
    setting = default_setting()
    K = setting.n_tasks
    cfg = QUICK if quick else FULL
    seeds = list(seeds)[: cfg["max_seeds"]]
    n_updates = cfg["n_updates"]
    kw = dict(n_updates=n_updates, n_evals=cfg["n_evals"], batch_size=cfg["batch_size"], noise_level=0.5, lr=0.02,
              n_eval=cfg["n_eval"])
    methods = ["opd", "joint", "cascade"] + (["opd_rl_teachers"] if cfg["rl_teachers"] else [])
    logs: Dict[str, List[dict]] = {m: [] for m in methods}
    metrics = []
    bar = tqdm(methods, desc="multitask", leave=False)
    for method in bar:
        bar.set_postfix_str(f"{method}, {len(seeds)} seeds stacked")
        for seed, log in zip(seeds, train_multitask(method, setting, seeds, rl_teacher_updates=n_updates, **kw)):
            logs[method].append(log)
            for j, kl in enumerate(log["kl"]):
                for k in range(K):
                    metrics.append({"figure": "multitask", "method": method, "seed": seed, "task": k,
                                    "forward_passes": log["forward_passes"][j], "seconds": log["seconds"][j],
                                    "kl": kl[k]})
    final = {m: np.array([lg["kl"][-1] for lg in logs[m]]) for m in methods}  # (seeds, K)
    # ---- summary figure: final per-task KL
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar(np.arange(K) + j * width, final[m].mean(0), width, yerr=final[m].std(0), capsize=3,
               color=COLORS[m], label=LABELS[m])
    start = np.array([lg["kl"][0] for lg in logs["opd"]]).mean(0)
    ax.scatter(np.arange(K) + 0.4 - width / 2, start, marker="_", s=400, color="k", label="start (p_ref)", zorder=3)
    ax.set_xticks(np.arange(K) + 0.4 - width / 2)
    ax.set_xticklabels([f"task {k}: {TASK_NAMES[k]}" for k in range(K)], fontsize=8)
    ax.set_ylabel("final KL(student_k ‖ p*_k)  (nats)")
    ax.set_yscale("log")
    ax.set_title(f"Multi-task student (a), same student rollouts per method (RL-trained teachers: plus their\n"
                 f"own training); mean ± std over {len(seeds)} seeds", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    figures = [save(fig, out_dir, "multitask_summary.png")]
    # ---- cascade forgetting curve
    fig, ax = plt.subplots(figsize=(8.6, 3.8))
    lg0 = logs["cascade"]
    fp = np.mean([lg["forward_passes"] for lg in lg0], 0)
    for k in range(K):
        kl = np.array([[row[k] for row in lg["kl"]] for lg in lg0])
        ax.plot(fp, kl.mean(0), "o-", label=f"cascade, task {k}", color=plt.get_cmap("tab10")(k))
        kl_o = np.array([[row[k] for row in lg["kl"]] for lg in logs["opd"]])
        ax.plot(np.mean([lg["forward_passes"] for lg in logs["opd"]], 0), kl_o.mean(0), "s--", ms=3,
                color=plt.get_cmap("tab10")(k), alpha=0.6, label=f"multi-task OPD, task {k}")
    for j in range(1, K):
        ax.axvline(fp[-1] * j / K, color="gray", ls=":", lw=1)
    ax.set_xlabel("student forward passes (stage boundaries dotted)")
    ax.set_ylabel("KL(student_k ‖ p*_k)  (nats)")
    ax.set_yscale("log")
    ax.set_title("Cascade GRPO: each task improves in its stage and drifts later (forgetting)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: inside it covered curves
    figures.append(save(fig, out_dir, "cascade_forgetting.png"))
    # ---- density panels (seed 0)
    rows = ["opd", "joint", "cascade"]
    fig, axes = plt.subplots(len(rows) + 2, K + 1, figsize=(2.3 * (K + 1), 2.2 * (len(rows) + 2)))
    plot_density(axes[0, 0], setting.p_ref.log_prob, "p_ref (exact)")
    for k in range(K):
        plot_density(axes[0, k + 1], setting.targets[k].log_prob, f"teacher p*_{k} (exact)")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    start_x = euler_samples(setting.p_ref.velocity, x0)
    for r, label in enumerate(["student start (= p_ref)"] + [f"{LABELS[m]}, end" for m in rows], start=1):
        axes[r, 0].axis("off")
        axes[r, 0].text(0.5, 0.5, label, ha="center", va="center", fontsize=9, wrap=True)
        for k in range(K):
            if r == 1:
                xs = start_x
            else:
                st = logs[rows[r - 2]][0]["student"]
                with torch.no_grad():
                    xs = euler_samples(lambda z, s, k=k: st.velocity(z, s, k), x0)
            plot_density(axes[r, k + 1], None, f"task {k} (samples)", samples=xs)
    figures.append(save(fig, out_dir, "density_panels.png"))
    # ---- tables and checks
    trows = ["| method | " + " | ".join(f"KL task {k}" for k in range(K)) + " | mean KL | mode-mass TV (mean) |"
             " forward passes | seconds |", "|---|" + "---|" * (K + 4)]
    for m in methods:
        f, lgs = final[m], logs[m]
        me = np.array([lg["mass_error"] for lg in lgs]).mean(1)
        trows.append(f"| {LABELS[m]} | " + " | ".join(f"{f[:, k].mean():.3f} ± {f[:, k].std():.3f}" for k in range(K))
                     + f" | {f.mean(1).mean():.3f} ± {f.mean(1).std():.3f} | {me.mean():.3f} ± {me.std():.3f} | "
                     f"{int(np.mean([lg['forward_passes'][-1] for lg in lgs]))} | "
                     f"{np.mean([lg['seconds'][-1] for lg in lgs]):.1f} |")
    forg = []
    for lg in logs["cascade"]:
        n_ck = len(lg["kl"]) - 1
        forg.append([forgetting([row[k] for row in lg["kl"]], (k + 1) * n_ck // K) for k in range(K - 1)])
    forg = np.array(forg)
    frow = ["| task | forgetting (KL at end - KL at end of own stage, nats) |", "|---|---|"]
    frow += [f"| {k} | {forg[:, k].mean():.3f} ± {forg[:, k].std():.3f} |" for k in range(K - 1)]
    sched_ok = all(lg["task_updates"] == [n_updates] * K for m in ("opd", "cascade") for lg in logs[m])
    checks = [{"name": "D13: every task receives the same number of accumulated gradients (round-robin and cascade)",
               "value": float(sched_ok), "threshold": "== 1", "passed": bool(sched_ok)},
              {"name": "sampler bias: KL of p_ref's own 24-step Euler sampler to p_ref (exact densities, nats)",
               "value": sampler_kl(setting.p_ref.velocity, setting.p_ref.log_prob, n=kw["n_eval"],
                                   n_steps=EVAL_STEPS, seed=0)[0], "threshold": "<= 0.05", "passed": True}]
    checks[-1]["passed"] = bool(checks[-1]["value"] <= 0.05)
    st0 = logs["opd"][0]["student"]
    gap, gap_se = ode_likelihood_gap(lambda z, s: st0.velocity(z, s, 0), n=200, n_steps=EVAL_STEPS)
    checks.append({"name": "student (a) KL metric: Euler-sampler density - opd_ref.elbo ODE likelihood at the "
                           f"sampler's outputs, mean gap (nats, se {gap_se:.3f})",
                   "value": gap, "threshold": "|gap| <= 0.1", "passed": bool(abs(gap) <= 0.1)})
    tables = {f"Multi-task final per-task KL ({n_updates} updates x {K} tasks, mean ± std over seeds {seeds})":
              "\n".join(trows), "Cascade forgetting": "\n".join(frow)}
    mean_kl = {m: float(final[m].mean()) for m in methods}
    passes = {m: float(np.mean([lg["forward_passes"][-1] for lg in logs[m]])) for m in methods}
    rl = [m for m in ("joint", "cascade") if m in methods]
    reading = (
        f"With exact task teachers, multi-task OPD ends at a mean per-task KL of {mean_kl['opd']:.3f} nats after "
        f"{n_updates} updates per task, against "
        + ", ".join(f"{mean_kl[m]:.3f} for {LABELS[m]} ({passes[m] / passes['opd']:.2f}x OPD's forward passes)"
                    for m in rl)
        + ". Cascade GRPO trains one task after the other and forgets: the KL of each earlier task rises after its "
        f"stage by " + ", ".join(f"{forg[:, k].mean():.2f}" for k in range(K - 1)) + " nats (tasks "
        + ", ".join(str(k) for k in range(K - 1)) + "), while OPD updates every task in each round (each task got "
        f"the same number of gradients: {'yes' if sched_ok else 'no'}). The RL methods optimise the tilted "
        f"targets through the reward alone; OPD sees the teacher's velocity at every step.")
    return {"checks": checks, "figures": figures, "tables": tables, "metrics": metrics, "seeds": seeds,
            "reading": reading,
            "links": [("claims row 7", "claims.md#claim-7"), ("D13", "derivations/d13-multitask.md")]}

