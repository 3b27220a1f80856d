"""Which database, and which generation of each installation, the Redis index mirrors.

The database owns the index's identity:

- ``crm_meta.database_id``: the database's identity, made by ``crm init``;
- ``installations.generation``: a token per installation, made with the installation and
  replaced by every rebuild, and whenever the index is found to hold a write this
  database does not have (a restore from an older backup).

An installation's token is ``<database_id>:<generation>``.  Redis holds, per installation,
``gen`` (the token the index is being written for) and ``ready`` (the same token, once a
rebuild of that generation is complete).  Every script compares them with the token its
caller got from the database, in the same atomic step as the rest of its work: a reading
script answers only when ``ready`` holds it, a writing script writes only when ``gen``
holds it.  So an index written from another database, from another generation, or for
nobody (a flushed Redis) never answers and is never written by mistake.

A database restored from an older backup keeps its identity and generations, while the
index may hold writes made after the backup.  Each write (a chunk of a task, an access
change) is recorded in ``applied_writes`` in the transaction of its effect (worker/writes.py), and the index
remembers the ids of the last writes it applied (``{i:N}:w``).  A process proves that
none of them is missing from the database before it trusts a token, and again every
``CRM_MIRROR_CHECK_MS``; a missing one means the database went back in time, and the
installation gets a new generation: the index stops answering at once and is rebuilt.

Writes to the index that come from database rows are made while those rows are locked
(``SELECT … FOR UPDATE``; the write lock on SQLite): a delete, an ingest, a rebuild and a
repair of the same meeting are thereby ordered, and each one writes what the database
holds at that instant.  Access lists are ordered by the user's row lock and versions.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time

import redis
import sqlalchemy as sa

from worker import keys, metrics, redis_index
from worker.db import locking, run_transaction
from worker.tables import COLUMNS, StoredRow, applied_writes, crm_meta, installations, meetings, user_clients, users
from worker.errors import REDIS_FAULTS

log = logging.getLogger(__name__)


class IndexOwnedElsewhere(RuntimeError):
    """The index Redis mirrors another database; ``crm init`` claims it for this one."""


def new_generation() -> str:
    return secrets.token_hex(16)


def database_id(conn) -> str | None:
    return conn.execute(sa.select(crm_meta.c.value).where(crm_meta.c.name == "database_id")).scalar()


class Mirror:
    """One context's view of which token each installation's index must carry."""

    def __init__(self, ctx):
        self.ctx, self.engine, self.r = ctx, ctx.engine, ctx.redis
        self.check_s = ctx.settings.mirror_check_ms / 1000
        self._tokens: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def token(self, installation_id: int) -> str | None:
        """The installation's token, proven at most ``CRM_MIRROR_CHECK_MS`` ago; None when
        the database does not know the installation."""
        with self._lock:
            cached = self._tokens.get(installation_id)
        if cached is not None and time.monotonic() - cached[1] < self.check_s:
            return cached[0]
        return self.refresh(installation_id)

    def refresh(self, installation_id: int) -> str | None:
        """Read the installation's token from the database now and prove that the index
        holds no write the database lacks (else give the installation a new generation)."""
        with self.engine.connect() as conn:
            generation = conn.execute(sa.select(installations.c.generation)
                                      .where(installations.c.id == installation_id)).scalar()
            dbid = database_id(conn)
        if generation is None or dbid is None:
            self.forget(installation_id)
            return None
        token = self._proven(installation_id, f"{dbid}:{generation}")
        with self._lock:
            self._tokens[installation_id] = (token, time.monotonic())
        return token

    def _proven(self, installation_id: int, token: str) -> str:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.get(keys.generation(installation_id))
            pipe.lrange(keys.writes(installation_id), 0, -1)
            gen, recent = pipe.execute()
        except REDIS_FAULTS as exc:
            # Nothing is served from an index that cannot be reached; the next check proves it.
            log.warning("index unreachable while checking installation %d (%s)", installation_id,
                        exc.__class__.__name__)
            return token
        if gen is None or gen.decode() != token or not recent:
            return token  # not written for this token: it answers nothing for it anyway
        wanted = {w.decode() for w in recent}
        with self.engine.connect() as conn:
            found = set(conn.execute(sa.select(applied_writes.c.write_id)
                                     .where(applied_writes.c.write_id.in_(sorted(wanted)))).scalars())
        if wanted <= found:
            return token
        generation = token.split(":", 1)[1]
        log.warning("the index of installation %d holds %d write(s) this database does not have (restored "
                    "from an older backup?): it answers no more and will be rebuilt",
                    installation_id, len(wanted - found))
        metrics.count(self.r, {"rebuild:restore_detected": 1})
        fresh = new_generation()
        with self.engine.begin() as conn:
            conn.execute(installations.update().where(installations.c.id == installation_id,
                                                      installations.c.generation == generation)
                         .values(generation=fresh))
        with self.engine.connect() as conn:
            current = conn.execute(sa.select(installations.c.generation)
                                   .where(installations.c.id == installation_id)).scalar()
        return token.split(":", 1)[0] + ":" + current

    def forget(self, installation_id: int | None = None) -> None:
        with self._lock:
            if installation_id is None:
                self._tokens.clear()
            else:
                self._tokens.pop(installation_id, None)

    def write(self, installation_id: int, fn, token: str | None):
        """``fn(token)`` for a writer of the index (``token``: from worker/rebuild.py's
        ``writer_token``);
        when the index is written for another token, once more with the database's
        current token (a rebuild replaced it).  When the index is still not written for
        it, nothing is written: the index is another database's, or being rebuilt from
        rows that include this write, or gone."""
        if token is None:
            return None
        try:
            return fn(token)
        except redis_index.NotMirrored:
            fresh = self.refresh(installation_id)
            if fresh is None or fresh == token:
                return None
        try:
            return fn(fresh)
        except redis_index.NotMirrored:
            return None


# -- ownership of the index Redis ------------------------------------------------------

def owner(r: redis.Redis) -> str | None:
    value = r.get(keys.DATABASE)
    return None if value is None else value.decode()


def our_database_id(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        dbid = database_id(conn)
    if dbid is None:
        raise RuntimeError("the database has no identity: run `crm init`")
    return dbid


def owns_index(ctx) -> bool:
    """True when the index Redis mirrors this database (claiming an unclaimed one)."""
    ours = our_database_id(ctx.engine)
    ctx.redis.set(keys.DATABASE, ours, nx=True)
    return owner(ctx.redis) == ours


def require_index(ctx) -> None:
    if not owns_index(ctx):
        raise IndexOwnedElsewhere(
            f"the index Redis mirrors another database ({owner(ctx.redis)}); point CRM_REDIS_URL at a Redis of "
            "this database's own, or run `crm init` to claim this one for it")


# -- writing the index from locked rows -------------------------------------------------

BATCH = 1000
#: Users whose access lists one locking transaction reads and writes.
USERS_PER_BATCH = 200


def apply_locked(ctx, installation_id: int, token: str, rows: list[StoredRow], write_id: str = "") -> None:
    """Write ``rows`` (this transaction's view of them) into the index, and remember
    ``write_id``; the caller holds the rows' locks."""
    for start in range(0, max(len(rows), 1), BATCH):
        redis_index.apply_meetings(ctx, installation_id, rows[start:start + BATCH], token,
                                   write_id if start == 0 else "")


def sync_written(ctx, installation_id: int, token: str, written: list[StoredRow], write_id: str) -> None:
    """After a chunk committed: lock its rows, and write to the index what the database
    holds now — the rows as written, unless a later write changed or deleted one meanwhile
    (then that row as it is now, or its removal)."""
    if not written:
        return

    def work(conn):
        ids = [row.id for row in written]
        now = dict(conn.execute(sa.select(meetings.c.id, meetings.c.updated_us)
                                .where(meetings.c.id.in_(ids)).with_for_update()).all())
        same = [row for row in written if now.get(row.id) == row.updated_us]
        changed = [row.id for row in written if row.id in now and now[row.id] != row.updated_us]
        gone = [row.id for row in written if row.id not in now]
        if changed:
            same += [StoredRow(*row) for row in conn.execute(sa.select(*COLUMNS).where(meetings.c.id.in_(changed)))]
        if gone:
            redis_index.delete_meetings(ctx, installation_id, gone, token)
        apply_locked(ctx, installation_id, token, same, write_id)
    run_transaction(locking(ctx.engine), work)


def sync_sources(ctx, installation_id: int, token: str, source_ids: list[str], write_id: str = "") -> None:
    """Lock the meetings of ``source_ids`` and write them into the index as they are now
    (a redelivered chunk: its effect is stored, its index write may not have happened)."""
    def work(conn):
        rows = [StoredRow(*row) for row in conn.execute(
            sa.select(*COLUMNS).where(meetings.c.installation_id == installation_id,
                                      meetings.c.source_id.in_(source_ids)).with_for_update())]
        apply_locked(ctx, installation_id, token, rows, write_id)
    run_transaction(locking(ctx.engine), work)


def sync_ids(ctx, installation_id: int, token: str, ids: list[int], write_id: str = "") -> None:
    """Lock the meetings ``ids`` and write them into the index as the database holds them
    now (gone ones removed); a newer or identical version in the index is kept."""
    ids = sorted(set(ids))
    for start in range(0, max(len(ids), 1), BATCH):
        chunk = ids[start:start + BATCH]

        def work(conn):
            rows = [StoredRow(*row) for row in conn.execute(
                sa.select(*COLUMNS).where(meetings.c.id.in_(chunk)).with_for_update())] if chunk else []
            gone = sorted(set(chunk) - {row.id for row in rows})
            if gone:
                redis_index.delete_meetings(ctx, installation_id, gone, token)
            apply_locked(ctx, installation_id, token, rows, write_id if start == 0 else "")
        run_transaction(locking(ctx.engine), work)


def repair_ids(ctx, installation_id: int, token: str, ids: list[int]) -> None:
    """Lock the meetings ``ids`` and make their index entries exactly what the database
    holds now: removed when gone, replaced otherwise."""
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]

        def work(conn):
            rows = [StoredRow(*row) for row in conn.execute(
                sa.select(*COLUMNS).where(meetings.c.id.in_(chunk)).with_for_update())]
            redis_index.delete_meetings(ctx, installation_id, chunk, token)
            apply_locked(ctx, installation_id, token, rows)
        run_transaction(locking(ctx.engine), work)


