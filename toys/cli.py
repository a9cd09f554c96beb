"""``opd-toys`` command line.

    opd-toys reproduce [--full] [--out DIR] [--overwrite] [--seeds S ...] [--only NAME ...]
    opd-toys run EXPERIMENT [--full] [--out DIR] [--overwrite] [--seeds S ...]
    opd-toys bench [--out FILE] [--seeds S ...] [--quick]

Bad input (unknown experiment, non-integer or negative seeds, an ``--out`` that is a file or a
non-empty directory without ``--overwrite``, an abbreviated flag) prints a clear message on stderr
and exits with status 2, as does a missing optional dependency (the message names the extra to
install: ``pip install -e '.[toys]'``); Ctrl-C exits 130 and leaves ``OUT/INCOMPLETE`` (no report.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import List, Optional

from toys.reproduce import REGISTRY

__all__ = ["main", "build_parser"]


def _seed(text: str) -> int:
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers, got {text!r}") from None
    if val < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers, got {text!r}")
    return val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd-toys", allow_abbrev=False, description="Exact 2D toys of on-policy distillation "
                                "for flow-matching models: variance plots, training comparisons, reproduce.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reproduce", allow_abbrev=False, help="run every experiment, write a run directory with a report")
    r.add_argument("--full", action="store_true", help="paper-quality mode (>= 5 seeds, larger samples)")
    r.add_argument("--out", default="opd_toys_run", help="run directory (default: ./opd_toys_run)")
    r.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    r.add_argument("--seeds", nargs="+", type=_seed, help="seeds (default 0 1 2; --full: 0..4)")
    r.add_argument("--only", nargs="+", choices=list(REGISTRY), metavar="EXPERIMENT",
                   help=f"subset of experiments: {', '.join(REGISTRY)}")
    e = sub.add_parser("run", allow_abbrev=False, help="run one experiment (its figures and report) into a run directory")
    e.add_argument("experiment", choices=list(REGISTRY), metavar="EXPERIMENT",
                   help=f"one of: {', '.join(REGISTRY)}")
    e.add_argument("--full", action="store_true")
    e.add_argument("--out", default=None, help="run directory (default: ./opd_toys_<EXPERIMENT>)")
    e.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    e.add_argument("--seeds", nargs="+", type=_seed)
    b = sub.add_parser("bench", allow_abbrev=False, help="cost-to-target benchmark; writes a Markdown report")
    b.add_argument("--out", default="docs/benchmarks.md", help="Markdown file to write")
    b.add_argument("--seeds", nargs="+", type=_seed, help="seeds (default 0 1 2)")
    b.add_argument("--quick", action="store_true", help="a reduced sweep (for a smoke run)")
    return p


def _out_dir(parser: argparse.ArgumentParser, text: str) -> pathlib.Path:
    out = pathlib.Path(text)
    if out.exists() and not out.is_dir():
        parser.error(f"--out must be a directory, but {str(out)!r} is an existing file")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``opd-toys``; a missing optional dependency prints the extra to install and exits 2."""
    try:
        return _main(argv)
    except (ImportError, RuntimeError) as err:  # re-raised unless an optional dependency is missing
        from opd_ref._extras import report_missing_extra

        if not report_missing_extra(err, "toys", "opd-toys"):
            raise
        return 2


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("reproduce", "run"):
        from toys.reproduce import reproduce

        out = _out_dir(parser, args.out or f"opd_toys_{args.experiment}")
        only = [args.experiment] if args.command == "run" else args.only
        try:
            results = reproduce(out, full=args.full, seeds=args.seeds, only=only, overwrite=args.overwrite)
        except ValueError as err:
            parser.error(str(err))
        except KeyboardInterrupt:
            print(f"opd-toys: interrupted; {out} is incomplete (see {out}/INCOMPLETE, no report.md)", file=sys.stderr)
            return 130
        n = sum(len(r["checks"]) for r in results.values())
        ok = sum(bool(c["passed"]) for r in results.values() for c in r["checks"])
        errors = [k for k, r in results.items() if r["status"] == "error"]
        print(f"wrote {out}/report.md: {ok}/{n} derivation checks passed"
              + (f"; errors in {', '.join(errors)}" if errors else ""))
        return 1 if errors or ok < n else 0
    if args.command == "bench":
        out = pathlib.Path(args.out)
        if out.exists() and out.is_dir():
            parser.error(f"--out must be a file path, but {str(out)!r} is a directory")
        from toys.bench import run_bench

        run_bench(out, seeds=args.seeds or [0, 1, 2], quick=args.quick)
        print(f"wrote {out}")
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover (argparse enforces)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
