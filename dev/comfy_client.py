"""A small client for a running ComfyUI server: queue an API-format graph, follow it on the websocket,
read the results. Standard library for HTTP, aiohttp (a ComfyUI dependency) for the websocket.

Used by the end-to-end tests and the demo; the headless command-line client builds on it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Callable


class ComfyError(RuntimeError):
    """The server refused or failed a graph; ``details`` holds the server's JSON answer."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    messages: list[tuple[str, dict]] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    error: dict | None = None

    def progress(self, node: str | None = None) -> list[tuple[int, int]]:
        """(value, max) of every ``progress`` message, optionally of one node."""
        return [
            (d["value"], d["max"])
            for ev, d in self.messages
            if ev == "progress" and (node is None or str(d.get("node")) == str(node))
        ]

    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def images(self) -> list[dict]:
        """Every image (filename, subfolder, type) the graph's output nodes reported."""
        found = []
        for out in self.outputs().values():
            found.extend(out.get("images", []))
        return found


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    # -- plain HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (loopback URL)
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str):
        status, raw = self.request("GET", path)
        if status != 200:
            raise ComfyError(f"GET {path} answered HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, graph: dict) -> str:
        status, raw = self.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        answer = json.loads(raw or b"{}")
        if status != 200:
            raise ComfyError(format_errors(answer), answer)
        return answer["prompt_id"]

    def interrupt(self) -> None:
        self.request("POST", "/interrupt", {})

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")}
        )
        status, raw = self.request("GET", f"/view?{query}")
        if status != 200:
            raise ComfyError(f"/view of {image} answered HTTP {status}")
        return raw

    def wait_until_up(self, deadline_s: float = 120.0, is_alive: Callable[[], bool] = lambda: True) -> None:
        t_end = time.time() + deadline_s
        while time.time() < t_end:
            if not is_alive():
                raise ComfyError("the ComfyUI server exited during start-up (see its log)")
            try:
                if self.request("GET", "/system_stats")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ComfyError(f"ComfyUI at {self.base_url} did not answer within {deadline_s:.0f}s")

    # -- websocket --------------------------------------------------------------------------------
    def run(
        self,
        graph: dict,
        timeout: float = 600.0,
        on_message: Callable[[str, dict], None] | None = None,
    ) -> RunResult:
        """Queue ``graph`` and follow it on ``/ws`` until it ends; raises ComfyError on validation errors."""
        return asyncio.run(self._run(graph, timeout, on_message))

    async def _run(self, graph: dict, timeout: float, on_message) -> RunResult:
        import aiohttp

        ws_url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, heartbeat=30) as ws:
                prompt_id = await asyncio.to_thread(self.queue, graph)
                result = RunResult(prompt_id=prompt_id, status="running")
                deadline = time.time() + timeout
                while True:
                    remaining = deadline - time.time()
                    if remaining <= 0:
                        raise ComfyError(f"graph {prompt_id} did not finish within {timeout:.0f}s")
                    msg = await ws.receive(timeout=remaining)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        continue  # previews
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise ComfyError(f"websocket closed while waiting for {prompt_id}: {msg.type}")
                    payload = json.loads(msg.data)
                    event, data = payload.get("type"), payload.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    result.messages.append((event, data))
                    if on_message is not None:
                        on_message(event, data)
                    if event == "execution_error":
                        result.status, result.error = "error", data
                    elif event == "execution_interrupted":
                        result.status = "interrupted"
                    elif event == "execution_success":
                        result.status = "success"
                    if event == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
                    if event in ("execution_error", "execution_interrupted"):
                        break
        result.history = await asyncio.to_thread(self._history_when_stored, prompt_id)
        return result

    def _history_when_stored(self, prompt_id: str, wait_s: float = 10.0) -> dict:
        t_end = time.time() + wait_s
        while True:
            h = self.history(prompt_id)
            if h or time.time() > t_end:
                return h
            time.sleep(0.1)


