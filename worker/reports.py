"""``crm.report``: analytics over what one user may see, exact for that user.

Security comes before aggregation: every statement starts from the user's visible
meetings (those of their own clients, and those reached through another linked client or
their own mailbox; or the rollup rows of their own clients), so no count, median or
ranking ever includes a meeting the user may not see.

- ``activity`` reads the daily rollup (worker/rollups.py) for the user's clients, and raw
  rows only for the meetings seen beyond them (another linked client, the user's mailbox)
  and for the partial days at the edges of the date range.
- ``response_times``, ``awaiting_reply`` and ``workload`` pair messages with window
  functions over the visible messages of each thread; ``going_cold`` takes the gaps
  between a client's visible meetings with ``LAG``.  The same SQL runs on MariaDB/MySQL,
  TiDB and SQLite; on TiDB with TiFlash replicas it reads the columnar replicas.
- A result is cached in Redis per (user, report, params), tagged with the index's token
  and the installation's data version read before computing it.  Every write to the
  index stamps what it touched (the clients of the meetings it wrote, the users whose
  mailbox or access it changed) with the next data version; a cached report is stale
  once one of the user's clients, or the user, has a stamp above its tag.  A write to
  other clients leaves it current; a revocation stamps the user before the database
  commits.

Every report covers the visible meetings dated in ``[date_from, date_to)`` whose
``client_id`` is in ``params.client_ids`` (when given).  Times are UTC.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

from worker import keys, rollups
from worker.tables import email_links, email_mailboxes, emails, meeting_days, meetings
from worker.tables import client_gaps, thread_mailboxes, thread_pairs
from worker.tables import threads as thread_table
from worker.email import thread_state
from worker.email.thread_state import is_message
from worker.errors import InvalidArgument
from worker.query import narrowing, token_list
from worker.visibility import own_clients, seen_beyond, threads_seen, visible_parts
from worker.redis_index import ScriptArgs
from worker.records import iso_seconds, parse_time, positive_int, to_seconds
from worker.errors import REDIS_FAULTS, is_transient

log = logging.getLogger(__name__)

NAMES = ("activity", "response_times", "awaiting_reply", "workload", "going_cold")
PARAMS = ("client_ids", "date_from", "date_to", "bucket")
BUCKETS = ("month", "week")
#: Histogram of response times: label, upper bound in seconds (exclusive).
HISTOGRAM = (("<1h", 3_600), ("1-4h", 14_400), ("4-24h", 86_400), ("1-3d", 259_200), ("3-7d", 604_800),
             (">7d", None))
#: Seconds a cached report lives at most (``going_cold`` measures silence up to now).
CACHE_SECONDS = 300
DAY = rollups.DAY


@dataclasses.dataclass(frozen=True)
class Params:
    client_ids: tuple | None
    date_from: int | None   # whole seconds, inclusive
    date_to: int | None     # whole seconds, exclusive
    bucket: str

    def to_json(self) -> list:
        return [None if self.client_ids is None else list(self.client_ids), self.date_from, self.date_to,
                self.bucket]

    @classmethod
    def from_json(cls, raw) -> "Params":
        client_ids, date_from, date_to, bucket = raw
        if bucket not in BUCKETS:
            raise ValueError(bucket)
        return cls(None if client_ids is None else tuple(int(c) for c in client_ids),
                   None if date_from is None else int(date_from), None if date_to is None else int(date_to), bucket)

    @property
    def narrowed(self) -> bool:
        """Narrowed by client or date: the thread reports then read the messages in range,
        not the threads' kept state."""
        return self.client_ids is not None or self.date_from is not None or self.date_to is not None

    def digest(self, name: str) -> str:
        text = json.dumps([name, self.client_ids, self.date_from, self.date_to, self.bucket])
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


#: No narrowing: every visible meeting.
ALL = Params(client_ids=None, date_from=None, date_to=None, bucket="month")


