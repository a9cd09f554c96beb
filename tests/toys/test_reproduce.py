"""A reduced ``opd-toys reproduce`` end to end: run directory, report, measured = analytic variances."""

import ast
import json
import pathlib
import re

import pytest
import torch

from toys import reproduce as rp
from toys.experiments import d4_limit, multitask, training, variance

TINY = [
    (variance.QUICK, dict(n_mc=400, a_values=[0.2, 0.7], n_roll=32, n_states=2, n_mc_sig=32)),
    (d4_limit.QUICK, dict(n_a=3, batch=8)),
    (training.QUICK, dict(n_updates=4, eval_every=2, max_seeds=1)),
    (multitask.QUICK, dict(n_updates=2, n_evals=1, n_eval=64, max_seeds=1, batch_size=16)),
]


@pytest.fixture
def tiny(monkeypatch):
    for cfg, small in TINY:
        for k, v in small.items():
            monkeypatch.setitem(cfg, k, v)


def test_reduced_reproduce_end_to_end(tiny, tmp_path):
    names = ["variance", "d4_limit", "training", "multitask"]
    threads = torch.get_num_threads()
    results = rp.reproduce(tmp_path, seeds=[0], only=names, progress=False)
    assert torch.get_num_threads() == threads  # restored
    assert all(results[n]["status"] == "ok" for n in names), {n: results[n].get("reason") for n in names}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["experiments"] == names and config["seeds"] == [0] and not config["full"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["experiment"] for line in lines} == set(names)
    expected = ["variance_vs_a.png", "variance_vs_sigma.png", "snr_vs_a.png", "rollout_variance.png", "d4_limit.png",
                "training_curves.png", "multitask_summary.png", "cascade_forgetting.png", "density_panels.png"]
    for f in expected:
        assert (tmp_path / "figures" / f).stat().st_size > 10_000, f
    report = (tmp_path / "report.md").read_text()
    assert "## Derivation checks" in report and "| variance | D6: MC gradient variance = analytic (ppo, k1, vopd; max \\|z\\| over a)" in report
    checks = {c["name"]: c for c in results["variance"]["checks"]}
    # measured (Monte-Carlo) variances match the analytic ones: |z| <= 5 (seeded; ~5.7e-7 per comparison)
    d6 = checks["D6: MC gradient variance = analytic (ppo, k1, vopd; max |z| over a)"]
    assert d6["passed"] and d6["value"] <= 5.0
    assert checks["D6: pathwise conditional variance is zero (max MC var / |mean|^2)"]["value"] <= 1e-20
    for name in ("d4_limit",):
        assert all(c["passed"] for c in results[name]["checks"]), results[name]["checks"]
    for name in names:  # a reading, with links that resolve into docs/, and Markdown without $...$ math
        assert len(results[name].get("reading", "")) > 100, name
        assert results[name]["reading"] in report
        for label, target in results[name]["links"]:
            assert_doc_target_exists(target)
    assert "$" not in report
    assert "| training | ok | 0 |" in report  # the seeds each experiment used (here all: [0])
    rows = [m for m in results["variance"]["metrics"] if m["figure"] == "variance_vs_a" and m["estimator"] == "ppo"]
    for m in rows:  # direct numbers: relative gap within 5 standard errors of the MC estimate
        assert abs(m["var_mc"] - m["var_analytic"]) <= 5.0 * m["var_mc_se"]


