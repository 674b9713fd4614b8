"""``python -m uniba hidiffusion-plan``: which blocks and steps HiDiffusion patches for a model, size and step count."""

from __future__ import annotations

import argparse
import re

from ..cli_io import positive_int, unit_float
from .plan import FAMILIES, describe, make_config, resolve_plan


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 2048x2048 (width x height in px), got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"width and height must be at least 8 px, got {text!r}")
    return width, height


def _plan(args: argparse.Namespace) -> int:
    width, height = args.size
    if width % 8 or height % 8:
        raise ValueError(f"--size {width}x{height}: width and height must be multiples of 8")
    options = {"raunet": not args.no_raunet, "msw_msa": not args.no_msw_msa,
               "non_aggressive_model": args.inpainting_or_playground}
    if args.t1 is not None:
        options["t1_ratio"] = args.t1
    if args.t2 is not None:
        options["t2_ratio"] = args.t2
    config = make_config(args.model, **options)
    plan = resolve_plan(config, height // 8, width // 8, args.steps)
    print(describe(config, plan))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("hidiffusion-plan", help="show HiDiffusion's resolved plan (blocks and steps)")
    plan.add_argument("--model", choices=FAMILIES, default="sd1")
    plan.add_argument("--size", type=_size, default=(2048, 2048), help="image size WIDTHxHEIGHT in px")
    plan.add_argument("--steps", type=positive_int, default=50)
    plan.add_argument("--t1", type=unit_float, default=None, help="override the T1 ratio (0 to 1)")
    plan.add_argument("--t2", type=unit_float, default=None, help="override the T2 ratio (0 to 1)")
    plan.add_argument("--inpainting-or-playground", action="store_true",
                      help="SDXL inpainting / Playground 2.5: the reference's non-aggressive table")
    plan.add_argument("--no-raunet", action="store_true")
    plan.add_argument("--no-msw-msa", action="store_true")
    plan.set_defaults(func=_plan)
