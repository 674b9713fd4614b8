"""``python -m uniba bench dcae``: one-pass vs exact-tiled DC-AE decode, side by side, and the 4096/8192 px plan.

The real f32c32 decoder (sana-1.0/1.1 shapes, 159 M parameters) with random weights from a fixed
seed. Every measurement runs in a fresh child process (so one run's peak does not hide the next):
the decoder is built, a tiny warm-up decode runs, then the peak resident memory above that baseline
(weights and input already counted out) and the wall time of one decode are recorded. Each size is
decoded in one pass and exact-tiled; the rows show time and peak ratios and the max |tiled - one
pass|, which must stay <= 1e-5 (fp32). The tiled peak = the whole low-resolution activations + one
tile + the output image, from which the 4096 and 8192 px peaks are projected next to the planner's
own estimates.

A one-pass decode whose planner estimate exceeds the free RAM is skipped (a 2048 px one needs
~10 GiB in fp32), so the benchmark never pushes a shared machine into swapping.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import psutil
import torch
from torch import nn

from .blocks import RMSNorm2d
from .config import DCAEConfig
from .model import DCAE
from .tiling import decoder_steps, plan_pass

MIB = 1024**2
GIB = 1024**3


def random_real_decoder(seed: int = 0, dtype: torch.dtype = torch.float32, width_divisor: int = 1):
    """The released decoder's shapes (``width_divisor`` > 1 narrows every stage) with seeded random weights.

    Only the decoder is materialised (the encoder stays on the meta device): half the memory and time.
    """
    config = DCAEConfig.sana_f32c32()
    if width_divisor > 1:
        config = DCAEConfig(encoder_widths=tuple(w // width_divisor for w in config.encoder_widths),
                            decoder_widths=tuple(w // width_divisor for w in config.decoder_widths))
    with torch.device("meta"):
        model = DCAE(config)
    model.decoder.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                bound = fan_in ** -0.5  # the default init's range: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, RMSNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    model.decoder.to(dtype)
    return model.eval().requires_grad_(False)


def _child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = random_real_decoder(0, dtype, spec.get("width_divisor", 1))
    cells = spec["px"] // 32
    latent = torch.randn(1, 32, cells, cells, generator=torch.Generator().manual_seed(1))
    model.decode_full(latent[..., :2, :2])  # warm-up: kernels, allocator pools
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if spec["tile"]:
        image = model.decode(latent, tile_size=spec["tile"])
    else:
        image = model.decode_full(latent).float()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if spec.get("save"):
        torch.save(image, spec["save"])
    weights = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    return {"time": elapsed, "peak": peak, "weights": weights, "range": image.abs().max().item()}


def _measure(spec: dict) -> dict:
    code = ("import json, sys; from uniba.dcae.bench import _child; "
            "print(json.dumps(_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {spec}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plan(px: int, dtype: torch.dtype, tile: int | None = None, width_divisor: int = 1):
    real = DCAEConfig.sana_f32c32()
    config = DCAEConfig(encoder_widths=tuple(w // width_divisor for w in real.encoder_widths),
                        decoder_widths=tuple(w // width_divisor for w in real.decoder_widths))
    with torch.device("meta"):
        model = DCAE(config)
    return plan_pass(decoder_steps(model), (1, 32, px // 32, px // 32), dtype, tile_size=tile)


def _edges(text: str) -> list[int]:
    """``--sizes``: comma-separated output edges in pixels, each a multiple of 32 (one latent cell)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isascii() and p.isdigit() and int(p) > 0 and int(p) % 32 == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated edges in px, multiples of 32 (e.g. 1024,2048), "
                                         f"got {text!r}")
    return [int(p) for p in parts]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench dcae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--sizes", type=_edges, default=[1024, 2048], help="output edges in px (default 1024,2048)")
    parser.add_argument("--tile", type=int, default=512, help="tile edge of the tiled decodes in px (default 512)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--one-pass-max-gib", type=float, default=6.0,
                        help="skip one-pass decodes planned above this many GiB (a 2048 px fp32 one: ~14 GiB)")
    parser.add_argument("--width-divisor", type=int, default=1,
                        help="narrow every stage by this factor (4: a quick run; 1: the real decoder)")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    sizes = args.sizes
    label = "real f32c32" if args.width_divisor == 1 else f"f32c32 with widths / {args.width_divisor}"
    print(f"DC-AE decode, {label} decoder, random weights, {args.dtype}, {args.threads} threads, tiles of "
          f"{args.tile} px; each row a fresh process; peak = max RSS above weights + input")
    print(f"{'px':>5} {'mode':<12} {'time s':>8} {'peak MiB':>9} {'planned MiB':>11}")
    tile_working = None
    with tempfile.TemporaryDirectory() as tmp:
        for px in sizes:
            rows = {}
            for mode, tile in (("one pass", 0), ("exact tiled", args.tile)):
                plan = _plan(px, dtype, tile or 1 << 30, args.width_divisor)
                planned = plan.estimated_peak_bytes + plan.output_bytes
                limit = min(args.one_pass_max_gib * GIB, 0.8 * psutil.virtual_memory().available)
                if not tile and planned > limit:
                    print(f"{px:>5} {mode:<12} skipped: planned {planned / GIB:.1f} GiB > {limit / GIB:.1f} GiB "
                          "(--one-pass-max-gib, free RAM)", flush=True)
                    continue
                save = os.path.join(tmp, f"{px}_{tile}.pt")
                r = _measure({"px": px, "tile": tile, "threads": args.threads, "dtype": args.dtype, "save": save,
                              "width_divisor": args.width_divisor})
                rows[mode] = (r, save)
                print(f"{px:>5} {mode:<12} {r['time']:>8.1f} {r['peak'] / MIB:>9.0f} {planned / MIB:>11.0f}",
                      flush=True)
                if tile:
                    tiled_plan = _plan(px, dtype, tile, args.width_divisor)
                    tile_working = r["peak"] - tiled_plan.stored_bytes - tiled_plan.output_bytes
                    print(f"      one {tile}-px tile measured at {tile_working / MIB:.0f} MiB working memory "
                          f"(planned {tiled_plan.working_bytes / MIB:.0f} MiB)", flush=True)
            if len(rows) == 2:
                (one, one_path), (tiled, tiled_path) = rows["one pass"], rows["exact tiled"]
                ref, got = torch.load(one_path), torch.load(tiled_path)
                diff = (got - ref).abs().max().item()
                verdict = "ok" if diff <= 1e-5 or dtype != torch.float32 else "TOO LARGE"
                print(f"      tiled / one pass: time {tiled['time'] / one['time']:.2f}x, peak "
                      f"{tiled['peak'] / one['peak']:.2f}x; max |tiled - one pass| {diff:.2e} ({verdict}; image "
                      f"range {ref.abs().max():.2f})", flush=True)
    if args.width_divisor != 1:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    print("Plan of larger decodes (no budget given: 768 px tiles), weights not included "
          f"(decoder {159.2e6 * size / GIB:.2f} GiB in {args.dtype}):")
    for px in (4096, 8192):
        for dt in (torch.bfloat16, torch.float32):
            plan = _plan(px, dt)
            print(f"  {px} px {str(dt).replace('torch.', ''):<9} planned {plan.estimated_peak_bytes / GIB:.2f} GiB "
                  f"(whole 1/8-resolution activations {plan.stored_bytes / GIB:.2f} + one tile "
                  f"{plan.working_bytes / GIB:.2f}) + the fp32 image {plan.output_bytes / GIB:.2f} GiB")
    if tile_working is not None:
        for px in (4096, 8192):
            plan = _plan(px, dtype, args.tile)
            projected = tile_working + plan.stored_bytes + plan.output_bytes
            planned = plan.estimated_peak_bytes + plan.output_bytes
            print(f"  projected from the measured {args.tile}-px tile: {px} px {args.dtype} {projected / GIB:.2f} GiB "
                  f"with {args.tile}-px tiles (planned {planned / GIB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
