"""Bad input: every public function of kernels, divergences, losses and estimators fails loudly with a
ValueError/TypeError that names the argument and shows what it received."""

import math

import pytest
import torch

from opd_ref import divergences as dv
from opd_ref import estimators as es
from opd_ref import kernels as kn
from opd_ref import losses as ls

F64 = torch.float64
X = torch.zeros(3, 4, dtype=F64)
V = torch.ones(3, 4, dtype=F64)
NAN = torch.tensor([[0.0, math.nan, 0.0, 0.0]] * 3, dtype=F64)
WIDE = torch.zeros(3, 5, dtype=F64)
STEP = kn.GaussianStep(X, torch.full((3, 1), 0.5, dtype=F64))
ZERO_STEP = kn.GaussianStep(X, torch.zeros(3, 1, dtype=F64))
B3 = torch.zeros(3, dtype=F64)


def _raises(exc, fn, *needles):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# (function, expected exception, substrings the message must contain)
SIGMA_CASES = [
    (lambda f: f(X, V, 0.0, 0.0), ValueError, ["sigma must lie in", "got 0"]),
    (lambda f: f(X, V, -0.2, -0.3), ValueError, ["sigma must lie in", "-0.2"]),
    (lambda f: f(X, V, 1.3, 0.5), ValueError, ["sigma must lie in", "1.3"]),
    (lambda f: f(X, V, 0.5, 0.5), ValueError, ["sigma_next must lie in [0, sigma)", "0.5"]),
    (lambda f: f(X, V, 0.5, 0.7), ValueError, ["sigma_next must lie in [0, sigma)", "0.7"]),
    (lambda f: f(X, V, 0.5, -0.1), ValueError, ["sigma_next must lie in [0, sigma)", "-0.1"]),
    (lambda f: f(X, V, math.nan, 0.1), ValueError, ["sigma must be finite"]),
    (lambda f: f(X, V, 0.5, math.inf), ValueError, ["sigma_next must be finite"]),
    (lambda f: f(X, V, torch.tensor([0.5, 0.4], dtype=F64), 0.1), ValueError, ["sigma", "(2,)", "(3,)"]),
    (lambda f: f(X, V, "0.5", 0.1), TypeError, ["sigma", "str"]),
    (lambda f: f(X, WIDE, 0.5, 0.4), ValueError, ["x and v must have the same shape", "(3, 4)", "(3, 5)"]),
    (lambda f: f(X, NAN, 0.5, 0.4), ValueError, ["v contains 3 non-finite"]),
    (lambda f: f(X.numpy(), V, 0.5, 0.4), TypeError, ["x must be a torch.Tensor", "ndarray"]),
    (lambda f: f(X.long(), V, 0.5, 0.4), TypeError, ["x must be a floating-point tensor"]),
]


@pytest.mark.parametrize("case", range(len(SIGMA_CASES)))
@pytest.mark.parametrize("kernel", ["ode", "sde", "cps"])
def test_kernels_reject_bad_states_and_sigmas(kernel, case):
    fn = {
        "ode": kn.ode_step,
        "sde": lambda x, v, s, sn: kn.sde_step(x, v, s, sn, 0.7),
        "cps": lambda x, v, s, sn: kn.cps_step(x, v, s, sn, 0.5),
    }[kernel]
    call, exc, needles = SIGMA_CASES[case]
    _raises(exc, lambda: call(fn), *needles)


def test_sigma_one_only_with_opt_in_for_the_sde():
    _raises(ValueError, lambda: kn.sde_step(X, V, 1.0, 0.9, 0.7), "sigma must lie in (0, 1)", "sigma_one='flowgrpo'")
    _raises(ValueError, lambda: kn.sde_step(X, V, 0.5, 0.4, 0.7, sigma_one="bogus"), "sigma_one", "bogus")
    _raises(ValueError, lambda: kn.sde_std_t(1.0, 0.7), "sigma must lie in (0, 1)", "flowgrpo")
    _raises(ValueError, lambda: kn.sde_std_t(1.0, 0.7, sigma_one="flowgrpo"), "needs sigma_next")
    _raises(ValueError, lambda: kn.sde_std_t(0.5, 0.7, sigma_one="nope"), "sigma_one", "nope")
    # sigma = 1 is fine for ode_step and cps_step (nothing divides by 1 - sigma)
    assert bool(torch.isfinite(kn.ode_step(X, V, 1.0, 0.9)).all())
    assert bool(torch.isfinite(kn.cps_step(X, V, 1.0, 0.9, 0.5).mean).all())