def validate(installation_id, user_id, name, params) -> tuple[int, int, str, Params]:
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    if not isinstance(name, str) or name not in NAMES:
        raise InvalidArgument("name", f"must be one of {', '.join(NAMES)}, got {name!r:.40}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidArgument("params", f"must be an object or null, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAMS), key=str)
    if unknown:
        raise InvalidArgument(f"params.{unknown[0]!s:.40}", f"is not a report parameter (known: {', '.join(PARAMS)})")
    dates = {}
    for field in ("date_from", "date_to"):
        value = params.get(field)
        dates[field] = None if value is None else to_seconds(parse_time(f"params.{field}", value))
    bucket = params.get("bucket")
    if bucket is None:
        bucket = "month"
    elif not isinstance(bucket, str) or bucket not in BUCKETS:
        raise InvalidArgument("params.bucket", f"must be 'month' or 'week', got {bucket!r:.40}")
    return installation_id, user_id, name, Params(
        client_ids=token_list("params.client_ids", params.get("client_ids"), positive_int),
        date_from=dates["date_from"], date_to=dates["date_to"], bucket=bucket)


#: Report requests noted per installation (report_cache.lua; the beat keeps the noted ones
#: computed while asked for within ``CRM_REPORT_IDLE``): a new request beyond is not noted.
REQUESTS_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class ReportCacheArgs(ScriptArgs):
    """ARGV of ``report_cache.lua``."""
    token: str
    user: int
    field: str
    request: str
    max_requests: int
    mode: str


def report(ctx, installation_id, user_id, name, params=None, now: int | None = None) -> dict:
    """``crm.report``: the cached copy when it is still current, else computed.  Either
    way the request is noted, so the beat keeps it computed while the user is active."""
    installation_id, user_id, name, p = validate(installation_id, user_id, name, params)
    now = int(time.time()) if now is None else now
    tag = None
    token = ctx.mirror.token(installation_id)
    try:
        if token is not None:
            found = _cached(ctx, installation_id, user_id, name, p, token, "ask",
                            request=json.dumps([now, name, p.to_json()]))
            if int(found[0]) == 1:
                return {**json.loads(found[1]), "source": "cache"}
            if int(found[0]) == 2:
                tag = found[1].decode()
    except REDIS_FAULTS as exc:
        if not is_transient(exc):
            raise
        log.warning("index unreachable (%s); report computed without its cache", exc.__class__.__name__)
    return _compute_and_store(ctx, installation_id, user_id, name, p, now, tag)


def _cached(ctx, installation_id: int, user_id: int, name: str, p: Params, token: str, mode: str,
            request: str = "", client=None):
    """report_cache.lua for one (user, report, params): ``mode`` "ask" (the user's request:
    noted, the copy returned when current) or "check" (the beat's: nothing noted, no copy
    returned).  ``client``: a pipeline to queue the call on."""
    digest = p.digest(name)
    return ctx.scripts["report_cache"](
        keys=[keys.ready(installation_id), keys.data_version(installation_id),
              keys.report_cache(installation_id, user_id, digest), keys.report_requests(installation_id),
              keys.user_clients(installation_id, user_id), keys.client_stamps(installation_id),
              keys.user_stamps(installation_id)],
        args=ReportCacheArgs(token, user_id, f"{user_id}:{digest}", request, REQUESTS_MAX, mode).argv(),
        client=client)


def _compute_and_store(ctx, installation_id: int, user_id: int, name: str, p: Params, now: int,
                       tag: str | None) -> dict:
    """Compute the report; store it under ``tag`` (read before computing) when given."""
    with ctx.engine.connect() as conn:
        rows, source = compute(conn, installation_id, user_id, name, p, now, tiflash=ctx.tiflash(),
                               stamps=client_stamps(ctx, installation_id))
    result = {"name": name, "rows": rows, "generated_at": iso_seconds(now), "source": source}
    if tag is not None:
        key = keys.report_cache(installation_id, user_id, p.digest(name))
        body = json.dumps({k: v for k, v in result.items() if k != "source"}, separators=(",", ":"))
        try:
            pipe = ctx.redis.pipeline(transaction=True)  # keys of one installation: one slot
            pipe.hset(key, mapping={"t": tag, "b": body})
            pipe.expire(key, CACHE_SECONDS)
            pipe.execute()
        except REDIS_FAULTS as exc:
            if not is_transient(exc):
                raise
    return result


