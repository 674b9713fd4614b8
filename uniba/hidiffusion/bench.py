"""``python -m uniba bench hidiffusion``: MSW-MSA against global self-attention, and a patched vs vanilla UNet.

Part 1 (host-free, always): the self-attention of SD1.5's top level (320 channels, 8 heads of 40)
at the latent of a 1024 px and a 2048 px image, global against the 2x2 shifted windows, measured
side by side in one run. Attention cost is linear in the number of queries, so large maps are timed
on a slice of ``--query-slice`` queries (against *all* keys of their window or of the whole map)
and scaled; ``--full`` times the whole maps instead.

The whole UNet with and without the patch needs ComfyUI's UNet, so it is the host-side benchmark
``python nodes/comfy/unet_benchmark.py --comfyui DIR`` (the engine never runs ComfyUI code).

The paper (Table 4, SD1.5 + RAU-Net at 1024 px, GPU) reports 14.31 s -> 8.26 s with MSW-MSA (-42 %).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import windows

PAPER_1024 = (14.31, 8.26)   # Table 4: SD1.5 + RAU-Net, without / with MSW-MSA, seconds
PAPER_2048 = (151.58, 58.38)
SD15_TOP = {"channels": 320, "heads": 8}


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def attention_times(px: int, *, query_slice: int | None, repeats: int = 2, dtype=torch.float32,
                    device: str = "cpu") -> dict:
    """Seconds for one global and one windowed self-attention at the top level of SD1.5 for a ``px`` image."""
    side = px // 8
    tokens = side * side
    heads, channels = SD15_TOP["heads"], SD15_TOP["channels"]
    head_dim = channels // heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, channels, generator=g).to(device, dtype)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    keys = split_heads(x)
    win, _state = windows.partition(x, side, side, 1)
    win_keys = split_heads(win)
    n_queries = tokens if query_slice is None else min(query_slice, tokens)
    win_queries = win_keys if query_slice is None else win_keys[:1, :, :n_queries]

    def global_attention():
        F.scaled_dot_product_attention(keys[:, :, :n_queries], keys, keys)

    def windowed_attention():
        # a slice of one window's queries against that window's keys, or all 4 windows when not sliced
        if query_slice is None:
            F.scaled_dot_product_attention(win_keys, win_keys, win_keys)
        else:
            F.scaled_dot_product_attention(win_queries, win_keys[:1], win_keys[:1])

    scale = tokens / n_queries
    t_global = _best_time(global_attention, repeats) * scale
    t_window = _best_time(windowed_attention, repeats) * scale
    return {"px": px, "tokens": tokens, "global_s": t_global, "windowed_s": t_window,
            "ratio": t_window / t_global, "flop_ratio": windows.windowed_attention_cost(side, side),
            "sliced": query_slice is not None and query_slice < tokens}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench hidiffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sizes in px (SD1.5)")
    parser.add_argument("--query-slice", type=int, default=2048,
                        help="time this many queries and scale (attention is linear in queries)")
    parser.add_argument("--full", action="store_true", help="time the whole maps (slow at 2048 px)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print("MSW-MSA vs global self-attention, SD1.5 top level (320 ch, 8 heads), one image, CPU fp32"
          if not torch.cuda.is_available() else "MSW-MSA vs global self-attention, SD1.5 top level")
    print(f"{'image':>7} {'tokens':>7} {'global s':>10} {'MSW-MSA s':>10} {'time ratio':>11} {'FLOP ratio':>11}")
    for px in args.sizes:
        r = attention_times(px, query_slice=None if args.full else args.query_slice, repeats=args.repeats)
        note = " (sliced)" if r["sliced"] else ""
        print(f"{px:>5}px {r['tokens']:>7} {r['global_s']:>10.3f} {r['windowed_s']:>10.3f} "
              f"{r['ratio']:>10.2f}x {r['flop_ratio']:>10.2f}x{note}")
    print(f"paper (Table 4, whole SD1.5 UNet + RAU-Net, GPU): 1024px {PAPER_1024[0]} s -> {PAPER_1024[1]} s "
          f"= {PAPER_1024[1] / PAPER_1024[0]:.2f}x; 2048px {PAPER_2048[0]} s -> {PAPER_2048[1]} s "
          f"= {PAPER_2048[1] / PAPER_2048[0]:.2f}x")

    print("whole UNet, vanilla vs patched (needs ComfyUI): python nodes/comfy/unet_benchmark.py --comfyui DIR")
    return 0
