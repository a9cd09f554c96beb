"""``opd-scale``: build a tiny SD3.5-style pipeline, train (two-stage DiffusionOPD), sample, benchmark.

Examples::

    opd-scale build-tiny /tmp/tiny
    opd-scale build-tiny-rewards /tmp/tiny_rewards          # tiny PickScore-like / aesthetic-like dirs + prompt files
    opd-scale train --config run.json --set distill_steps=200 --learning-rate 1e-4
    opd-scale train --resume --output-dir runs/opd          # continue from the run's checkpoint
    opd-scale sample --run runs/opd --prompts p.txt --out grid.png   # the run's model, student and settings
    opd-scale sample --model /tmp/tiny --lora runs/opd/student --prompts p.txt --out grid.png
    opd-scale bench --model /tmp/tiny --out bench.json
    opd-scale eval --run runs/opd                          # 40-step ODE rewards, held-out KL, grids
    opd-scale train --preset tiny --model /tmp/tiny ...    # a preset (scale/presets/NAME.json) as the base
    opd-scale gpu-check --out gpu_check.json               # full-size SD3.5-Medium checks on CUDA (tiny on CPU)

``train`` takes every :class:`~scale.config.ScaleConfig` field as ``--field-name VALUE`` or
``--set field_name=VALUE`` (each key once: the same key twice, or as a flag and in ``--set``, is an
error; flags are never abbreviated); lists are comma-separated or JSON. Multi-process:
``opd-scale launch --nproc-per-node 8 -- train ...`` (torchrun underneath: ``opd-scale launch
[TORCHRUN OPTIONS] -- SUBCOMMAND ...``, ``--standalone`` unless ``--nnodes``/``--rdzv-endpoint`` is
given); unlike plain ``torchrun``, whose agent prints a traceback and exits 1 on SIGTERM, it exits
with the signal's code (143, 130) after the workers have checkpointed, or with a worker's own exit code.

Exit codes: 0 finished; 2 bad input (config, files, a run directory in use or not resumable, no
valid checkpoint, a missing optional dependency: the message names the extra to install); 3 the run diverged (non-finite loss / gradient, or the held-out KL guard); 4 the
run directory could not be written (disk full, permissions: the last checkpoint is intact); 130
Ctrl-C and 143 SIGTERM (a checkpoint was written: continue with ``--resume``).

Reference: ``diffusionopd``, ``flowgrpo``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser", "RUN_FLAGS", "add_run_flags", "resolve_run_flags"]

EXIT_BAD_INPUT = 2  # bad config, files or run directory; nothing was trained
EXIT_DIVERGED = 3  # non-finite loss / gradient / velocity or the held-out KL guard; the last good checkpoint stays
EXIT_IO = 4  # the run directory could not be written (disk full, permissions); the last checkpoint stays
EXIT_SIGINT = 130  # 128 + SIGINT (Ctrl-C): the run checkpointed and can be resumed
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the run checkpointed and can be resumed


class _Once(argparse.Action):
    """Store a flag's value; the same flag given twice is an error (argparse would keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):
            parser.error(f"{option_string} given twice")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The ``opd-scale`` argument parser (subcommands launch, build-tiny, train, sample, eval, gpu-check, bench)."""
    from opd_ref.engine import KERNEL_KINDS
    from scale.config import field_docs

    parser = argparse.ArgumentParser(prog="opd-scale", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="multi-process: opd-scale launch [TORCHRUN OPTIONS] -- SUBCOMMAND ... "
                                  "(torchrun; exits 143/130 on SIGTERM/Ctrl-C without a traceback)")

    p = sub.add_parser("build-tiny", allow_abbrev=False, help="write a tiny random-weight SD3.5-style pipeline (save_pretrained)")
    p.add_argument("dir", help="output directory (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    p = sub.add_parser("build-tiny-rewards", allow_abbrev=False,
                       help="write tiny random-weight PickScore-like and aesthetic-like reward-model directories, a "
                            "GenEval-style jsonl and an OCR-style prompt file (for dry runs of the reward adapters)")
    p.add_argument("dir", help="output directory (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    p = sub.add_parser("train", allow_abbrev=False, help="two-stage DiffusionOPD training (config file + overrides)")
    p.add_argument("--config", help="JSON or TOML config file (defaults: ScaleConfig)")
    p.add_argument("--preset", default=None,
                   help="a preset as the base config: a name in scale/presets/ (e.g. tiny, sd35m-512-diffusionopd, "
                        "flowgrpo-sd35) or a JSON/TOML file; --config and the flags override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its checkpoint (its config.json is the base config)")
    fields = p.add_argument_group(
        "config fields", "every ScaleConfig field, as --field-name VALUE or --set field_name=VALUE "
        "(lists: comma-separated or JSON; booleans: true/false)")
    for name, typ, default, doc in field_docs():
        metavar = "LIST" if typ.startswith("List") else typ.upper()
        fields.add_argument("--" + name.replace("_", "-"), dest="cfg__" + name, default=argparse.SUPPRESS,
                            action=_Once, metavar=metavar,
                            help=f"{doc} (default: {default!r})".replace("%", "%%"))

    p = sub.add_parser("sample", allow_abbrev=False, help="a grid of images from the base model, a teacher or the student LoRA")
    add_run_flags(p)
    p.add_argument("--lora", default=None, help="diffusers LoRA file/dir (teacher or student); none = base "
                                                "(with --run: RUN/student unless given; --lora '' = base)")
    p.add_argument("--prompts", default=None, help="prompt file (.txt one per line, or .jsonl)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--out", required=True, help="PNG path of the grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--kernel", default="ode", choices=list(KERNEL_KINDS))
    p.add_argument("--noise-level", type=float, default=0.0)

    p = sub.add_parser("eval", allow_abbrev=False,
                       help="evaluate a run's student: ODE-sample rewards, held-out path KL to each teacher, grids")
    p.add_argument("--run", required=True, help="run directory (its config.json gives the settings)")
    p.add_argument("--lora", default=None, help="student LoRA to evaluate (default: RUN/student)")
    p.add_argument("--ema", action="store_true", help="evaluate RUN/student_ema (runs with ema_decay > 0)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the run's eval_steps, 40)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/evals/eval_NNN)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config, e.g. heldout_prompt_files=... or rewards=... (repeatable)")

    p = sub.add_parser("gpu-check", allow_abbrev=False,
                       help="one-shot GPU check: full-size SD3.5-Medium transformer (random weights) on CUDA, tiny on CPU")
    p.add_argument("--out", default="gpu_check.json", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="the tiny model also on CUDA")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")

    p = sub.add_parser("bench", allow_abbrev=False, help="overhead, memory and cost-per-update ratios (scale.bench)")
    p.add_argument("--model", default=None, help="pipeline directory (default: build a tiny one in a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--resolution", type=int, default=None, help="default: the transformer's sample size")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


#: flags of ``sample`` (and of any subcommand built with :func:`add_run_flags`) that ``--run RUN`` takes
#: from ``RUN/config.json``: flag dest -> (ScaleConfig field, type, default without a run, help).  Precedence:
#: the command line, then the run's value, then the default.  Steps default to the run's ``num_steps``
#: (what its own ``samples/*.png`` used); without a run, 40 and 256 T5 tokens (diffusers' SD3 defaults).
RUN_FLAGS = {
    "model": ("model", str, None, "pipeline directory or cached hub id (required unless --run)"),
    "num_steps": ("num_steps", int, 40, "sampling steps"),
    "guidance_scale": ("guidance_scale", float, 4.5, "classifier-free guidance (SD3.5-Medium's recommended 4.5)"),
    "resolution": ("resolution", int, 512, "image side in pixels"),
    "max_sequence_length": ("max_sequence_length", int, 256, "T5 tokens per prompt"),
    "dtype": ("dtype", str, "auto", "weights dtype (auto = bfloat16 on CUDA, float32 on CPU)"),
}


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--run RUN`` and the :data:`RUN_FLAGS` to a subcommand; :func:`resolve_run_flags` fills them."""
    from scale.config import DTYPES

    p.add_argument("--run", default=None, metavar="RUN",
                   help="a training run directory: its config.json supplies " + ", ".join(
                       "--" + k.replace("_", "-") for k in RUN_FLAGS) + " unless given here")
    for dest, (_, typ, default, text) in RUN_FLAGS.items():
        extra = {"choices": list(DTYPES)} if dest == "dtype" else {}
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=None,
                       help=f"{text} (default: the run's, else {default!r})", **extra)


