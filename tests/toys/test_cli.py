"""``opd-toys`` command line: bad input gives a clear message and exit status 2."""

import pytest

from toys import cli
from toys.experiments import d4_limit


def _assert_fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_experiment(capsys):
    _assert_fails(["run", "nonsense"], capsys, "invalid choice: 'nonsense'", "variance")


def test_bad_seeds(capsys):
    _assert_fails(["reproduce", "--seeds", "x"], capsys, "seeds must be non-negative integers, got 'x'")
    _assert_fails(["reproduce", "--seeds", "-3"], capsys, "got '-3'")


def test_missing_command_and_unknown_only(capsys):
    _assert_fails([], capsys, "required")
    _assert_fails(["reproduce", "--only", "bogus"], capsys, "invalid choice: 'bogus'")


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _assert_fails(["reproduce", "--out", str(f)], capsys, "--out must be a directory", "file.txt")
    _assert_fails(["bench", "--out", str(tmp_path)], capsys, "--out must be a file path")


def test_run_one_experiment(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(d4_limit.QUICK, "n_a", 3)
    monkeypatch.setitem(d4_limit.QUICK, "batch", 8)
    assert cli.main(["run", "d4_limit", "--out", str(tmp_path / "r"), "--seeds", "1"]) == 0
    assert "3/3 derivation checks passed" in capsys.readouterr().out
    assert (tmp_path / "r" / "figures" / "d4_limit.png").exists()
