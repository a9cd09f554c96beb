"""D13: round-robin gradient accumulation = gradient of the task-averaged objective; schedules."""

import pytest
import torch

from toys.experiments import default_setting
from toys.students import GMMStudent, ResidualMLPStudent
from toys.train import Trainer, TrainConfig, task_schedule


SETTING = default_setting()


class _Recorder(torch.optim.Optimizer):
    """Records the accumulated gradient at ``step()`` and leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def _direct_objective(tr, k, traj, rewards=None):
    """The task loss written anew on a replayed trajectory: batch mean of the sum over steps of the
    per-step loss, from opd_ref's public losses (not the engine's objective registry)."""
    from opd_ref import ode_matching_loss, opd_kl_loss, ppo_surrogate_loss
    from opd_ref.estimators import estimator_surrogate
    from opd_ref.kernels import GaussianStep

    cfg, pol, total = tr.cfg, tr.policy, 0.0
    for n in range(traj.n_steps):
        t = traj.transition(n)
        with pol.active("student"):
            v = pol.velocity(t.x, t.sigma, k)
        c = t.coef
        step = GaussianStep(c.mean(t.x, v), torch.tensor(c.std, dtype=t.x.dtype))
        with torch.no_grad(), pol.active(None if cfg.method == "grpo" else f"teacher_{k}"):
            other = c.mean(t.x, pol.velocity(t.x, t.sigma, k))
        if cfg.method == "opd_ode":
            loss = ode_matching_loss(step.mean, other)
        elif cfg.method == "grpo":
            from opd_ref import gaussian_log_prob

            old = gaussian_log_prob(t.x_next, GaussianStep(c.mean(t.x, t.v_old), step.std))
            loss = ppo_surrogate_loss(gaussian_log_prob(t.x_next, step), old, rewards, cfg.clip_range)
            loss = loss + tr.betas[k] * opd_kl_loss(step, other)
        else:
            loss = estimator_surrogate("pathwise" if cfg.method == "opd_kl" else cfg.method, step, other, t.x_next)
        total = total + loss.mean()
    return total


@pytest.mark.parametrize("method", ["opd_kl", "opd_ode", "vopd", "grpo"])
def test_round_robin_accumulation_is_the_gradient_of_the_task_average(method):
    """One engine update's accumulated gradient (recorded at the optimiser step) equals autograd's
    gradient of the task-averaged objective on the same rollouts (replayed from the generator's state)."""
    from opd_ref.engine import policy_rollout

    torch.manual_seed(0)
    st = ResidualMLPStudent(SETTING.p_ref, 3, hidden=16)
    torch.nn.init.normal_(st.mlp[-1].weight, std=0.3)
    tr = Trainer(st, SETTING.targets, TrainConfig(method, batch_size=32, group_size=8),
                 reference=SETTING.p_ref, rewards=SETTING.rewards, betas=SETTING.betas, seed=0)
    params = list(st.parameters())
    tr.opt = _Recorder(params)
    state = tr.gen.get_state()
    tr.update([0, 1, 2])
    (accumulated,) = tr.opt.grads
    tr.gen.set_state(state)
    spec = tr.spec([0, 1, 2])
    objective = 0.0
    trajs = []
    for k in range(3):  # replay: the rollouts of the update, in round-robin order
        batch = tr.batch(k, 1.0)
        traj = policy_rollout(tr.policy, "student", batch, spec.sigmas, spec.kernel)
        trajs.append(traj)
        adv = None
        if method == "grpo":
            adv = tr.advantages(SETTING.rewards[k](traj.final).double())
        objective = objective + _direct_objective(tr, k, traj, adv) / 3
    direct = torch.autograd.grad(objective, params)
    for a, d in zip(accumulated, direct):
        torch.testing.assert_close(a, d, rtol=1e-12, atol=1e-14)
    assert sum(float(d.abs().sum()) for d in direct) > 0


def test_task_schedules():
    assert task_schedule("round_robin", 3, 2) == [[0, 1, 2], [0, 1, 2]]
    assert task_schedule("cascade", 3, 2) == [[0], [0], [1], [1], [2], [2]]
    with pytest.raises(ValueError, match="kind"):
        task_schedule("random", 3, 2)
    with pytest.raises(ValueError, match="n_updates"):
        task_schedule("cascade", 3, 0)


def test_cascade_trains_one_task_per_stage():
    # the GMM student has separate parameters per task, so a stage may only move its own task's
    # parameters: after stage k, tasks > k are still bitwise at initialisation
    st = GMMStudent(SETTING.p_ref, n_tasks=3)
    init = [p.detach().clone() for p in st.parameters()]
    tr = Trainer(st, SETTING.targets, TrainConfig("opd_kl", batch_size=16, lr=0.05), seed=0)
    schedule = task_schedule("cascade", 3, 3)
    for i, tasks in enumerate(schedule, start=1):
        tr.update(tasks)
        if i % 3 == 0:
            stage = i // 3 - 1
            for p, p0 in zip(st.parameters(), init):
                for k in range(3):
                    moved = not torch.equal(p[k], p0[k])
                    assert moved == (k <= stage), (stage, k)
            assert tr.task_updates == [3 if k <= stage else 0 for k in range(3)]
