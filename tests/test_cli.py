"""The local service as a newcomer meets it: `crm run`, `crm status`, the demo seed."""
import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from bench.peers import free_port
from worker import seed as seed_module
from worker.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def test_crm_run_guards_flower_and_says_what_runs_where(tmp_path):
    """Embedded Redis, a new SQLite database, no demo: Flower asks for a login, the first
    screen is short, and `crm status` finds the embedded Redis while the service runs."""
    flower, redis_port, metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "CELERY_", "FLOWER_"))}
    env.update(CRM_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    out = open(tmp_path / "run.out", "w")
    run = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", "--no-demo", "--embedded-redis",
                            "--embedded-redis-port", str(redis_port), "--flower-port", str(flower),
                            "--metrics-port", str(metrics)],
                           env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while get(f"http://127.0.0.1:{flower}/healthcheck") != 200:
            assert time.monotonic() < deadline and run.poll() is None, (tmp_path / "run.out").read_text()
            time.sleep(0.5)
        while "crm-insight is ready" not in (tmp_path / "run.out").read_text():
            assert time.monotonic() < deadline and run.poll() is None, (tmp_path / "run.out").read_text()
            time.sleep(0.2)
        credentials = (tmp_path / "flower-credentials").read_text().strip()
        assert oct((tmp_path / "flower-credentials").stat().st_mode & 0o777) == "0o600"
        assert get(f"http://127.0.0.1:{flower}/") == 401
        assert get(f"http://127.0.0.1:{flower}/api/tasks") == 401
        assert get(f"http://127.0.0.1:{flower}/", auth="crm:wrong") == 401
        assert get(f"http://127.0.0.1:{flower}/", auth=credentials) == 200
        while get(f"http://127.0.0.1:{metrics}/metrics") != 200:
            assert time.monotonic() < deadline, "the exporter does not answer"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            assert b"crm_index_reachable 1.0" in response.read()
        status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--json"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        screen = (tmp_path / "run.out").read_text()
        assert f"http://127.0.0.1:{flower}" in screen and credentials.split(":")[1] in screen
        assert f"127.0.0.1:{redis_port}" in screen and "crm.sqlite3" in screen
        # The summary, printed once the workers answer, and nothing else: Celery's warning
        # about running as root (CI does) is said once, in the summary.
        assert screen.startswith("crm-insight is ready"), screen
        assert "SecurityWarning" not in screen and "superuser" not in screen
        assert len([line for line in screen.splitlines() if line.strip()]) <= 10, screen
        assert ("running as root" in screen) == (os.geteuid() == 0)
        assert "Inspect method" not in screen and "[tasks]" not in screen
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(60)
        out.close()
    assert not (tmp_path / "embedded-redis.json").exists()


def test_the_demo_seed_resumes_after_an_interruption(clean, monkeypatch, capsys):
    ctx = clean
    engine = ctx.engine
    from worker.tables import crm_meta
    with engine.begin() as conn:
        conn.execute(crm_meta.delete().where(crm_meta.c.name == "demo_seed"))
    monkeypatch.setattr(seed_module, "DEMO", seed_module.Shape(clients=6, users=3, meetings=60))
    monkeypatch.setattr(seed_module, "DEMO_EMAILS", 40)
    assert seed_module.demo_state(engine) == "none"
    assert main(["seed", "--demo"]) == 0
    assert seed_module.demo_state(engine) == "complete"
    # Interrupted: the mark says started and a part is missing; the next run resumes.
    seed_module.mark_demo(engine, "started")
    from worker.ingest import delete
    delete(ctx, 1, [f"<m{n}.i1@crm.example>" for n in range(30, 60)])
    capsys.readouterr()
    assert main(["seed", "--demo"]) == 0
    said = capsys.readouterr().out
    assert "resuming the demo seed" in said and "70 of 100 meetings and messages stored" in said
    assert seed_module.demo_state(engine) == "complete"
    assert main(["status", "--json"]) == 0
    assert '"meetings": 100' in capsys.readouterr().out  # 60 meetings and 40 email messages
    # A database with data of its own gets no demo.
    with engine.begin() as conn:
        conn.execute(crm_meta.delete().where(crm_meta.c.name == "demo_seed"))
    assert main(["seed", "--demo"]) == 0
    assert "holds data of its own" in capsys.readouterr().out


def test_seed_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["seed", "--help"])
    said = capsys.readouterr().out
    assert "(default: 5000)" in said and "(default: 500000)" in said


# -- what a mistake or a missing service looks like ----------------------------------------

