"""Fuzz test of the public API of ``opd_ref``: no silent wrong result.

Every public callable (each name in ``opd_ref.__all__`` and in the ``__all__`` of every public
submodule) has a row in ``ROWS``: a builder that draws arguments with hypothesis, over shapes (a
zero-size batch included), magnitudes from 1e-30 to 1e30, sigma and noise-level edges (0, 1, just
inside), Python floats and per-sample tensors.  Each drawn case is run in one of four modes:

* ``f32``: float32 inputs.  The outcome must be a value that matches the **same call on the same
  (float32-rounded) values in float64**, elementwise ``|out - ref| <= RTOL (|ref| + scale)`` with
  ``RTOL = 1e-4`` and ``scale`` the largest ``|ref|`` of that output (a normwise bound; rows whose
  output is a difference of large terms state their own scale); a reference beyond the float32 range
  must come back as an inf of the same sign.
* ``f64``: float64 inputs; the outcome must be finite, or an inf (a value beyond the float64 range),
  never NaN.
* ``mixed``: one floating argument in float64, the others float32: a value matching the float64
  reference, or a clear error.
* ``bad``: one argument replaced by an invalid value (NaN, inf, an int or bool tensor, a str, None, a
  wrong shape): the outcome must be a ``ValueError``/``TypeError`` whose message names that argument,
  or (where the value is legitimately accepted, e.g. ``None`` for an optional argument) a value that
  passes the ``f32`` check.

Any other exception, a message that names no argument, a NaN output or a mismatch is a failure.

The surface includes ``opd_ref.dimo``, ``opd_ref.conformance`` (``opd-check``: its full checks are
memoised, ``main`` is judged by its exit status, argparse's usage exit 2 counting as a clear error, and an
``AdapterError`` may name the adapter, ``step``/``kl``), ``opd_ref.reward_dmd`` (D16; RTDMD's chain noise
at unit magnitude, its contract), ``opd_ref.teachers`` (D18; NFT's reward in [0, 1], edges included) and the
validated specs of ``opd_ref.engine``.  The
engine callables that need a Policy, an optimizer or the objective registry are named in ``NOT_FUZZED``
with the reason (tested in test_engine.py); ``test_every_public_callable_has_a_row`` fails when any
other public callable has no row.

``test_fuzz_gradient``: for the differentiable losses (``GRAD_ROWS``), the gradient of the summed output
w.r.t. the arguments a trainer differentiates must be free of NaN and match the float64 autograd
gradient of the same call under the same elementwise rule (an inf of the right sign where the float64
gradient is beyond the float32 range).

Set ``FUZZ_REPORT=path.json`` to write the per-outcome counts of a run, ``FUZZ_EXAMPLES=N`` for the
examples per callable (default 25).  Other seeds: ``pytest tests/opd_ref/test_fuzz.py --hypothesis-seed N``
(without ``CI`` set, or with ``CI=`` now that the dev profile is explicitly not derandomised).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import pkgutil
import re
from collections import Counter
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opd_ref
from opd_ref import bregman, chains, conformance, crd, engine, distribution_matching, divergences, elbo, estimators, gopd, kernels, losses, tilting
from opd_ref import discriminator, reward_bregman, reward_dmd, teachers
from opd_ref.kernels import GaussianStep

F32, F64 = torch.float32, torch.float64
RTOL = 1e-4
# every public module is fuzzed (reward_dmd and teachers included); a module may be excluded here only
# with the reason
EXCLUDED_MODULES: Tuple[str, ...] = ()
# opd_ref.engine validates once, in its specs (fuzzed below), and its hot loop takes those specs and a
# Policy unchecked; these callables need a Policy, a registry or an optimizer and are tested in
# test_engine.py instead (named, with the reason; any other public callable must have a row)
NOT_FUZZED = {
    **{n: "needs a Policy (rollouts and updates): test_engine.py" for n in (
        "rollout", "policy_rollout", "distill_update", "grpo_update", "crd_update", "nft_update", "path_divergence",
        "initial_noise", "Policy", "Collective", "optimizer_step")},
    **{n: "hot-loop record built by the engine from validated specs: test_engine.py" for n in (
        "StepInputs", "StepLoss", "StepCoefficients", "Transition", "Trajectory", "RolloutBatch",
        "UpdateSpec", "DistillTask")},
    "register": "adds to the global objective registry (one line per objective in objectives.py)",
    "Objective": "a registry entry (built by register)",
    "Velocity": "a typing alias, Callable[[Tensor, float], Tensor]",
    "guided_condition": "needs a Policy with with_guidance (CRD's guided reference): test_crd_mechanisms.py",
    **{n: "unchecked hot-loop maths of crd_update (its inputs come from a validated CRDMechanisms): "
          "test_crd_mechanisms.py" for n in ("adaptive_kl_weights", "elbo_term")},
}
MAGS = (1.0, 1.0, 1e-3, 1e3, 1e-30, 1e30)
SIGMAS = (0.5, 0.9999, 1e-6, 1.0, 1.0 - 1e-7, 1e-7, 0.3, 0.0)
NOISES = (0.7, 1.0, 0.0, 1e-7, 0.3, 1.5)
COUNTS: Counter = Counter()


# ----------------------------------------------------------------------------------------------
# argument generation


@dataclass
class Lazy:
    """Arguments that must be built in the case's dtype (e.g. a loss with its graph)."""

    make: Callable[[torch.dtype], Tuple[tuple, dict]]


