"""GaussianMixture: densities, marginals, posterior identities (docs/conventions.md), autograd, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.toys._fixtures import F64, random_gmm, three_mode_gmm
from toys.gmm import GaussianMixture, gaussian_kl, geometric_tilt


def _torch_mixture(p: GaussianMixture) -> torch.distributions.Distribution:
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=p.weights),
        torch.distributions.MultivariateNormal(p.means, covariance_matrix=p.covs),
    )


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(0.0, 1.0))
def test_marginal_log_prob_matches_torch_distributions(seed: int, sigma: float) -> None:
    p = random_gmm(seed)
    q = p.marginal(sigma)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2
    oracle = _torch_mixture(q).log_prob(x)
    torch.testing.assert_close(q.log_prob(x), oracle, rtol=1e-12, atol=1e-12)
    # per-sample sigma path (posterior) agrees with the marginal's log_prob
    sig = torch.full((7,), sigma, dtype=F64)
    torch.testing.assert_close(p.marginal_log_prob(x, sig), oracle, rtol=1e-12, atol=1e-12)


def test_marginal_is_the_law_of_the_interpolant_moments() -> None:
    """Exact moments: mean (1-s) m, covariance (1-s)^2 Cov + s^2 I."""
    p = three_mode_gmm()
    for s in (0.0, 0.25, 0.8, 1.0):
        q = p.marginal(s)
        torch.testing.assert_close(q.mean(), (1 - s) * p.mean(), rtol=0, atol=1e-14)
        torch.testing.assert_close(
            q.covariance(), (1 - s) ** 2 * p.covariance() + s**2 * torch.eye(2, dtype=F64), rtol=0, atol=1e-13
        )


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(0.01, 0.99))
def test_posterior_identities_and_autograd_score(seed: int, sigma: float) -> None:
    """E[x0|x] = x - s v, E[eps|x] = x + (1-s) v, score = -(x + (1-s) v)/s = grad log p_s."""
    p = random_gmm(seed)
    x = 1.5 * torch.randn(9, 2, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
    v = p.velocity(x, sigma)
    x0 = p.denoise(x, sigma)
    _, eps_hat, _ = p.posterior(x, sigma)
    torch.testing.assert_close(x0, x - sigma * v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_hat, x + (1 - sigma) * v, rtol=1e-10, atol=1e-10)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.marginal(sigma).log_prob(xr).sum(), xr)
    torch.testing.assert_close(p.score(x, sigma), g, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(-(x + (1 - sigma) * v) / sigma, g, rtol=1e-9, atol=1e-9)


def test_endpoints_sigma_zero_and_one() -> None:
    p = three_mode_gmm()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    # sigma = 1: x is pure noise, E[x0|x] = mixture mean, v = x - mean
    torch.testing.assert_close(p.velocity(x, 1.0), x - p.mean(), rtol=0, atol=1e-13)
    # sigma = 0: x is data, E[x0|x] = x, E[eps|x] = 0, score = grad log p
    torch.testing.assert_close(p.denoise(x, 0.0), x, rtol=0, atol=1e-13)
    torch.testing.assert_close(p.velocity(x, 0.0), -x, rtol=0, atol=1e-13)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.log_prob(xr).sum(), xr)
    torch.testing.assert_close(p.score(x, 0.0), g, rtol=1e-12, atol=1e-12)


def test_per_sample_sigma_equals_scalar_sigma_rowwise() -> None:
    p = three_mode_gmm()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    sig = torch.rand(8, generator=g, dtype=F64)
    v = p.velocity(x, sig)
    rows = torch.cat([p.velocity(x[i : i + 1], float(sig[i])) for i in range(8)])
    torch.testing.assert_close(v, rows, rtol=0, atol=1e-14)


def test_float32_agrees_with_float64() -> None:
    p = three_mode_gmm()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    p32 = p.to(torch.float32)
    for s in (0.05, 0.5, 0.95):
        v32 = p32.velocity(x.float(), s)
        assert v32.dtype == torch.float32
        torch.testing.assert_close(v32.double(), p.velocity(x, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p32.log_prob(x.float()).double(), p.log_prob(x), rtol=1e-5, atol=1e-5)


def test_velocity_gradcheck_in_x_and_parameters() -> None:
    """velocity is differentiable in x and in (logits, means, scale_tril) (parametric GMM student)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, generator=g, dtype=F64, requires_grad=True)
    means = torch.randn(2, 2, generator=g, dtype=F64, requires_grad=True)
    tril = (torch.eye(2, dtype=F64) + 0.2 * torch.randn(2, 2, 2, generator=g, dtype=F64)).requires_grad_(True)
    x = torch.randn(2, 2, generator=g, dtype=F64, requires_grad=True)
    sig = torch.tensor([0.3, 0.9], dtype=F64)

    def f(lg, mu, L, xx):
        return GaussianMixture.from_params(lg, mu, L).velocity(xx, sig)

    assert torch.autograd.gradcheck(f, (logits, means, tril, x))


