"""``opd-check`` (opd_ref.conformance): it classifies independently written implementations correctly.

The adapters under ``tests/opd_ref/check_adapters/`` were written for these tests (none is copied from
a project): opd_ref's exact kernels, a CPS kernel with ``torch.distributions`` as its density, a
Flow-GRPO-style step and KL, a CPS log-prob without its variance, a velocity-MSE "KL", an SDE mean with
the score term's sign flipped, a detached log-prob, a step that rounds through bfloat16 in float32, and
adapters that break the contract.  Expected numbers (PPO clip intervals, equivalent KL weights) are
computed here again from the diffusers scheduler's grid and formulas written anew.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opd_ref import conformance
from opd_ref.conformance import AdapterError, check_kl, check_step, load_adapter, render_markdown, sd3_sigma_grid

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = Path(__file__).resolve().parent / "check_adapters"
D_SD35 = 16 * 64 * 64  # SD3.5 latent at 512 px
A = 0.7  # the CLI's default noise level on the grid


@functools.lru_cache(maxsize=None)
def _report(mode: str, spec: str) -> dict:
    fn = load_adapter(str(ADAPTERS / spec), 6)
    return (check_step if mode == "step" else check_kl)(fn, target=spec)


def _diffusers_grid(n: int = 10) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    return sched.sigmas.double().numpy()


def test_sd3_sigma_grid_matches_the_diffusers_scheduler():
    for n in (10, 28, 40):
        ours = sd3_sigma_grid(n, 3.0).numpy()
        ref = _diffusers_grid(n)
        assert ours.shape == ref.shape == (n + 1,)
        # the scheduler stores float32: agreement to float32 rounding
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-7)
        assert ours[0] == 1.0 and ours[-1] == 0.0
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        sd3_sigma_grid(0)


def test_opd_ref_exact_kernels_conform():
    step = _report("step", "exact.py:step")
    assert step["conforms"] and step["exit_code"] == 0
    assert step["mean"]["kernel"] == "SDE" and step["mean"]["sigma_one"] == "raises"
    assert step["std"]["kind"] == "step"
    assert step["log_prob"]["reduction"] == "sum" and step["log_prob"]["factor"] == "1"
    assert step["log_prob"]["normaliser"] == "exact"
    assert step["log_prob_gradient"]["status"] == "conforms"
    # true log-density: alpha = 1 on every SD3.5 step with sigma < 1; the first step raises like sde_step
    rows = step["log_prob"]["ppo_clip"]["steps"]
    assert rows[0]["alpha"] is None and rows[0]["note"] == "raises"
    assert all(abs(r["alpha"] - 1) < 1e-9 for r in rows[1:])
    kl = _report("kl", "exact.py:kl")
    assert kl["conforms"] and kl["kl"]["factor_vs_exact"] == "1" and kl["kl"]["kernel"] == "SDE"
    assert kl["kl"]["sigma_one"] == "raises" and kl["kl_gradient"]["status"] == "conforms"
    assert kl["kl"]["equivalent_beta"]["constant"]


def test_independent_cps_and_euler_kernels_conform():
    cps = _report("step", "exact.py:cps_step")
    assert cps["conforms"] and cps["mean"]["kernel"] == "CPS" and cps["mean"]["sigma_one"] == "regular"
    assert cps["std"]["kind"] == "step" and cps["std"]["kernel"] == "CPS"
    assert cps["log_prob"]["reduction"] == "sum" and cps["log_prob"]["normaliser"] == "exact"
    # torch.distributions raises at sigma_next = 0 (std 0): allowed, the CPS kernel has no density there
    assert cps["boundaries"]["status"] == "conforms" and "sigma_next = 0" in cps["boundaries"]["details"][0]
    cps_kl = _report("kl", "exact.py:cps_kl")
    assert cps_kl["conforms"] and cps_kl["kl"]["kernel"] == "CPS" and cps_kl["kl"]["factor_vs_exact"] == "1"
    ode = _report("step", "exact.py:ode_step")
    assert ode["conforms"] and ode["mean"]["kernel"] == "ODE"
    assert ode["std"]["status"] == ode["log_prob"]["status"] == "not returned"


def test_flowgrpo_style_step_is_classified():
    rep = _report("step", "flowgrpo.py:step")
    assert rep["exit_code"] == 1 and not rep["conforms"]
    assert rep["mean"]["kernel"] == "SDE" and rep["mean"]["sigma_one"] == "flowgrpo"
    assert rep["mean"]["status"] == "conforms"
    assert rep["std"]["kind"] == "sde_coefficient" and rep["std"]["status"] == "differs"
    lp = rep["log_prob"]
    assert (lp["reduction"], lp["factor"], lp["normaliser"]) == ("mean", "1/D", "scaled like the quadratic term")
    assert rep["log_prob_gradient"]["factor"] == "1/D"
    assert rep["float32"]["status"] == "conforms" and rep["boundaries"]["status"] == "conforms"
    # PPO: alpha = 1/D on every SD3.5 step (also the first, under Flow-GRPO's sigma = 1 rule), so the clip
    # acts on the true log-ratio at D log(1 -+ eps)
    eps = rep["settings"]["clip_range"]
    for row in lp["ppo_clip"]["steps"]:
        assert row["alpha"] * D_SD35 == pytest.approx(1.0, rel=1e-9)
        lo, hi = row["log_ratio_interval"]
        assert lo == pytest.approx(D_SD35 * math.log(1 - eps), rel=1e-9)
        assert hi == pytest.approx(D_SD35 * math.log(1 + eps), rel=1e-9)
    assert round(D_SD35 * math.log(1 + eps), 3) == 6.553


def test_flowgrpo_style_kl_is_classified_and_translated_to_beta():
    rep = _report("kl", "flowgrpo.py:kl")
    kl = rep["kl"]
    assert rep["exit_code"] == 1
    assert kl["kernel"] == "SDE" and kl["factor_vs_exact"] == "abs(dt)/D" and kl["sigma_one"] == "flowgrpo"
    assert rep["kl_gradient"]["factor"] == "abs(dt)/D"
    # equivalent beta_k = beta |dt_k| / D on the scheduler's own grid
    grid = _diffusers_grid(10)
    dt = grid[:-1] - grid[1:]
    eq = kl["equivalent_beta"]
    got = np.array([row["factor"] for row in eq["steps"]])
    np.testing.assert_allclose(got, dt / D_SD35, rtol=1e-5)  # the scheduler stores a float32 grid
    np.testing.assert_allclose([row["beta_exact"] for row in eq["steps"]], 0.04 * dt / D_SD35, rtol=1e-5)
    assert not eq["constant"] and eq["max_over_min"] == pytest.approx(dt.max() / dt.min(), rel=1e-5)
    assert round(eq["max_over_min"], 1) == 30.1  # the number quoted in docs/differences.md


def test_cps_log_prob_without_its_variance_is_classified():
    rep = _report("step", "variants.py:cps_no_variance")
    lp = rep["log_prob"]
    assert rep["mean"]["kernel"] == "CPS" and rep["mean"]["status"] == "conforms"
    assert (lp["reduction"], lp["factor"], lp["normaliser"]) == ("other", "2 s^2/D", "missing")
    assert rep["log_prob_gradient"]["factor"] == "2 s^2/D"
    # on the grid alpha = 2 s_k^2 / D with the CPS std s_k = sigma'_k sin(a pi / 2); no density at sigma' = 0
    grid = _diffusers_grid(10)
    rows = lp["ppo_clip"]["steps"]
    assert rows[-1]["alpha"] is None
    s = grid[1:-1] * math.sin(A * math.pi / 2)
    np.testing.assert_allclose([r["alpha"] for r in rows[:-1]], 2 * s**2 / D_SD35, rtol=1e-5)


def test_velocity_mse_kl_is_classified():
    rep = _report("kl", "variants.py:velocity_mse")
    kl = rep["kl"]
    assert kl["factor_vs_exact"] == "1/(D c)" and kl["sigma_one"] == "kernel-free" and kl["kernel"] == "SDE"
    # f_k = 1 / (D c_k), c_k the SDE KL coefficient written anew
    grid = _diffusers_grid(10)
    sig, sig_next = grid[1:-1], grid[2:]
    c = (1 + A**2 / 2) ** 2 * (sig - sig_next) * (1 - sig) / (2 * A**2 * sig)
    rows = kl["equivalent_beta"]["steps"]
    assert rows[0]["factor"] is None  # sigma = 1: no exact SDE KL to compare with
    np.testing.assert_allclose([r["factor"] for r in rows[1:]], 1 / (D_SD35 * c), rtol=2e-5)


def test_flipped_score_term_is_found():
    rep = _report("step", "variants.py:flipped_score")
    assert rep["mean"]["kernel"] is None and rep["mean"]["status"] == "differs"
    assert rep["mean"]["score_term_factor"] == pytest.approx(-1.0, abs=1e-9)
    assert "sign of the score term is flipped" in rep["mean"]["finding"]
    assert min(rep["mean"]["distance"].values()) > 0.5
    # its log-prob is a true log-density, of its own (wrong) kernel
    assert rep["log_prob"]["reference"] == "yours" and rep["log_prob"]["reduction"] == "sum"
    assert rep["log_prob_gradient"]["status"] == "differs"


def test_detached_log_prob_and_float32_precision_are_found():
    det = _report("step", "variants.py:detached_log_prob")
    assert det["log_prob"]["status"] == "conforms"
    assert det["log_prob_gradient"]["status"] == "differs" and "detached" in det["log_prob_gradient"]["finding"]
    bf16 = _report("step", "variants.py:bf16_in_float32")
    assert bf16["mean"]["kernel"] == "SDE" and bf16["float32"]["status"] == "differs"
    assert bf16["float32"]["max_rel_deviation"] > conformance.RTOL_FLOAT32
    # it returns inf at sigma = 1 instead of raising
    assert bf16["mean"]["sigma_one"] == "non-finite" and bf16["mean"]["status"] == "differs"


def test_refusing_a_step_where_the_kernel_is_defined_is_a_defect():
    rep = _report("step", "variants.py:raises_on_last_step")
    assert rep["mean"]["kernel"] == "SDE" and rep["mean"]["sigma_one"] == "non-finite"
    assert rep["boundaries"]["status"] == "differs"
    assert "sigma_next = 0" in rep["boundaries"]["finding"] and "sigma_next must be > 0" in rep["boundaries"]["finding"]


def test_fit_law_recovers_power_laws_and_rejects_others():
    rng = np.random.default_rng(0)
    D, dt, s = rng.choice([1, 16, 256], 20), rng.uniform(0.01, 0.3, 20), rng.uniform(0.05, 1.0, 20)
    law = conformance._fit_law(2 * s**2 / D, {"D": D, "dt": dt, "s": s})
    assert law["exact"] and law["formula"] == "2 s^2/D"
    assert conformance._fit_law(dt / D, {"D": D, "dt": dt, "s": s})["formula"] == "abs(dt)/D"
    assert not conformance._fit_law(1 / (1 + D), {"D": D, "dt": dt, "s": s})["exact"]


BAD = [
    ("step", "missing.py:step", "adapter file not found"),
    ("step", "bad.py", "FILE.py:FUNC"),
    ("step", "bad.py:nope", "has no function 'nope'"),
    ("step", "bad.py:NOT_A_FUNCTION", "is a int, not a function"),
    ("step", "broken_import.py:step", "RuntimeError: this file cannot be imported"),
    ("step", "bad.py:returns_list", "step must return a dict"),
    ("step", "bad.py:unknown_key", "unknown key(s) ['logprob']"),
    ("step", "bad.py:wrong_mean_shape", "'mean' must have the shape of x"),
    ("step", "bad.py:log_prob_not_per_sample", "'log_prob' must have shape (B,) = (6,), got (6, 1)"),
    ("step", "bad.py:raises", "raised NotImplementedError: this adapter is a stub"),
    ("step", "bad.py:too_few_arguments", "must accept 6 positional arguments"),
    ("kl", "bad.py:kl_keepdim", "kl must return a (B,) = (6,) tensor"),
    ("kl", "bad.py:kl_integer", "floating-point tensor"),
]


@pytest.mark.parametrize("mode,spec,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_adapters_exit_2_with_a_clear_message(mode, spec, needle, capsys):
    assert conformance.main([mode, str(ADAPTERS / spec)]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err, captured.err
    assert captured.err.startswith("opd-check: error: ") and "Traceback" not in captured.err
    assert captured.out == ""


def test_bad_options_exit_2(capsys):
    spec = str(ADAPTERS / "exact.py:step")
    assert conformance.main(["step", spec, "--noise-level", "2"]) == 2
    assert "noise_level must lie in (0, 1], got 2.0" in capsys.readouterr().err
    assert conformance.main(["kl", spec, "--beta", "-1"]) == 2
    assert "--beta must be a positive finite float" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        conformance.main(["nonsense", spec])
    assert exc.value.code == 2
    with pytest.raises(AdapterError, match="must accept 6"):
        load_adapter(str(ADAPTERS / "bad.py:too_few_arguments"), 6)


def test_report_tables_are_well_formed():
    for mode, spec in (("step", "flowgrpo.py:step"), ("kl", "flowgrpo.py:kl"), ("step", "variants.py:flipped_score")):
        text = render_markdown(_report(mode, spec))
        table = text.split("| check | finding | status |")[1].split("\n\n")[0].strip().splitlines()
        assert len(table) == len(_report(mode, spec)["checks"]) + 1
        assert all(line.count("|") == 4 for line in table), table


def _summary(text: str) -> list:
    """The summary table's rows with every number masked (they may differ in the last digits)."""
    table = text.split("| check | finding | status |")[1].split("\n\n")[0].strip().splitlines()[1:]
    return [re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", row) for row in table]


def test_docs_page_shows_the_report_the_tool_produces():
    page = (ROOT / "docs" / "check.md").read_text(encoding="utf-8")
    shown = page.split("<!-- adapter -->\n```python\n")[1].split("```\n<!-- /adapter -->")[0]
    assert shown == (ADAPTERS / "flowgrpo.py").read_text(encoding="utf-8")
    for mode, spec in (("step", "flowgrpo.py:step"), ("kl", "flowgrpo.py:kl")):
        block = page.split(f"<!-- report:{mode} -->")[1].split(f"<!-- /report:{mode} -->")[0]
        assert _summary(block) == _summary(render_markdown(_report(mode, spec))), mode


def _opd_check_command() -> list:
    script = Path(sys.executable).with_name("opd-check")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "opd_ref.conformance"]


def test_command_line_end_to_end(tmp_path):
    """``python -m opd_ref.conformance`` and the ``opd-check`` console script, as a user runs them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, js = tmp_path / "report.md", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "opd_ref.conformance", "step", "tests/opd_ref/check_adapters/flowgrpo.py:step",
         "--out", str(out), "--json", str(js)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "" and "| std | the SDE coefficient std_t" in out.read_text()
    data = json.loads(js.read_text())
    assert data["mean"]["kernel"] == "SDE" and data["mean"]["sigma_one"] == "flowgrpo"
    assert data["log_prob"]["reduction"] == "mean" and data["log_prob"]["factor"] == "1/D"
    proc = subprocess.run(
        _opd_check_command() + ["kl", "tests/opd_ref/check_adapters/exact.py:kl"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Result: **conforms** (exit status 0)" in proc.stdout
