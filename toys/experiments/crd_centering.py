r"""D8: centered vs uncentered reward distillation across prompts whose :math:`\log Z(c)` differ.

Contexts (prompts) :math:`c = 1..C` share :math:`p_{ref}` (the ring GMM of the shared setting) and
have their own reward :math:`r_c`; the exact targets are the tilts
:math:`p^*(\cdot|c) = p_{ref}e^{r_c/\beta}/Z(c)` (closed-form GMMs, :meth:`toys.gmm.GaussianMixture.tilt`).
The student is a parametric GMM per context (:class:`toys.students.GMMStudent`, whose family holds
every target), so the reverse KL to each target is computed exactly by grid quadrature.

Each step draws a group of ``G`` samples per context from a fixed, decoupled sampler
(:math:`p_{ref}`), forms the implicit reward :math:`\hat r = \beta\log(p_\theta/p_{ref})` and trains
with :func:`opd_ref.crd.crd_loss` (centered within each prompt group) or
:func:`opd_ref.crd.uncentered_reward_loss` (no :math:`\log Z`; and, as an oracle, with the exact
:math:`\beta\log Z(c)`).  Measured: the exact :math:`\mathrm{KL}(p_\theta(\cdot|c)\|p^*(\cdot|c))`.

Also run on-policy (groups drawn from the current student, detached): there the dropped constant
only acts as a (poor) baseline, since :math:`\mathbb E_{p_\theta}[\nabla\log p_\theta] = 0`, so the
uncentered loss is unbiased in expectation but noisier; off-policy (the decoupled sampler CRD trains
with) it is biased.  Both are measured and tabulated.

Reference: ``crd``.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from opd_ref.crd import crd_loss, implicit_reward, uncentered_reward_loss
from toys.experiments import default_setting
from toys.figures import plt, save
from toys.gmm import GaussianMixture
from toys.metrics import grid_kl
from toys.rewards import QuadraticFormReward
from toys.students import GMMStudent

METHODS = ("centered", "uncentered", "uncentered_oracle")
LABELS = {
    "centered": "CRD (centered)",
    "uncentered": r"uncentered, no $\log Z$",
    "uncentered_oracle": r"uncentered + exact $\beta\log Z(c)$",
}
COLORS = {"centered": "tab:blue", "uncentered": "tab:red", "uncentered_oracle": "tab:gray"}
BETA = 1.0
HALF_WIDTH = 5.5


def contexts() -> list:
    """Four prompts: linear rewards of different directions, sizes and offsets :math:`r_0` (an offset
    leaves :math:`p^*` unchanged and moves :math:`\\log Z` by :math:`r_0/\\beta`), giving clearly
    different :math:`\\log Z(c)`; every target is in the student's family."""
    dt = torch.float64
    zero = torch.zeros(2, 2, dtype=dt)
    return [
        QuadraticFormReward(zero, torch.tensor([0.4, 0.0], dtype=dt), 1.5),
        QuadraticFormReward(zero, torch.tensor([0.0, 0.6], dtype=dt), -1.0),
        QuadraticFormReward(zero, torch.tensor([-0.5, -0.4], dtype=dt), 1.0),
        QuadraticFormReward(zero, torch.tensor([0.3, -0.5], dtype=dt), -2.0),
    ]


def exact_kl(student: GaussianMixture, target: GaussianMixture, n: int) -> float:
    """:math:`\\mathrm{KL}(p_\\theta\\|p^*)` by grid quadrature on [-5.5, 5.5]^2."""
    kl, _ = grid_kl(student.log_prob, target.log_prob, center=torch.zeros(2, dtype=torch.float64),
                    half_width=HALF_WIDTH, n=n)
    return kl


