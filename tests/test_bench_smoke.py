"""The benchmark keeps working: `crm bench` on a tiny data set, every peer included.
Figures are not checked (benchmarks never make timing assertions); the run and the shape
of its report are."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DATABASE_URL, REDIS_URL

pytestmark = pytest.mark.mysql  # the benchmark runs on a MySQL-protocol server of its own


def _crm_bench(tmp_path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`crm bench ARGS` on a database and four Redis databases of its own (below the
    tests' ones), writing into ``tmp_path``."""
    base, db = REDIS_URL.rsplit("/", 1)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", *args,
         "--database-url", DATABASE_URL.rsplit("/", 1)[0] + "/crm_bench_smoke",
         "--redis-url", f"{base}/{int(db) - 9}", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_quick_bench_on_a_tiny_data_set(tmp_path):
    out = _crm_bench(tmp_path, "--quick", "--meetings", "1500", "--clients", "60", "--users", "30", "--samples", "8",
                     "--seconds", "0.5", "--ingest-rows", "600", "--emails", "150", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for path in ("redis_ping", "crm_warm_page1", "crm_index_page1", "crm_database_page1", "sql_join_page1",
                 "seed_poc_page1", "celery_noop_round_trip", "celery_query_round_trip"):
        assert result["latency_ms"][path]["n"] > 0, path
    assert result["ingest"]["crm_ingest_rows_per_s"] > 0 and result["memory"]["index_bytes_per_meeting"] > 0
    assert set(result["targets"]) and set(result["ratios"])
    assert result["email"]["stored"] > 0 and result["email"]["stdlib_header_parse_per_s"] > 0
    for who in ("2000_clients", "50_clients"):
        assert result["reports"][who]["activity"]["naive_sql_p50_ms"] > 0
        assert all(result["reports"][who][name]["cached_p50_ms"] > 0 for name in ("workload", "going_cold"))
    assert (tmp_path / "bench.json").exists() and (tmp_path / "latency.png").stat().st_size > 1000


def test_load_run_on_a_tiny_scale(tmp_path):
    """`crm bench load` checks itself (nothing lost, nothing leaked): a short run must pass."""
    out = _crm_bench(tmp_path, "load", "--seconds", "4")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["queries"] > 0 and result["answers_checked"] == result["queries"]
    assert result["lost"] == result["leaked_answers"] == 0 and result["meetings_sent"] > 0


def test_sync_bench_on_a_small_mailbox(tmp_path):
    """`crm bench sync` stores the same messages both ways and checks it did."""
    from tests.imap_server import available
    if not available():
        pytest.skip("dovecot is not installed: apt-get install dovecot-imapd (.ci/run does)")
    out = _crm_bench(tmp_path, "sync", "--sync-messages", "300")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "sync.json").read_text())
    assert result["ingest_accepted"] == result["sync_fetched"] == 300
    assert result["sync_per_s"] > 0 and result["ingest_emails_per_s"] > 0 and result["idle_round_trips"] <= 2


def test_the_load_checker_knows_which_clients_were_allowed_when():
    """A change may take effect at any instant between its sending and its return: an
    answer may show what any change under way allowed, and what the last finished one
    allowed, nothing else."""
    from bench.load import AccessHistory
    history = AccessHistory()
    history.set(1, {1, 2}, 0.0, 0.0)
    history.set(1, {1}, 10.0, 11.0)      # revoke 2
    history.set(1, {1, 3}, 20.0, 21.0)   # grant 3
    assert history.allowed(1, 5.0, 6.0) == {1, 2}
    assert history.allowed(1, 10.5, 10.6) == {1, 2}     # the revoke was under way
    assert history.allowed(1, 12.0, 13.0) == {1}        # the revoke had returned
    assert history.allowed(1, 19.0, 20.5) == {1, 3}     # the grant may have taken effect
    assert history.allowed(2, 0.0, 30.0) == set()
