"""Client security: which clients each user may see.

The lists live in the database and are mirrored in Redis.  A change locks the user's row,
takes the clients it removes away in Redis at once (a revocation is never late), commits
the new list with a new version, then writes the whole list to Redis with that version;
Redis keeps the newest version it has seen, and every other writer of a user's list (a
rebuild, a repair) holds the same row lock, so none of them can bring revoked access
back.  Each change is recorded as a write of its task: a redelivered change is applied
once, never after a later one.
"""
from __future__ import annotations

import sqlalchemy as sa

from worker import redis_index
from worker.db import locking, run_transaction
from worker.tables import user_clients, users
from worker.errors import InvalidArgument
from worker.mirror import load_access_locked
from worker.rebuild import writer_token
from worker.writes import new_write_id, once
from worker.records import positive_int

MAX_CLIENTS = 100_000
#: The task of each mode: a task id names a write of its own task only.
TASKS = {"set": "crm.set_user_clients", "grant": "crm.grant_clients", "revoke": "crm.revoke_clients"}


def _client_ids(value) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument("client_ids", f"must be a list of integers, got {type(value).__name__}")
    if len(value) > MAX_CLIENTS:
        raise InvalidArgument("client_ids", f"holds {len(value)} ids; at most {MAX_CLIENTS}")
    return sorted({positive_int("client_ids[]", c) for c in value})


def _clients_of(conn, installation_id: int, user_id: int) -> set[int]:
    return set(conn.execute(sa.select(user_clients.c.client_id).where(
        user_clients.c.installation_id == installation_id, user_clients.c.user_id == user_id)).scalars())


def change(ctx, installation_id, user_id, client_ids, mode: str, task_id: str | None = None) -> dict:
    """``mode`` is ``set`` (replace), ``grant`` (add) or ``revoke`` (remove).  Returns
    ``{"user_id", "clients"}`` with the size of the list afterwards.  ``task_id`` names the
    write, so that a redelivery of the task returns the same and changes nothing."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    wanted = set(_client_ids(client_ids))
    mirror = ctx.mirror
    token = writer_token(ctx, installation_id)
    write_id = new_write_id(task_id, TASKS[mode], installation_id)
    where = (users.c.installation_id == installation_id) & (users.c.user_id == user_id)

    applied: list = []  # (version, clients) of the change this call applied

    def apply(conn, row):
        before = _clients_of(conn, installation_id, user_id)
        after = {"set": wanted, "grant": before | wanted, "revoke": before - wanted}[mode]
        gone, new = before - after, after - before
        if gone:
            # Under the user's row lock and before the commit: at no instant does Redis
            # allow more than the database will.
            mirror.write(installation_id, lambda t: redis_index.remove_access(ctx, installation_id, user_id, gone, t),
                         token)
            conn.execute(user_clients.delete().where(
                user_clients.c.installation_id == installation_id, user_clients.c.user_id == user_id,
                user_clients.c.client_id.in_(sorted(gone))))
        if new:
            conn.execute(user_clients.insert(), [
                {"installation_id": installation_id, "user_id": user_id, "client_id": c} for c in sorted(new)])
        if row is None:
            version = 1
            conn.execute(users.insert().values(installation_id=installation_id, user_id=user_id, access_version=1))
        else:
            version = row.access_version + 1
            conn.execute(users.update().where(where).values(access_version=version))
        applied[:] = [(version, after)]
        return {"user_id": user_id, "clients": len(after)}

    def work(conn):
        # The user's row lock first: a second delivery of this change waits here, then
        # finds it recorded.
        row = conn.execute(sa.select(users.c.access_version).where(where).with_for_update()).first()
        return once(conn, write_id, installation_id, lambda conn: apply(conn, row))

    result, now = run_transaction(locking(ctx.engine), work, retry_duplicates=True)
    if not now:
        # A redelivery: the change is stored; make sure Redis holds the list as it is now.
        load_access_locked(ctx, installation_id, token, [user_id])
    else:
        version, after = applied[0]
        mirror.write(installation_id,
                     lambda t: redis_index.set_access(ctx, installation_id, user_id, version, after, t, write_id), token)
    return result
