"""The live view: ``GET /stats/events`` (the figures as SSE, one collection a second per node) and
``GET /dashboard`` (the page), read over real sockets and rendered in headless Chromium.

One two-worker node serves the module; each test counts from what it sees first (streams,
errors), so the order of the tests does not matter."""

from __future__ import annotations

import os
import socket
from typing import Iterator

import pytest

from browser import Browser, chromium_binary
from conftest import Server, launch
from rawsse.config import ServeConfig
from rawsse.node.routing import owner_of
from rawsse.server.statsevents import STALL_SECONDS
from rawsse.server.worker import Worker
from viewer import Viewer
from wire import HTTPClient, SSEReader, build_request, get_json, wait_for

DEVICE = "d1"  # token prefix: each test adds its own suffix


@pytest.fixture(scope="module")
def node() -> Iterator[Server]:
    server, holders = launch("--keepalive", "0")  # two workers: viewers cross the mesh
    yield server
    server.stop()
    for holder in holders:
        holder.close()


@pytest.fixture
def viewers() -> Iterator[list[Viewer]]:
    opened: list[Viewer] = []
    yield opened
    for viewer in opened:
        viewer.close()


def _push(client: HTTPClient, token: str, count: int, delay: str | None = None) -> list[int]:
    headers = {"rawsse-delivery-delay": delay} if delay else {}
    request = build_request("POST", f"/3/device/{token}", b'{"aps":{}}', headers)
    client.send(request * count)
    return [r.status for r in client.read_responses(count)]


def _latency(node: Server) -> dict[str, int]:
    return get_json(node.host, node.admin_port, "/stats")["node"]["delivery_latency"]


def test_stats_count_live_deliveries_by_latency_bucket_across_workers(node, readers):
    # One device per worker: whichever worker takes the sender's connection, the pushes to one
    # of them cross the mesh (their receipt time travels in the PUSH record).
    tokens = [next(DEVICE + f"c{i}" for i in range(10)
                   if owner_of(bytes.fromhex(DEVICE + f"c{i}"), 2) == owner) for owner in (0, 1)]
    readers.extend(SSEReader(node.host, node.port, token) for token in tokens)
    before = _latency(node)
    client = HTTPClient(node.host, node.port)
    try:
        for token in tokens:
            assert _push(client, token, 5, delay="300ms") == [200] * 5
            assert _push(client, token, 5) == [200] * 5
    finally:
        client.close()
    assert wait_for(lambda: sum(_latency(node).values()) - sum(before.values()) == 20)
    grown = {label: n - before[label] for label, n in _latency(node).items() if n > before[label]}
    assert grown.get("0.5") == 10  # 300 ms: the (0.2 s, 0.5 s] bucket
    assert sum(n for label, n in grown.items() if float(label) <= 0.1) == 10, grown


def test_the_page_is_one_self_contained_file_never_cached(node):
    client = HTTPClient(node.host, node.admin_port)
    try:
        page, post = client.request("GET", "/dashboard"), client.request("POST", "/dashboard")
    finally:
        client.close()
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    body = page.body.decode()
    assert "<canvas" in body and 'new EventSource("stats/events")' in body
    for external in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert external not in body, external  # works on a VM without internet
    assert post.status == 405 and post.json() == {"reason": "MethodNotAllowed"}


def test_the_figures_follow_streams_pushes_latency_and_errors(node, viewers, readers):
    viewer = Viewer(node.host, node.admin_port)
    viewers.append(viewer)
    assert viewer.status == 200 and viewer.head["content-type"] == "text/event-stream"
    first = viewer.next()
    assert [w["worker"] for w in first["workers"]] == [0, 1]
    token = DEVICE + "aa"
    readers.append(SSEReader(node.host, node.port, token))
    seen = viewer.until(lambda d: d["streams"] == first["streams"] + 1)
    assert sum(w["streams"] for w in seen["workers"]) == seen["streams"]
    assert seen["rates"]["reconnects"] > 0  # the device's connect is in that second
    client = HTTPClient(node.host, node.port)
    try:
        assert _push(client, token, 20) == [200] * 20
        assert _push(client, token, 10, delay="300ms") == [200] * 10  # delivered 0.3 s later
        assert _push(client, "zz", 3) == [400] * 3
    finally:
        client.close()
    ok = deliveries = 0.0
    slow: list[float] = []  # p99 of the intervals that hold delayed deliveries
    errors: list[dict] = []

    def add_up(doc: dict) -> bool:
        nonlocal ok, deliveries
        rates, latency = doc["rates"], doc["latency"]
        if rates:
            ok += rates["by_status"].get("200", 0) * rates["elapsed"]
        if latency:
            deliveries += latency["deliveries"]
            assert 0 <= latency["p50"] <= latency["p99"]
            if latency["p99"] >= 0.2:
                slow.append(latency["p99"])
        errors[:] = doc["errors"]
        return deliveries >= 30 and round(ok) >= 30 and bool(errors)

    viewer.until(add_up, timeout=6)
    assert round(deliveries) == 30
    assert slow and all(0.2 <= p99 <= 0.5 for p99 in slow)  # the 300 ms bucket: 200-500 ms
    assert any(e["what"] == "push answered 400 BadDeviceToken" and e["count"] == 3
               for e in errors), errors


