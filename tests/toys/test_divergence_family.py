"""D10/D11/D12 on exact GMM toys (reduced runs of toys.experiments.divergence_family; deterministic
given the seed; every divergence is an exact grid quadrature, no Monte-Carlo tolerance)."""

import pytest
import torch

from toys.experiments import default_setting
from toys.experiments import divergence_family as exp


@pytest.fixture(scope="module")
def setting():
    return default_setting()


@pytest.mark.parametrize("h", ["kl", "reverse_kl"])
def test_one_step_generator_approaches_gmm_teacher(setting, h):
    # D10 (h = KL is DMD) and D11: the generator's own divergence drops by > 50x in 100 steps
    teacher, init = exp.generator_problem(setting)
    div = exp.GridDivergence(81)
    vals = []
    exp.train_generator(teacher, init, h, seed=0, steps=100, batch=128, lr=0.02, eval_every=100,
                        on_eval=lambda step, m: vals.append(div(h, m, teacher)))
    assert vals[0] > 1.0
    assert vals[-1] < vals[0] / 50, vals


def test_gopd_student_moves_to_extrapolated_target(setting):
    # D12, lambda = 1.5: KL to p_ref (p_T / p_ref)^1.5 (= the tilt with beta / 1.5) falls 20x and ends
    # below the student's KL to the teacher itself
    p_ref, teacher = setting.p_ref, setting.targets[0]
    target, _ = p_ref.tilt(setting.rewards[0], setting.betas[0] / 1.5)
    div = exp.GridDivergence(81)
    vals = []
    exp.train_gopd(p_ref, teacher, 1.5, seed=0, steps=120, batch=256, lr=0.05, eval_every=120,
                   on_eval=lambda step, m: vals.append((div("kl", m, target), div("kl", m, teacher))))
    (own0, _), (own1, to_teacher) = vals
    assert own1 < own0 / 20, vals
    assert own1 < to_teacher, vals


def test_gopd_identities(setting):
    checks = exp._gopd_identity_checks(setting)
    assert all(c["passed"] for c in checks), checks
