"""crm.report against the real database and Redis, each report equal to a brute-force
oracle written from the contract alone, for random data and random access lists (no
clients, a few, thousands); the rollup equal to a recount after every kind of write;
revocation reaching the cache at once; hostile params; SQLite as well as MariaDB."""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import random
import statistics

import pytest
import sqlalchemy as sa

from tests.conftest import make_context
from tests.email_corpus import USERS, corpus, visible
from tests.helpers import record
from tests.email_corpus import ingest_corpus, setup_directory
from worker import rollups
from worker.access import change
from worker.email import directory
from worker.tables import emails, meeting_buckets, meeting_days
from worker.tables import meetings as meetings_table
from worker.ingest import delete, ingest
from worker.records import iso_seconds
from worker.reports import NAMES, report

I = 1
BASE = 1_700_000_000
NOW = BASE + 90 * 86_400
TYPES = ("email", "call", "sms")


@dataclasses.dataclass
class Item:
    """One meeting as the oracle knows it: from the records and messages it was sent."""
    key: str
    client_id: int | None
    type: str
    status: str
    date_s: int
    message: object = None  # the corpus Message of a stored email


def iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_world(ctx, seed: int) -> dict:
    """Emails of the corpus, plain meetings, then updates and deletions: the oracle's
    items by key."""
    rng = random.Random(seed)
    setup_directory(ctx)
    messages = corpus(seed=seed, conversations=14)
    ingest_corpus(ctx, messages, rng=rng)
    items = {}
    for m in messages:
        items[m.key] = Item(m.key, (m.links or [None])[0], "email", "inbound" if m.inbound else "outbound",
                            m.date_s, m)
    plain = []
    for n in range(160):
        when = BASE + rng.randrange(0, 80 * 86_400)
        if n % 17 == 0:
            when = BASE + 20 * 86_400  # the same instant several times: gaps of zero
        plain.append(record(installation_id=I, source_id=f"p{n:03d}", client_id=rng.randint(1, 5),
                            type=rng.choice(TYPES), status=rng.choice(["open", "closed"]), meeting_date=iso(when),
                            updated_at=iso(BASE)))
    assert ingest(ctx, plain)["accepted"] == len(plain)
    # Newer versions move some meetings to another client, type and day.
    moved = []
    for r in rng.sample(plain, 30):
        moved.append({**r, "client_id": rng.randint(1, 5), "type": rng.choice(TYPES),
                      "meeting_date": iso(BASE + rng.randrange(0, 80 * 86_400)), "updated_at": iso(BASE + 1)})
    assert ingest(ctx, moved)["updated"] == len(moved)
    final = {r["source_id"]: r for r in plain}
    final.update({r["source_id"]: r for r in moved})
    gone = rng.sample(sorted(final), 15)
    assert delete(ctx, I, gone)["deleted"] == len(gone)
    for key in gone:
        del final[key]
    for r in final.values():
        when = int(dt.datetime.fromisoformat(r["meeting_date"].replace("Z", "+00:00")).timestamp())
        items[r["source_id"]] = Item(r["source_id"], r["client_id"], r["type"], r["status"], when)
    return items


def assert_rollup_is_a_recount(engine):
    """The days, weeks and months kept by every writer equal a recount of the rows."""
    tables = (meeting_days, meeting_buckets)
    with engine.connect() as conn:
        kept = [conn.execute(sa.select(t).where(t.c["count"] != 0)).all() for t in tables]
    with engine.begin() as conn:
        rollups.recount(conn, I)
        fresh = [conn.execute(sa.select(t)).all() for t in tables]
        conn.rollback()
    for table, rows, recounted in zip(tables, kept, fresh):
        assert sorted(rows) == sorted(recounted), table.name


# -- the oracle ------------------------------------------------------------------------

def seen(items, clients: set, user: int, params: dict) -> list[Item]:
    out = []
    lo = params.get("date_from")
    hi = params.get("date_to")
    lo = None if lo is None else int(dt.datetime.fromisoformat(lo.replace("Z", "+00:00")).timestamp())
    hi = None if hi is None else int(dt.datetime.fromisoformat(hi.replace("Z", "+00:00")).timestamp())
    for it in items.values():
        ok = visible(it.message, clients, user) if it.message else it.client_id in clients
        if not ok:
            continue
        if params.get("client_ids") is not None and it.client_id not in params["client_ids"]:
            continue
        if lo is not None and it.date_s < lo or hi is not None and it.date_s >= hi:
            continue
        out.append(it)
    return out


