"""``python -m uniba bench infdit``: block-wise (UniBA) vs whole-canvas inference, memory and time.

A mid-size random Inf-DiT (same architecture, smaller widths) upsamples three output sizes, each
side twice the previous one. Every measurement runs in a fresh subprocess (so one run cannot
inflate another's peak) and does one sampler step (one model call plus the sampler's canvases).

How memory is measured on the CPU: the child process resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` = 5, Linux) after the weights and inputs exist, runs the work, and reads
``VmHWM`` minus the resident size before the work. glibc is told to serve every allocation above
64 KiB with its own mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the kernel and
the counter sees the real simultaneous footprint of the tensors, not allocator caching. On CUDA the
same figure would be ``torch.cuda.max_memory_allocated``; this benchmark measures the CPU path.

What is measured is one denoiser call (the unit that block-wise inference changes), given the noisy
canvas and the upsampled LR; the sampler's own canvases (x, denoised, derivatives: a few float32
values per pixel, identical for both modes) are excluded, as are the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from ..memory import format_bytes

BENCH_CONFIG = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "mlp_hidden": 512, "block_tokens": 16,
                "lr_block_tokens": 8, "vector_dim": 64, "time_channels": 64, "rope_grid": 512}
DEFAULT_SIDES = (256, 512, 1024)


def _config():
    from .config import InfDiTConfig

    return InfDiTConfig(**BENCH_CONFIG)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(side: int, mode: str, block_batch: int, threads: int) -> dict:
    """Runs in the subprocess: one denoiser call, returns peak bytes above the resident baseline and seconds."""
    from .model import InfDiT, upsample_lr

    torch.set_num_threads(threads)
    config = _config()
    gen = torch.Generator().manual_seed(0)
    model = InfDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
    lr = torch.rand(1, 3, side // 4, side // 4, generator=gen) * 2 - 1
    noise = torch.randn(1, 3, side, side, generator=gen)
    emb = torch.nn.functional.normalize(torch.randn(1, config.vector_dim, generator=gen), dim=-1)
    x = upsample_lr(lr, side, side) + 5.0 * noise
    concat = upsample_lr(lr, side, side)
    # warm up kernels on a small canvas so one-off allocations are not counted
    s = config.block_px
    model.denoise(x[..., :s, :s], 5.0, lr[..., : s // 4, : s // 4], emb, concat_lr=concat[..., :s, :s])
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    n = None if mode == "whole" else block_batch
    model.denoise(x, 5.0, lr, emb, block_batch=n, concat_lr=concat)
    seconds = time.perf_counter() - start
    return {"peak": _status("VmHWM") - before, "seconds": seconds}


def _measure(side: int, mode: str, block_batch: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-c",
           "import json,sys; from uniba.infdit.bench import _child; "
           f"print(json.dumps(_child({side}, {mode!r}, {block_batch}, {threads})))"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _estimate(side: int, block_batch: int | None) -> int:
    from .plan import denoiser_call_bytes

    config = _config()
    grid = side // config.block_px
    n = grid if block_batch is None else min(block_batch, grid)
    return denoiser_call_bytes(config, (grid, grid), (n, n), "row-major", False, torch.float32)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench infdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs=3, default=DEFAULT_SIDES, help="three output sides in px")
    parser.add_argument("--block-batch", type=int, default=2, help="n for the block-wise runs (n x n blocks)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU more threads only add contention)")
    parser.add_argument("--repeats", type=int, default=1, help="time each measurement this many times (best of)")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        print("this benchmark measures peak RSS through /proc (Linux only)", file=sys.stderr)
        return 2
    config = _config()
    print(f"Inf-DiT bench: random config hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.block_px}-px blocks, fp32 on CPU, {args.threads} threads, one denoiser call per run; "
          f"block-wise n={args.block_batch}")
    rows = []
    for side in args.sides:
        result = {"side": side}
        for mode in ("whole", "blockwise"):
            runs = [_measure(side, mode, args.block_batch, args.threads) for _ in range(args.repeats)]
            result[mode] = {"peak": max(r["peak"] for r in runs), "seconds": min(r["seconds"] for r in runs)}
            result[mode]["estimate"] = _estimate(side, None if mode == "whole" else args.block_batch)
        rows.append(result)
    header = (f"{'output':>10} | {'whole peak':>11} {'block peak':>11} {'block/whole':>11} | "
              f"{'whole s':>8} {'block s':>8} {'time ratio':>10} | {'est/meas whole':>14} {'est/meas block':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        w, b = r["whole"], r["blockwise"]
        print(f"{r['side']:>5}x{r['side']:<4} | {format_bytes(w['peak']):>11} {format_bytes(b['peak']):>11} "
              f"{b['peak'] / w['peak']:>11.2f} | {w['seconds']:>8.2f} {b['seconds']:>8.2f} "
              f"{b['seconds'] / w['seconds']:>10.2f} | {w['estimate'] / w['peak']:>14.2f} "
              f"{b['estimate'] / b['peak']:>14.2f}")
    first, last = rows[0], rows[-1]
    growth = last["side"] / first["side"]
    print(f"side x{growth:g}: whole-canvas peak x{last['whole']['peak'] / first['whole']['peak']:.1f}, "
          f"block-wise peak x{last['blockwise']['peak'] / first['blockwise']['peak']:.1f} "
          f"(target <= x{growth + 1:g}); block-wise time / whole-canvas time at the largest size "
          f"{last['blockwise']['seconds'] / last['whole']['seconds']:.2f} (target <= 1.3)")
    return 0