def load_access_locked(ctx, installation_id: int, token: str, user_ids=None) -> int:
    """Write the access lists of ``user_ids`` (or of every user of the installation) into
    Redis as the database holds them, each under the user's row lock; a user the
    database does not know loses every client.  Returns the users written."""
    engine, mirror = ctx.engine, ctx.mirror
    written = 0
    if user_ids is None:
        last = 0
        while True:
            def page(conn):
                return list(conn.execute(
                    sa.select(users.c.user_id).where(users.c.installation_id == installation_id, users.c.user_id > last)
                    .order_by(users.c.user_id).limit(USERS_PER_BATCH)).scalars())
            batch = run_transaction(engine, page)
            if not batch:
                return written
            written += load_access_locked(ctx, installation_id, token, batch)
            last = batch[-1]

    def work(conn):
        versions = dict(conn.execute(
            sa.select(users.c.user_id, users.c.access_version)
            .where(users.c.installation_id == installation_id, users.c.user_id.in_(list(user_ids)))
            .order_by(users.c.user_id).with_for_update()).all())
        lists = {u: set() for u in user_ids}
        for u, c in conn.execute(sa.select(user_clients.c.user_id, user_clients.c.client_id).where(
                user_clients.c.installation_id == installation_id, user_clients.c.user_id.in_(list(user_ids)))):
            lists[u].add(c)
        for u in user_ids:
            mirror.write(installation_id, lambda t: redis_index.set_access(
                ctx, installation_id, u, versions.get(u, 0), lists[u], t, force=True), token)
        return len(user_ids)
    return run_transaction(locking(engine), work)


