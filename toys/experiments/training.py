r"""Single-task training curves: every OPD method and GRPO on the parametric GMM student (b).

Each task :math:`k` of the shared setting is trained separately (a fresh single-task student per task,
method and seed; all (task, seed) runs of a method are stacked in one engine rollout, each run's
gradient exactly its own); the student starts at :math:`p_{ref}`; its reverse KL to :math:`p^*_k` is exact
(quadrature of two closed-form GMM densities, :func:`toys.metrics.grid_kl`).  Curves: one row per
task, KL vs student forward passes (left) and vs wall-clock seconds (right), one line per method,
bands = +-1 std over seeds.  Reference: ``diffusionopd`` (closed-form KL vs PPO-style OPD), ``flowgrpo``.
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from toys.experiments import default_setting
from toys.figures import LABELS, band, plt, save
from toys.metrics import energy_distance, grid_kl, mass_error
from toys.students import GMMStudent, StackedGMMStudent
from toys.train import METHODS, Trainer, TrainConfig


#: sizes of quick and full mode (tests shrink QUICK); quick mode uses at most ``max_seeds`` seeds
QUICK = dict(n_updates=60, eval_every=10, max_seeds=2, noise_level=0.5, batch_size=64, lr=0.05)
FULL = dict(n_updates=300, eval_every=20, max_seeds=None, noise_level=0.5, batch_size=64, lr=0.05)


def expected_reward(p, reward) -> float:
    r"""Exact :math:`\mathbb E_p[r]` for a GMM ``p`` and a quadratic-form reward:
    :math:`\sum_k w_k(-\tfrac12(\mathrm{tr}(A S_k) + m_k^\top A m_k) + h^\top m_k) + r_0`."""
    A, h, r0 = reward.canonical()
    quad = torch.einsum("ij,kji->k", A, p.covs) + torch.einsum("ki,ij,kj->k", p.means, A, p.means)
    return float(p.weights @ (-0.5 * quad + p.means @ h) + r0)


_TARGET_LOG_PROB: Dict[tuple, tuple] = {}


def exact_kl(student: GMMStudent, target, setting, task: int = 0, n: int = 161) -> float:
    """Reverse KL(p_theta,k || target) by quadrature on the setting's square (the target's log-density on
    the grid is computed once per target and grid)."""
    def log_q(pts: torch.Tensor) -> torch.Tensor:
        key = (id(target), n, float(setting.half_width))
        if key not in _TARGET_LOG_PROB:
            _TARGET_LOG_PROB[key] = (target, target.log_prob(pts))  # keeps target alive: id stays unique
        return _TARGET_LOG_PROB[key][1]

    return grid_kl(student.mixture(task).log_prob, log_q, center=setting.center,
                   half_width=setting.half_width, n=n)[0]


def train_runs(method: str, setting, tasks: Sequence[int], seeds: Sequence[int], *, n_updates: int, eval_every: int,
               batch_size: int, noise_level: float, lr: float) -> Dict[Tuple[int, int], Dict[str, List[float]]]:
    """Train one fresh single-task :class:`GMMStudent` per (task, seed) with one method, all runs stacked in
    one engine rollout (:class:`toys.students.StackedGMMStudent`); returns the logged curve of each run.

    Each run has its own parameters, teacher :math:`p^*_k` and reward; its gradient is exactly its own
    (see :mod:`toys.policy`).  ``seconds`` are the stack's wall clock divided by the number of runs."""
    runs = [(k, s) for k in tasks for s in seeds]
    R = len(runs)
    student = StackedGMMStudent(setting.p_ref, R, 1)
    targets = [setting.targets[k] for k, _ in runs]
    betas = {setting.betas[k] for k, _ in runs}
    if len(betas) != 1:
        raise ValueError(f"stacked GRPO runs need one KL coefficient, got betas {sorted(betas)}")
    cfg = TrainConfig(method=method, noise_level=noise_level, batch_size=batch_size, lr=lr,
                      inner_updates=2 if method == "grpo" else 1)
    tr = Trainer(student, [targets], cfg, reference=setting.p_ref, rewards=[[setting.rewards[k] for k, _ in runs]],
                 betas=[betas.pop()], seed=int(seeds[0]))

    def kls() -> List[float]:
        return [exact_kl(student.run(r), targets[r], setting) for r in range(R)]

    curves = {run: {"update": [0], "forward_passes": [0], "seconds": [0.0], "kl": [kl]} for run, kl in zip(runs, kls())}
    for i in range(1, n_updates + 1):
        tr.update([0])
        if i % eval_every == 0:
            for run, kl in zip(runs, kls()):
                c = curves[run]
                c["update"].append(i)
                c["forward_passes"].append(tr.forward_passes)
                c["seconds"].append(tr.seconds / R)
                c["kl"].append(kl)
    for r, (k, seed) in enumerate(runs):
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            xs = student.run(r).mixture(0).sample(1000, gen)  # the run's only task is ``k``
            xt = setting.targets[k].sample(1000, gen)
        curves[(k, seed)]["energy"] = energy_distance(xs, xt)
        curves[(k, seed)]["mass_error"] = mass_error(xs, setting.targets[k])
    return curves


