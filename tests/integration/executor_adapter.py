"""The one place the integration tier touches ComfyUI's executor internals, by feature detection.

The in-process fixtures run API prompts through ``execution.PromptExecutor`` (fast, and the Python outputs of
every node stay inspectable). Its constructor and caches changed across releases; this module adapts to what
the running host has, never to a version string:

* ``cache_args`` (newer hosts read ``cache_args["ram"]`` and ``["ram_inactive"]`` after every node) is passed
  when the constructor takes it;
* the output cache's ``get`` became a coroutine: ``get_local`` is used when present;
* newer hosts reset ``args.preview_method`` from ``extra_data["preview_method"]`` at every prompt: the method is
  passed there (older hosts ignore the key) and set on ``args`` too.

Everything else the tests use is public: node classes, ``comfy.utils.set_progress_bar_global_hook``,
``execution.validate_prompt``, and, in ``test_server_api.py``, the server's HTTP/WebSocket API.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

# Host caches sized 0: keep nothing beyond what the CLASSIC cache keeps, never evict for RAM pressure.
_NO_RAM_HEADROOM = {"lru": 0, "ram": 0, "ram_inactive": 0}


class RecordingServer:
    """The minimum of ``server.PromptServer`` an executor calls: records every message it is sent."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:  # newer hosts announce queue changes
        pass


def make_executor(execution: Any, server: RecordingServer) -> Any:
    """A ``PromptExecutor`` with the classic output cache, on any host."""
    params = inspect.signature(execution.PromptExecutor).parameters
    kwargs: dict[str, Any] = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in params:
        kwargs["cache_args"] = dict(_NO_RAM_HEADROOM)
    return execution.PromptExecutor(server, **kwargs)


def cached_output(executor: Any, node_id: str) -> Any:
    """The Python outputs a node produced in the last prompt, or None."""
    cache = executor.caches.outputs
    getter = getattr(cache, "get_local", None)
    value = getter(node_id) if getter is not None else cache.get(node_id)
    if inspect.isawaitable(value):  # a host whose only accessor is async
        value = asyncio.run(value)
    return None if value is None else getattr(value, "outputs", value)


def extra_data(preview_method: str | None = None) -> dict[str, Any]:
    """``extra_data`` for ``execute``; with a preview method both old and new hosts render previews."""
    if preview_method is None:
        return {}
    from comfy.cli_args import LatentPreviewMethod, args

    args.preview_method = LatentPreviewMethod(preview_method)
    return {"preview_method": preview_method}


def reset_preview_method(previous: Any) -> None:
    from comfy.cli_args import args

    args.preview_method = previous

