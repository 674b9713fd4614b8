"""``python -m uniba plan infdit | upscale | convert-infdit``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cli_io import memory_size, positive_int, seed_int
from ..devices import DTYPE_CHOICES, DTYPES, choose_dtype, torch_dtype_support
from ..progress import ProgressFn, TerminalProgress
from .sampling import FAST_PRESET, PRESETS, SAMPLERS, Sampling, named_sampler, resolve_sampling

if TYPE_CHECKING:  # annotations only: the model modules load when a command runs
    from .model import InfDiT
    from .plan import UpscalePlan


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 4096x4096 (width x height), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _plan(args: argparse.Namespace) -> int:
    if args.target is None:  # uniba.fit answers `plan --card N` before this is reached
        raise SystemExit("error: give a target (plan infdit --size 4096x4096) or a card size (plan --card 12)")
    if not (args.size or args.input):
        raise SystemExit("error: plan infdit needs --size WxH (output) or --input WxH")
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
    ranks = None
    if args.ranks > 1:
        from .ranks import plan_ranks

        ranks = plan_ranks(plan, config, args.ranks, dtype=DTYPES[args.dtype])
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"ranks": ranks.to_dict()} if ranks else {})}, indent=2))
    else:
        source = "release config" if not args.model else f"{args.model}: its own config"
        print(f"Inf-DiT plan ({source}, {args.dtype})")
        print(plan.describe())
        if ranks:
            print(ranks.describe())
        for note in notes:
            print(note)
    return 0 if plan.fits else 1


def _sampling(args: argparse.Namespace) -> Sampling:
    """The sampler and schedule the command asks for (a preset or --sampler/--steps), evaluations counted."""
    name, steps = PRESETS[args.preset] if args.preset else (args.sampler, args.steps)
    return resolve_sampling(named_sampler(name), None, steps)


def _upscale(args: argparse.Namespace) -> int:
    from ..jobs import is_many, launched_by_torchrun

    if is_many(args.input) or launched_by_torchrun():
        return _upscale_job(args)
    return _upscale_one_file(args)


def upscale_image(model: InfDiT, image: torch.Tensor, plan: UpscalePlan, args: argparse.Namespace,
                  progress: ProgressFn | None = None, group: Any = None) -> torch.Tensor:
    """The engine call for one input of the command. ``group``: the process group whose ranks share this one
    image (``Job.process_group()``; every rank of it calls this with the same image and plan), None: this rank
    upscales it alone."""
    from .upscale import upscale

    return upscale(model, image, plan, seed=args.seed, color_match=args.color_match, progress=progress, group=group)


def _upscale_one_file(args: argparse.Namespace) -> int:
    """One input file to one output file on one process: every error stops the command."""
    from ..cli_io import IMAGE_FORMATS, alpha_dropped, input_file, output_file, read_image, resolve_device, write_image
    from ..memory import device_free_bytes
    from .loader import load_infdit
    from .plan import config_for_file, plan_upscale
    from .upscale import NO_CLIP_TOWER

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
        out = upscale_image(model, image, plan, args, progress=bar)
    finally:
        bar.close()
    write_image(out, args.output, "the upscaled image", overwrite=args.overwrite)  # refuses NaN/inf; no-replace
    print(f"wrote {args.output} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def _job_items(args: argparse.Namespace, many: bool) -> list[list[str]]:
    """(input, output) pairs of the job, checked before any work: outputs in the output folder, named after
    the inputs with .png (several inputs), or the one output file."""
    from ..cli_io import IMAGE_FORMATS, CliError, output_file
    from ..jobs import expand_inputs, output_names

    if not many:
        output_file(args.output, inputs=[args.input, args.model, args.clip], overwrite=args.overwrite,
                    formats=IMAGE_FORMATS)
        return [[args.input, args.output]]
    inputs = expand_inputs(args.input, tuple(IMAGE_FORMATS), "input")
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"output {folder}: is a file, but several inputs need an output folder; give a folder "
                       "(it is created if missing).")
    folder.mkdir(parents=True, exist_ok=True)
    outputs = output_names(inputs, folder, ".png")
    output_file(outputs[0], overwrite=True, formats=IMAGE_FORMATS)  # the folder accepts new files
    return [[str(a), str(b)] for a, b in zip(inputs, outputs, strict=True)]


def _upscale_job(args: argparse.Namespace) -> int:
    """Several inputs (a folder, a glob, a frame pattern), on one process or on every rank of torchrun.

    Each rank loads the model once and takes inputs from the job's shared queue; outputs that exist are
    skipped (a rerun finishes what is missing), a failing input is reported at the end, rank 0 shows one
    progress display for the whole job.
    """
    from ..cli_io import alpha_dropped, input_file, read_image, resolve_device, write_image
    from ..jobs import Job, JobProgress, is_many
    from ..memory import device_free_bytes
    from ..wording import count
    from .loader import load_infdit
    from .plan import config_for_file, plan_upscale
    from .ranks import plan_ranks
    from .upscale import NO_CLIP_TOWER

    job = Job.start()
    many = is_many(args.input)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None and job.world_size > 1:
        device = torch.device("cuda", job.local_rank)  # one card per rank of this machine
    input_file(args.model, "--model")
    if args.clip:
        input_file(args.clip, "--clip")
    config = config_for_file(args.model)
    if config.clip is None and not args.clip:
        raise ValueError(f"--model {args.model}: {NO_CLIP_TOWER}")
    dtype = choose_dtype(args.dtype, device, torch_dtype_support(device))
    sampling = _sampling(args)
    plans: dict[tuple[int, int], UpscalePlan] = {}

    def plan_for(height: int, width: int) -> UpscalePlan:
        if (height, width) not in plans:
            plans[height, width] = plan_upscale(config, height, width, args.scale, free_bytes=budget,
                                                sampling=sampling, block_batch=args.block_batch,
                                                offload_cache=args.offload_cache, dtype=dtype)
        return plans[height, width]

    def pending_work() -> dict:
        items = _job_items(args, many)
        todo = [i for i, (_, dst) in enumerate(items) if args.overwrite or not Path(dst).exists()]
        units = 0
        for i in todo:  # image headers only: the progress total of the whole job
            size = _image_size(items[i][0])
            units += plan_for(*size).total_batches if size else 0
        return {"items": items, "todo": len(todo), "todo_indices": todo, "units": units}

    # every rank plans with rank 0's budget, so every rank (and a one-process run) makes the same plans
    budget = args.vram or job.share("budget", lambda: device_free_bytes(device))
    work = job.share("work", pending_work)
    items = work["items"]
    model = load_infdit(args.model, dtype, clip=args.clip).to(device)
    if model.clip is None:
        raise ValueError(f"--model {args.model}: {NO_CLIP_TOWER}")
    # one image across every rank (the wavefront of uniba.infdit.ranks): a single input under torchrun, or each
    # input with --split-image; otherwise each rank takes whole inputs from the queue
    split = job.world_size > 1 and (args.split_image or not many)
    group = job.process_group("nccl" if device.type == "cuda" else "gloo") if split else None
    display = TerminalProgress(work["units"], unit="batch") if job.is_main else None
    progress = JobProgress(job, work["units"], work["todo"], display)
    progress.draw()
    shown: set[tuple[int, int]] = set()
    order = iter(range(len(items)))  # split: every rank walks the inputs in the same order
    while (index := (next(order, len(items)) if split else job.take())) < len(items):
        source, target = items[index]
        if split and index not in work["todo_indices"] or not split and Path(target).exists() and not args.overwrite:
            continue  # complete (outputs appear only by rename): a rerun skips it
        done = [0, 0]  # block batches reported by the engine for this input, and its planned total

        def tick(d: int, total: int | None = None, preview=None, done=done) -> None:
            progress.unit(d - done[0])
            done[0] = d

        try:
            image = read_image(source)
            alpha_dropped(image.shape[1], target)
            plan = plan_for(image.shape[-2], image.shape[-1])
            plan.check_fits()
            done[1] = plan.total_batches
            if split:
                ranks_plan = plan_ranks(plan, config, job.world_size, dtype=dtype)
                done[1] = ranks_plan.batches(job.rank, plan)  # this rank's share of the image
                if job.is_main and image.shape[-2:] not in shown:
                    shown.add(image.shape[-2:])
                    print(ranks_plan.describe(), file=sys.stderr)
            out = upscale_image(model, image, plan, args, progress=tick, group=group)
            if job.is_main or not split:
                # published without replacing: a file that appeared under this name meanwhile is kept (a failure)
                write_image(out, target, f"the upscaled {source}", overwrite=args.overwrite)
                job.add(f"written/{job.rank}", 1)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one failing input is reported at the end, the others go on
            if not many:
                raise
            if job.is_main or not split:  # a split input fails on every rank alike: report it once
                job.fail(str(exc) if source in str(exc) else f"{source}: {exc}")
        if split and not job.is_main:  # one image split across the ranks counts once, on rank 0
            progress.unit(max(0, done[1] - done[0]))
            progress.publish()
        else:
            progress.input_done(units_left=max(0, done[1] - done[0]))
    failures = job.finish(idle=progress.draw if job.is_main else None)
    if display is not None:
        display.close()
    if job.is_main:
        skipped = len(items) - work["todo"]
        per_rank = [job.add(f"written/{rank}", 0) for rank in range(job.world_size)]
        print(f"upscaled {count(sum(per_rank), 'image')} into {args.output}"
              + (f", skipped {count(skipped, 'existing output')}" if skipped else "")
              + (f", each split across {count(job.world_size, 'process')}" if split
                 else f" on {count(job.world_size, 'process')} ({', '.join(map(str, per_rank))} each)"
                 if job.world_size > 1 else ""))
        for failure in failures:
            print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _image_size(path: str) -> tuple[int, int] | None:
    """(height, width) from an image file's header, None if it cannot be read (its run reports why)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - a broken input is reported when its turn comes
        return None


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
        plan = subparsers.add_parser(
            "plan", parents=[common], help="memory plan of an upscale, or what fits on a card (no weights needed)",
            description="python -m uniba plan infdit --size 4096x4096 [--vram 12GB]: the plan of one upscale; "
                        "python -m uniba plan --card 12: what fits on a 12 GB card, per model (= python -m uniba fit)")
        plan.add_argument("target", nargs="?", choices=("infdit",))
        where = plan.add_mutually_exclusive_group()
        where.add_argument("--size", type=_size, help="output size WxH, e.g. 4096x4096")
        where.add_argument("--input", type=_size, help="input size WxH")
        plan.add_argument("--model", help="plan for this checkpoint's config (default: the release)")
        plan.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
        plan.add_argument("--json", action="store_true", help="print the plan as JSON")
        plan.add_argument("--ranks", type=positive_int, default=1,
                          help="also split one image across this many processes (torchrun): per-rank memory, "
                               "bytes sent per evaluation, expected speed-up")
        plan.set_defaults(func=_plan)

    up = subparsers.add_parser("upscale", parents=[common], help="upscale an image with Inf-DiT")
    up.add_argument("input", help="an image, or several: a folder, a glob ('renders/*.png') or a frame pattern "
                                   "('frames/f_%%04d.png', 'frames/f_####.png')")
    up.add_argument("output", help="the output image, or for several inputs the output folder (<name>.png each)")
    up.add_argument("--model", required=True, help="Inf-DiT checkpoint (.pt release or converted .safetensors)")
    up.add_argument("--clip", help="separate open_clip ViT-L-14 file if the checkpoint has no CLIP tower")
    up.add_argument("--seed", type=seed_int, default=0)
    up.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    up.add_argument("--device", help="cuda, mps or cpu (default: cuda if available)")
    up.add_argument("--color-match", default="none", choices=("none", "wavelet"))
    up.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    up.add_argument("--split-image", action="store_true",
                    help="under torchrun: split each input across all ranks (a single input always is), "
                         "the same image as one process, sooner")
    up.set_defaults(func=_upscale)

    conv = subparsers.add_parser("convert-infdit", help="convert the released .pt to .safetensors (no pickle)")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--dtype", default="keep", choices=("keep", *DTYPES))
    conv.add_argument("--clip", help="separate open_clip ViT-L-14 file to include")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    conv.set_defaults(func=_convert)
