"""D19 Di[M]O (opd_ref.dimo): token-level divergences, the generator's update, psi's objective.

Every identity is exact, in float64, by enumeration of an L = 3, V = 4 toy (64 sequences, 8 mask
patterns).  The oracles are written anew here: token posteriors by marginalising the (V, V, V)
probability tensor (not toys.mdm's agreement matrices), KLs by torch.distributions, gradients by
autograd of the enumerated objective.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Categorical, kl_divergence

from opd_ref.dimo import (
    dimo_generator_surrogate,
    dimo_psi_loss,
    generalized_jeffrey,
    jeffrey_logit_gradient,
)

DT = torch.float64
V, L = 4, 3
MASK = V
SEQS = list(itertools.product(range(V), repeat=L))
PATTERNS = list(itertools.product([False, True], repeat=L))  # True = masked
BETAS = (0.0, 0.3, 0.5, 1.0)


def posterior(p: torch.Tensor, x_tilde) -> torch.Tensor:
    """Token posterior (L, V) of p (V**L,) given the state x_tilde (tuple; MASK = masked), by
    marginalising the (V,)*L probability tensor; rows of visible positions are left at zero."""
    table = p.reshape((V,) * L)
    masked = [i for i in range(L) if x_tilde[i] == MASK]
    sub = table[tuple(slice(None) if x_tilde[i] == MASK else x_tilde[i] for i in range(L))]
    rows = [torch.zeros(V, dtype=p.dtype)] * L
    for k, i in enumerate(masked):
        others = tuple(j for j in range(len(masked)) if j != k)
        marg = sub.sum(others) if others else sub
        rows[i] = marg / marg.sum()
    return torch.stack(rows)


def remasked(x, pattern):
    return tuple(MASK if m else t for t, m in zip(x, pattern))


def random_data(gen) -> torch.Tensor:
    """A correlated full-support distribution over the 64 sequences (a random mixture of products)."""
    comps = torch.softmax(2.0 * torch.randn(3, L, V, generator=gen, dtype=DT), -1)
    w = torch.softmax(torch.randn(3, generator=gen, dtype=DT), 0)
    return product_mixture(torch.log(comps), w)


def product_mixture(logits: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """p(x) = sum_c rho_c prod_i softmax(logits[c, i])[x^i], written with explicit loops over x."""
    probs = torch.softmax(logits, -1)
    out = []
    for x in SEQS:
        out.append((rho * torch.stack([probs[:, i, x[i]] for i in range(L)]).prod(0)).sum())
    return torch.stack(out)


def per_token_conditional(logits: torch.Tensor, c: int, x) -> torch.Tensor:
    probs = torch.softmax(logits[c], -1)
    return torch.stack([probs[i, x[i]] for i in range(L)]).prod()


def to_logits(post: torch.Tensor, masked) -> torch.Tensor:
    """Logits (L, V) of a posterior: log probabilities at masked rows, zeros elsewhere."""
    return torch.stack([post[i].log() if masked[i] else torch.zeros(V, dtype=DT) for i in range(L)])


def mask_law(gen) -> torch.Tensor:
    w = torch.rand(len(PATTERNS), generator=gen, dtype=DT) + 0.1
    return w / w.sum()


logit_arrays = st.integers(0, 10_000).map(lambda s: torch.randn(3, L, V, generator=torch.Generator().manual_seed(s), dtype=DT) * 2)


# ------------------------------------------------------------------------------------------------
# token-level divergences


@given(seed=st.integers(0, 10_000), beta=st.floats(0.0, 1.0))
def test_divergences_equal_torch_distributions(seed, beta):
    gen = torch.Generator().manual_seed(seed)
    z_phi = 2.0 * torch.randn(5, L, V, generator=gen, dtype=DT)
    z_psi = 2.0 * torch.randn(5, L, V, generator=gen, dtype=DT)
    mask = torch.rand(5, L, generator=gen) < 0.6
    p_phi, p_psi = Categorical(logits=z_phi), Categorical(logits=z_psi)
    fkl = (kl_divergence(p_phi, p_psi) * mask).sum(-1)
    rkl = (kl_divergence(p_psi, p_phi) * mask).sum(-1)
    torch.testing.assert_close(generalized_jeffrey(z_phi, z_psi, 0.0, mask), fkl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(generalized_jeffrey(z_phi, z_psi, 1.0, mask), rkl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(generalized_jeffrey(z_phi, z_psi, beta, mask), (1 - beta) * fkl + beta * rkl,
                               rtol=1e-12, atol=1e-14)
    # mask=None counts every position
    torch.testing.assert_close(generalized_jeffrey(z_phi, z_psi, beta),
                               ((1 - beta) * kl_divergence(p_phi, p_psi) + beta * kl_divergence(p_psi, p_phi)).sum(-1),
                               rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 10_000))
def test_each_divergence_is_zero_iff_the_distributions_match(seed):
    gen = torch.Generator().manual_seed(seed)
    z_phi = 2.0 * torch.randn(6, L, V, generator=gen, dtype=DT)
    shift = torch.randn(6, L, 1, generator=gen, dtype=DT)  # a per-token constant: the same distribution
    z_psi = z_phi + 3.0 * torch.randn(6, L, V, generator=gen, dtype=DT)
    mask = torch.rand(6, L, generator=gen) < 0.7
    tv2 = ((0.5 * (torch.softmax(z_phi, -1) - torch.softmax(z_psi, -1)).abs().sum(-1)) ** 2 * mask).sum(-1)
    for beta in BETAS:
        # equal distributions: exactly zero divergence and zero gradient
        assert generalized_jeffrey(z_phi, z_phi + shift, beta, mask).abs().max() < 1e-14
        assert jeffrey_logit_gradient(z_phi, z_phi + shift, beta, mask).abs().max() < 1e-14
        # different distributions: Pinsker for both KLs gives D_beta >= 2 sum_i TV_i^2 > 0
        d = generalized_jeffrey(z_phi, z_psi, beta, mask)
        assert bool((d >= 2 * tv2 - 1e-14).all())
        assert bool((d[tv2 > 0] > 0).all())
        # a difference at unmasked positions only does not count
        z_vis = torch.where(mask[..., None], z_phi, z_psi)
        assert generalized_jeffrey(z_phi, z_vis, beta, mask).abs().max() < 1e-14


@given(seed=st.integers(0, 10_000), beta=st.sampled_from(BETAS))
def test_logit_gradient_equals_autograd_of_the_divergence(seed, beta):
    gen = torch.Generator().manual_seed(seed)
    z_phi = 2.0 * torch.randn(4, L, V, generator=gen, dtype=DT)
    z_psi = (2.0 * torch.randn(4, L, V, generator=gen, dtype=DT)).requires_grad_()
    mask = torch.rand(4, L, generator=gen) < 0.6
    (auto,) = torch.autograd.grad(generalized_jeffrey(z_phi, z_psi, beta, mask).sum(), z_psi)
    g = jeffrey_logit_gradient(z_phi, z_psi, beta, mask)
    torch.testing.assert_close(g, auto, rtol=1e-12, atol=1e-15)
    assert not g.requires_grad
    assert g.sum(-1).abs().max() < 1e-14  # invariant to a constant shift of the logits
    assert bool((g[~mask] == 0).all())  # unmasked positions get no gradient
    # the generator surrogate's gradient with respect to its logits is g (masked positions only)
    z_theta = torch.randn(4, L, V, generator=gen, dtype=DT).requires_grad_()
    (g_theta,) = torch.autograd.grad(dimo_generator_surrogate(z_theta, z_phi, z_psi, mask, beta).sum(), z_theta)
    torch.testing.assert_close(g_theta, g, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the generator's update against the exact sequence-level objective


PAIRS = [(n, j) for n in range(len(SEQS)) for j, pat in enumerate(PATTERNS) if any(pat)]
PAIR_STATES = [remasked(SEQS[n], PATTERNS[j]) for n, j in PAIRS]
PAIR_MASK = torch.tensor([PATTERNS[j] for _, j in PAIRS])  # (448, L)


def stacked_posteriors(p: torch.Tensor) -> torch.Tensor:
    """Posteriors (448, L, V) at every (x, M) pair, one marginalisation per distinct state."""
    cache = {s: posterior(p, s) for s in set(PAIR_STATES)}
    return torch.stack([cache[s] for s in PAIR_STATES])


def jeffrey_by_torch_distributions(post_phi, post_theta, beta):
    """Sum over masked positions of (1-beta) KL(phi||theta) + beta KL(theta||phi), per pair."""
    m = PAIR_MASK[..., None]
    uniform = torch.full_like(post_phi, 1.0 / V)
    a = Categorical(probs=torch.where(m, post_phi, uniform))
    b = Categorical(probs=torch.where(m, post_theta, uniform))
    return (((1 - beta) * kl_divergence(a, b) + beta * kl_divergence(b, a)) * PAIR_MASK).sum(-1)


def _frozen_objective_and_dimo_update(z, rho, p_data, pm, beta):
    """(grad of the frozen-state objective by autograd, Di[M]O's expected update, grad of the objective
    with the state law differentiated too), all by enumeration over (c, x, M)."""
    z = z.detach().clone().requires_grad_()
    p_theta = product_mixture(z, rho)
    post_phi, post_theta = stacked_posteriors(p_data), stacked_posteriors(p_theta)
    d = jeffrey_by_torch_distributions(post_phi, post_theta, beta)
    n_idx = torch.tensor([n for n, _ in PAIRS])
    w_state = pm[torch.tensor([j for _, j in PAIRS])]
    (g_frozen,) = torch.autograd.grad((p_theta.detach()[n_idx] * w_state * d).sum(), z, retain_graph=True)
    (g_full,) = torch.autograd.grad((p_theta[n_idx] * w_state * d).sum(), z)
    # Di[M]O: the surrogate at every initial state c, weighted by rho_c p(x | c) P(M)
    n_c = z.shape[0]
    t_logits = torch.stack([to_logits(post_phi[k], PAIR_MASK[k]) for k in range(len(PAIRS))])
    s_logits = torch.stack([to_logits(post_theta[k].detach(), PAIR_MASK[k]) for k in range(len(PAIRS))])
    w = torch.stack([torch.stack([rho[c] * per_token_conditional(z.detach(), c, SEQS[n]) * pm[j] for n, j in PAIRS])
                     for c in range(n_c)])  # (S, 448)
    gen_logits = z[:, None].expand(-1, len(PAIRS), -1, -1).reshape(-1, L, V)
    surrogate = dimo_generator_surrogate(gen_logits, t_logits.repeat(n_c, 1, 1), s_logits.repeat(n_c, 1, 1),
                                         PAIR_MASK.repeat(n_c, 1), beta)
    (update,) = torch.autograd.grad((w.reshape(-1) * surrogate).sum(), z)
    return g_frozen, update, g_full


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fully_masked_update_equals_autograd_of_exact_sequence_objective(beta):
    # Fully masked prior: one initial state, the generator is a product of token distributions.
    gen = torch.Generator().manual_seed(11)
    p_data = random_data(gen)
    pm = mask_law(gen)  # any law of the re-mask patterns
    z = 1.5 * torch.randn(1, L, V, generator=gen, dtype=DT)
    rho = torch.ones(1, dtype=DT)
    g_frozen, update, g_full = _frozen_objective_and_dimo_update(z, rho, p_data, pm, beta)
    torch.testing.assert_close(update, g_frozen, rtol=1e-10, atol=1e-13)
    assert float(g_frozen.norm()) > 1e-3
    # the objective whose gradient it is holds the state law fixed (on-policy): differentiating the
    # law too adds the score-function term E[D grad log q_theta], which is not zero here
    assert float((g_full - g_frozen).norm()) > 1e-3 * float(g_frozen.norm())


def test_hybrid_update_is_exact_only_when_tokens_ignore_the_initial_state():
    # Hybrid prior (4 initial states): Di[M]O applies the posterior's logit gradient to the generator's
    # own logits z(x_init); the exact gradient goes through the posterior's responsibilities, so the
    # two differ; they agree again when z(x_init) does not depend on x_init.
    gen = torch.Generator().manual_seed(5)
    p_data = random_data(gen)
    pm = mask_law(gen)
    rho = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=DT)
    z = 1.5 * torch.randn(4, L, V, generator=gen, dtype=DT)
    g_frozen, update, _ = _frozen_objective_and_dimo_update(z, rho, p_data, pm, 0.5)
    rel = float((update - g_frozen).norm() / g_frozen.norm())
    assert rel > 0.05, rel
    z_same = z[:1].expand(4, -1, -1).clone()
    g_frozen, update, _ = _frozen_objective_and_dimo_update(z_same, rho, p_data, pm, 0.5)
    torch.testing.assert_close(update, g_frozen, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# psi's objective


@pytest.mark.parametrize("soft", [False, True])
def test_psi_objective_has_the_exact_generator_posterior_as_minimiser(soft):
    gen = torch.Generator().manual_seed(3)
    rho = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    z = 1.5 * torch.randn(3, L, V, generator=gen, dtype=DT)
    p_theta = product_mixture(z, rho).detach()
    pm = mask_law(gen)
    states = sorted(set(PAIR_STATES))
    index = torch.tensor([states.index(s) for s in PAIR_STATES])
    psi_star = torch.stack([to_logits(posterior(p_theta, s), [t == MASK for t in s]) for s in states])
    # weight of each (c, x, M): rho_c p(x | c) P(M)
    w = torch.stack([torch.stack([rho[c] * per_token_conditional(z, c, SEQS[n]) * pm[j] for n, j in PAIRS])
                     for c in range(3)]).reshape(-1)
    if soft:  # the generator's token distribution at x_init = c
        target = torch.softmax(z, -1)[:, None].expand(-1, len(PAIRS), -1, -1).reshape(-1, L, V)
    else:  # the generated tokens
        target = torch.tensor([SEQS[n] for n, _ in PAIRS]).repeat(3, 1)

    def expected_loss(psi_table):
        return (w * dimo_psi_loss(psi_table[index].repeat(3, 1, 1), target, PAIR_MASK.repeat(3, 1))).sum()

    psi = psi_star.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expected_loss(psi), psi)
    assert float(grad.abs().max()) < 1e-14  # stationary at the exact posterior ...
    psi_other = psi_star + torch.randn(psi_star.shape, generator=gen, dtype=DT)
    excess = float(expected_loss(psi_other) - expected_loss(psi_star))
    # ... and the excess loss is exactly E_x~ sum_{i in M} KL(p_theta(.|x~)^i || p_psi^i) (> 0): a minimum
    q_state = torch.zeros(len(states), dtype=DT)
    for k, (n, j) in enumerate(PAIRS):
        q_state[index[k]] += p_theta[n] * pm[j]
    masked = torch.tensor([[t == MASK for t in s] for s in states])
    kl = (q_state[:, None] * kl_divergence(Categorical(logits=psi_star), Categorical(logits=psi_other)) * masked).sum()
    assert float(kl) > 1e-2
    assert math.isclose(excess, float(kl), rel_tol=1e-10)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    z = torch.zeros(2, L, V, dtype=DT)
    mask = torch.ones(2, L, dtype=torch.bool)
    with pytest.raises(ValueError, match="beta must lie in \\[0, 1\\]"):
        generalized_jeffrey(z, z, -0.2, mask)
    with pytest.raises(TypeError, match="beta must be a float"):
        generalized_jeffrey(z, z, torch.tensor(0.5), mask)
    with pytest.raises(ValueError, match="teacher_logits must have shape \\(B, L, V\\)"):
        generalized_jeffrey(torch.zeros(2, L, V, 1, dtype=DT), z, 0.0)
    with pytest.raises(ValueError, match="teacher_logits and psi_logits must have the same shape"):
        generalized_jeffrey(z, torch.zeros(2, L, V + 1, dtype=DT), 1.0)
    with pytest.raises(TypeError, match="psi_logits must be a floating-point tensor"):
        generalized_jeffrey(z, torch.zeros(2, L, V, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="psi_logits contains 1 non-finite"):
        bad = z.clone()
        bad[0, 0, 0] = float("-inf")
        generalized_jeffrey(z, bad, 0.5)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        jeffrey_logit_gradient(z, z, 0.5, torch.ones(2, L))
    with pytest.raises(ValueError, match="mask must have shape \\(B, L\\)"):
        jeffrey_logit_gradient(z, z, 0.5, torch.ones(2, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="generator_logits and teacher_logits must have the same shape"):
        dimo_generator_surrogate(torch.zeros(1, L, V, dtype=DT), z, z, mask, 0.5)
    with pytest.raises(TypeError, match="mask must be a \\(B, L\\) bool tensor"):
        dimo_generator_surrogate(z, z, z, None, 0.5)
    with pytest.raises(ValueError, match="target tokens must lie in \\[0, 4\\)"):
        dimo_psi_loss(z, torch.full((2, L), V), mask)  # the mask token is not a valid target
    with pytest.raises(ValueError, match="target tokens must have shape"):
        dimo_psi_loss(z, torch.zeros(2, L + 1, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="target probabilities must be non-negative and sum to 1"):
        dimo_psi_loss(z, torch.full((2, L, V), 0.3, dtype=DT), mask)
    with pytest.raises(ValueError, match="psi_logits must have a vocabulary of at least 2"):
        dimo_psi_loss(torch.zeros(2, L, 1, dtype=DT), torch.zeros(2, L, dtype=torch.long), mask)
