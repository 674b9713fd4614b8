"""Memory estimates and the block-batch planner (infdit.md §2.5, §7.3), expressed from the config.

Every figure is a formula of the config, so the same planner holds for the release and for tiny
test models. For one denoiser call on an output of ``grid_h x grid_w`` blocks:

* one cached block: layers x (K + V) x tokens_per_block x hidden x dtype bytes (146.8 MB in bf16);
* cache: the strip along the shorter side + the n blocks beside the batch + one corner, plus the
  batch's own new entries before the old ones are dropped;
* batch activations: ``ACT_FACTOR`` hidden-sized tensors per token (what is alive at once of the
  hidden state, q/k/v, the gathered K/V and the attention output) plus the MLP's two ``mlp_hidden``
  tensors per token;
* LR windows: cross-attention K/V of each block's 3x3 LR neighbourhood;
* sampler state: a few float32 canvases (x, denoised, derivatives, c_in-scaled input, output).

``ACT_FACTOR`` and ``STATE_CANVASES`` were calibrated against measured peaks (``python -m uniba
bench infdit`` prints estimate vs measurement).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..memory import Budget, largest_unit
from .config import METADATA_KEY, InfDiTConfig, infer_config, release_config
from .sampling import DEFAULT_STEPS, model_evaluations

# Calibrated on the CPU (fp32, torch SDPA's flash kernel) with ``python -m uniba bench infdit``: the
# attention and MLP phases do not overlap, so fewer hidden-sized tensors are alive than are created.
ACT_FACTOR = 6
STATE_CANVASES = 20  # float32 values per output pixel held by the Heun sampler and one denoiser call
SAFETY_FRACTION = 0.1
MAX_BLOCK_BATCH = 16
SCALES = (2, 4, 8, 16)
MIN_SIDE = 32

__all__ = ["UpscalePlan", "plan_upscale", "release_config", "config_for_file", "passes_for_scale"]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weights_bytes(config: InfDiTConfig, dtype: torch.dtype) -> int:
    """Bytes of the network's (and CLIP tower's) parameters in ``dtype``."""
    from .model import InfDiT

    with torch.device("meta"):
        model = InfDiT(config)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes(dtype)


def block_cache_bytes(config: InfDiTConfig, dtype: torch.dtype) -> int:
    """K and V of one block for all layers."""
    return config.num_layers * 2 * config.tokens_per_block * config.hidden_size * dtype_bytes(dtype)


def batch_activation_bytes(config: InfDiTConfig, n_h: int, n_w: int, dtype: torch.dtype) -> int:
    s = dtype_bytes(dtype)
    tokens = n_h * n_w * config.tokens_per_block
    hidden = tokens * (ACT_FACTOR * config.hidden_size + 2 * config.mlp_hidden) * s
    lr_map = (n_h + 2) * (n_w + 2) * config.lr_block_tokens**2 * 3 * config.hidden_size * s
    windows = n_h * n_w * config.lr_window**2 * 2 * config.hidden_size * s
    return hidden + lr_map + windows


def cached_blocks(strip: int, n_h: int, n_w: int) -> int:
    """Peak number of cached blocks: strip + blocks beside the batch + corner + the batch's new entries."""
    return strip + n_h + 1 + n_w + n_h


