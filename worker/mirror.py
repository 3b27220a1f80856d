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
change) is recorded in ``applied_writes`` in the transaction of its effect, and the index
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

import hashlib
import json
import logging
import secrets
import threading
import time

import redis
import sqlalchemy as sa

from worker import keys, metrics, redis_index
from worker.db import locking, run_transaction
from worker.tables import COLUMNS, StoredRow, applied_writes, crm_meta, installations, meetings
from worker.errors import REDIS_FAULTS

log = logging.getLogger(__name__)


class IndexOwnedElsewhere(RuntimeError):
    """The index Redis mirrors another database; ``crm init`` claims it for this one."""


def new_generation() -> str:
    return secrets.token_hex(16)


def database_id(conn) -> str | None:
    return conn.execute(sa.select(crm_meta.c.value).where(crm_meta.c.name == "database_id")).scalar()


def new_write_id(task_id: str | None, task: str, installation_id: int | None) -> str:
    """The base of the ids of one task's writes (each write adds its place in the task).
    Derived from the task's id, its name and its installation: a redelivery of the task
    finds its writes, while another task or another installation that reuses the id (a
    caller choosing ids) makes writes of its own.  Random for a call outside a task."""
    if task_id is None:
        return "local-" + secrets.token_hex(12)
    scope = f"{task}\x00{installation_id}\x00{task_id}".encode()
    return "t" + hashlib.blake2b(scope, digest_size=16).hexdigest()


def once(conn, write_id: str, installation_id: int, effect):
    """Apply ``effect(conn)`` (which returns a JSON-able result) at most once per write id:
    a write recorded already returns what it returned then.  Returns (result, applied
    now)."""
    done = recorded_result(conn, write_id)
    if done is not None:
        return json.loads(done), False
    result = effect(conn)
    record_write(conn, write_id, installation_id, json.dumps(result))
    return result, True


def recorded_result(conn, write_id: str) -> str | None:
    """What write ``write_id`` returned, when it was applied already (else None)."""
    row = conn.execute(sa.select(applied_writes.c.result).where(applied_writes.c.write_id == write_id)).first()
    return None if row is None else (row.result or "")


def record_write(conn, write_id: str, installation_id: int, result: str = "") -> None:
    """Record the write in the transaction of its effect.  A concurrent delivery of the
    same task fails here on the key and rolls its copy of the effect back."""
    conn.execute(applied_writes.insert().values(write_id=write_id, installation_id=installation_id,
                                                at_us=int(time.time() * 1_000_000), result=result))


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

    def writer_token(self, installation_id: int) -> str:
        """The token for a writer; an installation the database does not know yet is
        recorded first, and when this call recorded it, its (empty) index is initialized."""
        token = self.token(installation_id)
        if token is not None:
            return token

        def work(conn):
            if conn.execute(sa.select(installations.c.id).where(installations.c.id == installation_id)).first():
                return False
            try:
                with conn.begin_nested():
                    conn.execute(installations.insert().values(id=installation_id, generation=new_generation()))
            except sa.exc.IntegrityError:
                return False
            return True
        if run_transaction(self.engine, work):
            try:
                rebuild_installation(self.ctx, installation_id, cause="new_installation")
            except IndexOwnedElsewhere as exc:
                log.warning("installation %d: %s", installation_id, exc)
        return self.refresh(installation_id)

    def forget(self, installation_id: int | None = None) -> None:
        with self._lock:
            if installation_id is None:
                self._tokens.clear()
            else:
                self._tokens.pop(installation_id, None)

    def write(self, installation_id: int, fn, token: str | None = None):
        """``fn(token)`` for a writer of the index; when the index is written for another
        token, once more with the database's current token (a rebuild replaced it).  When
        the index is still not written for it, nothing is written: the index is another
        database's, or being rebuilt from rows that include this write, or gone."""
        token = token or self.writer_token(installation_id)
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


# -- rebuild ---------------------------------------------------------------------------

def _wipe(ctx, installation_id: int, token: str, keep: set[bytes]) -> None:
    """Remove the installation's keys but ``keep``, in batches that each check that the
    index is still written for ``token``: a rebuild overtaken by a later one never removes
    what that one wrote (raises :class:`redis_index.NotMirrored` instead)."""
    gen = keys.generation(installation_id)
    batch = []

    def flush():
        if not ctx.scripts["wipe"](keys=[gen, *batch], args=[token]):
            raise redis_index.NotMirrored(installation_id)
        batch.clear()
    for key in ctx.redis.scan_iter(match=keys.pattern(installation_id), count=1000):
        if key in keep:
            continue
        batch.append(key)
        if len(batch) >= 500:
            flush()
    flush()


def rebuild_installation(ctx, installation_id: int, cause: str = "requested") -> dict:
    """Give the installation a new generation and rebuild its index from the database.

    Queries answer from the database meanwhile.  Writers keep writing (they learn the new
    token when the index rejects their old one); every batch of rows and of access lists
    is read under its locks and written to the index before they are released, so a write
    that commits during the rebuild is either read by it or written after it, never lost
    and never undone.  A rebuild overtaken by a later one of the same installation (which
    gave it a newer generation) stops where it is and returns ``superseded``: only the
    latest generation is published."""
    from worker.access import load_access_locked  # access.py imports this module
    engine, r = ctx.engine, ctx.redis
    require_index(ctx)
    metrics.count(r, {f"rebuild:{cause}": 1})
    generation = new_generation()

    def work(conn):
        if conn.execute(sa.select(installations.c.id).where(installations.c.id == installation_id)).first():
            conn.execute(installations.update().where(installations.c.id == installation_id)
                         .values(generation=generation))
        else:
            conn.execute(installations.insert().values(id=installation_id, generation=generation))
        return database_id(conn)
    token = f"{run_transaction(engine, work)}:{generation}"
    pipe = r.pipeline(transaction=True)  # keys of one installation: one slot on a cluster
    pipe.delete(keys.ready(installation_id))
    pipe.set(keys.generation(installation_id), token)
    pipe.set(keys.rebuilding(installation_id), 1, ex=3600)
    pipe.execute()
    r.sadd(keys.INSTALLATIONS, installation_id)
    count, users = 0, 0
    try:
        _wipe(ctx, installation_id, token,
              keep={keys.generation(installation_id).encode(), keys.rebuilding(installation_id).encode()})
        users = load_access_locked(ctx, installation_id, token)
        last = -1
        while True:
            def batch(conn):
                rows = [StoredRow(*row) for row in conn.execute(
                    sa.select(*COLUMNS).where(meetings.c.installation_id == installation_id, meetings.c.id > last)
                    .order_by(meetings.c.id).limit(BATCH).with_for_update())]
                apply_locked(ctx, installation_id, token, rows)
                return rows
            rows = run_transaction(locking(engine), batch)
            if not rows:
                break
            count += len(rows)
            last = rows[-1].id
        # Published only if no later rebuild replaced this generation meanwhile.
        published = bool(ctx.scripts["publish"](
            keys=[keys.generation(installation_id), keys.ready(installation_id), keys.rebuilding(installation_id)],
            args=[token]))
    except redis_index.NotMirrored:
        published = False
    ctx.mirror.forget(installation_id)
    return {"meetings": count, "users": users, "published": published, "superseded": not published}