def _crm(tmp_path, *args, **env):
    """`crm ARGS` in ``tmp_path`` with only ``env`` set of the service's variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "CELERY_", "FLOWER_"))}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def _said(out) -> str:
    """What the command printed, which must be one line and no traceback."""
    text = (out.stdout + out.stderr).strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


EVERY_COMMAND = [("init",), ("seed", "--meetings", "10", "--users", "2", "--clients", "2"), ("status",),
                 ("exporter", "--port", "1"), ("report", "activity", "--installation", "1", "--user", "1"),
                 ("run", "--no-demo", "--embedded-redis-port", "1")]


def test_commands_that_read_never_create_a_database(tmp_path):
    """status, report and exporter say which database they looked for; nothing is created."""
    for args in [("status",), ("report", "workload", "--installation", "1", "--user", "1"), ("exporter",)]:
        out = _crm(tmp_path, *args)
        said = _said(out)
        assert out.returncode == 3 and f"no database at {tmp_path}/var/crm.sqlite3" in said
        assert "`crm init`" in said
    assert list(tmp_path.iterdir()) == []


def test_a_bad_environment_is_one_line_and_exit_status_2(tmp_path):
    for args in EVERY_COMMAND:
        out = _crm(tmp_path, *args, CRM_VISIBILITY_TIMEOUT="soon")
        assert out.returncode == 2 and "CRM_VISIBILITY_TIMEOUT" in _said(out), args
    out = _crm(tmp_path, "report", "activity", "--installation", "1", "--user", "1", "--clients", "a,b")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "lambda" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("must be client ids separated by commas (like 3,17), got 'a,b'")


def test_a_service_that_does_not_answer_is_one_line_and_exit_status_3(tmp_path):
    redis_port, mysql_port = free_port(), free_port()
    closed_redis = f"redis://127.0.0.1:{redis_port}/0"
    closed_db = f"mysql+pymysql://root@127.0.0.1:{mysql_port}/crm"
    for args in EVERY_COMMAND:
        out = _crm(tmp_path, *args, CRM_DATABASE_URL=closed_db)
        said = _said(out)
        assert out.returncode == 3 and f"127.0.0.1:{mysql_port}/crm (CRM_DATABASE_URL)" in said, args
    # A database in place, the index Redis away: every command that needs it says so.
    home = tmp_path / "home"
    assert _crm(tmp_path, "init", CRM_HOME=str(home), CRM_REDIS_URL=closed_redis).returncode == 3
    for args in [("init",), ("seed", "--meetings", "10", "--users", "2", "--clients", "2"), ("status",),
                 ("run", "--no-demo")]:
        out = _crm(tmp_path, *args, CRM_HOME=str(home), CRM_REDIS_URL=closed_redis)
        said = _said(out)
        assert out.returncode == 3 and f"{closed_redis} (CRM_REDIS_URL)" in said, args
    out = _crm(tmp_path, "bench", "--quick", "--database-url", closed_db)
    assert out.returncode == 3 and "(--database-url, or CRM_BENCH_DATABASE_URL)" in _said(out)


def test_report_output_its_limit_and_a_chart_that_cannot_be_written(tmp_path):
    from worker.cli import report_table
    result = {"name": "going_cold", "generated_at": "2026-01-01T00:00:00Z", "source": "database",
              "rows": [{"client_id": i, "silence_s": 10 * i} for i in range(1, 46)]}
    table = report_table(result, 20).splitlines()
    assert table[0].startswith("going_cold: 45 rows") and len(table) == 2 + 20 + 1
    assert table[-1].startswith("… 25 more rows") and table[-2].split() == ["20", "200"]
    assert len(report_table(result).splitlines()) == 2 + 45
    out = _crm(tmp_path, "report", "activity", "--installation", "1", "--user", "1", "--png", "/nonexistent/x.png")
    assert out.returncode == 2 and _said(out) == "crm report: --png /nonexistent/x.png: no folder /nonexistent"


def test_help_shows_what_each_option_does():
    for command in ("seed", "bench", "run", "report"):
        out = subprocess.run([sys.executable, "-m", "worker.cli", command, "--help"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0
        options = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  --")]
        assert options, out.stdout
        assert "(default: None)" not in out.stdout and "(default: True)" not in out.stdout
    bench = subprocess.run([sys.executable, "-m", "worker.cli", "bench", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=ROOT).stdout
    assert "(default: 500000)" in bench and "(default: 100000)" in bench


def test_charts_say_what_they_show(tmp_path):
    pytest.importorskip("matplotlib")
    from worker.charts import draw, share
    assert [share(v) for v in (None, 0, 0.0004, 0.004695, 0.0949, 0.1, 0.5)] == \
        ["n/a", "0%", "<0.1%", "0.5%", "9.5%", "10%", "50%"]
    at = "2026-01-01T00:00:00Z"
    results = [
        {"name": "activity", "generated_at": at, "rows": [
            {"client_id": 1, "type": t, "bucket": b, "count": 2, "running_total": 2}
            for t in ("call", "email") for b in ("2022-01", "2023-12")]},
        {"name": "response_times", "generated_at": at, "rows": [
            {"threads": 3, "answered": 2, "median_s": 7200, "p90_s": 9000, "within_1h_share": 0.004,
             "histogram": {"<1h": 0, "1-4h": 2, "4-24h": 0, "1-3d": 0, "3-7d": 0, ">7d": 0}}]},
        {"name": "workload", "generated_at": at, "rows": [
            {"user_id": u, "received": u, "sent": 1, "awaiting": 0, "median_reply_s": None} for u in range(1, 41)]},
        {"name": "going_cold", "generated_at": at, "rows": [
            {"client_id": c, "last_at": at, "median_gap_s": 86400, "silence_s": 864000 - c} for c in range(1, 93)]},
    ]
    said = {"activity": "Activity per month", "response_times": "within 1 h 0.4%",
            "workload": "(top 15 of 40 mailboxes)", "going_cold": "(top 30 of 92)"}
    for result in results:
        path = tmp_path / f"{result['name']}.png"
        title = draw(result, str(path), user_id=3)
        assert said[result["name"]] in title and "what user 3 may see" in title
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
