"""Sana subcommands of ``python -m uniba``: ``convert-sana`` and ``sana-info``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from ..checkpoint import check_keys, save_safetensors
from ..devices import DTYPES


def _kind(config: Any) -> str:
    """What the file is, in the words of the release names (Sprint needs its own sampler nodes)."""
    return "Sana-Sprint DiT (sCM, 1-4 steps)" if config.is_sprint else "Sana DiT"


def _convert(args: argparse.Namespace) -> int:
    from ..cli_io import SAFETENSORS_FORMATS, input_file, output_file
    from .keys import ours_to_original
    from .loader import FAMILY, METADATA_KEY, expected_shapes, read_sana_checkpoint

    # every argument before the (possibly multi-GB) read; the output never replaces the input
    input_file(args.input, "input", allow_dir=True)
    output_file(args.output, inputs=[args.input], overwrite=args.overwrite, formats=SAFETENSORS_FORMATS)
    ckpt = read_sana_checkpoint(args.input)
    check_keys(ckpt.state_dict, expected_shapes(ckpt.config), path=args.input, family=FAMILY)
    state = ours_to_original(ckpt.state_dict) if args.to == "original" else ckpt.state_dict
    if args.dtype != "keep":
        state = {k: v.to(DTYPES[args.dtype]) for k, v in state.items()}
    save_safetensors(state, args.output, metadata={METADATA_KEY: ckpt.config.to_json()},
                     overwrite=args.overwrite)
    print(f"wrote {args.output}: {_kind(ckpt.config)}, {len(state)} tensors, {args.to} keys, "
          f"config {ckpt.config.to_json()}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..cli_io import input_file
    from .loader import read_sana_checkpoint

    input_file(args.input, "input", allow_dir=True)
    ckpt = read_sana_checkpoint(args.input)
    params = sum(v.numel() for v in ckpt.state_dict.values())
    print(f"{args.input}: {_kind(ckpt.config)}, {ckpt.source_format} format, "
          f"{str(ckpt.stored_dtype).removeprefix('torch.')}, "
          f"{params / 1e6:.1f} M parameters")
    for key, value in asdict(ckpt.config).items():
        print(f"  {key}: {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert-sana", help="convert a Sana DiT (.pth or diffusers) to one safetensors file",
        description="Read a Sana DiT checkpoint safely (original .pth/.safetensors or diffusers file/folder) and "
                    "write it as a single .safetensors file with its config in the metadata.")
    convert.add_argument("input", help="checkpoint file, diffusers transformer folder or whole <name>_diffusers folder")
    convert.add_argument("output", help="output .safetensors path")
    convert.add_argument("--to", choices=["diffusers", "original"], default="diffusers", help="key names to write")
    convert.add_argument("--dtype", choices=("keep", *DTYPES), default="keep", help="cast the weights")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    convert.set_defaults(func=_convert)

    info = subparsers.add_parser(
        "sana-info", help="show the kind (Sana or Sana-Sprint), format and inferred config of a Sana DiT checkpoint")
    info.add_argument("input", help="checkpoint file, diffusers transformer folder or whole <name>_diffusers folder")
    info.set_defaults(func=_info)
