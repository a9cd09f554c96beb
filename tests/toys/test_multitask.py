"""D13: round-robin gradient accumulation = gradient of the task-averaged objective; schedules."""

import pytest
import torch

from toys.experiments import default_setting
from toys.students import GMMStudent, ResidualMLPStudent
from toys.train import Trainer, TrainConfig, task_schedule


SETTING = default_setting()


@pytest.mark.parametrize("method", ["opd_kl", "opd_ode", "vopd", "grpo"])
def test_round_robin_accumulation_is_the_gradient_of_the_task_average(method):
    torch.manual_seed(0)
    st = ResidualMLPStudent(SETTING.p_ref, 3, hidden=16)
    torch.nn.init.normal_(st.mlp[-1].weight, std=0.3)
    tr = Trainer(st, [t.velocity for t in SETTING.targets], TrainConfig(method, batch_size=32, group_size=8),
                 reference=SETTING.p_ref.velocity, rewards=SETTING.rewards, betas=SETTING.betas, seed=0)
    trajs = {k: tr.rollout(k) for k in range(3)}
    params = list(st.parameters())
    st.zero_grad()
    tr.accumulate([0, 1, 2], trajs)
    accumulated = [p.grad.clone() for p in params]
    objective = sum(tr.task_loss(k, trajs[k]) for k in range(3)) / 3
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
    tr = Trainer(st, [t.velocity for t in SETTING.targets], TrainConfig("opd_kl", batch_size=16, lr=0.05), seed=0)
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
