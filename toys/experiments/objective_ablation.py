r"""The distillation-objective ablation (D16): per-step supervision on the student's own SDE rollouts by
the closed-form reverse KL (``opd_kl``), the forward KL at the teacher's draw (``fwd_kl``), DMD's
score difference at the visited state (``dmd``) and the Di-Bregman h-family on the kernel ratio
(``bregman_*``), every one an entry of the engine's objective registry.

* single task: the parametric GMM student (b), one per (task, seed), exact reverse KL to :math:`p^*_k`
  (the ``training`` experiment's :func:`~toys.experiments.training.train_runs`);
* multi task: the task-conditioned residual-MLP student (a), round robin over the three tasks, KL of
  its Euler sampler to each :math:`p^*_k` (the ``multitask`` experiment's
  :func:`~toys.experiments.multitask.train_multitask`).

All objectives have, at a visited state, an expected gradient that is a positive multiple of the
closed-form KL's (same-covariance kernels): ``bregman_kl`` exactly 1 (so its curve coincides with
``opd_kl``'s, checked), ``fwd_kl`` 1 in mean plus Gaussian noise, ``dmd`` the per-step factor
:math:`a^2\sigma/(|\Delta t|(1+a^2/2)^2)` (SDE), ``bregman_H`` the random weight :math:`h''(r)r` at the draw.
Reference: ``diffusionopd`` (the objective ablation), ``dmd``, ``dibregman``.
"""

from __future__ import annotations

import pathlib
from typing import Dict, List, Sequence

import numpy as np

from toys.experiments import default_setting
from toys.experiments.multitask import train_multitask
from toys.experiments.training import train_runs
from toys.figures import plt, save

OBJECTIVES = ("opd_kl", "fwd_kl", "dmd", "bregman_kl", "bregman_reverse_kl", "bregman_pearson_chi2",
              "bregman_jensen_shannon")
STYLE = {  # (colour, linestyle, marker): bregman_kl coincides with opd_kl, drawn dashed with crosses on top
    "opd_kl": ("tab:blue", "-", None), "fwd_kl": ("tab:red", "-", "o"), "dmd": ("tab:green", "-", "s"),
    "bregman_kl": ("k", "--", "x"), "bregman_reverse_kl": ("tab:orange", "-.", "^"),
    "bregman_pearson_chi2": ("tab:purple", ":", "v"), "bregman_jensen_shannon": ("tab:brown", "-", "D"),
}
LABEL = {
    "opd_kl": "reverse KL, closed form (opd_kl)", "fwd_kl": "forward KL at teacher draw (fwd_kl)",
    "dmd": "DMD score difference (dmd)", "bregman_kl": "Bregman h=r log r (= opd_kl)",
    "bregman_reverse_kl": "Bregman h=-log r", "bregman_pearson_chi2": "Bregman h=(r-1)^2",
    "bregman_jensen_shannon": "Bregman h=JS",
}
#: per-step mean-gradient factor relative to opd_kl (SDE kernel), as stated in the table
FACTOR = {
    "opd_kl": "1", "fwd_kl": "1 (plus noise -eps/s)", "dmd": "a^2 sigma / (|dt| (1 + a^2/2)^2)",
    "bregman_kl": "1 (exactly, every draw)", "bregman_reverse_kl": "E[1/r] = 1 (random weight)",
    "bregman_pearson_chi2": "E[2r] = 2 exp(2 KL_step)", "bregman_jensen_shannon": "E[sigmoid(-log r)/2] <= 1/2",
}

#: sizes of quick and full mode (tests shrink QUICK)
QUICK = dict(tasks=[0], max_seeds=1, single_updates=20, eval_every=5, batch_size=32,
             multi_updates=4, n_evals=1, n_eval=200)
FULL = dict(tasks=[0, 1, 2], max_seeds=2, single_updates=100, eval_every=10, batch_size=64,
            multi_updates=50, n_evals=5, n_eval=600)
NOISE_LEVEL = 0.5


