"""A missing optional dependency: both CLIs name the extra to install and exit 2 without a traceback.

The missing module is simulated in a fresh interpreter by ``sys.modules[name] = None`` (then ``import
name`` raises ``ModuleNotFoundError`` with ``.name == name``, as when the package is not installed)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from opd_ref._extras import EXTRA_MODULES, missing_extra

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_without(module: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = f"import sys\nsys.modules[{module!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


# transformers missing goes through diffusers' lazy-import RuntimeError (slower: diffusers half imports)
@pytest.mark.parametrize("module", ["diffusers", pytest.param("transformers", marks=pytest.mark.slow)])
def test_opd_scale_build_tiny_without_the_scale_extra(tmp_path, module):
    proc = _run_without(module, f"from scale.cli import main\nsys.exit(main(['build-tiny', {str(tmp_path / 't')!r}]))")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"opd-scale: error: the optional dependency '{module}' is not installed" in proc.stderr
    assert "pip install -e '.[scale]'" in proc.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("module", ["tqdm"])  # matplotlib takes the same path
def test_opd_toys_without_the_toys_extra(tmp_path, module):
    out = tmp_path / "run"
    proc = _run_without(module, f"from toys.cli import main\nsys.exit(main(['run', 'd4_limit', '--out', {str(out)!r}]))")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"the optional dependency '{module}' is not installed" in proc.stderr
    assert "pip install -e '.[toys]'" in proc.stderr  # tqdm is in both extras: opd-toys names its own
    assert not (out / "report.md").exists() and not (out / "INCOMPLETE").exists()


def test_a_missing_module_of_no_extra_is_not_disguised():
    err = ModuleNotFoundError("No module named 'toys.experiments.nothing'", name="toys.experiments.nothing")
    assert missing_extra(err, "toys") is None
    assert missing_extra(ModuleNotFoundError("x", name="PIL.Image"), "toys") == "scale"


def test_the_table_covers_every_package_of_the_pyproject_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    import_name = {"pillow": "PIL", "mkdocs-material": "material"}  # distribution -> import name
    for extra, modules in EXTRA_MODULES.items():
        dists = [re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower() for req in extras[extra]]
        assert sorted(import_name.get(d, d) for d in dists) == sorted(modules), extra


def test_a_wrapped_missing_module_is_found_through_the_cause():
    try:
        try:
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
        except ModuleNotFoundError as inner:
            raise RuntimeError("Failed to import diffusers.loaders.peft") from inner
    except RuntimeError as outer:
        assert missing_extra(outer, "scale") == "scale"
    assert missing_extra(RuntimeError("CUDA out of memory"), "scale") is None
