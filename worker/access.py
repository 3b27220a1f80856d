"""Client security: which clients each user may see.

The lists live in the database and are mirrored in Redis.  A change takes clients away in
Redis first (a revocation is never late), then commits the new list with a new version,
then writes the whole list to Redis with that version; Redis keeps the newest version it
has seen, so neither a concurrent change nor a rebuild can bring revoked access back.
"""
from __future__ import annotations

import sqlalchemy as sa

from worker import redis_index
from worker.db import user_clients, users
from worker.errors import InvalidArgument
from worker.ingest import mark_new_installation, run_transaction
from worker.records import positive_int

MAX_CLIENTS = 100_000


def _client_ids(value) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument("client_ids", f"must be a list of integers, got {type(value).__name__}")
    if len(value) > MAX_CLIENTS:
        raise InvalidArgument("client_ids", f"holds {len(value)} ids; at most {MAX_CLIENTS}")
    return sorted({positive_int("client_ids[]", c) for c in value})


def change(engine: sa.Engine, r, installation_id, user_id, client_ids, mode: str) -> dict:
    """``mode`` is ``set`` (replace), ``grant`` (add) or ``revoke`` (remove).  Returns
    ``{"user_id", "clients"}`` with the size of the list afterwards."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    wanted = _client_ids(client_ids)
    mark_new_installation(engine, r, installation_id)

    def current(conn) -> set[int]:
        return set(conn.execute(sa.select(user_clients.c.client_id).where(
            user_clients.c.installation_id == installation_id, user_clients.c.user_id == user_id)).scalars())

    def lock_user(conn) -> int:
        """Lock the user's row (created on first use); return its next access version."""
        where = (users.c.installation_id == installation_id) & (users.c.user_id == user_id)
        row = conn.execute(sa.select(users.c.access_version).where(where).with_for_update()).first()
        if row is None:
            conn.execute(users.insert().values(installation_id=installation_id, user_id=user_id, access_version=1))
            return 1
        conn.execute(users.update().where(where).values(access_version=row[0] + 1))
        return row[0] + 1

    # Revocations reach Redis before the database: at no instant does Redis allow more
    # than the database will.
    if mode == "revoke":
        redis_index.remove_access(r, installation_id, user_id, wanted)
    elif mode == "set":
        with engine.connect() as conn:
            dropped = current(conn) - set(wanted)
        if dropped:
            redis_index.remove_access(r, installation_id, user_id, dropped)

    def work(conn):
        version = lock_user(conn)
        before = current(conn)
        if mode == "set":
            after = set(wanted)
        elif mode == "grant":
            after = before | set(wanted)
        else:
            after = before - set(wanted)
        gone, new = before - after, after - before
        if gone:
            conn.execute(user_clients.delete().where(
                user_clients.c.installation_id == installation_id, user_clients.c.user_id == user_id,
                user_clients.c.client_id.in_(sorted(gone))))
        if new:
            conn.execute(user_clients.insert(), [
                {"installation_id": installation_id, "user_id": user_id, "client_id": c} for c in sorted(new)])
        return version, after

    version, after = run_transaction(engine, work)
    redis_index.set_access(r, installation_id, user_id, version, after)
    return {"user_id": user_id, "clients": len(after)}
