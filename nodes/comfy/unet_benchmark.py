"""HiDiffusion's host-side benchmark: one forward of ComfyUI's SD1.5 UNet, vanilla against patched.

``python nodes/comfy/unet_benchmark.py --comfyui /path/to/ComfyUI [--px 1024] [--repeats 1]``

ComfyUI's modules are booted in this process (CPU unless CUDA is available), the pack is loaded as a
package the way ComfyUI loads it, and :func:`nodes.comfy.hidiffusion.benchmark_unet_forward` times the
real SD1.5 architecture (random weights) at a ``--px`` image's latent: vanilla, our patch on an early
step (RAU-Net + MSW-MSA) and on a late step (MSW-MSA only), interleaved in one run. The host-free
part (attention alone) is ``python -m uniba bench hidiffusion``. This file is a script: the pack
never imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
PAPER_1024 = (14.31, 8.26)  # Table 4: SD1.5 + RAU-Net, without / with MSW-MSA, seconds (GPU)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (tested: 0.3.64)")
    parser.add_argument("--px", type=int, default=1024, help="image size whose latent the UNet sees")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if not (Path(args.comfyui) / "comfy" / "model_management.py").is_file():
        parser.error(f"--comfyui {args.comfyui} is not a ComfyUI checkout (no comfy/model_management.py)")
    sys.path[:0] = [str(Path(args.comfyui).resolve()), str(PACK)]
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()  # before comfy.model_management is imported
    spec = importlib.util.spec_from_file_location("uniba_pack", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["uniba_pack"] = pack
    spec.loader.exec_module(pack)
    from uniba_pack.nodes.comfy import hidiffusion

    print(f"UNet forward: ComfyUI SD1.5 architecture, random weights, {args.px}px "
          f"({args.px // 8}x{args.px // 8} latent), batch 1 ...", flush=True)
    r = hidiffusion.benchmark_unet_forward(args.px, repeats=args.repeats)
    print(f"  vanilla                                  {r['vanilla_s']:8.2f} s  1.00x")
    print(f"  patched, early step (RAU-Net + MSW-MSA) {r['early_s']:8.2f} s  {r['early_s'] / r['vanilla_s']:.2f}x")
    print(f"  patched, late step {r['late_step']} (MSW-MSA only)   {r['late_s']:8.2f} s  "
          f"{r['late_s'] / r['vanilla_s']:.2f}x")
    print(f"  paper, MSW-MSA on top of RAU-Net: {PAPER_1024[1] / PAPER_1024[0]:.2f}x of RAU-Net alone (1024px, GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
