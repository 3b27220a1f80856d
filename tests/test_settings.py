"""Settings come from the environment, validated; passwords never reach a log line."""
import os

import pytest

from worker.settings import Settings, SettingsError, redact


def test_defaults():
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///") and s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.broker_url == "redis://127.0.0.1:6379/1" and s.result_backend == "redis://127.0.0.1:6379/2"
    assert s.visibility_timeout == 3600


def test_values_and_errors():
    s = Settings.from_env({"CRM_VISIBILITY_TIMEOUT": "8", "CRM_REDIS_URL": "redis://:pw@h:6380/3",
                           "CRM_PRECOMPUTE_VIEWS": "updated_at:*:open"})
    assert s.visibility_timeout == 8 and s.broker_url == "redis://:pw@h:6380/1"
    assert s.precompute_views == (("updated_at", None, "open"),)
    for env, name in (({"CRM_VISIBILITY_TIMEOUT": "soon"}, "CRM_VISIBILITY_TIMEOUT"),
                      ({"CRM_VISIBILITY_TIMEOUT": "0"}, "CRM_VISIBILITY_TIMEOUT"),
                      ({"CRM_DATABASE_URL": "postgresql://x/y"}, "CRM_DATABASE_URL"),
                      ({"CRM_REDIS_URL": "localhost"}, "CRM_REDIS_URL"),
                      ({"CRM_PRECOMPUTE_VIEWS": "details:*:*"}, "CRM_PRECOMPUTE_VIEWS")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


def test_redact_hides_passwords():
    assert redact("mysql+pymysql://crm:s3cret@db:4000/crm") == "mysql+pymysql://crm:***@db:4000/crm"
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in redact("redis://u:s3cret@h/0")


def test_unix_socket_redis_gives_celery_socket_urls():
    s = Settings.from_env({"CRM_REDIS_URL": "unix:///tmp/r.sock?db=0"})
    assert s.broker_url == "redis+socket:///tmp/r.sock?virtual_host=1"


@pytest.mark.parametrize("name,value,says", [
    ("CRM_INGEST_CHUNK", "abc", "CRM_INGEST_CHUNK must be a whole number"),
    ("CRM_DATABASE_URL", "mysql://root@127.0.0.1/x", "mysql+pymysql://"),
    ("CRM_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:notaport/x", "CRM_DATABASE_URL is not a usable URL"),
    ("CRM_DATABASE_URL", "sqlite:////nonexistent-crm/dir/x.db", "does not exist"),
    ("CRM_REDIS_URL", "localhost", "CRM_REDIS_URL must be a URL"),
])
def test_a_bad_setting_is_one_clear_line_and_help_still_works(name, value, says):
    import subprocess
    import sys
    env = dict(os.environ, **{name: value})
    helped = subprocess.run([sys.executable, "-m", "worker.cli", "--help"], env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: crm" in helped.stdout
    for cmd in ([sys.executable, "-m", "worker.cli", "status"],
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "nothing"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().count("\n") == 0 and says in out.stderr and name in out.stderr
    assert not os.path.exists("/nonexistent-crm")


def test_the_tests_say_which_service_is_down_in_one_message(tmp_path):
    """`make test` with Redis (or the database) down: one message naming the URL and the
    variable, not thousands of lines of errors."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, url in (("CRM_TEST_REDIS_URL", "redis://127.0.0.1:1/13"),
                      ("CRM_TEST_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:1/crm_test")):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              os.path.join(root, "tests", "test_keys.py")],
                             env=dict(os.environ, **{name: url}), cwd=root, capture_output=True, text=True,
                             timeout=120)
        text = out.stdout + out.stderr
        assert out.returncode == 3 and url in text and name in text, text
        assert len(text.splitlines()) < 10, text


def test_make_test_runs_on_a_fresh_machine_without_the_local_services(tmp_path):
    """In a network namespace of its own (no Redis, no MariaDB on loopback), with the test
    URLs at their defaults: the embedded redis-server and SQLite stand in, the tests that
    need a MySQL-protocol server are skipped with one line saying so, and the rest pass."""
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to cut the local services off")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "CELERY_"))}
    tests = ["tests/test_keys.py", "tests/test_ingest.py", "tests/test_stale_index.py"]
    command = (f"ip link set lo up && {sys.executable} -m pytest -q -p no:cacheprovider -x "
               + " ".join(tests))
    out = subprocess.run(["unshare", "-n", "sh", "-c", command], env=env, cwd=root, capture_output=True,
                         text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "ran on the embedded redis-server and SQLite" in text
    skipped = [line for line in text.splitlines() if "tests skipped: they need a MySQL-protocol server" in line]
    assert len(skipped) == 1 and int(skipped[0].split()[0]) > 0 and "CRM_TEST_DATABASE_URL" in skipped[0], text
