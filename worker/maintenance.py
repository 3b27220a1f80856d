"""Rebuild the Redis index from the database, reconcile the two, and claim an index Redis.

Every repair writes what the database holds under the rows' locks (worker/mirror.py), so a
repair racing a delete, an ingest or an access change cannot undo it.
"""
from __future__ import annotations

import collections
import contextlib
import time

import redis
import sqlalchemy as sa

from worker import keys, metrics, redis_index
from worker.errors import REDIS_FAULTS
from worker.precompute import drop_user, list_views
from worker.query import SORTS, sql_conditions, view_query
from worker.tables import COLUMNS, StoredRow, applied_writes, installations, meetings, user_clients, users
from worker.mirror import load_access_locked, our_database_id, repair_ids
from worker.rebuild import rebuild_installation

BATCH = 1000
#: Recorded writes are kept this long: far beyond any redelivery of their task.
WRITES_KEPT_S = 7 * 86400


def installation_ids(engine: sa.Engine, only: int | None = None) -> list[int]:
    if only is not None:
        return [only]
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(installations.c.id)).scalars())


def _stream_meetings(engine: sa.Engine, installation_id: int):
    """The installation's meetings in batches, by id (keyset paging, no long transaction)."""
    last = -1
    while True:
        with engine.connect() as conn:
            rows = [StoredRow(*row) for row in conn.execute(
                sa.select(*COLUMNS).where(meetings.c.installation_id == installation_id, meetings.c.id > last)
                .order_by(meetings.c.id).limit(BATCH))]
        if not rows:
            return
        yield rows
        last = rows[-1].id


def _access_lists(engine: sa.Engine, installation_id: int) -> dict[int, set[int]]:
    """user -> client ids, from the database."""
    with engine.connect() as conn:
        lists = {u: set() for u in conn.execute(
            sa.select(users.c.user_id).where(users.c.installation_id == installation_id)).scalars()}
        for u, c in conn.execute(sa.select(user_clients.c.user_id, user_clients.c.client_id).where(
                user_clients.c.installation_id == installation_id)):
            lists.setdefault(u, set()).add(c)
    return lists


def claim_index(ctx) -> list[int]:
    """Make the index Redis this database's.  Installations it held for another database
    answer nothing for this one (their tokens differ) and are rebuilt before they answer.
    Returns the installations the index held for another database."""
    r = ctx.redis
    ours = our_database_id(ctx.engine)
    theirs = r.get(keys.DATABASE)
    stale = []
    if theirs is None or theirs.decode() != ours:
        for installation_id in sorted(int(i) for i in r.smembers(keys.INSTALLATIONS)):
            gen = r.get(keys.generation(installation_id))
            if gen is not None and not gen.decode().startswith(ours + ":"):
                stale.append(installation_id)
                r.delete(keys.ready(installation_id), keys.generation(installation_id))
        r.set(keys.DATABASE, ours)
    ctx.mirror.forget()
    return stale


def rebuild(ctx, only: int | None = None) -> dict:
    """Rebuild the index of one installation (or all) from the database.  Queries answer
    from the database meanwhile.  An installation's entry says ``superseded`` when a later
    rebuild of it overtook this one (which then stopped: the later one publishes)."""
    done = {}
    for installation_id in installation_ids(ctx.engine, only):
        report = rebuild_installation(ctx, installation_id)
        done[str(installation_id)] = {k: report[k] for k in ("meetings", "users", "superseded")}
    return {"rebuilt": done}


def _redis_access(r: redis.Redis, installation_id: int) -> dict[int, set[int]]:
    found = {}
    for key in r.scan_iter(match=keys.user_clients(installation_id, "*"), count=1000):
        found[int(key.rsplit(b":", 1)[1])] = {int(c) for c in r.smembers(key)}
    return found


def reconcile(ctx, only: int | None = None, now: float | None = None) -> dict:
    """Compare the index with the database and repair what differs; return what was
    found.  An installation whose index is not ready for this database is rebuilt."""
    report = collections.Counter()
    rebuilt = []
    engine, r, mirror = ctx.engine, ctx.redis, ctx.mirror
    for installation_id in installation_ids(engine, only):
        token = mirror.refresh(installation_id)
        if token is None:
            continue
        ready = r.get(keys.ready(installation_id))
        if ready is None or ready.decode() != token:
            rebuild_installation(ctx, installation_id, cause="not_ready")
            rebuilt.append(installation_id)
            continue
        report["installations"] += 1
        _reconcile_access(ctx, installation_id, token, report)
        _reconcile_meetings(ctx, installation_id, token, report)
        _reconcile_views(ctx, installation_id, report)
    report["writes_pruned"] = prune_writes(engine, time.time() if now is None else now)
    metrics.count(r, {f"repair:{kind}": report[kind] for kind in (
        "access_repaired", "meetings_repaired", "meetings_removed", "orphan_entries_removed", "views_dropped")})
    with contextlib.suppress(*REDIS_FAULTS):
        r.hset(keys.METRICS, "reconcile:last_run", int(time.time()))
    return {"rebuilt": rebuilt, **{k: report[k] for k in (
        "installations", "users_checked", "access_repaired", "meetings_checked", "meetings_repaired",
        "meetings_removed", "orphan_entries_removed", "views_checked", "views_dropped", "writes_pruned")}}


