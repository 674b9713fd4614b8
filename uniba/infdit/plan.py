"""Memory estimates and the block-batch planner (docs/SOURCES.md, Inf-DiT §2.5, §7.3), expressed from the config.

Every figure is a formula of the config, so the same planner holds for the release and for tiny
test models. For one denoiser call on an output of ``grid_h x grid_w`` blocks:

* one cached block: layers x (K + V) x tokens_per_block x hidden x dtype bytes (146.8 MB in bf16);
* cache: the strip along the shorter side + the n blocks beside the batch + one corner, plus the
  batch's own new entries before the old ones are dropped;
* batch activations: ``ACT_FACTOR`` hidden-sized tensors per token (what is alive at once of the
  hidden state, q/k/v, the gathered K/V and the attention output) plus the MLP's two ``mlp_hidden``
  tensors per token;
* LR condition: cross-attention K/V of the LR image, projected once per image and kept (they grow
  with the area: 1.41 GiB in bf16 at 4096 px, 22 GiB at 16384 px) or, when they do not fit, each
  batch's own (n + 2)^2 LR blocks projected by the batch (1/512 of a block's compute each); and each
  batch's gathered 3x3 LR windows;
* sampler state: a few float32 canvases (x, denoised, derivatives, c_in-scaled input, output), on
  the device or, when they do not fit (20 GiB at 16384 px), in host RAM with each batch's pixels
  visiting the device.

When memory is short the planner goes down a ladder, each rung freeing the biggest area-sized part
left: LR maps kept -> LR maps per batch -> KV cache offloaded -> sampler canvases in host RAM.

``ACT_FACTOR`` and ``STATE_CANVASES`` were calibrated against measured peaks (``python -m uniba
bench infdit`` prints estimate vs measurement).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..checkpoint import (
    CheckpointError,
    check_file,
    read_head,
    read_safetensors_header,
    wrong_family_error,
    zip_pickle_shapes,
)
from ..guards import check_choice
from ..memory import Budget, format_bytes, largest_unit
from ..metadata import config_from_metadata
from ..wording import count
from .blockwise import ROW_MAJOR, batch_order, choose_traversal
from .config import METADATA_KEY, InfDiTConfig, infer_config, release_config
from .keys import is_our_layout
from .model import InfDiT
from .sampling import Sampling, resolve_sampling

# Calibrated on the CPU (fp32, torch SDPA's flash kernel) with ``python -m uniba bench infdit``: the
# attention and MLP phases do not overlap, so fewer hidden-sized tensors are alive than are created.
ACT_FACTOR = 6
STATE_CANVASES = 20  # float32 values per output pixel held by the Heun sampler and one denoiser call
SAFETY_FRACTION = 0.1
MAX_BLOCK_BATCH = 16
SCALES = (2, 4, 8, 16)
# Largest output side planned (512 blocks of the release): bounds the planner's work for any request,
# including the route's; RoPE positions already wrap past 4096 px.
MAX_OUTPUT_SIDE = 65536

__all__ = ["UpscalePlan", "PassPlan", "PlanDoesNotFit", "plan_upscale", "parse_block_batch", "release_config",
           "config_for_file", "passes_for_scale", "min_input_side"]


def parse_block_batch(value: str | int | tuple[int, int] | list[int] | None) -> int | tuple[int, int] | None:
    """The one parser of the ``block_batch`` option: ``"auto"``/``""``/None -> None (planned from memory),
    ``"4"``/4 -> 4 (4 x 4 blocks), ``"2x3"``/(2, 3) -> (2, 3) (2 rows x 3 columns of blocks)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"block_batch must be auto, n or n_h x n_w (e.g. 4 or 2x3), got {value!r}")
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        parsed: int | tuple[int, int] = (int(value[0]), int(value[1]))
    elif isinstance(value, int):
        parsed = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", str(value))
        if not match:
            raise ValueError(f"block_batch must be auto, n or n_h x n_w (e.g. 4 or 2x3), got {value!r}")
        parsed = int(match.group(1)) if match.group(2) is None else (int(match.group(1)), int(match.group(2)))
    if min(parsed if isinstance(parsed, tuple) else (parsed,)) < 1:
        raise ValueError(f"block_batch must be auto or at least 1 block, got {value!r}")
    return parsed


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weights_bytes(config: InfDiTConfig, dtype: torch.dtype) -> int:
    """Bytes of the network's (and CLIP tower's) parameters in ``dtype``."""
    with torch.device("meta"):
        model = InfDiT(config)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes(dtype)


