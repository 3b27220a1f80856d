"""``crm bench``: crm-insight against every peer, on one data set, in one run, as ratios.

The benchmark owns its databases (by default MariaDB database ``crm_bench`` and Redis
databases 8 and 9 on the local server) and wipes them at the start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import sqlalchemy as sa

from bench.measure import machine, percentiles, redis_url_db, say, timed

DEFAULT_DB = "mysql+pymysql://root@127.0.0.1:3306/crm_bench"
DEFAULT_REDIS = "redis://127.0.0.1:6379/8"
OUT = os.path.join(os.path.dirname(__file__), "out")


def add_arguments(p) -> None:
    p.add_argument("what", nargs="?", choices=["queries", "load", "sync"], default="queries",
                   help="queries: every path against every peer; load: the service under concurrent "
                        "ingestion, access changes and queries, checked for losses and leaks; sync: mailbox "
                        "sync from a local Dovecot against crm.ingest_emails on the same messages")
    p.add_argument("--quick", action="store_true", help="a reduced run (under a minute); JSON on the last line")
    p.add_argument("--meetings", type=int, default=500_000, help="meetings in the data set")
    p.add_argument("--clients", type=int, default=5000, help="clients in the data set")
    p.add_argument("--users", type=int, default=2000, help="users in the data set (one holds 2,000 clients)")
    p.add_argument("--samples", type=int, default=300, help="queries per path and page (time-boxed)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time box per path and page (20 when not given); with `load`, how long the load runs "
                        "(180 when not given)")
    p.add_argument("--ingest-rows", type=int, default=20_000,
                   help="meetings ingested through a worker to measure ingestion against the peers")
    p.add_argument("--emails", type=int, default=100_000,
                   help="raw messages ingested through a worker before the reports are measured (0: none)")
    p.add_argument("--sync-messages", type=int, default=10_000,
                   help="with `sync`: messages in the mailbox (2,000 with --quick)")
    p.add_argument("--database-url", default=os.environ.get("CRM_BENCH_DATABASE_URL", DEFAULT_DB),
                   help="a MySQL-protocol database the run may drop and fill (CRM_BENCH_DATABASE_URL)")
    p.add_argument("--redis-url", default=os.environ.get("CRM_BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="the index (CRM_BENCH_REDIS_URL); the seed's layout goes in the next database number, "
                        "Celery in the two after")
    p.add_argument("--out", default=OUT, help="folder for bench.json and latency.png")
    p.add_argument("--no-server-tuning", dest="tune", action="store_false",
                   help="leave MariaDB's innodb_buffer_pool_size as it is (by default the run raises it to hold "
                        "the data set, says so first, and restores it at the end)")


def main(args) -> int:
    if args.what == "sync":
        from bench.sync import main as sync
        return sync(args)
    if args.what == "load":
        from bench.load import main as load
        args.seconds = 180 if args.seconds is None else args.seconds
        return load(args)
    args.seconds = 20 if args.seconds is None else args.seconds
    if args.quick:
        args.meetings, args.clients, args.users = min(args.meetings, 20_000), min(args.clients, 500), \
            min(args.users, 200)
        args.samples, args.seconds, args.ingest_rows = min(args.samples, 60), min(args.seconds, 3), \
            min(args.ingest_rows, 3000)
        args.emails = min(args.emails, 2000)
    result = Bench(args).run()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    try:
        from bench.chart import draw
        draw(result, os.path.join(args.out, "latency.png"))
    except ImportError as exc:
        say(f"no chart: {exc} (pip install '.[bench]')")
    from bench.report import table
    print(table(result))
    say(f"figures in {path}")
    if args.quick:
        print(json.dumps(result))
    return 0


@dataclasses.dataclass
class Dataset:
    """What the run loaded: the meetings as the peers load them, the access lists, and the
    users the queries are asked for."""
    rows: list          # (id, client, type, status, meeting_s, details JSON)
    lists: dict         # user -> client ids
    sample: list        # the active users: a tenth (at most 200), with precomputed sets
    big: list           # users with 2,000 clients (or the broadest one)


PAGES = {"page1": 0, "page50": 980}


class Bench:
    def __init__(self, args):
        from worker.context import Context
        from worker.db import make_engine
        from worker.redis_index import connect
        from worker.schema import create_database
        from worker.seed import Shape
        from worker.settings import Settings
        self.args = args
        self.shape = Shape(installations=1, clients=args.clients, users=args.users, meetings=args.meetings)
        self.db_url = args.database_url
        index_db = int(args.redis_url.rsplit("/", 1)[1])
        self.urls = {
            "index": args.redis_url,
            "seed": redis_url_db(args.redis_url, index_db + 1),
            "broker": redis_url_db(args.redis_url, index_db + 2),
            "backend": redis_url_db(args.redis_url, index_db + 3),
        }
        create_database(self.db_url)
        self.engine = make_engine(self.db_url)
        self.r = connect(self.urls["index"])
        self.seed_r = connect(self.urls["seed"])
        self.result = {"machine": machine(), "shape": vars(self.shape) | {"samples": args.samples},
                       "latency_ms": {}, "notes": []}
        self.rng = random.Random(7)
        settings = Settings.from_env(self.env())
        self.ctx = Context(settings, self.engine, self.r)
        # The same service with no precomputed views: how the index answers cold.
        self.cold = Context(dataclasses.replace(settings, precompute_views=()), self.engine, self.r)
        self.result["shape"]["precomputed_views"] = sorted(self.ctx.views)
        self.saved_pool = None  # the server's buffer pool size, while the run changed it

    # -- set-up ------------------------------------------------------------------------
    def env(self) -> dict:
        """The service's environment for this run (for its worker processes too)."""
        return dict(os.environ, CRM_DATABASE_URL=self.db_url, CRM_REDIS_URL=self.urls["index"],
                    CELERY_BROKER_URL=self.urls["broker"], CELERY_RESULT_BACKEND=self.urls["backend"],
                    CRM_CURSOR_SECRET="bench", CRM_PRECOMPUTE_BUDGET=str(1 << 40))

    def load(self) -> Dataset:
        from worker.access import change
        from worker.ingest import ingest
        from worker.records import meeting_id, parse_time, to_seconds
        from worker.redis_index import connect
        from worker.schema import upgrade
        from worker.seed import Progress, access_lists, meetings
        say(f"loading {self.shape.meetings:,} meetings, {self.shape.users:,} users, {self.shape.clients:,} clients")
        upgrade(self.engine)
        with self.engine.begin() as conn:
            from worker.schema import data_tables
            for table in data_tables():
                conn.execute(table.delete())
            conn.exec_driver_sql("DROP TABLE IF EXISTS bench_raw")
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("meetings")}
            if "ix_bench_type_status_date" in names:
                conn.exec_driver_sql("DROP INDEX ix_bench_type_status_date ON meetings")
        for url in self.urls.values():
            connect(url).flushdb(asynchronous=True)  # a large keyspace frees in the background
        lists = dict(access_lists(self.shape, 1))
        bar = Progress("access", len(lists))
        for user, clients in lists.items():
            change(self.ctx, 1, user, clients, "set")
            bar.add(1)
        rows = []
        bar = Progress("meetings", self.shape.meetings)
        batch = []
        start = time.monotonic()

        def flush():
            ingest(self.ctx, batch, chunk_size=500)
            for rec in batch:
                rows.append((meeting_id(1, rec["source_id"]), rec["client_id"], rec["type"], rec["status"],
                             to_seconds(parse_time("d", rec["meeting_date"])),
                             json.dumps(rec["details"], separators=(",", ":"))))
            bar.add(len(batch))
        for rec in meetings(self.shape, 1):
            batch.append(rec)
            if len(batch) == 1000:
                flush()
                batch = []
        if batch:
            flush()
        self.result["load_in_process_rows_per_s"] = round(self.shape.meetings / (time.monotonic() - start))
        users = sorted(lists)
        big = [u for u, c in lists.items() if len(c) >= 2000] or [max(lists, key=lambda u: len(lists[u]))]
        return Dataset(rows=rows, lists=lists, sample=self.rng.sample(users, min(200, max(10, len(users) // 10))),
                       big=big)

    # -- measurements ----------------------------------------------------------------------
    def calls(self, offset: int, users):
        return [(users[k % len(users)], offset) for k in range(self.args.samples)]

    def measure(self, key: str, label: str, fn, calls) -> None:
        self.result["latency_ms"][key] = percentiles(timed(fn, calls, self.args.seconds, label))

    def measure_queries(self, data: Dataset) -> dict:
        """Every query path and peer; returns the bytes the seed POC's layout took."""
        from bench.peers import RediSearch, SeedPOC, SqlJoin
        from worker.precompute import precompute_user
        from worker.query import call_script, from_database, parse, run
        from worker.seed import Progress
        secret = self.ctx.cursor_secret()
        say("query latency (email ∩ open, newest first, 20 per page)")
        self.measure("redis_ping", "redis PING", lambda: self.r.ping(), [()] * 2000)

        def q(user, offset):
            return parse({"installation_id": 1, "user_id": user, "types": ["email"], "statuses": ["open"],
                          "offset": offset, "limit": 20}, secret)

        def warm(user, offset):
            assert run(self.ctx, q(user, offset))[0]["source"] == "precomputed"

        def database(user, offset):
            with self.engine.connect() as conn:
                from_database(conn, q(user, offset))

        token = self.ctx.mirror.token(1)
        for u in data.sample + data.big:
            precompute_user(self.ctx, 1, u, int(time.time()), token)
        ours = [
            ("crm_warm", "crm-insight warm", warm),
            ("crm_warm_script", "crm-insight warm script only",
             lambda user, off: call_script(self.ctx, q(user, off), "d:email:open", 21, 0, token)),
            ("crm_index", "crm-insight index (cold)", lambda user, off: run(self.cold, q(user, off))),
            ("crm_database", "crm-insight database fallback", database),
        ]
        for page, offset in PAGES.items():
            for key, label, fn in ours:
                self.measure(f"{key}_{page}", f"{label}, {page}", fn, self.calls(offset, data.sample))
        self.measure("crm_index_2000_clients_page1", "crm-insight index, 2,000-client user",
                     lambda user, off: run(self.cold, q(user, off)), self.calls(0, data.big))

        seed = SeedPOC(self.seed_r)
        for peer, label in ((seed, "seed POC Lua"), (SqlJoin(self.engine), "SQL join + composite index"),
                            (RediSearch(), "RediSearch 1.2.2")):
            why = peer.available()
            if why:
                say(f"{label} skipped: {why}")
                self.result["notes"].append(f"{label} skipped: {why}")
                continue
            try:
                peer.load(data, Progress)
                for page, offset in PAGES.items():
                    self.measure(f"{peer.key}_{page}", f"{label}, {page}",
                                 lambda user, off: peer.query(user, off, 20), self.calls(offset, data.sample))
            finally:
                peer.close()
            if isinstance(peer, SqlJoin):
                self.result["notes"].append("The SQL peer and the database fallback ran with the composite index "
                                            "(installation_id, type, status, meeting_s) added for the peer.")
                for page, offset in PAGES.items():
                    self.measure(f"crm_database_peer_index_{page}", f"crm-insight database, peer's index, {page}",
                                 database, self.calls(offset, data.sample))
            if isinstance(peer, RediSearch):
                self.result["redisearch_load_s"] = peer.load_s
        self.result["seed_layout_used_memory"] = seed.memory.get("used")
        return seed.memory

    def measure_memory(self, data: Dataset, seed_memory: dict) -> None:
        from worker import keys
        say("memory")
        n = len(data.rows)
        r = self.r
        index = sum(r.memory_usage(k, samples=0) or 0 for k in r.scan_iter(match=keys.prefix(1) + "z:*", count=1000))
        index += r.memory_usage(keys.pairs(1), samples=0) or 0
        payload = r.memory_usage(keys.payloads(1), samples=0) or 0
        views, entries = 0, 0
        for k in r.scan_iter(match=keys.prefix(1) + "p:*", count=1000):
            views += r.memory_usage(k, samples=0) or 0
            entries += r.zcard(k)
        access = sum(r.memory_usage(k, samples=0) or 0 for pattern in ("uc:*", "cu:*")
                     for k in r.scan_iter(match=keys.prefix(1) + pattern, count=1000))
        self.result["memory"] = {
            "index_bytes_per_meeting": round(index / n, 1),
            "payload_bytes_per_meeting": round(payload / n, 1),
            "precomputed_bytes_per_entry": round(views / entries, 1) if entries else None,
            "access_lists_bytes": access,
            "seed_sets_bytes_per_meeting": round(seed_memory["sets"] / n, 1) if "sets" in seed_memory else None,
            "seed_hash_bytes_per_meeting": round(seed_memory["hashes"] / n, 1) if "hashes" in seed_memory else None,
            "zset_max_listpack_entries": int(r.config_get("zset-max-*-entries").popitem()[1]),
        }

    def start_worker(self, queues: str, pool: str, concurrency: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues, "-P", pool, "-c",
               str(concurrency), "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"bench-{queues.replace(',', '-')}@%h"]
        os.makedirs(self.args.out, exist_ok=True)
        log = open(os.path.join(self.args.out, f"worker-{queues.replace(',', '-')}.log"), "w")
        return subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def client(self):
        from bench.client import TaskClient
        return TaskClient(self.urls["broker"], self.urls["backend"], "bench-client")

    def measure_celery(self, data: Dataset) -> None:
        say("end to end through Celery (threads pool, 4 threads)")
        worker = self.start_worker("query", "threads", 4)
        app = self.client()
        try:
            for _ in range(200):  # until the worker consumes
                try:
                    app.call("crm.noop", timeout=1)
                    break
                except Exception:
                    time.sleep(0.2)
            kwargs = lambda u: {"installation_id": 1, "user_id": u, "types": ["email"],  # noqa: E731
                                "statuses": ["open"], "limit": 20}
            self.measure("celery_noop_round_trip", "Celery no-op round trip",
                         lambda: app.call("crm.noop", timeout=30), [()] * self.args.samples)
            self.measure("celery_query_round_trip", "crm.query_meetings round trip",
                         lambda u: app.call("crm.query_meetings", kwargs(u), timeout=30),
                         [(u,) for u, _ in self.calls(0, data.sample)])
            throughput = {}
            for name, make in (("noop", lambda u: ("crm.noop", {})), ("query", lambda u: ("crm.query_meetings",
                                                                                             kwargs(u)))):
                n = self.args.samples * 3
                start = time.perf_counter()
                pending = []
                for k in range(n):
                    name_, kw = make(data.sample[k % len(data.sample)])
                    pending.append(app.send(name_, kw, queue="query"))
                for p in pending:
                    p.get(timeout=60)
                throughput[name] = round(n / (time.perf_counter() - start))
            self.result["celery_throughput_per_s"] = throughput
            say(f"  throughput: no-op {throughput['noop']}/s, query {throughput['query']}/s")
        finally:
            app.close()
            worker.terminate()
            worker.wait(30)

    def measure_ingest(self) -> None:
        from worker.ingest import validate_batch
        from worker.records import meeting_id
        from worker.seed import Shape, meetings
        n = self.args.ingest_rows
        shape = Shape(installations=1, clients=self.shape.clients, users=self.shape.users, meetings=n, seed=999)
        records = []
        for rec in meetings(shape, 1):
            rec["source_id"] = "ingest-" + rec["source_id"]
            records.append(rec)
        say(f"ingestion of {n:,} new meetings")
        # The ceiling: raw executemany of the same rows, batches of 500, same table layout.
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bench_raw LIKE meetings")
        rows = []
        for k in range(0, n, 1000):
            for _, m in validate_batch(records[k:k + 1000])[0]:
                rows.append((meeting_id(1, m.source_id), 1, m.source_id.encode(), m.client_id, m.type, m.status,
                             m.meeting_s, m.updated_s, m.updated_us, m.subject, m.details))
        raw = self.engine.raw_connection()
        try:
            start = time.perf_counter()
            with raw.cursor() as cur:
                for k in range(0, len(rows), 500):
                    cur.executemany("INSERT INTO bench_raw (id, installation_id, source_id, client_id, type, status, "
                                    "meeting_s, updated_s, updated_us, subject, details) VALUES "
                                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows[k:k + 500])
                    raw.commit()
            raw_rate = len(rows) / (time.perf_counter() - start)
        finally:
            raw.close()
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE bench_raw")
        say(f"  raw executemany: {raw_rate:,.0f} rows/s")
        worker = self.start_worker("ingest", "prefork", 2)
        app = self.client()
        try:
            app.call("crm.ingest_meetings", {"records": []}, queue="ingest")
            start = time.perf_counter()
            pending = [app.send("crm.ingest_meetings", {"records": records[k:k + 500]}, queue="ingest")
                       for k in range(0, n, 500)]
            accepted = sum(p.get(timeout=600)["accepted"] for p in pending)
            rate = accepted / (time.perf_counter() - start)
        finally:
            app.close()
            worker.terminate()
            worker.wait(30)
        views = sum(1 for _ in self.r.scan_iter(match="{i:1}:p:*", count=1000))
        say(f"  crm.ingest_meetings (2 worker processes, {views} precomputed sets kept fresh): {rate:,.0f} rows/s")
        self.result["ingest"] = {"rows": n, "raw_executemany_rows_per_s": round(raw_rate),
                                 "crm_ingest_rows_per_s": round(rate), "worker_processes": 2,
                                 "precomputed_sets_maintained": views}

    def measure_precompute(self, data: Dataset) -> None:
        from worker import keys
        from worker.precompute import precompute_active, precompute_user
        say("precomputation")
        times = []
        for u in data.big[:5]:
            t = time.perf_counter_ns()
            precompute_user(self.ctx, 1, u, int(time.time()), self.ctx.mirror.token(1))
            times.append(time.perf_counter_ns() - t)
        now = int(time.time())
        self.r.zadd(keys.active_users(1), {str(u): now for u in data.lists})
        start = time.perf_counter()
        report = precompute_active(self.ctx, {1: self.ctx.mirror.token(1)}, idle=86400, budget=1 << 40, now=now)
        took = time.perf_counter() - start
        self.result["precompute"] = {"user_2000_clients_ms": percentiles(times),
                                     "active_all_users_s": round(took, 2),
                                     "active_users_refreshed": report["refreshed_users"]}
        say(f"  2,000-client user: {percentiles(times)['p50']:.1f} ms; all {report['refreshed_users']} users: "
            f"{took:.1f} s")

    def size_buffer_pool(self) -> None:
        """Give MariaDB/MySQL a buffer pool that holds the data set, as a tuned server
        would, so that the SQL paths are measured from memory; restored at the end."""
        if self.engine.dialect.name != "mysql" or not self.args.tune:
            return
        want = self.shape.meetings * 3000  # about what 500k meetings take with indices, x1.5
        try:
            with self.engine.connect() as conn:
                self.saved_pool = conn.exec_driver_sql("SELECT @@innodb_buffer_pool_size").scalar()
                if self.saved_pool < want:
                    say(f"raising the server's innodb_buffer_pool_size from {self.saved_pool >> 20} MiB to "
                        f"{want >> 20} MiB for this run (a global setting of the server; restored at the end; "
                        "--no-server-tuning leaves it)")
                    conn.exec_driver_sql(f"SET GLOBAL innodb_buffer_pool_size = {int(want)}")
                    self.result["notes"].append(f"innodb_buffer_pool_size raised from {self.saved_pool >> 20} MiB "
                                                f"to {want >> 20} MiB for the run.")
                else:
                    self.saved_pool = None
        except sa.exc.DBAPIError as exc:
            self.saved_pool = None
            self.result["notes"].append(f"innodb_buffer_pool_size left as it is: {exc.orig}")

    def restore_buffer_pool(self) -> None:
        if self.saved_pool:
            say(f"restoring innodb_buffer_pool_size to {self.saved_pool >> 20} MiB")
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"SET GLOBAL innodb_buffer_pool_size = {int(self.saved_pool)}")

    def run(self) -> dict:
        self.size_buffer_pool()
        try:
            return self._run()
        finally:
            self.restore_buffer_pool()

    def _run(self) -> dict:
        data = self.load()
        seed_memory = self.measure_queries(data)
        self.measure_ingest()
        self.measure_memory(data, seed_memory)
        self.measure_celery(data)
        self.measure_precompute(data)
        from bench.insight import measure_email, measure_reports, measure_threads, report_users
        from bench.stream import measure_streaming
        if self.args.emails:
            measure_email(self, self.args.emails)
        measure_reports(self, data)
        measure_threads(self, data)
        if self.args.emails:
            measure_streaming(self, data, report_users(data))
        from bench.report import ratios
        self.result["ratios"], self.result["targets"] = ratios(self.result)
        return self.result