def precompute(ctx, installation_id: int, token: str, now: int, idle: int, interval: int,
               deadline: float) -> dict:
    """Keep the reports users asked for in the last ``idle`` seconds computed: each whose
    cached copy is stale (something it could include changed since) or would expire
    before the next run is computed again, most recently asked first, until ``deadline``
    (``time.monotonic()``).  Requests older than ``idle`` are forgotten.  Counts."""
    requests_key = keys.report_requests(installation_id)
    counts = {"computed": 0, "current": 0, "forgotten": 0, "left": 0}
    noted, forgotten = [], []
    for field, value in ctx.redis.hgetall(requests_key).items():
        try:
            asked, name, raw = json.loads(value)
            user_id = int(field.split(b":", 1)[0])
            p = Params.from_json(raw)
        except (ValueError, TypeError):
            asked = name = None
        if type(asked) is not int or asked < now - idle or name not in NAMES:
            forgotten.append(field)
            continue
        noted.append((asked, user_id, name, p))
    if forgotten:
        ctx.redis.hdel(requests_key, *forgotten)
        counts["forgotten"] = len(forgotten)
    noted.sort(key=lambda n: -n[0])
    pipe = ctx.redis.pipeline(transaction=False)
    for _, user_id, name, p in noted:
        _cached(ctx, installation_id, user_id, name, p, token, "check", client=pipe)
    for (_, user_id, name, p), found in zip(noted, pipe.execute()):
        if int(found[0]) == 0:
            counts["left"] += 1  # the index does not mirror the database: nothing may be cached
            continue
        if int(found[0]) == 1 and int(found[2]) > interval + 30:
            counts["current"] += 1
            continue
        if time.monotonic() > deadline:
            counts["left"] += 1
            continue
        tag = found[3] if int(found[0]) == 1 else found[1]
        _compute_and_store(ctx, installation_id, user_id, name, p, now, tag.decode())
        counts["computed"] += 1
    return counts


def compute(conn, installation_id: int, user_id: int, name: str, p: Params, now: int,
            tiflash: bool = False, stamps=None) -> tuple[list, str]:
    """The report's rows from the database, and where they came from.  ``tiflash``: read
    TiDB's columnar replicas (the context knows whether the database has them);
    ``stamps``: the index's client stamps, which tell the kept per-client figures that
    are still current (:func:`client_stamps`)."""
    hint = TIFLASH_HINT if tiflash else None
    if name == "going_cold":
        return going_cold(conn, installation_id, user_id, p, now, hint, stamps=stamps), "database"
    if p.date_from is not None and p.date_to is not None and p.date_from >= p.date_to:
        return [], "database"
    if name == "activity":
        return activity(conn, installation_id, user_id, p, hint), "rollup"
    return REPORTS[name](conn, installation_id, user_id, p, now, hint), "database"


# -- what the user sees ------------------------------------------------------------------

def _filters(p: Params) -> list:
    return narrowing(p.client_ids, p.date_from, p.date_to)


def _visible(installation_id: int, user_id: int, p: Params, columns, *conds, hint: str | None = None):
    """The user's visible meetings in range and filter, as two disjoint parts that each
    use an index: those of the user's own clients, and those seen beyond them (reached
    through another linked client or the user's mailbox).  A UNION ALL subquery."""
    return sa.union_all(*visible_parts(installation_id, user_id, columns, *_filters(p), *conds,
                                       hint=hint)).subquery("seen")


def visible_messages(installation_id: int, user_id: int, p: Params = None, hint: str | None = None):
    """CTE ``v``: the visible stored messages, with their thread, and each message's
    ``outs_so_far`` (outbound messages of its thread up to and including it, in (date,
    id) order) and ``outs`` (outbound messages of its thread)."""
    m = meetings.c
    p = ALL if p is None else p
    rows = _visible(installation_id, user_id, p,
                    (m.id, m.meeting_s, m.status, m.subject, emails.c.thread_id), *is_message(m), hint=hint)
    is_out = sa.case((rows.c.status == "outbound", 1), else_=0)
    in_thread = dict(partition_by=rows.c.thread_id)
    order = (rows.c.meeting_s, rows.c.id)
    return sa.select(rows.c.thread_id, rows.c.id, rows.c.meeting_s, rows.c.status, rows.c.subject,
                     sa.func.sum(is_out).over(**in_thread, order_by=order, rows=(None, 0)).label("outs_so_far"),
                     sa.func.sum(is_out).over(**in_thread).label("outs"),
                     sa.func.row_number().over(**in_thread, order_by=order).label("position")).cte("v")


