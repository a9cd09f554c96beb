"""D8 on exact toys: centered CRD recovers every p*(.|c) across prompts whose log Z(c) differ; the
uncentered loss without log Z does not (reduced run of toys.experiments.crd_centering; deterministic
given the seed, no Monte-Carlo tolerance involved: the KLs are exact grid quadratures)."""

import pytest
import torch

from toys.experiments import crd_centering as exp
from toys.experiments import default_setting


@pytest.fixture(scope="module")
def problem():
    p_ref = default_setting().p_ref
    rewards = exp.contexts()
    tilts = [p_ref.tilt(r, exp.BETA) for r in rewards]
    return p_ref, rewards, [t for t, _ in tilts], [float(z) for _, z in tilts]


def _final_kls(problem, method, steps=200):
    p_ref, rewards, targets, log_z = problem
    out = {}
    exp.train_reward_distillation(
        p_ref, rewards, targets, log_z, method, seed=0, steps=steps, group=96, lr=0.06, eval_every=steps,
        grid_n=101, on_eval=lambda s, c, kl: out.__setitem__((s, c), kl))
    return torch.tensor([out[(steps, c)] for c in range(len(rewards))])


def test_contexts_have_different_log_z(problem):
    log_z = torch.tensor(problem[3])
    assert float(log_z.max() - log_z.min()) > 2.0
    assert bool((log_z.abs() > 0.4).all())  # every prompt has a normaliser the uncentered loss misses


def test_centered_recovers_every_context_and_uncentered_does_not(problem):
    init = torch.tensor([exp.exact_kl(problem[0], t, 101) for t in problem[2]])
    centered = _final_kls(problem, "centered")
    uncentered = _final_kls(problem, "uncentered")
    assert bool((centered < 0.02).all()), centered
    assert bool((centered < 0.05 * init).all()), (centered, init)
    assert bool((uncentered > 0.05).all()), uncentered
    assert float(uncentered.min()) > 5 * float(centered.max())


def test_bad_method(problem):
    with pytest.raises(ValueError, match="method must be one of"):
        exp.train_reward_distillation(*problem, "weighted", seed=0, steps=1, group=4, lr=0.1, eval_every=1, grid_n=11)