class Gen:
    """Draws the pieces of one case; every tensor is float64 holding float32-representable values."""

    def __init__(self, data):
        self.data = data
        self.B = data.draw(st.sampled_from([3, 1, 0, 2]), label="B")
        self.event = data.draw(st.sampled_from([(2,), (2, 3), (4,)]), label="event")
        self.gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    def pick(self, options, label):
        return self.data.draw(st.sampled_from(options), label=label)

    def t(self, *shape, positive=False, mag=None):
        mag = self.pick(MAGS, "mag") if mag is None else mag
        x = torch.randn(*shape, generator=self.gen, dtype=F64) * mag
        if positive:
            x = x.abs() + mag * 0.1
        return x.float().double()

    def state(self, **kw):
        return self.t(self.B, *self.event, **kw)

    def vec(self, **kw):
        return self.t(self.B, **kw)

    def sigma(self):
        s = self.pick(SIGMAS, "sigma")
        return torch.full((self.B,), s, dtype=F64).float().double() if self.pick([False, True], "sigma_tensor") else s

    def sigma_next(self, sigma):
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) and sigma.numel() else (
            sigma if not isinstance(sigma, torch.Tensor) else 0.5)
        return self.pick([0.0, 0.5 * s, s * (1 - 1e-6), max(s - 1e-5, 0.0), s], "sigma_next")

    def noise(self):
        return self.pick(NOISES, "noise_level")

    def std(self):
        kind = self.pick(["float", "vec", "col"], "std_kind")
        if kind == "float":
            return self.pick([0.5, 1e-3, 1e3, 1.0], "std_value")
        v = self.vec(positive=True, mag=self.pick([1.0, 1e-3, 1e3], "std_mag"))
        return v if kind == "vec" else v.reshape((self.B,) + (1,) * len(self.event))

    def step(self):
        return GaussianStep(self.state(), self.std())

    def ids(self):
        groups = torch.arange(self.B) // 2
        if self.B % 2 == 1 and self.B > 1:
            groups[-1] = groups[-2]
        return groups

    def spd(self, d):
        a = self.t(d, d, mag=1.0)
        return (a @ a.T + d * torch.eye(d, dtype=F64)).float().double()


def _velocity(x, sigma):
    """A smooth velocity field (dtype-following): the exact velocity of N(m, I) data is affine."""
    return -0.5 * x + 0.1 * torch.sin(x) + 0.25


def _velocity_b(x, sigma):
    return -0.4 * x + 0.1


def _chain(g, d, n):
    A = torch.stack([torch.eye(d, dtype=F64) * 0.9 + 0.05 * g.t(d, d, mag=1.0) for _ in range(n)]).float().double()
    return chains.LinearGaussianChain(A, g.t(n, d, mag=1.0), g.t(n, positive=True, mag=1.0))


def _logit_fn(x, sigma):
    """A smooth logit on (x, sigma) (dtype-following), for discriminator_log_ratio."""
    return 0.5 * x.flatten(1).sum(1) + 0.1 * torch.tanh(x.flatten(1)).sum(1) + 0.0 * sigma


def _grads_case(g):
    def make(dtype):
        theta = torch.ones(2, dtype=dtype, requires_grad=True)
        w = torch.arange(1, g.B * 2 + 1, dtype=dtype).reshape(g.B, 2)
        return ((w * theta).sum(1) ** 2,), {"params": [theta]}

    return Lazy(make)


def _reward_quadratic(x):
    """A smooth reward on x (N... , d) (dtype-following), for rtdmd_surrogate."""
    return -(x - 0.5).pow(2).sum(-1) + 0.1 * torch.sin(x).sum(-1)


def _rtdmd_case(g):
    N, d = g.pick([2, 3, 1], "N"), g.pick([2, 1], "d")
    pathwise_last = g.pick([True, False], "pathwise_last")
    std = [g.pick([0.5, 1e-3, 1.0, 2.0], "step_std") for _ in range(N)]
    if pathwise_last:
        std[-1] = 0.0
    beta = g.pick([0.0, 0.5, 2.0], "beta")
    teacher = (g.t(d, mag=1.0), g.t(d, positive=True, mag=1.0)) if beta > 0 or g.pick([False, True], "teacher") else None
    # noise is the standard normal draw of the chain (its contract), so unit magnitude
    return ((g.t(N, d), g.t(N, d), std, g.t(N + 1, g.B, d, mag=1.0), _reward_quadratic),
            {"baseline": g.pick([0.0, 1.5, -1e3], "baseline"), "pathwise_last": pathwise_last, "beta": beta,
             "teacher": teacher})


def _gaussian_pair(g):
    d = g.pick([2, 3, 1], "d")
    return (g.t(d), g.t(d, positive=True), g.t(d), g.t(d, positive=True)), {}


def _unit_r(g):
    """NFT's normalised reward in [0, 1] (its edges included)."""
    return g.pick([g.vec(mag=1.0).abs().clamp(max=1.0), torch.ones(g.B, dtype=F64), torch.zeros(g.B, dtype=F64)], "r")


def _logits(g, L, V, mag=None):
    return g.t(g.B, L, V, mag=mag)


def _mask(g, L):
    return torch.rand(g.B, L, generator=g.gen) < 0.6


def _dimo_target(g, L, V):
    if g.pick(["tokens", "probs"], "target_kind") == "tokens":
        return torch.randint(V, (g.B, L), generator=g.gen)
    return torch.softmax(g.t(g.B, L, V, mag=1.0), -1).float().double()


def _dimo_case(g, with_generator):
    L, V = g.pick([3, 1], "L"), g.pick([4, 2], "V")
    args = (_logits(g, L, V), _logits(g, L, V))
    beta = g.pick([0.0, 1.0, 0.5, 0.25], "beta")
    if with_generator:
        return (_logits(g, L, V),) + args + (_mask(g, L), beta), {}
    return args + (beta,), {"mask": g.pick([None, "m"], "mask") and _mask(g, L)}


# opd-check adapters for the conformance rows: the exact kernels and two that break the contract at once
_ADAPTERS = "tests/opd_ref/check_adapters"


def _step_exact(x, v, sigma, sigma_next, noise_level, x_next):
    st = kernels.sde_step(x, v, sigma, sigma_next, noise_level)
    return {"mean": st.mean, "std": st.std, "log_prob": divergences.gaussian_log_prob(x_next, st)}


