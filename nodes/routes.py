"""HTTP routes the frontend extension calls (registered only inside ComfyUI).

``GET /uniba/infdit/plan?model=&dtype=&width=&height=&scale=&steps=&sampler=&block_batch=&offload_cache=``
answers the Inf-DiT plan for an input of ``width`` x ``height`` pixels: the JSON of the
:class:`~uniba.infdit.plan.UpscalePlan` the ``InfDiTUpscale`` node would build (same builder, same
sampling rule, same dtype rule, same free-memory figure), plus the model, dtype and device it was
planned for.

The route is confined: ``model`` must be a name the ``models/infdit`` listing shows (ComfyUI's
``folder_paths``); an absolute path, a ``..`` or another folder's file gets exactly the answer of a
missing file, so the route cannot probe the file system or read other files' headers.

Every bad parameter is a 400 with one sentence naming it, never a 500. Reading a model file (its
header, its stored dtype) happens on a small worker pool with a time limit, never in the server's
event loop, so a slow or hostile file delays only its own answer; each file is read once per
version (its answer, or its error, is kept).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from uniba.checkpoint import stored_dtype
from uniba.devices import choose_dtype
from uniba.infdit import InfDiTConfig, config_for_file, plan_upscale, release_config
from uniba.infdit.sampling import DEFAULT_STEPS, Sampler, named_sampler

from . import infdit_nodes
from .comfy import host

PLAN_ROUTE = "/uniba/infdit/plan"
SCALES = tuple(infdit_nodes.SCALES)
BLOCK_BATCHES = tuple(infdit_nodes.BLOCK_BATCHES)
OFFLOAD = tuple(infdit_nodes.OFFLOAD)
DTYPES = tuple(infdit_nodes.DTYPES)
MAX_SIDE = 65536
MAX_STEPS = 200  # the node's steps widget maximum
# The whole answer (file reads included) must come within this; a file that takes longer is refused.
TIME_LIMIT_S = 10.0
# Two workers: a hostile file occupies at most these, never the event loop or ComfyUI's default pool.
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="uniba-plan")

_file_facts: dict[tuple[str, int, int], concurrent.futures.Future] = {}
_file_facts_lock = threading.Lock()


class BadRequest(ValueError):
    """A query parameter is missing or invalid; the message names it and what is allowed."""


def _shown(raw: str) -> str:
    """A query value as an error message shows it: quoted, cut to 40 characters, its length when longer."""
    return repr(raw[:40]) + (f" ({len(raw)} characters)" if len(raw) > 40 else "")


def _choice(query: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = query.get(name, default) or default
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}, got {_shown(value)}")
    return value


def _whole(query: Mapping[str, str], name: str, low: int, high: int, what: str, default: int | None = None) -> int:
    """A whole number in ``[low, high]`` written in ASCII digits (``12``, ``12.0``): no exponents, no other
    scripts' digits, no thousands of digits."""
    raw = query.get(name)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise BadRequest(f"{name} is required ({what})")
    match = re.fullmatch(r"\s*([0-9]{1,12})(?:\.0*)?\s*", raw, flags=re.ASCII)
    value = int(match.group(1)) if match else None
    if value is None or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number of {what} between {low} and {high}, got {_shown(raw)}")
    return value