def resolve_run_flags(args: argparse.Namespace) -> Optional[dict]:
    """Fill the :data:`RUN_FLAGS` of ``args`` in place: command line, else ``args.run``'s config.json,
    else the default.  Returns the run's config dict (``None`` without ``--run``).

    Raises:
        FileNotFoundError: ``--run`` has no config.json.  ValueError: no ``--model`` and no ``--run``.
    """
    run_cfg = None
    if args.run is not None:
        from scale.eval import run_config_file

        run_cfg = json.loads(run_config_file(args.run).read_text())
    for dest, (key, _, default, _) in RUN_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, run_cfg[key] if run_cfg is not None and key in run_cfg else default)
    if not args.model:
        raise ValueError(f"{args.command}: give --model PIPELINE or --run RUN")
    return run_cfg


def _train_config(args: argparse.Namespace):
    from scale.config import load_config, parse_value

    direct = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    seen: dict = {}
    for item in args.overrides:
        key = item.partition("=")[0].strip().replace("-", "_")
        if key in direct:
            raise ValueError(f"config key {key!r} given twice: --{key.replace('_', '-')} {direct[key]!r} and "
                             f"--set {item!r}; give it once")
        if key in seen:
            raise ValueError(f"config key {key!r} given twice: --set {seen[key]!r} and --set {item!r}; give it once")
        seen[key] = item
    base = args.config
    if args.preset is not None:
        from scale.config import apply_overrides
        from scale.presets import preset_config

        if args.resume:
            raise ValueError("--preset and --resume: a resumed run's base config is its config.json; drop --preset")
        data = preset_config(args.preset).to_dict()
        if base is not None:
            data.update(_explicit(base))
        cfg = apply_overrides(load_config(None, data), args.overrides)
        overrides = {k: parse_value(k, v) for k, v in direct.items()}
        return load_config(None, {**cfg.to_dict(), **overrides}) if overrides else cfg
    if args.resume and base is None:
        out = direct.get("output_dir")
        if "output_dir" in seen:
            out = seen["output_dir"].partition("=")[2]
        if out is None:
            raise ValueError("--resume needs --output-dir RUN_DIR (or --config) to find the run")
        base = str(Path(out) / "config.json")
        if not Path(base).is_file():
            raise FileNotFoundError(f"--resume: {base!r} does not exist (no run there)")
    overrides = {k: parse_value(k, v) for k, v in direct.items()}
    cfg = load_config(base, args.overrides)
    return load_config(None, {**cfg.to_dict(), **overrides}) if overrides else cfg