def format_errors(answer: dict) -> str:
    """The server's validation answer as lines a person can read."""
    lines = []
    err = answer.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'error')}: {err.get('details', '')}".rstrip(": "))
    elif err:
        lines.append(str(err))
    for node_id, info in (answer.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines) or json.dumps(answer)[:2000]


def format_execution_error(error: dict) -> str:
    return (
        f"node {error.get('node_id')} ({error.get('node_type')}) failed: "
        f"{error.get('exception_type', '')}: {error.get('exception_message', '').strip()}"
    )


# -- command line ---------------------------------------------------------------------------------------------
def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, true/false, lists), otherwise the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(graph: dict, overrides: list[str]) -> dict:
    """``node.input=value`` overrides; node is the node id or its class_type when unique."""
    graph = json.loads(json.dumps(graph))
    for item in overrides:
        target, sep, value = item.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot or not node or not name:
            raise ComfyError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 3.seed=42 or KSampler.steps=30")
        if node not in graph:
            matches = [k for k, v in graph.items() if v.get("class_type") == node]
            if len(matches) != 1:
                raise ComfyError(f"--set {item!r}: no node with id {node!r}"
                                 + (f"; class {node!r} is used by nodes {matches}" if matches else ""))
            node = matches[0]
        inputs = graph[node].setdefault("inputs", {})
        if name not in inputs:
            raise ComfyError(f"--set {item!r}: node {node} ({graph[node].get('class_type')}) has no input {name!r}; "
                             f"it has {', '.join(sorted(inputs))}")
        if isinstance(inputs[name], list):
            raise ComfyError(f"--set {item!r}: {name!r} is a link from another node, not a value")
        inputs[name] = parse_value(value)
    return graph


def _progress_printer(stream):
    def show(event: str, data: dict) -> None:
        if event == "progress":
            width = 30
            done = int(width * data["value"] / max(1, data["max"]))
            stream.write(f"\r  node {data['node']}: [{'#' * done}{'.' * (width - done)}] {data['value']}/{data['max']}")
            if data["value"] >= data["max"]:
                stream.write("\n")
            stream.flush()
        elif event == "executing" and data.get("node"):
            stream.write(f"running node {data['node']}\n")
        elif event == "execution_cached" and data.get("nodes"):
            stream.write(f"cached: {', '.join(map(str, data['nodes']))}\n")

    return show


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(
        description="Queue an API-format workflow on a ComfyUI server, follow its progress, download its outputs.")
    ap.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/dci_vs_plain.json)")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override an input, e.g. --set 3.seed=42 --set DCIPromptEncode.text='a sks dog'")
    ap.add_argument("--out", default="comfy-outputs", help="folder for the downloaded outputs (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    args = ap.parse_args(argv)
    try:
        graph = json.loads(Path(args.workflow).read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read {args.workflow}: {e}", file=sys.stderr)
        return 2
    if not isinstance(graph, dict) or not all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        print(f"{args.workflow} is not an API-format workflow (export it with 'Save (API)')", file=sys.stderr)
        return 2
    client = ComfyClient(args.server, timeout=30)
    try:
        graph = apply_overrides(graph, args.overrides)
        result = client.run(graph, timeout=args.timeout, on_message=_progress_printer(sys.stderr))
    except ComfyError as e:
        print(f"the server refused the workflow:\n{e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        print(f"cannot reach ComfyUI at {args.server}: {e}", file=sys.stderr)
        return 1
    if result.status != "success":
        detail = format_execution_error(result.error) if result.error else result.status
        print(f"the workflow did not finish: {detail}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in result.images():
        name = Path(image["filename"]).name
        target, n = out / name, 1
        while target.exists():  # never overwrite an earlier download
            target, n = out / f"{Path(name).stem}-{n}{Path(name).suffix}", n + 1
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(client.view(image))
        tmp.replace(target)
        print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
