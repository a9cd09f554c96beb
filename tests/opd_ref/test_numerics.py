"""Numerics that once gave silent wrong results: the meaning of a 1-D std, half-precision sigmas, and
the PPO surrogate of an all-equal-reward group."""

import math

import pytest
import torch

from opd_ref import GaussianStep, cps_step, gaussian_log_prob, ode_step, opd_kl_loss, ppo_surrogate_loss, sde_step
from opd_ref.engine import KernelSpec, ObjectiveSpec, StepInputs

F64 = torch.float64


def test_a_1d_std_is_per_sample_everywhere():
    # B = 3 equals the last event dim: before, GaussianStep broadcast a (3,) std per dimension while
    # opd_kl_loss read it per sample
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 3, generator=g, dtype=F64)
    x = torch.randn(3, 3, generator=g, dtype=F64)
    t_mean = torch.randn(3, 3, generator=g, dtype=F64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    step = GaussianStep(mean, std)
    assert step.std.shape == (3, 1)
    per_sample = torch.distributions.Normal(mean, std[:, None])
    torch.testing.assert_close(gaussian_log_prob(x, step), per_sample.log_prob(x).sum(1), rtol=1e-13, atol=0)
    want_kl = torch.distributions.kl_divergence(per_sample, torch.distributions.Normal(t_mean, std[:, None])).sum(1)
    torch.testing.assert_close(opd_kl_loss(step, t_mean), want_kl, rtol=1e-13, atol=0)
    eps = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(step.sample(torch.Generator().manual_seed(1)), mean + std[:, None] * eps)
    with pytest.raises(ValueError, match=r"GaussianStep.std of shape \(4,\) is ambiguous"):
        GaussianStep(torch.zeros(3, 4, dtype=F64), torch.ones(4, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_keep_float32_coefficients(dtype):
    x = torch.zeros(2, 4, dtype=dtype)
    v = torch.ones(2, 4, dtype=dtype)
    want_std = 0.7 * math.sqrt(0.995 / 0.005) * math.sqrt(0.005)  # 0.698, not 0.984 from bf16 sigmas
    st = sde_step(x, v, 0.995, 0.99, 0.7)
    assert st.std.dtype == torch.float32
    assert float(st.std.flatten()[0]) == pytest.approx(want_std, rel=1e-6)
    assert float(cps_step(x, v, 0.995, 0.99, 0.7).std.flatten()[0]) == pytest.approx(0.99 * math.sin(0.35 * math.pi), rel=1e-6)
    torch.testing.assert_close(ode_step(x, v, 0.995, 0.99), torch.full((2, 4), -0.005, dtype=torch.float32))


@pytest.mark.parametrize("clip", [None, 0.2])
def test_ppo_surrogate_is_zero_at_zero_advantage_even_when_the_ratio_overflows(clip):
    lp = torch.tensor([100.0, 1000.0, 0.1], dtype=torch.float32, requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([0.0, 0.0, 1.0])
    loss = ppo_surrogate_loss(lp, old, adv, clip)
    assert bool(torch.isfinite(loss).all()) and float(loss[0]) == 0.0 and float(loss[1]) == 0.0
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert bool(torch.isfinite(g).all()) and float(g[0]) == 0.0
    # the engine's GRPO objective uses the same formula
    c = KernelSpec("sde", 0.7).coefficients(0.5, 0.4)
    v_old = torch.zeros(3, 2)
    v = torch.full((3, 2), 50.0)  # far from the behaviour policy: log-ratio in the hundreds
    out = ObjectiveSpec("grpo", clip_range=clip)(StepInputs(c, v, v_old, torch.ones(3, 2), None, adv))
    assert float(out.loss[0]) == 0.0 and float(out.loss[1]) == 0.0


# ---- issue 11, item 5: KL and log-ratio from the velocity gap; no NaN on finite inputs ----------------

from opd_ref import kernel_kl, kernel_log_ratio, bregman_divergence, gopd_sample_loss, gopd_step_loss  # noqa: E402
from opd_ref import estimators, tilted_log_ratio  # noqa: E402

# the grid: sigma in [1e-6, 0.9999], |dt| down to 1e-5 (and the step to 0), D up to 262144
KL_STEPS = [(0.9, 0.8), (0.9999, 0.9998), (0.9999, 0.99989), (0.5, 0.49999), (1e-6, 5e-7), (1e-5, 0.0), (0.3, 0.29999)]


def _ref_kl(x, v_s, v_t, s, sn, a, kind):
    """float64 oracle: the closed form on the two kernel means built in float64 (written anew)."""
    step = sde_step if kind == "sde" else cps_step
    p, q = step(x.double(), v_s.double(), s, sn, a), step(x.double(), v_t.double(), s, sn, a)
    return ((p.mean - q.mean) ** 2).flatten(1).sum(1) / (2.0 * p.std.flatten() ** 2)


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("D", [16 * 32 * 32, 262144])
def test_float32_kernel_kl_meets_the_relative_error_target(kind, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, D, generator=g)
    v_s = torch.randn(2, D, generator=g)
    v_t = v_s + 1e-3 * torch.randn(2, D, generator=g)
    worst_kernel, worst_means = 0.0, 0.0
    for s, sn in KL_STEPS:
        if kind == "cps" and sn == 0.0:
            continue  # CPS has std 0 at sigma' = 0
        ref = _ref_kl(x, v_s, v_t, s, sn, 0.7, kind)
        got = kernel_kl(v_s, v_t, s, sn, 0.7, kind=kind)
        assert got.dtype == torch.float32
        worst_kernel = max(worst_kernel, float(((got.double() - ref) / ref).abs().max()))
        step = sde_step if kind == "sde" else cps_step
        means = opd_kl_loss(step(x, v_s, s, sn, 0.7), step(x, v_t, s, sn, 0.7).mean)
        worst_means = max(worst_means, float(((means.double() - ref) / ref).abs().max()))
    assert worst_kernel <= 1e-4
    assert worst_means > 1e-2  # the two-means form really does lose precision on this grid


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_float32_kernel_log_ratio_meets_the_absolute_error_target(kind):
    D = 65536
    g = torch.Generator().manual_seed(7)
    step = sde_step if kind == "sde" else cps_step
    worst_new, worst_old = 0.0, 0.0
    for s, sn in [(0.9, 0.8), (0.5, 0.4), (0.2, 0.1), (1e-3, 5e-4), (0.9999, 0.9998)]:
        x, v_s = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
        v_t = v_s + 1e-3 * torch.randn(2, D, generator=g)
        x_next = step(x, v_s, s, sn, 0.7).sample(g)
        p, q = step(x.double(), v_s.double(), s, sn, 0.7), step(x.double(), v_t.double(), s, sn, 0.7)
        ref = torch.distributions.Normal(p.mean, p.std).log_prob(x_next.double()).sum(1) - \
            torch.distributions.Normal(q.mean, q.std).log_prob(x_next.double()).sum(1)
        got = kernel_log_ratio(x_next, x, v_s, v_t, s, sn, 0.7, kind=kind)
        worst_new = max(worst_new, float((got.double() - ref).abs().max()))
        old = gaussian_log_prob(x_next, step(x, v_s, s, sn, 0.7)) - gaussian_log_prob(x_next, step(x, v_t, s, sn, 0.7))
        worst_old = max(worst_old, float((old.double() - ref).abs().max()))
    assert worst_new <= 1e-5
    assert worst_old > 1e-4  # the difference of two summed float32 log-probs misses it


def test_k1_and_vopd_advantages_are_accurate_in_float32_at_65536_dims():
    D = 65536
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(1, D, generator=g)
    t_mean = mean + 2e-3 * torch.randn(1, D, generator=g)
    std = 0.5
    x_next = mean + std * torch.randn(1, D, generator=g)
    d, e = (mean.double() - t_mean.double()) / std, (x_next.double() - mean.double()) / std
    lr_ref = float((d * (e + 0.5 * d)).sum())  # log pi_s - log pi_t, written anew
    kl_ref = float(0.5 * (d * d).sum())
    lr = float(estimators._log_ratio(GaussianStep(mean, std), t_mean, x_next))
    assert abs(lr - lr_ref) < 1e-5 and abs(kl_ref) > 1e-2
    # vOPD's advantage is lr - KL = delta . eps exactly
    step = GaussianStep(mean.clone().requires_grad_(True), std)
    lp = float(gaussian_log_prob(x_next, GaussianStep(mean, std)))
    got = float(estimators.vopd_surrogate(step, t_mean, x_next)) / lp
    assert abs(got - (lr_ref - kl_ref)) < 1e-5


def test_no_nan_on_large_finite_inputs():
    big = torch.tensor([800.0, -800.0, 80.0, 0.0, 1e-7])
    for name in ("kl", "reverse_kl", "pearson_chi2", "jensen_shannon"):
        for star in (None, torch.tensor([800.0, 0.0, -80.0, 0.0, 0.0]), big.clone()):
            for dtype in (torch.float32, torch.float64):
                out = bregman_divergence(big.to(dtype), name, None if star is None else star.to(dtype))
                assert not bool(torch.isnan(out).any()), (name, out)
                assert bool((out >= 0).all())
                if star is not None and torch.equal(star, big):
                    assert bool((out == 0).all())  # D_h(r || r) = 0 exactly, also at r = e^800
    # KL at log_ratio = 800 (inf - inf before): e^800 (800 - 1) + 1 overflows float64 -> inf, not NaN
    assert float(bregman_divergence(torch.tensor([800.0], dtype=F64), "kl")[0]) == math.inf
    # G-OPD: two KLs that each overflow float32 with lam = 2 gave inf - inf
    mean = torch.full((2, 4), 1e20)
    st = GaussianStep(mean, 1e-3)
    out = gopd_step_loss(st, torch.full((2, 4), -1e20), torch.full((2, 4), -1e20), 2.0)
    assert bool(torch.isinf(out).all()) and bool((out > 0).all())
    out = gopd_step_loss(st, mean, mean * 0.999, 2.0)  # finite combination (negative), was NaN
    ref = gopd_step_loss(GaussianStep(mean.double(), 1e-3), mean.double(), mean.double() * 0.999, 2.0)
    assert not bool(torch.isnan(out).any()) and bool((out == ref.float()).all())
    lp = torch.tensor([3e38, -3e38])
    assert not bool(torch.isnan(gopd_sample_loss(lp, lp, lp, 2.0)).any())


def test_bregman_closed_forms_match_high_precision_definition():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 1000  # the definition cancels catastrophically; 1000 digits resolve it
    defs = {
        "kl": (lambda r: r * mpmath.log(r), lambda r: mpmath.log(r) + 1),
        "reverse_kl": (lambda r: -mpmath.log(r), lambda r: -1 / r),
        "pearson_chi2": (lambda r: (r - 1) ** 2, lambda r: 2 * (r - 1)),
        "jensen_shannon": (lambda r: (r * mpmath.log(2 * r / (1 + r)) + mpmath.log(2 / (1 + r))) / 2,
                           lambda r: mpmath.log(2 * r / (1 + r)) / 2),
    }
    vals = [-800.0, -30.0, -1.0000001, -1.0, -0.3, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 0.3, 1.0, 1.0000001, 30.0, 800.0]
    for name, (h, hp) in defs.items():
        for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            lr = torch.tensor([a for a in vals for _ in vals], dtype=dtype)
            lrs = torch.tensor([b for _ in vals for b in vals], dtype=dtype)
            got = bregman_divergence(lr, name, lrs)
            for i in range(lr.shape[0]):
                r, rs = mpmath.e ** mpmath.mpf(float(lr[i])), mpmath.e ** mpmath.mpf(float(lrs[i]))
                want = h(r) - h(rs) - hp(rs) * (r - rs)
                if want > torch.finfo(dtype).max:
                    assert float(got[i]) == math.inf, (name, float(lr[i]), float(lrs[i]))
                else:
                    assert abs(float(got[i]) - float(want)) <= rtol * float(want) + 1e-300, (name, float(lr[i]), float(lrs[i]), float(got[i]), float(want))


def test_tilted_log_ratio_rejects_a_log_z_that_would_broadcast_or_is_not_a_number():
    v = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"log_z must be a float or a 0-d tensor, got shape \(3, 1\)"):
        tilted_log_ratio(v, v, v, 1.0, torch.zeros(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="log_z must be finite"):
        tilted_log_ratio(v, v, v, 1.0, math.nan)
    for bad in ("1", None):
        with pytest.raises(TypeError, match="log_z must be a float or a 0-d tensor"):
            tilted_log_ratio(v, v, v, 1.0, bad)
    assert tilted_log_ratio(v, v, v, 1.0, torch.tensor(0.5, dtype=F64)).shape == (3,)


def test_python_float_sigmas_are_not_rounded_to_float32():
    # sigma = 1 - 1e-7 rounds to 1 - 1.19e-7 in float32: 1 - sigma was off by 19 %
    x, v = torch.zeros(1, 2), torch.ones(1, 2)
    st = sde_step(x, v, 1.0 - 1e-7, 1.0 - 2e-7, 0.7)
    want = 0.7 * math.sqrt((1.0 - 1e-7) / 1e-7) * math.sqrt(1e-7)
    assert float(st.std.flatten()[0]) == pytest.approx(want, rel=1e-6)
    assert float(ode_step(x, v, 0.5, 0.5 - 1e-7)[0, 0]) == pytest.approx(-1e-7, rel=1e-6)


def test_ppo_ratio_that_overflows_alone_times_a_small_advantage_is_finite():
    lp = torch.tensor([100.0, 100.0], requires_grad=True)
    adv = torch.tensor([1e-30, -1e-30])
    loss = ppo_surrogate_loss(lp, torch.zeros(2), adv)  # e^100 overflows float32, e^100 * 1e-30 does not
    want = -math.exp(100.0) * 1e-30
    assert float(loss[0]) == pytest.approx(want, rel=1e-5) and float(loss[1]) == pytest.approx(-want, rel=1e-5)
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert bool(torch.isfinite(g).all())


# ---- found by tests/opd_ref/test_fuzz.py (values and gradients against float64) ----------------------

from opd_ref import diag_gaussian_kl, distribution_matching_surrogate, bregman_generator_surrogate  # noqa: E402
from opd_ref.estimators import k1_surrogate, vopd_surrogate  # noqa: E402
from opd_ref.dimo import generalized_jeffrey  # noqa: E402


def _js_oracle(lr, lrs):
    """JS Bregman divergence at 200 digits as (r A - B) / 2, A = sp(-l*) - sp(-l), B = sp(l) - sp(l*)
    (the definition h(r) - h(r*) - h'(r*)(r - r*) rearranged; checked against it below).  The definition
    itself would need ~1e30 digits at log r = 1e30."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 200
    l, ls = mpmath.mpf(lr), mpmath.mpf(lrs)
    sp = lambda t: t + mpmath.log1p(mpmath.e ** -t) if t > 0 else mpmath.log1p(mpmath.e ** t)  # noqa: E731
    return (mpmath.e ** l * (sp(-ls) - sp(-l)) - (sp(l) - sp(ls))) / 2


def test_js_oracle_is_the_definition():
    mpmath = pytest.importorskip("mpmath")
    for lr, lrs in ((0.3, -2.0), (5.0, 1.0), (-3.0, 4.0)):
        mpmath.mp.dps = 200
        r, rs = mpmath.e ** mpmath.mpf(lr), mpmath.e ** mpmath.mpf(lrs)
        h = lambda t: (t * mpmath.log(2 * t / (1 + t)) + mpmath.log(2 / (1 + t))) / 2  # noqa: E731
        want = h(r) - h(rs) - mpmath.log(2 * rs / (1 + rs)) / 2 * (r - rs)
        assert abs(_js_oracle(lr, lrs) - want) < mpmath.mpf(10) ** -150


def test_js_bregman_of_huge_log_ratios_is_not_a_cancelled_logarithm():
    # log r = 1.5e28, log r* = 1.96e30: D ~ (log r* - log r)/2; before, log r + log|A| cancelled to
    # +-1e21 in float32 and D came out -inf.  Also log r = 5 against log r* = -1e30 (r* ~ 0) and back.
    pairs = [(1.4751e28, 1.9643e30), (5.0, -1e30), (-1e30, 5.0), (-40.0, -1e3), (1e3, 40.0)]
    g = torch.Generator().manual_seed(81)  # the fuzz case that found it (seed 422): 1e30 * N(0, 1) pairs
    lr = torch.cat([torch.tensor([a for a, _ in pairs]), 1e30 * torch.randn(6, generator=g)])
    lrs = torch.cat([torch.tensor([b for _, b in pairs]), 1e30 * torch.randn(6, generator=g)])
    got = bregman_divergence(lr, "jensen_shannon", lrs)
    for i in range(lr.shape[0]):
        want = float(_js_oracle(float(lr[i]), float(lrs[i])))
        if want > 3.4e38:
            assert float(got[i]) == math.inf
        else:
            assert float(got[i]) == pytest.approx(want, rel=1e-5), (float(lr[i]), float(lrs[i]))


def test_bregman_gradients_are_finite_or_signed_inf_where_the_divergence_overflows():
    # closed forms of dD/dlog r and dD/dlog r* (written anew): KL e^l d and -(r - r*); Pearson 2r(r - r*)
    # and -2r*(r - r*); autograd through the stable forward gave inf * 0 = NaN at log r = 1e30
    lr = torch.tensor([1e30, 1e30, 800.0, -1e30, 3.0], dtype=F64, requires_grad=True)
    lrs = torch.tensor([1e30, -5.0, 0.0, 2.0, 1.0], dtype=F64, requires_grad=True)
    for name in ("kl", "reverse_kl", "pearson_chi2", "jensen_shannon"):
        g_lr, g_lrs = torch.autograd.grad(bregman_divergence(lr, name, lrs).sum(), [lr, lrs])
        assert not bool(torch.isnan(g_lr).any() or torch.isnan(g_lrs).any()), name
        assert float(g_lr[0]) == 0.0 and float(g_lrs[0]) == 0.0  # r = r*: a minimum
    a, b = torch.tensor(3.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    for name, want in (("kl", (math.exp(3) * 2, -(math.exp(3) - math.e))),
                       ("pearson_chi2", (2 * math.exp(3) * (math.exp(3) - math.e), -2 * math.e * (math.exp(3) - math.e)))):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        got = torch.autograd.grad(bregman_divergence(x[None], name, y[None]).sum(), [x, y])
        assert float(got[0]) == pytest.approx(want[0], rel=1e-12) and float(got[1]) == pytest.approx(want[1], rel=1e-12)
    x = torch.tensor([1e30], requires_grad=True)
    (g,) = torch.autograd.grad(bregman_divergence(x, "kl").sum(), [x])
    assert float(g[0]) == math.inf  # e^l d beyond the float range


def test_python_float_stds_are_exact_in_the_computing_dtype():
    # a float32 mean with std 1e-3 and a float64 mean with std 1e-3: the stds are the same number, so
    # the KL is the mean term only (before: 1e-3 was rounded to float32 on one side, KL 4.5e-15)
    m_p = torch.full((1, 2), 1e-30, dtype=F64)
    m_q = torch.full((1, 2), 1e-30)
    assert float(diag_gaussian_kl(m_p, 1e-3, m_q, 1e-3)[0]) == pytest.approx(float(((m_p - m_q.double()) ** 2).sum() / 2e-6), abs=1e-50)


def test_di_bregman_weight_beyond_float32_is_kept_in_float64():
    # Pearson weight 2 r at log r = 100 (2.7e43) overflows float32; the float64 surrogate is finite
    x = torch.tensor([[1e-20, 2e-20]], requires_grad=True)
    s_f, s_r = torch.tensor([[1e-20, -1e-20]]), torch.zeros(1, 2)
    got = bregman_generator_surrogate(x, s_f, s_r, torch.tensor([100.0]), "pearson_chi2")
    want = 2 * math.exp(100.0) * (1e-20 * 1e-20 - 1e-20 * 2e-20)
    assert float(got[0]) == pytest.approx(want, rel=1e-5)
    (g,) = torch.autograd.grad(got.sum(), [x])
    assert float(g[0, 0]) == pytest.approx(2 * math.exp(100.0) * 1e-20, rel=1e-5)
    with pytest.raises(ValueError, match="log_ratio up to 800"):
        bregman_generator_surrogate(x, s_f, s_r, torch.tensor([800.0]), "pearson_chi2")
    assert float(distribution_matching_surrogate(x, s_f, s_r, weight=1e30)[0]) == pytest.approx(-1e-10, rel=1e-5)


def test_ppo_clip_binding_on_an_overflowing_ratio_has_a_finite_gradient():
    lp = torch.tensor([200.0, 200.0, -200.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0])
    loss = ppo_surrogate_loss(lp, torch.zeros(3), adv, 0.2)
    # A > 0 with r >> 1 + eps: the clip binds, loss -(1 + eps) A, gradient 0 (was 0 * inf = NaN);
    # A < 0: min picks r A = -e^200 -> the loss is +inf and its gradient inf; r ~ 0, A < 0: clip binds
    assert float(loss[0]) == pytest.approx(-1.2) and float(loss[1]) == math.inf
    assert float(loss[2]) == pytest.approx(0.8)
    (g,) = torch.autograd.grad(loss.sum(), [lp])
    assert g.tolist() == [0.0, math.inf, 0.0]  # d(e^200)/dlog r = e^200 beyond the float32 range


def test_k1_and_vopd_gradients_round_a_float64_product_not_inf_times_zero():
    # advantage ~ 1e61 (beyond float32) times a zero residual in one dim: gradient 0 there, not NaN
    mean = torch.tensor([[1e30, 0.0]], requires_grad=True)
    t_mean = torch.tensor([[-1e30, 0.0]])
    x_next = torch.tensor([[1e30, 0.0]])
    for fn in (k1_surrogate, vopd_surrogate):
        (g,) = torch.autograd.grad(fn(GaussianStep(mean, 1.0), t_mean, x_next).sum(), [mean])
        assert not bool(torch.isnan(g).any()) and float(g[0, 1]) == 0.0 and float(g[0, 0]) == 0.0


def test_dimo_float32_kl_of_near_uniform_tokens_is_accurate():
    # logits of size 1e-3: KL ~ 1e-6 is a sum of p (log p - log q) cancelling to second order; in
    # float32 it was off by 12 %.  Oracle: the same formula in float64 on the same float32 values.
    g = torch.Generator().manual_seed(4)
    a = (1e-3 * torch.randn(3, 3, 4, generator=g))
    b = (1e-3 * torch.randn(3, 3, 4, generator=g))
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    want = (lp.exp() * (lp - lq)).sum((-1, -2))
    got = generalized_jeffrey(a, b, 0.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "pearson_chi2", "jensen_shannon"])
def test_bregman_analytic_gradients_match_finite_differences(name):
    # the backward pass is hand-written (stable forms): gradcheck against central differences of the
    # forward in float64, on both sides of the |d| = 1 branch switch
    g = torch.Generator().manual_seed(11)
    lr = (2.0 * torch.randn(40, generator=g, dtype=F64)).requires_grad_()
    lrs = (2.0 * torch.randn(40, generator=g, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: bregman_divergence(a, name, b), (lr, lrs))
