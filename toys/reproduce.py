"""``opd-toys reproduce``: run every registered toy experiment and write one run directory.

Run directory layout::

    OUT/config.json      command-line configuration, versions, experiment list
    OUT/metrics.jsonl    one JSON object per logged point, each tagged with its "experiment"
    OUT/figures/*.png    every experiment's figures
    OUT/report.md        derivation checks (measured value, threshold, pass/fail), result tables;
                         written only when every experiment has run
    OUT/INCOMPLETE       present while the run is going and left behind when it is interrupted

A non-empty ``OUT`` is refused unless ``overwrite=True`` (then the previous run's files are removed
first, so an interrupted rerun never sits beside an old report).

Experiment interface (agreed contract): ``toys.experiments.<name>.run(out_dir, quick, seeds) -> dict``
with keys ``checks``, ``figures``, ``tables``, ``metrics``.  An experiment whose module is not
importable yet is recorded as "not available" instead of failing the run.

Optional keys, shown by :func:`write_report` (a new experiment adds them to its returned dict):

* ``reading``: a short paragraph in words of what the experiment shows, written from the run's own
  measured numbers (an f-string over its results, never a fixed verdict).  Plain Markdown: no
  ``$...$`` math (common viewers do not render it), no ``|`` outside tables.
* ``links``: ``[(label, target), ...]`` with ``target`` relative to the repository's ``docs/`` folder,
  e.g. ``("claims row 5", "claims.md#claim-5")`` (claims rows carry ``claim-N`` anchors) and
  ``("D6", "derivations/d6-estimator-variance.md")``; written as links relative to ``OUT``.
* ``seeds``: the seeds the experiment actually used when it uses fewer than the run's (quick mode caps
  some experiments, others use the first seed only); shown in the experiments table.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import platform
import shutil
import time
import traceback
from typing import Dict, Iterable, List, Optional, Sequence

import torch

__all__ = ["REGISTRY", "OUTPUTS", "MARKER", "run_experiment", "reproduce", "write_report"]

#: marker file present while a run is incomplete (removed after report.md is written)
MARKER = "INCOMPLETE"
#: what a run writes into OUT (removed by ``overwrite=True``)
OUTPUTS = ("config.json", "metrics.jsonl", "figures", "report.md", MARKER)

#: the repository's documentation folder (targets of the experiments' ``links``)
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

#: experiment name -> module path (imported lazily)
REGISTRY: Dict[str, str] = {
    "variance": "toys.experiments.variance",
    "d4_limit": "toys.experiments.d4_limit",
    "training": "toys.experiments.training",
    "multitask": "toys.experiments.multitask",
    "crd_centering": "toys.experiments.crd_centering",
    "divergence_family": "toys.experiments.divergence_family",
    "dimo": "toys.experiments.dimo",
    "learned_ratio": "toys.experiments.learned_ratio",
    "reward_bregman": "toys.experiments.reward_bregman",
    "objective_ablation": "toys.experiments.objective_ablation",
    "reward_dmd": "toys.experiments.reward_dmd",
    "crd_mechanisms": "toys.experiments.crd_mechanisms",
    "interference": "toys.experiments.interference",
}


def check_names(names: Iterable[str]) -> List[str]:
    """Validate experiment names against :data:`REGISTRY` (``ValueError`` naming the bad one)."""
    names = list(names)
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"unknown experiment {n!r}; choose from {', '.join(REGISTRY)}")
    return names


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_experiment(name: str, fig_dir: pathlib.Path, quick: bool, seeds: Sequence[int]) -> dict:
    """Import and run one experiment; returns its result dict plus ``status`` and ``seconds``.

    ``status`` is ``"ok"``, ``"not available"`` (module missing) or ``"error"`` (with traceback)."""
    check_names([name])
    module_path = REGISTRY[name]
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):
            return {"status": "not available", "reason": f"module {module_path} not found", "checks": [],
                    "figures": [], "tables": {}, "metrics": [], "seconds": 0.0}
        raise
    t0 = time.perf_counter()
    try:
        res = module.run(fig_dir, quick=quick, seeds=tuple(seeds))
        res = dict(res)
        res["status"] = "ok"
    except Exception:  # noqa: BLE001 - recorded in the report, the run goes on
        res = {"status": "error", "reason": traceback.format_exc(limit=6), "checks": [], "figures": [],
               "tables": {}, "metrics": []}
    res["seconds"] = time.perf_counter() - t0
    for key in ("checks", "figures", "tables", "metrics"):
        res.setdefault(key, [] if key != "tables" else {})
    return res


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e4):
            return f"{v:.4g}"
        return f"{v:.3e}" if math.isfinite(v) else str(v)
    return str(v)


def _doc_link(out: pathlib.Path, target: str) -> str:
    """``target`` (relative to :data:`DOCS`, optional ``#anchor``) as a path relative to ``out``."""
    path, _, anchor = target.partition("#")
    rel = pathlib.Path(os.path.relpath(DOCS / path, out.resolve())).as_posix()
    return rel + (f"#{anchor}" if anchor else "")


def write_report(out: pathlib.Path, config: dict, results: Dict[str, dict]) -> str:
    """Write ``report.md`` and return its text: experiments (with the seeds each used), derivation
    checks, then per experiment its reading, links and tables (optional keys: module docstring)."""
    out = pathlib.Path(out)
    n_checks = sum(len(r["checks"]) for r in results.values())
    n_pass = sum(bool(c["passed"]) for r in results.values() for c in r["checks"])
    seeds = list(config["seeds"])
    fewer = [n for n, r in results.items() if r.get("seeds") is not None and list(r["seeds"]) != seeds]
    note = (f" {', '.join(fewer)} used fewer seeds (column 'seeds': quick mode caps them to stay cheap, or the "
            "experiment uses the first seed only)." if fewer else "")
    lines = ["# opd-toys reproduce report", "",
             f"Mode: {'full' if config['full'] else 'quick'}; seeds {seeds}; "
             f"total {config.get('seconds', 0):.1f} s. Derivation checks passed: **{n_pass}/{n_checks}**.{note}",
             "", "## Experiments", "", "| experiment | status | seeds | seconds | figures |", "|---|---|---|---|---|"]
    for name, r in results.items():
        figs = ", ".join(f"[{f}](figures/{f})" for f in r["figures"]) or "-"
        used = list(r["seeds"]) if r.get("seeds") is not None else seeds
        lines.append(f"| {name} | {r['status']} | {', '.join(map(str, used))} | {r.get('seconds', 0):.1f} | {figs} |")
    lines += ["", "## Derivation checks", "", "| experiment | check | measured | threshold | result |",
              "|---|---|---|---|---|"]
    for name, r in results.items():
        for c in r["checks"]:
            cname = str(c["name"]).replace("|", "\\|")
            thr = str(c["threshold"]).replace("|", "\\|")
            lines.append(f"| {name} | {cname} | {_fmt(float(c['value']))} | {thr} | "
                         f"{'PASS' if c['passed'] else 'FAIL'} |")
    lines += ["", "## Results", ""]
    for name, r in results.items():
        if r["status"] != "ok":
            lines += [f"### {name}", "", f"**{r['status']}**", "", "```", r.get("reason", "").strip(), "```", ""]
            continue
        lines += [f"### {name}", ""]
        if r.get("reading"):
            lines += [str(r["reading"]).strip(), ""]
        if r.get("links"):
            lines += ["See " + ", ".join(f"[{label}]({_doc_link(out, target)})" for label, target in r["links"]) + ".", ""]
        for title, table in r["tables"].items():
            lines += [f"#### {title}", "", table, ""]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _prepare_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, but {str(out)!r} is an existing file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"out {str(out)!r} is not empty (a previous run?): pass --overwrite to replace it, "
                             "or choose a new directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if foreign:
            raise ValueError(f"out {str(out)!r} holds files that no reproduce run wrote ({foreign[:5]}): "
                             "not overwriting it; choose a new directory")
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def reproduce(out: pathlib.Path, *, full: bool = False, seeds: Optional[Sequence[int]] = None,
              only: Optional[Sequence[str]] = None, progress: bool = True, overwrite: bool = False) -> Dict[str, dict]:
    """Run the registered experiments (or ``only`` those) and write the run directory ``out``.

    Args:
        out: run directory (created).
        full: paper-quality mode (larger samples, >= 5 seeds by default) instead of quick mode.
        seeds: seeds to run (default ``(0, 1, 2)`` quick, ``(0, 1, 2, 3, 4)`` full).
        only: subset of experiment names.
        overwrite: replace a previous run in ``out`` (otherwise a non-empty ``out`` is refused).

    Returns:
        ``{name: result dict}``.

    Raises:
        ValueError: unknown experiment, no seeds, ``out`` a file, or ``out`` not empty without ``overwrite``.
    """
    import matplotlib  # noqa: F401 - the toys extra, checked before OUT is touched (the CLI names the extra)
    from tqdm.auto import tqdm

    names = check_names(only) if only else list(REGISTRY)
    if seeds is None:
        seeds = (0, 1, 2, 3, 4) if full else (0, 1, 2)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    out = pathlib.Path(out)
    _prepare_out(out, overwrite)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    marker.write_text("this run has not completed (interrupted, or still running): report.md is written only "
                      "at the end; rerun with --overwrite\n")
    config = {"command": "reproduce", "full": bool(full), "seeds": seeds, "experiments": names,
              "torch": torch.__version__, "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    t0 = time.perf_counter()
    results: Dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two contended ones
    try:
        with open(out / "metrics.jsonl", "w") as fh:
            bar = tqdm(names, desc="opd-toys reproduce", unit="exp", disable=None if progress else True)  # None: off when not a terminal (nested bars write ESC[A into logs)
            for name in bar:
                bar.set_postfix_str(name)
                marker.write_text(f"this run has not completed: it stopped in experiment {name!r} (interrupted, "
                                  "or still running); report.md is written only at the end; rerun with --overwrite\n")
                res = run_experiment(name, fig_dir, quick=not full, seeds=seeds)
                results[name] = res
                for m in res["metrics"]:
                    fh.write(json.dumps({"experiment": name, **m}, default=_json_default) + "\n")
    finally:
        torch.set_num_threads(threads)
    config["seconds"] = time.perf_counter() - t0
    config["status"] = {n: r["status"] for n, r in results.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_report(out, config, results)
    marker.unlink()
    return results
