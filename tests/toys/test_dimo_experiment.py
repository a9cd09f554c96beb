"""D19 on the exact discrete toy (toys.experiments.dimo): the experiment's exact expectations and a
reduced training run (deterministic given the seed; every KL is an exact sum over 64 sequences)."""

import pytest
import torch

from opd_ref.dimo import dimo_generator_surrogate
from toys import mdm
from toys.experiments import dimo as exp


@pytest.fixture(scope="module")
def toy():
    return exp.DiMOToy()


@pytest.mark.parametrize("r_init", [1.0, 0.6])
def test_expected_update_is_the_weighted_sum_of_surrogate_gradients(toy, r_init):
    # the experiment's einsum equals autograd of sum_{c, x, M} rho(c) p(x|c) P(M) surrogate(z[c])
    states, rho = mdm.init_states(r_init)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(len(states), 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    psi_table = toy.posterior_logits(mdm.generator_distribution(z.detach(), rho))
    n_seq, n_pat = toy.remasked_index.shape
    s_idx = toy.remasked_index.reshape(-1)
    mask = toy.state_masked[s_idx]
    total = 0.0
    for c in range(len(states)):
        p_x = torch.exp(torch.log_softmax(z.detach()[c], -1)[torch.arange(3), toy.sequences].sum(-1))  # (N,)
        w = rho[c] * p_x[:, None] * toy.pattern_probs[None, :]
        sur = dimo_generator_surrogate(z[c].expand(len(s_idx), -1, -1), toy.teacher_table[s_idx], psi_table[s_idx],
                                       mask, 0.5)
        total = total + (w.reshape(-1) * sur).sum()
    (auto,) = torch.autograd.grad(total, z)
    torch.testing.assert_close(toy.expected_update(z, rho, 0.5), auto, rtol=1e-12, atol=1e-15)
    # for the fully masked prior it is the gradient of the frozen-state objective (D19)
    (grad_j,) = torch.autograd.grad(toy.frozen_objective(z, rho, 0.5), z)
    gap = float((auto - grad_j).norm() / grad_j.norm())
    assert gap < 1e-10 if r_init == 1.0 else gap > 0.05, gap


def test_hybrid_prior_fits_the_data_and_the_fully_masked_prior_cannot(toy):
    # 200 steps, batch 128, exact psi: hybrid from 0.075 to 0.052 nats (< 0.08); fully masked stays > 1.3
    finals = {}
    for init, r_init in exp.INITS.items():
        rows = []
        exp.train_dimo(toy, r_init, "exact", 0.5, seed=0, steps=200, batch=128, lr_g=0.05, lr_psi=0.1,
                       eval_every=200, on_eval=lambda step, m, rows=rows: rows.append(m))
        finals[init] = rows[-1]
    assert finals["hybrid"]["kl"] < 0.08, finals
    assert finals["fully masked"]["kl"] > 1.3, finals
    masses = finals["hybrid"]["mode_masses"]
    data = mdm.mode_masses(toy.p_data).tolist()
    assert max(abs(a - b) for a, b in zip(masses, data)) < 0.05, (masses, data)


def test_learned_psi_run_and_reduced_experiment(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(exp.QUICK, "steps", 30)
    monkeypatch.setitem(exp.QUICK, "eval_every", 10)
    monkeypatch.setitem(exp.QUICK, "noise_free_steps", 20)
    monkeypatch.setitem(exp.QUICK, "batch", 64)
    res = exp.run(tmp_path, quick=True, seeds=(0, 1))
    assert res["figures"] == ["dimo.png"] and (tmp_path / "dimo.png").stat().st_size > 10_000
    assert len(res["tables"]) == 2 and all("| hybrid |" in t for t in res["tables"].values())
    checks = {c["name"]: c for c in res["checks"]}
    exact = [c for n, c in checks.items() if n.startswith("D19: fully masked prior")]
    assert len(exact) == 2 and all(c["passed"] for c in exact), exact
    points = [m for m in res["metrics"] if m.get("figure") == "dimo" and "kl" in m]
    assert {(m["init"], m["psi"]) for m in points} == {(i, p) for i in exp.INITS for p in exp.PSI_MODES}
    with pytest.raises(ValueError, match="psi_mode must be one of"):
        exp.train_dimo(toy, 1.0, "oracle", 0.5, seed=0, steps=1, batch=4, lr_g=0.1, lr_psi=0.1, eval_every=1)