def block_cache_bytes(config: InfDiTConfig, dtype: torch.dtype) -> int:
    """K and V of one block for all layers."""
    return config.num_layers * 2 * config.tokens_per_block * config.hidden_size * dtype_bytes(dtype)


def lr_condition_bytes(config: InfDiTConfig, grid: tuple[int, int], dtype: torch.dtype) -> int:
    """The LR cross-attention K/V maps of one image (zero-padded by one block), kept for the whole sampling."""
    tokens = (grid[0] + 2) * (grid[1] + 2) * config.lr_block_tokens**2
    return 2 * tokens * config.hidden_size * dtype_bytes(dtype)


def lr_batch_bytes(config: InfDiTConfig, n_h: int, n_w: int, dtype: torch.dtype) -> int:
    """The LR K/V a batch of n_h x n_w blocks projects for itself: its LR blocks and one on each side."""
    return 2 * (n_h + 2) * (n_w + 2) * config.lr_block_tokens**2 * config.hidden_size * dtype_bytes(dtype)


def batch_activation_bytes(config: InfDiTConfig, n_h: int, n_w: int, dtype: torch.dtype) -> int:
    s = dtype_bytes(dtype)
    tokens = n_h * n_w * config.tokens_per_block
    hidden = tokens * (ACT_FACTOR * config.hidden_size + 2 * config.mlp_hidden) * s
    windows = n_h * n_w * config.lr_window**2 * 2 * config.hidden_size * s
    return hidden + windows


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


