"""Students (a) and (b): initialisation, exactness, per-sample parameter copies, bad input."""

import pytest
import torch

from toys.experiments import default_setting
from toys.students import GMMStudent, ResidualMLPStudent

SETTING = default_setting()


def _x(n=32, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("sigma", [1.0, 0.7, 0.2, 0.0])
def test_residual_student_starts_at_the_base(sigma):
    st = ResidualMLPStudent(SETTING.p_ref, 3)
    x = _x()
    for k in range(3):
        assert torch.equal(st.velocity(x, sigma, k), SETTING.p_ref.velocity(x, sigma))


def test_residual_student_is_task_conditioned_and_trainable():
    torch.manual_seed(0)
    st = ResidualMLPStudent(SETTING.p_ref, 3, hidden=8)
    torch.nn.init.normal_(st.mlp[-1].weight)
    x = _x()
    v0, v1 = st.velocity(x, 0.5, 0), st.velocity(x, 0.5, 1)
    assert (v0 - v1).abs().max() > 1e-3
    v0.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in st.parameters())


def test_replicated_parameters_match_the_module():
    torch.manual_seed(1)
    st = ResidualMLPStudent(SETTING.p_ref, 3, hidden=8)
    torch.nn.init.normal_(st.mlp[-1].weight)
    x = _x(5)
    rep = st.replicated_params(5)
    torch.testing.assert_close(st.velocity_per_sample(x, 0.3, 2, rep), st.velocity(x, 0.3, 2), rtol=1e-13, atol=1e-13)
    # sample i's loss only reaches copy i: per-sample gradients in one backward
    st.velocity_per_sample(x, 0.3, 2, rep)[:, 0].sum().backward()
    g_rep = rep[-1].grad  # (5, 2) bias of the last layer
    assert torch.equal(g_rep[:, 0], torch.ones(5, dtype=torch.float64))
    assert torch.equal(g_rep[:, 1], torch.zeros(5, dtype=torch.float64))


def test_gmm_student_is_its_mixture_and_exact():
    st = GMMStudent(SETTING.p_ref, n_tasks=2)
    for k in range(2):
        m = st.mixture(k)
        torch.testing.assert_close(m.weights, SETTING.p_ref.weights, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.means, SETTING.p_ref.means, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.covs, SETTING.p_ref.covs, rtol=0, atol=1e-12)
    x = _x()
    torch.testing.assert_close(st.velocity(x, 0.4, 1), SETTING.p_ref.velocity(x, 0.4), rtol=1e-9, atol=1e-9)
    st.velocity(x, 0.4, 1).pow(2).sum().backward()
    assert st.means.grad[1].abs().sum() > 0 and st.means.grad[0].abs().sum() == 0


def test_students_reject_bad_input():
    st = ResidualMLPStudent(SETTING.p_ref, 3)
    with pytest.raises(ValueError, match="task"):
        st.velocity(_x(), 0.5, 3)
    with pytest.raises(TypeError, match="task"):
        st.velocity(_x(), 0.5, 1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        st.velocity(torch.zeros(4, 3, dtype=torch.float64), 0.5, 0)
    with pytest.raises(ValueError, match="sigma"):
        st.velocity(_x(4), torch.ones(3, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="n_tasks"):
        GMMStudent(SETTING.p_ref, n_tasks=0)
