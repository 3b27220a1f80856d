"""``crm bench``: crm-insight against every peer, on one data set, in one run, as ratios.

The benchmark owns its databases (by default MariaDB database ``crm_bench`` and Redis
databases 8 and 9 on the local server) and wipes them at the start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import sqlalchemy as sa

DEFAULT_DB = "mysql+pymysql://root@127.0.0.1:3306/crm_bench"
DEFAULT_REDIS = "redis://127.0.0.1:6379/8"
OUT = os.path.join(os.path.dirname(__file__), "out")


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced run (under a minute); JSON on the last line")
    p.add_argument("--meetings", type=int, default=500_000)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--samples", type=int, default=300, help="queries per path and page (time-boxed)")
    p.add_argument("--seconds", type=float, default=20, help="time box per path and page")
    p.add_argument("--ingest-rows", type=int, default=20_000)
    p.add_argument("--database-url", default=os.environ.get("CRM_BENCH_DATABASE_URL", DEFAULT_DB))
    p.add_argument("--redis-url", default=os.environ.get("CRM_BENCH_REDIS_URL", DEFAULT_REDIS),
                   help="the index; the seed's layout goes in the next database number, Celery in the two after")
    p.add_argument("--out", default=OUT, help="folder for bench.json and latency.png")
    p.add_argument("--no-server-tuning", dest="tune", action="store_false",
                   help="leave MariaDB's innodb_buffer_pool_size as it is (by default the run raises it to hold "
                        "the data set, says so first, and restores it at the end)")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentiles(samples_ns) -> dict:
    ms = sorted(s / 1e6 for s in samples_ns)
    if not ms:
        return {"n": 0}

    def pick(q):
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 4)
    return {"n": len(ms), "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "mean": round(statistics.mean(ms), 4)}


def timed(fn, calls, seconds: float, label: str) -> list[int]:
    """Time fn(*args) for each args in calls, until done or the time box is over, after
    one untimed pass over the distinct calls (at most a quarter of the time box): every
    path, peers included, is measured warm."""
    start = time.monotonic()
    for args in dict.fromkeys(calls):
        fn(*args)
        if time.monotonic() - start > seconds / 4:
            break
    out = []
    start = time.monotonic()
    for n, args in enumerate(calls):
        t = time.perf_counter_ns()
        fn(*args)
        out.append(time.perf_counter_ns() - t)
        if time.monotonic() - start > seconds and n >= 20:
            break
    say(f"  {label:<34} {len(out):>5} queries  p50 {percentiles(out)['p50']:.3f} ms")
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def redis_url_db(url: str, db: int) -> str:
    base, _ = url.rsplit("/", 1)
    return f"{base}/{db}"


def main(args) -> int:
    if args.quick:
        args.meetings, args.clients, args.users = min(args.meetings, 20_000), min(args.clients, 500), \
            min(args.users, 200)
        args.samples, args.seconds, args.ingest_rows = min(args.samples, 60), min(args.seconds, 3), \
            min(args.ingest_rows, 3000)
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


class Bench:
    def __init__(self, args):
        from worker.db import make_engine
        from worker.redis_index import connect
        from worker.seed import Shape
        self.args = args
        self.shape = Shape(installations=1, clients=args.clients, users=args.users, meetings=args.meetings)
        self.db_url = args.database_url
        self.index_db = int(args.redis_url.rsplit("/", 1)[1])
        self.urls = {
            "index": args.redis_url,
            "seed": redis_url_db(args.redis_url, self.index_db + 1),
            "broker": redis_url_db(args.redis_url, self.index_db + 2),
            "backend": redis_url_db(args.redis_url, self.index_db + 3),
        }
        from worker.schema import create_database
        create_database(self.db_url)
        self.engine = make_engine(self.db_url)
        self.r = connect(self.urls["index"])
        self.seed_r = connect(self.urls["seed"])
        self.result = {"machine": machine(), "shape": vars(self.shape) | {"samples": args.samples},
                       "latency_ms": {}, "notes": []}
        self.rng = random.Random(7)
        from worker.context import Context
        from worker.settings import Settings
        settings = Settings.from_env(self.env())
        self.ctx = Context(settings, self.engine, self.r)
        # The same service with no precomputed views: how the index answers cold.
        self.cold = Context(dataclasses.replace(settings, precompute_views=()), self.engine, self.r)
        self.views = self.ctx.views
        self.result["shape"]["precomputed_views"] = sorted(self.views)

    # -- set-up ------------------------------------------------------------------------
    def env(self) -> dict:
        return dict(os.environ, CRM_DATABASE_URL=self.db_url, CRM_REDIS_URL=self.urls["index"],
                    CELERY_BROKER_URL=self.urls["broker"], CELERY_RESULT_BACKEND=self.urls["backend"],
                    CRM_CURSOR_SECRET="bench", CRM_PRECOMPUTE_BUDGET=str(1 << 40))

    def load(self) -> None:
        from worker.access import change
        from worker.ingest import ingest
        from worker.records import meeting_id, parse_time, to_seconds
        from worker.schema import upgrade
        from worker.seed import Progress, access_lists, meetings
        say(f"loading {self.shape.meetings:,} meetings, {self.shape.users:,} users, {self.shape.clients:,} clients")
        upgrade(self.engine)
        with self.engine.begin() as conn:
            for table in ("meetings", "user_clients", "users", "installations", "applied_writes"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            conn.exec_driver_sql("DROP TABLE IF EXISTS bench_raw")
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("meetings")}
            if "ix_bench_type_status_date" in names:
                conn.exec_driver_sql("DROP INDEX ix_bench_type_status_date ON meetings")
        for url in self.urls.values():
            from worker.redis_index import connect
            connect(url).flushdb(asynchronous=True)  # a large keyspace frees in the background
        self.lists = list(access_lists(self.shape, 1))
        bar = Progress("access", len(self.lists))
        for user, clients in self.lists:
            change(self.ctx, 1, user, clients, "set")
            bar.add(1)
        self.rows = []
        bar = Progress("meetings", self.shape.meetings)
        batch = []
        start = time.monotonic()

        def flush():
            ingest(self.ctx, batch, chunk_size=500)
            for rec in batch:
                self.rows.append((meeting_id(1, rec["source_id"]), rec["client_id"], rec["type"], rec["status"],
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

    # -- measurements ----------------------------------------------------------------------
    def sample_users(self):
        users = [u for u, _ in self.lists]
        # A tenth of the users (at most 200) are the active ones with precomputed sets.
        self.sample = self.rng.sample(users, min(200, max(10, len(users) // 10)))
        self.big = [u for u, c in self.lists if len(c) >= 2000] or \
            [max(self.lists, key=lambda uc: len(uc[1]))[0]]
        self.clients_of = dict(self.lists)

    def calls(self, offset: int, users=None):
        users = users or self.sample
        n = self.args.samples
        return [(users[k % len(users)], offset) for k in range(n)]

    def measure_queries(self) -> None:
        from bench.peers import SQL_PEER, RediSearch, SeedPOC, add_sql_peer_index
        from worker.precompute import precompute_user
        from worker.query import call_script, from_database, parse, run
        lat = self.result["latency_ms"]
        secret = self.ctx.cursor_secret()
        pages = {"page1": 0, "page50": 980}
        say("query latency (email ∩ open, newest first, 20 per page)")

        lat["redis_ping"] = percentiles(timed(lambda: self.r.ping(), [()] * 2000, self.args.seconds, "redis PING"))

        def q(user, offset):
            return parse({"installation_id": 1, "user_id": user, "types": ["email"], "statuses": ["open"],
                          "offset": offset, "limit": 20}, secret)

        def database(user, off):
            with self.engine.connect() as conn:
                from_database(conn, q(user, off))

        token = self.ctx.mirror.token(1)
        for u in self.sample + self.big:
            precompute_user(self.ctx, 1, u, int(time.time()), token)
        for page, offset in pages.items():
            def warm(user, off):
                result = run(self.ctx, q(user, off))[0]
                assert result["source"] == "precomputed", result["source"]
            lat[f"crm_warm_{page}"] = percentiles(timed(warm, self.calls(offset), self.args.seconds,
                                                        f"crm-insight warm, {page}"))
            lat[f"crm_warm_script_{page}"] = percentiles(timed(
                lambda user, off: call_script(self.ctx, q(user, off), "d:email:open", 21, 0, token),
                self.calls(offset), self.args.seconds, f"crm-insight warm script only, {page}"))
            lat[f"crm_index_{page}"] = percentiles(timed(
                lambda user, off: run(self.cold, q(user, off)),
                self.calls(offset), self.args.seconds, f"crm-insight index (cold), {page}"))

            lat[f"crm_database_{page}"] = percentiles(timed(database, self.calls(offset), self.args.seconds,
                                                            f"crm-insight database fallback, {page}"))
        lat["crm_index_2000_clients_page1"] = percentiles(timed(
            lambda user, off: run(self.cold, q(user, off)),
            self.calls(0, self.big), self.args.seconds, "crm-insight index, 2,000-client user"))

        from worker.seed import Progress
        poc = SeedPOC(self.seed_r)
        before = self.seed_r.info("memory")["used_memory"]
        poc.load_sets(self.rows, Progress("seed sets", len(self.rows)))
        self.seed_set_bytes = poc.set_bytes()
        mid = self.seed_r.info("memory")["used_memory"]
        poc.load_hashes(self.rows, Progress("seed hash", len(self.rows)))
        self.seed_hash_bytes = self.seed_r.info("memory")["used_memory"] - mid
        poc.load_access(self.lists)
        self.result["seed_layout_used_memory"] = self.seed_r.info("memory")["used_memory"] - before
        for page, offset in pages.items():
            lat[f"seed_poc_{page}"] = percentiles(timed(poc.query, [(u, o, 20) for u, o in self.calls(offset)],
                                                        self.args.seconds, f"seed POC Lua, {page}"))
        leaked = [k for k in self.seed_r.scan_iter(match="sampleset*")]
        assert not leaked, "the seed POC left temporary keys"

        add_sql_peer_index(self.engine)
        self.result["notes"].append("The SQL peer and the database fallback ran with the composite index "
                                    "(installation_id, type, status, meeting_s) added for the peer.")
        for page, offset in pages.items():
            def sql(user, off):
                with self.engine.connect() as conn:
                    conn.execute(SQL_PEER, {"user": user, "inst": 1, "limit": 20, "offset": off}).all()
            lat[f"sql_join_{page}"] = percentiles(timed(sql, self.calls(offset), self.args.seconds,
                                                        f"SQL join + composite index, {page}"))
            lat[f"crm_database_peer_index_{page}"] = percentiles(timed(
                database, self.calls(offset), self.args.seconds, f"crm-insight database, peer's index, {page}"))

        why = RediSearch.available()
        if why:
            say(f"RediSearch skipped: {why}")
            self.result["notes"].append(f"RediSearch skipped: {why}")
            return
        rs = RediSearch()
        try:
            rs.start()
            start = time.monotonic()
            rs.load(self.rows, Progress("redisearch", len(self.rows)))
            self.result["redisearch_load_s"] = round(time.monotonic() - start, 1)
            for page, offset in pages.items():
                lat[f"redisearch_{page}"] = percentiles(timed(
                    lambda user, off: rs.query(self.clients_of[user], off, 20), self.calls(offset),
                    self.args.seconds, f"RediSearch 1.2.2, {page}"))
        finally:
            rs.stop()

    def measure_memory(self) -> None:
        from worker import keys
        say("memory")
        n = len(self.rows)
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
            "seed_sets_bytes_per_meeting": round(self.seed_set_bytes / n, 1),
            "seed_hash_bytes_per_meeting": round(self.seed_hash_bytes / n, 1),
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
        from celery import Celery
        # Celery prefers these variables to the URLs given to the app: make them agree.
        os.environ.update(CELERY_BROKER_URL=self.urls["broker"], CELERY_RESULT_BACKEND=self.urls["backend"])
        app = Celery("bench-client", broker=self.urls["broker"], backend=self.urls["backend"])
        app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                        result_accept_content=["json"])
        return app

    def measure_celery(self) -> None:
        say("end to end through Celery (threads pool, 4 threads)")
        worker = self.start_worker("query", "threads", 4)
        app = self.client()
        try:
            for _ in range(200):  # until the worker consumes
                try:
                    app.send_task("crm.noop", queue="query").get(timeout=1)
                    break
                except Exception:
                    time.sleep(0.2)
            kwargs = lambda u: {"installation_id": 1, "user_id": u, "types": ["email"],  # noqa: E731
                                "statuses": ["open"], "limit": 20}
            lat = self.result["latency_ms"]
            lat["celery_noop_round_trip"] = percentiles(timed(
                lambda: app.send_task("crm.noop", queue="query").get(timeout=30), [()] * self.args.samples,
                self.args.seconds, "Celery no-op round trip"))
            lat["celery_query_round_trip"] = percentiles(timed(
                lambda u: app.send_task("crm.query_meetings", kwargs=kwargs(u), queue="query").get(timeout=30),
                [(u,) for u, _ in self.calls(0)], self.args.seconds, "crm.query_meetings round trip"))
            throughput = {}
            for name, make in (("noop", lambda u: ("crm.noop", {})), ("query", lambda u: ("crm.query_meetings",
                                                                                             kwargs(u)))):
                n = self.args.samples * 3
                start = time.perf_counter()
                pending = []
                for k in range(n):
                    name_, kw = make(self.sample[k % len(self.sample)])
                    pending.append(app.send_task(name_, kwargs=kw, queue="query"))
                for p in pending:
                    p.get(timeout=60)
                throughput[name] = round(n / (time.perf_counter() - start))
            self.result["celery_throughput_per_s"] = throughput
            say(f"  throughput: no-op {throughput['noop']}/s, query {throughput['query']}/s")
        finally:
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
            app.send_task("crm.ingest_meetings", kwargs={"records": []}, queue="ingest").get(timeout=60)
            start = time.perf_counter()
            pending = [app.send_task("crm.ingest_meetings", kwargs={"records": records[k:k + 500]}, queue="ingest")
                       for k in range(0, n, 500)]
            accepted = sum(p.get(timeout=600)["accepted"] for p in pending)
            rate = accepted / (time.perf_counter() - start)
        finally:
            worker.terminate()
            worker.wait(30)
        views = sum(1 for _ in self.r.scan_iter(match="{i:1}:p:*", count=1000))
        say(f"  crm.ingest_meetings (2 worker processes, {views} precomputed sets kept fresh): {rate:,.0f} rows/s")
        self.result["ingest"] = {"rows": n, "raw_executemany_rows_per_s": round(raw_rate),
                                 "crm_ingest_rows_per_s": round(rate), "worker_processes": 2,
                                 "precomputed_sets_maintained": views}

    def measure_precompute(self) -> None:
        from worker import keys
        from worker.precompute import precompute_active, precompute_user
        say("precomputation")
        times = []
        for u in self.big[:5]:
            t = time.perf_counter_ns()
            precompute_user(self.ctx, 1, u, int(time.time()), self.ctx.mirror.token(1))
            times.append(time.perf_counter_ns() - t)
        now = int(time.time())
        self.r.zadd(keys.active_users(1), {str(u): now for u, _ in self.lists})
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
        self.saved_pool = None
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
        self.load()
        self.sample_users()
        self.measure_queries()
        self.measure_ingest()
        self.measure_memory()
        self.measure_celery()
        self.measure_precompute()
        from bench.report import ratios
        self.result["ratios"], self.result["targets"] = ratios(self.result)
        return self.result