def min_input_side(config: InfDiTConfig, factor: int) -> int:
    """The smallest input side that fills one block of a ``factor``x pass; smaller inputs are padded."""
    return -(-config.block_px // factor)


class PlanDoesNotFit(ValueError):
    """Even the smallest work unit with the KV cache offloaded exceeds the memory budget."""


@dataclass(frozen=True)
class PassPlan:
    """One pass of an upscale: its sizes, block grid, traversal, block batch, cache placement and memory.

    ``block_order``: the pass's block batches of one evaluation in run order, as ``(row, col, rows, cols)``.
    """

    scale: int
    in_height: int
    in_width: int
    padded_height: int
    padded_width: int
    out_height: int
    out_width: int
    canvas_height: int
    canvas_width: int
    grid_rows: int
    grid_cols: int
    traversal: str
    block_batch: tuple[int, int]
    offload_cache: bool
    keep_lr_maps: bool  # False: each batch projects its own LR K/V, nothing kept
    state_on_host: bool  # the sampler's canvases in host RAM, each batch's pixels visit the device
    batches_per_step: int
    cache_bytes: int
    peak_bytes: int
    minimum_bytes: int
    block_order: tuple[tuple[int, int, int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["block_batch"] = list(self.block_batch)
        data["block_order"] = [list(rect) for rect in self.block_order]
        return data


@dataclass(frozen=True, eq=False)
class UpscalePlan:
    """The plan of one upscale, built once by :func:`plan_upscale` and run as is by :func:`uniba.infdit.upscale`.

    ``passes`` carry everything per pass (the last one is the largest canvas); the plan itself carries
    what holds for the whole run: the sampling (sampler, schedule, evaluations per pass), the memory
    verdict and the warnings. It becomes a dict only at the route's JSON boundary (:meth:`to_dict`).
    """

    scale: int
    passes: tuple[PassPlan, ...]
    block_px: int
    sampling: Sampling
    peak_bytes: int
    minimum_bytes: int
    weights_bytes: int
    free_bytes: int | None
    usable_bytes: int | None
    fits: bool
    weights_resident: bool
    rope_wraps: bool
    rope_max_side_px: int

    @property
    def last(self) -> PassPlan:
        return self.passes[-1]

    @property
    def out_height(self) -> int:
        return self.last.out_height

    @property
    def out_width(self) -> int:
        return self.last.out_width

    @property
    def evaluations(self) -> int:
        return self.sampling.evaluations

    @property
    def total_batches(self) -> int:
        """Block batches of one image over all passes and evaluations (the progress total)."""
        return self.evaluations * sum(p.batches_per_step for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: one field per fact, the sampler by its evaluations and schedule."""
        return {
            "scale": self.scale, "passes": [p.to_dict() for p in self.passes], "block_px": self.block_px,
            "evaluations": self.evaluations, "sigmas": [float(s) for s in self.sampling.sigmas],
            "peak_bytes": self.peak_bytes, "minimum_bytes": self.minimum_bytes, "weights_bytes": self.weights_bytes,
            "free_bytes": self.free_bytes, "usable_bytes": self.usable_bytes, "fits": self.fits,
            "weights_resident": self.weights_resident, "rope_wraps": self.rope_wraps,
            "rope_max_side_px": self.rope_max_side_px,
            # the plan in words (figures, warnings, what to change): the route and readout show it as is
            "description": self.describe(),
        }

    def describe(self) -> str:
        """The plan in words, for the CLI, the ComfyUI readout and the route: figures, warnings and fixes.

        When the free figure was taken with the weights already loaded (the node), the peak includes
        weights that are not part of that figure, so a peak above "free" can still fit; the text says so.
        """

        last = self.last
        lines = [
            f"output {self.out_width}x{self.out_height} px in {count(len(self.passes), 'pass')}: "
            + ", ".join(f"{p.in_width}x{p.in_height} -> {p.out_width}x{p.out_height} ({p.scale}x)"
                        for p in self.passes),
            f"last pass: {last.grid_rows}x{last.grid_cols} blocks of {self.block_px} px, traversal {last.traversal}, "
            f"block batch {last.block_batch[0]}x{last.block_batch[1]} ({count(last.batches_per_step, 'batch')} per "
            f"model call, {count(self.evaluations, 'model call')})",
            f"KV cache {format_bytes(last.cache_bytes)} "
            f"({'offloaded to host RAM' if last.offload_cache else 'on device'}), LR maps "
            f"{'kept' if last.keep_lr_maps else 'per batch'}, sampler canvases "
            f"{'in host RAM' if last.state_on_host else 'on device'}",
        ]
        work = self.peak_bytes - self.weights_bytes
        if self.free_bytes is None:
            lines.append(f"weights {format_bytes(self.weights_bytes)}, estimated peak {format_bytes(self.peak_bytes)} "
                         "(no memory budget given: --vram 12GB checks one)")
        elif self.weights_resident:
            lines.append(
                f"estimated peak {format_bytes(self.peak_bytes)} = weights {format_bytes(self.weights_bytes)} "
                f"(already loaded, so not part of the {format_bytes(self.free_bytes)} free) + work "
                f"{format_bytes(work)}; the work {'fits' if self.fits else 'DOES NOT FIT'} in "
                f"{format_bytes(self.usable_bytes or 0)} usable")
        else:
            lines.append(
                f"estimated peak {format_bytes(self.peak_bytes)} (weights {format_bytes(self.weights_bytes)} + work "
                f"{format_bytes(work)}) of {format_bytes(self.free_bytes)} free "
                f"({format_bytes(self.usable_bytes or 0)} usable after the weights and a 10 % margin): "
                f"{'fits' if self.fits else 'DOES NOT FIT'}")
        if self.rope_wraps:
            lines.append(f"warning: the output side {max(self.out_width, self.out_height)} px exceeds "
                         f"{self.rope_max_side_px} px, so RoPE positions wrap around (as in the "
                         "reference): expect repeated structure; upscale a smaller region or use a smaller scale")
        if not self.fits:
            lines.append("to fit: " + self.advice())
        return "\n".join(lines)

    def advice(self) -> str:
        """What to change when the plan does not fit, most effective first."""
        minimum_work = self.minimum_bytes - self.weights_bytes
        usable = self.usable_bytes or 0
        if minimum_work <= usable:
            options = []
            if self.last.block_batch != (1, 1):
                options.append("a smaller block batch (auto picks the largest that fits)")
            if not self.last.offload_cache:
                options.append("offload_cache on (KV cache in host RAM)")
            return (" or ".join(options) or "block batch 1 with offload_cache on") + \
                f": one block with the cache offloaded needs {format_bytes(minimum_work)} of work memory."
        return (f"even one block with the cache offloaded needs {format_bytes(minimum_work)} of work memory, "
                f"{format_bytes(minimum_work - usable)} more than usable: use a smaller scale or a smaller input, "
                "or free memory (close other programs, unload other models).")

    def check_fits(self) -> None:
        """Refuse a plan whose smallest unit (one block, KV cache offloaded) exceeds the budget.

        A plan that merely does not fit at the chosen block batch still runs: out-of-memory errors
        halve the batch with an identical result. Raises :class:`PlanDoesNotFit` naming the figures
        and the fix.
        """
        if self.usable_bytes is None or self.minimum_bytes - self.weights_bytes <= self.usable_bytes:
            return
        raise PlanDoesNotFit(
            f"Inf-DiT cannot upscale to {self.out_width}x{self.out_height} px within "
            f"{format_bytes(self.free_bytes or 0)} free: even one block at a time with the KV cache in host "
            f"RAM needs about {format_bytes(self.minimum_bytes - self.weights_bytes)} above the weights "
            f"({format_bytes(self.usable_bytes)} usable after the safety margin). Use a smaller scale or a "
            f"smaller input, block_batch 1 and offload_cache on, or free memory (close other models).")


# (offload the KV cache, keep the LR maps, sampler canvases in host RAM): the planner's rungs, least
# memory last; offload_cache on/off keeps only the rungs with that setting
RUNGS = ((False, True, False), (False, False, False), (True, False, False), (True, False, True))


def _peak(config: InfDiTConfig, grid: tuple[int, int], n: tuple[int, int], traversal: str, offload: bool,
          dtype: torch.dtype, keep_maps: bool = True, state_on_host: bool = False) -> tuple[int, int]:
    """(cache bytes on device, peak bytes above the weights) for one pass."""
    grid_h, grid_w = grid
    strip = grid_w if traversal == ROW_MAJOR else grid_h
    beside = n[0] if traversal == ROW_MAJOR else n[1]
    along = n[1] if traversal == ROW_MAJOR else n[0]
    per_block = block_cache_bytes(config, dtype)
    whole = n[0] >= grid_h and n[1] >= grid_w
    cache = 0 if whole else cached_blocks(strip, beside, along) * per_block
    # offloaded: per layer only the 2n+1 neighbour blocks and the new entries visit the device
    on_device = (2 * (beside + along) + 1) * per_block // config.num_layers if offload else cache
    lr_maps = lr_condition_bytes(config, grid, dtype) if keep_maps else lr_batch_bytes(config, n[0], n[1], dtype)
    # on the host the device still holds the batch's input, result and canvas slices
    state_px = n[0] * n[1] if state_on_host else grid_h * grid_w
    state = STATE_CANVASES * 4 * state_px * config.block_px**2
    return cache, on_device + lr_maps + batch_activation_bytes(config, n[0], n[1], dtype) + state


def work_bytes(config: InfDiTConfig, grid: tuple[int, int], n: tuple[int, int], traversal: str, offload: bool,
               dtype: torch.dtype, keep_maps: bool = True, state_on_host: bool = False) -> int:
    """Peak bytes above the weights of sampling a ``grid`` of blocks (a pass, or one rank's band)."""
    return _peak(config, grid, n, traversal, offload, dtype, keep_maps, state_on_host)[1]


def denoiser_call_bytes(config: InfDiTConfig, grid: tuple[int, int], n: tuple[int, int], traversal: str,
                        offload: bool, dtype: torch.dtype, keep_maps: bool = False) -> int:
    """Peak of one denoiser call above its inputs: device cache + batch + the float32 result canvas
    (a single call keeps no LR maps: :func:`uniba.infdit.blockwise.denoise`)."""
    cache, above = _peak(config, grid, n, traversal, offload, dtype, keep_maps)
    sampler_rest = (STATE_CANVASES - config.out_channels) * 4 * grid[0] * grid[1] * config.block_px**2
    return above - sampler_rest


def plan_upscale(config: InfDiTConfig, lr_height: int, lr_width: int, scale: int, free_bytes: int | None, *,
                 sampling: Sampling | None = None, block_batch: str | int | tuple[int, int] | None = "auto",
                 offload_cache: str = "auto", dtype: torch.dtype = torch.bfloat16,
                 weights_resident: bool = False) -> UpscalePlan:
    """The one builder of an Inf-DiT plan: passes, traversal, block batch and memory from the free bytes.

    The node, the route, the CLI and the engine's callers all come here with what each of them has:
    the model's config and dtype, the input size, the scale, the free bytes (None: no budget),
    ``block_batch`` (through :func:`parse_block_batch`), ``offload_cache`` (auto/on/off) and the
    ``sampling`` that will run (:func:`~uniba.infdit.sampling.resolve_sampling`; default: the
    reference's Heun, 20 steps = 39 evaluations), whose evaluation count sizes the progress.
    ``weights_resident``: the free figure was taken with the weights already loaded (the node).
    """
    scale = check_choice(scale, SCALES, "scale")
    if isinstance(lr_height, bool) or isinstance(lr_width, bool) or min(int(lr_height), int(lr_width)) < 1:
        raise ValueError(f"the input is {lr_width}x{lr_height} px: it has no pixels")
    if max(lr_height, lr_width) * int(scale) > MAX_OUTPUT_SIDE:
        # the block order alone would take hours and gigabytes; past 4096 px RoPE positions wrap anyway
        raise ValueError(f"the output would be {lr_width * int(scale)}x{lr_height * int(scale)} px; Inf-DiT plans "
                         f"at most {MAX_OUTPUT_SIDE} px a side. Upscale a smaller image or region, or use a smaller "
                         "scale.")
    if offload_cache not in ("auto", "on", "off"):
        raise ValueError(f"offload_cache must be auto, on or off, got {offload_cache!r}")
    sampling = resolve_sampling() if sampling is None else sampling
    requested = parse_block_batch(block_batch)
    factors = passes_for_scale(int(scale), config.native_scale)
    weights = weights_bytes(config, dtype)
    usable = None
    if free_bytes is not None:
        usable = Budget(int(free_bytes), SAFETY_FRACTION, 0 if weights_resident else weights).usable

    passes = []
    h, w = lr_height, lr_width
    for f in factors:
        ph, pw = padded_input(h, f, config), padded_input(w, f, config)
        grid = (ph * f // config.block_px, pw * f // config.block_px)
        traversal = choose_traversal(*grid)

        def clip(n: int | tuple[int, int], grid: tuple[int, int] = grid) -> tuple[int, int]:
            n_h, n_w = (n, n) if isinstance(n, int) else n
            return min(n_h, grid[0]), min(n_w, grid[1])

        def cost(n: int | tuple[int, int], rung: tuple[bool, bool, bool], grid=grid, traversal=traversal,
                 clip=clip) -> int:
            return _peak(config, grid, clip(n), traversal, rung[0], dtype, rung[1], rung[2])[1]

        rungs = [r for r in RUNGS if offload_cache == "auto" or r[0] == (offload_cache == "on")]
        rung = rungs[0] if usable is None else next(
            (r for r in rungs if cost(requested or 1, r) <= usable), rungs[-1])
        offload, keep_maps, state_on_host = rung
        if requested is None:
            n = 1 if usable is None else largest_unit(lambda u, rung=rung: cost(u, rung), usable,
                                                      max_unit=min(MAX_BLOCK_BATCH, max(grid)))
        else:
            n = requested
        n_hw = clip(n)
        cache, above = _peak(config, grid, n_hw, traversal, offload, dtype, keep_maps, state_on_host)
        order = batch_order(grid[0], grid[1], n_hw, traversal)
        passes.append(PassPlan(
            scale=f, in_height=h, in_width=w, padded_height=ph, padded_width=pw, out_height=h * f, out_width=w * f,
            canvas_height=ph * f, canvas_width=pw * f, grid_rows=grid[0], grid_cols=grid[1], traversal=traversal,
            block_batch=n_hw, offload_cache=offload, keep_lr_maps=keep_maps, state_on_host=state_on_host,
            batches_per_step=math.ceil(grid[0] / n_hw[0]) * math.ceil(grid[1] / n_hw[1]), cache_bytes=cache,
            peak_bytes=above + weights, minimum_bytes=cost(1, RUNGS[-1]) + weights,
            block_order=tuple((r.row0, r.col0, r.n_h, r.n_w) for r in order),
        ))
        h, w = h * f, w * f

    peak = max(p.peak_bytes for p in passes)
    last = passes[-1]
    return UpscalePlan(
        scale=int(scale), passes=tuple(passes), block_px=config.block_px, sampling=sampling, peak_bytes=peak,
        minimum_bytes=max(p.minimum_bytes for p in passes), weights_bytes=weights,
        free_bytes=None if free_bytes is None else int(free_bytes), usable_bytes=usable,
        fits=usable is None or peak - weights <= usable, weights_resident=bool(weights_resident),
        rope_wraps=max(last.canvas_height, last.canvas_width) > config.max_side_px,
        rope_max_side_px=config.max_side_px,
    )


def _check_pickle_signature(path: str) -> None:
    """A ``.pt`` is planned with the release config without loading it, but it must look like a checkpoint."""
    head = read_head(path, 4)  # opened as a regular file only: a pipe swapped in after the stat never blocks
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(path, "is neither a torch zip checkpoint nor a pickle.",
                              "It is probably truncated or not a model file: download it again.")


def config_for_file(path: str | os.PathLike) -> InfDiTConfig:
    """The config of a model file from its shapes, without loading it: a safetensors header, or a ``.pt``'s
    ``data.pkl`` opcodes (:func:`uniba.checkpoint.zip_pickle_shapes`: nothing unpickled, no tensor data read).

    Only a legacy (non-zip) pickle, whose shapes cannot be read this way, gets the release config.
    """
    path = os.fspath(path)
    check_file(path)  # a missing, special or empty file is an error, never "the release plan"
    if not path.lower().endswith((".safetensors", ".sft")):
        _check_pickle_signature(path)
        shapes = zip_pickle_shapes(path)
        if not shapes:
            return release_config()
    else:
        header = read_safetensors_header(path)
        meta = header.pop("__metadata__", None) or {}
        if METADATA_KEY in meta:
            return config_from_metadata(InfDiTConfig.from_json, meta[METADATA_KEY], path, METADATA_KEY)
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    if is_our_layout(shapes):
        raise wrong_family_error(path, "Inf-DiT", shapes, "This converted file lost its config metadata: "
                                 "convert the release again with python -m uniba convert-infdit.")
    try:
        return infer_config(shapes)
    except (KeyError, ValueError):
        raise wrong_family_error(path, "Inf-DiT", shapes) from None