def passes_for_scale(scale: int, native: int = 4) -> list[int]:
    """Per-pass factors: native 4x, 2x by the reference's trick, 8x = 4x then 2x, 16x = 4x then 4x."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale}")
    if scale == 2 or scale == native:
        return [scale]
    if scale == 8:
        return [native, 2]
    return [native, native]


def padded_input(size: int, factor: int, config: InfDiTConfig) -> int:
    """Input side padded so that the pass's output is a whole number of blocks."""
    multiple = config.block_px // factor
    return -(-size // multiple) * multiple


@dataclass
class UpscalePlan:
    out_height: int
    out_width: int
    passes: list[dict[str, Any]]
    grid_rows: int
    grid_cols: int
    block_px: int
    traversal: str
    block_batch: tuple[int, int]
    batches_per_step: int
    cache_bytes: int
    peak_bytes: int
    weights_bytes: int
    free_bytes: int | None
    fits: bool
    offload_cache: bool
    steps_model_evals: int
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extras")
        data["block_batch"] = list(self.block_batch)
        data.update(self.extras)
        return data

    def describe(self) -> str:
        from ..memory import format_bytes

        lines = [
            f"output {self.out_width}x{self.out_height} px in {len(self.passes)} pass(es): "
            + ", ".join(f"{p['in_width']}x{p['in_height']} -> {p['out_width']}x{p['out_height']} ({p['scale']}x)"
                        for p in self.passes),
            f"last pass: {self.grid_rows}x{self.grid_cols} blocks of {self.block_px} px, traversal {self.traversal}, "
            f"block batch {self.block_batch[0]}x{self.block_batch[1]} ({self.batches_per_step} batches per model call, "
            f"{self.steps_model_evals} model calls)",
            f"KV cache {format_bytes(self.cache_bytes)} "
            f"({'offloaded to host RAM' if self.offload_cache else 'on device'})",
            f"weights {format_bytes(self.weights_bytes)}, estimated peak {format_bytes(self.peak_bytes)}"
            + (f" of {format_bytes(self.free_bytes)} free: {'fits' if self.fits else 'DOES NOT FIT'}"
               if self.free_bytes is not None else ""),
        ]
        return "\n".join(lines)


def _peak(config: InfDiTConfig, grid: tuple[int, int], n: tuple[int, int], traversal: str, offload: bool,
          dtype: torch.dtype) -> tuple[int, int]:
    """(cache bytes on device, peak bytes above the weights) for one pass."""
    grid_h, grid_w = grid
    strip = grid_w if traversal == "row-major" else grid_h
    beside = n[0] if traversal == "row-major" else n[1]
    along = n[1] if traversal == "row-major" else n[0]
    per_block = block_cache_bytes(config, dtype)
    whole = n[0] >= grid_h and n[1] >= grid_w
    cache = 0 if whole else cached_blocks(strip, beside, along) * per_block
    # offloaded: per layer only the 2n+1 neighbour blocks and the new entries visit the device
    on_device = (2 * (beside + along) + 1) * per_block // config.num_layers if offload else cache
    state = STATE_CANVASES * 4 * grid_h * grid_w * config.block_px**2
    return cache, on_device + batch_activation_bytes(config, n[0], n[1], dtype) + state


def denoiser_call_bytes(config: InfDiTConfig, grid: tuple[int, int], n: tuple[int, int], traversal: str,
                        offload: bool, dtype: torch.dtype) -> int:
    """Peak of one denoiser call above its inputs: device cache + batch + the float32 result canvas."""
    cache, above = _peak(config, grid, n, traversal, offload, dtype)
    sampler_rest = (STATE_CANVASES - config.out_channels) * 4 * grid[0] * grid[1] * config.block_px**2
    return above - sampler_rest


def plan_upscale(config: InfDiTConfig, lr_height: int, lr_width: int, scale: int, free_bytes: int | None,
                 block_batch: str | int = "auto", offload_cache: str = "auto",
                 dtype: torch.dtype = torch.bfloat16, *, weights_resident: bool = False) -> UpscalePlan:
    """Plan an upscale: passes, traversal, block batch and memory, from the free bytes of the device.

    ``weights_resident``: the free figure was taken with the weights already loaded (the node).
    """
    if min(lr_height, lr_width) < MIN_SIDE:
        raise ValueError(f"the input is {lr_width}x{lr_height} px; Inf-DiT needs at least {MIN_SIDE} px on each side")
    if offload_cache not in ("auto", "on", "off"):
        raise ValueError(f"offload_cache must be auto, on or off, got {offload_cache!r}")
    factors = passes_for_scale(int(scale), config.native_scale)
    passes = []
    h, w = lr_height, lr_width
    for f in factors:
        ph, pw = padded_input(h, f, config), padded_input(w, f, config)
        passes.append({"scale": f, "in_height": h, "in_width": w, "padded_height": ph, "padded_width": pw,
                       "out_height": h * f, "out_width": w * f, "canvas_height": ph * f, "canvas_width": pw * f})
        h, w = h * f, w * f
    last = passes[-1]
    grid = (last["canvas_height"] // config.block_px, last["canvas_width"] // config.block_px)
    traversal = "row-major" if grid[1] <= grid[0] else "column-major"
    weights = weights_bytes(config, dtype)
    usable = None
    if free_bytes is not None:
        usable = Budget(int(free_bytes), SAFETY_FRACTION, 0 if weights_resident else weights).usable

    def clip(n: int) -> tuple[int, int]:
        return min(n, grid[0]), min(n, grid[1])

    def cost(n: int, offload: bool) -> int:
        return _peak(config, grid, clip(n), traversal, offload, dtype)[1]

    max_n = min(MAX_BLOCK_BATCH, max(grid))
    if offload_cache == "auto":
        offload = usable is not None and cost(1, False) > usable
    else:
        offload = offload_cache == "on"
    if block_batch == "auto":
        n = 1 if usable is None else largest_unit(lambda u: cost(u, offload), usable, max_unit=max_n)
    else:
        n = int(block_batch)
        if n < 1:
            raise ValueError(f"block_batch must be auto or at least 1, got {block_batch}")
    n_hw = clip(n)
    cache, above = _peak(config, grid, n_hw, traversal, offload, dtype)
    peak = above + weights
    fits = usable is None or above <= usable
    batches = math.ceil(grid[0] / n_hw[0]) * math.ceil(grid[1] / n_hw[1])
    return UpscalePlan(
        out_height=lr_height * int(scale), out_width=lr_width * int(scale), passes=passes,
        grid_rows=grid[0], grid_cols=grid[1], block_px=config.block_px, traversal=traversal,
        block_batch=n_hw, batches_per_step=batches, cache_bytes=cache, peak_bytes=peak, weights_bytes=weights,
        free_bytes=None if free_bytes is None else int(free_bytes), fits=fits, offload_cache=offload,
        steps_model_evals=model_evaluations(DEFAULT_STEPS),
        extras={"rope_wraps": max(last["canvas_height"], last["canvas_width"]) > config.max_side_px},
    )


def config_for_file(path: str | os.PathLike) -> InfDiTConfig:
    """The config of a model file, from its safetensors header only (no tensor data read).

    Pickled ``.pt`` releases cannot be inspected without loading them: they get the release config.
    """
    from ..checkpoint import read_safetensors_header, wrong_family_error
    from .config import InfDiTConfig as _Config
    from .keys import is_our_layout

    path = os.fspath(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        return release_config()
    header = read_safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    if METADATA_KEY in meta:
        return _Config.from_json(meta[METADATA_KEY])
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    if is_our_layout(shapes):
        raise wrong_family_error(path, "Inf-DiT", shapes, "This converted file lost its config metadata: "
                                 "convert the release again with python -m uniba convert-infdit.")
    try:
        return infer_config(shapes)
    except (KeyError, ValueError):
        raise wrong_family_error(path, "Inf-DiT", shapes) from None