def _explicit(path: str) -> dict:
    """The keys a config file sets over a preset (the preset's other values stay)."""
    from scale.config import load_config

    load_config(path)  # validates the file (exists, parses, known keys)
    text = Path(path).read_text()
    if path.endswith(".toml"):
        import tomllib

        return tomllib.loads(text)
    return json.loads(text)


def _device_dtype(name: str):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "auto":
        return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, getattr(torch, name)


def _cmd_sample(args: argparse.Namespace) -> int:
    from scale.io import sample_images, save_grid
    from scale.lora import load_lora
    from scale.pipeline import load_pipeline
    from scale.setup import read_prompts
    from scale.text import PromptCache

    resolve_run_flags(args)
    if args.run is not None and args.lora is None and (Path(args.run) / "student").is_dir():
        args.lora = str(Path(args.run) / "student")
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts, "sample")
    if not prompts:
        raise ValueError("sample: give --prompts FILE or at least one --prompt")
    device, dtype = _device_dtype(args.dtype)
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    adapter = None
    if args.lora:
        load_lora(pipe.transformer, args.lora, "sample")
        adapter = "sample"
    cache = PromptCache(pipe, max_sequence_length=args.max_sequence_length, guidance=args.guidance_scale != 1)
    images = sample_images(pipe, cache, prompts, adapter, num_steps=args.num_steps, resolution=args.resolution,
                           guidance_scale=args.guidance_scale, seed=args.seed, kernel=args.kernel,
                           noise_level=args.noise_level)
    out = save_grid(images, args.out)
    print(f"wrote {out} ({len(prompts)} images, {'base' if adapter is None else args.lora})")
    return 0


