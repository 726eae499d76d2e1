"""Headless Chromium driven over the Chrome DevTools Protocol, for tests of the real ComfyUI front end.

Why this driver: the host already has aiohttp, whose websocket client speaks everything the tests need
(evaluate JavaScript and await its promises, navigate, take screenshots, collect console errors) in a
page of code. Playwright would add a ~40 MB wheel with a bundled Node.js driver to the pinned host (and a
rebuild of every cached host) for no extra capability here; Selenium would need chromedriver as well.
The browser itself is Debian's ``chromium`` (``make test`` installs it where it can; no browser is ever
downloaded by a test tool).

    with Chromium() as browser:
        browser.navigate("http://127.0.0.1:8188/")
        browser.wait_for("!!(window.app && window.app.graph)")
        browser.evaluate("window.app.graph.nodes.length")
        browser.screenshot(Path("graph.png"))

The API is synchronous: the class owns an event loop and runs each call to completion on it, so it works
in plain (module-scoped) pytest fixtures without an asyncio plugin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

# Flags that let Chromium run as root in a container with no display, GPU or outside network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
)
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` if set, else Debian's, else one on ``PATH``; None if absent."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """The browser did not start, a protocol call failed, or page JavaScript threw."""


class Chromium:
    """One headless Chromium with a fresh profile and one page (tab), stopped on ``close()``/exit."""

    def __init__(self, executable: str | None = None, width: int = 1600, height: int = 1000):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("Chromium is not installed (Debian: apt-get install chromium)")
        self.width, self.height = width, height
        self.console_errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self._proc: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._reader: asyncio.Task | None = None

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> Chromium:
        log = open(Path(self._profile) / "chromium.log", "wb")
        self._proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        try:
            self._loop.run_until_complete(self._connect(timeout_s))
        except BaseException:
            self.close()
            raise
        return self

    async def _connect(self, timeout_s: float) -> None:
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None:
                raise BrowserError(f"Chromium exited with {self._proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise BrowserError(f"Chromium did not open its DevTools port:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            async with self._session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
                page = await r.json()
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = self._loop.create_task(self._read())
        await self._send("Runtime.enable")
        await self._send("Page.enable")
        await self._send("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def log(self) -> str:
        path = Path(self._profile) / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        async def shut() -> None:
            if self._reader is not None:
                self._reader.cancel()
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()

        try:
            self._loop.run_until_complete(shut())
        finally:
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, 15)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, 9)
                    self._proc.wait(timeout=10)
            self._proc = None
            self._loop.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- protocol ---------------------------------------------------------------------------------------

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console_errors.append(_describe(details))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                args = data["params"].get("args", [])
                self.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def _send(self, method: str, params: dict | None = None, timeout_s: float = 60.0) -> dict:
        self._next_id += 1
        fut = self._loop.create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(fut, timeout_s)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def call(self, method: str, params: dict | None = None, timeout_s: float = 60.0) -> dict:
        """One DevTools Protocol command; its ``result``."""
        return self._loop.run_until_complete(self._send(method, params, timeout_s))

    # -- page -------------------------------------------------------------------------------------------

    def evaluate(self, expression: str, timeout_s: float = 60.0):
        """The JSON value of a JavaScript expression in the page; a promise is awaited. Raises on a throw."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True},
            timeout_s,
        )
        if "exceptionDetails" in result:
            raise BrowserError(_describe(result["exceptionDetails"]))
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")

    def wait_for(self, expression: str, timeout_s: float = 60.0, poll_s: float = 0.1):
        """Poll until a JavaScript expression is truthy (errors count as not yet); its value."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                value = self.evaluate(expression, timeout_s=max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except (BrowserError, asyncio.TimeoutError) as e:
                last = e
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s:.0f}s waiting for {expression!r}"
                                   + (f" (last error: {last})" if last else ""))
            self._loop.run_until_complete(asyncio.sleep(poll_s))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def _describe(details: dict) -> str:
    exc = details.get("exception") or {}
    return exc.get("description") or details.get("text") or json.dumps(details)[:500]
