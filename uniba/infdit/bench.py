"""``python -m uniba bench infdit``: block-wise (UniBA) vs whole-canvas memory and time; presets; bf16.

Three parts (``--only`` picks one): **memory** (below), **presets** (the default = the reference's
Heun 20, the fast preset and Heun 10, timed side by side in one process on the mid-size config, with
their distance to a 200-step solution) and **precision** (with ``--golden FILE``: a tiny model's
20-step sample in bf16 and fp32 against the reference's float64 result stored beside its weights).

The models are built here from :data:`BENCH_CONFIG` with seeded random weights, or read from the file
given; ``bench infdit-solvers`` uses the same problems.

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
from safetensors.torch import load_file

from ..memory import format_bytes
from .blockwise import ROW_MAJOR, denoise
from .config import InfDiTConfig
from .loader import load_infdit
from .model import InfDiT, upsample_lr
from .plan import denoiser_call_bytes
from .sampling import FAST_PRESET, REFERENCE_PRESET, SAMPLERS, count_evaluations, get_sigmas_karras
from .upscale import sample_canvas

BENCH_CONFIG = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "mlp_hidden": 512, "block_tokens": 16,
                "lr_block_tokens": 8, "vector_dim": 64, "time_channels": 64, "rope_grid": 512}
DEFAULT_SIDES = (256, 512, 1024)
REFERENCE_STEPS = 200
# Reference tensors stored beside the weights in a --golden file (the parity fixture's layout).
GOLDEN_PREFIX = "golden."

# (label, model, LR image, CLIP vector, start noise): one sampling problem of the solver comparisons
Problem = tuple[str, InfDiT, torch.Tensor, torch.Tensor, torch.Tensor]


def bench_config() -> InfDiTConfig:
    """The mid-size config the benchmarks build: the release's architecture with smaller widths."""
    return InfDiTConfig(**BENCH_CONFIG)


def random_model(config: InfDiTConfig, gen: torch.Generator) -> InfDiT:
    """The benchmarks' random Inf-DiT: weights scaled by fan-in so activations stay O(1) through the layers."""
    model = InfDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
    return model