def test_noise_levels_are_checked():
    _raises(ValueError, lambda: kn.sde_step(X, V, 0.5, 0.4, -0.1), "noise_level must be >= 0", "-0.1")
    _raises(ValueError, lambda: kn.sde_step(X, V, 0.5, 0.4, math.nan), "noise_level must be finite")
    _raises(ValueError, lambda: kn.cps_step(X, V, 0.5, 0.4, 1.5), "noise_level must be [0, 1]", "1.5")
    _raises(ValueError, lambda: kn.cps_step(X, V, 0.5, 0.4, -0.5), "noise_level must be [0, 1]", "-0.5")
    _raises(ValueError, lambda: kn.sde_std_t(0.5, -1.0), "noise_level must be >= 0", "-1.0")
    _raises(ValueError, lambda: kn.sde_std_t(math.nan, 0.5), "sigma must be finite")
    _raises(TypeError, lambda: kn.sde_std_t([0.5], 0.5), "sigma must be a float or a tensor", "list")
    _raises(ValueError, lambda: kn.sde_std_t(0.5, 0.5, sigma_next=0.6), "sigma_next must lie in [0, sigma)")


def test_kl_coefficients_reject_bad_input():
    _raises(ValueError, lambda: kn.sde_kl_coefficient(0.5, 0.4, 0.0), "noise_level must be > 0")
    _raises(ValueError, lambda: kn.sde_kl_coefficient(0.5, 0.4, -1.0), "noise_level must be >= 0", "-1")
    _raises(ValueError, lambda: kn.sde_kl_coefficient(1.0, 0.4, 0.7), "sigma must lie in (0, 1)")
    _raises(ValueError, lambda: kn.sde_kl_coefficient(0.5, 0.6, 0.7), "sigma_next must lie in [0, sigma)")
    _raises(ValueError, lambda: kn.cps_kl_coefficient(0.5, 0.0, 0.7), "CPS KL needs sigma_next > 0")
    _raises(ValueError, lambda: kn.cps_kl_coefficient(0.5, 0.4, 0.0), "noise_level > 0")
    _raises(ValueError, lambda: kn.cps_kl_coefficient(0.5, 0.4, 2.0), "noise_level must be [0, 1]", "2")
    _raises(ValueError, lambda: kn.cps_kl_coefficient(torch.tensor([0.5, 0.6]), torch.tensor([0.4, 0.5, 0.1]), 0.5),
            "sigma_next", "(3,)")


def test_gaussian_step_and_conversions_reject_bad_input():
    _raises(ValueError, lambda: kn.GaussianStep(X, torch.full((3, 2), 0.5, dtype=F64)), "GaussianStep.std", "(3, 2)", "(3, 4)")
    _raises(ValueError, lambda: kn.GaussianStep(X, torch.full((3, 1), -0.5, dtype=F64)), "GaussianStep.std must be >= 0", "-0.5")
    _raises(ValueError, lambda: kn.GaussianStep(NAN, 0.5), "GaussianStep.mean contains 3 non-finite")
    _raises(ValueError, lambda: kn.GaussianStep(X, math.inf), "GaussianStep.std contains 1 non-finite")
    _raises(TypeError, lambda: kn.GaussianStep(X, "0.5"), "GaussianStep.std must be a torch.Tensor", "str")
    _raises(ValueError, lambda: kn.GaussianStep(torch.tensor(0.0, dtype=F64), 0.5), "GaussianStep.mean must have at least 1", "()")
    _raises(ValueError, lambda: kn.sigma_to_t(1.5), "sigma must lie in [0, 1]", "1.5")
    _raises(ValueError, lambda: kn.sigma_to_t(torch.tensor([0.2, math.nan])), "sigma must lie in [0, 1]")
    _raises(TypeError, lambda: kn.sigma_to_t("0.3"), "sigma must be a float or a tensor", "str")
    _raises(ValueError, lambda: kn.t_to_sigma(-0.1), "t must lie in [0, 1]", "-0.1")