def prune_writes(engine: sa.Engine, now: float) -> int:
    """Forget recorded writes older than a week, except each installation's newest
    (the index remembers its last few; those must stay provable)."""
    cutoff = int((now - WRITES_KEPT_S) * 1_000_000)
    removed = 0
    with engine.begin() as conn:
        for installation_id in conn.execute(sa.select(applied_writes.c.installation_id).distinct()).scalars():
            keep = conn.execute(
                sa.select(applied_writes.c.at_us).where(applied_writes.c.installation_id == installation_id)
                .order_by(applied_writes.c.at_us.desc()).offset(4 * keys.RECENT_WRITES).limit(1)).scalar()
            if keep is None:
                continue
            removed += conn.execute(applied_writes.delete().where(
                applied_writes.c.installation_id == installation_id,
                applied_writes.c.at_us < min(cutoff, keep))).rowcount
    return removed


def _reconcile_access(ctx, installation_id, token, report) -> None:
    in_db = _access_lists(ctx.engine, installation_id)
    in_redis = _redis_access(ctx.redis, installation_id)
    users_ = set(in_db) | set(in_redis)
    report["users_checked"] += len(users_)
    differ = sorted(u for u in users_ if in_redis.get(u, set()) != in_db.get(u, set()))
    if differ:
        # Under each user's row lock: the database's list at this instant, whatever version
        # Redis holds (a concurrent change waits for the lock, then writes a newer one).
        load_access_locked(ctx, installation_id, token, differ)
        report["access_repaired"] += len(differ)


def _reconcile_meetings(ctx, installation_id, token, report) -> None:
    engine, r = ctx.engine, ctx.redis
    heads = {}
    for field, value in r.hscan_iter(keys.payloads(installation_id), count=1000):
        heads[int.from_bytes(field, "big")] = value[:value.index(b"|")].decode()
    expected_members = collections.defaultdict(set)
    stale = []
    for rows in _stream_meetings(engine, installation_id):
        for row in rows:
            report["meetings_checked"] += 1
            key = keys.client_set(installation_id, row.client_id, row.type, row.status).encode()
            expected_members[key].add(keys.member(keys.DATE, row.meeting_s, row.id))
            expected_members[key].add(keys.member(keys.UPDATED, row.updated_s, row.id))
            if heads.pop(row.id, None) != redis_index.head(row):
                stale.append(row.id)
    # What is left in `heads` is in Redis but no longer in the database.
    if heads:
        repair_ids(ctx, installation_id, token, sorted(heads))
        report["meetings_removed"] += len(heads)
    if stale:
        repair_ids(ctx, installation_id, token, stale)
        report["meetings_repaired"] += len(stale)
    # Entries without a meeting behind them (or in the wrong set).
    for key in r.scan_iter(match=keys.client_set(installation_id, "*", "*", "*"), count=1000):
        extra = set(r.zrange(key, 0, -1)) - expected_members.get(key, set())
        if extra:
            r.zrem(key, *extra)
            report["orphan_entries_removed"] += len(extra)


def _reconcile_views(ctx, installation_id, report) -> None:
    """A precomputed set must equal its view recomputed from the database; one that does
    not is dropped (the next query or precompute builds it afresh)."""
    engine, r = ctx.engine, ctx.redis
    for info in list_views(r, installation_id):
        report["views_checked"] += 1
        query = view_query(installation_id, info.user_id, info.view)
        conds, _ = sql_conditions(query, with_cursor=False)
        with engine.connect() as conn:
            expected = {keys.member(query.letter, s, i) for s, i in conn.execute(
                sa.select(meetings.c[SORTS[query.sort]], meetings.c.id).where(*conds))}
        actual = set(r.zrange(keys.view_set(installation_id, info.user_id, info.view), 0, -1))
        registered = r.sismember(keys.view_users(installation_id, info.view), info.user_id)
        if actual != expected or not registered:
            drop_user(r, installation_id, info.user_id, [info.view])
            report["views_dropped"] += 1
