"""HTTP routes the frontend extension calls (registered only inside ComfyUI).

``GET /uniba/infdit/plan?model=&dtype=&width=&height=&scale=&block_batch=&offload_cache=`` answers the
Inf-DiT block plan for an input of ``width`` x ``height`` pixels, computed by the same planner and the
same free-memory figure the ``InfDiTUpscale`` node uses, so the readout shows what a run will do.

The route is confined: ``model`` must be a name the ``models/infdit`` listing shows (ComfyUI's
``folder_paths``); an absolute path, a ``..`` or another folder's file gets exactly the answer of a
missing file, so the route cannot probe the file system or read other files' headers. Every bad
parameter is a 400 with a message, never a 500.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from uniba.checkpoint import stored_dtype
from uniba.devices import choose_dtype
from uniba.infdit.sampling import model_evaluations

from . import infdit_nodes
from .comfy import host

PLAN_ROUTE = "/uniba/infdit/plan"
SCALES = tuple(infdit_nodes.SCALES)
BLOCK_BATCHES = tuple(infdit_nodes.BLOCK_BATCHES)
OFFLOAD = tuple(infdit_nodes.OFFLOAD)
DTYPES = tuple(infdit_nodes.DTYPES)
MAX_SIDE = 65536

_config_cache: dict[tuple[str, float], Any] = {}


class BadRequest(ValueError):
    """A query parameter is missing or invalid; the message names it and the allowed values."""


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name, default) or default
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _side(query: Mapping[str, str], name: str) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        raise BadRequest(f"{name} is required (the input image's size in pixels)")
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise BadRequest(f"{name} must be a whole number of pixels, got {raw[:40]!r}")
    value = int(number)
    if not 1 <= value <= MAX_SIDE:
        raise BadRequest(f"{name} must be between 1 and {MAX_SIDE} pixels, got {value}")
    return value


def _steps(query: Mapping[str, str]) -> int:
    """The node's steps (Heun evaluations = 2 steps - 1); default: the reference's 20."""
    from uniba.infdit.sampling import DEFAULT_STEPS

    raw = query.get("steps") or str(DEFAULT_STEPS)
    if not raw.isdigit() or not 1 <= int(raw) <= 200:
        raise BadRequest(f"steps must be a whole number between 1 and 200, got {raw!r}")
    return int(raw)


def model_config(model: str | None) -> tuple[Any, str, str | None]:
    """The Inf-DiT config of a file in ``models/infdit`` (read from its tensor shapes), else the release one.

    Returns the config, what it describes (the file name, or ``release ...``) and the file's path.
    """
    from uniba.infdit import plan as planner

    if not model:
        return planner.release_config(), "release", None
    try:
        path = host.model_path(host.INFDIT_FOLDER, model, listed_only=True)
    except FileNotFoundError:
        # a shared workflow opened before its model was downloaded still gets the released model's plan
        return planner.release_config(), f"release ({model} not found in models/{host.INFDIT_FOLDER})", None
    key = (path, os.path.getmtime(path))
    if key not in _config_cache:
        try:
            config = planner.config_for_file(path)
        except ValueError as exc:  # CheckpointError: not an Inf-DiT file, unreadable header
            raise BadRequest(str(exc)) from None
        _config_cache.clear()
        _config_cache[key] = config
    return _config_cache[key], model, path


def plan_for_query(query: Mapping[str, str], free_bytes: Callable[[], int] = host.free_memory) -> dict[str, Any]:
    """The plan answer for a query string; raises :class:`BadRequest` for invalid parameters."""
    from uniba.infdit import plan as planner

    width, height = _side(query, "width"), _side(query, "height")
    scale = int(_choice(query, "scale", SCALES, "4"))
    block_batch = _choice(query, "block_batch", BLOCK_BATCHES, "auto")
    offload_cache = _choice(query, "offload_cache", OFFLOAD, "auto")
    dtype_name = _choice(query, "dtype", DTYPES, "auto")
    steps = _steps(query)
    config, source, path = model_config(query.get("model") or None)
    # the dtype and planner call mirror InfDiTLoader/InfDiTUpscale, so the readout predicts the node's plan
    stored = stored_dtype(path) if path else None
    device = host.torch_device()
    dtype = choose_dtype(dtype_name, device, host.dtype_support(device), stored=stored)
    free = int(free_bytes())
    try:
        plan = planner.plan_upscale(config, height, width, scale, free, block_batch=block_batch,
                                    offload_cache=offload_cache, dtype=dtype, weights_resident=True,
                                    evaluations=model_evaluations(steps))
    except ValueError as exc:  # the planner's own refusals (size, scale) are the user's to fix
        raise BadRequest(str(exc)) from None
    answer = dict(plan.to_dict())
    answer.update(model=source, dtype=str(dtype).removeprefix("torch."), lr_width=width, lr_height=height,
                  scale=scale, steps=steps, device=str(host.torch_device()))
    return answer


async def infdit_plan(request: Any) -> Any:
    """aiohttp handler of ``GET /uniba/infdit/plan``: 200 with the plan, 400 with ``{"error": ...}``."""
    from aiohttp import web

    try:
        return web.json_response(plan_for_query(request.rel_url.query))
    except BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception as exc:  # noqa: BLE001 - the readout shows the reason instead of a bare 500
        host.log.exception("Inf-DiT plan route failed")
        return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)


def register() -> bool:
    """Add the routes to ComfyUI's server; False outside ComfyUI."""
    return host.add_route("GET", PLAN_ROUTE, infdit_plan)
