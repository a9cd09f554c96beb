"""Trainers and metrics: OPD-KL reaches the exact target, GRPO advantages, exact densities and KLs."""

import math

import pytest
import torch

from toys.experiments import default_setting
from toys.experiments.training import exact_kl, expected_reward
from toys.gmm import GaussianMixture
from toys.metrics import energy_distance, euler_flow_log_prob, grid_kl
from toys.students import GMMStudent
from opd_ref.engine import AdvantageSpec, KernelSpec, rollout
from opd_ref.engine.grid import sigma_grid
from toys.train import Trainer, TrainConfig

SETTING = default_setting()



def test_opd_kl_parametric_student_reaches_the_tilted_target():
    # deterministic (seeded); start KL(p_ref || p*_0) = 4.38 nats, measured end 0.065 nats
    st = GMMStudent(SETTING.p_ref, 1)
    tr = Trainer(st, [SETTING.targets[0]], TrainConfig("opd_kl", noise_level=0.7, batch_size=64, lr=0.05), seed=0)
    kl0 = exact_kl(st, SETTING.targets[0], SETTING)
    for _ in range(100):
        tr.update([0])
    kl = exact_kl(st, SETTING.targets[0], SETTING)
    assert kl0 > 4.0
    assert kl < 0.12
    assert tr.forward_passes == 100 * 2 * 10 * 64 and tr.teacher_passes == 100 * 10 * 64


def test_grid_kl_is_the_d7_closed_form():
    # KL(p_ref || p*) = -E_ref[r]/beta + log Z with E_ref[r] in closed form (D7)
    for k in range(SETTING.n_tasks):
        kl, mass = grid_kl(SETTING.p_ref.log_prob, SETTING.targets[k].log_prob, center=SETTING.center,
                           half_width=SETTING.half_width, n=161)
        closed = -expected_reward(SETTING.p_ref, SETTING.rewards[k]) / SETTING.betas[k] + SETTING.log_Z[k]
        assert abs(mass - 1) < 1e-6
        assert abs(kl - closed) < 1e-6


def test_euler_sampler_density_is_exact_for_a_gaussian():
    # for a Gaussian the velocity is affine, so the Euler sampler x_N = A x_0 + b pushes N(0, I) to N(b, A A^T)
    p = GaussianMixture.gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64),
                                 torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64))
    x, lp = euler_flow_log_prob(p.velocity, 50, 8, torch.Generator().manual_seed(0))
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = rollout(p.velocity, pts, sigma_grid(8), KernelSpec("ode")).final
    b = out[0]
    A = torch.stack([out[1] - b, out[2] - b], dim=1)
    ref = torch.distributions.MultivariateNormal(b, covariance_matrix=A @ A.T).log_prob(x)
    torch.testing.assert_close(lp, ref, rtol=1e-10, atol=1e-10)


def test_group_advantages_are_standardised_per_group():
    """The trainer's normaliser is the engine's AdvantageSpec, chunked per group of group_size rows."""
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 11.0, 13.0], dtype=torch.float64)
    a = AdvantageSpec(ddof=1, eps=1e-8, group_size=4)(r)
    for g in a.reshape(2, 4):
        assert abs(float(g.mean())) < 1e-12 and abs(float(g.std()) - 1) < 1e-6
    # the default (Flow-GRPO: population std + 1e-4), written anew
    b = AdvantageSpec(group_size=4)(r)
    for g, rg in zip(b.reshape(2, 4), r.reshape(2, 4)):
        c = rg - rg.mean()
        torch.testing.assert_close(g, c / ((c**2).mean().sqrt() + 1e-4), rtol=1e-14, atol=1e-14)
    assert Trainer(GMMStudent(SETTING.p_ref), [], TrainConfig("grpo", batch_size=8, group_size=4),
                   reference=SETTING.p_ref, rewards=SETTING.rewards[:1]).advantages.group_size == 4
    with pytest.raises(ValueError, match="multiple of group_size 3"):
        AdvantageSpec(group_size=3)(r)


def test_energy_distance():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(energy_distance(x, x)) < 1e-12
    assert energy_distance(x, x + 1.0) > 0.5


def test_train_config_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        TrainConfig("ppo")  # the old toys name: the engine's is ppo_opd
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig("opd_kl", batch_size=0)
    with pytest.raises(ValueError, match="noise_level"):
        TrainConfig("opd_kl", noise_level=0.0)
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig("grpo", batch_size=20, group_size=16)
    with pytest.raises(ValueError, match="needs reference and rewards"):
        Trainer(GMMStudent(SETTING.p_ref), [], TrainConfig("grpo"))
    assert math.isfinite(TrainConfig("opd_ode", noise_level=0.0).lr)
