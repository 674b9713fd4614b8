"""``python -m uniba bench hidiffusion``: MSW-MSA against global self-attention, and a patched vs vanilla UNet.

Part 1 (host-free, always): the self-attention of SD1.5's top level (320 channels, 8 heads of 40)
at the latent of a 1024 px and a 2048 px image, global against the 2x2 shifted windows, measured
side by side in one run. Attention cost is linear in the number of queries, so large maps are timed
on a slice of ``--query-slice`` queries (against *all* keys of their window or of the whole map)
and scaled; ``--full`` times the whole maps instead.

Part 2 (only when ``COMFYUI_DIR`` points at a ComfyUI checkout): one forward of ComfyUI's SD1.5
UNet (real architecture, random weights) at a ``--unet-px`` image's latent, vanilla against our
patch on an early step (RAU-Net + MSW-MSA) and a late step (MSW-MSA only). It runs in a child
process, because the engine itself never imports ComfyUI.

The paper (Table 4, SD1.5 + RAU-Net at 1024 px, GPU) reports 14.31 s -> 8.26 s with MSW-MSA (-42 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def _unet_child(comfyui_dir: str, px: int, repeats: int) -> dict:
    pack = Path(__file__).resolve().parents[2]
    code = (
        "import sys, json, importlib.util\n"
        f"sys.path[:0] = [{comfyui_dir!r}, {str(pack)!r}]\n"
        "import torch\n"
        "from comfy.cli_args import args\n"
        "args.cpu = not torch.cuda.is_available()\n"
        f"spec = importlib.util.spec_from_file_location('uniba_pack', {str(pack / '__init__.py')!r},"
        f" submodule_search_locations=[{str(pack)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['uniba_pack'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "from uniba_pack.nodes import hidiffusion_nodes as hn\n"
        f"print('RESULT ' + json.dumps(hn.benchmark_unet_forward({px}, repeats={repeats})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"UNet benchmark failed:\n{proc.stderr[-3000:]}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench hidiffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sizes in px (SD1.5)")
    parser.add_argument("--query-slice", type=int, default=2048,
                        help="time this many queries and scale (attention is linear in queries)")
    parser.add_argument("--full", action="store_true", help="time the whole maps (slow at 2048 px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--unet-px", type=int, default=1024, help="image size for the ComfyUI UNet forward")
    parser.add_argument("--no-unet", action="store_true", help="skip the ComfyUI UNet part")
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

    comfyui_dir = os.environ.get("COMFYUI_DIR", "")
    if args.no_unet or not comfyui_dir:
        if not args.no_unet:
            print("UNet forward: skipped (set COMFYUI_DIR to a ComfyUI checkout to run it)")
        return 0
    print(f"UNet forward: ComfyUI SD1.5 architecture, random weights, {args.unet_px}px "
          f"({args.unet_px // 8}x{args.unet_px // 8} latent), batch 1 ...", flush=True)
    r = _unet_child(comfyui_dir, args.unet_px, args.repeats)
    print(f"  vanilla            {r['vanilla_s']:8.2f} s  1.00x")
    print(f"  patched, early step (RAU-Net + MSW-MSA) {r['early_s']:8.2f} s  {r['early_s'] / r['vanilla_s']:.2f}x")
    print(f"  patched, late step (MSW-MSA only)       {r['late_s']:8.2f} s  {r['late_s'] / r['vanilla_s']:.2f}x")
    print(f"  paper, MSW-MSA on top of RAU-Net: {PAPER_1024[1] / PAPER_1024[0]:.2f}x of RAU-Net alone (1024px)")
    return 0
