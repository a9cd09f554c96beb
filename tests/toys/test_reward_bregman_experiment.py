"""D15 on the exact GMM toy (toys.experiments.reward_bregman; deterministic given the seed, every
divergence an exact grid quadrature)."""

import pytest

from toys.experiments import default_setting
from toys.experiments import reward_bregman as exp
from toys.experiments.divergence_family import GridDivergence, generator_problem
from toys.gmm import GaussianMixture


@pytest.mark.parametrize("h", ["kl", "reverse_kl"])
def test_generator_approaches_reward_tilted_teacher(h):
    # one-step generator on E_T[D_h(r || r*)], r* = e^{R/beta}/Z, at sigma = 0: exact KL(p_theta || p*)
    # falls > 20x in 80 steps (the minimiser is the tilted teacher, not the teacher)
    setting = default_setting()
    teacher, reward = setting.p_ref, setting.rewards[0]
    target, log_z = teacher.tilt(reward, exp.BETA)
    _, ring = generator_problem(setting)
    init = GaussianMixture(target.weights, ring.means, ring.covs)
    div = GridDivergence(81)
    vals = []
    exp.train_reward_generator(teacher, reward, float(log_z), init, h, seed=0, steps=80, batch=192, lr=0.02,
                               eval_every=80, on_eval=lambda step, m: vals.append((div("kl", m, target),
                                                                                 div("kl", m, teacher))))
    (start, _), (end, to_teacher) = vals
    assert end < start / 20, vals
    assert end < to_teacher / 10, vals  # it went to p*, not to p_T
