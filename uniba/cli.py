"""Command line: ``python -m uniba <command>``. Runs headless, without ComfyUI.

Each method adds its own subcommands from ``uniba/<method>/cli.py`` (a ``register(subparsers)``
function); benchmarks live in modules with a ``run(argv) -> int`` function, listed in
:data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

METHOD_CLIS = ("uniba.infdit.cli", "uniba.sana.cli", "uniba.hidiffusion.cli", "uniba.fit")

BENCHMARKS = {
    "infdit": ("uniba.infdit.bench", "Inf-DiT block-wise vs whole-canvas memory and time; presets; bf16"),
    "infdit-solvers": ("uniba.infdit.bench_solvers", "Inf-DiT samplers: distance to 200 Heun steps vs evaluations"),
    "infdit-ranks": ("uniba.infdit.bench_ranks", "Inf-DiT one image on 1 vs 2 processes; 2/4/8 GPUs projected"),
    "sana": ("uniba.sana.bench", "Sana linear vs softmax attention scaling; Flow-DPM-Solver vs Flow-Euler"),
    "dcae": ("uniba.dcae.bench", "DC-AE exact-tiled vs untiled decode: time, memory, max difference"),
    "load": ("uniba.bench_load", "load time and peak RSS per released checkpoint; --forward: bf16 vs fp32 smoke"),
    "hidiffusion": ("uniba.hidiffusion.bench", "MSW-MSA vs global self-attention at SD1.5's top level"),
    "scan": ("uniba.checkpoint.bench", "pre-scan of a .pt pickle vs the torch.load it protects: time ratio"),
}


def _bench(args: argparse.Namespace) -> int:
    module_name, _ = BENCHMARKS[args.target]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"benchmark '{args.target}' is not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(module.run(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uniba",
        description="UniBA engine: Inf-DiT block-wise upscaling, Sana, HiDiffusion (headless tools).",
    )
    parser.add_argument("--version", action="version", version=f"uniba {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="run a benchmark (prints side-by-side ratios)",
                           description="\n".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("target", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (--help for them)")
    bench.set_defaults(func=_bench)

    for name in METHOD_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad arguments and unusable files end as one ``error:`` line and exit status 2.

    Expected failures are ``ValueError`` (which includes :class:`~uniba.checkpoint.CheckpointError`,
    :class:`~uniba.cli_io.CliError`, the guards' NaN and memory refusals), ``OSError`` (a disk that
    fills up, a permission change mid-run) and :class:`~uniba.memory.OutOfMemoryAtMinimum`. Anything
    else is a bug and keeps its traceback.
    """
    from .memory import OutOfMemoryAtMinimum

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, OutOfMemoryAtMinimum) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
