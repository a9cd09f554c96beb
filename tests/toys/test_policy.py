"""The toys' engine policy: adapters, forward-pass counts, and stacked runs training each run exactly as alone."""

import pytest
import torch

from opd_ref.engine import ObjectiveSpec, Policy, StepInputs, policy_rollout
from tests.toys.test_multitask import _Recorder
from toys.experiments import default_setting
from toys.policy import STUDENT, ToyPolicy, teacher_name
from toys.students import GMMStudent, ResidualMLPStudent, StackedGMMStudent, StackedMLPStudent
from toys.train import Trainer, TrainConfig

SETTING = default_setting()
F64 = torch.float64


def _mlp_students(n: int):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        st = ResidualMLPStudent(SETTING.p_ref, 3, hidden=16)
        torch.nn.init.normal_(st.mlp[-1].weight, std=0.3)
        out.append(st)
    return out


def test_adapters_are_the_exact_flows_and_the_student():
    st = _mlp_students(1)[0]
    pol = ToyPolicy(st, SETTING.targets, SETTING.p_ref)
    assert isinstance(pol, Policy) and pol.event_shape == (2,) and pol.state_dtype == F64
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pol.active(STUDENT):
        torch.testing.assert_close(pol.velocity(x, 0.4, 2), st.velocity(x, 0.4, 2), rtol=0, atol=0)
    for k in range(3):
        with pol.active(teacher_name(k)):
            torch.testing.assert_close(pol.velocity(x, 0.4, k), SETTING.targets[k].velocity(x, 0.4), rtol=0, atol=0)
    with pol.active(None):
        torch.testing.assert_close(pol.velocity(x, 0.4, 0), SETTING.p_ref.velocity(x, 0.4), rtol=0, atol=0)
    assert pol.forward_passes[STUDENT] == 5 and pol.forward_passes[None] == 5
    with pytest.raises(ValueError, match="unknown adapter 'teacher_3'"):
        with pol.active("teacher_3"):
            pass
    with pytest.raises(ValueError, match="only the adapter 'student'"):
        pol.trainable_parameters(teacher_name(0))


def test_stacked_students_equal_their_runs():
    sts = _mlp_students(3)
    stack = StackedMLPStudent(sts)
    xs = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    v = stack.velocity(xs, 0.7, 1)
    for r, st in enumerate(sts):
        torch.testing.assert_close(v[r], st.velocity(xs[r], 0.7, 1), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(stack.run(r).velocity(xs[r], 0.7, 1), st.velocity(xs[r], 0.7, 1), rtol=0, atol=0)
    g = StackedGMMStudent(SETTING.p_ref, 2, 3)
    with torch.no_grad():
        g.means.add_(0.1 * torch.randn(g.means.shape, generator=torch.Generator().manual_seed(2), dtype=F64))
    vg = g.velocity(xs[:2], 0.3, 2)
    for r in range(2):
        torch.testing.assert_close(vg[r], g.run(r).velocity(xs[r], 0.3, 2), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"xs must have shape \(2, B, 2\)"):
        g.velocity(xs, 0.3, 0)
    pol = ToyPolicy(stack, SETTING.targets, SETTING.p_ref)
    with pytest.raises(ValueError, match="not a multiple of the 3 stacked runs"):
        with pol.active(STUDENT):
            pol.velocity(torch.zeros(4, 2, dtype=F64), 0.5, 0)
    with pytest.raises(ValueError, match=r"one GaussianMixture per run \(3\)"):
        ToyPolicy(stack, [SETTING.targets[:2]], SETTING.p_ref)


@pytest.mark.parametrize("method", ["opd_kl", "grpo"])
def test_a_stacked_update_gives_each_run_its_own_gradient(method):
    """R = 3 stacked runs, one update: run r's accumulated gradient equals the gradient of run r's own
    objective (a single-run policy of student r on run r's block of the same rollouts)."""
    R, B, K = 3, 8, 2
    sts = _mlp_students(R)
    stack = StackedMLPStudent(sts)
    cfg = TrainConfig(method, batch_size=B, group_size=4)
    tr = Trainer(stack, SETTING.targets[:K], cfg, reference=SETTING.p_ref, rewards=SETTING.rewards[:K],
                 betas=SETTING.betas[:K], seed=3)
    tr.opt = _Recorder(list(stack.parameters()))
    state = tr.gen.get_state()
    tr.update(list(range(K)))
    (accumulated,) = tr.opt.grads
    assert tr.forward_passes == K * B * cfg.n_steps * 2  # per run: rollout + loss, samples x steps
    tr.gen.set_state(state)
    spec = tr.spec(list(range(K)))
    trajs = [policy_rollout(tr.policy, STUDENT, tr.batch(k, 1.0), spec.sigmas, spec.kernel) for k in range(K)]
    for r, st in enumerate(sts):
        single = ToyPolicy(st, SETTING.targets[:K], SETTING.p_ref)
        rows = slice(r * B, (r + 1) * B)
        objective = 0.0
        for k, traj in enumerate(trajs):
            adv = tr.advantages(SETTING.rewards[k](traj.final[rows]).double()) if method == "grpo" else None
            for n in spec.trained_steps:
                t = traj.transition(n)
                x = t.x[rows]
                with torch.no_grad(), single.active(None if method == "grpo" else teacher_name(k)):
                    v_other = single.velocity(x, t.sigma, k)
                with single.active(STUDENT):
                    v = single.velocity(x, t.sigma, k)
                inputs = StepInputs(t.coef, v, t.v_old[rows], t.noise[rows], v_other, adv)
                objective = objective + spec.objective(inputs).loss.mean() / K
        direct = torch.autograd.grad(objective, list(st.mlp.parameters()))
        for a, d in zip(accumulated, direct):
            torch.testing.assert_close(a[r], d, rtol=1e-11, atol=1e-13)
        assert sum(float(d.abs().sum()) for d in direct) > 0
