"""The live view's figures, read over real sockets from a two-worker node shared by the module;
each test counts from what it sees first, so the order of the tests does not matter."""

from __future__ import annotations

from typing import Iterator

import pytest

from conftest import Server, launch
from wire import HTTPClient, SSEReader, build_request, get_json, wait_for

DEVICE = "d1"  # token prefix: each test adds its own suffix


@pytest.fixture(scope="module")
def node() -> Iterator[Server]:
    server, holders = launch("--keepalive", "0")  # two workers: viewers cross the mesh
    yield server
    server.stop()
    for holder in holders:
        holder.close()


def _push(client: HTTPClient, token: str, count: int, delay: str | None = None) -> list[int]:
    headers = {"rawsse-delivery-delay": delay} if delay else {}
    request = build_request("POST", f"/3/device/{token}", b'{"aps":{}}', headers)
    client.send(request * count)
    return [r.status for r in client.read_responses(count)]


def _latency(node: Server) -> dict[str, int]:
    return get_json(node.host, node.admin_port, "/stats")["node"]["delivery_latency"]


def test_stats_count_live_deliveries_by_latency_bucket_across_workers(node, readers):
    token = DEVICE + "cc"
    readers.append(SSEReader(node.host, node.port, token))
    before = _latency(node)
    client = HTTPClient(node.host, node.port)
    try:  # the connection lands on either worker; the owner may be the other one
        assert _push(client, token, 5, delay="300ms") == [200] * 5
        assert _push(client, token, 5) == [200] * 5
    finally:
        client.close()
    assert wait_for(lambda: sum(_latency(node).values()) - sum(before.values()) == 10)
    grown = {label: n - before[label] for label, n in _latency(node).items() if n > before[label]}
    assert grown.get("0.5") == 5  # 300 ms: the (0.2 s, 0.5 s] bucket
    assert sum(n for label, n in grown.items() if float(label) <= 0.1) == 5, grown