# -- binding the index to a generation ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WipeArgs(redis_index.ScriptArgs):
    """ARGV of ``wipe.lua``."""
    token: str


@dataclasses.dataclass(frozen=True)
class PublishArgs(redis_index.ScriptArgs):
    """ARGV of ``publish.lua``."""
    token: str


def start_generation(ctx, installation_id: int, token: str, rebuilding: bool = False) -> None:
    """Bind the installation's index to ``token``: not ready, written for ``token`` from
    now on, and emptied of every key of an earlier generation or database.  Raises
    :class:`redis_index.NotMirrored` when a later generation took the index meanwhile
    (then that one owns the keys).  ``rebuilding``: flag a rebuild under way (no query
    queues another one while it runs)."""
    r = ctx.redis
    pipe = r.pipeline(transaction=True)  # keys of one installation: one slot on a cluster
    pipe.delete(keys.ready(installation_id))
    pipe.set(keys.generation(installation_id), token)
    if rebuilding:
        pipe.set(keys.rebuilding(installation_id), 1, ex=3600)
    pipe.execute()
    r.sadd(keys.INSTALLATIONS, installation_id)
    wipe(ctx, installation_id, token,
         keep={keys.generation(installation_id).encode(), keys.rebuilding(installation_id).encode()})


def wipe(ctx, installation_id: int, token: str, keep: set[bytes]) -> None:
    """Remove the installation's keys but ``keep``, in batches that each check that the
    index is still written for ``token`` (wipe.lua): a generation overtaken by a later
    one never removes what that one wrote (raises :class:`redis_index.NotMirrored`)."""
    gen = keys.generation(installation_id)
    batch: list = []

    def flush():
        if not ctx.scripts["wipe"](keys=[gen, *batch], args=WipeArgs(token).argv()):
            raise redis_index.NotMirrored(installation_id)
        batch.clear()
    for key in ctx.redis.scan_iter(match=keys.pattern(installation_id), count=1000):
        if key in keep:
            continue
        batch.append(key)
        if len(batch) >= 500:
            flush()
    flush()


def publish(ctx, installation_id: int, token: str) -> bool:
    """The index of ``token`` is complete: it answers from now on, unless a later
    generation took it meanwhile (then False, and nothing changes)."""
    return bool(ctx.scripts["publish"](
        keys=[keys.generation(installation_id), keys.ready(installation_id), keys.rebuilding(installation_id)],
        args=PublishArgs(token).argv()))
