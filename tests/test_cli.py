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
        # Celery's own warning about running as root (CI does) aside, the screen is the summary.
        lines = [line for line in screen.splitlines() if line.strip() and not any(
            word in line for word in ("SecurityWarning", "absolutely not recommended", "--uid option",
                                      "User information", "_warn_or_raise_security_error"))]
        assert len(lines) <= 9, screen
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