def bucket_of(seconds: int, bucket: str) -> str:
    day = dt.datetime.fromtimestamp(seconds, dt.timezone.utc).date()
    if bucket == "week":
        return (day - dt.timedelta(days=day.weekday())).isoformat()
    return f"{day.year:04d}-{day.month:02d}"


def oracle_activity(visible_items, params):
    counts = collections.Counter((it.client_id, it.type, bucket_of(it.date_s, params.get("bucket") or "month"))
                                 for it in visible_items)
    rows, running = [], collections.Counter()
    for (client, type_, bucket), n in sorted(counts.items(), key=lambda kv: (kv[0][0] is not None, kv[0][0] or 0,
                                                                            kv[0][1], kv[0][2])):
        running[(client, type_)] += n
        rows.append({"client_id": client, "type": type_, "bucket": bucket, "count": n,
                     "running_total": running[(client, type_)]})
    return rows


def conversations(visible_items):
    out = collections.defaultdict(list)
    for it in sorted((i for i in visible_items if i.message), key=lambda i: i.date_s):
        out[it.message.conversation].append(it)
    return out


def pairs_of(thread):
    """(inbound, reply) for each inbound message and the next outbound one."""
    out = []
    for k, it in enumerate(thread):
        if it.status == "inbound":
            reply = next((r for r in thread[k + 1:] if r.status == "outbound"), None)
            if reply is not None:
                out.append((it, reply))
    return out


def awaiting_since(thread):
    if thread[-1].status != "inbound":
        return None
    since = None
    for it in reversed(thread):
        if it.status == "outbound":
            break
        since = it.date_s
    return since


def p90(values):
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def oracle_response_times(visible_items):
    convs = conversations(visible_items)
    waits = [r.date_s - i.date_s for t in convs.values() for i, r in pairs_of(t)]
    labels = [("<1h", 3600), ("1-4h", 4 * 3600), ("4-24h", 86400), ("1-3d", 3 * 86400), ("3-7d", 7 * 86400),
              (">7d", float("inf"))]
    histogram = {label: sum(1 for w in waits if lower <= w < upper)
                 for (label, upper), lower in zip(labels, [0] + [u for _, u in labels[:-1]])}
    return [{"threads": sum(1 for t in convs.values() if any(i.status == "inbound" for i in t)),
             "answered": len(waits),
             "median_s": statistics.median(waits) if waits else None,
             "p90_s": p90(sorted(waits)) if waits else None,
             "within_1h_share": sum(1 for w in waits if w < 3600) / len(waits) if waits else None,
             "histogram": histogram}]


def oracle_awaiting(visible_items, thread_of):
    rows = []
    for thread in conversations(visible_items).values():
        since = awaiting_since(thread)
        if since is None:
            continue
        rows.append({"thread_id": thread_of[thread[0].key], "subject": thread[0].message.subject,
                     "awaiting_reply_since": iso(since),
                     "client_ids": sorted({c for it in thread for c in it.message.links})})
    return sorted(rows, key=lambda r: (r["awaiting_reply_since"], r["thread_id"]))


def oracle_workload(visible_items):
    convs = conversations(visible_items)
    figures = collections.defaultdict(lambda: {"received": 0, "sent": 0, "awaiting": 0, "waits": []})
    for thread in convs.values():
        for it in thread:
            for u in it.message.mailboxes:
                figures[u]["received" if it.status == "inbound" else "sent"] += 1
        if awaiting_since(thread) is not None:
            for u in {u for it in thread for u in it.message.mailboxes}:
                figures[u]["awaiting"] += 1
        for i, r in pairs_of(thread):
            for u in r.message.mailboxes:
                figures[u]["waits"].append(r.date_s - i.date_s)
    return [{"user_id": u, "received": f["received"], "sent": f["sent"], "awaiting": f["awaiting"],
             "median_reply_s": statistics.median(f["waits"]) if f["waits"] else None}
            for u, f in sorted(figures.items())]


def oracle_going_cold(visible_items, now):
    dates = collections.defaultdict(list)
    for it in visible_items:
        if it.client_id is not None:
            dates[it.client_id].append(it.date_s)
    rows = []
    for client, ds in dates.items():
        if len(ds) < 2:
            continue
        ds.sort()
        median = statistics.median([b - a for a, b in zip(ds, ds[1:])])
        if now - ds[-1] > 2 * median:
            rows.append({"client_id": client, "last_at": iso(ds[-1]), "median_gap_s": median,
                         "silence_s": now - ds[-1]})
    return sorted(rows, key=lambda r: (-r["silence_s"], r["client_id"]))


