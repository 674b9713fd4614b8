"""Child process of ``python -m uniba bench load`` for the ComfyUI loader path (needs ``COMFYUI_DIR``).

Boots ComfyUI in-process on the CPU with this pack as its only custom node (as tests/integration/conftest.py
does), resets the peak-RSS mark, then runs the pack's **Sana DiT Loader** node on one file and prints
``RESULT {json}`` with load time, peak RSS above the booted baseline and the size of the model ComfyUI holds.
Not a test (not collected: no ``test_`` prefix); the engine runs it only when given its path:

    COMFYUI_DIR=/path/to/ComfyUI python -m uniba bench load DIR --comfyui-child tests/integration/bench_comfy_load.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-UniBA"


def boot_comfy(base: Path) -> dict:
    root = Path(os.environ["COMFYUI_DIR"]).resolve()
    sys.path.insert(0, str(root))
    import utils.extra_config  # noqa: F401  (ComfyUI's own utils package, before nodes puts comfy/ first)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [PACK_FOLDER]
    args.disable_api_nodes = True
    custom = base / "custom_nodes"
    custom.mkdir()
    (custom / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    import folder_paths

    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    import nodes

    logging.getLogger().setLevel(logging.WARNING)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if PACK_FOLDER not in nodes.LOADED_MODULE_DIRS:
        raise RuntimeError(f"ComfyUI did not import the pack from {REPO}")
    return nodes.NODE_CLASS_MAPPINGS


def main() -> int:
    spec = json.loads(sys.argv[1])
    path = Path(spec["path"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        mappings = boot_comfy(Path(tmp))
        import folder_paths
        import torch

        from uniba.bench_load import PeakRss, model_bytes, touch_pages
        from uniba.devices import dtype_name

        torch.set_num_threads(int(spec.get("threads") or 2))
        folder_paths.add_model_folder_path("diffusion_models", str(path.parent), is_default=True)
        loader = mappings["SanaDiTLoader"]()
        meter = PeakRss()
        meter.start()
        start = time.perf_counter()
        (patcher,) = loader.load(unet_name=path.name + ("/" if path.is_dir() else ""),
                                 weight_dtype=spec.get("dtype") or "auto")
        seconds = time.perf_counter() - start
        module = patcher.model.diffusion_model
        touch_pages(module)
        result = {"kind": "sana (ComfyUI)", "path": str(path), "load_s": seconds,
                  "ready_s": time.perf_counter() - start, "peak_bytes": meter.peak_above_baseline(),
                  "model_bytes": model_bytes(module), "dtype": dtype_name(next(module.parameters()).dtype)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