def train_reward_distillation(
    p_ref: GaussianMixture,
    rewards: list,
    targets: List[GaussianMixture],
    log_z: List[float],
    method: str,
    *,
    seed: int,
    steps: int,
    group: int,
    lr: float,
    eval_every: int,
    grid_n: int,
    sampler: str = "ref",
    on_eval: Callable[[int, int, float], None] | None = None,
) -> GMMStudent:
    """Train a per-context GMM student with one of :data:`METHODS` (Adam, learning rate decaying
    linearly from ``lr`` to ``lr/10``); call ``on_eval(step, c, kl)``.

    ``sampler='ref'`` draws each group from :math:`p_{ref}(\\cdot|c)` (decoupled, off-policy);
    ``'student'`` from the current student (detached, on-policy).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_ctx = len(rewards)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = GMMStudent(p_ref, n_tasks=n_ctx)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    # linear decay to lr/10 over the run: the final KLs measure the loss's optimum, not Adam's noise
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - 0.9 * k / steps)
    group_ids = torch.arange(n_ctx).repeat_interleave(group)
    normalizer = (BETA * torch.tensor(log_z, dtype=torch.float64))[group_ids]

    def evaluate(step: int) -> None:
        if on_eval is None:
            return
        with torch.no_grad():
            for c in range(n_ctx):
                on_eval(step, c, exact_kl(student.mixture(c), targets[c], grid_n))

    for step in range(steps):
        if step % eval_every == 0:
            evaluate(step)
        mix = [student.mixture(c) for c in range(n_ctx)]
        with torch.no_grad():
            src = p_ref if sampler == "ref" else None
            xs = [(src or mix[c]).sample(group, gen) for c in range(n_ctx)]
        x = torch.cat(xs)
        log_p_theta = torch.cat([mix[c].log_prob(xs[c]) for c in range(n_ctx)])
        reward = torch.cat([rewards[c](xs[c]) for c in range(n_ctx)])
        r_hat = implicit_reward(log_p_theta, p_ref.log_prob(x), BETA)
        if method == "centered":
            loss = crd_loss(r_hat, reward, group_ids)
        elif method == "uncentered":
            loss = uncentered_reward_loss(r_hat, reward)
        else:
            loss = uncentered_reward_loss(r_hat, reward, normalizer)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        sched.step()
    evaluate(steps)
    return student


RUNS = (("centered", "ref"), ("uncentered", "ref"), ("uncentered_oracle", "ref"),
        ("centered", "student"), ("uncentered", "student"))


def _run_label(method: str, sampler: str) -> str:
    return LABELS[method] + ("" if sampler == "ref" else " (on-policy)")


def run(out_dir: pathlib.Path, quick: bool = True, seeds: Sequence[int] = (0,)) -> dict:
    """Centered vs uncentered CRD across contexts; figure ``crd_centering.png``."""
    out_dir = pathlib.Path(out_dir)
    p_ref = default_setting().p_ref
    rewards = contexts()
    tilts = [p_ref.tilt(r, BETA) for r in rewards]
    targets, log_z = [t for t, _ in tilts], [float(lz) for _, lz in tilts]
    n_ctx = len(rewards)
    steps, group, eval_every, grid_n = (200, 96, 25, 101) if quick else (600, 256, 40, 201)
    curves: Dict[tuple, Dict[int, Dict[int, List[float]]]] = {r: {} for r in RUNS}
    metrics: List[dict] = []
    students = {}
    jobs = [(r, s) for r in RUNS for s in seeds]
    for (method, sampler), seed in tqdm(jobs, desc="crd_centering", leave=False):
        curve = curves[(method, sampler)].setdefault(int(seed), {c: [] for c in range(n_ctx)})

        def on_eval(step: int, c: int, kl: float, method=method, sampler=sampler, seed=seed, curve=curve) -> None:
            curve[c].append(kl)
            metrics.append({"figure": "crd_centering", "method": method, "sampler": sampler, "seed": int(seed),
                            "context": c, "log_Z": log_z[c], "step": step, "kl": kl})

        students[(method, sampler, seed)] = train_reward_distillation(
            p_ref, rewards, targets, log_z, method, seed=int(seed), steps=steps, group=group, lr=0.06,
            eval_every=eval_every, grid_n=grid_n, sampler=sampler, on_eval=on_eval)
    eval_steps = list(range(0, steps, eval_every)) + [steps]
    fin = {r: np.array([[curves[r][int(s)][c][-1] for c in range(n_ctx)] for s in seeds]).mean(0) for r in RUNS}

    # ---- figure: KL curves per context (off-policy), final KL vs log Z(c), densities of one context
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    styles = ["-", "--", ":", "-."]
    for m in METHODS:
        for c in range(n_ctx):
            ys = np.array([curves[(m, "ref")][int(s)][c] for s in seeds]).mean(0)
            ax.plot(eval_steps, ys, color=COLORS[m], ls=styles[c % 4], lw=1.4, label=LABELS[m] if c == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"exact KL($p_\theta(\cdot|c)\,\|\,p^*(\cdot|c)$) [nats]")
    ax.set_title(r"groups from $p_{ref}$ (off-policy); line style = context c", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for (m, smp) in RUNS:
        ax.plot(log_z, fin[(m, smp)], "o" if smp == "ref" else "^", color=COLORS[m],
                mfc=COLORS[m] if smp == "ref" else "none", label=_run_label(m, smp))
    ax.set_yscale("log")
    ax.set_xlabel(r"$\log Z(c)$ [nats]")
    ax.set_ylabel(f"final exact KL after {steps} steps [nats]")
    ax.legend(fontsize=6)
    ax = axes[2]
    c_show = 1
    ticks = torch.linspace(-HALF_WIDTH + 1, HALF_WIDTH - 1, 120, dtype=torch.float64)
    gx, gy = torch.meshgrid(ticks, ticks, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        img = targets[c_show].log_prob(grid).exp().reshape(120, 120).numpy()
        ax.imshow(img, origin="lower", extent=(float(ticks[0]), float(ticks[-1])) * 2, cmap="Greys", aspect="equal")
        for m in ("centered", "uncentered"):
            lp = students[(m, "ref", seeds[0])].mixture(c_show).log_prob(grid).reshape(120, 120).numpy()
            ax.contour(ticks.numpy(), ticks.numpy(), np.exp(lp), levels=4, colors=COLORS[m], linewidths=0.9)
    ax.set_title(f"context {c_show} (log Z = {log_z[c_show]:.2f}): target (grey),\n"
                 "centered (blue) / uncentered (red) students", fontsize=8)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    fig.suptitle(f"D8: centered reward distillation across prompts, beta={BETA}, group {group}, "
                 f"{len(seeds)} seed(s)", fontsize=10)
    figures = [save(fig, out_dir, "crd_centering.png")]

    rows = ["| context | log Z(c) | " + " | ".join(_run_label(m, smp) for m, smp in RUNS) + " |",
            "|---|---|" + "---|" * len(RUNS)]
    for c in range(n_ctx):
        rows.append(f"| {c} | {log_z[c]:.3f} | " + " | ".join(f"{fin[r][c]:.2e}" for r in RUNS) + " |")
    centered_max = float(fin[("centered", "ref")].max())
    unc_min = float(fin[("uncentered", "ref")].min())
    oracle_max = float(fin[("uncentered_oracle", "ref")].max())
    checks = [
        {"name": "D8: centered CRD recovers every p*(.|c) (max_c final exact KL, off-policy)", "value": centered_max,
         "threshold": "< 0.02 nats", "passed": centered_max < 0.02},
        {"name": "D8: uncentered loss without log Z misses every p*(.|c) (min_c final exact KL, off-policy)",
         "value": unc_min, "threshold": "> 0.05 nats", "passed": unc_min > 0.05},
        {"name": "D8: uncentered + exact log Z recovers p* (max_c final exact KL)", "value": oracle_max,
         "threshold": "< 0.03 nats", "passed": oracle_max < 0.03},
        {"name": "D8: log Z(c) differ across contexts (max - min)", "value": float(max(log_z) - min(log_z)),
         "threshold": "> 0.5 nats", "passed": max(log_z) - min(log_z) > 0.5},
    ]
    return {"checks": checks, "figures": figures,
            "tables": {"D8 final exact KL(p_theta(.|c) || p*(.|c)) [nats]": "\n".join(rows)}, "metrics": metrics}
