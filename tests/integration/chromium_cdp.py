"""A real ComfyUI server with this pack, and headless Chromium driven over the DevTools protocol.

Used by ``test_browser.py`` and by ``python tests/integration/chromium_cdp.py screenshots`` (README images).
Only the standard library and ``websocket-client`` are needed; the browser is Debian's ``chromium``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-UniBA"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def frontend_root() -> str | None:
    """``UNIBA_FRONTEND_ROOT``: serve this frontend build instead of the host's pinned one.

    Either the ``static`` folder itself or a ``pip install --target DIR comfyui-frontend-package==X`` folder.
    """
    root = os.environ.get("UNIBA_FRONTEND_ROOT")
    if not root:
        return None
    path = Path(root)
    for candidate in (path, path / "comfyui_frontend_package" / "static", path / "static"):
        if (candidate / "index.html").is_file():
            return str(candidate)
    raise FileNotFoundError(f"UNIBA_FRONTEND_ROOT={root} holds no index.html (nor comfyui_frontend_package/static)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10.0, data: bytes | None = None, method: str | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
        body = resp.read()
    return json.loads(body) if body else None


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with a base directory whose custom_nodes links to this repo."""

    def __init__(self, comfyui_dir: str | Path, base_dir: str | Path, log_path: str | Path) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.base = Path(base_dir)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        for sub in ("custom_nodes", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for folder in ("infdit", "diffusion_models", "vae", "text_encoders", "checkpoints"):
            (self.base / "models" / folder).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 240.0) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--disable-api-nodes", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
               "--preview-method", "none", "--database-url", "sqlite:///:memory:"]
        front_end = frontend_root()
        if front_end:
            cmd += ["--front-end-root", front_end]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log: {self.log_path}\n{self.log()}")
            try:
                http_json(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s; log: {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


class Page:
    """One browser tab: send DevTools commands, evaluate JavaScript, collect console output and errors."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._id = 0
        self._lock = threading.Lock()
        self.console: list[dict[str, Any]] = []  # {"level", "text", "url"}
        self.send("Runtime.enable")
        self.send("Log.enable")
        self.send("Page.enable")

    def _record(self, msg: dict[str, Any]) -> None:
        method = msg.get("method")
        params = msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.console.append({"level": params.get("type"), "text": text, "url": frame[0].get("url", "")})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = (details.get("exception") or {}).get("description") or details.get("text", "")
            self.console.append({"level": "exception", "text": text, "url": details.get("url", "")})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"level": entry.get("level"), "text": entry.get("text", ""),
                                 "url": entry.get("url", "")})

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            my_id = self._id
            self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = json.loads(self.ws.recv())
                if msg.get("id") == my_id:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})
                self._record(msg)
        raise TimeoutError(method)

    def pump(self, seconds: float) -> None:
        """Let events arrive (console messages) for a while."""
        self.evaluate(f"new Promise(r => setTimeout(r, {int(seconds * 1000)}))", await_promise=True)

    def evaluate(self, expression: str, await_promise: bool = True, timeout: float = 60.0) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": await_promise,
                                                "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError((details.get("exception") or {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except RuntimeError as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout} s for {expression!r}; last value {last!r}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def screenshot(self, path: str | Path, fmt: str = "png", quality: int = 85) -> Path:
        params: dict[str, Any] = {"format": fmt}
        if fmt == "jpeg":
            params["quality"] = quality
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


class Chromium:
    """Headless Chromium with remote debugging on 127.0.0.1; one page per instance."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="uniba-chromium-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             f"--remote-debugging-port={self.port}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        targets = None
        while time.monotonic() < deadline:
            try:
                targets = http_json(f"http://127.0.0.1:{self.port}/json/list", timeout=2)
                if any(t.get("type") == "page" for t in targets):
                    break
            except OSError:
                time.sleep(0.3)
        if not targets:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port")
        page = next(t for t in targets if t.get("type") == "page")
        self.page = Page(page["webSocketDebuggerUrl"])
        self.page.send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        if getattr(self, "page", None):
            self.page.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def comfy_and_browser(comfyui_dir: str | Path, base_dir: str | Path, executable: str) -> Iterator[tuple[ComfyServer,
                                                                                                      Chromium]]:
    server = ComfyServer(comfyui_dir, base_dir, Path(base_dir) / "comfyui.log")
    server.start()
    browser = None
    try:
        browser = Chromium(executable)
        yield server, browser
    finally:
        if browser:
            browser.close()
        server.stop()
