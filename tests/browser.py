"""A real headless Chromium driven over the DevTools protocol (CDP), for checking HTML the project writes.

:func:`load_page` starts ``chromium --headless`` with its own profile and a free DevTools port, opens a
file, waits for the load event and returns what the page did: console messages and exceptions, the log
(failed loads, CSP violations), and the result of a JavaScript expression evaluated in the page. The
websocket client is aiohttp's (a dependency of ``ray[default]``). Chromium: Debian's ``chromium``
(``.ci/run`` installs it when missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["chromium_path", "PageResult", "load_page", "screenshot"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no chromium on PATH: apt-get install -y chromium (.ci/run does)")


def _base_args(profile: str) -> list[str]:
    return [
        chromium_path(),
        "--headless",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ]


@dataclass
class PageResult:
    console: list[dict[str, Any]] = field(default_factory=list)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    value: Any = None

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error-level log entries, as text."""
        out = [json.dumps(c.get("args", [])) for c in self.console if c.get("type") in ("error", "assert")]
        out += [e.get("exceptionDetails", {}).get("text", "exception") for e in self.exceptions]
        out += [e.get("entry", {}).get("text", "") for e in self.log if e.get("entry", {}).get("level") == "error"]
        return out


def load_page(path: Path, expression: str, *, timeout_s: float = 60.0) -> PageResult:
    """Open ``path`` in headless Chromium; collect console/log errors; evaluate ``expression`` after load."""
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [*_base_args(profile), "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the renderers it forks end with it
        )
        try:
            port = _devtools_port(Path(profile), proc, timeout_s)
            return asyncio.run(asyncio.wait_for(_drive(port, path.resolve().as_uri(), expression), timeout_s))
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the chromium this module started, and its process group (its own children only)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    time.sleep(0.2)  # children leaving the profile folder


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening its DevTools port")
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


async def _drive(port: int, url: str, expression: str) -> PageResult:
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as resp:
        target = next(t for t in json.load(resp) if t.get("type") == "page")
    result = PageResult()
    async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"]) as ws:
        ids = iter(range(1, 1_000_000))
        pending: dict[int, asyncio.Future[Any]] = {}
        loaded = asyncio.get_running_loop().create_future()

        async def reader() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                elif data.get("method") == "Runtime.consoleAPICalled":
                    result.console.append(data["params"])
                elif data.get("method") == "Runtime.exceptionThrown":
                    result.exceptions.append(data["params"])
                elif data.get("method") == "Log.entryAdded":
                    result.log.append(data["params"])
                elif data.get("method") == "Page.loadEventFired" and not loaded.done():
                    loaded.set_result(True)

        async def call(method: str, **params: Any) -> Any:
            i = next(ids)
            pending[i] = asyncio.get_running_loop().create_future()
            await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
            return await pending[i]

        task = asyncio.create_task(reader())
        for domain in ("Runtime", "Log", "Page"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        await loaded
        await asyncio.sleep(0.5)  # late console messages / image decodes
        reply = await call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        result.value = reply.get("result", {}).get("result", {}).get("value")
        task.cancel()
    return result


def screenshot(path: Path, png: Path, *, width: int = 1200, height: int = 1500) -> None:
    """A full-window PNG screenshot of ``path`` (``chromium --headless --screenshot``)."""
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        subprocess.run(
            [
                *_base_args(profile),
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                path.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
