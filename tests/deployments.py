"""A second deployment of the service for the tests: its own database, the tests' index
Redis, its own broker and result backend, and a real worker process of its own."""
import os
import subprocess
import sys
import time

from bench.client import TaskClient
from tests.conftest import REDIS_URL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_base, _db = REDIS_URL.rsplit("/", 1)
#: The Redis database just below the tests' own (13–15) holds the second deployment's
#: broker and result backend (their keys do not meet), so that its worker and the tests'
#: worker never take each other's tasks; the benchmark's databases (8–11) stay apart.
BROKER_URL = BACKEND_URL = f"{_base}/{int(_db) - 1}"


class Deployment:
    """``crm init`` and a Celery worker (threads, every queue) on ``database_url``."""

    def __init__(self, database_url: str, tmp_path, **env):
        self.database_url = database_url
        self.env = dict(os.environ, CRM_DATABASE_URL=database_url, CRM_REDIS_URL=REDIS_URL,
                        CELERY_BROKER_URL=BROKER_URL, CELERY_RESULT_BACKEND=BACKEND_URL,
                        CRM_HOME=str(tmp_path), **env)
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log = open(tmp_path / "worker.log", "w")
        self.proc = None
        self.client = TaskClient(BROKER_URL, BACKEND_URL, "webapp-2")

    def crm(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    def start(self):
        from worker.redis_index import connect
        connect(BROKER_URL).flushdb()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "ingest,query,precompute,maintenance",
             "-P", "threads", "-c", "4", "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"second-{os.getpid()}@%h"],
            env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.send("crm.noop", queue="query").get(timeout=2)
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the second deployment's worker did not start")

    def send(self, name, kwargs=None, **options):
        return self.client.send(name, kwargs, **options)

    def call(self, name, **kwargs):
        from worker.app import ROUTES
        return self.client.call(name, kwargs, queue=ROUTES[name])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.client.close()
