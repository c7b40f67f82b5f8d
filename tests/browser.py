"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe``: the browser reads commands on fd 3 and writes replies and events on
fd 4, each a JSON message ended by a NUL byte (chromium ``content/browser/devtools/
devtools_pipe_handler.cc``). No websocket, no driver binary, no npm: the test loads a page,
reads its DOM with ``Runtime.evaluate`` as often as it likes and takes ``Page.captureScreenshot``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Any

from conftest import _die_with_parent


def chromium_binary() -> str | None:
    """Debian's chromium; installed here when missing (as root with apt), as ``.ci/run`` does."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(step, env=env, check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        found = shutil.which("chromium")
    return found


def _pipe_above_4() -> tuple[int, int]:
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


class Browser:
    """One headless Chromium with one page (``session``)."""

    def __init__(self, binary: str, profile: str, width: int = 1280, height: int = 900) -> None:
        to_browser_r, self._to_browser = _pipe_above_4()
        self._from_browser, from_browser_w = _pipe_above_4()
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        # The pipe ends must be fds 3 and 4 in the browser: bash moves them there (from
        # above 4, so moving one never closes the other).
        script = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, "bash", *args],
                                     pass_fds=(to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 10.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise EOFError("chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def page(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.call(method, params, self.session)

    def open(self, url: str) -> None:
        self.page("Page.enable")
        self.page("Page.navigate", {"url": url})

    def text(self, element_id: str) -> str | None:
        """The rendered text of ``#element_id`` (None while there is no such element)."""
        result = self.page("Runtime.evaluate", {
            "expression": f"(e => e && e.textContent)(document.getElementById({element_id!r}))",
            "returnByValue": True})
        return result.get("result", {}).get("value")

    def wait_text(self, element_id: str, predicate: Any, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.text(element_id)
            if value is not None and predicate(value):
                return value
            time.sleep(0.05)
        raise TimeoutError(f"#{element_id} is {self.text(element_id)!r}")

    def screenshot(self, path: str) -> None:
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the browser's processes
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