def test_sample_moments_and_component_frequencies() -> None:
    p = three_mode_gmm()
    n = 40_000
    x, k = p.sample(n, torch.Generator().manual_seed(0), return_components=True)
    assert x.shape == (n, 2) and x.dtype == F64
    # CLT, z = 5 per coordinate (two-sided false-failure prob 5.7e-7 each): sd_i = sqrt(Cov_ii / n)
    sd = torch.sqrt(torch.diagonal(p.covariance()) / n)
    assert bool(((x.mean(0) - p.mean()).abs() <= 5.0 * sd).all())
    # component frequencies: binomial sd sqrt(w (1 - w) / n), z = 5
    freq = torch.bincount(k, minlength=3).double() / n
    assert bool(((freq - p.weights).abs() <= 5.0 * torch.sqrt(p.weights * (1 - p.weights) / n)).all())


def test_sample_is_reproducible_with_generator() -> None:
    p = three_mode_gmm()
    a = p.sample(10, torch.Generator().manual_seed(4))
    b = p.sample(10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(9)
    p = random_gmm(1, k=1)
    q = random_gmm(2, k=1)
    oracle = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(p.means[0], p.covs[0]),
        torch.distributions.MultivariateNormal(q.means[0], q.covs[0]),
    )
    torch.testing.assert_close(gaussian_kl(p, q), oracle, rtol=1e-12, atol=1e-12)
    assert float(gaussian_kl(p, p)) == pytest.approx(0.0, abs=1e-12)
    est, se = p.kl_monte_carlo(q, 20_000, g)
    # CLT with the sample standard error, z = 5
    assert abs(float(est) - float(oracle)) <= 5.0 * float(se)


def test_geometric_tilt_of_gaussians_is_normalised_product() -> None:
    """p_ref^(1-lam) p_T^lam / Z evaluated pointwise; lam = 0, 1 give ref and teacher."""
    ref = random_gmm(3, k=1)
    teach = random_gmm(4, k=1)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for lam in (0.0, 0.5, 1.0, 1.5):
        try:
            tgt, log_z = geometric_tilt(ref, teach, lam)
        except ValueError:
            assert lam > 1  # only extrapolation may be non-normalisable
            continue
        expected = (1 - lam) * ref.log_prob(x) + lam * teach.log_prob(x) - log_z
        torch.testing.assert_close(tgt.log_prob(x), expected, rtol=1e-11, atol=1e-11)
        if lam in (0.0, 1.0):
            assert abs(float(log_z)) < 1e-12
    src = ref.geometric_tilt(teach, 0.5)[0]
    torch.testing.assert_close(src.means, geometric_tilt(ref, teach, 0.5)[0].means)


def test_geometric_tilt_rejects_mixtures_and_non_normalisable() -> None:
    with pytest.raises(ValueError, match="components"):
        geometric_tilt(three_mode_gmm(), random_gmm(1, k=1), 2.0)
    ref = GaussianMixture.gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    wide = GaussianMixture.gaussian(torch.zeros(2, dtype=F64), 4 * torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="not positive definite"):
        geometric_tilt(ref, wide, 3.0)  # precision 1 - 3 + 3/4 < 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=torch.tensor([0.5, 0.6], dtype=F64)), "sum to 1"),
        (dict(weights=torch.tensor([1.2, -0.2], dtype=F64)), "non-negative"),
        (dict(weights=torch.tensor([1.0], dtype=F64)), r"means must have shape \(1, d\)"),
        (dict(means=torch.zeros(2, 3, dtype=F64)), r"covs must have shape"),
        (dict(covs=torch.tensor([[[1.0, 0.0], [0.0, -1.0]]] * 2, dtype=F64)), "positive definite"),
        (dict(covs=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2, dtype=F64)), "symmetric"),
        (dict(means=torch.tensor([[0.0, float("nan")], [0.0, 0.0]], dtype=F64)), "non-finite"),
    ],
)
def test_bad_parameters_raise(kwargs: dict, match: str) -> None:
    args = dict(
        weights=torch.tensor([0.5, 0.5], dtype=F64),
        means=torch.zeros(2, 2, dtype=F64),
        covs=torch.eye(2, dtype=F64).repeat(2, 1, 1),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**args)


