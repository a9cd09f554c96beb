r"""D16 estimators measured: R_dm's REINFORCE vs DMD's pathwise gradient for a Gaussian generator, and
RTDMD's hybrid gradient vs pure REINFORCE on a 3-step affine Gaussian generator with a quadratic reward.

Left: per-coordinate variance of the one-sample estimators of :math:`\partial\mathrm{KL}/\partial m`
against the mean gap, closed form (:func:`opd_ref.reward_dmd.gaussian_dmd_variances`, lines) and
measured from the library's surrogates (markers: variance of 100 batch means of 100, times 100).
Right: variance of the estimate of :math:`\partial\mathbb E[r]/\partial b_{N-1}` (the last step's
shift, a derivative that does not depend on the last step's std): RTDMD's hybrid (deterministic last
step, reward back-propagated) against pure REINFORCE with a last-step std :math:`s_{N-1}` (score function
on every step, the constant baseline :math:`\mathbb E[r]`).  Reference: ``rdm``, ``rtdmd``, ``dmd``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np
import torch

from opd_ref.distribution_matching import distribution_matching_surrogate
from opd_ref import reward_dmd as rd
from toys.figures import plt, save

DT = torch.float64
N_BATCHES, BATCH = 100, 100
A = torch.tensor([[0.9], [1.1], [0.8]], dtype=DT)
B = torch.tensor([[0.2], [-0.3], [0.5]], dtype=DT)
C, P = 0.7, 1.5  # reward r(x) = -P/2 (x - C)^2
S_EARLY = (0.5, 0.4)
S_LAST = (0.03, 0.1, 0.3, 1.0)


def _reward(x):
    return -0.5 * P * ((x - C) ** 2).sum(-1)


def _batch_grads(loss_fn, params, gen):
    """(N_BATCHES, n_params) batch-mean gradients of the library surrogate ``loss_fn(params, gen)``."""
    out = []
    for _ in range(N_BATCHES):
        ps = [p.clone().requires_grad_(True) for p in params]
        g = torch.autograd.grad(loss_fn(ps, gen).mean(), ps)
        out.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(out)


def _rdm_grads(gap, s, gen):
    m0, s0 = torch.tensor([gap], dtype=DT), torch.tensor([s], dtype=DT)
    mT, sT = torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT)

    def reinforce(ps, g):
        x = (m0 + s0 * torch.randn(BATCH, 1, generator=g, dtype=DT)).detach()
        log_p = (-0.5 * ((x - ps[0]) / s0) ** 2).sum(-1)
        ref = torch.distributions.Normal(m0, s0).log_prob(x).sum(-1)
        return rd.rdm_reinforce_surrogate(log_p, rd.dmd_reward(ref, torch.distributions.Normal(mT, sT).log_prob(x).sum(-1)))

    def pathwise(ps, g):
        x = ps[0] + s0 * torch.randn(BATCH, 1, generator=g, dtype=DT)
        return distribution_matching_surrogate(x, -(x - m0) / s0**2, -(x - mT) / sT**2)

    return _batch_grads(reinforce, [m0], gen), _batch_grads(pathwise, [m0], gen)


def _chain_grads(std, pathwise_last, baseline, gen):
    def loss(ps, g):
        noise = torch.randn(len(std) + 1, BATCH, 1, generator=g, dtype=DT)
        return rd.rtdmd_surrogate(ps[0], ps[1], std, noise, _reward, baseline=baseline, pathwise_last=pathwise_last)

    return _batch_grads(loss, [A, B], gen)  # columns: a_0, a_1, a_2, b_0, b_1, b_2


def _expected_reward(std):
    mu, var = rd.affine_chain_marginal(A, B, std)
    return float(-0.5 * P * ((mu - C) ** 2 + var).sum())


def run(out_dir: pathlib.Path, quick: bool = True, seeds: Sequence[int] = (0,)) -> dict:
    """Run the experiment (contract of :mod:`toys.reproduce`); ``quick`` does not change the sizes (the
    whole run takes a few seconds).  Reference: ``rdm``, ``rtdmd``."""
    out_dir = pathlib.Path(out_dir)
    gen = torch.Generator().manual_seed(int(list(seeds)[0]))
    checks, metrics = [], []
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    # ---- (i) R_dm vs DMD
    gaps = np.linspace(0.0, 2.0, 9)
    worst_z = 0.0
    variances = {}  # s -> closed-form variances at the smallest and the largest gap
    for s, colour in ((1.0, "tab:blue"), (0.7, "tab:red")):
        cf = [rd.gaussian_dmd_variances(torch.tensor([g], dtype=DT), torch.tensor([s], dtype=DT),
                                     torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT)) for g in gaps]
        variances[s] = [{k: float(v) for k, v in c.items()} for c in (cf[0], cf[-1])]
        ax0.plot(gaps, [float(c["reinforce"]) + 1e-4 for c in cf], "-", color=colour, label=f"REINFORCE (R_dm), s/s_T={s}")
        ax0.plot(gaps, [float(c["pathwise"]) + 1e-4 for c in cf], "--", color=colour,
                 label=f"pathwise DMD, s/s_T={s}" + (" (exactly 0)" if s == 1.0 else ""))
        for g, c in zip(gaps[::4], cf[::4]):
            rf, pw = _rdm_grads(float(g), s, gen)
            for name, est, closed in (("reinforce", rf, c["reinforce"]), ("pathwise", pw, c["pathwise"])):
                measured = float(est[:, 0].var()) * BATCH
                # the mean over batches: its error vs the closed-form mean dKL/dm
                mean = float(est[:, 0].mean())
                exact = float(rd.gaussian_dmd_gradient(torch.tensor([g], dtype=DT), torch.tensor([s], dtype=DT),
                                                    torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))["mean"])
                se = math.sqrt(float(closed) / (N_BATCHES * BATCH))
                if se > 0:
                    worst_z = max(worst_z, abs(mean - exact) / se)
                metrics.append({"figure": "reward_dmd_rdm", "estimator": name, "s": s, "gap": float(g),
                                "variance_measured": measured, "variance_closed_form": float(closed)})
                ax0.plot([g], [measured + 1e-4], "o" if name == "reinforce" else "s", color=colour, ms=5, mfc="none")
    ax0.set_yscale("log")
    ax0.set_xlabel("mean gap m - m_T (teacher N(0, 1))")
    ax0.set_ylabel("variance of one-sample dKL/dm  (+1e-4 to show 0)")
    ax0.set_title("(i) DMD as a reward: same mean, variance (lines closed form, markers measured)", fontsize=8)
    ax0.legend(fontsize=6, loc="center right")
    checks.append({"name": "D16 (i): R_dm REINFORCE and pathwise DMD means vs closed-form dKL/dm, worst |z| "
                           "(CLT, closed-form variance; 10000 samples per point)",
                   "value": worst_z, "threshold": "<= 5", "passed": bool(worst_z <= 5)})
    # ---- (ii) RTDMD hybrid vs pure REINFORCE
    hy = _chain_grads(S_EARLY + (0.0,), True, _expected_reward(S_EARLY + (0.0,)), gen)
    hy_var = float(hy[:, 5].var()) * BATCH
    rf_vars = []
    for s_last in S_LAST:
        std = S_EARLY + (s_last,)
        rf = _chain_grads(std, False, _expected_reward(std), gen)
        rf_vars.append(float(rf[:, 5].var()) * BATCH)
        metrics.append({"figure": "reward_dmd_rtdmd", "s_last": s_last, "reinforce_variance_b_last": rf_vars[-1]})
    metrics.append({"figure": "reward_dmd_rtdmd", "s_last": 0.0, "hybrid_variance_b_last": hy_var})
    mu, _ = rd.affine_chain_marginal(A, B, S_EARLY + (0.0,))
    exact_b_last = float(-P * (mu - C))  # d E[r] / d b_{N-1} = -P (mu_N - c), for every last-step std
    z_hy = abs(-float(hy[:, 5].mean()) - exact_b_last) / math.sqrt(hy_var / (N_BATCHES * BATCH))
    ax1.plot(S_LAST, rf_vars, "o-", color="tab:red", label="pure REINFORCE (last step std s_{N-1})")
    ax1.axhline(hy_var, color="tab:blue", ls="--", label="RTDMD hybrid (s_{N-1} = 0, reward backprop)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("last step std s_{N-1}")
    ax1.set_ylabel("variance of one-sample dE[r]/db_{N-1} (measured)")
    ax1.set_title("(ii) RTDMD: 3-step affine Gaussian generator, r = -1.5/2 (x - 0.7)^2", fontsize=8)
    ax1.legend(fontsize=7)
    figures = [save(fig, out_dir, "reward_dmd.png")]
    checks.append({"name": "D16 (ii): RTDMD hybrid mean of dE[r]/db_{N-1} vs closed form -P (mu_N - c), |z| (CLT, "
                           "measured variance, 10000 samples; the surrogate's gradient is minus the estimate)", "value": z_hy, "threshold": "<= 5",
                   "passed": bool(z_hy <= 5)})
    rows = ["| estimator of dE[r]/db_{N-1} | last-step std | variance (measured) | ratio to hybrid |", "|---|---|---|---|"]
    rows.append(f"| RTDMD hybrid | 0 | {hy_var:.4g} | 1 |")
    rows += [f"| pure REINFORCE | {s} | {v:.4g} | {v / hy_var:.1f} |" for s, v in zip(S_LAST, rf_vars)]
    tables = {"RTDMD hybrid vs pure REINFORCE (10000 samples each, baseline E[r])": "\n".join(rows)}
    ratios = [v / hy_var for v in rf_vars]
    (lo1, hi1), (lo7, hi7) = variances[1.0], variances[0.7]
    reading = (
        f"DMD read as a reward: for a Gaussian generator against the teacher N(0, 1), the batch means of REINFORCE "
        f"on R_dm = -log(p_theta/p_T) and of DMD's pathwise gradient are within {worst_z:.2f} standard errors of "
        f"the closed-form dKL/dm at every measured point"
        + (" (consistent with one mean)" if worst_z <= 5 else " (more than the 5 the check allows)")
        + f". Their variances (closed form): at the generator std 1 (the teacher's) the pathwise "
        f"estimator's is {lo1['pathwise']:.3g} at mean gap {gaps[0]:.0f} and {hi1['pathwise']:.3g} at gap "
        f"{gaps[-1]:.0f}, REINFORCE's {lo1['reinforce']:.3g} and {hi1['reinforce']:.3g}; at std 0.7 pathwise "
        f"{lo7['pathwise']:.3g} and {hi7['pathwise']:.3g}, REINFORCE {lo7['reinforce']:.3g} and "
        f"{hi7['reinforce']:.3g}. For the 3-step affine generator with a quadratic reward, RTDMD's hybrid estimate "
        f"of dE[r]/db_(N-1) is {z_hy:.2f} standard errors from the closed form"
        + (" (unbiased at this precision)" if z_hy <= 5 else "")
        + f", with variance {hy_var:.3g}; pure REINFORCE's variance is "
        + ", ".join(f"{r:.3g}x that at last-step std {s_last}" for s_last, r in zip(S_LAST, ratios)) + ".")
    return {"checks": checks, "figures": figures, "tables": tables, "metrics": metrics,
            "seeds": [int(list(seeds)[0])], "reading": reading,
            "links": [("claims row 21", "claims.md#claim-21"), ("claims row 22", "claims.md#claim-22"),
                      ("D16", "derivations/d16-reward-dmd.md")]}
