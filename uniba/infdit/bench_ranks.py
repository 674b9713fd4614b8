"""``python -m uniba bench infdit-ranks``: one image on 1 process vs split across 2 (gloo), side by side.

Measured here: the mid-size random Inf-DiT of ``bench infdit`` samples one image on one process and
across two processes (the wavefront of :mod:`uniba.infdit.ranks`, gloo over loopback), interleaved
and best of ``--repeats``; printed: both times and their ratio, the largest difference between the
two images, the bytes one block's K/V takes (one message), the bytes moved per evaluation, and the
per-block cost (seconds per block and evaluation on one process).

Projected (``--project``, the default): the release model at 4096, 8192 and 16384 px on 2, 4 and 8
GPUs over NVLink, PCIe and 100 GbE, from the release's K/V bytes per boundary block and a per-block
cost on the GPU (its FLOPs at ``--gpu-tflops`` sustained; the CPU cost measured here is printed
beside it so the FLOP model can be checked). A rank's batch row of ``w`` blocks (its band's width)
takes ``w t_block`` and hands one block per row to its neighbour, ``B / bandwidth``; the two overlap,
so a row costs ``max(w t_block, B / bandwidth)`` and communication dominates once a band is narrower
than ``B / (bandwidth t_block)`` blocks.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..memory import format_bytes
from .bench import bench_config, mid_problem
from .config import release_config
from .model import upsample_lr
from .plan import block_cache_bytes, plan_upscale
from .ranks import gather_bands, plan_ranks, sample_band
from .sampling import SAMPLERS, get_sigmas_karras, resolve_sampling
from .upscale import sample_canvas

LINKS = {"NVLink": 200e9, "PCIe 4.0 x16": 25e9, "100 GbE": 11e9}  # sustained bytes/s one way, per link
SIDES = (4096, 8192, 16384)
RANKS = (2, 4, 8)


def block_flops(config) -> float:
    """Multiply-adds x 2 of one block for one evaluation: projections, MLP and 4-block attention per layer."""
    c = config.hidden_size
    per_token = 12 * c * c + 2 * 4 * config.tokens_per_block * c  # qkv+proj+MLP, then QK^T and AV over 4 blocks
    return 2.0 * per_token * config.tokens_per_block * config.num_layers


def _worker(rank: int, world: int, port: int, side: int, steps: int, block_batch: int, out: str) -> None:
    """One process of a measurement: the image sampled alone (world 1) or this rank's band of it."""
    torch.set_num_threads(1)
    _, model, lr, emb, noise = mid_problem(side)
    config = model.config
    sampling = resolve_sampling(SAMPLERS["euler"], get_sigmas_karras(steps))
    plan = plan_upscale(config, side // 4, side // 4, 4, None, sampling=sampling, block_batch=block_batch,
                        dtype=model.dtype)
    concat = upsample_lr(lr, side, side)
    stats: dict = {}
    if world == 1:
        start = time.perf_counter()
        image = sample_canvas(model, lr, concat_lr=concat, clip_embedding=emb, noise=noise, sampler=sampling.sampler,
                              sigmas=sampling.sigmas, block_batch=block_batch, keep_lr_maps=plan.last.keep_lr_maps)
        seconds = time.perf_counter() - start
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        split = plan_ranks(plan, config, world, dtype=model.dtype).passes[0]
        dist.barrier()
        start = time.perf_counter()
        band = sample_band(model, lr, concat_lr=concat, clip_embedding=emb, noise=noise, sampler=sampling.sampler,
                           sigmas=sampling.sigmas, seed=0, bands=list(split.bands), axis=split.axis,
                           block_batch=block_batch, keep_lr_maps=plan.last.keep_lr_maps, stats=stats)
        image = gather_bands(band, list(split.bands), config.block_px, (side, side), 1)
        seconds = time.perf_counter() - start
        sent = torch.tensor([stats.get("bytes_sent", 0)], dtype=torch.int64)
        dist.all_reduce(sent)
        stats["bytes_sent"] = int(sent.item())
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"image": image, "seconds": seconds, "bytes_sent": stats.get("bytes_sent", 0),
                    "blocks": plan.last.grid_rows * plan.last.grid_cols, "evaluations": plan.evaluations}, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(world: int, side: int, steps: int, block_batch: int, tmp: Path) -> dict:
    out = tmp / f"run{world}.pt"
    port = _free_port()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", "from uniba.infdit.bench_ranks import _worker; "
                               f"_worker({rank}, {world}, {port}, {side}, {steps}, {block_batch}, {str(out)!r})"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    finished = [p.communicate() for p in procs]
    errors = [err for p, (_, err) in zip(procs, finished, strict=True) if p.returncode]
    if errors:
        raise RuntimeError("a benchmark process failed:\n" + errors[0][-2000:])
    return torch.load(out, weights_only=True)