def test_divergences_reject_bad_input():
    for fn in (dv.gaussian_log_prob, dv.gaussian_log_prob_dim_mean, dv.cps_log_prob_flowgrpo):
        _raises(ValueError, lambda: fn(WIDE, STEP), "x_next and step.mean must have the same shape", "(3, 5)", "(3, 4)")
        _raises(ValueError, lambda: fn(NAN, STEP), "x_next contains 3 non-finite")
        _raises(TypeError, lambda: fn(X, (X, 0.5)), "step must be a GaussianStep", "tuple")
    for fn in (dv.gaussian_log_prob, dv.gaussian_log_prob_dim_mean):
        _raises(ValueError, lambda: fn(X, ZERO_STEP), "step.std must be strictly positive", "no log-prob")
    _raises(ValueError, lambda: dv.same_cov_kl(X, WIDE, 0.5), "mean_p and mean_q must have the same shape", "(3, 5)")
    _raises(ValueError, lambda: dv.same_cov_kl(X, V, 0.0), "std must be strictly positive")
    _raises(ValueError, lambda: dv.same_cov_kl(X, V, -1.0), "std must be strictly positive", "-1")
    _raises(ValueError, lambda: dv.same_cov_kl(X, V, math.nan), "std must be finite")
    _raises(ValueError, lambda: dv.same_cov_kl(NAN, V, 0.5), "mean_p contains 3 non-finite")
    _raises(ValueError, lambda: dv.same_cov_kl(X, V, torch.ones(2, dtype=F64)), "std", "(2,)")
    _raises(ValueError, lambda: dv.same_cov_kl(X, V, torch.ones(3, 3, dtype=F64)), "std must be broadcastable", "(3, 3)")
    _raises(TypeError, lambda: dv.same_cov_kl(X, V, "1"), "std must be a float or a tensor", "str")
    _raises(ValueError, lambda: dv.diag_gaussian_kl(X, 0.5, V, -0.5), "std_q must be strictly positive")
    _raises(ValueError, lambda: dv.diag_gaussian_kl(X, torch.ones(3, 2, dtype=F64), V, 0.5), "std_p must be broadcastable", "(3, 2)")
    _raises(ValueError, lambda: dv.diag_gaussian_kl(X, 0.5, WIDE, 0.5), "mean_p and mean_q must have the same shape")
    _raises(ValueError, lambda: dv.flowgrpo_step_kl(X, V, 0.0), "std_t must be strictly positive")
    _raises(ValueError, lambda: dv.flowgrpo_step_kl(X, NAN, 0.5), "mean_q contains 3 non-finite")


def test_losses_reject_bad_input():
    _raises(TypeError, lambda: ls.opd_kl_loss(X, V), "student must be a GaussianStep", "Tensor")
    _raises(ValueError, lambda: ls.opd_kl_loss(STEP, WIDE), "student.mean and teacher_mean must have the same shape", "(3, 5)")
    _raises(ValueError, lambda: ls.opd_kl_loss(ZERO_STEP, V), "std must be strictly positive")
    _raises(ValueError, lambda: ls.opd_kl_loss(STEP, NAN), "teacher_mean contains 3 non-finite")
    _raises(ValueError, lambda: ls.ode_matching_loss(X, WIDE), "x_next_student and x_next_teacher must have the same shape")
    _raises(ValueError, lambda: ls.ode_matching_loss(NAN, X), "x_next_student contains 3 non-finite")
    _raises(ValueError, lambda: ls.ppo_surrogate_loss(X, X, X), "log_prob must have shape (B,)", "(3, 4)")
    _raises(ValueError, lambda: ls.ppo_surrogate_loss(B3, torch.zeros(2, dtype=F64), B3), "old_log_prob must have shape (3,)", "(2,)")
    _raises(ValueError, lambda: ls.ppo_surrogate_loss(B3, B3, torch.zeros(4, dtype=F64)), "advantage must have shape (3,)", "(4,)")
    _raises(ValueError, lambda: ls.ppo_surrogate_loss(B3, B3, B3 + math.inf), "advantage contains 3 non-finite")
    for bad in (0.0, -0.2, math.nan, math.inf, True, "0.2"):
        _raises(ValueError, lambda: ls.ppo_surrogate_loss(B3, B3, B3, clip_range=bad), "clip_range must be a positive", repr(bad))
    _raises(ValueError, lambda: ls.sde_kl_rescaled(X, V, V, 0.5, 0.4, 0.7, rescale="a"), "rescale", "'a'")
    _raises(ValueError, lambda: ls.sde_kl_rescaled(X, V, V, 1.0, 0.4, 0.7), "sigma must lie in (0, 1)")
    _raises(ValueError, lambda: ls.sde_kl_rescaled(X, V, V, 0.5, 0.4, -0.7), "noise_level must be >= 0")
    _raises(ValueError, lambda: ls.sde_kl_rescaled(X, V, WIDE, 0.5, 0.4, 0.7), "x and v_teacher must have the same shape", "(3, 5)")
    _raises(ValueError, lambda: ls.sde_kl_rescaled(X, V, NAN, 0.5, 0.4, 0.7), "v_teacher contains 3 non-finite")
    _raises(ValueError, lambda: ls.deterministic_limit_weight(0.5, 0.5), "sigma_next must lie in [0, sigma)")
    _raises(ValueError, lambda: ls.deterministic_limit_weight(1.0, 0.5), "sigma must lie in (0, 1)")


