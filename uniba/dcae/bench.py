"""``python -m uniba bench dcae``: DC-AE tiled vs untiled decode, peak memory and time, side by side.

Every measurement runs in a fresh child process (so the peak RSS of one run does not hide the
next): the model is built from a fixed seed, a tiny warm-up decode runs, then the peak resident
memory above that baseline (weights, input and warm-up already counted out) and the wall time of
one decode are recorded. The output image itself is part of the peak; the "working" column
subtracts it (inside ComfyUI the output goes to the intermediate device, usually system RAM,
while the tiles run on the GPU).

1. A reduced-width DC-AE (every width / 4, same structure, 32 latent channels): untiled at 1024
   and 2048 px, tiled (1024-px tiles) at 1024, 2048 and 4096 px; tiled vs untiled at 2048 px.
2. The real f32c32 config: one 1024-px tile, from which the 4096-px tiled peak is projected.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MIB = 1024**2
GIB = 1024**3


def _configs() -> dict:
    from .dcae import DCAEConfig

    real = DCAEConfig.sana_f32c32()
    reduced = DCAEConfig(encoder_widths=tuple(w // 4 for w in real.encoder_widths),
                         decoder_widths=tuple(w // 4 for w in real.decoder_widths))
    return {"real": real, "reduced": reduced}


def _child(spec: dict) -> dict:
    import resource

    import psutil
    import torch

    from .dcae import DCAE

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = DCAE(_configs()[spec["config"]]).eval().requires_grad_(False)
    cells = spec["px"] // 32
    latent = torch.randn(1, 32, cells, cells, generator=torch.Generator().manual_seed(1))
    model.decode_full(latent[..., :2, :2])  # warm-up: kernels, allocator pools
    base = psutil.Process().memory_info().rss
    counts = {"done": 0, "total": 1}

    class _Enough(Exception):
        pass

    def progress(done: int, total: int | None = None, preview: object = None) -> None:
        counts.update(done=done, total=total or 1)
        if spec.get("max_tiles") and done >= spec["max_tiles"] and done < counts["total"]:
            raise _Enough

    start = time.perf_counter()
    try:
        image = model.decode(latent, tile_size=spec["tile"] or spec["px"], progress=progress)
    except _Enough:
        image = None
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if spec.get("save") and image is not None:
        torch.save(image, spec["save"])
    output = 3 * spec["px"] ** 2 * 4  # the fp32 output image (allocated at the first tile)
    # a capped run measures the peak over its first tiles and projects the time to all tiles
    projected = elapsed * counts["total"] / max(1, counts["done"])
    return {"time": projected, "measured_tiles": counts["done"], "tiles": counts["total"], "peak": peak,
            "output": output, "weights": sum(p.numel() * p.element_size() for p in model.parameters())}


def _measure(spec: dict) -> dict:
    code = ("import json, sys; from uniba.sana.bench_dcae import _child; "
            "print(json.dumps(_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {spec}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(name: str, px: int, tiles: str, r: dict) -> str:
    capped = f"  (peak over the first {r['measured_tiles']} tiles, time projected)" \
        if r["measured_tiles"] < r["tiles"] else ""
    return (f"{name:<9} {px:>5} {tiles:>6} {r['time']:>8.1f} {r['peak'] / MIB:>10.0f} {r['output'] / MIB:>8.0f} "
            f"{(r['peak'] - r['output']) / MIB:>9.0f}{capped}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench dcae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-real", action="store_true", help="skip the real f32c32 1024-px tile (the slowest part)")
    parser.add_argument("--max-tiles-4096", type=int, default=0, metavar="N",
                        help="stop the tiled 4096-px run after N of its 25 tiles: the peak is reached at the first "
                             "tile; the time is then projected (for busy machines; default: all tiles)")
    args = parser.parse_args(argv)

    import torch

    from .tiling import activation_bytes_per_pixel, overlap_for, tile_starts

    def n_tiles(px: int, tile_px: int) -> str:
        n = len(tile_starts(px // 32, tile_px // 32, overlap_for(tile_px // 32)))
        return f"{n}x{n}"

    real = _configs()["real"]
    print(f"DC-AE decode benchmark, fp32, {args.threads} threads; each row a fresh process; peak = max RSS above "
          "weights+input; working = peak - output image")
    print("1) reduced-width DC-AE (widths 32..256 = real / 4, same structure, 32 latent channels)")
    print(f"{'mode':<9} {'px':>5} {'tiles':>6} {'time s':>8} {'peak MiB':>10} {'out MiB':>8} {'work MiB':>9}")
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("untiled", 1024, 0), ("untiled", 2048, 0), ("tiled", 1024, 1024), ("tiled", 2048, 1024),
                ("tiled", 4096, 1024)]
        for mode, px, tile in plan:
            save = os.path.join(tmp, f"{mode}{px}.pt") if px == 2048 else None
            cap = args.max_tiles_4096 if px == 4096 else 0
            r = _measure({"config": "reduced", "px": px, "tile": tile, "threads": args.threads, "save": save,
                          "max_tiles": cap})
            results[(mode, px)] = r
            print(_row(mode, px, n_tiles(px, tile) if tile else "1", r), flush=True)
        untiled = torch.load(os.path.join(tmp, "untiled2048.pt"))
        tiled = torch.load(os.path.join(tmp, "tiled2048.pt"))
        diff = (tiled - untiled).abs()
    t2, t4, u2 = results[("tiled", 2048)], results[("tiled", 4096)], results[("untiled", 2048)]

    def work(r: dict) -> float:
        return r["peak"] - r["output"]

    flat = work(t4) / work(t2)
    print(f"   tiled 4096 / tiled 2048 working peak: {flat:.2f}  (flat within 15%: {'yes' if flat <= 1.15 else 'NO'}); "
          f"with the output image: {t4['peak'] / t2['peak']:.2f}")
    print(f"   tiled 2048 / untiled 2048 peak: {t2['peak'] / u2['peak']:.2f}  "
          f"(below untiled: {'yes' if t2['peak'] < u2['peak'] else 'NO'}); time {t2['time'] / u2['time']:.2f}x")
    print(f"   untiled 2048 / untiled 1024 peak: {u2['peak'] / results[('untiled', 1024)]['peak']:.2f} "
          "(activations grow with the area)")
    print(f"   max |tiled - untiled| at 2048 px: {diff.max():.4f} (mean {diff.mean():.5f}; image range "
          f"{untiled.abs().max():.2f}; random weights, global attention per tile)")
    if args.no_real:
        return 0
    print("2) real f32c32 (sana-1.0/1.1 shapes, 312 M parameters), one 1024-px tile", flush=True)
    r = _measure({"config": "real", "px": 1024, "tile": 0, "threads": args.threads})
    canvas = 3 * 4096**2 * 4
    projected = r["peak"] - r["output"] + canvas
    untiled_estimate = activation_bytes_per_pixel(real.decoder_widths, torch.float32) * 4096**2
    print(f"   1024-px tile: {r['time']:.1f} s, peak {r['peak'] / GIB:.2f} GiB above the weights "
          f"({r['weights'] / GIB:.2f} GiB)")
    print(f"   projected 4096-px tiled peak: {projected / GIB:.2f} GiB (one tile + the 4096-px output image; "
          f"under 4 GB: {'yes' if projected < 4 * 1000**3 else 'NO'})")
    extrapolated = (r["peak"] - r["output"]) * 16  # activations grow with the area (x4 per doubling)
    print(f"   untiled 4096 px: ~{extrapolated / GIB:.0f} GiB extrapolated from this run (x16 the 1024-px activations; "
          f"the planner's conservative estimate {untiled_estimate / GIB:.0f} GiB; sana.md: ~26 GB in bf16) = "
          f"{extrapolated / projected:.0f}x the tiled peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