def _project(gpu_tflops: float, measured_block_seconds: float | None, cpu_block_flops: float | None) -> None:
    config = release_config()
    per_block = block_cache_bytes(config, torch.bfloat16)
    t_block = block_flops(config) / (gpu_tflops * 1e12)
    evaluations = 39
    print(f"\nprojection: release Inf-DiT in bf16, Heun 20 ({evaluations} evaluations), 128-px blocks; one block's "
          f"K/V of every layer = {format_bytes(per_block)} per boundary block; {block_flops(config) / 1e12:.2f} TFLOP "
          f"per block and evaluation at {gpu_tflops:g} TFLOP/s sustained = {t_block * 1e3:.1f} ms per block")
    if measured_block_seconds and cpu_block_flops:
        print(f"  (this CPU measured {measured_block_seconds * 1e3:.1f} ms per block of the benchmark model = "
              f"{cpu_block_flops / measured_block_seconds / 1e9:.1f} GFLOP/s by the same FLOP count)")
    header = f"{'output':>11} {'GPUs':>4} {'band':>5} {'sent/eval':>10} {'rank peak':>10} |" + "".join(
        f" {name:>22}" for name in LINKS)
    print(header)
    print("-" * len(header))
    for side in SIDES:
        grid = side // config.block_px
        one = evaluations * grid * grid * t_block
        for ranks in RANKS:
            width = grid / ranks
            plan = plan_upscale(config, side // 4, side // 4, 4, 16 * 2**30, dtype=torch.bfloat16)
            split = plan_ranks(plan, config, ranks, dtype=torch.bfloat16).passes[0]
            cells = []
            for bandwidth in LINKS.values():
                transfer = per_block / bandwidth
                row = max(width * t_block, transfer)
                span = evaluations * grid * row + (ranks - 1) * (width * t_block + transfer)
                bound = " comm" if transfer > width * t_block else ""
                cells.append(f"{one / 60:5.1f}->{span / 60:5.1f} min x{one / span:4.2f}{bound:>5}")
            print(f"{side:>5}x{side:<5} {ranks:>4} {width:>5.1f} {format_bytes(sum(split.boundary_bytes)):>10} "
                  f"{format_bytes(max(split.peak_bytes)):>10} |" + "".join(f" {c:>22}" for c in cells))
    limit = {name: per_block / (bw * t_block) for name, bw in LINKS.items()}
    print("communication dominates when a band is narrower than "
          + ", ".join(f"{v:.2f} blocks over {k}" for k, v in limit.items())
          + " (one block's K/V per row takes longer to send than the band's row takes to compute)")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench infdit-ranks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=512, help="output side of the measured image (px)")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps (evaluations) of the measured sampling")
    parser.add_argument("--block-batch", type=int, default=1, help="n x n blocks per batch")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved measurements per setting (best of)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="sustained bf16 TFLOP/s of one GPU for the projection (default 100: A100/4090 class)")
    parser.add_argument("--no-project", action="store_true", help="measure only")
    args = parser.parse_args(argv)
    config = bench_config()
    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, args.repeats)):  # interleaved: the machine's load drifts during a run
            for world in (1, 2):
                r = _measure(world, args.side, args.steps, args.block_batch, Path(tmp))
                if world not in runs or r["seconds"] < runs[world]["seconds"]:
                    runs[world] = r
    one, two = runs[1], runs[2]
    diff = (one["image"] - two["image"]).abs().max().item()
    blocks, evaluations = one["blocks"], one["evaluations"]
    per_block = block_cache_bytes(config, torch.float32)
    per_eval = two["bytes_sent"] / evaluations
    print(f"Inf-DiT across ranks: random config hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.block_px}-px blocks, fp32 on CPU, 1 thread per process, gloo over loopback; "
          f"{args.side}x{args.side} px = {blocks} blocks, Euler {args.steps} steps ({evaluations} evaluations), "
          f"block batch {args.block_batch}, best of {max(1, args.repeats)}")
    print(f"{'processes':>9} {'seconds':>8} {'time ratio':>10} {'sent/eval':>10} {'sent/block':>10} {'max diff':>9}")
    print(f"{1:>9} {one['seconds']:>8.2f} {1.0:>9.2f}x {'-':>10} {'-':>10} {'-':>9}")
    print(f"{2:>9} {two['seconds']:>8.2f} {one['seconds'] / two['seconds']:>9.2f}x {format_bytes(per_eval):>10} "
          f"{format_bytes(per_eval / blocks):>10} {diff:>9.1e}")
    print(f"one block's K/V of every layer (one message): {format_bytes(per_block)}; boundary blocks per "
          f"evaluation: {per_eval / per_block:.0f} of {blocks}; one process: "
          f"{one['seconds'] / (blocks * evaluations) * 1e3:.1f} ms "
          f"per block and evaluation; cores on this machine: {os.cpu_count()}")
    if not args.no_project:
        block_seconds = one["seconds"] / (blocks * evaluations)
        _project(args.gpu_tflops, block_seconds, block_flops(config))
    return 0 if diff <= 1e-5 else 1


__all__ = ["run", "block_flops", "LINKS"]
