"""The peers the benchmark measures crm-insight against, each on its own layout, behind one
interface: ``available()`` (None, or why it cannot run here), ``load(data, progress)``,
``query(user, offset, limit)`` (the benchmark's query: email ∩ open, newest first, for the
user's clients) and ``close()``.  ``key`` names the peer's figures in bench.json."""
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


class Peer:
    key = ""

    def available(self) -> str | None:
        return None

    def load(self, data, progress) -> None:
        raise NotImplementedError

    def query(self, user: int, offset: int, limit: int):
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeedPOC(Peer):
    """The seed's Redis + Lua proof of concept: tenant-wide type and status sets, a hash per
    meeting, a client set per user; the script loops over every match for client security.
    ``memory`` holds the bytes its layout takes, measured while loading."""
    key = "seed_poc"

    def __init__(self, r: redis.Redis, installation_id: int = 1):
        self.r, self.i = r, installation_id
        with open(os.path.join(HERE, "seed_poc.lua")) as f:
            self.script = r.register_script(f.read())
        self.memory: dict[str, int] = {}

    def load(self, data, progress) -> None:
        r = self.r
        before = r.info("memory")["used_memory"]
        self.load_sets(data.rows, progress("seed sets", len(data.rows)))
        self.memory["sets"] = self.set_bytes()
        mid = r.info("memory")["used_memory"]
        self.load_hashes(data.rows, progress("seed hash", len(data.rows)))
        self.memory["hashes"] = r.info("memory")["used_memory"] - mid
        self.load_access(data.lists)
        self.memory["used"] = r.info("memory")["used_memory"] - before

    def close(self) -> None:
        leaked = list(self.r.scan_iter(match="sampleset*"))
        assert not leaked, "the seed POC left temporary keys"

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
        for user, clients in lists.items():
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


class SqlJoin(Peer):
    """The same query as one SQL statement on the service's own tables, with the anchors'
    composite index (installation, type, status, date), added by ``load``."""
    key = "sql_join"

    def __init__(self, engine: sa.Engine, installation_id: int = 1):
        self.engine, self.i = engine, installation_id

    def load(self, data, progress) -> None:
        with self.engine.begin() as conn:
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("meetings")}
            if "ix_bench_type_status_date" not in names:
                conn.exec_driver_sql("CREATE INDEX ix_bench_type_status_date "
                                     "ON meetings (installation_id, type, status, meeting_s)")

    def query(self, user: int, offset: int, limit: int):
        with self.engine.connect() as conn:
            return conn.execute(SQL_PEER, {"user": user, "inst": self.i, "limit": limit, "offset": offset}).all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RediSearch(Peer):
    """RediSearch 1.2.2 (Debian's redis-redisearch) in a redis-server of its own on a spare
    loopback port: TAG type/status/client, NUMERIC SORTABLE date.  ``load_s`` is how long
    loading took."""
    key = "redisearch"

    def __init__(self):
        self.proc = self.dir = self.r = None
        self.clients_of: dict[int, list[int]] = {}
        self.load_s = 0.0

    def available(self) -> str | None:
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

    def load(self, data, progress) -> None:
        start = time.monotonic()
        self.start()
        self.clients_of = data.lists
        self.load_rows(data.rows, progress("redisearch", len(data.rows)))
        self.load_s = round(time.monotonic() - start, 1)

    def load_rows(self, rows, progress=None) -> None:
        pipe = self.r.pipeline(transaction=False)
        for n, (mid, client, typ, status, meeting_s, details) in enumerate(rows, 1):
            pipe.execute_command("FT.ADD", "idx", f"doc:{mid}", 1.0, "FIELDS", "type", typ, "status", status,
                                 "client", client, "date", meeting_s, "details", details)
            if n % 2000 == 0:
                pipe.execute()
                progress and progress.add(2000)
        pipe.execute()
        progress and progress.add(len(rows) % 2000)

    def query(self, user: int, offset: int, limit: int):
        q = "@type:{email} @status:{open} @client:{%s}" % "|".join(map(str, self.clients_of[user]))
        return self.r.execute_command("FT.SEARCH", "idx", q, "SORTBY", "date", "DESC", "LIMIT", offset, limit)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
