r"""An exact discrete toy for masked diffusion models (MDMs) and their one-step distillation (D19).

Sequences :math:`x = (x^1, \dots, x^L)` of ``L`` tokens from a vocabulary of ``V`` (default
``V = 4``, ``L = 3``: 64 sequences), plus the mask token :math:`\mathtt{[M]} = V`.  Every
distribution over clean sequences is a ``(V**L,)`` probability vector indexed by
:func:`sequence_index`; every partially masked state :math:`\tilde x \in \{0..V\}^L` has an index in
``(V+1)**L`` (:func:`state_index`).  Everything is computed by enumeration, in float64, so that

* the **data** :func:`correlated_data` is a mixture of ``K`` "modes" (token-wise noisy copies of a
  constant sequence :math:`(k, k, k)`): knowing one token tells a lot about the others;
* the **masking forward process** :math:`q_t(\tilde x\,|\,x)` masks each token independently with
  probability :math:`t` (:func:`forward_mask_probs`, :func:`forward_mask`); Di[M]O re-masks a
  generated sequence with a *number* of masked tokens drawn from a schedule
  (:func:`mask_count_probs`, :func:`remask_pattern_probs`, :func:`remask`);
* the **exact teacher MDM** is the token posterior of the data given the visible tokens,
  :math:`p_\phi(x^i\,|\,\tilde x) = p_{data}(x^i\,|\,x^{\mathrm{vis}} = \tilde x^{\mathrm{vis}})`,
  and the same function gives the exact posterior of *any* distribution, in particular of a one-step
  generator: what Di[M]O's auxiliary model :math:`\psi` must learn (:func:`token_posterior`);
* a **one-step generator** maps an initial state :math:`x_{init}` (fully masked, or Di[M]O's hybrid
  of random and mask tokens, :func:`init_states`) to per-token logits
  :math:`z_\theta(x_{init}) \in \mathbb R^{L\times V}` and samples every token independently, so its
  output law is the mixture :math:`p_\theta(x) = \sum_{c}\rho(c)\prod_i
  \mathrm{softmax}(z_\theta(c))^i[x^i]` (:func:`generator_distribution`), exactly enumerable.

The posterior does not depend on :math:`t`: masking is independent of the content, so
:math:`p(x\,|\,\tilde x) \propto p(x)\,[x^{\mathrm{vis}} = \tilde x^{\mathrm{vis}}]` for every
:math:`t \in (0, 1)` (tested against Bayes' rule with :math:`q_t`).

Reference: ``dimo`` (Di[M]O, arXiv 2503.15457): hybrid initialisation, re-masking with the arccos
schedule and a fixed number of masked tokens, as in its public code.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "all_sequences",
    "all_states",
    "sequence_index",
    "state_index",
    "correlated_data",
    "mode_of",
    "mode_masses",
    "token_posterior",
    "forward_mask_probs",
    "forward_mask",
    "mask_patterns",
    "mask_count_probs",
    "remask_pattern_probs",
    "remask",
    "init_states",
    "generator_distribution",
    "sample_generator",
    "teacher_init_logits",
    "exact_kl",
]

DT = torch.float64


def _check_sizes(vocab_size: int, length: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if (vocab_size + 1) ** length > 10**6:
        raise ValueError(f"(vocab_size + 1)**length = {(vocab_size + 1) ** length} states is too many to enumerate")


def all_sequences(vocab_size: int = 4, length: int = 3) -> Tensor:
    """Every clean sequence, ``(V**L, L)`` long, in the order of :func:`sequence_index`."""
    _check_sizes(vocab_size, length)
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)


def all_states(vocab_size: int = 4, length: int = 3) -> Tensor:
    """Every partially masked state, ``((V+1)**L, L)`` long (mask token ``V``), in the order of
    :func:`state_index`."""
    _check_sizes(vocab_size, length)
    return torch.tensor(list(itertools.product(range(vocab_size + 1), repeat=length)), dtype=torch.long)


def _base_index(x: Tensor, base: int) -> Tensor:
    powers = base ** torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)
    return (x * powers).sum(-1)


def sequence_index(x: Tensor, vocab_size: int = 4) -> Tensor:
    """Index of clean sequences ``x`` ``(B, L)`` (tokens in ``[0, V)``) in :func:`all_sequences`."""
    if x.dtype != torch.long or x.dim() != 2:
        raise TypeError(f"x must be a (B, L) long tensor, got dtype {x.dtype}, shape {tuple(x.shape)}")
    if bool(((x < 0) | (x >= vocab_size)).any()):
        raise ValueError(f"x must hold tokens in [0, {vocab_size}) (no mask token), got min {int(x.min())}, max {int(x.max())}")
    return _base_index(x, vocab_size)


def state_index(x_tilde: Tensor, vocab_size: int = 4) -> Tensor:
    """Index of partially masked states ``x_tilde`` ``(B, L)`` (tokens in ``[0, V]``) in
    :func:`all_states`."""
    if x_tilde.dtype != torch.long or x_tilde.dim() != 2:
        raise TypeError(f"x_tilde must be a (B, L) long tensor, got dtype {x_tilde.dtype}, shape {tuple(x_tilde.shape)}")
    if bool(((x_tilde < 0) | (x_tilde > vocab_size)).any()):
        raise ValueError(f"x_tilde must hold tokens in [0, {vocab_size}] ({vocab_size} = mask)")
    return _base_index(x_tilde, vocab_size + 1)


def correlated_data(vocab_size: int = 4, length: int = 3, weights: Optional[Tensor] = None,
                    noise: float = 0.1) -> Tensor:
    r"""The toy's data distribution: a mixture of ``V`` noisy constant sequences.

    .. math::
        p_{data}(x) = \sum_{k=0}^{V-1} w_k \prod_{i=1}^{L}\Big[(1-\varepsilon)\,[x^i = k]
            + \tfrac{\varepsilon}{V-1}\,[x^i \ne k]\Big]

    Full support (every posterior is defined) and strongly correlated tokens: with the defaults
    (:math:`w = (4, 3, 3, 2)/12`, :math:`\varepsilon = 0.1`) a one-step *product* distribution cannot
    represent it, while a generator with 12 equally likely initial states can, exactly.

    Args:
        vocab_size: ``V``.
        length: ``L``.
        weights: ``(V,)`` mode weights (default ``(4, 3, 3, 2)/12`` for ``V = 4``, uniform otherwise).
        noise: :math:`\varepsilon \in (0, 1)`.

    Returns:
        ``(V**L,)`` float64 probabilities.

    Reference: ``dimo`` (toy of this suite).
    """
    _check_sizes(vocab_size, length)
    if not (0.0 < float(noise) < 1.0):
        raise ValueError(f"noise must lie in (0, 1), got {noise!r}")
    if weights is None:
        weights = (torch.tensor([4.0, 3.0, 3.0, 2.0], dtype=DT) / 12.0 if vocab_size == 4
                   else torch.full((vocab_size,), 1.0 / vocab_size, dtype=DT))
    weights = torch.as_tensor(weights, dtype=DT)
    if weights.shape != (vocab_size,) or bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-12:
        raise ValueError(f"weights must be a ({vocab_size},) probability vector, got {weights.tolist()}")
    seqs = all_sequences(vocab_size, length)
    k = torch.arange(vocab_size)
    hit = seqs[None, :, :] == k[:, None, None]  # (K, N, L)
    per_token = torch.where(hit, torch.tensor(1.0 - noise, dtype=DT), torch.tensor(noise / (vocab_size - 1), dtype=DT))
    return weights @ per_token.prod(-1)


def mode_of(vocab_size: int = 4, length: int = 3) -> Tensor:
    r"""The mode region of every sequence: the token ``k`` held by a strict majority of positions
    (more than ``L/2``), or ``V`` ("no mode") when there is none.

    .. math:: \mathrm{mode}(x) = k \ \text{if}\ \#\{i: x^i = k\} > L/2,\ \text{else}\ V

    Returns:
        ``(V**L,)`` long.

    Reference: ``dimo`` (mode coverage on the toy).
    """
    seqs = all_sequences(vocab_size, length)
    counts = torch.nn.functional.one_hot(seqs, vocab_size).sum(1)  # (N, V)
    top, arg = counts.max(1)
    return torch.where(2 * top > length, arg, torch.full_like(arg, vocab_size))


def mode_masses(p: Tensor, vocab_size: int = 4, length: int = 3) -> Tensor:
    r"""Mass of each mode region of :func:`mode_of` under ``p``: ``(V + 1,)``, the last entry the
    mass of sequences without a majority token.

    .. math:: m_k = \sum_{x:\,\mathrm{mode}(x) = k} p(x)

    Reference: ``dimo`` (mode coverage on the toy).
    """
    region = mode_of(vocab_size, length)
    return torch.zeros(vocab_size + 1, dtype=p.dtype).index_add_(0, region, p.detach() if p.requires_grad else p)


def token_posterior(p: Tensor, x_tilde: Tensor, vocab_size: int = 4) -> Tensor:
    r"""Exact token posterior of a distribution ``p`` over sequences given partially masked states.

    .. math::
        p(x^i = v\,|\,\tilde x) = \frac{\sum_{x:\,x^i = v,\ x^{\mathrm{vis}} = \tilde x^{\mathrm{vis}}} p(x)}
            {\sum_{x:\,x^{\mathrm{vis}} = \tilde x^{\mathrm{vis}}} p(x)}

    With ``p = p_data`` it is the exact teacher MDM :math:`p_\phi(x^i|\tilde x)`; with
    ``p = p_theta`` (:func:`generator_distribution`) the exact generator posterior, the minimiser of
    Di[M]O's auxiliary loss (:func:`opd_ref.dimo.dimo_psi_loss`).  At a visible position it is the
    one-hot of the visible token.  Differentiable in ``p``.

    Args:
        p: ``(V**L,)`` probabilities (indexed as :func:`all_sequences`).
        x_tilde: ``(B, L)`` long states, mask token ``V``.
        vocab_size: ``V``.

    Returns:
        ``(B, L, V)`` probabilities; raises ``ValueError`` if a state's visible tokens have
        probability 0 under ``p``.

    Reference: ``dimo``.
    """
    if not isinstance(p, Tensor) or p.dim() != 1 or not torch.is_floating_point(p):
        raise TypeError(f"p must be a 1-D floating tensor of V**L probabilities, got {type(p).__name__} "
                        f"{tuple(p.shape) if isinstance(p, Tensor) else ''}")
    length = x_tilde.shape[-1] if x_tilde.dim() == 2 else -1
    state_index(x_tilde, vocab_size)  # validates dtype, shape and tokens
    if p.shape[0] != vocab_size**length:
        raise ValueError(f"p must have V**L = {vocab_size ** length} entries for L = {length}, got {p.shape[0]}")
    seqs = all_sequences(vocab_size, length)  # (N, L)
    visible = x_tilde != vocab_size  # (B, L)
    agree = (seqs[None, :, :] == x_tilde[:, None, :]) | ~visible[:, None, :]  # (B, N, L)
    joint = agree.all(-1).to(p.dtype) * p[None, :]  # (B, N)
    onehot = torch.nn.functional.one_hot(seqs, vocab_size).to(p.dtype)  # (N, L, V)
    num = torch.einsum("bn,nlv->blv", joint, onehot)
    den = joint.sum(1)
    if not bool((den > 0).all()):
        raise ValueError("some state's visible tokens have probability 0 under p: its posterior is undefined")
    return num / den[:, None, None]


def mask_patterns(length: int = 3) -> Tensor:
    """All ``2**L`` mask patterns, ``(2**L, L)`` bool (True = masked), pattern ``j`` the binary
    digits of ``j`` (most significant first)."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    return torch.tensor(list(itertools.product([False, True], repeat=length)), dtype=torch.bool)


