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
- A result is cached in Redis per (user, report, params) and served while nothing it
  could include changed (worker/answer_cache.py): a write to other clients leaves it
  current; a revocation makes it stale before the database commits.

Every report covers the visible meetings dated in ``[date_from, date_to)`` whose
``client_id`` is in ``params.client_ids`` (when given).  Times are UTC.
"""
from __future__ import annotations

import json
import time

from worker import answer_cache, keys
from worker.errors import InvalidArgument
from worker.query import token_list
from worker.records import iso_seconds, parse_time, positive_int, to_seconds

from worker.reports.shared import ALL, BUCKETS, HISTOGRAM, NAMES, PARAMS, TIFLASH_HINT, Params, percentile
from worker.reports.threads import awaiting_reply, response_times, workload
from worker.reports.clients import activity, client_stamps, going_cold

__all__ = ["ALL", "BUCKETS", "HISTOGRAM", "NAMES", "Params", "percentile", "client_stamps", "compute",
           "precompute", "report", "validate", "REPORTS", "REQUESTS_MAX"]


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


#: Report requests noted per installation (answer_cache.lua; the beat keeps the noted ones
#: computed while asked for within ``CRM_REPORT_IDLE``): a new request beyond is not noted.
REQUESTS_MAX = 10_000


def report(ctx, installation_id, user_id, name, params=None, now: int | None = None) -> dict:
    """``crm.report``: the cached copy when it is still current, else computed.  Either
    way the request is noted, so the beat keeps it computed while the user is active."""
    installation_id, user_id, name, p = validate(installation_id, user_id, name, params)
    now = int(time.time()) if now is None else now
    copy, tag = answer_cache.read(ctx, installation_id, user_id, p.digest(name), ctx.mirror.token(installation_id),
                                  request=json.dumps([now, name, p.to_json()]), max_requests=REQUESTS_MAX)
    if copy is not None:
        return {**copy, "source": "cache"}
    return _compute_and_store(ctx, installation_id, user_id, name, p, now, tag)


def _compute_and_store(ctx, installation_id: int, user_id: int, name: str, p: Params, now: int,
                       tag: str | None) -> dict:
    """Compute the report; store it under ``tag`` (read before computing) when given."""
    with ctx.engine.connect() as conn:
        rows, source = compute(conn, installation_id, user_id, name, p, now, tiflash=ctx.tiflash(),
                               stamps=client_stamps(ctx, installation_id))
    result = {"name": name, "rows": rows, "generated_at": iso_seconds(now), "source": source}
    if tag is not None:
        answer_cache.store(ctx, installation_id, user_id, p.digest(name), tag,
                           {k: v for k, v in result.items() if k != "source"})
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
        answer_cache.check(ctx, installation_id, user_id, p.digest(name), token, "check", client=pipe)
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


REPORTS = {"response_times": response_times, "awaiting_reply": awaiting_reply, "workload": workload,
           "going_cold": going_cold}
