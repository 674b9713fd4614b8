"""``python -m uniba plan infdit | upscale | convert-infdit``."""

from __future__ import annotations

import argparse
import json
import re

from ..cli_io import memory_size, positive_int, seed_int
from ..devices import DTYPE_CHOICES, DTYPES, choose_dtype, torch_dtype_support
from ..progress import TerminalProgress
from .sampling import FAST_PRESET, PRESETS, SAMPLERS, Sampling, named_sampler, resolve_sampling


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 4096x4096 (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _plan(args: argparse.Namespace) -> int:
    from .plan import config_for_file, plan_upscale, release_config

    config = config_for_file(args.model) if args.model else release_config()
    notes = []
    if args.input:
        in_w, in_h = args.input
    else:
        out_w, out_h = args.size
        # the node pads to a whole input pixel and crops back: plan the same, and say so
        in_w, in_h = -(-out_w // args.scale), -(-out_h // args.scale)
        if (in_w * args.scale, in_h * args.scale) != (out_w, out_h):
            notes.append(f"note: --size {out_w}x{out_h} is not a multiple of --scale {args.scale}: planned for an "
                         f"input of {in_w}x{in_h} px ({in_w * args.scale}x{in_h * args.scale} px out); crop the "
                         "result, or give --input WxH")
    plan = plan_upscale(config, in_h, in_w, args.scale, free_bytes=args.vram, sampling=_sampling(args),
                        block_batch=args.block_batch, offload_cache=args.offload_cache, dtype=DTYPES[args.dtype])
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        source = "release config" if not args.model else (
            f"{args.model}" + (", a .pt release: release config" if not str(args.model).lower().endswith(
                (".safetensors", ".sft")) else ""))
        print(f"Inf-DiT plan ({source}, {args.dtype})")
        print(plan.describe())
        for note in notes:
            print(note)
    return 0 if plan.fits else 1


def _sampling(args: argparse.Namespace) -> Sampling:
    """The sampler and schedule the command asks for (a preset or --sampler/--steps), evaluations counted."""
    name, steps = PRESETS[args.preset] if args.preset else (args.sampler, args.steps)
    return resolve_sampling(named_sampler(name), None, steps)


def _upscale(args: argparse.Namespace) -> int:
    from ..cli_io import IMAGE_FORMATS, alpha_dropped, input_file, output_file, read_image, resolve_device, write_image
    from ..memory import device_free_bytes
    from .loader import load_infdit
    from .plan import config_for_file, plan_upscale
    from .upscale import NO_CLIP_TOWER, upscale

    # every argument is checked before the weights load or anything is computed
    device = resolve_device(args.device)
    input_file(args.model, "--model")
    if args.clip:
        input_file(args.clip, "--clip")
    image = read_image(args.input)
    output_file(args.output, inputs=[args.input, args.model, args.clip], overwrite=args.overwrite,
                formats=IMAGE_FORMATS)
    alpha_dropped(image.shape[1], args.output)
    config = config_for_file(args.model)
    if config.clip is None and not args.clip:
        raise ValueError(f"--model {args.model}: {NO_CLIP_TOWER}")
    dtype = choose_dtype(args.dtype, device, torch_dtype_support(device))
    free = args.vram if args.vram else device_free_bytes(device)
    # one plan, checked before the weights load; the upscale runs exactly this plan
    plan = plan_upscale(config, image.shape[-2], image.shape[-1], args.scale, free_bytes=free,
                        sampling=_sampling(args), block_batch=args.block_batch, offload_cache=args.offload_cache,
                        dtype=dtype)
    plan.check_fits()
    model = load_infdit(args.model, dtype, clip=args.clip).to(device)
    if model.clip is None:  # a .pt planned with the release config turned out to lack the tower
        raise ValueError(f"--model {args.model}: {NO_CLIP_TOWER}")
    # the engine's unit: model evaluations x block batches
    batches = sum(p.batches_per_step for p in plan.passes)
    bar = TerminalProgress(image.shape[0] * plan.total_batches, unit="batch",
                           desc=f"Inf-DiT {plan.evaluations} evaluations x {batches} block batches")
    try:
        out = upscale(model, image, plan, seed=args.seed, color_match=args.color_match, progress=bar)
    finally:
        bar.close()
    write_image(out, args.output, "the upscaled image", overwrite=args.overwrite)  # refuses NaN/inf; no-replace
    print(f"wrote {args.output} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..cli_io import SAFETENSORS_FORMATS, input_file, output_file
    from .loader import convert_checkpoint

    input_file(args.input, "input")
    if args.clip:
        input_file(args.clip, "--clip")
    output_file(args.output, inputs=[args.input, args.clip], overwrite=args.overwrite, formats=SAFETENSORS_FORMATS)
    model = convert_checkpoint(args.input, args.output, DTYPES.get(args.dtype), clip=args.clip,
                               overwrite=args.overwrite)
    c = model.config
    print(f"wrote {args.output}: Inf-DiT {c.hidden_size} wide, {c.num_layers} layers, "
          f"CLIP tower {'included' if model.clip is not None else 'absent (add --clip to include it)'}")
    return 0


def _block_batch(text: str) -> int | tuple[int, int] | None:
    from .plan import parse_block_batch

    try:
        return parse_block_batch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", type=int, default=4, choices=(2, 4, 8, 16), help="upscaling factor (default 4)")
    common.add_argument("--block-batch", default=None, type=_block_batch,
                        help="auto, n (n x n blocks per forward) or n_h x n_w (2x3)")
    common.add_argument("--offload-cache", default="auto", choices=("auto", "on", "off"))
    common.add_argument("--vram", type=memory_size, help="memory budget, e.g. 12GB (default: free device memory)")
    common.add_argument("--sampler", default="heun", choices=tuple(SAMPLERS),
                        help="heun = the reference (2 evaluations per step); the others take 1 per step")
    common.add_argument("--steps", type=positive_int, default=20,
                        help="steps of the Karras schedule (default 20 = reference)")
    common.add_argument("--preset", choices=tuple(PRESETS),
                        help=f"instead of --sampler/--steps: reference = heun 20 (39 evaluations), fast = "
                             f"{FAST_PRESET[0]} {FAST_PRESET[1]} ({FAST_PRESET[1]} evaluations)")

    if "plan" not in subparsers.choices:
        plan = subparsers.add_parser("plan", parents=[common], help="memory plan of an upscale (no weights needed)")
        plan.add_argument("target", choices=("infdit",))
        where = plan.add_mutually_exclusive_group(required=True)
        where.add_argument("--size", type=_size, help="output size WxH, e.g. 4096x4096")
        where.add_argument("--input", type=_size, help="input size WxH")
        plan.add_argument("--model", help="plan for this checkpoint's config (default: the release)")
        plan.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
        plan.add_argument("--json", action="store_true", help="print the plan as JSON")
        plan.set_defaults(func=_plan)

    up = subparsers.add_parser("upscale", parents=[common], help="upscale an image with Inf-DiT")
    up.add_argument("input")
    up.add_argument("output")
    up.add_argument("--model", required=True, help="Inf-DiT checkpoint (.pt release or converted .safetensors)")
    up.add_argument("--clip", help="separate open_clip ViT-L-14 file if the checkpoint has no CLIP tower")
    up.add_argument("--seed", type=seed_int, default=0)
    up.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    up.add_argument("--device", help="cuda, mps or cpu (default: cuda if available)")
    up.add_argument("--color-match", default="none", choices=("none", "wavelet"))
    up.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    up.set_defaults(func=_upscale)

    conv = subparsers.add_parser("convert-infdit", help="convert the released .pt to .safetensors (no pickle)")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--dtype", default="keep", choices=("keep", *DTYPES))
    conv.add_argument("--clip", help="separate open_clip ViT-L-14 file to include")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    conv.set_defaults(func=_convert)