def forward_mask_probs(t: float, length: int = 3) -> Tensor:
    r"""Probabilities of the mask patterns of :func:`mask_patterns` under the MDM forward process at
    time :math:`t`: every token masked independently with probability :math:`t`.

    .. math:: q_t(M) = t^{|M|}\,(1-t)^{L-|M|}

    Returns:
        ``(2**L,)`` float64.

    Reference: ``dimo`` (masked diffusion forward process).
    """
    if not (0.0 <= float(t) <= 1.0):
        raise ValueError(f"t must lie in [0, 1], got {t!r}")
    m = mask_patterns(length).sum(1).to(DT)
    return torch.tensor(float(t), dtype=DT) ** m * torch.tensor(1.0 - float(t), dtype=DT) ** (length - m)


def forward_mask(x: Tensor, t: float, generator: Optional[torch.Generator] = None, vocab_size: int = 4) -> Tensor:
    r"""Sample :math:`\tilde x \sim q_t(\cdot|x)`: replace each token by the mask token ``V``
    independently with probability ``t``.  ``x`` ``(B, L)`` long; returns ``(B, L)`` long."""
    if not (0.0 <= float(t) <= 1.0):
        raise ValueError(f"t must lie in [0, 1], got {t!r}")
    drop = torch.rand(x.shape, generator=generator, dtype=DT) < float(t)
    return torch.where(drop, torch.full_like(x, vocab_size), x)