def mid_problem(side: int) -> Problem:
    """The mid-size random model with a seeded LR image, CLIP vector and noise for a ``side`` px output."""
    config = bench_config()
    gen = torch.Generator().manual_seed(0)
    model = random_model(config, gen)
    lr = torch.rand(1, 3, side // config.native_scale, side // config.native_scale, generator=gen) * 2 - 1
    vector = torch.nn.functional.normalize(torch.randn(1, config.vector_dim, generator=gen), dim=-1)
    noise = torch.randn(1, 3, side, side, generator=gen)
    return f"mid-size random ({side}x{side} px)", model, lr, vector, noise


def read_golden(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[InfDiT, dict[str, torch.Tensor]]:
    """A ``--golden`` file: Inf-DiT weights plus reference tensors under ``golden.`` (lr_image, vector, noise,
    sample_out_fp64), as the parity tests' ``tests/data/infdit_tiny_a.safetensors`` holds them."""
    tensors = load_file(os.fspath(path))
    golden = {k[len(GOLDEN_PREFIX):]: v for k, v in tensors.items() if k.startswith(GOLDEN_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(GOLDEN_PREFIX)}
    missing = {"lr_image", "vector", "noise", "sample_out_fp64"} - set(golden)
    if missing:
        raise ValueError(f"--golden {path}: has no {', '.join(sorted(GOLDEN_PREFIX + m for m in missing))} "
                         "tensors; pass a file with reference tensors beside the weights, such as "
                         "tests/data/infdit_tiny_a.safetensors of a source checkout.")
    return load_infdit(weights, dtype), golden


def golden_problem(path: str | os.PathLike) -> Problem:
    model, golden = read_golden(path)
    return "golden tiny", model, golden["lr_image"], golden["vector"], golden["noise"]


def solve(problem: Problem, name: str, steps: int) -> torch.Tensor:
    """The problem's sample with sampler ``name`` on the reference's Karras schedule of ``steps`` steps."""
    _, model, lr, vector, noise = problem
    return sample_canvas(model, lr, clip_embedding=vector, noise=noise, sampler=SAMPLERS[name],
                         sigmas=get_sigmas_karras(steps), seed=0)


def measure(problems: list[Problem], candidates: list[tuple[str, int]]) -> list[dict]:
    """Rows of (model, sampler, steps, evaluations, rel_l2, max_abs, seconds) for every problem x candidate,
    against a :data:`REFERENCE_STEPS`-step Heun solution from the same noise."""
    rows = []
    for problem in problems:
        reference = solve(problem, "heun", REFERENCE_STEPS).double()
        for name, steps in candidates:
            start = time.perf_counter()
            out = solve(problem, name, steps).double()
            rows.append({"model": problem[0], "sampler": name, "steps": steps,
                         "evaluations": count_evaluations(SAMPLERS[name], get_sigmas_karras(steps)),
                         "rel_l2": ((out - reference).norm() / reference.norm()).item(),
                         "max_abs": (out - reference).abs().max().item(), "seconds": time.perf_counter() - start})
    return rows


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(side: int, mode: str, block_batch: int, threads: int) -> dict:
    """Runs in the subprocess: one denoiser call, returns peak bytes above the resident baseline and seconds."""
    torch.set_num_threads(threads)
    _, model, lr, emb, noise = mid_problem(side)
    config = model.config
    x = upsample_lr(lr, side, side) + 5.0 * noise
    concat = upsample_lr(lr, side, side)
    # warm up kernels on a small canvas so one-off allocations are not counted
    s = config.block_px
    denoise(model, x[..., :s, :s], 5.0, lr[..., : s // 4, : s // 4], emb, concat_lr=concat[..., :s, :s])
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    n = None if mode == "whole" else block_batch
    denoise(model, x, 5.0, lr, emb, block_batch=n, concat_lr=concat)
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
    config = bench_config()
    grid = side // config.block_px
    n = grid if block_batch is None else min(block_batch, grid)
    return denoiser_call_bytes(config, (grid, grid), (n, n), ROW_MAJOR, False, torch.float32)


def _presets(side: int, accuracy_side: int, block_batch: int, repeats: int) -> None:
    """Default (Heun 20) vs fast preset vs Heun 10: seconds side by side, evaluations, accuracy."""
    presets = [("default (reference)", REFERENCE_PRESET), ("fast preset", FAST_PRESET), ("Heun 10", ("heun", 10))]
    accuracy = {(r["sampler"], r["steps"]): r for r in measure([mid_problem(accuracy_side)],
                                                               [key for _, key in presets])}
    _, model, lr, vector, noise = mid_problem(side)
    seconds = {key: float("inf") for _, key in presets}
    for _ in range(repeats):  # interleaved, best of: the machine's load drifts during a run
        for _, key in presets:
            start = time.perf_counter()
            sample_canvas(model, lr, clip_embedding=vector, noise=noise, sampler=SAMPLERS[key[0]],
                          sigmas=get_sigmas_karras(key[1]), block_batch=block_batch)
            seconds[key] = min(seconds[key], time.perf_counter() - start)
    base_key = REFERENCE_PRESET
    base_evals = count_evaluations(SAMPLERS[base_key[0]], get_sigmas_karras(base_key[1]))
    print(f"\npresets on the mid-size config: {side}x{side} px, block batch {block_batch}, best of {repeats}; "
          f"accuracy vs a 200-step Heun solution at {accuracy_side}x{accuracy_side} px (random weights: a proxy)")
    header = (f"{'preset':<20} {'sampler':<9} {'steps':>5} {'evals':>5} {'seconds':>8} {'time ratio':>10} "
              f"{'eval ratio':>10} {'rel L2':>9} {'max abs':>9}")
    print(header)
    print("-" * len(header))
    for label, key in presets:
        evals = count_evaluations(SAMPLERS[key[0]], get_sigmas_karras(key[1]))
        acc = accuracy[key]
        print(f"{label:<20} {key[0]:<9} {key[1]:>5} {evals:>5} {seconds[key]:>8.2f} "
              f"{seconds[base_key] / seconds[key]:>9.2f}x {base_evals / evals:>9.2f}x {acc['rel_l2']:>9.2e} "
              f"{acc['max_abs']:>9.2e}")
    fast_evals = count_evaluations(SAMPLERS[FAST_PRESET[0]], get_sigmas_karras(FAST_PRESET[1]))
    measured = seconds[base_key] / seconds[FAST_PRESET]
    print(f"expected speed-up of the fast preset at any size (4096 px included): {base_evals}/{fast_evals} "
          f"evaluations = {base_evals / fast_evals:.1f}x; measured here {measured:.2f}x")


def _precision(path: str | None) -> None:
    """A ``--golden`` model's 20-step sample in fp32 and bf16 against the reference's float64 result."""
    if path is None:
        print("\n(precision: needs --golden FILE, e.g. tests/data/infdit_tiny_a.safetensors of a source checkout)")
        return
    golden = read_golden(path)[1]
    reference = golden["sample_out_fp64"].double()
    print("\nprecision: golden tiny model, 20 Heun steps (39 evaluations), vs the reference's float64 sample "
          f"(values up to {reference.abs().max().item():.2f})")
    rows, outs = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = read_golden(path, dtype)[0]
        out = sample_canvas(model, golden["lr_image"], clip_embedding=golden["vector"], noise=golden["noise"],
                            block_batch=2).double()
        outs[name] = out
        diff = out - reference
        rows[name] = (diff.abs().max().item(), (diff.norm() / reference.norm()).item())
        print(f"  {name} vs reference: max abs {rows[name][0]:.2e}, relative L2 {rows[name][1]:.2e}")
    diff = outs["bf16"] - outs["fp32"]
    print(f"  bf16 vs fp32: max abs {diff.abs().max().item():.2e}, relative L2 "
          f"{(diff.norm() / outs['fp32'].norm()).item():.2e} (bf16 weights and activations, 8 mantissa bits; "
          "sigma, preconditioning and the sampler state stay float32)")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench infdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("memory", "presets", "precision"), help="run one part only")
    parser.add_argument("--golden", help="for the precision part: Inf-DiT weights with golden.* reference tensors "
                                         "(tests/data/infdit_tiny_a.safetensors in a source checkout)")
    parser.add_argument("--preset-side", type=int, default=256, help="output side of the preset timing (px)")
    parser.add_argument("--sides", type=int, nargs=3, default=DEFAULT_SIDES, help="three output sides in px")
    parser.add_argument("--block-batch", type=int, default=2, help="n for the block-wise runs (n x n blocks)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU more threads only add contention)")
    parser.add_argument("--repeats", type=int, default=1, help="time each measurement this many times (best of)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only in (None, "memory"):
        code = _memory(args)
        if code:
            return code
    if args.only in (None, "presets"):
        _presets(args.preset_side, 128, args.block_batch, max(1, args.repeats))
    if args.only in (None, "precision"):
        _precision(args.golden)
    return 0


def _memory(args: argparse.Namespace) -> int:
    if not os.path.exists("/proc/self/clear_refs"):
        print("this benchmark measures peak RSS through /proc (Linux only)", file=sys.stderr)
        return 2
    config = bench_config()
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