def test_estimators_reject_bad_input():
    x_next = X + 0.1
    for fn in (es.ppo_kl_surrogate, es.k1_surrogate, es.vopd_surrogate):
        _raises(TypeError, lambda: fn(X, V, x_next), "student must be a GaussianStep")
        _raises(ValueError, lambda: fn(STEP, WIDE, x_next), "student.mean and teacher_mean must have the same shape")
        _raises(ValueError, lambda: fn(STEP, V, WIDE), "student.mean and x_next must have the same shape", "(3, 5)")
        _raises(ValueError, lambda: fn(STEP, V, NAN), "x_next contains 3 non-finite")
        _raises(ValueError, lambda: fn(ZERO_STEP, V, x_next), "std must be strictly positive")
    _raises(TypeError, lambda: es.pathwise_surrogate(X, V), "student must be a GaussianStep")
    _raises(ValueError, lambda: es.pathwise_surrogate(STEP, NAN), "teacher_mean contains 3 non-finite")
    _raises(ValueError, lambda: es.estimator_surrogate("reinforce", STEP, V, x_next), "name must be one of", "'reinforce'")
    _raises(TypeError, lambda: es.estimator_surrogate(3, STEP, V, x_next), "name must be a str", "int")
    _raises(ValueError, lambda: es.estimator_surrogate("k1", STEP, V), "needs the sampled action x_next")
    J, delta = torch.ones(4, 2, dtype=F64), torch.ones(4, dtype=F64)
    _raises(ValueError, lambda: es.analytic_moments(J, torch.ones(3, dtype=F64), 0.5), "J must be (D, P) and delta (D,)", "(4, 2)", "(3,)")
    _raises(ValueError, lambda: es.analytic_moments(torch.ones(4, dtype=F64), delta, 0.5), "J must have at least 2 dim(s)", "(4,)")
    _raises(ValueError, lambda: es.analytic_moments(J, delta, 0.0), "s must be a positive finite scalar", "0.0")
    _raises(ValueError, lambda: es.analytic_moments(J, delta, math.inf), "s must be a positive finite scalar")
    _raises(ValueError, lambda: es.analytic_moments(J, delta, torch.ones(2)), "s must be a positive finite scalar")
    _raises(TypeError, lambda: es.analytic_moments(J, delta, "1"), "s must be a float or a 0-d tensor", "str")
    _raises(ValueError, lambda: es.analytic_moments(J * math.nan, delta, 0.5), "J contains 8 non-finite")
    theta = torch.ones(2, dtype=F64, requires_grad=True)
    _raises(ValueError, lambda: es.per_sample_grads((theta * 2).reshape(1, 2), [theta]), "loss must have shape (B,)", "(1, 2)")
    _raises(ValueError, lambda: es.per_sample_grads(B3, [theta]), "loss does not require grad")
    _raises(ValueError, lambda: es.per_sample_grads(theta * 2, [torch.ones(2)]), "params must be a non-empty sequence")
    _raises(ValueError, lambda: es.per_sample_grads(theta * 2, []), "params must be a non-empty sequence")
