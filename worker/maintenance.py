"""Rebuild the Redis index from the database, and reconcile the two.

Both read the database only after clearing what they replace in Redis, so anything a
concurrent writer put in Redis earlier is also in what they read; versions in Redis keep
a concurrent writer's newer state from being overwritten.
"""
from __future__ import annotations

import collections

import redis
import sqlalchemy as sa

from worker import keys, redis_index
from worker.db import installations, meetings, user_clients, users
from worker.ingest import COLUMNS, StoredRow
from worker.records import item_json

BATCH = 1000


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


def _access_lists(engine: sa.Engine, installation_id: int, user_ids=None) -> dict[int, tuple[int, set[int]]]:
    """user -> (access version, client ids), from the database."""
    with engine.connect() as conn:
        q = sa.select(users.c.user_id, users.c.access_version).where(users.c.installation_id == installation_id)
        if user_ids is not None:
            q = q.where(users.c.user_id.in_(list(user_ids)))
        lists = {u: (v, set()) for u, v in conn.execute(q)}
        q = sa.select(user_clients.c.user_id, user_clients.c.client_id).where(
            user_clients.c.installation_id == installation_id)
        if user_ids is not None:
            q = q.where(user_clients.c.user_id.in_(list(user_ids)))
        for u, c in conn.execute(q):
            if u in lists:
                lists[u][1].add(c)
    return lists


def _delete_matching(r: redis.Redis, pattern: str, keep: set[bytes] = frozenset()) -> int:
    n = 0
    batch = []
    for key in r.scan_iter(match=pattern, count=1000):
        if key in keep:
            continue
        batch.append(key)
        if len(batch) >= 500:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    return n


def claim_index(engine: sa.Engine, r: redis.Redis) -> list[int]:
    """Make sure the index Redis mirrors this database.  An index written from another
    database (a new SQLite file, another environment pointed at the same Redis) must not
    answer: its installations lose their ready flag, so queries go to the database and
    queue a rebuild.  Returns the installations so marked."""
    from worker.schema import database_id
    ours = database_id(engine)
    theirs = r.get(keys.DATABASE)
    stale = []
    if theirs is None or theirs.decode() != ours:
        stale = sorted(int(i) for i in r.smembers(keys.INSTALLATIONS))
        for installation_id in stale:
            r.delete(keys.ready(installation_id))
        r.set(keys.DATABASE, ours)
    return stale


def rebuild(engine: sa.Engine, r: redis.Redis, only: int | None = None) -> dict:
    """Rebuild the index of one installation (or all) from the database.  Queries answer
    from the database meanwhile."""
    done = {}
    for installation_id in installation_ids(engine, only):
        r.delete(keys.ready(installation_id))
        r.set(keys.rebuilding(installation_id), 1, ex=3600)
        _delete_matching(r, keys.prefix(installation_id) + "*", keep={keys.rebuilding(installation_id).encode()})
        lists = _access_lists(engine, installation_id)
        for user_id, (version, clients) in lists.items():
            redis_index.set_access(r, installation_id, user_id, version, clients)
        count = 0
        for rows in _stream_meetings(engine, installation_id):
            redis_index.apply_meetings(r, installation_id, rows, item_json)
            count += len(rows)
        redis_index.register_installation(r, installation_id)
        r.set(keys.ready(installation_id), 1)
        r.delete(keys.rebuilding(installation_id))
        done[str(installation_id)] = {"meetings": count, "users": len(lists)}
    return {"rebuilt": done}


def _redis_access(r: redis.Redis, installation_id: int) -> dict[int, set[int]]:
    found = {}
    pattern = keys.user_clients(installation_id, 0)[:-1] + "*"
    for key in r.scan_iter(match=pattern, count=1000):
        found[int(key.rsplit(b":", 1)[1])] = {int(c) for c in r.smembers(key)}
    return found


def reconcile(engine: sa.Engine, r: redis.Redis, only: int | None = None) -> dict:
    """Compare the index with the database and repair what differs; return what was
    found.  An installation whose index is not ready is rebuilt instead."""
    report = collections.Counter()
    rebuilt = []
    for installation_id in installation_ids(engine, only):
        if not r.exists(keys.ready(installation_id)):
            rebuild(engine, r, installation_id)
            rebuilt.append(installation_id)
            continue
        report["installations"] += 1
        _reconcile_access(engine, r, installation_id, report)
        _reconcile_meetings(engine, r, installation_id, report)
        _reconcile_views(engine, r, installation_id, report)
    return {"rebuilt": rebuilt, **{k: report[k] for k in (
        "installations", "users_checked", "access_repaired", "meetings_checked", "meetings_repaired",
        "meetings_removed", "orphan_entries_removed", "views_checked", "views_dropped")}}


def _reconcile_access(engine, r, installation_id, report) -> None:
    in_db = _access_lists(engine, installation_id)
    in_redis = _redis_access(r, installation_id)
    report["users_checked"] += len(set(in_db) | set(in_redis))
    for user_id in sorted(set(in_db) | set(in_redis)):
        db_clients = in_db.get(user_id, (0, set()))[1]
        if in_redis.get(user_id, set()) == db_clients:
            continue
        # Forget Redis's version first, then read the database: a concurrent change that
        # commits after this read writes a newer version, which wins.
        r.hdel(keys.access_versions(installation_id), user_id)
        version, clients = _access_lists(engine, installation_id, [user_id]).get(user_id, (0, set()))
        if clients:
            redis_index.set_access(r, installation_id, user_id, version, clients)
        else:
            redis_index.remove_access(r, installation_id, user_id, in_redis.get(user_id, set()))
            r.hset(keys.access_versions(installation_id), user_id, version)
        report["access_repaired"] += 1


def _reconcile_meetings(engine, r, installation_id, report) -> None:
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
                stale.append(row)
    # What is left in `heads` is in Redis but no longer in the database.
    if heads:
        redis_index.delete_meetings(r, installation_id, list(heads))
        report["meetings_removed"] += len(heads)
    if stale:
        redis_index.delete_meetings(r, installation_id, [row.id for row in stale])
        for start in range(0, len(stale), BATCH):
            redis_index.apply_meetings(r, installation_id, stale[start:start + BATCH], item_json)
        report["meetings_repaired"] += len(stale)
    # Entries without a meeting behind them (or in the wrong set).
    for key in r.scan_iter(match=keys.prefix(installation_id) + "z:*", count=1000):
        extra = set(r.zrange(key, 0, -1)) - expected_members.get(key, set())
        if extra:
            r.zrem(key, *extra)
            report["orphan_entries_removed"] += len(extra)


def _reconcile_views(engine, r, installation_id, report) -> None:
    """A precomputed set must equal its view recomputed from the database; one that does
    not is dropped (the next query or precompute builds it afresh)."""
    from worker.precompute import drop_user, list_views, view_query
    from worker.query import SORTS, sql_conditions
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
