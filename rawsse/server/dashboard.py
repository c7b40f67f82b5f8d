"""``GET /dashboard``: the live view, one self-contained page (no external assets).

Plain HTML, inline CSS and inline JavaScript: it must work on a VM without internet, reached
through an SSH tunnel to the operator listener (``docs/runbook.md``). The page opens an
``EventSource`` on ``stats/events`` (relative, so a tunnel or a path prefix keeps working) and
redraws on each event (``statsevents.py``, ``figures.py``): big numbers, two sparklines
(pushes/s received and streams, the last two minutes), a table per worker, one per node in
Redis mode, and the recent errors. It reconnects by itself when the node restarts, and retries
every second after a refusal (503: too many viewers, worker 0 being replaced).

Elements a test reads carry ids (``streams``, ``received``, ``p50``, …: ``tests/test_dashboard.py``).
"""

from __future__ import annotations

from rawsse.server.exchange import Answer

PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rawsse live view</title>
<style>
  :root { --fg: #1d2330; --dim: #667085; --line: #e4e7ec; --bg: #f8f9fb; --accent: #2563eb;
          --bad: #c2410c; --ok: #15803d; }
  * { box-sizing: border-box; }
  body { margin: 0; padding: 16px 24px; font: 14px/1.4 system-ui, sans-serif; color: var(--fg);
         background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
  h1 { font-size: 18px; margin: 0; }
  h2 { font-size: 14px; margin: 20px 0 6px; color: var(--dim); font-weight: 600;
       text-transform: uppercase; letter-spacing: .04em; }
  #state { font-size: 13px; color: var(--dim); }
  #state.live { color: var(--ok); }
  #state.down { color: var(--bad); }
  .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
           gap: 10px; margin-top: 12px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
  .card .label { font-size: 12px; color: var(--dim); }
  .card .value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums;
                 white-space: nowrap; }
  .card .sub { font-size: 12px; color: var(--dim); min-height: 1.4em; }
  .sparks { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 10px; }
  canvas { width: 100%; height: 70px; display: block; }
  table { border-collapse: collapse; background: #fff; border: 1px solid var(--line);
          font-variant-numeric: tabular-nums; }
  th, td { padding: 4px 12px; text-align: right; border-bottom: 1px solid var(--line); }
  th { font-size: 12px; color: var(--dim); font-weight: 600; }
  td:first-child, th:first-child { text-align: left; }
  #errors { list-style: none; padding: 0; margin: 0; background: #fff;
            border: 1px solid var(--line); border-radius: 8px; max-width: 900px; }
  #errors li { padding: 4px 12px; border-bottom: 1px solid var(--line); }
  #errors li .when { color: var(--dim); margin-right: 8px; font-variant-numeric: tabular-nums; }
  #errors li.none { color: var(--dim); }
  .bad { color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>rawsse <span id="node"></span></h1>
  <span id="state">connecting&hellip;</span>
  <span id="seq" hidden></span>
</header>
<div class="cards">
  <div class="card"><div class="label">streams</div><div class="value" id="streams">&ndash;</div>
    <div class="sub" id="connections"></div></div>
  <div class="card"><div class="label">pushes/s received</div><div class="value" id="received">&ndash;</div>
    <div class="sub" id="statuses"></div></div>
  <div class="card"><div class="label">delivered/s</div><div class="value" id="delivered">&ndash;</div>
    <div class="sub">written to streams</div></div>
  <div class="card"><div class="label">delivery latency p50</div><div class="value" id="p50">&ndash;</div>
    <div class="sub" id="deliveries"></div></div>
  <div class="card"><div class="label">delivery latency p99</div><div class="value" id="p99">&ndash;</div>
    <div class="sub">receipt to write, last second</div></div>
  <div class="card"><div class="label">pending</div><div class="value" id="pending">&ndash;</div>
    <div class="sub" id="delayed"></div></div>
  <div class="card"><div class="label">reconnects/s</div><div class="value" id="reconnects">&ndash;</div>
    <div class="sub">device streams opened</div></div>
  <div class="card"><div class="label">memory per stream</div><div class="value" id="memory">&ndash;</div>
    <div class="sub" id="uss"></div></div>
</div>
<div class="sparks">
  <div><h2>pushes/s received</h2><canvas id="spark-received" width="680" height="140"></canvas></div>
  <div><h2>streams</h2><canvas id="spark-streams" width="680" height="140"></canvas></div>
</div>
<h2>workers</h2>
<table><thead><tr><th>worker</th><th>pid</th><th>streams</th><th>http</th><th>pending</th>
  <th>received/s</th><th>200/s</th><th>USS</th></tr></thead><tbody id="workers"></tbody></table>
<div id="nodes-section" hidden>
<h2>nodes (Redis)</h2>
<table><thead><tr><th>node</th><th>streams</th><th>connections</th><th>pending</th>
  <th>received/s</th><th>USS</th></tr></thead><tbody id="nodes"></tbody></table>
</div>
<h2>recent errors</h2>
<ul id="errors"><li class="none">none</li></ul>
<script>
"use strict";
const HISTORY = 120;
const history = { received: [], streams: [] };
const $ = (id) => document.getElementById(id);

function count(n) {
  if (n === null || n === undefined) return "\\u2013";
  return Math.round(n).toLocaleString("en-US");
}
function rate(n) {
  if (n === null || n === undefined) return "\\u2013";
  return n >= 100 ? count(n) : (Math.round(n * 10) / 10).toString();
}
function bytes(n) {
  if (n === null || n === undefined) return "\\u2013";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : Math.round(n)) + " " + units[i];
}
function seconds(s) {
  if (s === null || s === undefined) return "\\u2013";
  if (s < 0.001) return Math.round(s * 1e6) + " \\u00b5s";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}