def _plot(ax, x, ys, method):
    c, ls, mk = STYLE[method]
    ys = np.asarray(ys)
    m = ys.mean(0)
    ax.plot(x, m, color=c, ls=ls, marker=mk, ms=4, lw=1.6, label=LABEL[method])
    if ys.shape[0] > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=c, alpha=0.12, lw=0)


def run(out_dir: pathlib.Path, quick: bool = True, seeds: Sequence[int] = (0,)) -> dict:
    """Run the experiment (contract of :mod:`toys.reproduce`): write its PNG into ``out_dir`` and return
    ``{"checks", "figures", "tables", "metrics"}``; ``quick`` selects :data:`QUICK` sizes, else :data:`FULL`.

    Reference: ``diffusionopd``.
    """
    out_dir = pathlib.Path(out_dir)
    setting = default_setting()
    cfg = QUICK if quick else FULL
    seeds = list(seeds)[: cfg["max_seeds"]]
    tasks = cfg["tasks"]
    K = setting.n_tasks
    single: Dict[str, Dict[tuple, dict]] = {}
    multi: Dict[str, List[dict]] = {}
    metrics: List[dict] = []
    for method in OBJECTIVES:
        single[method] = train_runs(method, setting, tasks, seeds, n_updates=cfg["single_updates"],
                                    eval_every=cfg["eval_every"], batch_size=cfg["batch_size"],
                                    noise_level=NOISE_LEVEL, lr=0.05)
        for (task, seed), c in single[method].items():
            for j in range(len(c["update"])):
                metrics.append({"figure": "objective_ablation_single", "method": method, "seed": seed, "task": task,
                                "forward_passes": c["forward_passes"][j], "kl": c["kl"][j]})
        multi[method] = train_multitask("opd", setting, seeds, n_updates=cfg["multi_updates"], n_evals=cfg["n_evals"],
                                        batch_size=cfg["batch_size"], noise_level=NOISE_LEVEL, lr=0.02,
                                        n_eval=cfg["n_eval"], objective=method)
        for seed, lg in zip(seeds, multi[method]):
            for j, kl in enumerate(lg["kl"]):
                metrics.append({"figure": "objective_ablation_multi", "method": method, "seed": seed,
                                "forward_passes": lg["forward_passes"][j], "kl_mean": float(np.mean(kl))})
    # ---- figure: single task (task 0) and multi task (mean over tasks) vs forward passes
    fig, (*axes, legend_ax) = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.55]})
    for method in OBJECTIVES:
        cs = [single[method][(tasks[0], s)] for s in seeds]
        _plot(axes[0], np.mean([c["forward_passes"] for c in cs], 0), [c["kl"] for c in cs], method)
        lgs = multi[method]
        _plot(axes[1], np.mean([lg["forward_passes"] for lg in lgs], 0),
              [[float(np.mean(k)) for k in lg["kl"]] for lg in lgs], method)
    axes[0].set_title(f"single task {tasks[0]}: parametric GMM student, exact KL", fontsize=9)
    axes[1].set_title(f"multi task (round robin, {K} tasks): MLP student, Euler-sampler KL", fontsize=9)
    axes[0].set_ylabel(f"exact KL(p_θ ‖ p*_{tasks[0]})  (nats)")
    axes[1].set_ylabel("mean over tasks of KL(student_k ‖ p*_k)  (nats)")
    for ax in axes:
        ax.set_xlabel("student forward passes (samples × steps)", fontsize=8)
        ax.set_yscale("log")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax.axis("off")  # the legend in its own panel: it covers no curve
    legend_ax.legend(handles, labels, loc="center left", fontsize=7, frameon=False)
    fig.suptitle(f"Distillation-objective ablation on the student's own SDE rollouts (a={NOISE_LEVEL}, 10 steps, "
                 f"batch {cfg['batch_size']}, Adam; {len(seeds)} seed(s), band = min..max); "
                 "h=r log r coincides with opd_kl", fontsize=8)
    figures = [save(fig, out_dir, "objective_ablation.png")]
    # ---- table
    rows = ["| objective | per-step mean gradient / opd_kl's | single task: start KL | final KL | "
            "multi task: start mean KL | final mean KL | forward passes (single / multi) |",
            "|---|---|---|---|---|---|---|"]
    for m in OBJECTIVES:
        cs = list(single[m].values())
        f0 = np.array([c["kl"][0] for c in cs])
        f1 = np.array([c["kl"][-1] for c in cs])
        mk0 = np.array([np.mean(lg["kl"][0]) for lg in multi[m]])
        mk1 = np.array([np.mean(lg["kl"][-1]) for lg in multi[m]])
        rows.append(f"| `{m}` | {FACTOR[m]} | {f0.mean():.3f} | {f1.mean():.3f} ± {f1.std():.3f} | {mk0.mean():.3f} | "
                    f"{mk1.mean():.3f} ± {mk1.std():.3f} | {int(np.mean([c['forward_passes'][-1] for c in cs]))} / "
                    f"{int(np.mean([lg['forward_passes'][-1] for lg in multi[m]]))} |")
    # ---- checks
    same = max(float(np.max(np.abs(np.array(single["bregman_kl"][r]["kl"]) - np.array(single["opd_kl"][r]["kl"]))))
               for r in single["opd_kl"])
    checks = [{"name": "D16: bregman_kl (weight h''(r) r = 1) trains exactly like opd_kl: max |KL difference| over "
                       "the single-task curves (nats)", "value": same, "threshold": "<= 1e-9",
               "passed": bool(same <= 1e-9)}]
    for m in ("opd_kl", "fwd_kl", "dmd", "bregman_jensen_shannon"):
        ratio = max(c["kl"][-1] / c["kl"][0] for c in single[m].values())
        checks.append({"name": f"D16: {m} lowers the single-task exact KL (final / initial, worst run)",
                       "value": float(ratio), "threshold": "< 1", "passed": bool(ratio < 1.0)})
    tables = {f"Distillation-objective ablation (single task: {cfg['single_updates']} updates, tasks {tasks}; multi "
              f"task: {cfg['multi_updates']} round-robin updates; seeds {seeds})": "\n".join(rows)}
    single_final = {m: float(np.mean([c["kl"][-1] for c in single[m].values()])) for m in OBJECTIVES}
    multi_final = {m: float(np.mean([np.mean(lg["kl"][-1]) for lg in multi[m]])) for m in OBJECTIVES}
    near = [m for m in OBJECTIVES if m != "opd_kl" and single_final[m] <= 2 * single_final["opd_kl"]]
    far = [m for m in OBJECTIVES if m != "opd_kl" and m not in near]
    rising = [m for m in OBJECTIVES if any(c["kl"][-1] > c["kl"][0] for c in single[m].values())]
    start = float(np.mean([c["kl"][0] for c in single["opd_kl"].values()]))
    reading = (
        f"Each objective supervises the states of the student's own SDE rollouts (a = {NOISE_LEVEL}, batch "
        f"{cfg['batch_size']}, seeds {seeds}). Single task (tasks {tasks}, {cfg['single_updates']} updates, exact KL "
        f"from {start:.3g} nats), final KL: " + ", ".join(f"{m} {single_final[m]:.3g}" for m in OBJECTIVES)
        + f"; bregman_kl (weight h''(r) r = 1) follows opd_kl to {same:.1e} nats. Within 2x of the closed-form KL: "
        + (", ".join(near) if near else "none") + "; further: " + (", ".join(far) if far else "none")
        + (f"; the KL rose for {', '.join(rising)}" if rising else "")
        + f". Multi task ({cfg['multi_updates']} round-robin updates), final mean KL: "
        + ", ".join(f"{m} {multi_final[m]:.3g}" for m in OBJECTIVES)
        + (". Quick mode is short; the claims row quotes the full run." if quick else "."))
    return {"checks": checks, "figures": figures, "tables": tables, "metrics": metrics, "seeds": seeds,
            "reading": reading,
            "links": [("claims row 23", "claims.md#claim-23"), ("D16", "derivations/d16-reward-dmd.md")]}