def test_every_viewer_of_the_node_gets_the_same_collection_and_16_at_most(node, viewers):
    viewers.extend(Viewer(node.host, node.admin_port) for _ in range(16))
    assert [v.status for v in viewers] == [200] * 16
    refused = Viewer(node.host, node.admin_port)
    try:
        assert refused.status == 503
        assert b'"at most 16 /stats/events viewers per node"' in refused.buffer
    finally:
        refused.close()
    # Whichever worker accepted each one, they read worker 0's frames: the same bytes.
    firsts = [v.next() for v in viewers]
    target = max(doc["seq"] for doc in firsts) + 1
    for viewer in viewers:
        viewer.until(lambda doc: doc["seq"] >= target)
    frames = {next(raw for raw in v.raw if b'"seq":%d,' % target in raw) for v in viewers}
    assert len(frames) == 1
    viewers.pop().close()  # a freed place is taken again, once worker 0 has read the close

    def admitted() -> bool:
        viewer = Viewer(node.host, node.admin_port)
        if viewer.status == 200:
            viewers.append(viewer)
            return True
        viewer.close()
        return False

    assert wait_for(admitted, timeout=3)


def test_the_dashboard_renders_in_headless_chromium(node, readers, viewers, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Debian's chromium is not installed and apt-get could not install it")
    viewers.extend(Viewer(node.host, node.admin_port) for _ in range(16))  # the page gets 503
    browser = Browser(binary, str(tmp_path / "profile"))
    try:
        browser.open(node.admin_url + "/dashboard")
        browser.wait_text("state", lambda t: t == "reconnecting\u2026")
        for viewer in viewers:
            viewer.close()
        viewers.clear()
        browser.wait_text("state", lambda t: t == "live")  # it tried again by itself
        before = int(browser.wait_text("streams", lambda t: t.replace(",", "").isdigit())
                     .replace(",", ""))
        readers.append(SSEReader(node.host, node.port, DEVICE + "bb"))
        browser.wait_text("streams", lambda t: t.replace(",", "") == str(before + 1))
        rows = browser.page("Runtime.evaluate", {
            "expression": "document.querySelectorAll('#workers tr').length",
            "returnByValue": True})["result"]["value"]
        assert rows == 2
        shot = tmp_path / "dashboard.png"
        browser.screenshot(str(shot))
    finally:
        browser.close()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_viewer_that_stops_reading_holds_one_frame_and_is_closed_after_30_seconds():
    """In-process, over a real socketpair whose reader never reads: each second's frame is
    skipped while the last one is not all in the kernel, and 30 s of that closes the viewer."""
    worker = Worker(ServeConfig(keepalive=0))
    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setblocking(False)  # as every accepted socket is (Worker.accept)
        hub = worker.stats_events
        hub.adopt(os.dup(ours.fileno()), b"", registered=False)  # the first collection, at once
        (viewer,) = hub.viewers
        frames = [hub.last_frame]
        while not viewer.out:  # until the kernel buffer is full
            hub._collected(worker.snapshot())
            frames.append(hub.last_frame)
            assert len(frames) < 1000
        for _ in range(STALL_SECONDS):
            hub._collected(worker.snapshot())
            # what waits is the rest of one frame, never a backlog
            assert viewer.fd >= 0 and any(frame.endswith(viewer.out) for frame in frames)
        hub._collected(worker.snapshot())
        assert viewer.fd == -1 and not hub.viewers
    finally:
        ours.close()
        theirs.close()
        worker.loop.close()
