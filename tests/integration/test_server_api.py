"""The pack through ComfyUI's public client API: a real server on a loopback port, driven like a client does.

``POST /prompt`` queues an Inf-DiT upscale, the WebSocket delivers ``progress``/``executed`` (and
``execution_error``) events, ``GET /history/<id>`` lists the saved image and ``GET /view`` serves it; the PNG
equals the engine's output to 8-bit rounding. No executor internals are used here, so this file runs unchanged on
every host release the pack supports. Progress is asserted as a client must read it (newer hosts throttle
regular updates): ordered, ending at its maximum.
"""

from __future__ import annotations

import io
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chromium_cdp as cdp  # noqa: E402
from tiny_infdit import plan_and_upscale, write_tiny_infdit  # noqa: E402

from uniba.infdit import load_infdit  # noqa: E402

CKPT = "infdit_tiny_server.safetensors"
INPUT = "uniba_server_input.png"
WIDTH, HEIGHT = 40, 36


def _skip_reason() -> str | None:
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _input_image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import os

    from PIL import Image

    base = tmp_path_factory.mktemp("comfyui-server")
    srv = cdp.ComfyServer(os.environ["COMFYUI_DIR"], base, base / "comfyui.log")
    write_tiny_infdit(base / "models" / "infdit", CKPT)
    Image.fromarray(_input_image()).save(base / "input" / INPUT)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _prompt(model: str = CKPT) -> dict:
    return {
        "1": {"class_type": "InfDiTLoader", "inputs": {"model_name": model, "dtype": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": INPUT}},
        "3": {"class_type": "InfDiTUpscale", "inputs": {
            "model": ["1", 0], "image": ["2", 0], "scale": "4", "steps": 2, "seed": 3, "block_batch": "auto",
            "offload_cache": "auto", "color_match": "none"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "uniba_server"}},
    }


def _queue_and_listen(srv: cdp.ComfyServer, prompt: dict, timeout: float = 300.0) -> tuple[str, list[dict]]:
    """Queue a prompt as a client and collect its WebSocket events until it finishes or fails."""
    import websocket

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
        prompt_id = cdp.http_json(srv.url + "/prompt", data=body, method="POST")["prompt_id"]
        events: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue  # binary frames: preview images
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            events.append(msg)
            if msg["type"] in ("execution_error", "execution_interrupted"):
                break
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break  # the client protocol's "prompt finished" (sent by every host)
        else:
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")
        return prompt_id, events
    finally:
        ws.close()


def _engine_output(srv: cdp.ComfyServer) -> torch.Tensor:
    model = load_infdit(srv.base / "models" / "infdit" / CKPT, torch.float32)
    lr = torch.from_numpy(_input_image()).float().div(255).movedim(-1, 0)[None] * 2 - 1
    out = plan_and_upscale(model, lr, scale=4, steps=2, seed=3, block_batch=1)
    return ((out + 1) / 2).clamp(0, 1)[0].movedim(0, -1)


def test_queued_prompt_reports_progress_and_serves_the_image(server) -> None:
    prompt_id, events = _queue_and_listen(server, _prompt())
    kinds = [e["type"] for e in events]
    assert "execution_error" not in kinds, [e for e in events if e["type"] == "execution_error"]

    progress = [e["data"] for e in events if e["type"] == "progress" and str(e["data"].get("node")) == "3"]
    assert progress, f"no progress events for the Inf-DiT node; events: {kinds}"
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == progress[-1]["max"] > 0, progress

    executed = [e["data"] for e in events if e["type"] == "executed" and str(e["data"].get("node")) == "4"]
    assert executed and executed[0]["output"]["images"], events

    history = cdp.http_json(f"{server.url}/history/{prompt_id}")[prompt_id]
    assert history["status"]["status_str"] == "success", history["status"]
    image_ref = history["outputs"]["4"]["images"][0]
    assert image_ref == executed[0]["output"]["images"][0]
    query = urllib.parse.urlencode({k: image_ref[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as resp:  # noqa: S310 - loopback
        assert resp.headers["Content-Type"] == "image/png"
        png = resp.read()

    from PIL import Image

    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32) / 255
    assert served.shape == (HEIGHT * 4, WIDTH * 4, 3)
    # SaveImage truncates to 8 bits: one step, plus float noise between two processes' runs
    assert np.abs(served - _engine_output(server).numpy()).max() <= 1.5 / 255


def test_node_error_reaches_the_client_with_its_message(server) -> None:
    from uniba.checkpoint import save_safetensors

    save_safetensors({"foo.weight": torch.zeros(2, 2)}, server.base / "models" / "infdit" / "not_infdit.safetensors")
    _prompt_id, events = _queue_and_listen(server, _prompt("not_infdit.safetensors"))
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors, [e["type"] for e in events]
    message = errors[0]["exception_message"]
    assert errors[0]["node_type"] == "InfDiTLoader" and "not_infdit.safetensors" in message, message
    assert "is not an Inf-DiT checkpoint" in message and "mp_rank_00_model_states.pt" in message, message


def test_invalid_input_is_refused_before_queueing(server) -> None:
    prompt = _prompt()
    prompt["3"]["inputs"]["scale"] = "3"
    body = json.dumps({"prompt": prompt}).encode()
    with pytest.raises(urllib.error.HTTPError) as info:
        cdp.http_json(server.url + "/prompt", data=body, method="POST")
    assert info.value.code == 400
    answer = json.loads(info.value.read())
    assert "3" in answer["node_errors"] and "scale" in json.dumps(answer["node_errors"]["3"])
