"""``opd-scale``: build a tiny SD3.5-style pipeline, train (two-stage DiffusionOPD), sample, benchmark.

Examples::

    opd-scale build-tiny /tmp/tiny
    opd-scale train --config run.json --set distill_steps=200 --learning-rate 1e-4
    opd-scale train --resume --output-dir runs/opd          # continue from the run's checkpoint
    opd-scale sample --model /tmp/tiny --lora runs/opd/student --prompts p.txt --out grid.png
    opd-scale bench --model /tmp/tiny --out bench.json

``train`` takes every :class:`~scale.config.ScaleConfig` field as ``--field-name VALUE`` or
``--set field_name=VALUE``; lists are comma-separated or JSON. Multi-GPU:
``accelerate launch --num_processes 8 -m scale.cli train ...``.

Reference: ``diffusionopd``, ``flowgrpo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the run checkpointed and can be resumed


def build_parser() -> argparse.ArgumentParser:
    """The ``opd-scale`` argument parser (subcommands build-tiny, train, sample, bench)."""
    from opd_ref.engine import KERNEL_KINDS
    from scale.config import ScaleConfig

    parser = argparse.ArgumentParser(prog="opd-scale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write a tiny random-weight SD3.5-style pipeline (save_pretrained)")
    p.add_argument("dir", help="output directory (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    p = sub.add_parser("train", help="two-stage DiffusionOPD training (config file + overrides)")
    p.add_argument("--config", help="JSON or TOML config file (defaults: ScaleConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its checkpoint (its config.json is the base config)")
    for f in dataclasses.fields(ScaleConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest="cfg__" + f.name, default=argparse.SUPPRESS,
                       metavar="VALUE", help=argparse.SUPPRESS)

    p = sub.add_parser("sample", help="a grid of images from the base model, a teacher or the student LoRA")
    p.add_argument("--model", required=True, help="pipeline directory or cached hub id")
    p.add_argument("--lora", default=None, help="diffusers LoRA file/dir (teacher or student); none = base")
    p.add_argument("--prompts", default=None, help="prompt file (one per line)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--out", required=True, help="PNG path of the grid")
    p.add_argument("--num-steps", type=int, default=40, help="sampling steps (SD3.5 default 40)")
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernel", default="ode", choices=list(KERNEL_KINDS))
    p.add_argument("--noise-level", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-sequence-length", type=int, default=256)

    p = sub.add_parser("bench", help="overhead, memory and cost-per-update ratios (scale.bench)")
    p.add_argument("--model", default=None, help="pipeline directory (default: build a tiny one in a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--resolution", type=int, default=None, help="default: the transformer's sample size")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def _train_config(args: argparse.Namespace):
    from scale.config import load_config, parse_value

    direct = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    base = args.config
    if args.resume and base is None:
        out = direct.get("output_dir")
        for item in args.overrides:
            if item.partition("=")[0].strip().replace("-", "_") == "output_dir":
                out = item.partition("=")[2]
        if out is None:
            raise ValueError("--resume needs --output-dir RUN_DIR (or --config) to find the run")
        base = str(Path(out) / "config.json")
        if not Path(base).is_file():
            raise FileNotFoundError(f"--resume: {base!r} does not exist (no run there)")
    overrides = {k: parse_value(k, v) for k, v in direct.items()}
    cfg = load_config(base, args.overrides)
    return load_config(None, {**cfg.to_dict(), **overrides}) if overrides else cfg


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
    cache = PromptCache(pipe, max_sequence_length=args.max_sequence_length, guidance=args.guidance_scale > 1)
    images = sample_images(pipe, cache, prompts, adapter, num_steps=args.num_steps, resolution=args.resolution,
                           guidance_scale=args.guidance_scale, seed=args.seed, kernel=args.kernel,
                           noise_level=args.noise_level)
    out = save_grid(images, args.out)
    print(f"wrote {out} ({len(prompts)} images, {'base' if adapter is None else args.lora})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``opd-scale`` console script; returns the exit code (errors in the input
    print ``opd-scale: error: ...`` and return 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build-tiny":
            from scale.tiny import build_tiny_pipeline

            print(f"wrote {build_tiny_pipeline(args.dir, seed=args.seed)}")
            return 0
        if args.command == "train":
            from scale.train import train

            result = train(_train_config(args), resume=args.resume)
            if result.status == "interrupted":
                print(f"interrupted: checkpoint at {result.run_dir / 'checkpoint'} (phase {result.phase}, "
                      f"step {result.step}); continue with --resume", file=sys.stderr)
                return EXIT_INTERRUPTED
            print(f"finished: {result.run_dir}")
            return 0
        if args.command == "sample":
            return _cmd_sample(args)
        if args.command == "bench":
            from scale.bench import run_bench

            results = run_bench(model=args.model, resolution=args.resolution, repeats=args.repeats,
                                micro_batch_size=args.micro_batch_size, dtype=args.dtype)
            text = json.dumps(results, indent=2, sort_keys=True)
            if args.out:
                Path(args.out).write_text(text + "\n")
            print(text)
            return 0
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"opd-scale: error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
