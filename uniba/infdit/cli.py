"""``python -m uniba plan infdit | upscale | convert-infdit``."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from ..memory import parse_bytes
from .sampling import SAMPLERS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 4096x4096 (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _plan(args: argparse.Namespace) -> int:
    from .plan import config_for_file, plan_upscale, release_config

    config = config_for_file(args.model) if args.model else release_config()
    if args.input:
        in_w, in_h = args.input
    else:
        out_w, out_h = args.size
        if out_w % args.scale or out_h % args.scale:
            raise ValueError(f"--size {out_w}x{out_h} is not divisible by --scale {args.scale}")
        in_w, in_h = out_w // args.scale, out_h // args.scale
    free = parse_bytes(args.vram) if args.vram else None
    plan = plan_upscale(config, in_h, in_w, args.scale, free, block_batch=args.block_batch,
                        offload_cache=args.offload_cache, dtype=_DTYPES[args.dtype])
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"Inf-DiT plan ({'release config' if not args.model else args.model}, {args.dtype})")
        print(plan.describe())
    return 0 if plan.fits else 1


def _read_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        mode = "RGBA" if img.mode in ("RGBA", "LA", "P") and "transparency" in img.info or img.mode in (
            "RGBA", "LA") else "RGB"
        array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def _write_image(tensor: torch.Tensor, path: str) -> None:
    from PIL import Image

    array = ((tensor[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    target = Path(path)
    tmp = target.with_name(target.name + ".partial" + target.suffix)
    try:
        Image.fromarray(array).save(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class _ProgressBar:
    """A terminal progress bar with ETA over model evaluations x block batches (the engine's unit)."""

    def __init__(self, plan, images: int) -> None:
        from tqdm.auto import tqdm

        batches = sum(p["batches_per_step"] for p in plan.passes)
        self.bar = tqdm(total=images * plan.total_batches, unit="batch", dynamic_ncols=True,
                        desc=f"Inf-DiT {plan.evaluations} evaluations x {batches} block batches",
                        disable=os.environ.get("UNIBA_QUIET") == "1")

    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None:
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _upscale(args: argparse.Namespace) -> int:
    from ..memory import device_free_bytes
    from .loader import load_infdit
    from .plan import config_for_file, plan_upscale
    from .sampling import count_evaluations, get_sigmas_karras, named_sampler
    from .upscale import upscale

    device = torch.device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = _DTYPES.get(args.dtype) if args.dtype != "auto" else default_dtype(device)
    sampler, sigmas = named_sampler(args.sampler), get_sigmas_karras(args.steps)
    image = _read_image(args.input)
    free = parse_bytes(args.vram) if args.vram else device_free_bytes(device)
    # one plan, checked before the weights load; the upscale runs exactly this plan
    plan = plan_upscale(config_for_file(args.model), image.shape[-2], image.shape[-1], args.scale, free,
                        block_batch=args.block_batch, offload_cache=args.offload_cache, dtype=dtype,
                        evaluations=count_evaluations(sampler, sigmas))
    plan.check_fits()
    model = load_infdit(args.model, dtype, clip=args.clip).to(device)
    bar = _ProgressBar(plan, image.shape[0])
    try:
        out = upscale(model, image, scale=args.scale, seed=args.seed, plan=plan, sampler=sampler, sigmas=sigmas,
                      color_match=args.color_match, progress=bar)
    finally:
        bar.close()
    _write_image(out, args.output)
    print(f"wrote {args.output} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 (the training precision) on CUDA cards that support it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _convert(args: argparse.Namespace) -> int:
    from .loader import convert_checkpoint

    if Path(args.output).suffix.lower() != ".safetensors":
        raise ValueError(f"the output must end in .safetensors, got {args.output}")
    model = convert_checkpoint(args.input, args.output, _DTYPES.get(args.dtype), clip=args.clip)
    c = model.config
    print(f"wrote {args.output}: Inf-DiT {c.hidden_size} wide, {c.num_layers} layers, "
          f"CLIP tower {'included' if model.clip is not None else 'absent'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", type=int, default=4, choices=(2, 4, 8, 16), help="upscaling factor (default 4)")
    common.add_argument("--block-batch", default="auto", help="auto, n (n x n blocks per forward) or n_h x n_w (2x3)")
    common.add_argument("--offload-cache", default="auto", choices=("auto", "on", "off"))
    common.add_argument("--vram", help="memory budget, e.g. 12GB (default: free device memory)")

    if "plan" not in subparsers.choices:
        plan = subparsers.add_parser("plan", parents=[common], help="memory plan of an upscale (no weights needed)")
        plan.add_argument("target", choices=("infdit",))
        where = plan.add_mutually_exclusive_group(required=True)
        where.add_argument("--size", type=_size, help="output size WxH, e.g. 4096x4096")
        where.add_argument("--input", type=_size, help="input size WxH")
        plan.add_argument("--model", help="plan for this checkpoint's config (default: the release)")
        plan.add_argument("--dtype", default="bf16", choices=tuple(_DTYPES))
        plan.add_argument("--json", action="store_true", help="print the plan as JSON")
        plan.set_defaults(func=_plan)

    up = subparsers.add_parser("upscale", parents=[common], help="upscale an image with Inf-DiT")
    up.add_argument("input")
    up.add_argument("output")
    up.add_argument("--model", required=True, help="Inf-DiT checkpoint (.pt release or converted .safetensors)")
    up.add_argument("--clip", help="separate open_clip ViT-L-14 file if the checkpoint has no CLIP tower")
    up.add_argument("--sampler", default="heun", choices=tuple(SAMPLERS),
                    help="heun = the reference (2 evaluations per step); the others take 1 per step")
    up.add_argument("--steps", type=int, default=20, help="steps of the Karras schedule (default 20 = reference)")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--dtype", default="auto", choices=("auto",) + tuple(_DTYPES))
    up.add_argument("--device", help="cuda, mps or cpu (default: cuda if available)")
    up.add_argument("--color-match", default="none", choices=("none", "wavelet"))
    up.set_defaults(func=_upscale)

    conv = subparsers.add_parser("convert-infdit", help="convert the released .pt to .safetensors (no pickle)")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--dtype", default="keep", choices=("keep",) + tuple(_DTYPES))
    conv.add_argument("--clip", help="separate open_clip ViT-L-14 file to include")
    conv.set_defaults(func=_convert)