def expected(name, items, clients, user, params, thread_of):
    v = seen(items, clients, user, params)
    if name == "activity":
        return oracle_activity(v, params)
    if name == "response_times":
        return oracle_response_times(v)
    if name == "awaiting_reply":
        return oracle_awaiting(v, thread_of)
    if name == "workload":
        return oracle_workload(v)
    return oracle_going_cold(v, NOW)


def approx(rows):
    """Floats compared to the last bits: two interpolation formulas may round apart."""
    return [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def random_params(rng, dates=()) -> dict:
    """Random narrowing; a one-second range starts on one of ``dates`` (the meetings')."""
    params = {}
    if rng.random() < 0.4:
        params["client_ids"] = sorted(rng.sample(range(1, 7), rng.randint(1, 3)))
    if rng.random() < 0.6:
        # The rollup's whole days and the rows of the partial days must add up, whatever
        # the edges: mid-day, inside one day, ending at midnight, one second long.
        start = BASE + rng.randrange(0, 40 * 86_400)
        shape = rng.choice(["days", "one day", "to midnight", "one second", "whole days", "months", "open end"])
        if shape == "days":
            end = start + rng.randrange(86_400, 45 * 86_400)
        elif shape == "months":  # whole weeks and months inside, parts of others at the edges
            start = BASE - rng.randrange(0, 40 * 86_400)
            end = start + rng.randrange(35 * 86_400, 130 * 86_400)
        elif shape == "one day":
            start = start - start % 86_400 + rng.randrange(0, 43_200)
            end = start + rng.randrange(1, 43_200)
        elif shape == "to midnight":
            end = start - start % 86_400 + 86_400 * rng.randint(1, 3)
        elif shape == "one second":
            start = rng.choice(dates) if dates else start
            end = start + 1
        elif shape == "whole days":
            start -= start % 86_400
            end = start + 86_400 * rng.randint(1, 10)
        if shape == "open end":
            params["date_from"] = iso(start)
        else:
            params["date_from"], params["date_to"] = iso(start), iso(end)
    if rng.random() < 0.5:
        params["bucket"] = rng.choice(["week", "month"])
    return params


# -- the tests -------------------------------------------------------------------------

def test_going_colds_kept_gaps_never_store_a_snapshot_older_than_their_stamp(clean):
    """A report's connection can take its snapshot before a write commits and read that
    write's stamp after: the client's figures recomputed then must hold the write, or
    they would be kept, under the new stamp, without it (seen in a streaming run)."""
    from worker.reports import Params, client_stamps, compute
    from worker.reports.clients import going_cold
    ctx = clean
    change(ctx, I, 1, [1, 2], "set")
    day = 86_400
    ingest(ctx, [record(source_id=f"m{n}", client_id=1 + n % 2, meeting_date=iso(BASE + n * day))
                 for n in range(10)])
    everything = Params(client_ids=None, date_from=None, date_to=None, bucket="month")
    rows_only = Params(client_ids=None, date_from=0, date_to=None, bucket="month")
    with ctx.engine.connect() as conn:  # the kept figures, stored under the current stamps
        going_cold(conn, I, 1, everything, NOW, stamps=client_stamps(ctx, I))
    with ctx.engine.connect() as report_conn:
        report_conn.execute(sa.select(sa.func.count()).select_from(meetings_table)).scalar()  # its snapshot
        ingest(ctx, [record(source_id="late", client_id=1, meeting_date=iso(BASE + 40 * day))])
        going_cold(report_conn, I, 1, everything, NOW, stamps=client_stamps(ctx, I))
    with ctx.engine.connect() as conn:
        kept = compute(conn, I, 1, "going_cold", everything, NOW, stamps=client_stamps(ctx, I))[0]
        rows = compute(conn, I, 1, "going_cold", rows_only, NOW)[0]
    assert kept == rows
    assert [r["last_at"] for r in rows if r["client_id"] == 1] == [iso(BASE + 40 * day)]

@pytest.mark.parametrize("bucket", ["week", "month"])
def test_whole_buckets_and_edge_days_cover_a_range_exactly_once(bucket):
    """activity reads the whole weeks or months of a range from ``meeting_buckets`` and the
    days left at its edges from ``meeting_days``: together, every day of the range once,
    and each bucket read whole lies inside the range."""
    from worker.reports.clients import _bucket_start, _spans
    rng = random.Random(bucket)
    for _ in range(3000):
        first = None if rng.random() < 0.1 else rng.randrange(19_000, 19_400)
        end = None if rng.random() < 0.1 else (first or 19_000) + rng.randrange(-3, 200)
        whole, edges = _spans(first, end, bucket)
        lo_all, hi_all = first if first is not None else 18_000, end if end is not None else 20_000
        covered = []
        if whole is not None:
            lo, hi = whole
            assert all(_bucket_start(x, bucket) == x for x in (lo, hi) if x is not None)
            covered += range(lo if lo is not None else lo_all, hi if hi is not None else hi_all)
        for a, b in edges:
            covered += range(a, b)
        assert sorted(covered) == list(range(lo_all, hi_all)), (first, end, whole, edges)

@pytest.mark.parametrize("seed", [21, 22])
def test_every_report_equals_the_oracle_for_random_access(clean, seed):
    ctx = clean
    rng = random.Random(seed)
    items = build_world(ctx, seed)
    dates = sorted(it.date_s for it in items.values())
    assert_rollup_is_a_recount(ctx.engine)
    with ctx.engine.connect() as conn:
        thread_of = dict(conn.execute(sa.select(emails.c.message_key, emails.c.thread_id)).all())
    thousands = set(range(1, 3001))
    for _round in range(3):
        access = {u: set(rng.sample(range(1, 7), rng.randint(0, 4))) for u in (1, 2, 3, 4)}
        access[5] = thousands
        access[6] = set()
        for user, clients in access.items():
            change(ctx, I, user, sorted(clients), "set")
        for user, clients in access.items():
            for params in [{}] + [random_params(rng, dates) for _ in range(3)]:
                for name in NAMES:
                    got = report(ctx, I, user, name, params, now=NOW)
                    want = expected(name, items, clients, user, params, thread_of)
                    assert got["rows"] == approx(want), (name, user, params)
                    assert got["name"] == name and got["generated_at"] == iso_seconds(NOW)


def test_activity_read_packed_or_cut_short_is_the_same(clean):
    """activity packs a client's weekly or monthly rows into one (GROUP_CONCAT); a server
    that cuts the packed text short (``group_concat_max_len``) has that client read again
    row by row, and the answer equals the oracle either way."""
    from worker.reports import ALL, Params, compute
    ctx = clean
    if ctx.engine.dialect.name != "mysql":
        pytest.skip("group_concat_max_len is MySQL's")
    items = build_world(ctx, 23)
    change(ctx, I, 9, [1, 2, 3, 4, 5], "set")
    with ctx.engine.connect() as conn:
        thread_of = dict(conn.execute(sa.select(emails.c.message_key, emails.c.thread_id)).all())
    for params in (ALL, Params(client_ids=None, date_from=None, date_to=None, bucket="week")):
        want = expected("activity", items, {1, 2, 3, 4, 5}, 9, {"bucket": params.bucket}, thread_of)
        with ctx.engine.connect() as conn:
            packed = compute(conn, I, 9, "activity", params, NOW)[0]
            cuts = []
            # Cut each client's text inside its last entry (1 to 3 bytes short), and
            # inside its first (MariaDB's least length is 4).
            texts = conn.execute(sa.select(sa.func.group_concat(
                meeting_buckets.c.type + " " + sa.cast(meeting_buckets.c.bucket, sa.String) + " "
                + sa.cast(meeting_buckets.c["count"], sa.String) + ";"))
                .where(meeting_buckets.c.kind == params.bucket[0]).group_by(meeting_buckets.c.client_id)).scalars()
            for length in sorted({4} | {len(t) - k for t in texts for k in (1, 2, 3) if len(t) - k >= 4})[:40]:
                conn.exec_driver_sql(f"SET SESSION group_concat_max_len = {length}")
                try:
                    cuts.append(compute(conn, I, 9, "activity", params, NOW)[0])
                finally:
                    conn.exec_driver_sql("SET SESSION group_concat_max_len = 16777216")
        assert all(cut == packed for cut in cuts)
        assert packed == approx(want)
        assert len(packed) > 10


def test_thread_reports_read_packed_or_cut_short_are_the_same(clean):
    """response_times and workload read the waits of the threads a user sees whole packed
    (GROUP_CONCAT): one text in all, one per mailbox.  A text cut short at any length is
    read again row by row, and the answer equals the oracle either way."""
    from worker.reports import ALL, compute
    ctx = clean
    if ctx.engine.dialect.name != "mysql":
        pytest.skip("group_concat_max_len is MySQL's")
    items = build_world(ctx, 23)
    mine = {1, 2, 3, 4, 5}
    change(ctx, I, 9, sorted(mine), "set")
    with ctx.engine.connect() as conn:
        thread_of = dict(conn.execute(sa.select(emails.c.message_key, emails.c.thread_id)).all())
    for name in ("response_times", "workload"):
        want = expected(name, items, mine, 9, {}, thread_of)
        with ctx.engine.connect() as conn:
            packed = compute(conn, I, 9, name, ALL, NOW)[0]
            cuts = []
            for length in range(4, 200):  # MariaDB's least length is 4
                conn.exec_driver_sql(f"SET SESSION group_concat_max_len = {length}")
                try:
                    cuts.append(compute(conn, I, 9, name, ALL, NOW)[0])
                finally:
                    conn.exec_driver_sql("SET SESSION group_concat_max_len = 16777216")
        assert packed == approx(want), name
        assert all(cut == packed for cut in cuts), name
    assert want and sum(row["received"] for row in want) > 10
    answered = compute(ctx.engine.connect(), I, 9, "response_times", ALL, NOW)[0][0]["answered"]
    # Several waits (cuts fall between them and inside them), and a text shorter than the
    # longest cut (at most 12 bytes a wait: ten digits, ";" and ","): every length is tried.
    assert 5 <= answered and answered * 12 < 200


def test_rollup_follows_every_writer(clean):
    """Inserts, newer versions, deletions, emails and their re-linking all keep the
    rollup equal to a recount of the rows."""
    ctx = clean
    build_world(ctx, 5)
    assert_rollup_is_a_recount(ctx.engine)
    # A new domain re-links stored emails (their client_id changes).
    directory.upsert_clients(ctx, I, [{"client_id": 4, "name": "Unknown Org", "domains": ["unknown.org"]},
                                      {"client_id": 5, "name": "C4", "domains": ["c4.com"]}])
    assert_rollup_is_a_recount(ctx.engine)
    # A meeting record replacing an email's row.
    with ctx.engine.connect() as conn:
        key = conn.execute(sa.select(emails.c.message_key).limit(1)).scalar()
    ingest(ctx, [record(installation_id=I, source_id=key, client_id=2, type="call", updated_at="2035-01-01T00:00:00Z")])
    assert_rollup_is_a_recount(ctx.engine)
    delete(ctx, I, [key])
    assert_rollup_is_a_recount(ctx.engine)


def test_revocation_reaches_every_report_and_its_cache_at_once(clean):
    ctx = clean
    items = build_world(ctx, 7)
    change(ctx, I, 9, [1, 2, 3, 4, 5], "set")
    first = {name: report(ctx, I, 9, name, now=NOW) for name in NAMES}
    again = {name: report(ctx, I, 9, name, now=NOW) for name in NAMES}
    for name in NAMES:
        assert first[name]["source"] in ("rollup", "database") and again[name]["source"] == "cache"
        assert again[name]["rows"] == first[name]["rows"]
    change(ctx, I, 9, [1, 3, 4, 5], "set")  # client 2 revoked
    for name in NAMES:
        got = report(ctx, I, 9, name, now=NOW)
        assert got["source"] != "cache"
        assert got["rows"] == approx(expected(name, items, {1, 3, 4, 5}, 9, {}, _threads(ctx)))
    activity = report(ctx, I, 9, "activity", now=NOW)["rows"]

    def of_client_2(rows):
        return sum(r["count"] for r in rows if r["client_id"] == 2)
    # What remains of client 2 is email reached through another linked client.
    assert of_client_2(activity) < of_client_2(first["activity"]["rows"])
    assert all(r["type"] == "email" for r in activity if r["client_id"] == 2)
    # Any write to the installation makes the cached copies stale too.
    report(ctx, I, 9, "activity", now=NOW)
    assert report(ctx, I, 9, "activity", now=NOW)["source"] == "cache"
    ingest(ctx, [record(installation_id=I, source_id="late", client_id=1, type="call",
                        meeting_date=iso(BASE + 86_400))])
    got = report(ctx, I, 9, "activity", now=NOW)
    assert got["source"] == "rollup"
    assert sum(r["count"] for r in got["rows"]) == sum(r["count"] for r in activity) + 1
    # Without Redis the report is still exact, from the database.
    ctx.redis.flushdb()
    assert report(ctx, I, 9, "activity", now=NOW)["rows"] == got["rows"]


def test_the_beat_keeps_asked_reports_computed_and_exact_after_writes_and_revocations(clean, monkeypatch):
    """crm.precompute_reports: each report a user asked for is computed again once a write
    or an access change has made its cached copy stale; the user then finds it cached and
    equal to the oracle for the access in force.  Idle requests are forgotten."""
    import time

    from worker import keys, reports
    ctx = clean
    items = build_world(ctx, 5)
    change(ctx, I, 9, [1, 2, 3, 4, 5], "set")
    for name in NAMES:
        report(ctx, I, 9, name, now=NOW)
    token = ctx.mirror.token(I)

    def run(now=NOW, idle=3600, seconds=60.0):
        return reports.precompute(ctx, I, token, now, idle, 120, time.monotonic() + seconds)
    assert run() == {"computed": 0, "current": len(NAMES), "forgotten": 0, "left": 0}
    late = record(installation_id=I, source_id="late", client_id=1, type="call", status="closed",
                  meeting_date=iso(BASE + 86_400 + 5))
    ingest(ctx, [late])
    items["late"] = Item("late", 1, "call", "closed", BASE + 86_400 + 5)
    assert run(seconds=-1)["left"] == len(NAMES)  # out of time: nothing computed
    assert run()["computed"] == len(NAMES)
    for name in NAMES:
        got = report(ctx, I, 9, name, now=NOW)
        assert got["source"] == "cache", name
        assert got["rows"] == approx(expected(name, items, {1, 2, 3, 4, 5}, 9, {}, _threads(ctx))), name
    change(ctx, I, 9, [1, 3, 4, 5], "set")  # client 2 revoked: every cached copy is stale
    assert run()["computed"] == len(NAMES)
    for name in NAMES:
        got = report(ctx, I, 9, name, now=NOW)
        assert got["source"] == "cache"
        assert got["rows"] == approx(expected(name, items, {1, 3, 4, 5}, 9, {}, _threads(ctx))), name
    # Requests are capped per installation; an idle one is forgotten, its copy left to expire.
    monkeypatch.setattr(reports, "REQUESTS_MAX", len(NAMES))
    report(ctx, I, 9, "activity", {"bucket": "week"}, now=NOW)
    assert ctx.redis.hlen(keys.report_requests(I)) == len(NAMES)
    assert run(now=NOW + 3601) == {"computed": 0, "current": 0, "forgotten": len(NAMES), "left": 0}
    assert ctx.redis.hlen(keys.report_requests(I)) == 0


def _mail(key, sender, to="u1@ours.com", cc=None, date="Mon, 02 Jan 2023 10:00:00 +0000"):
    from tests.email_corpus import b64
    text = f"Message-ID: <{key}>\r\nFrom: {sender}\r\nTo: {to}\r\n" + (f"Cc: {cc}\r\n" if cc else "")
    return {"raw": b64((text + f"Subject: s {key}\r\nDate: {date}\r\n\r\nbody {key}").encode())}


def test_a_cached_report_goes_stale_only_when_something_it_could_include_changed(clean):
    """User 9 sees clients 1 and 2 and reads mailbox 9.  Writes elsewhere leave the copy
    current; each kind of write that could change it makes it stale."""
    from worker.email import ingest as email_ingest
    ctx = clean
    setup_directory(ctx)  # c1.com -> client 1, c2.com -> client 2, c3.co.uk -> client 3
    directory.upsert_users(ctx, I, [{"user_id": 9, "name": "Nine", "emails": ["u9@ours.com"]}])
    change(ctx, I, 9, [1, 2], "set")
    change(ctx, I, 8, [3], "set")
    ingest(ctx, [record(installation_id=I, source_id=f"m{c}", client_id=c, meeting_date=iso(BASE)) for c in (1, 2, 3, 4)])

    def source():
        return report(ctx, I, 9, "activity", now=NOW)["source"]

    def stays_current(write):
        assert source() in ("rollup", "cache")
        assert source() == "cache"
        write()
        assert source() == "cache", write.__doc__

    def makes_stale(write):
        assert source() in ("rollup", "cache")
        assert source() == "cache"
        write()
        assert source() == "rollup", write.__doc__

    def other_client():
        """a meeting of a client the user may not see"""
        ingest(ctx, [record(installation_id=I, source_id="o1", client_id=999, meeting_date=iso(BASE))])

    def other_mailbox():
        """an email of client 3, read from another user's mailbox"""
        email_ingest.ingest_emails(ctx, I, 8, [_mail("e1@x", "a@c3.co.uk", to="u8@ours.com")])

    def other_access():
        """another user's access list"""
        change(ctx, I, 8, [3, 4], "set")

    def other_delete():
        """a meeting of a client the user may not see, deleted"""
        delete(ctx, I, ["m4"])
    for write in (other_client, other_mailbox, other_access, other_delete):
        stays_current(write)

    def own_client():
        """a meeting of one of the user's clients"""
        ingest(ctx, [record(installation_id=I, source_id="n1", client_id=2, meeting_date=iso(BASE + 5))])

    def moved_away():
        """a meeting of the user's client moved to another client"""
        ingest(ctx, [record(installation_id=I, source_id="m1", client_id=3, meeting_date=iso(BASE),
                            updated_at="2030-01-01T00:00:00Z")])

    def moved_in():
        """a meeting of another client moved to the user's"""
        ingest(ctx, [record(installation_id=I, source_id="m3", client_id=1, meeting_date=iso(BASE),
                            updated_at="2030-01-01T00:00:00Z")])

    def own_mailbox():
        """an email of no client of the user's, read from the user's mailbox"""
        email_ingest.ingest_emails(ctx, I, 9, [_mail("e2@x", "z@c3.co.uk", to="u9@ours.com")])

    def secondary_link():
        """an email of client 3 that also links one of the user's clients"""
        email_ingest.ingest_emails(ctx, I, 8, [_mail("e3@x", "b@c3.co.uk", to="u8@ours.com", cc="k@c2.com")])

    def relinked():
        """a domain moved: the user's client's email now links elsewhere"""
        directory.upsert_clients(ctx, I, [{"client_id": 2, "name": "Two", "domains": []},
                                          {"client_id": 5, "name": "Five", "domains": ["c2.com"]}])

    def own_delete():
        """a meeting of the user's client, deleted"""
        delete(ctx, I, ["m2"])

    def revoked():
        """one of the user's clients revoked"""
        change(ctx, I, 9, [1], "revoke")

    def granted():
        """a client granted to the user"""
        change(ctx, I, 9, [1, 6], "set")
    for write in (own_client, moved_away, moved_in, own_mailbox, secondary_link, relinked, own_delete, revoked,
                  granted):
        makes_stale(write)


def test_every_answer_while_data_streams_in_equals_a_fresh_computation(clean):
    """A random stream of writes (meetings into random clients, emails from random
    mailboxes, updates, deletes, access changes, re-links) with reports asked in between:
    whatever answers (the cache or the database), the rows equal the report computed
    afresh for the access in force; and the cache answers some of them."""
    from worker.email import ingest as email_ingest
    from worker.reports import ALL, compute
    ctx = clean
    rng = random.Random(77)
    setup_directory(ctx)
    change(ctx, I, 9, [1, 2], "set")
    sources = collections.Counter()
    live = []  # meeting records stored and not deleted
    for step in range(100):
        op = rng.choice(["meeting", "meeting", "email", "update", "update", "delete", "access", "relink"])
        if op in ("update", "delete") and not live:
            op = "meeting"
        if op == "meeting":
            live.append(f"s{step}")
            ingest(ctx, [record(installation_id=I, source_id=live[-1], client_id=rng.randint(1, 6),
                                type=rng.choice(TYPES), meeting_date=iso(BASE + rng.randrange(80 * 86_400)))])
        elif op == "email":
            domain = rng.choice(["c1.com", "c2.com", "c3.co.uk", "elsewhere.org"])
            email_ingest.ingest_emails(ctx, I, rng.choice([8, 9]), [_mail(f"e{step}@x", f"p@{domain}",
                                                                         to=rng.choice(["u8@ours.com", "u9@ours.com"]))])
        elif op == "update":  # another client, type or day: a meeting moves in, out, or within
            ingest(ctx, [record(installation_id=I, source_id=rng.choice(live), client_id=rng.randint(1, 6),
                                type=rng.choice(TYPES), meeting_date=iso(BASE + rng.randrange(80 * 86_400)),
                                updated_at=f"2031-01-01T00:{step // 60:02d}:{step % 60:02d}Z")])
        elif op == "delete":
            gone = live.pop(rng.randrange(len(live)))
            delete(ctx, I, [gone, f"e{rng.randrange(step + 1)}@x"])
        elif op == "access":
            change(ctx, I, rng.choice([8, 9]), sorted(rng.sample(range(1, 7), rng.randint(0, 3))), "set")
        else:
            directory.upsert_clients(ctx, I, [{"client_id": rng.randint(1, 4), "name": "C",
                                               "domains": [rng.choice(["c1.com", "c2.com", "elsewhere.org"])]}])
        for name in NAMES:  # every report is cached after every step: each write meets them all
            got = report(ctx, I, 9, name, now=NOW)
            sources[got["source"] == "cache"] += 1
            with ctx.engine.connect() as conn:
                fresh = compute(conn, I, 9, name, ALL, NOW)[0]
            assert got["rows"] == approx(fresh), (step, op, name, got["source"])
    assert sources[True] > 0 and sources[False] > 0


def test_report_precompute_runs_once_per_tick(clean):
    from freezegun import freeze_time

    from tasks.reports import precompute_reports as task
    assert clean
    with freeze_time("2024-06-01 00:00:10"):
        first, second = task.run(once_per_tick=True), task.run(once_per_tick=True)
    assert "skipped" not in first and second["skipped"] and first["tick"] == second["tick"]


def _threads(ctx):
    with ctx.engine.connect() as conn:
        return dict(conn.execute(sa.select(emails.c.message_key, emails.c.thread_id)).all())


@pytest.mark.parametrize("name, params, field", [
    ("nope", None, "name"),
    (7, None, "name"),
    ("activity", [], "params"),
    ("activity", {"client": [1]}, "params.client"),
    ("activity", {"bucket": "day"}, "params.bucket"),
    ("activity", {"bucket": None, "client_ids": "1"}, "params.client_ids"),
    ("activity", {"client_ids": [0]}, "params.client_ids[]"),
    ("activity", {"client_ids": list(range(20_000))}, "params.client_ids"),
    ("going_cold", {"date_from": "yesterday"}, "params.date_from"),
    ("going_cold", {"date_to": "2024-01-01T00:00:00"}, "params.date_to"),
    ("workload", {"date_from": 5}, "params.date_from"),
])
def test_hostile_params_are_named(clean, name, params, field):
    from worker.errors import InvalidArgument
    with pytest.raises(InvalidArgument) as info:
        report(clean, I, 1, name, params)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_empty_range_and_unknown_user(clean):
    ctx = clean
    build_world(ctx, 3)
    for name in NAMES:
        assert report(ctx, I, 77, name, now=NOW)["rows"] in ([], approx(oracle_response_times([])))
        got = report(ctx, I, 77, name, {"date_from": "2030-01-01T00:00:00Z", "date_to": "2020-01-01T00:00:00Z"},
                     now=NOW)
        assert got["rows"] in ([], approx(oracle_response_times([])))


def test_reports_on_sqlite(sqlite_engine, redis_client):
    """The embedded default runs the same SQL (window functions, CTEs, the rollup's upsert)."""
    redis_client.flushdb()
    ctx = make_context(sqlite_engine, redis_client)
    items = build_world(ctx, 31)
    assert_rollup_is_a_recount(sqlite_engine)
    change(ctx, I, 1, [1, 2, 3], "set")
    for params in ({}, {"date_from": iso(BASE + 3 * 86_400 + 77), "date_to": iso(BASE + 33 * 86_400 + 5),
                        "bucket": "week"}):
        for name in NAMES:
            got = report(ctx, I, 1, name, params, now=NOW)
            assert got["rows"] == approx(expected(name, items, {1, 2, 3}, 1, params, _threads(ctx))), name


def test_report_through_a_worker(worker_env):
    """By name on the reports queue, as a dashboard would call it."""
    engine, r, webapp = worker_env
    ctx = make_context(engine, r)
    items = build_world(ctx, 9)
    webapp.send_task("crm.set_user_clients", kwargs={"installation_id": I, "user_id": 3, "client_ids": [1, 2]},
                     queue="ingest").get(timeout=30)
    got = webapp.send_task("crm.report", kwargs={"installation_id": I, "user_id": 3, "name": "workload"},
                           queue="reports").get(timeout=30)
    assert set(got) == {"name", "rows", "generated_at", "source"}
    want = expected("workload", items, {1, 2}, 3, {}, _threads(ctx))
    assert got["rows"] == approx(want) and {row["user_id"] for row in got["rows"]} <= set(USERS)
    with pytest.raises(ValueError, match="^name"):
        webapp.send_task("crm.report", kwargs={"installation_id": I, "user_id": 3, "name": "everything"},
                         queue="reports").get(timeout=30)
    # The beat's task, by name: the report just asked for is still current.
    done = webapp.send_task("crm.precompute_reports", queue="reports").get(timeout=30)
    assert done["current"] == 1 and done["computed"] == 0