def _kl_exact(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    return divergences.kernel_kl(v_student, v_teacher, sigma, sigma_next, noise_level)


def _returns_list(*args):
    return [args[0]]


def _check_case(g, mode):
    """check_step / check_kl arguments; the valid ones are few (each full check takes ~2 s, memoised)."""
    fn = g.pick([_returns_list, _step_exact if mode == "step" else _kl_exact], "adapter")
    kw = {"noise_level": g.pick([0.7, 0.0], "noise_level"), "n_steps": g.pick([10, 1], "n_steps"),
          "resolution": g.pick([512, 12], "resolution"), "check_grad": False, "target": None}
    kw["clip_range" if mode == "step" else "beta"] = g.pick([0.04, -1.0], "factor")
    return (fn,), kw


_MEMO: Dict[tuple, Any] = {}


def _memoised(fn):
    """The full conformance checks are deterministic in their arguments: run each argument set once."""
    def call(*args, **kwargs):
        key = (fn.__name__, tuple(map(repr, args)), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in _MEMO:
            try:
                _MEMO[key] = (fn(*args, **kwargs), None)
            except Exception as err:  # noqa: BLE001 - replayed below
                _MEMO[key] = (None, err)
        out, err = _MEMO[key]
        if err is not None:
            raise err
        return out

    call.__signature__ = inspect.signature(fn)
    return call


def _report_case(g):
    kw = {"noise_level": 0.7, "n_steps": 10, "resolution": 512, "check_grad": False, "target": None, "beta": 0.04}
    return (_memoised(conformance.check_kl)(_kl_exact, **kw),), {}


def _main_case(g):
    """Command lines that fail fast (the full runs are tested in test_conformance.py)."""
    argv = g.pick([["kl", f"{_ADAPTERS}/missing.py:kl"], ["bogus"], ["kl", f"{_ADAPTERS}/bad.py:kl_keepdim", "--no-grad"],
                   ["step", f"{_ADAPTERS}/bad.py:returns_list"], ["kl", f"{_ADAPTERS}/exact.py:kl", "--noise-level", "nan"],
                   ["kl", f"{_ADAPTERS}/exact.py:kl", "--beta", "-1"], ["step", f"{_ADAPTERS}/bad.py:too_few_arguments"],
                   ["kl", "no-colon"]], "argv")
    return (argv,), {}


# (args, kwargs) builders: one row per public callable
ROWS: Dict[str, Callable[[Gen], Any]] = {
    # kernels
    "GaussianStep": lambda g: ((g.state(), g.std()), {}),
    "sde_step": lambda g: (lambda s: ((g.state(), g.state(), s, g.sigma_next(s), g.noise()),
                                      {"sigma_one": g.pick(["error", "flowgrpo"], "sigma_one")}))(g.sigma()),
    "cps_step": lambda g: (lambda s: ((g.state(), g.state(), s, g.sigma_next(s), g.noise()), {}))(g.sigma()),
    "ode_step": lambda g: (lambda s: ((g.state(), g.state(), s, g.sigma_next(s)), {}))(g.sigma()),
    "sde_std_t": lambda g: (lambda s: ((s, g.noise()), {"sigma_next": g.sigma_next(s),
                                                        "sigma_one": g.pick(["error", "flowgrpo"], "sigma_one")}))(g.sigma()),
    "sde_kl_coefficient": lambda g: (lambda s: ((s, g.sigma_next(s), g.noise()), {}))(g.sigma()),
    "cps_kl_coefficient": lambda g: (lambda s: ((s, g.sigma_next(s), g.noise()), {}))(g.sigma()),
    "kernel_coefficients": lambda g: (lambda s: ((s, g.sigma_next(s), g.noise()),
                                                 {"kind": g.pick(["sde", "cps"], "kind"), "batch": g.B}))(g.sigma()),
    "sigma_to_t": lambda g: ((g.pick([g.sigma(), g.vec(mag=1.0).abs().clamp(max=1.0)], "which"),), {}),
    "t_to_sigma": lambda g: ((g.pick([g.sigma(), g.vec(mag=1.0).abs().clamp(max=1.0)], "which"),), {}),
    # divergences
    "gaussian_log_prob": lambda g: ((g.state(), g.step()), {}),
    "gaussian_log_prob_dim_mean": lambda g: ((g.state(), g.step()), {}),
    "cps_log_prob_flowgrpo": lambda g: ((g.state(), g.step()), {}),
    "same_cov_kl": lambda g: ((g.state(), g.state(), g.std()), {}),
    "diag_gaussian_kl": lambda g: ((g.state(), g.std(), g.state(), g.std()), {}),
    "flowgrpo_step_kl": lambda g: ((g.state(), g.state(), g.std()), {}),
    "kernel_kl": lambda g: (lambda s: ((g.state(), g.state(), s, g.sigma_next(s), g.noise()),
                                       {"kind": g.pick(["sde", "cps"], "kind")}))(g.sigma()),
    "kernel_log_ratio": lambda g: (lambda s: ((g.state(), g.state(), g.state(), g.state(), s, g.sigma_next(s), g.noise()),
                                              {"kind": g.pick(["sde", "cps"], "kind")}))(g.sigma()),
    # losses
    "opd_kl_loss": lambda g: ((g.step(), g.state()), {}),
    "ode_matching_loss": lambda g: ((g.state(), g.state()), {}),
    "ppo_surrogate_loss": lambda g: ((g.vec(), g.vec(), g.pick([g.vec(), torch.zeros(g.B, dtype=F64)], "adv")),
                                     {"clip_range": g.pick([None, 0.2, 1e-4], "clip")}),
    "sde_kl_rescaled": lambda g: (lambda s: ((g.state(), g.state(), g.state(), s, g.sigma_next(s), g.noise()),
                                             {"rescale": g.pick(["step_variance", "noise_level_squared"], "rescale")}))(g.sigma()),
    "deterministic_limit_weight": lambda g: (lambda s: ((s, g.sigma_next(s)), {}))(g.sigma()),
    # estimators
    "pathwise_surrogate": lambda g: ((g.step(), g.state()), {}),
    "ppo_kl_surrogate": lambda g: ((g.step(), g.state(), g.state()), {}),
    "k1_surrogate": lambda g: ((g.step(), g.state(), g.state()), {}),
    "vopd_surrogate": lambda g: ((g.step(), g.state(), g.state()), {}),
    "estimator_surrogate": lambda g: ((g.pick(list(estimators.ESTIMATORS), "name"), g.step(), g.state(), g.state()), {}),
    "analytic_moments": lambda g: ((g.t(4, 2), g.t(4), g.pick([0.5, 1e-3, 1e3], "s")), {}),
    "per_sample_grads": _grads_case,
    # discriminator (D14)
    "log_prior_ratio": lambda g: ((g.pick([1, 3, 1000], "n_student"), g.pick([1, 2, 7], "n_teacher")), {}),
    "discriminator_logistic_loss": lambda g: ((g.t(g.B + 1), g.vec()), {}),
    "bayes_optimal_logit": lambda g: ((g.state(), g.state(), g.pick([1, 3], "n_student"), 2), {}),
    "logit_to_log_ratio": lambda g: ((g.state(), 3, g.pick([1, 2], "n_teacher")), {}),
    "discriminator_log_ratio": lambda g: ((_logit_fn, g.state(), g.sigma()), {"n_student": 2}),
    "gan_generator_loss": lambda g: ((g.vec(),), {}),
    # reward_bregman (D15)
    "normalized_reward_log_ratio": lambda g: ((g.state(), g.pick([0.5, 1e-3, 1e3], "beta"), g.pick([0.0, 1.5], "log_z")), {}),
    "reward_bregman_generator_surrogate": lambda g: ((g.state(), g.state(), g.state(), g.vec(mag=1.0), g.vec(mag=1.0),
                                                      g.state(), g.pick(sorted(bregman.H_FAMILY), "h")), {}),
    # reward_dmd (D16): R_dm's reward, REINFORCE, the Gaussian closed forms, RTDMD's surrogate
    "dmd_reward": lambda g: ((g.vec(), g.vec()), {}),
    "rdm_reinforce_surrogate": lambda g: ((g.vec(), g.vec()), {"normalise": g.pick(list(reward_dmd.NORMALISATIONS), "normalise"),
                                                               "group_size": g.pick([2, 3, None], "group_size")}),
    "gaussian_dmd_gradient": _gaussian_pair,
    "gaussian_dmd_variances": _gaussian_pair,
    "affine_chain_marginal": lambda g: (lambda N, d: ((g.t(N, d), g.t(N, d), [g.pick([0.5, 0.0, 1e-3, 2.0], "step_std") for _ in range(N)]),
                                                      {}))(g.pick([2, 3, 1], "N"), g.pick([2, 1], "d")),
    "rtdmd_surrogate": _rtdmd_case,
    # teachers (D18): DiffusionNFT, GRPO-Guard
    "nft_implicit_velocities": lambda g: ((g.state(), g.state(), g.pick([1.0, 0.1, 10.0, 1e-3], "beta")), {}),
    "nft_loss": lambda g: ((g.state(), g.state(), g.state(), _unit_r(g), g.pick([1.0, 0.1, 10.0, 1e-3], "beta")), {}),
    "nft_regression_target": lambda g: ((g.state(), g.state(), _unit_r(g), g.pick([1.0, 0.1, 10.0, 1e-3], "beta")), {}),
    "nft_optimum": lambda g: ((g.state(), g.vec(), g.state(), g.pick([1.0, 0.1, 10.0, 1e-3], "beta")), {}),
    "guard_log_ratio": lambda g: ((g.state(), g.state(mag=1.0), g.pick([0.5, 1e-3, 1.0, 1e3], "std"),
                                   g.pick([0.5, -0.1, 1e-3, 2.0], "c_v")), {}),
    # bregman
    "BregmanH": lambda g: (("kl", "text", bregman.KL.h, bregman.KL.h_prime, bregman.KL.grad_weight), {}),
    "get_h": lambda g: ((g.pick(sorted(bregman.H_FAMILY) + [bregman.KL], "h"),), {}),
    "bregman_divergence": lambda g: ((g.state(), g.pick(sorted(bregman.H_FAMILY), "h")),
                                     {"log_ratio_star": g.pick([None, "t"], "star") and g.state()}),
    "bregman_gradient_weight": lambda g: ((g.state(), g.pick(sorted(bregman.H_FAMILY), "h")), {}),
    "bregman_generator_surrogate": lambda g: ((g.state(), g.state(), g.state(), g.vec(), g.pick(sorted(bregman.H_FAMILY), "h")),
                                              {"weight": g.vec(positive=True) if g.pick([False, True], "w") else 1.0}),
    # distribution matching
    "distribution_matching_surrogate": lambda g: ((g.state(), g.state(), g.state()), {"weight": g.pick([1.0, 0.0, 2.5], "w")}),
    "dmd_normalized_weight": lambda g: ((g.state(), g.state(), g.sigma()), {}),
    # crd
    "implicit_reward": lambda g: ((g.vec(), g.vec(), g.pick([0.1, 1.0, 1e3], "beta")), {}),
    "implicit_reward_from_steps": lambda g: ((g.t(g.B, 3), g.pick([0.1, 1.0], "beta")), {}),
    "group_mean": lambda g: ((g.vec(), g.ids()), {}),
    "center_in_groups": lambda g: ((g.vec(), g.ids()), {}),
    "crd_loss": lambda g: ((g.vec(), g.vec(), g.ids()), {"weights": g.pick([None, "w"], "w") and g.vec(positive=True)}),
    "uncentered_reward_loss": lambda g: ((g.vec(), g.vec()), {"normalizer": g.pick([None, "n"], "n") and g.vec()}),
    "group_softmax_weights": lambda g: ((g.vec(), g.ids()), {"temperature": g.pick([1.0, 0.1, 10.0], "tau")}),
    "unit_interval_advantage": lambda g: ((g.vec(), g.ids()), {"scale": g.pick([None, 1.0], "scale"), "clip": g.pick([1.0, 2.0], "clip")}),
    # gopd
    "gopd_reward": lambda g: ((g.vec(), g.vec(), g.pick([1.0, 0.0, 2.0, 0.5], "lam")), {}),
    "gopd_log_target": lambda g: ((g.vec(), g.vec(), g.pick([1.0, 0.0, 2.0, 0.5], "lam")), {}),
    "gopd_sample_loss": lambda g: ((g.vec(), g.vec(), g.vec(), g.pick([1.0, 0.0, 2.0, 0.5], "lam")), {}),
    "gopd_step_loss": lambda g: ((g.step(), g.state(), g.state(), g.pick([1.0, 0.0, 2.0, 0.5], "lam")), {}),
    "gopd_target_gaussian": lambda g: ((g.t(2, mag=1.0), g.spd(2), g.t(2, mag=1.0), g.spd(2), g.pick([1.0, 0.5, 2.0, 0.0], "lam")), {}),
    # tilting
    "tilted_log_ratio": lambda g: ((g.vec(), g.vec(), g.vec(), g.pick([1.0, 0.1], "beta"), g.pick([0.0, 1.5], "log_z")), {}),
    "tilted_kl_decomposition": lambda g: ((g.vec(), g.vec(), g.pick([1.0, 0.1], "beta"), g.pick([0.0, 1.5], "log_z")), {}),
    "importance_weighted_reward": lambda g: ((g.vec(mag=1.0), g.vec(mag=1.0), g.vec()), {}),
    "self_normalised_weights": lambda g: ((g.vec(),), {}),
    "log_partition_estimate": lambda g: ((g.vec(), g.pick([1.0, 0.1], "beta")), {}),
    # chains
    "per_step_kls": lambda g: ((g.t(2, g.B, *g.event), g.t(2, g.B, positive=True), g.t(2, g.B, *g.event), g.t(2, g.B, positive=True)), {}),
    "path_kl": lambda g: ((g.t(2, g.B, *g.event), g.t(2, g.B, positive=True), g.t(2, g.B, *g.event), g.t(2, g.B, positive=True)), {}),
    "sequence_log_ratio": lambda g: ((g.t(3, g.B), g.t(3, g.B)), {}),
    "LinearGaussianChain": lambda g: ((g.t(2, 2, 2), g.t(2, 2), g.t(2, positive=True)), {}),
    "linear_gaussian_marginals": lambda g: ((g.t(2, mag=1.0), g.spd(2), _chain(g, 2, 2)), {}),
    "linear_gaussian_joint": lambda g: ((g.t(2, mag=1.0), g.spd(2), _chain(g, 2, 2)), {}),
    "gaussian_kl_full": lambda g: ((g.t(3, mag=1.0), g.spd(3), g.t(3, mag=1.0), g.spd(3)), {}),
    "linear_gaussian_path_kl": lambda g: ((g.t(2, mag=1.0), g.spd(2), _chain(g, 2, 2), _chain(g, 2, 2)), {}),
    # elbo (small: RK4 with few steps, few nodes)
    "exact_divergence": lambda g: ((_velocity, g.t(g.B, 2, mag=1.0), 0.5), {}),
    "ode_log_likelihood": lambda g: ((_velocity_b, g.t(g.B, 2, mag=1.0)), {"n_steps": g.pick([1, 3], "n_steps")}),
    "elbo_weight": lambda g: ((g.sigma(),), {}),
    "weighted_denoising_loss": lambda g: ((_velocity, g.t(g.B, 2, mag=1.0), g.pick([0.5, 1e-6, 0.9999, 1.0], "s"), g.t(g.B, 2, mag=1.0)), {}),
    "elbo_log_ratio": lambda g: ((_velocity, _velocity_b, g.t(g.B, 2, mag=1.0), torch.tensor([0.25, 0.75], dtype=F64),
                                  torch.tensor([0.5, 0.5], dtype=F64), g.t(3, 2, mag=1.0)), {}),
    "elbo_log_ratio_mc": lambda g: Lazy(lambda dt, x=g.t(g.B, 2, mag=1.0), seed=g.pick([0, 1], "mc_seed"): (
        (_velocity, _velocity_b, x.to(dt), 4), {"generator": torch.Generator().manual_seed(seed)})),
    "gauss_legendre_sigmas": lambda g: ((g.pick([1, 4, 8], "n"),), {"dtype": F32}),
    "gauss_hermite_normal": lambda g: ((g.pick([1, 3], "n"), g.pick([1, 2], "d")), {"dtype": F32}),
    # dimo (token logits; extreme magnitudes, masks, beta edges)
    "generalized_jeffrey": lambda g: _dimo_case(g, False),
    "jeffrey_logit_gradient": lambda g: _dimo_case(g, False),
    "dimo_generator_surrogate": lambda g: _dimo_case(g, True),
    "dimo_psi_loss": lambda g: (lambda L, V: ((_logits(g, L, V), _dimo_target(g, L, V), _mask(g, L)), {}))(
        g.pick([3, 1], "L"), g.pick([4, 2], "V")),
    # conformance (opd-check): argument validation and the fast paths; the report is a value
    "AdapterError": lambda g: (("a message",), {}),
    "sd3_sigma_grid": lambda g: ((g.pick([10, 1, 2], "n_steps"), g.pick([3.0, 1.0, 0.5], "shift"),
                                  g.pick([1000, 1], "T")), {}),
    "load_adapter": lambda g: ((g.pick([f"{_ADAPTERS}/exact.py:kl", f"{_ADAPTERS}/bad.py:too_few_arguments",
                                        f"{_ADAPTERS}/missing.py:kl", f"{_ADAPTERS}/exact.py:nope",
                                        f"{_ADAPTERS}/bad.py:NOT_A_FUNCTION", "no-colon", f"{_ADAPTERS}/exact.py:1x"], "spec"),
                                g.pick([6, 2], "n_args")), {}),
    "check_step": lambda g: _check_case(g, "step"),
    "check_kl": lambda g: _check_case(g, "kl"),
    "render_markdown": _report_case,
    "main": _main_case,
}

# engine specs, validated once (the hot loop trusts them)
ROWS.update({
    "KernelSpec": lambda g: ((g.pick(["sde", "cps", "ode"], "kind"), g.pick([0.7, 1.0, 1.5, 1e-7, 0.0], "a"),
                              g.pick(["flowgrpo", "ode", "error"], "sigma_one")), {}),
    "ObjectiveSpec": lambda g: ((g.pick(sorted(engine.OBJECTIVES), "name"), g.pick([0.2, None, 1e-4], "clip"),
                                 g.pick([0.0, 0.04], "kl_beta"), g.pick(list(engine.KL_FORMS), "kl_form"),
                                 g.pick([1.0, 0.1], "crd_beta")), {}),
    "AdvantageSpec": lambda g: ((g.pick([0, 1], "ddof"), g.pick([1e-4, 1.0], "eps"), g.pick([None, 5.0], "clip"),
                                 g.pick([None, 2], "group_size")), {}),
    "group_advantages": lambda g: ((g.t(*g.pick([(4,), (2, 3), (g.B, 2)], "shape")),),
                                   {"ddof": g.pick([0, 1], "ddof"), "eps": g.pick([1e-4, 1.0], "eps")}),
    "sigma_grid": lambda g: ((g.pick([4, 1], "n_steps"),), {"sigma_max": g.pick([1.0, 0.9], "smax"),
                                                              "sigma_min": g.pick([0.0, 0.1], "smin"),
                                                              "shift": g.pick([1.0, 3.0], "shift"), "dtype": F32}),
    "check_finite": lambda g: ((g.state(), "velocity"), {"step": g.pick([None, 3], "step")}),
    "NonFiniteError": lambda g: (("loss",), {"step": g.pick([None, 2], "step"), "task": g.pick([None, 0], "task")}),
    # CRD's mechanisms (D17)
    "CRDMechanisms": lambda g: ((), {"ratio_to": g.pick(["reference", "sampler", "other"], "ratio_to"),
                                     "guidance": g.pick([None, 2.0, 0.5], "guidance"),
                                     "kl_beta": g.pick([0.0, 0.1], "kl_beta"),
                                     "adaptive_kl": g.pick([False, True], "adaptive_kl"),
                                     "kl_floor": g.pick([0.2, 0.0], "kl_floor"),
                                     "implicit": g.pick(["path", "elbo"], "implicit"),
                                     "elbo_levels": g.pick([4, 1], "elbo_levels")}),
    "elbo_levels": lambda g: ((g.pick([4, 1, 16], "n"),), {}),
})
# documented exceptions that are clear errors of their row (check_finite exists to raise one)
EXPECTED_ERRORS = {"check_finite": engine.NonFiniteError}

# functions called through a memo (deterministic and slow), and names an error may use for an argument
WRAPPERS = {"check_step": _memoised, "check_kl": _memoised}
ALIASES = {
    # the adapter's own name: "step must return a dict ...", "kl must return a (B,) tensor ..."
    "check_step": ["step"], "check_kl": ["kl"],
    # check_finite names the tensor by its ``what`` argument ("velocity" in the row)
    "check_finite": ["velocity"],
}
# command-line entry points: argparse's usage error (SystemExit 2, message on stderr) is a clear error
CLI = {"main"}

# rows whose output is a difference of large terms: the tolerance scale is the size of those terms
SCALES: Dict[str, Callable[[tuple, dict], float]] = {
    "center_in_groups": lambda a, k: _absmax(a[0]),
    "crd_loss": lambda a, k: (_absmax(a[0]) + _absmax(a[1])) ** 2 * _absmax(k.get("weights"), 1.0),
    "uncentered_reward_loss": lambda a, k: (_absmax(a[0]) + _absmax(a[1]) + _absmax(k.get("normalizer"))) ** 2,
    "unit_interval_advantage": lambda a, k: 1.0,
    # a difference of two weighted denoising losses: the scale is their size
    "elbo_log_ratio": lambda a, k: _elbo_terms(*a),
    # sums of log-densities of both signs: the scale is the size of the summands
    "gopd_log_target": lambda a, k: _absmax(a[1]) + abs(a[2]) * (_absmax(a[0]) + _absmax(a[1])),
    "gopd_sample_loss": lambda a, k: _absmax(a[0]) + _absmax(a[2]) + abs(a[3]) * (_absmax(a[1]) + _absmax(a[2])),
    # log Z is a sum of quadratic forms and log-determinants that cancel (0 at lam = 1)
    "log_partition_estimate": lambda a, k: _absmax(a[0]) / a[1] + math.log(max(a[0].shape[0], 1)),
    "distribution_matching_surrogate": lambda a, k: _inner_scale(a[0], a[1], a[2], k.get("weight", 1.0)),
    "bregman_generator_surrogate": lambda a, k: _inner_scale(a[0], a[1], a[2], k.get("weight", 1.0))
    * float(bregman.get_h(a[4]).grad_weight(a[3]).abs().max()) if a[3].numel() else 0.0,
    "gopd_target_gaussian": lambda a, k: 10.0 * (1.0 + _absmax(a[0]) ** 2 + _absmax(a[2]) ** 2) * (1.0 + abs(a[4])),
}


def _inner_scale(x, s_fake, s_real, w):
    """Size of the terms of <w (s_fake - s_real), x>: the sum of their absolute values."""
    if not x.numel():
        return 0.0
    w = w.reshape(-1, *([1] * (x.dim() - 1))) if isinstance(w, torch.Tensor) else w
    return float((w * (s_fake - s_real) * x).abs().flatten(1).sum(1).max())


def _elbo_terms(v_theta, v_ref, x, nodes, weights, eps):
    """Sum of |omega_j w(sigma_j)| (L_theta + L_ref): the size of the terms elbo_log_ratio subtracts."""
    if not x.numel():
        return 0.0
    if eps.dim() == 2:
        eps = eps[:, None, :].expand(eps.shape[0], *x.shape)
    total = 0.0
    for s_j, om in zip(nodes.tolist(), weights.tolist()):
        for v in (v_theta, v_ref):
            total += abs(om) * float(elbo.weighted_denoising_loss(v, x, s_j, eps).abs().mean(0).max())
    return total


def _absmax(t, default=0.0):
    if isinstance(t, torch.Tensor) and t.numel():
        return float(t.abs().max())
    return default


# ----------------------------------------------------------------------------------------------
# running a case


def _cast(obj, dtype):
    """Every floating tensor (inside steps, chains, lists) in ``dtype``; torch.float32 dtype args too."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if torch.is_floating_point(obj) else obj
    if isinstance(obj, GaussianStep):
        return GaussianStep(_cast(obj.mean, dtype), _cast(obj.std, dtype))
    if isinstance(obj, chains.LinearGaussianChain):
        return chains.LinearGaussianChain(*(_cast(getattr(obj, f.name), dtype) for f in fields(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if obj is F32 or obj is F64:
        return dtype
    return obj


def _flatten(out):
    """The numeric content of an output as a list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return [torch.tensor(float(out), dtype=F64)]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if is_dataclass(out):
        return [t for f in fields(out) for t in _flatten(getattr(out, f.name))]
    return []  # str, callables (BregmanH fields)


def _names_argument(msg: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


class Failure(AssertionError):
    pass


class _UsageExit(ValueError):
    """argparse's exit 2 of a CLI row, as a clear error naming its argument (argv)."""


def _call(fn, args, kwargs, cli=False, expected=()):
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError, *expected) as err:
        return None, err
    except SystemExit as err:
        if cli and err.code == 2:
            return None, _UsageExit(f"argv: usage error (exit status 2): {args!r:.80}")
        raise


def _check_close(name, out, ref, scale):
    """float32-input output against the float64 reference of the same call."""
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        raise Failure(f"{name}: {len(outs)} output tensors vs {len(refs)} in the float64 reference")
    big = torch.finfo(F32).max
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise Failure(f"{name}: shape {tuple(o.shape)} vs reference {tuple(r.shape)}")
        narrow = o.dtype != F64  # a float64 output (promoted from a float64 argument) has the float64 range
        o, r = o.to(F64), r.to(F64)
        if bool(torch.isnan(r).any()):
            raise Failure(f"{name}: the float64 reference contains NaN")
        if bool(torch.isnan(o).any()):
            raise Failure(f"{name}: NaN output where the float64 reference is {r[torch.isnan(o)][:3].tolist()}")
        beyond = (r.abs() > big) if narrow else torch.zeros_like(r, dtype=torch.bool)
        if bool((o[beyond] != torch.sign(r[beyond]) * math.inf).any()):
            raise Failure(f"{name}: reference beyond the float32 range not returned as inf")
        within = ~beyond
        if not bool(within.any()):
            continue
        o_w, r_w = o[within], r[within]
        finite = torch.isfinite(r_w)
        s = scale if scale is not None else (float(r_w[finite].abs().max()) if bool(finite.any()) else 0.0)
        tol = RTOL * (r_w.abs() + s) + 2.0 * torch.finfo(F32).tiny  # below the float32 range: underflow
        err = torch.where(o_w == r_w, torch.zeros_like(r_w), (o_w - r_w).abs())  # equal infinities agree
        err = torch.where(finite | (o_w == r_w), err, torch.full_like(err, math.inf))
        tol = torch.where(finite, tol, torch.zeros_like(tol))
        if not bool((err <= tol).all()):
            i = int(torch.argmax(err - tol))
            raise Failure(f"{name}: float32 {float(o_w[i])!r} vs float64 {float(r_w[i])!r} (tol {float(tol[i]):.3g})")


def _check_f64(name, out):
    for o in _flatten(out):
        if bool(torch.isnan(o).any()):
            raise Failure(f"{name}: NaN output from float64 inputs")


def _bad_values(value):
    """Invalid replacements for one argument (each with the label used in the counts)."""
    bad = [("str", "0.5"), ("None", None)]
    if isinstance(value, torch.Tensor) and torch.is_floating_point(value):
        flat = value.clone()
        if flat.numel():
            nan, inf = flat.clone(), flat.clone()
            nan.view(-1)[0], inf.view(-1)[0] = math.nan, -math.inf
            bad += [("nan", nan.float()), ("inf", inf.float())]
        bad += [("int", value.long()), ("bool", value > 0), ("extra_dim", value.float()[None].expand(2, *value.shape)),
                ("batch+1", torch.cat([value.float(), value.float()[:1]]) if value.dim() and value.shape[0] else value.float()[None])]
    elif isinstance(value, float):
        bad += [("nan", math.nan), ("inf", math.inf), ("negative", -abs(value) - 1.0)]
    elif isinstance(value, bool):
        bad += [("int", int(value)), ("float", float(value))]
    elif isinstance(value, int):
        bad += [("negative", -abs(value) - 1), ("float", value + 0.5), ("bool", True)]
    elif isinstance(value, GaussianStep):
        bad += [("tuple", (value.mean, value.std)), ("tensor", value.mean)]
    return bad


def _run(name: str, data) -> str:
    fn = _callable(name)
    fn = WRAPPERS[name](fn) if name in WRAPPERS else fn
    cli = name in CLI
    expected = (EXPECTED_ERRORS[name],) if name in EXPECTED_ERRORS else ()
    g = Gen(data)
    built = ROWS[name](g)
    mode = data.draw(st.sampled_from(["f32", "f32", "f64", "mixed", "bad", "bad"]), label="mode")
    make = built.make if isinstance(built, Lazy) else (lambda dt, b=built: (_cast(b[0], dt), _cast(b[1], dt)))
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    args, kwargs = make(F64 if mode == "f64" else F32)
    ref_args, ref_kwargs = make(F64)
    mutated = None
    if mode in ("mixed", "bad") and not isinstance(built, Lazy):
        slots = [(i, None) for i in range(len(args))] + [(None, k) for k in kwargs]
        candidates = [sl for sl in slots if _slot_get(args, kwargs, sl) is not None or mode == "bad"]
        if mode == "mixed":
            candidates = [sl for sl in candidates if isinstance(_slot_get(args, kwargs, sl), torch.Tensor)
                          and torch.is_floating_point(_slot_get(args, kwargs, sl))]
        if not candidates:
            mode = "f32"
        else:
            sl = data.draw(st.sampled_from(candidates), label="slot")
            mutated = params[sl[0]] if sl[0] is not None and sl[0] < len(params) else sl[1]
            value = _slot_get(args, kwargs, sl)
            if mode == "mixed":
                new = value.to(F64)
            else:
                label, new = data.draw(st.sampled_from(_bad_values(value)), label="bad_value")
                mode = f"bad:{label}"
                ref_args, ref_kwargs = _slot_set(ref_args, ref_kwargs, sl, _cast(new, F64))
            args, kwargs = _slot_set(args, kwargs, sl, new)
    out, err = _call(fn, args, kwargs, cli, expected)
    if err is not None:
        every = (params or [name]) + ALIASES.get(name, [])
        names = [mutated] + ALIASES.get(name, []) if mutated is not None and mode.startswith("bad") else every
        if mode in ("bad:extra_dim", "bad:batch+1"):
            names = every  # a shape mismatch may be reported on the argument it mismatches
        if mutated in names and names != every and not _names_argument(str(err), names):
            # the drawn edge case may itself be invalid: then naming any argument is right
            _, plain_err = _call(fn, *make(F32), cli, expected)
            if plain_err is not None:
                names = every
        if not _names_argument(str(err), names):
            raise Failure(f"{name} [{mode}]: {type(err).__name__} names none of {names}: {err}")
        return "clear_error"
    if mode == "f64":
        _check_f64(name, out)
        return "value"
    ref, ref_err = _call(fn, ref_args, ref_kwargs, cli, expected)
    if ref_err is not None:
        raise Failure(f"{name} [{mode}]: accepted in float32 but the float64 reference raised {ref_err!r}")
    scale = SCALES[name](ref_args, ref_kwargs) if name in SCALES else None
    _check_close(f"{name} [{mode}]", out, ref, scale)
    return "value"


def _slot_get(args, kwargs, sl):
    return args[sl[0]] if sl[0] is not None else kwargs[sl[1]]


def _slot_set(args, kwargs, sl, value):
    if sl[0] is not None:
        args = tuple(value if i == sl[0] else a for i, a in enumerate(args))
    else:
        kwargs = {**kwargs, sl[1]: value}
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# the public surface


def public_callables() -> Dict[str, object]:
    """Every callable in ``opd_ref.__all__`` and in the ``__all__`` of each public (sub)module, the
    subpackage ``opd_ref.engine`` and its modules included."""
    found = {n: getattr(opd_ref, n) for n in opd_ref.__all__ if callable(getattr(opd_ref, n))}
    for info in pkgutil.walk_packages(opd_ref.__path__, "opd_ref."):
        if any(part.startswith("_") for part in info.name.split(".")) or info.name.startswith(EXCLUDED_MODULES or ("\0",)):
            continue
        mod = importlib.import_module(info.name)
        for n in getattr(mod, "__all__", []):
            obj = getattr(mod, n)
            if callable(obj) and not isinstance(obj, type(torch.float32)):
                found[n] = obj
    return found


def _callable(name):
    return public_callables()[name]


def test_every_public_callable_has_a_row():
    public = public_callables()
    missing = sorted(set(public) - set(ROWS) - set(NOT_FUZZED))
    assert not missing, f"public opd_ref callables without a fuzz row: {missing}"
    stale = sorted((set(ROWS) | set(NOT_FUZZED)) - set(public))
    assert not stale, f"fuzz rows for names that are not public: {stale}"
    assert all(getattr(public[n], "__module__", "").startswith(("opd_ref.engine", "typing")) for n in NOT_FUZZED)
    assert len(public) >= 70  # the surface really was enumerated


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("FUZZ_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(dict(COUNTS), fh, indent=1, sort_keys=True)


@pytest.mark.parametrize("name", sorted(ROWS))
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")))
@given(data=st.data())
def test_fuzz_public_callable(name, data):
    COUNTS["cases"] += 1
    try:
        outcome = _run(name, data)
    except Failure:
        COUNTS["silent_or_obscure"] += 1
        raise
    except Exception as err:  # any other exception type is an obscure internal error
        COUNTS["silent_or_obscure"] += 1
        raise Failure(f"{name}: obscure {type(err).__name__}: {err}") from err
    # _run has already compared the value with its float64 reference, or checked that the error is a
    # ValueError/TypeError naming the argument; here: nothing else came back
    assert outcome in ("value", "clear_error"), (name, outcome)
    COUNTS[outcome] += 1


# ----------------------------------------------------------------------------------------------
# gradients of the differentiable losses

#: the losses a trainer differentiates, with the arguments it differentiates them in (model outputs:
#: velocities, means, stds, log-probs, logits; not the grid's sigmas): each floating tensor there is a
#: leaf, and those the function detaches on purpose get a zero gradient in both precisions
GRAD_ROWS: Dict[str, Tuple[str, ...]] = {
    "bregman_divergence": ("log_ratio", "log_ratio_star"),
    "bregman_generator_surrogate": ("x_sigma", "score_fake", "score_real", "log_ratio"),
    "distribution_matching_surrogate": ("x_sigma", "score_fake", "score_real"),
    "k1_surrogate": ("student", "teacher_mean"),
    "vopd_surrogate": ("student", "teacher_mean"),
    "ppo_kl_surrogate": ("student", "teacher_mean"),
    "pathwise_surrogate": ("student", "teacher_mean"),
    "estimator_surrogate": ("student", "teacher_mean"),
    "ppo_surrogate_loss": ("log_prob", "old_log_prob", "advantage"),
    "gopd_step_loss": ("student", "teacher_mean", "ref_mean"),
    "gopd_sample_loss": ("log_p_theta", "log_p_teacher", "log_p_ref"),
    "opd_kl_loss": ("student", "teacher_mean"),
    "same_cov_kl": ("mean_p", "mean_q", "std"),
    "kernel_kl": ("v_student", "v_teacher"),
    "kernel_log_ratio": ("x_next", "x", "v_student", "v_teacher"),
    "generalized_jeffrey": ("teacher_logits", "psi_logits"),
    "dimo_generator_surrogate": ("generator_logits", "teacher_logits", "psi_logits"),
    "dimo_psi_loss": ("psi_logits", "target"),
    "rdm_reinforce_surrogate": ("log_prob",),
    "rtdmd_surrogate": ("a", "b"),
    "nft_loss": ("v_theta",),
    "guard_log_ratio": ("gap_old",),
}


def _leafify(obj, leaves):
    """``obj`` with every floating tensor replaced by a fresh leaf that requires grad (listed in ``leaves``)."""
    if isinstance(obj, torch.Tensor):
        if not torch.is_floating_point(obj):
            return obj
        leaf = obj.detach().clone().requires_grad_(True)
        leaves.append(leaf)
        return leaf
    if isinstance(obj, GaussianStep):
        return GaussianStep(_leafify(obj.mean, leaves), _leafify(obj.std, leaves))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leafify(o, leaves) for o in obj)
    if isinstance(obj, dict):
        return {k: _leafify(v, leaves) for k, v in obj.items()}
    return obj


def _gradients(fn, built, dtype, wrt):
    """Gradients of the sum of the outputs w.r.t. the floating tensors of the arguments named in ``wrt``,
    in ``dtype`` (None: no graph)."""
    leaves: list = []
    params = list(inspect.signature(fn).parameters)
    args, kwargs = _cast(built[0], dtype), _cast(built[1], dtype)
    args = tuple(_leafify(a, leaves) if i < len(params) and params[i] in wrt else a for i, a in enumerate(args))
    kwargs = {k: _leafify(v, leaves) if k in wrt else v for k, v in kwargs.items()}
    outs = [t for t in ([fn(*args, **kwargs)]) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outs or not leaves:
        return None
    grads = torch.autograd.grad(sum(t.sum() for t in outs), leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if gr is None else gr for gr, leaf in zip(grads, leaves)]


@pytest.mark.parametrize("name", sorted(GRAD_ROWS))
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")))
@given(data=st.data())
def test_fuzz_gradient(name, data):
    """Finite inputs give finite gradients (inf only where the float64 gradient is beyond the float32
    range) that match the float64 autograd gradient of the same call on the same values."""
    COUNTS["grad_cases"] += 1
    fn = _callable(name)
    built = ROWS[name](Gen(data))
    mode = data.draw(st.sampled_from(["f32", "f32", "f64"]), label="mode")
    try:
        grads = _gradients(fn, built, F64 if mode == "f64" else F32, GRAD_ROWS[name])
    except (ValueError, TypeError):
        COUNTS["grad_clear_error"] += 1  # the argument checks are fuzzed above
        return
    except Exception as err:
        COUNTS["grad_silent_or_obscure"] += 1
        raise Failure(f"{name} [grad]: obscure {type(err).__name__}: {err}") from err
    try:
        if mode == "f64":
            for gr in grads or []:
                if bool(torch.isnan(gr).any()):
                    raise Failure(f"{name} [grad f64]: NaN gradient from finite float64 inputs")
        elif grads is not None:
            _check_close(f"{name} [grad]", grads, _gradients(fn, built, F64, GRAD_ROWS[name]), None)
    except Failure:
        COUNTS["grad_silent_or_obscure"] += 1
        raise
    COUNTS["grad_value"] += 1