def _pairs(v):
    """Each inbound message with the next outbound one of its thread: the outbound
    message whose running count of outbound messages is one more than the inbound's."""
    i, r = v.alias("i"), v.alias("r")
    return (sa.select(i.c.thread_id, i.c.id.label("inbound_id"), r.c.id.label("reply_id"),
                      (r.c.meeting_s - i.c.meeting_s).label("wait_s"))
            .select_from(i.join(r, sa.and_(r.c.thread_id == i.c.thread_id, r.c.status == "outbound",
                                           r.c.outs_so_far == i.c.outs_so_far + 1)))
            .where(i.c.status == "inbound"))


def _awaiting(v):
    """Threads whose last visible message is inbound: the inbound messages after the last
    outbound one (``outs_so_far == outs``), the first of them the start of the wait."""
    return (sa.select(v.c.thread_id, sa.func.min(v.c.meeting_s).label("since"))
            .where(v.c.status == "inbound", v.c.outs_so_far == v.c.outs)
            .group_by(v.c.thread_id))


#: On TiDB with TiFlash replicas of the tables, read the columnar replicas (the hint goes
#: in the query block that reads the tables, by their unaliased names).
TIFLASH_HINT = "/*+ READ_FROM_STORAGE(TIFLASH[meetings, emails, meeting_days]) */"


def _hinted(stmt, hint: str | None):
    return stmt.prefix_with(hint, dialect="mysql") if hint else stmt


# -- the reports -----------------------------------------------------------------------

def _month_label(month: int) -> str:
    return f"{month // 100:04d}-{month % 100:02d}"


def _bucket_label(day: int, bucket: str) -> str:
    if bucket == "week":
        return rollups.date_of(rollups.week_of(day)).isoformat()
    return _month_label(rollups.month_of(day))