def test_bad_types_and_inputs_raise() -> None:
    p = three_mode_gmm()
    with pytest.raises(TypeError, match="weights"):
        GaussianMixture([0.5, 0.5], torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="share a dtype"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)[None])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        p.log_prob(torch.zeros(3, 3, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        p.velocity(torch.zeros(3, 2, dtype=torch.float32), 0.5)
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        p.velocity(torch.zeros(3, 2, dtype=F64), 1.5)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        p.velocity(torch.zeros(3, 2, dtype=F64), torch.full((4,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="n must be a positive int"):
        p.sample(0)
    with pytest.raises(ValueError, match="components"):
        gaussian_kl(p, p)


def test_log_prob_is_stable_far_from_the_modes() -> None:
    """log-sum-exp: finite, exact log-densities where every component density underflows."""
    p = three_mode_gmm()
    x = torch.tensor([[60.0, -80.0]], dtype=F64)
    lp = p.log_prob(x)
    assert bool(torch.isfinite(lp).all()) and float(lp) < -1e3
    comp = p.component_log_prob(x)
    assert math.isclose(float(lp), float(torch.logsumexp(comp + torch.log(p.weights), -1)), rel_tol=1e-14)


def test_velocity_denoiser_score_match_a_monte_carlo_regression() -> None:
    """The exact posterior means are the L2 regressions of the targets on x_sigma: for any bounded test
    function g, E[(target - prediction(x_sigma)) g(x_sigma)] = 0.  Checked with Gaussian bumps
    g = exp(-|x_sigma - x*|^2 / (2 h^2)) <= 1 at three points x* and two noise levels, n = 200 000.

    Bound: Var[(T_i - E[T_i|x]) g] <= E[T_i^2] in closed form: velocity target eps - x0 gives
    1 + E[x0_i^2]; denoiser target x0 gives E[x0_i^2]; score target -eps/sigma gives 1/sigma^2.
    Tolerance 5 sqrt(bound / n) per coordinate (false-failure prob <= 5.7e-7 each).  Power: the same
    statistic for the velocity of the mixture shifted by (0.5, 0) exceeds the tolerance.
    """
    p = three_mode_gmm()
    n = 200_000
    g = torch.Generator().manual_seed(12)
    x0 = p.sample(n, g)
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    ex02 = torch.diagonal(p.covariance()) + p.mean() ** 2  # E[x0_i^2]
    shifted = GaussianMixture(p.weights, p.means + torch.tensor([0.5, 0.0], dtype=F64), p.covs)
    points = torch.tensor([[-1.5, 0.0], [0.5, 1.0], [1.5, -0.5]], dtype=F64)
    wrong_detected = False
    for sigma in (0.3, 0.7):
        xs = (1 - sigma) * x0 + sigma * eps
        v, x0_hat, sc = p.velocity(xs, sigma), p.denoise(xs, sigma), p.score(xs, sigma)
        v_wrong = shifted.velocity(xs, sigma)
        for pt in points:
            w = torch.exp(-((xs - (1 - sigma) * pt) ** 2).sum(-1) / (2 * 0.6**2))[:, None]
            for target, pred, bound in (
                (eps - x0, v, 1.0 + ex02),
                (x0, x0_hat, ex02),
                (-eps / sigma, sc, torch.full((2,), 1.0 / sigma**2, dtype=F64)),
            ):
                stat = ((target - pred) * w).mean(0)
                assert bool((stat.abs() <= 5.0 * torch.sqrt(bound / n)).all()), (sigma, pt, stat)
            stat_wrong = ((eps - x0 - v_wrong) * w).mean(0)
            wrong_detected |= bool((stat_wrong.abs() > 5.0 * torch.sqrt((1.0 + ex02) / n)).any())
    assert wrong_detected
