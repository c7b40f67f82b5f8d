"""The seeded mutation fuzzer (``fuzzing.py``) against one real two-worker node: every case is
answered or cleanly closed in time, and the server logs no traceback (issue 12, item 8). A
longer run: ``python fuzz/run.py --cases 30000 --seed 7``."""

from __future__ import annotations

import time

from fuzzing import describe, load_corpus, make_cases, run_cases
from wire import get_json

SEED = 12
CASES = 5000


def test_seeded_mutants_are_answered_or_closed_and_log_no_traceback(start_server):
    srv = start_server("--workers", "2", "--keepalive", "0", admin=True)
    pids = sorted(w["pid"] for w in get_json(srv.host, srv.admin_port, "/stats")["workers"])
    corpus = load_corpus()
    assert len(corpus) >= 40
    cases = make_cases(SEED, CASES, corpus)
    started = time.monotonic()
    failures = run_cases(cases, srv.host, srv.port, srv.admin_port, stop_at=started + 30)
    elapsed = time.monotonic() - started
    assert not failures, "\n".join(describe(case, problem) for case, problem in failures[:10])
    assert elapsed < 30, f"{CASES} cases took {elapsed:.0f}s"
    get_json(srv.host, srv.admin_port, "/admin/faults")  # still serving, no fault left behind
    assert sorted(w["pid"] for w in get_json(srv.host, srv.admin_port, "/stats")["workers"]) == pids
    output = srv.output()
    assert "Traceback" not in output, output[-4000:]