def _sampler(query: Mapping[str, str]) -> Sampler | Any | None:
    """The sampler wired to the node, by name (KSamplerSelect's); none: the reference's Heun."""
    name = query.get("sampler") or ""
    if not name:
        return None
    try:
        return host.sampler_named(name) if host.IN_COMFYUI else named_sampler(name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _read_file_facts(path: str) -> tuple[InfDiTConfig, torch.dtype | None]:
    """The config (from the header's tensor shapes) and the stored dtype of a model file, read once per version."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _file_facts_lock:
        future = _file_facts.get(key)
        owner = future is None
        if owner:
            if len(_file_facts) > 32:
                _file_facts.clear()
            future = _file_facts[key] = concurrent.futures.Future()
    if owner:  # the other requests for this file wait for this one read instead of starting their own
        try:
            future.set_result((config_for_file(path), stored_dtype(path)))
        except BaseException as exc:  # noqa: BLE001 - kept so the same file is not read again, raised below
            future.set_exception(exc)
    return future.result()


def model_facts(model: str | None) -> tuple[InfDiTConfig, torch.dtype | None, str]:
    """The Inf-DiT config and stored dtype of a file in ``models/infdit``, else the release config.

    Returns the config, the stored dtype (None: unknown) and what they describe (the file name, or
    ``release ...``).
    """
    if not model:
        return release_config(), None, "release"
    try:
        path = host.model_path(host.INFDIT_FOLDER, model, listed_only=True)
    except FileNotFoundError:
        # a shared workflow opened before its model was downloaded still gets the released model's plan
        return release_config(), None, f"release ({model} not found in models/{host.INFDIT_FOLDER})"
    except (ValueError, OSError):  # a name no file system accepts (NUL bytes, too long)
        raise BadRequest(f"model must be a file name listed in models/{host.INFDIT_FOLDER}, "
                         f"got {_shown(model)}") from None
    try:
        config, stored = _read_file_facts(path)
    except (ValueError, OSError) as exc:  # CheckpointError: not an Inf-DiT file, unreadable header
        raise BadRequest(str(exc)) from None
    return config, stored, model


def _is_loaded(model: str | None) -> bool:
    """Whether the host holds this file's Inf-DiT on its device now: then the free figure already excludes its
    weights (and the readout may say so); otherwise they must fit in it too."""
    if not model:
        return False
    try:
        path = os.path.realpath(host.model_path(host.INFDIT_FOLDER, model, listed_only=True))
    except (FileNotFoundError, ValueError, OSError):
        return False
    return any(getattr(module, "source_file", None) == path for module in host.loaded_modules())


def plan_for_query(query: Mapping[str, str], free_bytes: Callable[[], int] = host.free_memory) -> dict[str, Any]:
    """The plan answer for a query string; raises :class:`BadRequest` for invalid parameters.

    Blocking (it may read a model file): the handler runs it on the worker pool.
    """
    width = _whole(query, "width", 1, MAX_SIDE, "pixels (the input image's width)")
    height = _whole(query, "height", 1, MAX_SIDE, "pixels (the input image's height)")
    scale = int(_choice(query, "scale", SCALES, "4"))
    block_batch = _choice(query, "block_batch", BLOCK_BATCHES, "auto")
    offload_cache = _choice(query, "offload_cache", OFFLOAD, "auto")
    dtype_name = _choice(query, "dtype", DTYPES, "auto")
    steps = _whole(query, "steps", 1, MAX_STEPS, "steps", default=DEFAULT_STEPS)
    sampler = _sampler(query)
    config, stored, source = model_facts(query.get("model") or None)
    device = host.torch_device()
    dtype = choose_dtype(dtype_name, device, host.dtype_support(device), stored=stored)
    try:
        # the same sampling rule and builder as InfDiTUpscale, so the readout predicts the node's plan
        sampling = infdit_nodes.sampling_for(config, sampler, None, steps)
        plan = plan_upscale(config, height, width, scale, free_bytes=int(free_bytes()), sampling=sampling,
                            block_batch=block_batch, offload_cache=offload_cache, dtype=dtype,
                            weights_resident=_is_loaded(query.get("model") or None))
    except ValueError as exc:  # the planner's own refusals (size, scale) are the user's to fix
        raise BadRequest(str(exc)) from None
    return {**plan.to_dict(), "model": source, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}


async def answer_query(query: Mapping[str, str], free_bytes: Callable[[], int] = host.free_memory,
                       time_limit: float = TIME_LIMIT_S) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a query, computed on the worker pool within ``time_limit`` seconds."""
    work = _pool.submit(plan_for_query, dict(query), free_bytes)
    try:
        return 200, await asyncio.wait_for(asyncio.wrap_future(work), time_limit)
    except BadRequest as exc:
        return 400, {"error": str(exc)}
    except TimeoutError:
        model = query.get("model") or ""
        return 400, {"error": f"model {_shown(model)} took more than {time_limit:g} s to read (a checkpoint's header "
                              "reads in well under a second): load it with the Load Inf-DiT node to see what is "
                              "wrong with it" if model else
                              f"the plan took more than {time_limit:g} s: try again when the server is idle"}
    except Exception as exc:  # noqa: BLE001 - the readout shows the reason instead of a bare 500
        host.log.exception("Inf-DiT plan route failed")
        return 500, {"error": f"{type(exc).__name__}: {exc}"}


async def infdit_plan(request: Any) -> Any:
    """aiohttp handler of ``GET /uniba/infdit/plan``: 200 with the plan, 400 with ``{"error": ...}``."""
    from aiohttp import web  # optional dependency: ComfyUI's server brings it

    status, body = await answer_query(request.rel_url.query)
    return web.json_response(body, status=status)


def register() -> bool:
    """Add the routes to ComfyUI's server; False outside ComfyUI."""
    return host.add_route("GET", PLAN_ROUTE, infdit_plan)
