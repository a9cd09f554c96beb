r"""``opd-check``: check anyone's kernel, log-prob and per-step KL against the exact math (D1, D2).

A user wraps their own code in a small adapter with one of two signatures:

```python
def step(x, v, sigma, sigma_next, noise_level, x_next) -> dict
    # x, v, x_next: (B, *event) float tensors; sigma, sigma_next: (B,) tensors; noise_level: float
    # returns any of: "mean" (B, *event), "std" (broadcastable to mean), "log_prob" (B,)

def kl(x, v_student, v_teacher, sigma, sigma_next, noise_level) -> Tensor  # (B,) per-sample KL
```

:func:`check_step` / :func:`check_kl` call it on exact inputs (event sizes ``D`` = 1, 16, 256, noise
levels, sigma pairs of the SD3.5 grid including ``sigma = 1`` and the last step to 0, float64 and
float32) and classify what it computes by fitting the measured relation to the exact kernels of
:mod:`opd_ref.kernels`: which kernel the mean is, whether "std" is the step std, the reduction and
missing terms of the log-prob, the factor between the KL and the exact per-step KL as a power law in
``D``, ``|dt|`` and the kernel's scale, and what that means for a PPO clip range and a KL weight beta
on the SD3.5 grid.  ``opd-check step FILE.py:FUNC`` and ``opd-check kl FILE.py:FUNC`` (:func:`main`)
print a Markdown report and exit 0 (conforms), 1 (differs) or 2 (usage error).

Tolerances: the classification runs on float64 inputs and matches a relation when it holds to a
relative ``1e-6`` on every case; float32 results must agree with the same function's float64 results
to a relative ``1e-3``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from opd_ref.divergences import same_cov_kl
from opd_ref.kernels import GaussianStep, cps_step, ode_step, sde_step

__all__ = [
    "AdapterError",
    "sd3_sigma_grid",
    "load_adapter",
    "check_step",
    "check_kl",
    "render_markdown",
    "main",
]

#: Event shapes of the test inputs (D = 1, 16, 256).
EVENT_SHAPES = ((1,), (16,), (4, 8, 8))
#: Noise levels ``a`` of the test inputs (all <= 1, so CPS is defined).
NOISE_LEVELS = (0.4, 0.7, 0.9)
#: Samples per call.
BATCH = 6
#: Relative tolerance of every classification (float64 inputs).
RTOL = 1e-6
#: Relative tolerance of float32 results against the same function in float64.
RTOL_FLOAT32 = 1e-3
#: Steps of the 10-step SD3.5 grid used as test pairs (0: sigma = 1, 9: the last step to 0), and one
#: large off-grid step.
GRID_STEPS = (0, 1, 4, 7, 8, 9)
OFF_GRID_PAIR = (0.6, 0.2)
#: Flow-GRPO's SD3.5 settings (config/base.py, config/grpo.py of its public code): the defaults of the CLI.
DEFAULTS = {"noise_level": 0.7, "n_steps": 10, "resolution": 512, "clip_range": 1e-4, "beta": 0.04}

_KERNELS = ("SDE", "CPS", "ODE")
_STEP_KEYS = ("mean", "std", "log_prob")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class AdapterError(ValueError):
    r"""A usage error: the adapter cannot be loaded or called, or returns the wrong type or shape.

    A ``ValueError`` (bad input to :func:`load_adapter`, :func:`check_step`, :func:`check_kl`), so that
    callers catching bad input catch it too.

    ``opd-check`` prints its message and exits with status 2 (no traceback).  The checks never raise
    it for a *wrong value*: those are findings of the report.  It guards the contract

    .. math::
        \texttt{step}: (x, v, \sigma, \sigma', a, x') \mapsto \{\mu, s, \log\pi\},\qquad
        \texttt{kl}: (x, v_s, v_t, \sigma, \sigma', a) \mapsto \mathrm{KL} \in \mathbb R^B

    of the kernels of ``flowgrpo`` and ``diffusionopd``.

    Args:
        message: what is wrong, naming the adapter, the key or argument and what was received.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


# --------------------------------------------------------------------------------------------------
# the SD3.5 grid


def sd3_sigma_grid(n_steps: int = 10, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    r"""The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` after
    ``set_timesteps(n_steps)`` (SD3 / SD3.5), computed without diffusers.

    .. math::
        \sigma_n = \frac{s\,u_n}{1 + (s-1)\,u_n},\qquad
        u_n = 1 + \frac{n}{N-1}\,(u_{\min} - 1)\quad (n = 0, \dots, N-1),\qquad
        u_{\min} = \frac{s/T}{1 + (s-1)/T},\qquad \sigma_N = 0

    (``T`` = ``num_train_timesteps``; the scheduler spaces the *shifted* smallest training sigma
    uniformly and shifts again, hence :math:`u_{\min}`).  Flow-GRPO trains SD3.5 on this grid with
    ``N = 10``, ``s = 3``.

    Args:
        n_steps: number of steps ``N >= 1``.
        shift: time shift ``s > 0``.
        num_train_timesteps: ``T >= 1``.

    Returns:
        ``(N + 1,)`` float64 tensor, decreasing from 1 to 0.

    Reference: ``flowgrpo`` (SD3.5 sampling grid).
    """
    for name, val in (("n_steps", n_steps), ("num_train_timesteps", num_train_timesteps)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite float, got {shift!r}")

    def shifted(u: Tensor | float):
        return shift * u / (1.0 + (shift - 1.0) * u)

    u_min = shifted(1.0 / num_train_timesteps)
    u = torch.linspace(1.0, u_min, n_steps, dtype=torch.float64) if n_steps > 1 else torch.ones(1, dtype=torch.float64)
    return torch.cat([shifted(u), torch.zeros(1, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------------
# loading an adapter


def load_adapter(spec: str, n_args: int) -> Callable:
    r"""Load ``FUNC`` from ``FILE.py`` given as ``"FILE.py:FUNC"`` (the file's folder goes first on
    ``sys.path`` while it is imported, as when running a script).

    .. math::
        \texttt{"FILE.py:FUNC"} \mapsto \texttt{FUNC},\quad
        \texttt{FUNC} \text{ callable with } n \text{ positional arguments}

    Used for the adapters of the ``flowgrpo`` / ``diffusionopd`` kernels that :func:`check_step` and
    :func:`check_kl` examine.

    Args:
        spec: ``"path/to/file.py:function_name"``.
        n_args: positional arguments the function must accept (6 for both adapter kinds).

    Returns:
        The callable.

    Raises:
        AdapterError: bad spec, missing file, import failure, missing or non-callable name, or a
            signature that cannot take ``n_args`` positional arguments.
    """
    if isinstance(n_args, bool) or not isinstance(n_args, int) or n_args < 0:
        raise TypeError(f"n_args must be an int >= 0 (the adapter's positional arguments), got {n_args!r}")
    if not isinstance(spec, str) or ":" not in spec:
        raise AdapterError(f"the adapter spec must be given as FILE.py:FUNC, got {spec!r}")
    file, func = spec.rsplit(":", 1)
    path = Path(file)
    if not func.isidentifier():
        raise AdapterError(f"the function name after ':' must be a Python identifier, got {func!r} in spec {spec!r}")
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {file!r} (from spec {spec!r})")
    mod_name = f"_opd_check_adapter_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise AdapterError(f"cannot import {file!r} of spec {spec!r} as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's file: report, never crash
        raise AdapterError(f"importing {file!r} (spec {spec!r}) failed: {type(err).__name__}: {err}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    if not hasattr(module, func):
        names = sorted(n for n, o in vars(module).items() if callable(o) and not n.startswith("_"))
        raise AdapterError(f"{file!r} has no function {func!r} (spec {spec!r}; callables defined there: {', '.join(names) or 'none'})")
    fn = getattr(module, func)
    if not callable(fn):
        raise AdapterError(f"spec {spec!r} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    try:
        sig.bind(*range(n_args))
    except TypeError:
        raise AdapterError(f"spec {spec!r}: the function must accept {n_args} positional arguments (n_args), its signature is {func}{sig}") from None
    return fn


# --------------------------------------------------------------------------------------------------
# the inputs


@dataclass
class _Case:
    """One call's exact inputs (float64 values that float32 represents exactly)."""

    shape: tuple
    sigma: float
    sigma_next: float
    a: float
    x: Tensor
    v: Tensor
    w: Tensor  # x_next (step) or v_teacher (kl)

    @property
    def D(self) -> int:
        return math.prod(self.shape)

    @property
    def dt(self) -> float:
        """``|dt| = sigma - sigma_next``."""
        return self.sigma - self.sigma_next

    @property
    def first(self) -> bool:
        return self.sigma >= 1.0

    @property
    def last(self) -> bool:
        return self.sigma_next <= 0.0

    def label(self) -> str:
        return f"D={self.D}, sigma={self.sigma:.4g}, sigma_next={self.sigma_next:.4g}, noise_level={self.a:g}"


def _f32(t: Tensor | float):
    """Round to the nearest float32 value, kept in float64."""
    if isinstance(t, Tensor):
        return t.float().double()
    return float(torch.tensor(t, dtype=torch.float32))


def _sigma_pairs() -> list:
    grid = sd3_sigma_grid(10, 3.0)
    pairs = [(float(grid[i]), float(grid[i + 1])) for i in GRID_STEPS] + [OFF_GRID_PAIR]
    return [(_f32(s), _f32(sn)) for s, sn in pairs]


def _sde(x: Tensor, v: Tensor, sigma: float, sigma_next: float, a: float) -> GaussianStep:
    """The exact SDE kernel (Flow-GRPO's rule where sigma = 1, the only finite choice there)."""
    return sde_step(x, v, sigma, sigma_next, a, sigma_one="flowgrpo")


def _reference(kind: str, x: Tensor, v: Tensor, sigma: float, sigma_next: float, a: float) -> GaussianStep:
    """The exact kernel ``kind`` (SDE, CPS, ODE) as a GaussianStep (ODE: std 0)."""
    if kind == "SDE":
        return _sde(x, v, sigma, sigma_next, a)
    if kind == "CPS":
        return cps_step(x, v, sigma, sigma_next, a)
    return GaussianStep(ode_step(x, v, sigma, sigma_next), 0.0)


def _cases(mode: str, seed: int = 17) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in EVENT_SHAPES:
        for sigma, sigma_next in _sigma_pairs():
            for a in NOISE_LEVELS:
                x = _f32(torch.randn((BATCH,) + shape, generator=gen, dtype=torch.float64))
                v = _f32(torch.randn((BATCH,) + shape, generator=gen, dtype=torch.float64))
                noise = torch.randn((BATCH,) + shape, generator=gen, dtype=torch.float64)
                if mode == "step":  # x_next drawn from the exact SDE kernel
                    ker = _sde(x, v, sigma, sigma_next, a)
                    w = _f32(ker.mean + ker.std * noise)
                else:  # a teacher velocity near the student's
                    w = _f32(v + 0.3 * noise)
                out.append(_Case(shape, sigma, sigma_next, a, x, v, w))
    return out


# --------------------------------------------------------------------------------------------------
# calling the adapter


@dataclass
class _Run:
    """One call's outputs (float64, detached) or the exception it raised."""

    out: Optional[dict] = None
    error: Optional[str] = None

    @property
    def finite(self) -> bool:
        return self.out is not None and all(bool(torch.isfinite(t).all()) for t in self.out.values())


def _as_float_tensor(name: str, value: object, what: str) -> Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "std":
        return torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, Tensor):
        raise AdapterError(f"{what}: {name!r} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise AdapterError(f"{what}: {name!r} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _validate_step(out: object, shape: tuple) -> dict:
    what = "step"
    if not isinstance(out, dict):
        raise AdapterError(f"step must return a dict with any of 'mean', 'std', 'log_prob'; got {type(out).__name__}")
    unknown = sorted(set(map(str, out)) - set(_STEP_KEYS))
    if unknown:
        raise AdapterError(f"step returned unknown key(s) {unknown}; the keys are 'mean', 'std', 'log_prob'")
    if not out:
        raise AdapterError("step returned an empty dict; return any of 'mean', 'std', 'log_prob'")
    res = {}
    for key, val in out.items():
        t = _as_float_tensor(key, val, what)
        if key == "mean" and tuple(t.shape) != shape:
            raise AdapterError(f"step: 'mean' must have the shape of x {shape}, got {tuple(t.shape)}")
        if key == "std":
            try:
                ok = torch.broadcast_shapes(t.shape, shape) == torch.Size(shape)
            except RuntimeError:
                ok = False
            if not ok:
                raise AdapterError(f"step: 'std' must be broadcastable to the mean's shape {shape}, got {tuple(t.shape)}")
            t = t.expand(shape)
        if key == "log_prob" and tuple(t.shape) != (shape[0],):
            raise AdapterError(f"step: 'log_prob' must have shape (B,) = ({shape[0]},), got {tuple(t.shape)}")
        res[key] = t
    return res


def _validate_kl(out: object, batch: int) -> dict:
    t = _as_float_tensor("kl", out, "kl")
    if tuple(t.shape) != (batch,):
        raise AdapterError(f"kl must return a (B,) = ({batch},) tensor of per-sample KLs, got shape {tuple(t.shape)}")
    return {"kl": t}


def _call(fn: Callable, mode: str, case: _Case, dtype: torch.dtype, grad: bool = False):
    """Call the adapter on ``case`` in ``dtype``; returns (validated outputs or None, error text, v)."""
    x, w = case.x.to(dtype), case.w.to(dtype)
    v = case.v.to(dtype).clone().requires_grad_(grad)
    batch = x.shape[0]
    sig = torch.full((batch,), case.sigma, dtype=dtype)
    sig_next = torch.full((batch,), case.sigma_next, dtype=dtype)
    args = (x, v, sig, sig_next, case.a, w) if mode == "step" else (x, v, w, sig, sig_next, case.a)
    try:
        with torch.enable_grad():
            out = fn(*args)
    except Exception as err:  # the user's code: recorded, classified below
        return None, f"{type(err).__name__}: {err}", v
    checked = _validate_step(out, tuple(x.shape)) if mode == "step" else _validate_kl(out, batch)
    return checked, None, v


def _run_all(fn: Callable, mode: str, cases: list, dtype: torch.dtype) -> list:
    runs = []
    for case in cases:
        out, err, _ = _call(fn, mode, case, dtype)
        if err is not None and dtype == torch.float64 and not (case.first or case.last):
            raise AdapterError(f"{mode} raised {err} on float64 inputs ({case.label()}); it must run on every step "
                               "with 0 < sigma_next < sigma < 1")
        runs.append(_Run({k: t.detach().double() for k, t in out.items()} if out else None, err))
    if mode == "step":
        keys = {tuple(sorted(r.out)) for r in runs if r.out is not None}
        if len(keys) > 1:
            raise AdapterError(f"step returned different keys on different calls: {sorted(keys)}")
    return runs


# --------------------------------------------------------------------------------------------------
# fitting measured relations


def _simple_number(c: float) -> str:
    for den in (1, 2, 3, 4):
        num = round(c * den)
        if num != 0 and abs(num / den / c - 1) <= 1e-9:
            return f"{num}" if den == 1 else f"{num}/{den}"
    return f"{c:.6g}"


def _formula(const: float, exps: dict) -> str:
    def power(sym: str, p: float) -> str:
        e = abs(p)
        return sym if e == 1 else f"{sym}^{e:g}"

    num = [power(_sym(n), p) for n, p in exps.items() if p > 0]
    den = [power(_sym(n), p) for n, p in exps.items() if p < 0]
    c = _simple_number(const)
    if "/" in c:
        cn, cd = c.split("/")
        den = [cd] + den
        c = cn
    top = " ".join(([c] if c != "1" or not num else []) + num)
    if not den:
        return top
    bottom = den[0] if len(den) == 1 else "(" + " ".join(den) + ")"
    return f"{top}/{bottom}"


def _fit_law(values: Sequence[float], regressors: dict) -> dict:
    r"""Fit ``f = C * prod_j r_j^{p_j}`` by least squares on logs; exponents are rounded to halves and
    the law is called exact when it reproduces every value to ``RTOL``."""
    f = np.asarray(values, dtype=np.float64)
    if f.size == 0:
        return {"exact": False, "formula": None, "note": "no values"}
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        return {"exact": False, "formula": None, "note": "some values are zero, negative or not finite",
                "range": [float(np.nanmin(f)), float(np.nanmax(f))]}
    names = list(regressors)
    logs = np.column_stack([np.log(np.asarray(regressors[n], dtype=np.float64)) for n in names])
    design = np.column_stack([np.ones(f.size), logs])
    coef = np.linalg.lstsq(design, np.log(f), rcond=None)[0]
    exps = np.round(coef[1:] * 2.0) / 2.0 + 0.0  # + 0.0: no -0.0
    log_c = float(np.mean(np.log(f) - logs @ exps))
    err = float(np.max(np.abs(np.exp(log_c + logs @ exps) / f - 1.0)))
    exact = err <= RTOL
    if not exact:  # keep the unrounded fit to say how far it is
        exps = coef[1:]
        log_c = float(coef[0])
        err = float(np.max(np.abs(np.exp(log_c + logs @ exps) / f - 1.0)))
    const = math.exp(log_c)
    return {
        "exact": exact,
        "formula": _formula(const, {n: float(p) for n, p in zip(names, exps) if p != 0}) if exact else None,
        "C": const,
        "exponents": {n: float(p) for n, p in zip(names, exps)},
        "max_rel_error": err,
        "range": [float(f.min()), float(f.max())],
    }


def _affine_fit(y: Tensor, q: Tensor) -> tuple:
    """Least squares ``y = alpha q + beta`` over the batch; returns (alpha, beta, relative residual)."""
    qc = q - q.mean()
    denom = float((qc * qc).sum())
    if denom <= 0:
        return float("nan"), float("nan"), float("inf")
    alpha = float((qc * (y - y.mean())).sum()) / denom
    beta = float(y.mean()) - alpha * float(q.mean())
    spread = float((y - y.mean()).abs().max())
    resid = float((y - alpha * q - beta).abs().max())
    return alpha, beta, (resid / spread if spread > 0 else float("inf"))


def _proportional(y: Tensor, ref: Tensor) -> tuple:
    """``y = gamma ref`` in least squares; returns (gamma, relative residual)."""
    yy, rr = y.flatten(), ref.flatten()
    nn = float((rr * rr).sum())
    if nn <= 0:
        return float("nan"), float("inf")
    gamma = float((yy * rr).sum()) / nn
    scale = abs(gamma) * math.sqrt(nn)
    resid = float(torch.linalg.vector_norm(yy - gamma * rr))
    return gamma, (resid / scale if scale > 0 else float("inf"))


def _sym(name: str) -> str:
    return {"D": "D", "dt": "abs(dt)", "s": "s", "c": "c"}[name]


def _law_regs(cases: list, extra: dict) -> dict:
    regs = {"D": [c.D for c in cases], "dt": [c.dt for c in cases]}
    regs.update(extra)
    return regs


def _law_text(law: dict) -> str:
    if law.get("exact"):
        return f"`{law['formula']}`"
    if "exponents" in law:
        terms = " ".join(f"{_sym(n)}^{p:.3g}" for n, p in law["exponents"].items())
        return (f"no exact power law in {', '.join(_sym(n) for n in law['exponents'])} "
                f"(best fit {law['C']:.4g} {terms}, off by up to {law['max_rel_error']:.2g}); "
                f"range {law['range'][0]:.4g} .. {law['range'][1]:.4g}")
    return f"no power law ({law.get('note')})"


def _eval_law(law: dict, D: float, dt: float, third: float, third_name: str) -> float:
    vals = {"D": D, "dt": dt, third_name: third}
    return law["C"] * math.prod(vals[n] ** p for n, p in law["exponents"].items())


# --------------------------------------------------------------------------------------------------
# step checks


def _rel_to_step(m: Tensor, ref: Tensor, x: Tensor) -> float:
    """``||m - ref|| / ||ref - x||``: the error relative to the size of the step."""
    if not bool(torch.isfinite(m).all()):
        return float("inf")
    return float(torch.linalg.vector_norm(m - ref) / torch.linalg.vector_norm(ref - x))


def _check_mean(cases: list, runs: list) -> dict:
    pairs = [(c, r) for c, r in zip(cases, runs) if r.out is not None and "mean" in r.out]
    if not pairs:
        return {"status": "not returned", "kernel": None, "sigma_one": None, "finding": "no 'mean' returned"}
    dist = {}
    for kind in _KERNELS:
        regular = [(c, r) for c, r in pairs if not c.first]
        dist[kind] = max(_rel_to_step(r.out["mean"], _reference(kind, c.x, c.v, c.sigma, c.sigma_next, c.a).mean, c.x)
                         for c, r in regular)
    kernel = next((k for k in _KERNELS if dist[k] <= RTOL), None)
    res = {"kernel": kernel, "distance": dist}
    details = ["Largest error of your mean relative to the step size `||mean - mean_K|| / ||mean_K - x||` "
               "over the steps with sigma < 1:", "", "| kernel K | max relative error |", "|---|---|"]
    details += [f"| {k} | {dist[k]:.3g} |" for k in _KERNELS]
    # the SDE score term: mean = Euler + k * (SDE mean - Euler)
    ks, resids = [], []
    for c, r in pairs if kernel is None else []:
        if c.first:
            continue
        euler = ode_step(c.x, c.v, c.sigma, c.sigma_next)
        k, resid = _proportional(r.out["mean"] - euler, _sde(c.x, c.v, c.sigma, c.sigma_next, c.a).mean - euler)
        ks.append(k)
        resids.append(resid)
    if ks and max(resids) <= RTOL and max(ks) - min(ks) <= RTOL * max(1.0, abs(ks[0])):
        res["score_term_factor"] = ks[0]
        details += ["", f"Your mean is the Euler step plus `k = {ks[0]:.6g}` times the SDE's score correction "
                    "`dt * std_t^2 / (2 sigma) * (x + (1 - sigma) v)` (k = 1: SDE, k = 0: Euler"
                    + (", k = -1: the sign of the score term is flipped)." if abs(ks[0] + 1) <= RTOL else ").")]
    # sigma = 1
    firsts = [(c, r) for c, r in zip(cases, runs) if c.first]
    if kernel is None:
        res["sigma_one"] = "unknown"
    elif kernel == "SDE":
        if any(r.error for _, r in firsts):
            res["sigma_one"] = "raises"
        elif any(not r.finite for _, r in firsts):
            res["sigma_one"] = "non-finite"
        else:
            err1 = max(_rel_to_step(r.out["mean"], _sde(c.x, c.v, 1.0, c.sigma_next, c.a).mean, c.x) for c, r in firsts)
            res["sigma_one"] = "flowgrpo" if err1 <= RTOL else "other"
            res["sigma_one_error_vs_flowgrpo"] = err1
    else:
        ok = all(r.out is not None and _rel_to_step(r.out["mean"], _reference(kernel, c.x, c.v, 1.0, c.sigma_next, c.a).mean,
                                                      c.x) <= RTOL for c, r in firsts)
        res["sigma_one"] = "regular" if ok else "other"
    text = {
        "raises": "sigma = 1: raises (the exact SDE coefficient is infinite there), as opd_ref does",
        "non-finite": "sigma = 1: returns inf/nan without an error",
        "flowgrpo": "sigma = 1: Flow-GRPO's rule (the next sigma in the denominator of std_t), a convention",
        "other": "sigma = 1: neither an error nor Flow-GRPO's rule",
        "regular": "sigma = 1: exact (this kernel is finite there)",
        "unknown": "",
    }[res["sigma_one"]]
    if kernel is None:
        near = min(dist, key=dist.get)
        res["status"] = "differs"
        res["finding"] = f"none of SDE, CPS, ODE (nearest: {near}, relative error {dist[near]:.3g})"
        if "score_term_factor" in res:
            k = res["score_term_factor"]
            res["finding"] += (f"; it is the Euler step plus {k:.6g} x the SDE score correction"
                               + (" (the sign of the score term is flipped)" if abs(k + 1) <= RTOL else ""))
    else:
        res["status"] = "differs" if res["sigma_one"] in ("non-finite", "other") else "conforms"
        res["finding"] = f"the {kernel} kernel (relative error {dist[kernel]:.2g}); {text}"
    if res["sigma_one"] == "flowgrpo":
        details += ["", "At sigma = 1 the exact SDE kernel is undefined (std_t is infinite). Your first step uses "
                    "Flow-GRPO's convention, `sde_step(..., sigma_one=\"flowgrpo\")` in opd_ref: its std is exactly "
                    "`a` and it inflates the marginal variance after the first step (see the Differences page, §4)."]
    res["details"] = details
    return res


def _scalar_std(t: Tensor) -> Optional[float]:
    """The common value of a std tensor, or None if it varies across samples or dims."""
    flat = t.flatten()
    ref = float(flat[0])
    if not bool(torch.isfinite(flat).all()):
        return None
    if float((flat - ref).abs().max()) > RTOL * max(abs(ref), 1e-300):
        return None
    return ref


def _check_std(cases: list, runs: list, kernel: Optional[str]) -> dict:
    pairs = [(c, r) for c, r in zip(cases, runs) if r.out is not None and "std" in r.out and not c.first]
    if not pairs:
        return {"status": "not returned", "kind": None, "finding": "no 'std' returned"}
    values = [_scalar_std(r.out["std"]) for _, r in pairs]
    if any(v is None for v in values):
        return {"status": "differs", "kind": "not isotropic",
                "finding": "varies across samples or event dims (the exact std is one number per step)",
                "details": []}
    res: dict = {}
    order = [kernel] if kernel else []
    order += [k for k in _KERNELS if k not in order]
    for kind in order:
        exact = [float(_reference(kind, c.x, c.v, c.sigma, c.sigma_next, c.a).std.flatten()[0]) for c, _ in pairs]
        if all(abs(u - e) <= RTOL * max(e, 1e-300) for u, e in zip(values, exact)):
            res.update(kind="step", kernel=kind)
            break
        if kind == "SDE" and all(e > 0 and abs(u * math.sqrt(c.dt) - e) <= RTOL * e for (c, _), u, e in zip(pairs, values, exact)):
            res.update(kind="sde_coefficient", kernel=kind)
            break
    if not res:
        ref = kernel if kernel in ("SDE", "CPS") else "SDE"
        used = [(c, u, float(_reference(ref, c.x, c.v, c.sigma, c.sigma_next, c.a).std.flatten()[0]))
                for (c, _), u in zip(pairs, values)]
        used = [t for t in used if t[2] > 0]
        law = _fit_law([u / e for _, u, e in used], _law_regs([c for c, _, _ in used], {"s": [e for *_, e in used]}))
        res.update(kind="other", kernel=None, ratio_law=law)
        return {**res, "status": "differs",
                "finding": f"neither the step std nor std_t: std / s_{ref} = {_law_text(law)}", "details": []}
    if res["kind"] == "step":
        finding = ("zero (deterministic step)" if res["kernel"] == "ODE" else f"the step std s of the {res['kernel']} kernel")
    else:
        finding = "the SDE coefficient std_t = a sqrt(sigma / (1 - sigma)), not the step std s = std_t sqrt(abs(dt))"
    consistent = kernel is None or res["kernel"] == kernel
    ok = res["kind"] == "step" and consistent
    if not consistent:
        finding += f", while the mean is the {kernel} kernel's"
    details = []
    if res["kind"] == "sde_coefficient":
        details = ["Your 'std' is larger than the step std by `1/sqrt(abs(dt))` (the measured ratio std / s is "
                   "`abs(dt)^-0.5` on every step). Sampling `mean + std * eps` with it, or a log-density built from it, "
                   "uses the wrong variance: code that passes std_t around must multiply it by `sqrt(abs(dt))` wherever it "
                   "samples or evaluates the density."]
    return {**res, "status": "conforms" if ok else "differs", "finding": finding, "details": details}


def _logprob_refs(kernel: Optional[str], has_mean: bool, std_kernel: Optional[str]) -> list:
    """Candidate (mean, std kernel) pairs of the log-prob's Gaussian, in the order they are tried: the
    detected kernel; the user's own mean with an exact std (the std's kernel first); each exact kernel."""
    order = [(kernel, kernel)] if kernel in ("SDE", "CPS") else []
    if kernel is None and has_mean:
        order += [("yours", k) for k in sorted(("SDE", "CPS"), key=lambda k: k != std_kernel)]
    return order + [(k, k) for k in ("SDE", "CPS") if (k, k) not in order]


def _ref_step(ref: str, case: _Case, run: Optional[_Run], near: str, v: Optional[Tensor] = None) -> GaussianStep:
    """The Gaussian the log-prob is compared with: an exact kernel, or the user's mean (``ref`` =
    "yours") with the std of the exact kernel ``near``."""
    v = case.v if v is None else v
    if ref == "yours":
        base = _reference(near, case.x, v, case.sigma, case.sigma_next, case.a)
        return GaussianStep(run.out["mean"], base.std)
    return _reference(ref, case.x, v, case.sigma, case.sigma_next, case.a)


def _quadratic(x_next: Tensor, step: GaussianStep) -> tuple:
    """``Q = -||x' - mean||^2 / (2 s^2)`` per sample and the exact normaliser ``-D log s - D/2 log 2 pi``."""
    s = float(step.std.flatten()[0])
    D = x_next[0].numel()
    q = -((x_next - step.mean) ** 2).reshape(x_next.shape[0], -1).sum(1) / (2.0 * s * s)
    return q, -D * math.log(s) - D * _LOG_SQRT_2PI


def _lp_cases(cases: list, runs: list, ref: str, near: str) -> list:
    """Cases on which the reference density exists (sigma < 1 for SDE; std > 0)."""
    out = []
    for c, r in zip(cases, runs):
        if r.out is None or "log_prob" not in r.out or c.first or not r.finite:
            continue
        if ref == "CPS" or (ref == "yours" and near == "CPS"):
            if c.last:
                continue
        out.append((c, r))
    return out


def _check_log_prob(cases, runs, kernel, mean_res, std_kernel, fn, check_grad, grid_args) -> dict:
    if not any(r.out is not None and "log_prob" in r.out for r in runs):
        return {"status": "not returned", "reduction": None, "factor": None, "finding": "no 'log_prob' returned"}
    if kernel == "ODE":
        return {"status": "differs", "reduction": "other", "factor": None,
                "finding": "a log-prob for the Euler (ODE) mean, which has no density", "details": []}
    best = None
    for ref, near in _logprob_refs(kernel, mean_res.get("status") != "not returned", std_kernel):
        fits = []
        for c, r in _lp_cases(cases, runs, ref, near):
            step = _ref_step(ref, c, r, near)
            q, norm = _quadratic(c.w, step)
            alpha, beta, resid = _affine_fit(r.out["log_prob"], q)
            fits.append((c, r, alpha, beta, resid, norm, float(step.std.flatten()[0])))
        if not fits:
            continue
        worst = max(f[4] for f in fits)
        if best is None or worst < best[1]:
            best = (ref, near, worst, fits)
        if worst <= RTOL:
            break
    if best is None:
        return {"status": "not checked", "reduction": None, "factor": None,
                "finding": "no finite log_prob on a step where the exact kernel has a density"}
    ref, near, worst, fits = best
    res: dict = {"reference": ref}
    ref_text = {"SDE": "the SDE kernel", "CPS": "the CPS kernel", "yours": f"your mean with the {near} step std"}[ref]
    if worst > RTOL:
        res.update(status="differs", reduction="other", factor=None, max_fit_residual=worst,
                   finding=f"not `alpha * (-norm(x' - mean)^2 / (2 s^2)) + beta` for any candidate mean "
                           f"(closest: {ref_text}, residual {worst:.2g})", details=[])
        return res
    alphas = np.array([f[2] for f in fits])
    betas = np.array([f[3] for f in fits])
    norms = np.array([f[5] for f in fits])
    Ds = np.array([f[0].D for f in fits], dtype=np.float64)
    scale = np.abs(norms) + Ds
    law = _fit_law(alphas, _law_regs([f[0] for f in fits], {"s": [f[6] for f in fits]}))
    if np.all(np.abs(alphas - 1) <= RTOL):
        reduction = "sum"
    elif np.all(np.abs(alphas * Ds - 1) <= RTOL):
        reduction = "mean"
    else:
        reduction = "other"
    if np.all(np.abs(betas - alphas * norms) <= RTOL * scale):
        normaliser = "exact" if reduction == "sum" else "scaled like the quadratic term"
    elif np.all(np.abs(betas) <= RTOL * scale):
        normaliser = "missing"
    else:
        normaliser = "other"
    res.update(reduction=reduction, factor=law.get("formula") if law.get("exact") else None,
               factor_law=law, normaliser=normaliser)
    status = "conforms" if reduction == "sum" and normaliser == "exact" else "differs"
    what = {"sum": "the log-density summed over dims", "mean": "the mean over dims of the log-density (1/D x the log-density)",
            "other": f"`{law.get('formula')}` x the quadratic term" if law.get("exact") else "a rescaled log-density"}[reduction]
    finding = what
    if normaliser == "missing":
        finding += "; the normalising terms `-D log s - D/2 log 2 pi` are missing"
    elif normaliser == "other":
        finding += "; its constant term is not the scaled normaliser"
    if ref == "yours":
        finding += f" (of a Gaussian around your own mean, with the {near} step std)"
    details = [f"Fitted on every step with a density (sigma < 1, s > 0), against {ref_text}: your log_prob = "
               f"`alpha * Q + beta` with `Q = -||x' - mean||^2 / (2 s^2)`; alpha = {_law_text(law)} "
               f"(in D, abs(dt) and the step std s); beta: {normaliser}."]
    law_exps = law.get("exponents", {}) if law.get("exact") else {}
    if law_exps.get("s") == 2.0:
        details.append("The factor grows like `s^2`: the quadratic term is not divided by the variance `2 s^2` "
                       "(CPS-style public code), so steps with different s are weighted differently.")
    if law_exps.get("dt") == 1.0:
        details.append("The factor contains `abs(dt)`: the quadratic term is divided by `2 std_t^2` instead of "
                       "`2 s^2 = 2 std_t^2 abs(dt)`.")
    res["status"] = status
    res["finding"] = finding
    res["details"] = details
    res["gradient"] = _check_lp_gradient(fn, cases, runs, fits, ref, near, law, check_grad)
    res["ppo_clip"] = _ppo_clip(fn, ref, near, grid_args)
    return res


def _check_lp_gradient(fn, cases, runs, fits, ref, near, law, check_grad) -> dict:
    if not check_grad:
        return {"status": "not checked", "finding": "skipped (--no-grad)"}
    grad_ref = near if ref == "yours" else ref
    gammas, resids, alphas = [], [], []
    for c, r, alpha, *_ in fits:
        out, err, v = _call(fn, "step", c, torch.float64, grad=True)
        if err is not None:
            return {"status": "not checked", "finding": f"calling step with v.requires_grad=True raised {err}"}
        lp = out["log_prob"]
        if not lp.requires_grad:
            return {"status": "differs", "factor": None, "finding": "no gradient flows from log_prob to v (detached)"}
        (g_user,) = torch.autograd.grad(lp.sum(), v, allow_unused=True)
        if g_user is None:
            return {"status": "differs", "factor": None, "finding": "log_prob does not depend on v"}
        v_ref = c.v.clone().requires_grad_(True)
        step = _reference(grad_ref, c.x, v_ref, c.sigma, c.sigma_next, c.a)
        (g_exact,) = torch.autograd.grad(_exact_log_prob(c.w, step).sum(), v_ref)
        gamma, resid = _proportional(g_user.double(), g_exact)
        gammas.append(gamma)
        resids.append(resid)
        alphas.append(alpha)
    if max(resids) > RTOL:
        return {"status": "differs", "factor": None, "max_residual": max(resids),
                "finding": f"not parallel to the exact gradient of the {grad_ref} log-density (residual {max(resids):.2g})"
                           + (" (it follows your own mean)" if ref == "yours" else "")}
    same = all(abs(g / a - 1) <= RTOL for g, a in zip(gammas, alphas))
    if all(abs(g - 1) <= RTOL for g in gammas):
        return {"status": "conforms", "factor": "1", "finding": "equals the exact gradient w.r.t. v"}
    factor = law.get("formula") if same and law.get("exact") else None
    finding = (f"`{factor}` x the exact gradient w.r.t. v (the value's factor)" if factor
               else f"{min(gammas):.4g} .. {max(gammas):.4g} x the exact gradient w.r.t. v"
               + ("" if same else ", not the value's factor"))
    return {"status": "differs", "factor": factor, "range": [min(gammas), max(gammas)], "finding": finding}


def _exact_log_prob(x_next: Tensor, step: GaussianStep) -> Tensor:
    s = step.std
    z = (x_next - step.mean) / s
    return (-0.5 * z**2 - torch.log(s.expand_as(z)) - _LOG_SQRT_2PI).reshape(x_next.shape[0], -1).sum(1)


def _grid_cases(mode: str, grid_args: dict, batch: int) -> list:
    """Inputs at the SD3.5 latent size on each step of the grid (one call per step)."""
    grid = sd3_sigma_grid(grid_args["n_steps"], 3.0)
    side = grid_args["resolution"] // 8
    shape = (16, side, side)
    gen = torch.Generator().manual_seed(3)
    a = grid_args["noise_level"]
    out = []
    for k in range(grid_args["n_steps"]):
        s, sn = float(grid[k]), float(grid[k + 1])
        x = torch.randn((batch,) + shape, generator=gen, dtype=torch.float64)
        v = torch.randn((batch,) + shape, generator=gen, dtype=torch.float64)
        noise = torch.randn((batch,) + shape, generator=gen, dtype=torch.float64)
        if mode == "step":
            ker = _sde(x, v, s, sn, a)
            w = ker.mean + ker.std * noise
        else:
            w = v + 0.3 * noise
        out.append(_Case(shape, s, sn, a, x, v, w))
    return out


def _ppo_clip(fn, ref, near, grid_args) -> dict:
    r"""The measured log-prob factor on each SD3.5 step and the clip interval it implies for the true ratio."""
    eps = grid_args["clip_range"]
    rows, alphas = [], []
    kernel = near if ref == "yours" else ref
    for case in _grid_cases("step", grid_args, batch=4):
        out, err, _ = _call(fn, "step", case, torch.float64)
        note = "raises" if err else ("no exact density" if kernel == "CPS" and case.last else None)
        if note is None:
            run = _Run({k: t.detach().double() for k, t in out.items()})
            # sigma = 1: only Flow-GRPO's rule gives the SDE a density; use it if the log-prob fits it
            alpha, resid = 0.0, float("inf")
            if run.finite:
                alpha, _, resid = _affine_fit(run.out["log_prob"], _quadratic(case.w, _ref_step(ref, case, run, near))[0])
            if resid > RTOL or not alpha > 0:
                note = "no exact density" if case.first else "not a scaled Gaussian log-density here"
        if note:
            rows.append({"sigma": case.sigma, "sigma_next": case.sigma_next, "alpha": None, "note": note})
            continue
        lo, hi = math.log1p(-eps) / alpha, math.log1p(eps) / alpha
        rows.append({"sigma": case.sigma, "sigma_next": case.sigma_next, "alpha": alpha, "log_ratio_interval": [lo, hi]})
        alphas.append(alpha)
    D = 16 * (grid_args["resolution"] // 8) ** 2
    res = {"clip_range": eps, "D": D, "steps": rows}
    lines = [f"PPO clips `exp(log_prob - log_prob_old)` to `[1 - eps, 1 + eps]`. The std does not depend on the policy, "
             f"so the normaliser cancels and your log-ratio is `alpha` times the true log-ratio `log r`; the clip is "
             f"`log(1 - eps) / alpha <= log r <= log(1 + eps) / alpha`. On the SD3.5 grid ({grid_args['n_steps']} steps, "
             f"shift 3, {grid_args['resolution']} px: D = {D}, noise level {grid_args['noise_level']:g}) with "
             f"eps = {eps:g}:", "",
             "| step | sigma -> sigma_next | alpha | clip on log r | clip on r |", "|---|---|---|---|---|"]
    for k, row in enumerate(rows):
        if row["alpha"] is None:
            lines.append(f"| {k} | {row['sigma']:.4f} -> {row['sigma_next']:.4f} | - | {row['note']} | |")
            continue
        lo, hi = row["log_ratio_interval"]
        lines.append(f"| {k} | {row['sigma']:.4f} -> {row['sigma_next']:.4f} | {row['alpha']:.6g} | "
                     f"[{lo:.4g}, {hi:.4g}] | [{_exp_text(lo)}, {_exp_text(hi)}] |")
    if alphas and all(abs(a * D - 1) <= 1e-6 for a in alphas):
        lines += ["", f"With a mean over dims, a clip range eps on the per-dim mean log-ratio is a clip range of "
                  f"D x eps = {D * eps:.4g} on the summed (true) log-ratio: the true ratio may move by a factor "
                  f"up to {_exp_text(D * math.log1p(eps))} before the clip acts."]
    elif alphas and all(abs(a - 1) <= 1e-6 for a in alphas):
        lines += ["", "Your log-prob is the true log-density: the clip range means what it says."]
    res["details"] = lines
    return res


def _exp_text(v: float) -> str:
    return f"{math.exp(v):.6g}" if v < 700 else f"e^{v:.6g}"


def _check_boundaries(cases: list, runs: list, kernel: Optional[str]) -> dict:
    """Steps where the function raised or returned inf/nan (float64), and whether the exact kernel is
    undefined there."""
    rows, bad = [], []
    for c, r in zip(cases, runs):
        if r.error is None and r.finite:
            continue
        what = f"raises {r.error}" if r.error else "returns inf/nan"
        if c.first:
            allowed = kernel in ("SDE", None)
            where = "sigma = 1"
        elif c.last:
            allowed = kernel in ("CPS", "ODE", None)
            where = "sigma_next = 0"
        else:
            allowed, where = False, "an interior step"
        rows.append(f"{where} ({c.label()}): {what}")
        if not allowed:
            bad.append(rows[-1])
    if not rows:
        return {"status": "conforms", "finding": "finite on every step, including sigma = 1 and sigma_next = 0", "details": []}
    uniq = list(dict.fromkeys(r.split(" (")[0] + ": " + r.split("): ", 1)[1] for r in rows))
    details = ["Steps where it raises or returns inf/nan: " + "; ".join(uniq[:4]) + ("; ..." if len(uniq) > 4 else "")]
    if bad:
        return {"status": "differs", "finding": f"fails where the {kernel} kernel is defined: {bad[0]}", "details": details}
    why = {"SDE": "the SDE coefficient is infinite at sigma = 1", "CPS": "the CPS std is 0 at sigma_next = 0 (no density)",
           "ODE": "the Euler step has no density", None: "kernel unknown"}[kernel]
    return {"status": "conforms", "finding": f"raises or is non-finite only where the exact kernel is undefined ({why})",
            "details": details}


def _check_float32(cases: list, runs64: list, runs32: list, mode: str) -> dict:
    worst, where = 0.0, None
    for c, r64, r32 in zip(cases, runs64, runs32):
        if r64.out is None or not r64.finite or c.first:
            continue
        if r32.out is None or not r32.finite:
            return {"status": "differs", "finding": f"fails in float32 where float64 works ({c.label()}): "
                    f"{r32.error or 'inf/nan'}", "max_rel_deviation": float("inf")}
        for key, t64 in r64.out.items():
            t32 = r32.out[key]
            if key == "mean":
                dev = _rel_to_step(t32, t64, c.x)
            else:
                scale = float(t64.abs().max())
                dev = float((t32 - t64).abs().max()) / scale if scale > 0 else float((t32 - t64).abs().max())
            if dev > worst:
                worst, where = dev, f"{key}, {c.label()}"
    ok = worst <= RTOL_FLOAT32
    finding = f"agrees with float64 to {worst:.2g} (tolerance {RTOL_FLOAT32:g})"
    if not ok:
        finding = f"float32 deviates from float64 by {worst:.3g} > {RTOL_FLOAT32:g} ({where})"
    return {"status": "conforms" if ok else "differs", "max_rel_deviation": worst, "finding": finding}


def _settings(grid_args: dict) -> dict:
    return {
        "event_shapes": [list(s) for s in EVENT_SHAPES],
        "sigma_pairs": [list(p) for p in _sigma_pairs()],
        "noise_levels": list(NOISE_LEVELS),
        "batch": BATCH,
        "dtypes": ["float64", "float32"],
        "rtol": RTOL,
        "rtol_float32": RTOL_FLOAT32,
        **grid_args,
    }


def _finish(report: dict, names: list) -> dict:
    report["checks"] = names
    report["conforms"] = not any(report[n]["status"] == "differs" for n in names if n in report)
    report["exit_code"] = 0 if report["conforms"] else 1
    return report


def _grid_args(noise_level, n_steps, resolution, **extra) -> dict:
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not 0 < noise_level <= 1:
        raise ValueError(f"noise_level must lie in (0, 1], got {noise_level!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2, got {n_steps!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    return {"noise_level": float(noise_level), "n_steps": n_steps, "resolution": resolution, **extra}


def _check_call_args(fn: object, target: object, check_grad: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be a callable adapter (see load_adapter), got {type(fn).__name__} {fn!r:.60}")
    if target is not None and not isinstance(target, str):
        raise TypeError(f"target must be a str or None (the name shown in the report), got {type(target).__name__}")
    if not isinstance(check_grad, bool):
        raise TypeError(f"check_grad must be a bool, got {type(check_grad).__name__} {check_grad!r}")


def check_step(
    fn: Callable,
    *,
    target: Optional[str] = None,
    noise_level: float = DEFAULTS["noise_level"],
    n_steps: int = DEFAULTS["n_steps"],
    resolution: int = DEFAULTS["resolution"],
    clip_range: float = DEFAULTS["clip_range"],
    check_grad: bool = True,
) -> dict:
    r"""Check a ``step`` adapter against the exact kernels (SDE, CPS, ODE) and the Gaussian log-density.

    The mean is compared with each exact kernel mean; the std with the step std :math:`s` and with
    :math:`\sigma_t^{\mathrm{SDE}} = s/\sqrt{|\Delta t|}`; the log-prob is fitted, per step, as
    :math:`\alpha\,Q + \beta` with

    .. math::
        Q = -\frac{\|x' - \mu\|^2}{2 s^2},\qquad
        \log\pi(x'|x) = Q - D\log s - \tfrac D2\log 2\pi \quad(\alpha = 1 \text{ exactly}),

    and :math:`\alpha` is fitted as a power law :math:`C\,D^{p}|\Delta t|^{q} s^{r}` (``1/D``: mean
    over dims; ``2 s^2/D``: CPS-style log-prob without its variance).  Its gradient in ``v`` is
    compared with the exact one, and the measured :math:`\alpha` on the SD3.5 grid gives the PPO clip
    interval on the true log-ratio, :math:`\log(1\pm\epsilon)/\alpha`.

    Args:
        fn: ``step(x, v, sigma, sigma_next, noise_level, x_next) -> dict`` (see the module docstring).
        target: name shown in the report (e.g. ``"file.py:step"``).
        noise_level: ``a`` of the SD3.5-grid evaluation (``(0, 1]``).
        n_steps: steps of the SD3.5 grid (shift 3).
        resolution: image size in pixels; the latent has ``D = 16 (resolution / 8)^2`` dims.
        clip_range: PPO clip range ``eps`` to interpret.
        check_grad: also call ``fn`` with ``v.requires_grad_(True)`` and check the gradient.

    Returns:
        Report dict: ``"mean"`` (``kernel``, ``sigma_one``), ``"std"`` (``kind``), ``"log_prob"``
        (``reduction``, ``factor``, ``gradient``, ``ppo_clip``), ``"boundaries"``, ``"float32"``, each
        with ``status`` and ``finding``; ``conforms`` and ``exit_code`` (0 or 1).

    Raises:
        AdapterError: the adapter raises on an interior float64 step or returns the wrong type/shape.

    Reference: ``flowgrpo`` (SDE kernel, log-prob), ``diffusionopd`` (CPS kernel).
    """
    _check_call_args(fn, target, check_grad)
    grid_args = _grid_args(noise_level, n_steps, resolution, clip_range=_positive("clip_range", clip_range))
    cases = _cases("step")
    runs64 = _run_all(fn, "step", cases, torch.float64)
    runs32 = _run_all(fn, "step", cases, torch.float32)
    report = {"mode": "step", "target": target, "settings": _settings(grid_args)}
    report["mean"] = _check_mean(cases, runs64)
    kernel = report["mean"].get("kernel")
    report["std"] = _check_std(cases, runs64, kernel)
    if kernel is None and report["std"].get("kernel"):
        kernel_for_rest = report["std"]["kernel"]
    else:
        kernel_for_rest = kernel
    report["log_prob"] = _check_log_prob(cases, runs64, kernel, report["mean"], report["std"].get("kernel"), fn,
                                         check_grad, grid_args)
    if kernel_for_rest is None and report["log_prob"].get("reference") in ("SDE", "CPS"):
        kernel_for_rest = report["log_prob"]["reference"]
    report["boundaries"] = _check_boundaries(cases, runs64, kernel_for_rest)
    report["float32"] = _check_float32(cases, runs64, runs32, "step")
    names = ["mean", "std", "log_prob"]
    if "gradient" in report["log_prob"]:
        report["log_prob_gradient"] = report["log_prob"]["gradient"]
        names.append("log_prob_gradient")
    return _finish(report, names + ["boundaries", "float32"])


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# KL checks


def _exact_kl(kind: str, case: _Case, v_student: Optional[Tensor] = None, sigma: Optional[float] = None) -> Tensor:
    v_s = case.v if v_student is None else v_student
    s = case.sigma if sigma is None else sigma
    p = _reference(kind, case.x, v_s, s, case.sigma_next, case.a)
    q = _reference(kind, case.x, case.w, s, case.sigma_next, case.a)
    return same_cov_kl(p.mean, q.mean, p.std)


def _kl_coefficient(case: _Case, exact: Tensor) -> float:
    """``c`` in ``KL_exact = c ||v_s - v_t||^2`` (one number per step)."""
    return float((exact / ((case.v - case.w) ** 2).reshape(BATCH, -1).sum(1)).mean())


def _kl_domain(kind: str, case: _Case) -> bool:
    """Where the exact KL of ``kind`` exists: SDE sigma < 1; CPS sigma_next > 0."""
    return not case.first if kind == "SDE" else not case.last


def _kl_factors(kind: str, cases: list, runs: list) -> tuple:
    used, factors, spreads, coefs = [], [], [], []
    for c, r in zip(cases, runs):
        if r.out is None or not _kl_domain(kind, c):
            continue
        exact = _exact_kl(kind, c)
        ratio = r.out["kl"] / exact
        f = float(ratio.mean())
        used.append(c)
        factors.append(f)
        spreads.append(float((ratio - f).abs().max()) / abs(f) if f != 0 and math.isfinite(f) else float("inf"))
        coefs.append(_kl_coefficient(c, exact))
    return used, factors, spreads, coefs


def check_kl(
    fn: Callable,
    *,
    target: Optional[str] = None,
    noise_level: float = DEFAULTS["noise_level"],
    n_steps: int = DEFAULTS["n_steps"],
    resolution: int = DEFAULTS["resolution"],
    beta: float = DEFAULTS["beta"],
    check_grad: bool = True,
) -> dict:
    r"""Check a per-step ``kl`` adapter against the exact KL between the student's and the teacher's
    kernels at the same state (D1, D2), for the SDE and the CPS kernel.

    .. math::
        \mathrm{KL}_{\mathrm{exact}} = \frac{\|\mu(x, v_s) - \mu(x, v_t)\|^2}{2 s^2} = c\,\|v_s - v_t\|^2,
        \qquad \frac{\mathrm{KL}_{\mathrm{yours}}}{\mathrm{KL}_{\mathrm{exact}}} = C\,D^{p}\,|\Delta t|^{q}\,c^{r}

    The factor is measured per sample, checked to be one number per step, and fitted as the power law
    above (``|dt|/D``: Flow-GRPO's KL without ``|dt|``, averaged over dims; ``1/(D c)``: a velocity MSE).
    On the SD3.5 grid the measured factor :math:`f_k` of each step turns a KL weight beta into the
    equivalent weight :math:`\beta f_k` on the exact per-step KL.

    Args:
        fn: ``kl(x, v_student, v_teacher, sigma, sigma_next, noise_level) -> (B,)``.
        target: name shown in the report.
        noise_level: ``a`` of the SD3.5-grid evaluation.
        n_steps: steps of the SD3.5 grid (shift 3).
        resolution: image size in pixels (``D = 16 (resolution / 8)^2``).
        beta: the KL weight to translate.
        check_grad: also check the gradient with respect to ``v_student``.

    Returns:
        Report dict with ``"kl"`` (``kernel``, ``factor_vs_exact``, ``factor_law``, ``sigma_one``,
        ``equivalent_beta``), ``"kl_gradient"``, ``"boundaries"``, ``"float32"``, ``conforms`` and
        ``exit_code``.

    Raises:
        AdapterError: the adapter raises on an interior float64 step or returns the wrong type/shape.

    Reference: ``diffusionopd`` (closed-form per-step KL), ``flowgrpo`` (KL to the reference).
    """
    _check_call_args(fn, target, check_grad)
    grid_args = _grid_args(noise_level, n_steps, resolution, beta=_positive("beta", beta))
    cases = _cases("kl")
    runs64 = _run_all(fn, "kl", cases, torch.float64)
    runs32 = _run_all(fn, "kl", cases, torch.float32)
    report = {"mode": "kl", "target": target, "settings": _settings(grid_args)}
    per_kind = {k: _kl_factors(k, cases, runs64) for k in ("SDE", "CPS")}
    kl: dict = {}
    for kind in ("SDE", "CPS"):
        used, factors, spreads, _ = per_kind[kind]
        if all(abs(f - 1) <= RTOL for f in factors) and max(spreads) <= RTOL:
            kl.update(kernel=kind, factor_vs_exact="1", factor_law={"exact": True, "formula": "1"})
            break
    if not kl:
        laws = {}
        for kind in ("SDE", "CPS"):
            used, factors, spreads, coefs = per_kind[kind]
            laws[kind] = (_fit_law(factors, _law_regs(used, {"c": coefs})), max(spreads))
        kind = next((k for k in ("SDE", "CPS") if laws[k][0]["exact"] and laws[k][1] <= RTOL), None)
        if kind is None:
            kind = min(("SDE", "CPS"), key=lambda k: (laws[k][1], laws[k][0].get("max_rel_error", float("inf"))))
        law, spread = laws[kind]
        kl.update(kernel=kind, factor_law=law, max_spread_in_batch=spread,
                  factor_vs_exact=law["formula"] if law.get("exact") and spread <= RTOL else None)
    kind = kl["kernel"]
    kl["sigma_one"] = _kl_sigma_one(cases, runs64, kl) if kind == "SDE" else "regular"
    conform = kl["factor_vs_exact"] == "1" and kl["sigma_one"] in ("raises", "flowgrpo", "regular")
    kl["status"] = "conforms" if conform else "differs"
    used, factors, spreads, _ = per_kind[kind]
    if kl["factor_vs_exact"] == "1":
        finding = f"the exact per-step KL of the {kind} kernels"
    elif kl.get("max_spread_in_batch", 0) > RTOL:
        finding = (f"not a fixed multiple of the exact {kind} KL within a step (the ratio varies by "
                   f"{kl['max_spread_in_batch']:.2g} across samples): not a function of norm(mean_s - mean_t) alone")
    else:
        finding = f"factor vs the exact {kind} KL: {_law_text(kl['factor_law'])}"
    sig1 = {"raises": "sigma = 1: raises, as opd_ref", "non-finite": "sigma = 1: returns inf/nan",
            "flowgrpo": "sigma = 1: Flow-GRPO's rule", "other": "sigma = 1: neither an error nor Flow-GRPO's rule",
            "unknown": "sigma = 1: not classified (no exact law)", "regular": "",
            "kernel-free": "sigma = 1: finite (the value does not involve the kernel)"}[kl["sigma_one"]]
    kl["finding"] = finding + (f"; {sig1}" if sig1 else "")
    details = [f"Measured `KL_yours / KL_exact` per sample against the {kind} kernels' exact KL "
               "`||mean_s - mean_t||^2 / (2 s^2) = c ||v_s - v_t||^2` and fitted as `C D^p abs(dt)^q c^r`: "
               f"{_law_text(kl['factor_law'])}."]
    exps = kl["factor_law"].get("exponents", {}) if kl["factor_law"].get("exact") else {}
    if exps.get("dt") == 1.0:
        details.append("The factor contains `abs(dt)`: the KL divides by `2 std_t^2` instead of the step variance "
                       "`2 s^2 = 2 std_t^2 abs(dt)`, so the steps are weighted by `abs(dt)` relative to the path KL.")
    if exps.get("c") == -1.0:
        details.append("The factor contains `1/c`: your value is proportional to `||v_s - v_t||^2` with a weight that "
                       "does not depend on the step (a velocity MSE), not to the kernels' KL.")
    if exps.get("D") == -1.0:
        details.append("The factor contains `1/D`: the KL is averaged over dims instead of summed.")
    kl["details"] = details
    kl["equivalent_beta"] = _equivalent_beta(fn, kl, grid_args)
    report["kl"] = kl
    names = ["kl"]
    report["kl_gradient"] = _check_kl_gradient(fn, cases, runs64, kind, check_grad, kl["factor_vs_exact"])
    names.append("kl_gradient")
    report["boundaries"] = _check_boundaries(cases, runs64, kind)
    report["float32"] = _check_float32(cases, runs64, runs32, "kl")
    return _finish(report, names + ["boundaries", "float32"])


def _kl_sigma_one(cases: list, runs: list, kl: dict) -> str:
    firsts = [(c, r) for c, r in zip(cases, runs) if c.first]
    if any(r.error for _, r in firsts):
        return "raises"
    if any(not r.finite for _, r in firsts):
        return "non-finite"
    law = kl["factor_law"]
    if not law.get("exact"):
        return "unknown"
    if law["exponents"].get("c") == -1.0:  # value = C D^p abs(dt)^q norm(v_s - v_t)^2: no kernel in it
        return "kernel-free"
    for c, r in firsts:
        exact = _exact_kl("SDE", c, sigma=1.0)  # Flow-GRPO's rule: the only finite SDE kernel at sigma = 1
        pred = _eval_law(law, c.D, c.dt, _kl_coefficient(c, exact), "c")
        if not bool(((r.out["kl"] / exact - pred).abs() <= RTOL * abs(pred)).all()):
            return "other"
    return "flowgrpo"


def _check_kl_gradient(fn, cases, runs, kind, check_grad, value_factor: Optional[str]) -> dict:
    if not check_grad:
        return {"status": "not checked", "finding": "skipped (--no-grad)"}
    gammas, resids, values = [], [], []
    for c, r in zip(cases, runs):
        if r.out is None or not _kl_domain(kind, c):
            continue
        out, err, v = _call(fn, "kl", c, torch.float64, grad=True)
        if err is not None:
            return {"status": "not checked", "finding": f"calling kl with v_student.requires_grad=True raised {err}"}
        if not out["kl"].requires_grad:
            return {"status": "differs", "factor": None, "finding": "no gradient flows from the KL to v_student (detached)"}
        (g_user,) = torch.autograd.grad(out["kl"].sum(), v, allow_unused=True)
        if g_user is None:
            return {"status": "differs", "factor": None, "finding": "the KL does not depend on v_student"}
        v_ref = c.v.clone().requires_grad_(True)
        exact = _exact_kl(kind, c, v_student=v_ref)
        (g_exact,) = torch.autograd.grad(exact.sum(), v_ref)
        # per-sample factors: the gradient of sample i is gamma_i times the exact one
        for i in range(BATCH):
            gamma, resid = _proportional(g_user[i].double(), g_exact[i])
            gammas.append(gamma)
            resids.append(resid)
            values.append(float(r.out["kl"][i] / exact[i].detach()))
    if max(resids) > RTOL:
        return {"status": "differs", "factor": None, "max_residual": max(resids),
                "finding": f"not parallel to the exact gradient (residual {max(resids):.2g})"}
    if all(abs(g - 1) <= RTOL for g in gammas):
        return {"status": "conforms", "factor": "1", "finding": "equals the exact gradient w.r.t. v_student"}
    same = all(abs(g / f - 1) <= RTOL for g, f in zip(gammas, values))
    factor = value_factor if same else None
    finding = (f"`{factor}` x the exact gradient w.r.t. v_student (the value's factor)" if factor else
               f"{min(gammas):.4g} .. {max(gammas):.4g} x the exact gradient w.r.t. v_student"
               + (" (the value's factor)" if same else ", not the value's factor"))
    return {"status": "differs", "factor": factor, "range": [min(gammas), max(gammas)], "finding": finding}


def _equivalent_beta(fn, kl: dict, grid_args: dict) -> dict:
    beta = grid_args["beta"]
    kind = kl["kernel"]
    rows, factors = [], []
    for case in _grid_cases("kl", grid_args, batch=2):
        out, err, _ = _call(fn, "kl", case, torch.float64)
        defined = _kl_domain(kind, case) or (kind == "SDE" and kl["sigma_one"] == "flowgrpo")
        if err is not None or not defined:
            rows.append({"sigma": case.sigma, "sigma_next": case.sigma_next, "factor": None,
                         "note": "raises" if err else "exact KL undefined"})
            continue
        f = float((out["kl"].detach().double() / _exact_kl(kind, case)).mean())
        rows.append({"sigma": case.sigma, "sigma_next": case.sigma_next, "factor": f, "beta_exact": beta * f})
        factors.append(f)
    D = 16 * (grid_args["resolution"] // 8) ** 2
    res = {"beta": beta, "D": D, "steps": rows}
    if factors:
        res["max_over_min"] = max(factors) / min(factors) if min(factors) > 0 else float("inf")
        res["constant"] = res["max_over_min"] <= 1 + 1e-6
    lines = [f"Your loss `beta * KL_yours` at step k equals `beta_k * KL_exact` with `beta_k = beta * f_k`, "
             f"`f_k = KL_yours / KL_exact` measured on the SD3.5 grid ({grid_args['n_steps']} steps, shift 3, "
             f"{grid_args['resolution']} px: D = {D}, noise level {grid_args['noise_level']:g}), beta = {beta:g}:", "",
             "| step | sigma -> sigma_next | f_k | equivalent beta_k on the exact KL |", "|---|---|---|---|"]
    for k, row in enumerate(rows):
        if row["factor"] is None:
            lines.append(f"| {k} | {row['sigma']:.4f} -> {row['sigma_next']:.4f} | - | {row['note']} |")
        else:
            lines.append(f"| {k} | {row['sigma']:.4f} -> {row['sigma_next']:.4f} | {row['factor']:.6g} | {row['beta_exact']:.4g} |")
    if factors and res["constant"]:
        lines += ["", f"One equivalent weight: beta_exact = {beta * factors[0]:.4g} (to regularise like an exact "
                  f"KL with weight beta_exact, use beta = beta_exact / {factors[0]:.4g} in your code)."]
    elif factors:
        lines += ["", f"No single equivalent beta: your KL weights the steps differently from the path KL "
                  f"(the sum of the exact per-step KLs) by up to a factor {res['max_over_min']:.4g} between steps."]
    lines.append("If your loss averages the per-step KLs over the T trained steps instead of summing them, "
                 "divide the equivalent weights by T once more.")
    res["details"] = lines
    return res


# --------------------------------------------------------------------------------------------------
# the report


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


_TITLES = {
    "mean": "mean", "std": "std", "log_prob": "log_prob", "log_prob_gradient": "log_prob gradient",
    "kl": "KL", "kl_gradient": "KL gradient", "boundaries": "sigma = 1 and sigma_next = 0", "float32": "float32",
}


def render_markdown(report: dict) -> str:
    r"""The Markdown report of :func:`check_step` / :func:`check_kl`: a verdict, one table row per
    check and a section per check with the measured relation.

    .. math::
        \text{verdict} = \text{conforms} \iff \text{no check differs from } (\mu, s, \log\pi, \mathrm{KL})_{\mathrm{exact}}

    Args:
        report: the dict returned by :func:`check_step` or :func:`check_kl`.

    Returns:
        Markdown text.

    Reference: ``flowgrpo``, ``diffusionopd`` (the kernels checked).
    """
    if not isinstance(report, dict) or not {"checks", "mode", "conforms", "settings"} <= set(report):
        raise TypeError(
            "report must be the dict returned by check_step or check_kl (keys 'mode', 'checks', 'conforms', "
            f"'settings', ...), got {type(report).__name__}"
            + (f" with keys {sorted(map(str, report))[:8]}" if isinstance(report, dict) else "")
        )
    names = report["checks"]
    n_diff = sum(report[n]["status"] == "differs" for n in names)
    target = f" `{report['target']}`" if report.get("target") else ""
    verdict = ("**conforms** (exit status 0): every check agrees with the exact math" if report["conforms"]
               else f"**differs** (exit status 1): {n_diff} of {len(names)} checks differ from the exact math")
    st = report["settings"]
    pairs = ", ".join(f"({s:.4g}, {sn:.4g})" for s, sn in st["sigma_pairs"])
    lines = [f"# opd-check {report['mode']}{target}", "", f"Result: {verdict}.", "",
             "| check | finding | status |", "|---|---|---|"]
    lines += [f"| {_TITLES[n]} | {report[n]['finding']} | {report[n]['status']} |" for n in names]
    lines += ["", "## Inputs", "",
              f"Event shapes {', '.join(str(tuple(s)) for s in st['event_shapes'])} "
              f"(D = {', '.join(str(math.prod(s)) for s in st['event_shapes'])}); (sigma, sigma_next) pairs {pairs} "
              "(steps 0, 1, 4, 7, 8, 9 of the 10-step SD3.5 grid with shift 3, and one large step); "
              f"noise levels {', '.join(f'{a:g}' for a in st['noise_levels'])}; batch {st['batch']}; float64 and float32 "
              "(the same values); abs(dt) = sigma - sigma_next. A relation is matched when it holds to a relative "
              f"{st['rtol']:g} on every float64 case; float32 must agree with float64 to {st['rtol_float32']:g}."]
    for n in names:
        section = report[n]
        extra = section.get("details", [])
        sub = []
        for key in ("ppo_clip", "equivalent_beta"):
            if key in section:
                sub += ["", "### " + ("PPO clip range on the SD3.5 grid" if key == "ppo_clip"
                                      else "Equivalent KL weight beta on the SD3.5 grid"), ""] + section[key]["details"]
        if not extra and not sub:
            continue
        lines += ["", f"## {_TITLES[n]}", "", f"{section['finding'][0].upper()}{section['finding'][1:]} ({section['status']})."]
        for line in extra + sub:  # paragraphs apart, table rows together
            if not (line.startswith("|") and lines[-1].startswith("|")) and line and lines[-1]:
                lines.append("")
            lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opd-check",
        description="Check a transition kernel / log-prob (step) or a per-step KL (kl) implementation against "
                    "the exact math of opd_ref. Exit 0: conforms, 1: differs, 2: usage error.",
    )
    sub = p.add_subparsers(dest="mode", required=True)
    for mode, sig in (("step", "step(x, v, sigma, sigma_next, noise_level, x_next) -> dict"),
                      ("kl", "kl(x, v_student, v_teacher, sigma, sigma_next, noise_level) -> Tensor (B,)")):
        s = sub.add_parser(mode, help=sig, description=f"Check {sig}.")
        s.add_argument("adapter", metavar="FILE.py:FUNC", help="the adapter function")
        s.add_argument("--out", metavar="PATH", help="write the Markdown report here instead of stdout")
        s.add_argument("--json", metavar="PATH", help="also write the report as JSON")
        s.add_argument("--noise-level", type=float, default=DEFAULTS["noise_level"],
                       help="noise level a on the SD3.5 grid (default %(default)s, Flow-GRPO's)")
        s.add_argument("--steps", type=int, default=DEFAULTS["n_steps"], help="SD3.5 grid steps (default %(default)s)")
        s.add_argument("--resolution", type=int, default=DEFAULTS["resolution"],
                       help="image size in px, D = 16 (res/8)^2 (default %(default)s)")
        s.add_argument("--no-grad", action="store_true", help="skip the gradient check (adapters without autograd)")
        if mode == "step":
            s.add_argument("--clip-range", type=float, default=DEFAULTS["clip_range"],
                           help="PPO clip range to interpret (default %(default)s, Flow-GRPO's)")
        else:
            s.add_argument("--beta", type=float, default=DEFAULTS["beta"],
                           help="KL weight to translate (default %(default)s, Flow-GRPO's SD3.5 setting)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    r"""``opd-check step|kl FILE.py:FUNC [--out PATH] [--json PATH] ...``: run :func:`check_step` or
    :func:`check_kl` on a user's adapter and print the Markdown report.

    .. math::
        \text{exit status} = \begin{cases} 0 & \text{conforms}\\ 1 & \text{differs}\\
        2 & \text{usage error (bad path, missing function, wrong return type or shape)}\end{cases}

    Args:
        argv: command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status (argparse's own usage errors exit 2 via ``SystemExit``).

    Reference: ``flowgrpo``, ``diffusionopd``.
    """
    if argv is not None and (isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence)
                             or not all(isinstance(arg, str) for arg in argv)):
        raise TypeError(f"argv must be None or a sequence of str (the command line without the program name), got {argv!r:.80}")
    args = _parser().parse_args(argv)
    try:
        _grid_args(args.noise_level, args.steps, args.resolution)
        _positive("--clip-range" if args.mode == "step" else "--beta",
                  args.clip_range if args.mode == "step" else args.beta)
    except ValueError as err:
        print(f"opd-check: error: {err}", file=sys.stderr)
        return 2
    try:
        fn = load_adapter(args.adapter, 6)
        common = dict(target=args.adapter, noise_level=args.noise_level, n_steps=args.steps,
                      resolution=args.resolution, check_grad=not args.no_grad)
        if args.mode == "step":
            report = check_step(fn, clip_range=args.clip_range, **common)
        else:
            report = check_kl(fn, beta=args.beta, **common)
    except AdapterError as err:
        print(f"opd-check: error: {err}", file=sys.stderr)
        return 2
    text = render_markdown(report)
    try:
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        if args.json:
            Path(args.json).write_text(json.dumps(_json_safe(report), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        print(f"opd-check: error: cannot write the report: {err}", file=sys.stderr)
        return 2
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