def _slug(heading: str) -> str:
    """The anchor mkdocs' toc extension gives a heading (lower case, runs of other characters -> '-')."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def assert_doc_target_exists(target: str) -> None:
    """``target`` (relative to docs/, optional #anchor) names a docs file, and the anchor an ``id=`` or a heading."""
    path, _, anchor = target.partition("#")
    doc = rp.DOCS / path
    assert doc.is_file(), target
    if anchor:
        text = doc.read_text()
        headings = {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
        assert f'id="{anchor}"' in text or anchor in headings, target


def test_report_reading_links_and_seeds(tmp_path, monkeypatch):
    """The optional result keys: the reading under the experiment, its links relative to OUT (pointing at
    the repository's docs), the seeds it used in the experiments table and a note in the header."""
    monkeypatch.setitem(rp.REGISTRY, "fake_a", "x")

    def run_experiment(name, fig_dir, quick, seeds):
        return {"status": "ok", "checks": [], "figures": [], "tables": {"t": "| a |\n|---|\n| 1 |"}, "metrics": [],
                "seconds": 0.0, "reading": "It shows 0.5 nats.", "seeds": [0, 1],
                "links": [("claims row 5", "claims.md#claim-5"), ("D6", "derivations/d6-estimator-variance.md")]}

    monkeypatch.setattr(rp, "run_experiment", run_experiment)
    out = tmp_path / "deep" / "run"
    rp.reproduce(out, seeds=[0, 1, 2], only=["fake_a"], progress=False)
    report = (out / "report.md").read_text()
    assert "| fake_a | ok | 0, 1 |" in report and "fake_a used fewer seeds" in report
    section = report[report.index("### fake_a"):]
    assert section.index("It shows 0.5 nats.") < section.index("#### t")
    links = re.findall(r"\[(claims row 5|D6)\]\(([^)]+)\)", section)
    assert len(links) == 2
    expected = {"claims row 5": rp.DOCS / "claims.md", "D6": rp.DOCS / "derivations" / "d6-estimator-variance.md"}
    for label, href in links:  # relative to OUT, landing on the repository's docs files
        assert not href.startswith("/") and (out / href.partition("#")[0]).resolve() == expected[label].resolve()
    assert links[0][1].endswith("claims.md#claim-5")
    assert_doc_target_exists("claims.md#claim-5")


def _run_returns(name: str) -> tuple:
    """The ``run`` function of a registered experiment (parsed, not run) and the dict literals it returns."""
    path = pathlib.Path(rp.__file__).resolve().parents[1] / (rp.REGISTRY[name].replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    run = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    returns = [node.value for node in ast.walk(run) if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict)]
    return run, returns


def _has_formatted_value(node: ast.AST) -> bool:
    return any(isinstance(n, ast.FormattedValue) for n in ast.walk(node))


@pytest.mark.parametrize("name", sorted(rp.REGISTRY))
def test_every_experiment_returns_a_measured_reading_and_links_into_the_docs(name):
    """Every registered experiment's ``run`` returns ``reading`` (an f-string over its results, not a fixed
    text) and ``links`` (literal ``(label, target)`` pairs whose files and anchors exist in docs/); checked on
    the source so that no experiment has to run (the reduced runs check the rendered readings)."""
    run, returns = _run_returns(name)
    assert returns, f"{name}: run returns no dict literal"
    for ret in returns:
        keys = {k.value: v for k, v in zip(ret.keys, ret.values) if isinstance(k, ast.Constant)}
        assert {"reading", "links"} <= set(keys), f"{name}: returned keys {sorted(keys)}"
        reading = keys["reading"]
        if isinstance(reading, ast.Name):  # reading = (...) assigned in run
            assigned = [n.value for n in ast.walk(run) if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == reading.id for t in n.targets)]
            assert assigned, f"{name}: {reading.id} is never assigned in run"
            reading = assigned[-1]
        assert _has_formatted_value(reading), f"{name}: the reading is not written from measured values"
        links = ast.literal_eval(keys["links"])
        assert links and any(target.startswith("claims.md#claim-") for _, target in links), (name, links)
        for label, target in links:
            assert label and isinstance(label, str), (name, label)
            assert_doc_target_exists(target)


def test_missing_experiment_is_reported_not_available(tmp_path, monkeypatch):
    monkeypatch.setitem(rp.REGISTRY, "ghost", "toys.experiments.does_not_exist")
    results = rp.reproduce(tmp_path, seeds=[0], only=["ghost"], progress=False)
    assert results["ghost"]["status"] == "not available"
    assert "| ghost | not available |" in (tmp_path / "report.md").read_text()


def test_reproduce_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        rp.reproduce(tmp_path, only=["nope"])
    with pytest.raises(ValueError, match="seeds must not be empty"):
        rp.reproduce(tmp_path, seeds=[], only=["d4_limit"])


def _fake_experiments(monkeypatch, interrupt_at=None):
    """Two registered fake experiments (one check each); ``interrupt_at`` raises Ctrl-C in that one."""
    monkeypatch.setitem(rp.REGISTRY, "fake_a", "x")
    monkeypatch.setitem(rp.REGISTRY, "fake_b", "x")

    def run_experiment(name, fig_dir, quick, seeds):
        if name == interrupt_at:
            raise KeyboardInterrupt
        return {"status": "ok", "checks": [{"name": "c", "value": 1.0, "threshold": "1", "passed": True}],
                "figures": [], "tables": {}, "metrics": [{"x": 1}], "seconds": 0.0}

    monkeypatch.setattr(rp, "run_experiment", run_experiment)


def test_existing_out_is_refused_without_overwrite_and_an_interrupted_rerun_leaves_a_marker(tmp_path, monkeypatch,
                                                                                            capsys):
    from toys import cli

    out = tmp_path / "run"
    _fake_experiments(monkeypatch)
    argv = ["reproduce", "--out", str(out), "--only", "fake_a", "fake_b"]
    assert cli.main(argv) == 0 and "2/2" in (out / "report.md").read_text()
    assert not (out / rp.MARKER).exists()
    finished = (out / "report.md").read_text()
    with pytest.raises(SystemExit) as info:  # a finished run is not overwritten
        cli.main(argv)
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_text() == finished
    _fake_experiments(monkeypatch, interrupt_at="fake_b")
    assert cli.main(argv + ["--overwrite"]) == 130
    assert not (out / "report.md").exists()  # no old "2/2 passed" beside the partial metrics
    assert "'fake_b'" in (out / rp.MARKER).read_text()
    assert "incomplete" in capsys.readouterr().err
    (out / "mine.txt").write_text("not a run file")
    with pytest.raises(ValueError, match="no reproduce run wrote"):
        rp.reproduce(out, seeds=[0], only=["fake_a"], progress=False, overwrite=True)
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--ou", str(tmp_path / "other")])  # no abbreviated flags
