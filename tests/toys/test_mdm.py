"""The exact discrete MDM toy (toys.mdm): data, forward process, posteriors, re-masking, generators.

Exact float64 identities against Bayes' rule written anew here; the Monte-Carlo checks of the
samplers use fixed seeds and a CLT bound per cell at z = 6 on the binomial standard deviation
(2 Phi(-6) = 2.0e-9 per cell; union over at most 64 cells: <= 1.3e-7 per assertion).
"""

import itertools
import math

import pytest
import torch

from toys import mdm

DT = torch.float64
V, L = 4, 3
Z = 6.0  # 2 * Phi(-6) = 2.0e-9 per cell


def test_data_is_a_correlated_full_support_distribution():
    p = mdm.correlated_data()
    assert p.shape == (64,) and abs(float(p.sum()) - 1) < 1e-15 and bool((p > 0).all())
    seqs = mdm.all_sequences()
    assert mdm.sequence_index(seqs).tolist() == list(range(64))
    # the mixture formula written anew: p(000) = 4/12 * 0.9^3 + (3 + 3 + 2)/12 * (0.1/3)^3
    assert math.isclose(float(p[0]), 4 / 12 * 0.9**3 + 8 / 12 * (0.1 / 3) ** 3, rel_tol=1e-14)
    # strongly correlated: p(x^2 = 0 | x^1 = 0) far above p(x^2 = 0)
    table = p.reshape(V, V, V)
    assert float(table[0, 0].sum() / table[0].sum()) > 2 * float(table[:, 0].sum())
    masses = mdm.mode_masses(p)
    assert abs(float(masses.sum()) - 1) < 1e-15 and masses.argmax() == 0 and float(masses[V]) < 0.02


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_token_posterior_is_bayes_with_the_forward_process(t):
    # p(x | x~) from the joint p(x) q_t(x~ | x), q_t masking each token independently w.p. t: the token
    # marginals equal token_posterior, whatever t (masking is independent of the content)
    p = mdm.correlated_data()
    seqs = mdm.all_sequences().tolist()
    states = mdm.all_states()
    post = mdm.token_posterior(p, states)
    for k, s in enumerate(states.tolist()):
        joint = torch.zeros(64, dtype=DT)
        for n, x in enumerate(seqs):
            q = 1.0
            for i in range(L):
                q *= t if s[i] == V else ((1 - t) if s[i] == x[i] else 0.0)
            joint[n] = p[n] * q
        cond = joint / joint.sum()
        for i in range(L):
            marg = torch.zeros(V, dtype=DT)
            for n, x in enumerate(seqs):
                marg[x[i]] += cond[n]
            torch.testing.assert_close(post[k, i], marg, rtol=1e-12, atol=1e-15)
    # the forward process' pattern law is a distribution
    assert abs(float(mdm.forward_mask_probs(t).sum()) - 1) < 1e-15


def test_forward_mask_sampler_matches_its_law():
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    x = torch.zeros(n, L, dtype=torch.long)
    masked = mdm.forward_mask(x, 0.3, gen) == V
    pats = mdm.mask_patterns()
    idx = (masked.long() * torch.tensor([4, 2, 1])).sum(1)
    freq = torch.bincount(idx, minlength=8).to(DT)
    probs = mdm.forward_mask_probs(0.3)
    assert (pats.long() * torch.tensor([4, 2, 1])).sum(1).tolist() == list(range(8))
    sd = torch.sqrt(n * probs * (1 - probs))
    assert bool(((freq - n * probs).abs() <= Z * sd).all()), (freq / n, probs)


