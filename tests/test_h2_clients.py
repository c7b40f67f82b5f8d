"""Independent HTTP/2 clients against a real ``rawsse serve`` over h2c with prior knowledge:
curl, nghttp2's ``nghttp`` and ``h2load``, and Node's ``http2`` module."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from test_push_api import new_token


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (.ci/run installs it)")
    return path


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, input=stdin)


def test_curl_prior_knowledge_push_and_bad_token(server):
    curl = need("curl")
    url = f"{server.url}/3/device/{new_token()}"
    ok = run(curl, "-s", "-i", "--http2-prior-knowledge", "-H", "apns-topic: com.example",
             "-d", '{"aps":{}}', url)
    assert ok.stdout.startswith("HTTP/2 200"), ok.stdout + ok.stderr
    assert "apns-id: " in ok.stdout
    bad = run(curl, "-s", "-i", "--http2-prior-knowledge", "-d", "{}", f"{server.url}/3/device/zz")
    assert bad.stdout.startswith("HTTP/2 400"), bad.stdout
    assert json.loads(bad.stdout.split("\n\n", 1)[1]) == {"reason": "BadDeviceToken"}


def test_nghttp_posts_a_push(server, tmp_path):
    nghttp = need("nghttp")
    body = tmp_path / "push.json"
    body.write_text('{"aps":{}}')
    result = run(nghttp, "-v", "-d", str(body), f"{server.url}/3/device/{new_token()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ":status: 200" in result.stdout and "apns-id:" in result.stdout


def test_h2load_5_connections_100_streams_all_2xx(server, tmp_path):
    h2load = need("h2load")
    body = tmp_path / "push.json"
    body.write_text('{"aps":{}}')
    result = run(h2load, "-c", "5", "-m", "100", "-n", "5000", "-d", str(body),
                 f"{server.url}/3/device/{new_token()}")
    assert "5000 succeeded" in result.stdout, result.stdout + result.stderr
    assert "status codes: 5000 2xx" in result.stdout, result.stdout


NODE_CLIENT = r"""
const http2 = require('http2');
const [url, token, count] = process.argv.slice(2);
const session = http2.connect(url);
let pending = Number(count), statuses = [];
for (let i = 0; i < Number(count); i++) {
  const req = session.request({':method': 'POST', ':path': '/3/device/' + token,
                               'apns-topic': 'com.example', 'apns-push-type': 'alert'});
  req.on('response', (h) => statuses.push([h[':status'], h['apns-id'] || null]));
  req.on('data', () => {});
  req.on('end', () => { if (--pending === 0) { console.log(JSON.stringify(statuses)); session.close(); } });
  req.end(JSON.stringify({aps: {alert: 'hello ' + i}}));
}
session.on('error', (e) => { console.error(e); process.exit(1); });
"""


def test_node_http2_module_posts_pushes(server, tmp_path):
    node = need("node")
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    result = run(node, str(script), server.url, new_token(), "20")
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    assert len(statuses) == 20 and all(s == 200 and i for s, i in statuses)
