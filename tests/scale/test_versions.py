"""The scale extra's version floors (issue: the diffusers floor is the lowest release the tests pass
with): one list in ``scale.versions``, equal to pyproject's, satisfied here, and a clear exit-2 error
naming the package when an older release is installed."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from scale import versions
from scale.versions import MIN_VERSIONS, DependencyVersionError, check_versions

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_floors():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["scale"]
    floors = {}
    for req in extra:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.strip())
        if m:
            floors[m.group(1)] = m.group(2)
    return floors


def test_floors_are_pyprojects():
    floors = _pyproject_floors()
    assert {k: floors[k] for k in MIN_VERSIONS} == MIN_VERSIONS


def test_installed_releases_meet_the_floors():
    check_versions()  # raises if this environment is below a floor
    from importlib.metadata import version
    from packaging.version import Version

    for name, floor in MIN_VERSIONS.items():
        assert Version(version(name)) >= Version(floor), name


@pytest.mark.parametrize("name,old", [("diffusers", "0.39.0"), ("transformers", "5.12.1")])
def test_an_older_release_is_a_clear_error(name, old):
    installed = {k: "99.0" for k in MIN_VERSIONS} | {name: old}
    with pytest.raises(DependencyVersionError, match=rf"{name} {re.escape(old)} is older than the "
                                                     rf"{re.escape(MIN_VERSIONS[name])}.*pip install -U"):
        check_versions(installed)
    check_versions({k: v for k, v in MIN_VERSIONS.items()})  # exactly the floor is accepted


def test_opd_scale_exits_2_naming_the_package(tmp_path, monkeypatch, capsys):
    from scale.cli import main

    real = versions.importlib.metadata.version
    monkeypatch.setattr(versions.importlib.metadata, "version",
                        lambda n: "0.35.2" if n == "diffusers" else real(n))
    rc = main(["sample", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "diffusers 0.35.2 is older than the 0.40" in err and "Traceback" not in err