@pytest.mark.parametrize("schedule", ["arccos", "linear"])
def test_remask_count_law_matches_quadrature_and_the_sampler(schedule):
    # P(m) against a midpoint rule over u ~ U(0, 1) of Di[M]O's rule m = max(1, round(L ratio(u)))
    n_grid = 1_000_000
    u = (torch.arange(n_grid, dtype=DT) + 0.5) / n_grid
    ratio = torch.arccos(u) / (math.pi / 2) if schedule == "arccos" else u
    m = torch.round(L * ratio).clamp(1, L).long()
    quad = torch.bincount(m, minlength=L + 1).to(DT) / n_grid
    torch.testing.assert_close(mdm.mask_count_probs(L, schedule), quad, rtol=0, atol=2e-6)
    probs = mdm.remask_pattern_probs(L, schedule)
    assert abs(float(probs.sum()) - 1) < 1e-15 and float(probs[0]) == 0.0
    # the sampler: pattern frequencies
    gen = torch.Generator().manual_seed(1)
    n = 100_000
    x = torch.randint(0, V, (n, L), generator=gen)
    x_tilde, mask = mdm.remask(x, gen, schedule)
    assert bool((x_tilde[mask] == V).all()) and bool((x_tilde[~mask] == x[~mask]).all())
    freq = torch.bincount((mask.long() * torch.tensor([4, 2, 1])).sum(1), minlength=8).to(DT)
    sd = torch.sqrt(n * probs * (1 - probs))
    assert bool(((freq - n * probs).abs() <= Z * sd).all()), (freq / n, probs)


def test_init_states_and_generator_distribution():
    for r_init, n_states in ((1.0, 1), (0.6, 12), (1 / 3, 48), (0.0, 64)):
        states, rho = mdm.init_states(r_init)
        assert states.shape == (n_states, L) and abs(float(rho.sum()) - 1) < 1e-15
        assert bool(((states == V).sum(1) == round(r_init * L)).all())
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(12, L, V, generator=gen, dtype=DT)
    rho = torch.softmax(torch.randn(12, generator=gen, dtype=DT), 0)
    p = mdm.generator_distribution(z, rho)
    probs = torch.softmax(z, -1)
    for n, x in enumerate(itertools.product(range(V), repeat=L)):
        direct = sum(float(rho[c]) * math.prod(float(probs[c, i, x[i]]) for i in range(L)) for c in range(12))
        assert math.isclose(float(p[n]), direct, rel_tol=1e-13)
    # the sampler draws from it
    n = 200_000
    c, x = mdm.sample_generator(z, rho, n, gen)
    freq = torch.bincount(mdm.sequence_index(x), minlength=64).to(DT)
    sd = torch.sqrt(n * p * (1 - p))
    assert bool(((freq - n * p).abs() <= Z * sd).all())


def test_teacher_initialised_generator():
    p = mdm.correlated_data()
    # fully masked: the product of the data's marginals
    states, rho = mdm.init_states(1.0)
    z = mdm.teacher_init_logits(p, states)
    table = p.reshape(V, V, V)
    marginals = torch.stack([table.sum((1, 2)), table.sum((0, 2)), table.sum((0, 1))])
    torch.testing.assert_close(torch.softmax(z[0], -1), marginals, rtol=1e-13, atol=0)
    # hybrid: masked positions get the teacher posterior, the visible one a smoothed copy
    states, rho = mdm.init_states(0.6)
    z = mdm.teacher_init_logits(p, states, copy_smoothing=0.1)
    k = states.tolist().index([2, V, V])
    probs = torch.softmax(z[k], -1)
    torch.testing.assert_close(probs[0], torch.tensor([0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], dtype=DT), rtol=1e-13, atol=0)
    torch.testing.assert_close(probs[1], table[2].sum(1) / table[2].sum(), rtol=1e-13, atol=0)


def test_exact_kl_and_bad_input():
    p = mdm.correlated_data()
    q = torch.full((64,), 1 / 64, dtype=DT)
    assert math.isclose(mdm.exact_kl(p, q), float((p * (p / q).log()).sum()), rel_tol=1e-14)
    assert mdm.exact_kl(p, p) == 0.0
    with pytest.raises(ValueError, match="noise must lie in"):
        mdm.correlated_data(noise=0.0)
    with pytest.raises(ValueError, match="weights must be a \\(4,\\) probability vector"):
        mdm.correlated_data(weights=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="x_tilde must hold tokens in \\[0, 4\\]"):
        mdm.token_posterior(p, torch.full((1, L), 5))
    with pytest.raises(ValueError, match="p must have V\\*\\*L = 64 entries"):
        mdm.token_posterior(p[:27], torch.zeros(1, L, dtype=torch.long))
    with pytest.raises(ValueError, match="r_init must lie in"):
        mdm.init_states(1.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        mdm.mask_count_probs(L, "cosine")
