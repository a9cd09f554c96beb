"""The interference toy (D13 / D18 benchmark): its exact targets against quadrature, the conflict and
difficulty it is built on, the limited capacity of its models, and a reduced end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from toys.experiments import interference as itf
from toys.experiments import default_setting

DT = torch.float64


def _grid(h=0.04, half=7.0):
    t = torch.arange(-half, half + h / 2, h, dtype=DT)
    X, Y = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([X.flatten(), Y.flatten()], 1), h * h


def test_interference_targets_and_log_z_against_quadrature():
    """p*_k = p_ref e^{r_k/beta_k} / Z_k: log Z_k and the tilted mixture's density against a 2D Riemann sum
    (step 0.04 on [-7, 7]^2: the Gaussian tails beyond are < 1e-12; for these smooth integrands the sum's
    error is far below the tolerances)."""
    s = itf.interference_setting()
    x, dA = _grid()
    log_ref = s.p_ref.log_prob(x)
    for r, b, tgt, lz in zip(s.rewards, s.betas, s.targets, s.log_Z):
        log_unnorm = log_ref + r(x) / b
        lz_quad = float(torch.logsumexp(log_unnorm, 0) + math.log(dA))
        assert lz == pytest.approx(lz_quad, abs=1e-5)
        # the tilted density is the normalised one, point by point where it has mass
        dens = torch.exp(log_unnorm - lz_quad)
        mask = dens > 1e-4
        torch.testing.assert_close(tgt.log_prob(x[mask]), log_unnorm[mask] - lz_quad, rtol=0, atol=1e-4)


def _mean(p):
    return (p.weights[:, None] * p.means).sum(0)


def test_interference_tasks_conflict_and_differ_in_difficulty():
    """The exact mean shifts of tasks 0 and 1 point in opposite directions (cosine < -0.99), and the hard
    task's KL(p_ref || p*_2) = log Z_2 - E_ref[r_2] / beta_2 (D7; E_ref by quadrature) is at least 1.5x
    the other two; in the shared setting no two tasks' shifts are that opposed."""
    s = itf.interference_setting()
    x, dA = _grid()
    w_ref = torch.exp(s.p_ref.log_prob(x)) * dA
    shifts = [_mean(t) - _mean(s.p_ref) for t in s.targets]
    cos = float(shifts[0] @ shifts[1] / (shifts[0].norm() * shifts[1].norm()))
    assert cos < -0.99
    kl = [lz - float((w_ref * r(x)).sum()) / b for r, b, lz in zip(s.rewards, s.betas, s.log_Z)]
    assert all(k > 0 for k in kl)
    assert kl[2] > 1.5 * max(kl[0], kl[1]), kl
    d = default_setting()
    sh = [_mean(t) - _mean(d.p_ref) for t in d.targets]
    cos_d = [float(sh[i] @ sh[j] / (sh[i].norm() * sh[j].norm())) for i in range(3) for j in range(i + 1, 3)]
    assert min(cos_d) > -0.99


def test_interference_models_have_limited_shared_capacity():
    """Interference regime: one narrow hidden layer shared by the three tasks (the task enters as a one-hot
    input); the no-interference regime keeps the width-64 two-layer multitask student."""
    none, inter = itf.regimes()
    assert (none.name, none.hidden, none.depth) == ("no interference", 64, 2)
    assert (inter.name, inter.hidden, inter.depth) == ("interference", itf.NARROW, 1)
    st = itf._stack(inter, [0], 3, 0).run(0)
    n_params = sum(p.numel() for p in st.parameters())
    assert n_params == (2 + 1 + 3) * itf.NARROW + itf.NARROW + itf.NARROW * 2 + 2
    assert n_params < 60


@pytest.mark.slow
def test_reduced_interference_run(tmp_path, monkeypatch):
    for k, v in dict(n_updates=1, n_eval=32, batch_size=16, n_evals=1).items():
        monkeypatch.setitem(itf.QUICK, k, v)
    out = itf.run(tmp_path, quick=True, seeds=[0])
    assert set(out) == {"checks", "figures", "tables", "metrics", "reading", "links", "seeds"}
    assert all((tmp_path / f).is_file() for f in out["figures"])
    # the reading quotes this run's numbers: the interference regime's joint-GRPO mean KL
    joint = [m["kl"] for m in out["metrics"] if m["regime"] == "interference" and m["method"] == "joint"]
    assert f"{sum(joint) / len(joint):.3g} for joint GRPO" in out["reading"]
    guard = out["checks"][-1]
    assert guard["passed"], guard  # GRPO-Guard's normalised log-ratio is centred at every step
    tables = "\n".join(out["tables"].values())
    for row in ("multi-task GRPO (joint)", "cascade GRPO", "multi-task OPD (NFT teachers", "GRPO-Guard teachers, own task"):
        assert row in tables
    methods = {m["method"] for m in out["metrics"]}
    assert {"joint", "cascade", "opd:grpo", "opd:grpo_guard", "opd:nft", "teacher:nft"} <= methods