def _partial_days(p: Params) -> set[int]:
    """The days that the range covers only in part (a bound inside them): read from the
    rows, while the rollup gives the whole days ``[ceil(date_from), floor(date_to))``."""
    days = set()
    if p.date_from is not None and p.date_from % DAY:
        days.add(p.date_from // DAY)
    if p.date_to is not None and p.date_to % DAY:
        days.add(p.date_to // DAY)
    return days


def activity(conn, installation_id: int, user_id: int, p: Params, hint: str | None = None) -> list[dict]:
    """Meetings per (client, type, bucket) with running totals.  The whole days of the
    range, for the user's own clients, come from the rollup; the rest (meetings seen
    through another link or the user's mailbox, the partial days at the range's edges)
    from the visible rows themselves."""
    counts: collections.Counter = collections.Counter()
    first_day = None if p.date_from is None else -(-p.date_from // DAY)
    end_day = None if p.date_to is None else p.date_to // DAY
    own = own_clients(installation_id, user_id)
    d = meeting_days.c
    column = d.week if p.bucket == "week" else d.month
    conds = [d.installation_id == installation_id, d.client_id.in_(own)]
    if p.client_ids is not None:
        conds.append(d.client_id.in_(p.client_ids))
    if first_day is not None:
        conds.append(d.day >= first_day)
    if end_day is not None:
        conds.append(d.day < end_day)
    stmt = (sa.select(d.client_id, d.type, column, sa.func.sum(d["count"]))
            .where(*conds).group_by(d.client_id, d.type, column))
    for client_id, type_, bucket, n in conn.execute(_hinted(stmt, hint)):
        label = _bucket_label(bucket, "week") if p.bucket == "week" else _month_label(bucket)
        counts[(client_id, type_, label)] += int(n)
    m = meetings.c
    raw = [seen_beyond(installation_id, user_id, (m.client_id, m.type, m.meeting_s), *_filters(p), hint=hint)]
    # The partial days at the range's edges, from the rows of the clients the rollup says
    # had meetings on those days (a few, instead of a probe per client of the user).  A
    # range inside one day has one partial day: read once, it counts each meeting once.
    for edge_day in sorted(_partial_days(p)):
        active = sa.select(d.client_id).where(d.installation_id == installation_id, d.day == edge_day,
                                              d.client_id.in_(own))
        raw.append(sa.select(m.client_id, m.type, m.meeting_s).where(
            m.installation_id == installation_id, m.client_id.in_(active), *_filters(p),
            m.meeting_s >= edge_day * DAY, m.meeting_s < (edge_day + 1) * DAY))
    for n, stmt in enumerate(raw):
        for client_id, type_, seconds in conn.execute(stmt if n == 0 else _hinted(stmt, hint)):
            counts[(client_id, type_, _bucket_label(seconds // DAY, p.bucket))] += 1
    rows, running = [], collections.Counter()
    for (client_id, type_, label), n in sorted(counts.items(), key=lambda kv: (kv[0][0] != 0, kv[0])):
        if n <= 0:
            continue
        running[(client_id, type_)] += n
        rows.append({"client_id": client_id or None, "type": type_, "bucket": label, "count": n,
                     "running_total": running[(client_id, type_)]})
    return rows


def percentile(sorted_values: list, q: float) -> float | None:
    """Linear interpolation between closest ranks (the inclusive method)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _seen(installation_id: int, user_id: int):
    """CTE ``seen``: the threads the user sees a message of, and whether whole
    (worker/visibility.py threads_seen): one grouping, read by both parts of a report's
    statement."""
    return sa.select(threads_seen(installation_id, user_id)).cte("seen")


def _on_thread(installation_id: int, table, seen):
    return sa.and_(table.c.installation_id == installation_id, table.c.thread_id == seen.c.thread_id)


def _from_seen(stmt):
    """Join from the user's threads to their rows, in that order (STRAIGHT_JOIN: MariaDB
    otherwise scanned every thread row of the installation, probing the user's set)."""
    return stmt.prefix_with("STRAIGHT_JOIN", dialect="mysql")


def _in_part(conn, installation_id: int, user_id: int, ids) -> list[dict]:
    """The summaries, for the user, of the threads ``ids``, which the user sees only in
    part, from their visible messages."""
    return [{"thread_id": tid, **thread_state.summary(messages)}
            for tid, messages in thread_state.visible_part(conn, installation_id, user_id, ids).items()]


def response_times(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    if p.narrowed:
        v = visible_messages(installation_id, user_id, p, hint)
        pairs = _pairs(v).cte("pairs")
        waits = sorted(conn.execute(sa.select(pairs.c.wait_s)).scalars())
        threads = conn.execute(sa.select(sa.func.count(sa.distinct(v.c.thread_id)))
                               .where(v.c.status == "inbound")).scalar() or 0
    else:
        seen, t, pr = _seen(installation_id, user_id), thread_table, thread_pairs
        # One statement, the user's threads read once: those seen whole with their pairs
        # (whole 1), and the ids of those seen in part (whole 0).
        rows = conn.execute(_from_seen(
            sa.select(seen.c.whole, t.c.thread_id, pr.c.wait_s)
            .select_from(seen.join(t, _on_thread(installation_id, t, seen))
                         .outerjoin(pr, sa.and_(_on_thread(installation_id, pr, seen), pr.c.first, seen.c.whole == 1)))
            .where(sa.or_(seen.c.whole == 0, t.c.inbound > 0)))).all()
        part = [th for th in _in_part(conn, installation_id, user_id, {r.thread_id for r in rows if not r.whole})
                if th["inbound"]]
        waits = sorted([r.wait_s for r in rows if r.whole and r.wait_s is not None]
                       + [wait for th in part for wait, _ in th["pairs"]])
        threads = len({r.thread_id for r in rows if r.whole}) + len(part)
    histogram = {label: 0 for label, _ in HISTOGRAM}
    for wait in waits:
        for label, upper in HISTOGRAM:
            if upper is None or wait < upper:
                histogram[label] += 1
                break
    return [{"threads": threads, "answered": len(waits), "median_s": percentile(waits, 0.5),
             "p90_s": percentile(waits, 0.9),
             "within_1h_share": (sum(1 for w in waits if w < 3_600) / len(waits)) if waits else None,
             "histogram": histogram}]


def awaiting_reply(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    if not p.narrowed:
        seen, t = _seen(installation_id, user_id), thread_table
        rows = conn.execute(_from_seen(
            sa.select(seen.c.whole, t.c.thread_id, t.c.subject, t.c.awaiting_s, t.c.clients)
            .select_from(seen.join(t, _on_thread(installation_id, t, seen)))
            .where(sa.or_(seen.c.whole == 0, t.c.awaiting_s.isnot(None))))).all()
        waiting = [(r.awaiting_s, r.thread_id, r.subject, json.loads(r.clients)) for r in rows if r.whole]
        waiting += [(th["awaiting_s"], th["thread_id"], th["subject"], th["clients"])
                    for th in _in_part(conn, installation_id, user_id, {r.thread_id for r in rows if not r.whole})
                    if th["awaiting_s"] is not None]
        return [{"thread_id": tid, "subject": subject, "awaiting_reply_since": iso_seconds(since),
                 "client_ids": list(clients)} for since, tid, subject, clients in sorted(waiting, key=lambda w: w[:2])]
    v = visible_messages(installation_id, user_id, p, hint)
    waiting = _awaiting(v).cte("waiting")
    threads = {}
    stmt = (sa.select(waiting.c.thread_id, waiting.c.since, v.c.subject)
            .join(v, sa.and_(v.c.thread_id == waiting.c.thread_id, v.c.position == 1)))
    for thread_id, since, subject in conn.execute(stmt):
        threads[thread_id] = {"thread_id": thread_id, "subject": subject, "awaiting_reply_since": since,
                              "client_ids": set()}
    stmt = (sa.select(v.c.thread_id, email_links.c.client_id)
            .join(waiting, waiting.c.thread_id == v.c.thread_id)
            .join(email_links, email_links.c.meeting_id == v.c.id)
            .distinct())
    for thread_id, client_id in conn.execute(stmt):
        threads[thread_id]["client_ids"].add(client_id)
    rows = sorted(threads.values(), key=lambda t: (t["awaiting_reply_since"], t["thread_id"]))
    return [{**t, "awaiting_reply_since": iso_seconds(t["awaiting_reply_since"]),
             "client_ids": sorted(t["client_ids"])} for t in rows]


def workload(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None) -> list[dict]:
    figures: dict = collections.defaultdict(lambda: {"received": 0, "sent": 0, "awaiting": 0, "waits": []})
    if not p.narrowed:
        _workload_kept(conn, installation_id, user_id, figures)
    else:
        _workload_sql(conn, visible_messages(installation_id, user_id, p, hint), figures)
    return [{"user_id": u, "received": f["received"], "sent": f["sent"], "awaiting": f["awaiting"],
             "median_reply_s": f["median"] if "median" in f else percentile(sorted(f["waits"]), 0.5)}
            for u, f in sorted(figures.items()) if f["received"] or f["sent"]]


def _workload_kept(conn, installation_id: int, user_id: int, figures: dict) -> None:
    """workload from the kept thread state: per mailbox, the counts of the threads the user
    sees whole summed by the database, and the median reply picked there (the two middle
    waits by rank); threads seen in part from their visible messages.  A mailbox with
    pairs in both gets its whole list of waits, so its median stays exact."""
    seen, pr, mb = _seen(installation_id, user_id), thread_pairs, thread_mailboxes
    counts = _from_seen(
        sa.select(sa.literal("c").label("kind"), mb.c.user_id, sa.func.sum(mb.c.received).label("a"),
                  sa.func.sum(mb.c.sent).label("b"), sa.func.sum(seen.c.awaiting).label("c"),
                  sa.null().label("thread_id"))
        .select_from(seen.join(mb, _on_thread(installation_id, mb, seen)))
        .where(seen.c.whole == 1).group_by(mb.c.user_id))
    ranked = _from_seen(
        sa.select(pr.c.user_id, pr.c.wait_s,
                  sa.func.row_number().over(partition_by=pr.c.user_id, order_by=pr.c.wait_s).label("rank"),
                  sa.func.count().over(partition_by=pr.c.user_id).label("n"))
        .select_from(seen.join(pr, _on_thread(installation_id, pr, seen))).where(seen.c.whole == 1)).subquery("ranked")
    low = (ranked.c.n - 1) // 2 + 1  # the median's rank(s), 1-based: low, and low + 1 when n is even
    middle = (sa.select(sa.literal("m"), ranked.c.user_id, ranked.c.wait_s, ranked.c.rank, ranked.c.n, sa.null())
              .where(ranked.c.rank.in_([low, low + 1])))
    partial = sa.select(sa.literal("p"), sa.null(), sa.null(), sa.null(), sa.null(), seen.c.thread_id).where(
        seen.c.whole == 0)
    rows = conn.execute(sa.union_all(counts, middle, partial)).all()
    middles: dict = collections.defaultdict(dict)  # user -> {rank: wait}, and the count of waits
    for r in rows:
        if r.kind == "c":
            f = figures[r.user_id]
            f["received"] += int(r.a)
            f["sent"] += int(r.b)
            f["awaiting"] += int(r.c)
        elif r.kind == "m":
            middles[r.user_id][int(r.b)] = int(r.a)
            middles[r.user_id]["n"] = int(r.c)
    extra: dict = collections.defaultdict(list)
    for th in _in_part(conn, installation_id, user_id, [r.thread_id for r in rows if r.kind == "p"]):
        for user, (received, sent) in th["mailboxes"].items():
            f = figures[int(user)]
            f["received"] += received
            f["sent"] += sent
            f["awaiting"] += th["awaiting_s"] is not None
        for wait, users in th["pairs"]:
            for user in users:
                extra[user].append(wait)
    if extra:  # those mailboxes' whole lists, to merge
        stmt = _from_seen(sa.select(pr.c.user_id, pr.c.wait_s)
                          .select_from(seen.join(pr, _on_thread(installation_id, pr, seen)))
                          .where(seen.c.whole == 1, pr.c.user_id.in_(sorted(extra))))
        for user, wait in conn.execute(stmt):
            extra[user].append(wait)
    for user, m in middles.items():
        if user not in extra:  # the median of the whole threads' waits alone
            n, low = m["n"], (m["n"] - 1) // 2 + 1
            figures[user]["median"] = percentile([m[low]] if n % 2 else [m[low], m[low + 1]], 0.5)
    for user, waits in extra.items():
        figures[user]["waits"] = waits


def _workload_sql(conn, v, figures: dict) -> None:
    box = email_mailboxes.c
    stmt = (sa.select(box.user_id, v.c.status, sa.func.count())
            .select_from(v.join(email_mailboxes, box.meeting_id == v.c.id))
            .group_by(box.user_id, v.c.status))
    for mailbox_user, status, n in conn.execute(stmt):
        figures[mailbox_user]["sent" if status == "outbound" else "received"] += n
    waiting = _awaiting(v).cte("waiting")
    stmt = (sa.select(box.user_id, sa.func.count(sa.distinct(v.c.thread_id)))
            .select_from(v.join(waiting, waiting.c.thread_id == v.c.thread_id)
                         .join(email_mailboxes, box.meeting_id == v.c.id))
            .group_by(box.user_id))
    for mailbox_user, n in conn.execute(stmt):
        figures[mailbox_user]["awaiting"] = n
    pairs = _pairs(v).cte("pairs")
    stmt = (sa.select(box.user_id, pairs.c.wait_s)
            .select_from(pairs.join(email_mailboxes, box.meeting_id == pairs.c.reply_id)))
    for mailbox_user, wait in conn.execute(stmt):
        figures[mailbox_user]["waits"].append(wait)


def going_cold(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None,
               stamps=None) -> list[dict]:
    """Clients whose silence is longer than twice their median gap.  Without a date range
    and with ``stamps`` (the index's client stamps: :func:`client_stamps`), the user's own
    clients come from their kept figures (``client_gaps``, recomputed for the clients whose
    stamp moved); the clients seen only through emails, and any date range, from the
    visible rows."""
    m = meetings.c
    last: dict = {}
    medians: dict = {}
    gaps: dict = collections.defaultdict(list)
    kept = _kept_gaps(conn, installation_id, user_id, p, stamps) if p.date_from is None and p.date_to is None \
        and stamps is not None else None
    if kept is None:
        rows = _visible(installation_id, user_id, p, (m.id, m.client_id, m.meeting_s), m.client_id != 0, hint=hint)
        seen = sa.select(rows.c.client_id, rows.c.meeting_s,
                         (rows.c.meeting_s - sa.func.lag(rows.c.meeting_s).over(
                             partition_by=rows.c.client_id, order_by=(rows.c.meeting_s, rows.c.id))).label("gap")).cte("seen")
        for client_id, seconds, gap in conn.execute(sa.select(seen.c.client_id, seen.c.meeting_s, seen.c.gap)):
            if gap is not None:
                gaps[client_id].append(gap)
            if client_id not in last or seconds > last[client_id]:
                last[client_id] = seconds
    else:
        for client_id, (last_s, twice) in kept.items():
            if twice is not None:
                last[client_id], medians[client_id] = last_s, twice / 2
        # The clients seen only through emails: their few visible rows, in order (wrapped
        # in a window statement, this driven read lost its plan on MariaDB).
        beyond = collections.defaultdict(list)
        for meeting_id, client_id, seconds in conn.execute(seen_beyond(
                installation_id, user_id, (m.id, m.client_id, m.meeting_s), m.client_id != 0, *_filters(p), hint=hint)):
            beyond[client_id].append((seconds, meeting_id))
        for client_id, found in beyond.items():
            found.sort()
            gaps[client_id] = [b[0] - a[0] for a, b in zip(found, found[1:])]
            last[client_id] = found[-1][0]
    medians.update((client_id, percentile(sorted(values), 0.5)) for client_id, values in gaps.items() if values)
    rows = []
    for client_id, median in medians.items():
        silence = now - last[client_id]
        if silence > 2 * median:
            rows.append({"client_id": client_id, "last_at": iso_seconds(last[client_id]), "median_gap_s": median,
                         "silence_s": silence})
    rows.sort(key=lambda r: (-r["silence_s"], r["client_id"]))
    return rows


def _kept_gaps(conn, installation_id: int, user_id: int, p: Params, stamps) -> dict | None:
    """{client: (last_s, twice the median gap or None)} of the user's own clients (narrowed
    by ``p.client_ids``): every meeting of a client the user holds is visible to them, so
    the figures are the client's own.  Rows whose stamp moved are computed again from the
    client's meetings and stored.  None when the index cannot say what moved."""
    own = sorted(conn.execute(own_clients(installation_id, user_id)).scalars())
    if p.client_ids is not None:
        own = sorted(set(own) & set(p.client_ids))
    current = stamps(own) if own else {}
    if current is None:
        return None
    g = client_gaps.c
    kept, found = {}, {}
    for start in range(0, len(own), 1000):
        for client_id, stamp, last_s, twice in conn.execute(sa.select(g.client_id, g.stamp, g.last_s, g.median_gap2).where(
                g.installation_id == installation_id, g.client_id.in_(own[start:start + 1000]))):
            if stamp == current[client_id]:
                kept[client_id] = (last_s, twice)
    stale = [c for c in own if c not in kept]
    m = meetings.c
    dates: dict = collections.defaultdict(list)
    for start in range(0, len(stale), 500):
        for client_id, seconds in conn.execute(sa.select(m.client_id, m.meeting_s).where(
                m.installation_id == installation_id, m.client_id.in_(stale[start:start + 500]))
                .order_by(m.client_id, m.meeting_s, m.id)):
            dates[client_id].append(seconds)
    for client_id in stale:
        ds = dates.get(client_id, [])
        gaps = sorted(b - a for a, b in zip(ds, ds[1:]))
        found[client_id] = (ds[-1] if ds else None, int(percentile(gaps, 0.5) * 2) if gaps else None)
    if found:  # in a transaction of its own: the report's reads keep their snapshot
        with conn.engine.begin() as writer:
            _store_gaps(writer, installation_id, {c: (current[c], *v) for c, v in found.items()})
    return {**kept, **found}


def _store_gaps(conn, installation_id: int, rows: dict) -> None:
    values = [{"installation_id": installation_id, "client_id": c, "stamp": stamp, "last_s": last_s,
               "median_gap2": twice} for c, (stamp, last_s, twice) in sorted(rows.items())]
    t = client_gaps
    if conn.dialect.name == "mysql":
        stmt = mysql.insert(t)
        stmt = stmt.on_duplicate_key_update(stamp=stmt.inserted.stamp, last_s=stmt.inserted.last_s,
                                            median_gap2=stmt.inserted.median_gap2)
    else:
        stmt = sqlite.insert(t)
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.installation_id, t.c.client_id],
                                          set_={"stamp": stmt.excluded.stamp, "last_s": stmt.excluded.last_s,
                                                "median_gap2": stmt.excluded.median_gap2})
    for start in range(0, len(values), 500):
        conn.execute(stmt, values[start:start + 500])


def client_stamps(ctx, installation_id: int):
    """A function that gives the index's stamp (``<token>|<n>``) of each client asked, or
    None when the index does not mirror the database (then nothing kept may be trusted);
    None itself when the installation has no token."""
    token = ctx.mirror.token(installation_id)
    if token is None:
        return None

    def stamps(client_ids: list) -> dict | None:
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.get(keys.ready(installation_id))
        pipe.hmget(keys.client_stamps(installation_id), client_ids)
        try:
            ready, values = pipe.execute()
        except REDIS_FAULTS as exc:
            if not is_transient(exc):
                raise
            return None
        if ready is None or ready.decode() != token:
            return None
        return {c: f"{token}|{int(v or 0)}" for c, v in zip(client_ids, values)}
    return stamps


REPORTS = {"response_times": response_times, "awaiting_reply": awaiting_reply, "workload": workload,
           "going_cold": going_cold}