_SCHEDULES = ("arccos", "linear")


def _ratio_cdf(r: float, schedule: str) -> float:
    # P(mask ratio <= r) for ratio = arccos(u) / (pi/2) (arccos) or ratio = u (linear), u ~ U(0, 1)
    r = min(max(r, 0.0), 1.0)
    return 1.0 - math.cos(math.pi * r / 2.0) if schedule == "arccos" else r


def mask_count_probs(length: int = 3, schedule: str = "arccos") -> Tensor:
    r"""Probabilities of the number :math:`m \in \{0..L\}` of masked tokens in Di[M]O's re-masking.

    Di[M]O's code draws :math:`u \sim U(0, 1)`, the ratio :math:`\rho = \arccos(u)/(\pi/2)`
    (``"arccos"``; ``"linear"``: :math:`\rho = u`) and masks :math:`m = \max(1, \mathrm{round}(L\rho))`
    tokens at uniformly random positions.  With :math:`F` the CDF of :math:`\rho`
    (:math:`F(r) = 1 - \cos(\pi r/2)` for arccos),

    .. math::
        P(m) = F\big(\tfrac{m + 1/2}{L}\big) - F\big(\tfrac{m - 1/2}{L}\big)\ \ (1 < m < L),\qquad
        P(1) = F\big(\tfrac{3/2}{L}\big),\quad P(L) = 1 - F\big(\tfrac{L - 1/2}{L}\big),\quad P(0) = 0

    Returns:
        ``(L + 1,)`` float64.

    Reference: ``dimo`` (public code: ``get_mask_code``).
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    probs = [0.0]
    for m in range(1, length + 1):
        lo = 0.0 if m == 1 else (m - 0.5) / length
        hi = 1.0 if m == length else (m + 0.5) / length
        probs.append(_ratio_cdf(hi, schedule) - _ratio_cdf(lo, schedule))
    return torch.tensor(probs, dtype=DT)


def remask_pattern_probs(length: int = 3, schedule: str = "arccos") -> Tensor:
    r"""Probabilities of the mask patterns of :func:`mask_patterns` under Di[M]O's re-masking: a count
    from :func:`mask_count_probs`, then a uniformly random set of that size.

    .. math:: P(M) = P(m = |M|)\,\Big/\binom{L}{|M|}

    Returns:
        ``(2**L,)`` float64, summing to 1.

    Reference: ``dimo``.
    """
    counts = mask_count_probs(length, schedule)
    m = mask_patterns(length).sum(1)
    binom = torch.tensor([math.comb(length, int(k)) for k in m], dtype=DT)
    return counts[m] / binom


def remask(x: Tensor, generator: Optional[torch.Generator] = None, schedule: str = "arccos",
           vocab_size: int = 4) -> Tuple[Tensor, Tensor]:
    r"""Sample Di[M]O's intermediate state :math:`\tilde x` from a (generated) sequence ``x``.

    Draws the number of masked tokens as :func:`mask_count_probs` describes and the positions
    uniformly (a random permutation), so patterns have the law :func:`remask_pattern_probs`.

    Args:
        x: ``(B, L)`` long clean tokens.
        generator: torch generator.
        schedule: ``"arccos"`` (Di[M]O's default) or ``"linear"``.
        vocab_size: ``V`` (the mask token).

    Returns:
        ``(x_tilde, mask)``: ``(B, L)`` long state and ``(B, L)`` bool mask (True = masked).
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    batch, length = x.shape
    u = torch.rand(batch, generator=generator, dtype=DT)
    ratio = torch.arccos(u) / (math.pi / 2) if schedule == "arccos" else u
    n_masked = torch.round(length * ratio).clamp(1, length).long()
    rank = torch.rand(batch, length, generator=generator, dtype=DT).argsort(1).argsort(1)
    mask = rank < n_masked[:, None]
    return torch.where(mask, torch.full_like(x, vocab_size), x), mask


def init_states(r_init: float, vocab_size: int = 4, length: int = 3) -> Tuple[Tensor, Tensor]:
    r"""The generator's initial states :math:`x_{init}` and their law :math:`\rho`.

    Di[M]O's token initialisation: :math:`m = \mathrm{round}(r_{init}L)` positions, chosen uniformly,
    hold the mask token, the others uniformly random tokens.  ``r_init = 1`` is the fully masked prior
    (a single state: the generator is then a product distribution); Di[M]O's default ``0.6`` gives
    ``m = 2`` of ``L = 3`` (12 states).

    .. math:: \rho(c) = \Big[\binom{L}{m} V^{L-m}\Big]^{-1}\ \text{for each of the } \binom{L}{m}V^{L-m}\text{ states}

    Returns:
        ``(states, rho)``: ``(S, L)`` long (mask ``V``) and ``(S,)`` float64.

    Reference: ``dimo`` (hybrid token initialisation, ``fixed_ratio``).
    """
    _check_sizes(vocab_size, length)
    if not (0.0 <= float(r_init) <= 1.0):
        raise ValueError(f"r_init must lie in [0, 1], got {r_init!r}")
    m = int(round(float(r_init) * length))
    states = all_states(vocab_size, length)
    keep = (states == vocab_size).sum(1) == m
    states = states[keep]
    return states, torch.full((states.shape[0],), 1.0 / states.shape[0], dtype=DT)


def generator_distribution(logits: Tensor, rho: Tensor) -> Tensor:
    r"""Exact output law of a one-step generator with per-state token logits.

    .. math:: p_\theta(x) = \sum_{c} \rho(c) \prod_{i=1}^{L} \mathrm{softmax}\big(z_\theta(c)^i\big)[x^i]

    Args:
        logits: ``(S, L, V)`` generator logits :math:`z_\theta(c)` for each initial state ``c``.
        rho: ``(S,)`` law of the initial states.

    Returns:
        ``(V**L,)`` probabilities (differentiable in ``logits``).

    Reference: ``dimo``.
    """
    if logits.dim() != 3 or rho.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (S, L, V) and rho (S,), got {tuple(logits.shape)} and {tuple(rho.shape)}")
    n_states, length, vocab_size = logits.shape
    seqs = all_sequences(vocab_size, length)  # (N, L)
    logp = torch.log_softmax(logits, -1)  # (S, L, V)
    per_seq = logp[:, torch.arange(length)[None, :], seqs].sum(-1)  # (S, N)
    return rho.to(logits.dtype) @ per_seq.exp()


def sample_generator(logits: Tensor, rho: Tensor, batch: int,
                     generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Draw ``batch`` initial-state indices ``c ~ rho`` and tokens ``x ~ softmax(logits[c])``
    (independent per position); returns ``(c (B,), x (B, L))`` long."""
    c = torch.multinomial(rho, batch, replacement=True, generator=generator)
    probs = torch.softmax(logits[c].detach(), -1)  # (B, L, V)
    x = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(batch, -1)
    return c, x


def teacher_init_logits(p_data: Tensor, states: Tensor, vocab_size: int = 4, copy_smoothing: float = 0.1) -> Tensor:
    r"""Logits of a generator initialised as a copy of the teacher MDM applied once to :math:`x_{init}`.

    At a masked position the teacher's posterior given the visible tokens of :math:`x_{init}`; at a
    visible position the teacher's carry-over of that token, smoothed as in label-smoothed MDM
    training:

    .. math::
        z(c)^i = \log p_\phi(\cdot\,|\,c)^i \ (c^i = \mathtt{[M]}),\qquad
        z(c)^i = \log\big[(1-\eta)\,e_{c^i} + \tfrac{\eta}{V-1}(1 - e_{c^i})\big]\ (c^i \ne \mathtt{[M]})

    For the fully masked state this is the product of the data's marginals (one-step MDM sampling).

    Args:
        p_data: ``(V**L,)`` teacher's data distribution.
        states: ``(S, L)`` initial states.
        vocab_size: ``V``.
        copy_smoothing: :math:`\eta \in (0, 1)`.

    Returns:
        ``(S, L, V)`` float64 logits.

    Reference: ``dimo`` (generator initialised from the teacher).
    """
    if not (0.0 < float(copy_smoothing) < 1.0):
        raise ValueError(f"copy_smoothing must lie in (0, 1), got {copy_smoothing!r}")
    post = token_posterior(p_data, states, vocab_size)
    visible = (states != vocab_size)[..., None]
    onehot = torch.nn.functional.one_hot(states.clamp(max=vocab_size - 1), vocab_size).to(DT)
    smooth = (1.0 - copy_smoothing) * onehot + copy_smoothing / (vocab_size - 1) * (1.0 - onehot)
    return torch.log(torch.where(visible, smooth, post))


def exact_kl(p: Tensor, q: Tensor) -> float:
    r"""Exact KL divergence of two distributions over the enumerated sequences (nats).

    .. math:: \mathrm{KL}(p\|q) = \sum_x p(x)\,\big(\log p(x) - \log q(x)\big)

    Reference: ``dimo`` (evaluation on the toy).
    """
    p, q = p.detach(), q.detach()
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    pos = p > 0
    if bool((q[pos] <= 0).any()):
        return math.inf
    return float((p[pos] * (p[pos].log() - q[pos].log())).sum())
