"""The peers the benchmark measures crm-insight against, each on its own layout."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis
import sqlalchemy as sa

HERE = os.path.dirname(__file__)
REDISEARCH_MODULE = "/usr/lib/redis/modules/redisearch.so"


class SeedPOC:
    """The seed's Redis + Lua proof of concept: tenant-wide type and status sets, a hash per
    meeting, a client set per user; the script loops over every match for client security."""

    def __init__(self, r: redis.Redis, installation_id: int = 1):
        self.r, self.i = r, installation_id
        with open(os.path.join(HERE, "seed_poc.lua")) as f:
            self.script = r.register_script(f.read())

    def load_sets(self, rows, progress=None) -> None:
        """rows: (id, client, type, status, meeting_s, details_json)"""
        pipe = self.r.pipeline(transaction=False)
        for n, (mid, _, typ, status, _, _) in enumerate(rows, 1):
            pipe.sadd(f"meeting_type:{typ}_ins_{self.i}", mid)
            pipe.sadd(f"meeting_status:{status}_ins_{self.i}", mid)
            if n % 2000 == 0:
                pipe.execute()
                progress and progress.add(2000)
        pipe.execute()
        progress and progress.add(len(rows) % 2000)

    def load_hashes(self, rows, progress=None) -> None:
        pipe = self.r.pipeline(transaction=False)
        for n, (mid, client, _, _, meeting_s, details) in enumerate(rows, 1):
            pipe.hset(f"meeting:{mid}", mapping={"clientid": client, "meeting_date": meeting_s, "details": details})
            if n % 2000 == 0:
                pipe.execute()
                progress and progress.add(2000)
        pipe.execute()
        progress and progress.add(len(rows) % 2000)

    def load_access(self, lists) -> None:
        pipe = self.r.pipeline(transaction=False)
        for user, clients in lists:
            pipe.sadd(f"clients_for_user:{user}", *clients)
        pipe.execute()

    def query(self, user: int, offset: int, limit: int):
        return self.script(keys=[user, "meeting_date", offset, limit],
                           args=[f"meeting_type:email_ins_{self.i}", f"meeting_status:open_ins_{self.i}"])

    def set_bytes(self) -> int:
        return sum(self.r.memory_usage(k, samples=0) or 0 for k in self.r.scan_iter(match="meeting_*_ins_*"))


SQL_PEER = sa.text(
    "SELECT m.id, m.source_id, m.client_id, m.type, m.status, m.meeting_s, m.updated_us, m.subject, m.details "
    "FROM meetings m JOIN user_clients uc ON uc.installation_id = m.installation_id "
    "AND uc.client_id = m.client_id AND uc.user_id = :user "
    "WHERE m.installation_id = :inst AND m.type = 'email' AND m.status = 'open' "
    "ORDER BY m.meeting_s DESC, m.id DESC LIMIT :limit OFFSET :offset")


def add_sql_peer_index(engine: sa.Engine) -> None:
    """The anchors' composite index (installation, type, status, date) for the SQL peer."""
    with engine.begin() as conn:
        names = {ix["name"] for ix in sa.inspect(conn).get_indexes("meetings")}
        if "ix_bench_type_status_date" not in names:
            conn.exec_driver_sql("CREATE INDEX ix_bench_type_status_date "
                                 "ON meetings (installation_id, type, status, meeting_s)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RediSearch:
    """RediSearch 1.2.2 (Debian's redis-redisearch) in a redis-server of its own on a spare
    loopback port: TAG type/status/client, NUMERIC SORTABLE date."""

    def __init__(self):
        self.proc = None
        self.dir = None

    @staticmethod
    def available() -> str | None:
        """None when usable, else why not."""
        if not os.path.exists(REDISEARCH_MODULE):
            return f"{REDISEARCH_MODULE} is missing (apt-get install redis-redisearch)"
        if not shutil.which("redis-server"):
            return "redis-server is not on PATH"
        return None

    def start(self) -> redis.Redis:
        self.dir = tempfile.mkdtemp(prefix="crm-bench-rs-")
        port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--loadmodule", REDISEARCH_MODULE],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.r.execute_command("FT.CREATE", "idx", "SCHEMA", "type", "TAG", "status", "TAG", "client", "TAG",
                               "date", "NUMERIC", "SORTABLE")
        return self.r

    def load(self, rows, progress=None) -> None:
        pipe = self.r.pipeline(transaction=False)
        for n, (mid, client, typ, status, meeting_s, details) in enumerate(rows, 1):
            pipe.execute_command("FT.ADD", "idx", f"doc:{mid}", 1.0, "FIELDS", "type", typ, "status", status,
                                 "client", client, "date", meeting_s, "details", details)
            if n % 2000 == 0:
                pipe.execute()
                progress and progress.add(2000)
        pipe.execute()
        progress and progress.add(len(rows) % 2000)

    def query(self, clients, offset: int, limit: int):
        q = "@type:{email} @status:{open} @client:{%s}" % "|".join(map(str, clients))
        return self.r.execute_command("FT.SEARCH", "idx", q, "SORTBY", "date", "DESC", "LIMIT", offset, limit)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
