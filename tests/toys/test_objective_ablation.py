"""The distillation-objective ablation experiment (toys.experiments.objective_ablation) on reduced sizes:
the toy trainer accepts every ablation objective, the run returns the reproduce contract, and the
training-level identity bregman_kl == opd_kl holds to rounding (its check); the other checks run."""

import pytest

from opd_ref.engine import OBJECTIVES
from tests.toys.test_reproduce import assert_doc_target_exists
from toys.experiments import objective_ablation as exp
from toys.reproduce import REGISTRY
from toys.train import ABLATION_METHODS, TrainConfig


def test_toy_trainer_accepts_the_ablation_objectives():
    assert set(ABLATION_METHODS) <= set(OBJECTIVES)
    assert set(exp.OBJECTIVES) == set(ABLATION_METHODS) | {"opd_kl"}
    for m in ABLATION_METHODS:
        assert TrainConfig(method=m).method == m
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="bregman_hellinger")
    assert REGISTRY["objective_ablation"] == "toys.experiments.objective_ablation"


@pytest.mark.slow
def test_reduced_run(tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "QUICK", dict(tasks=[0], max_seeds=1, single_updates=2, eval_every=1, batch_size=16,
                                           multi_updates=1, n_evals=1, n_eval=50))
    out = exp.run(tmp_path, quick=True, seeds=(0,))
    assert set(out) == {"checks", "figures", "tables", "metrics", "seeds", "reading", "links"}
    assert out["seeds"] == [0]
    # the reading quotes this run's numbers: every objective with its final single-task KL (3 significant digits)
    final = {m: next(r["kl"] for r in reversed(out["metrics"]) if r["figure"] == "objective_ablation_single"
                     and r["method"] == m) for m in exp.OBJECTIVES}
    assert all(f"{m} {final[m]:.3g}" in out["reading"] for m in exp.OBJECTIVES), out["reading"]
    assert "$" not in out["reading"] and "|" not in out["reading"]
    for _, target in out["links"]:
        assert_doc_target_exists(target)
    assert (tmp_path / "objective_ablation.png").is_file()
    identity = out["checks"][0]
    assert identity["name"].startswith("D16: bregman_kl") and identity["passed"], identity
    assert len(out["checks"]) == 5
    table = next(iter(out["tables"].values()))
    assert all(f"`{m}`" in table for m in exp.OBJECTIVES)


@pytest.mark.slow
def test_reward_dmd_experiment_checks_pass(tmp_path):
    """The D16 estimator experiment: both CLT checks (means vs closed forms) pass at the fixed seed, and
    pure REINFORCE's variance for the last step's shift exceeds the hybrid's at every last-step std."""
    from toys.experiments import reward_dmd

    assert REGISTRY["reward_dmd"] == "toys.experiments.reward_dmd"
    out = reward_dmd.run(tmp_path, quick=True, seeds=(0,))
    assert [c["passed"] for c in out["checks"]] == [True, True], out["checks"]
    hybrid = next(m["hybrid_variance_b_last"] for m in out["metrics"] if "hybrid_variance_b_last" in m)
    reinforce = [m["reinforce_variance_b_last"] for m in out["metrics"] if "reinforce_variance_b_last" in m]
    assert len(reinforce) == 4 and min(reinforce) > 2 * hybrid
    assert (tmp_path / "reward_dmd.png").is_file()
    assert out["seeds"] == [0]
    # the reading quotes the measured hybrid variance and the ratio to it at every last-step std
    assert f"variance {hybrid:.3g};" in out["reading"], out["reading"]
    assert all(f"{v / hybrid:.3g}x that at last-step std {s}" in out["reading"] for s, v in zip(reward_dmd.S_LAST, reinforce))
    assert "$" not in out["reading"] and "|" not in out["reading"]
    for _, target in out["links"]:
        assert_doc_target_exists(target)