function spark(id, values) {
  const canvas = $(id), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (!values.length) return;
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#2563eb"; ctx.lineWidth = 2; ctx.beginPath();
  values.forEach((v, i) => {
    const x = w - (values.length - 1 - i) * (w / (HISTORY - 1));
    const y = h - 4 - (v / max) * (h - 24);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#667085"; ctx.font = "22px system-ui, sans-serif";
  ctx.fillText("max " + count(max), 6, 22);
}

function remember(name, value) {
  const list = history[name];
  list.push(value || 0);
  if (list.length > HISTORY) list.shift();
}

function render(f) {
  $("seq").textContent = f.seq;
  $("node").textContent = f.node_id ? "node " + f.node_id : "";
  $("streams").textContent = count(f.streams);
  $("connections").textContent = count(f.connections) + " connections, " +
    f.workers_up + " workers";
  $("pending").textContent = count(f.pending);
  $("delayed").textContent = count(f.delayed) + " waiting a delay";
  $("memory").textContent = bytes(f.memory.uss_per_stream);
  $("uss").textContent = "USS " + bytes(f.memory.uss_bytes) + ", RSS " + bytes(f.memory.rss_bytes);
  const r = f.rates;
  $("received").textContent = rate(r && r.received);
  $("delivered").textContent = rate(r && r.delivered);
  $("reconnects").textContent = rate(r && r.reconnects);
  $("statuses").textContent = r ? Object.entries(r.by_status)
    .filter(([s, v]) => s === "200" || v > 0).map(([s, v]) => s + ": " + rate(v)).join("  ") : "";
  const l = f.latency;
  $("p50").textContent = seconds(l && l.p50);
  $("p99").textContent = seconds(l && l.p99);
  $("deliveries").textContent = l ? count(l.deliveries) + " live deliveries" : "no live delivery";
  remember("received", r && r.received);
  remember("streams", f.streams);
  spark("spark-received", history.received);
  spark("spark-streams", history.streams);

  const workers = $("workers");
  workers.replaceChildren();
  for (const w of f.workers) {
    const row = workers.insertRow();
    [w.worker, w.pid, count(w.streams), count(w.http_connections), count(w.pending),
     rate(w.received_per_s), rate(w.ok_per_s), bytes(w.uss_bytes)].forEach((t) => cell(row, t));
  }
  $("nodes-section").hidden = !f.nodes.length;
  const nodes = $("nodes");
  nodes.replaceChildren();
  for (const n of f.nodes) {
    const row = nodes.insertRow();
    [n.node + (n.here ? " (this one)" : ""), count(n.streams), count(n.connections),
     count(n.pending), rate(n.received_per_s), bytes(n.uss_bytes)].forEach((t) => cell(row, t));
  }
  const errors = $("errors");
  errors.replaceChildren();
  for (const e of f.errors) {
    const li = document.createElement("li"), when = document.createElement("span");
    when.className = "when"; when.textContent = clock(e.time);
    li.append(when, e.what + " \\u00d7" + count(e.count));
    li.className = "bad";
    errors.append(li);
  }
  if (!f.errors.length) {
    const li = document.createElement("li");
    li.className = "none"; li.textContent = "none";
    errors.append(li);
  }
}

// EventSource retries by itself after a lost connection, but gives up for good on an answer
// that is not 200 (WHATWG HTML 9.2.3): a 503 (16 viewers already, worker 0 being replaced)
// would leave the page dead, so a closed source is opened again a second later.
function connect() {
  const source = new EventSource("stats/events");
  source.onopen = () => { $("state").textContent = "live"; $("state").className = "live"; };
  source.onmessage = (event) => render(JSON.parse(event.data));
  source.onerror = () => {
    $("state").textContent = "reconnecting\\u2026"; $("state").className = "down";
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 1000);
  };
}
connect();
</script>
</body>
</html>
"""

# The page never changes while a node runs, but a browser must not keep an old rawsse's page.
ANSWER = Answer(200, PAGE, b"text/html; charset=utf-8", ((b"Cache-Control", b"no-store"),))
