r"""Single-task training curves: every OPD method and GRPO on the parametric GMM student (b).

Each task :math:`k` of the shared setting is trained separately (a fresh single-task student per task,
method and seed); the student starts at :math:`p_{ref}`; its reverse KL to :math:`p^*_k` is exact
(quadrature of two closed-form GMM densities, :func:`toys.metrics.grid_kl`).  Curves: one row per
task, KL vs student forward passes (left) and vs wall-clock seconds (right), one line per method,
bands = +-1 std over seeds.  Reference: ``diffusionopd`` (closed-form KL vs PPO-style OPD), ``flowgrpo``.
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from toys.experiments import default_setting
from toys.figures import LABELS, band, plt, save
from toys.metrics import energy_distance, grid_kl, mass_error
from toys.students import GMMStudent
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


def exact_kl(student: GMMStudent, target, setting, task: int = 0, n: int = 161) -> float:
    """Reverse KL(p_theta,k || target) by quadrature on the setting's square."""
    return grid_kl(student.mixture(task).log_prob, target.log_prob, center=setting.center,
                   half_width=setting.half_width, n=n)[0]


def train_one(method: str, setting, task: int, seed: int, *, n_updates: int, eval_every: int,
              batch_size: int, noise_level: float, lr: float) -> Dict[str, List[float]]:
    """Train a fresh single-task :class:`GMMStudent` on task ``task`` with one method; returns the logged curve."""
    torch.manual_seed(seed)
    student = GMMStudent(setting.p_ref, 1)
    target = setting.targets[task]
    cfg = TrainConfig(method=method, noise_level=noise_level, batch_size=batch_size, lr=lr,
                      inner_updates=2 if method == "grpo" else 1)
    tr = Trainer(student, [target.velocity], cfg, reference=setting.p_ref.velocity,
                 rewards=[setting.rewards[task]], betas=[setting.betas[task]], seed=seed)
    curve = {"update": [0], "forward_passes": [0], "seconds": [0.0], "kl": [exact_kl(student, target, setting)]}
    for i in range(1, n_updates + 1):
        tr.update([0])
        if i % eval_every == 0:
            curve["update"].append(i)
            curve["forward_passes"].append(tr.forward_passes)
            curve["seconds"].append(tr.seconds)
            curve["kl"].append(exact_kl(student, target, setting))
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        xs = student.mixture(0).sample(1000, gen)  # the student's only task is ``task``
        xt = target.sample(1000, gen)
    curve["energy"] = energy_distance(xs, xt)
    curve["mass_error"] = mass_error(xs, target)
    return curve


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
    bar = tqdm([(k, m, s) for k in tasks for m in METHODS for s in seeds], desc="training", leave=False)
    for task, method, seed in bar:
        bar.set_postfix_str(f"task {task} {method} seed {seed}")
        c = train_one(method, setting, task, seed, n_updates=n_updates, eval_every=eval_every,
                      batch_size=batch_size, noise_level=noise_level, lr=lr)
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
        row[1].set_xlabel("wall-clock training seconds (excl. evaluation)", fontsize=8)
        for ax in row:
            ax.set_ylabel(f"exact KL(p_θ ‖ p*_{task})  (nats)")
            ax.set_yscale("log")
            ax.set_title(f"task {task}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Parametric GMM student, one per task, a={noise_level}, batch {batch_size}, 10 steps, Adam lr {lr}; "
                 f"bands ±1 std over {len(seeds)} seeds", fontsize=9)
    figures = [save(fig, out_dir, "training_curves.png")]
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
    return {"checks": checks, "figures": figures, "tables": table, "metrics": metrics}