def _launch(argv: Sequence[str]) -> int:
    """``opd-scale launch [TORCHRUN OPTIONS] -- SUBCOMMAND ...``: torchrun in this process, with the
    launcher's signal and worker failures turned into exit codes instead of tracebacks."""
    argv = list(argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("opd-scale: error: usage: opd-scale launch [TORCHRUN OPTIONS] -- SUBCOMMAND [ARGS...] "
              "(e.g. opd-scale launch --nproc-per-node 2 -- train --config run.json)", file=sys.stderr)
        return EXIT_BAD_INPUT
    cut = argv.index("--")
    opts, rest = argv[:cut], argv[cut + 1:]
    if not any(o.split("=")[0] in ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--standalone") for o in opts):
        opts = ["--standalone", *opts]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun([*opts, "-m", "scale.cli", *rest])
    except SignalException as err:
        sig = int(err.sigval)
        print(f"opd-scale launch: stopped by signal {sig}; the workers checkpointed: continue with --resume",
              file=sys.stderr)
        return 128 + sig
    except ChildFailedError as err:
        codes = sorted({f.exitcode for f in err.failures.values()})
        print(f"opd-scale launch: a worker exited with {codes[-1]} (all worker exit codes: {codes})", file=sys.stderr)
        return codes[-1] if codes[-1] > 0 else 1
    return 0


def _warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 - formatwarning signature
    return f"opd-scale: warning: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``opd-scale`` console script; returns the exit code (see the module
    docstring; errors print ``opd-scale: error: ...`` without a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    old_format, warnings.formatwarning = warnings.formatwarning, _warning
    from scale.versions import DependencyVersionError

    try:
        return _run(args)
    except DependencyVersionError as err:  # a library of the scale extra below its floor
        print(f"opd-scale: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ImportError, RuntimeError) as err:  # re-raised unless an optional dependency is missing
        from opd_ref._extras import report_missing_extra

        if not report_missing_extra(err, "scale", "opd-scale"):
            raise
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("opd-scale: interrupted (Ctrl-C) before a checkpoint could be written; the last committed "
              "checkpoint (if any) is intact: continue with --resume", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        warnings.formatwarning = old_format


def _run(args: argparse.Namespace) -> int:
    from scale.checkpoint import RunBusyError
    from scale.logs import configure_output

    configure_output()  # library notes once, no nested bars in redirected logs (scale/logs.py)

    try:
        if args.command == "build-tiny":
            from scale.tiny import build_tiny_pipeline

            print(f"wrote {build_tiny_pipeline(args.dir, seed=args.seed)}")
            return 0
        if args.command == "build-tiny-rewards":
            from scale.tiny import build_tiny_rewards

            for name, path in build_tiny_rewards(args.dir, seed=args.seed).items():
                print(f"wrote {name}: {path}")
            return 0
        if args.command == "train":
            from scale.train import DivergedError, train

            try:
                result = train(_train_config(args), resume=args.resume)
            except DivergedError as err:
                print(f"opd-scale: diverged: {err}", file=sys.stderr)
                return EXIT_DIVERGED
            if result.status == "interrupted":
                why = "Ctrl-C" if result.signal == signal.SIGINT else "SIGTERM"
                print(f"interrupted ({why}): checkpoint in {result.run_dir / 'checkpoints'} (phase {result.phase}, "
                      f"update {result.step}); continue with: opd-scale train --resume --output-dir {result.run_dir}",
                      file=sys.stderr)
                return EXIT_SIGINT if result.signal == signal.SIGINT else EXIT_INTERRUPTED
            print(f"finished: {result.run_dir}")
            return 0
        if args.command == "sample":
            return _cmd_sample(args)
        if args.command == "eval":
            from scale.eval import run_eval

            result = run_eval(args.run, lora=args.lora, ema=args.ema, num_steps=args.steps, out_dir=args.out,
                              overrides=args.overrides)
            print(json.dumps(result, indent=2, sort_keys=True))
            return 0
        if args.command == "gpu-check":
            from scale.gpu_check import run_gpu_check

            results = run_gpu_check(args.out, tiny=args.tiny, repeats=args.repeats)
            print(json.dumps(results, indent=2, sort_keys=True))
            return 0
        if args.command == "bench":
            from scale.bench import run_bench

            results = run_bench(model=args.model, resolution=args.resolution, repeats=args.repeats,
                                micro_batch_size=args.micro_batch_size, dtype=args.dtype)
            text = json.dumps(results, indent=2, sort_keys=True)
            if args.out:
                Path(args.out).write_text(text + "\n")
            print(text)
            return 0
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RunBusyError) as err:
        print(f"opd-scale: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"opd-scale: error: {err}", file=sys.stderr)
        return EXIT_IO
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