def run(out_dir: pathlib.Path, quick: bool = True, seeds: Sequence[int] = (0,)) -> dict:
    """Run the experiment (contract of :mod:`toys.reproduce`): write its PNGs into ``out_dir`` and return
    ``{"checks", "figures", "tables", "metrics"}``; ``quick`` selects :data:`QUICK` sizes, else :data:`FULL`.

    Reference: ``diffusionopd``.
    """
    out_dir = pathlib.Path(out_dir)
    setting = default_setting()
    tasks = list(range(len(setting.targets)))
    cfg = QUICK if quick else FULL
    seeds = list(seeds)[: cfg["max_seeds"]]
    n_updates, eval_every = cfg["n_updates"], cfg["eval_every"]
    noise_level, batch_size, lr = cfg["noise_level"], cfg["batch_size"], cfg["lr"]
    curves: Dict[int, Dict[str, List[dict]]] = {k: {m: [] for m in METHODS} for k in tasks}
    metrics = []
    bar = tqdm(METHODS, desc="training", leave=False)
    for method in bar:
        bar.set_postfix_str(f"{method}, {len(tasks)} tasks x {len(seeds)} seeds stacked")
        cs = train_runs(method, setting, tasks, seeds, n_updates=n_updates, eval_every=eval_every,
                        batch_size=batch_size, noise_level=noise_level, lr=lr)
        for (task, seed), c in cs.items():
            curves[task][method].append(c)
            for j in range(len(c["update"])):
                metrics.append({"figure": "training_curves", "method": method, "seed": seed, "task": task,
                                **{k: c[k][j] for k in ("update", "forward_passes", "seconds", "kl")}})
    # ---- figure: one row per task, KL vs forward passes (left) and vs seconds (right)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.0 * len(tasks) + 0.6), squeeze=False)
    for task in tasks:
        row = axes[task]
        for method in METHODS:
            cs = curves[task][method]
            kl = np.array([c["kl"] for c in cs])
            band(row[0], np.mean([c["forward_passes"] for c in cs], 0), kl, method)
            band(row[1], np.mean([c["seconds"] for c in cs], 0), kl, method)
        row[0].set_xlabel("student forward passes (velocity evaluations, samples × steps)", fontsize=8)
        row[1].set_xlabel("training seconds per run (stacked runs, amortised; excl. evaluation)", fontsize=8)
        for ax in row:
            ax.set_ylabel(f"exact KL(p_θ ‖ p*_{task})  (nats)")
            ax.set_yscale("log")
            ax.set_title(f"task {task}", fontsize=9)
    # one legend for all panels, below them (inside a panel it covered curves)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize=9, frameon=False)
    fig.suptitle(f"Parametric GMM student, one per task, a={noise_level}, batch {batch_size}, 10 steps, Adam lr {lr}; "
                 f"bands ±1 std over {len(seeds)} seeds", fontsize=9)
    figures = [save(fig, out_dir, "training_curves.png", rect=(0, 0.04, 1, 1))]
    # ---- checks (task 0)
    kl0 = curves[0]["opd_kl"][0]["kl"][0]
    d7 = -expected_reward(setting.p_ref, setting.rewards[0]) / setting.betas[0] + setting.log_Z[0]
    finals = {m: np.array([c["kl"][-1] for c in curves[0][m]]) for m in METHODS}
    checks = [
        {"name": "D7: quadrature KL(p_ref||p*_0) = -E_ref[r]/beta + log Z (closed form), abs. error",
         "value": abs(kl0 - d7), "threshold": "<= 1e-4", "passed": bool(abs(kl0 - d7) <= 1e-4)},
        {"name": "OPD-KL (SDE) drives exact KL(p_theta||p*_0) below 10% of its start (final / initial)",
         "value": float(finals["opd_kl"].max() / kl0), "threshold": "<= 0.1",
         "passed": bool(finals["opd_kl"].max() / kl0 <= 0.1)},
    ]
    rows = ["| task | start KL (nats) | method | final KL (nats) | energy distance | mode-mass TV | forward passes "
            "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        start = curves[task]["opd_kl"][0]["kl"][0]
        for m in METHODS:
            cs = curves[task][m]
            f = lambda key: np.array([c[key] if np.isscalar(c[key]) else c[key][-1] for c in cs])  # noqa: E731
            rows.append(f"| {task} | {start:.3f} | {LABELS[m]} | {f('kl').mean():.3f} ± {f('kl').std():.3f} | "
                        f"{f('energy').mean():.4f} ± {f('energy').std():.4f} | {f('mass_error').mean():.3f} ± "
                        f"{f('mass_error').std():.3f} | {int(f('forward_passes').mean())} | "
                        f"{f('seconds').mean():.1f} ± {f('seconds').std():.1f} |")
    table = {f"Single-task training, one student per task ({n_updates} updates, mean ± std over seeds "
             f"{seeds})": "\n".join(rows)}
    mean_final = {m: float(np.mean([c["kl"][-1] for t in tasks for c in curves[t][m]])) for m in METHODS}
    ode = [c["kl"] for c in curves[0]["opd_ode"]]
    ode_prev, ode_last = float(np.mean([k[-2] for k in ode])), float(np.mean([k[-1] for k in ode]))
    fp = {m: int(np.mean([c["forward_passes"][-1] for c in curves[0][m]])) for m in METHODS}
    reading = (
        f"Every OPD method with the closed-form or score-function KL brings the exact reverse KL to the "
        f"task's target from about {np.mean([curves[t]['opd_kl'][0]['kl'][0] for t in tasks]):.2f} nats to "
        + ", ".join(f"{LABELS[m]} {mean_final[m]:.3f}" for m in ("opd_kl", "ppo_opd", "k1", "vopd"))
        + f" nats (mean over tasks and seeds) after {n_updates} updates at a = {noise_level}, batch {batch_size}: "
        f"in this regime the lower variance of the closed-form KL buys little (claims row 5 has the benchmark "
        f"where it does). GRPO on the task reward with a KL to p_ref ends at {mean_final['grpo']:.3f} nats with "
        f"{fp['grpo'] / fp['opd_kl']:.2f}x the forward passes. DiffusionOPD-ODE (direct matching on ODE "
        f"rollouts) ends at {mean_final['opd_ode']:.3f} nats; on task 0 its KL was still falling at the end "
        f"({ode_prev:.3f} then {ode_last:.3f} nats at the last two evaluations): it is slower per update, not "
        f"stuck (the reproduce page measures it at 300 updates).")
    return {"checks": checks, "figures": figures, "tables": table, "metrics": metrics, "seeds": seeds,
            "reading": reading,
            "links": [("claims row 5", "claims.md#claim-5"), ("D4", "derivations/d4-deterministic-limit.md"),
                      ("D6", "derivations/d6-estimator-variance.md"), ("D7", "derivations/d7-reward-tilting.md"),
                      ("ODE vs SDE", "reproduce.md#why-diffusionopd-ode-ends-higher")]}
