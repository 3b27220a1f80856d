"""The write log: each write (a chunk of a task, an access change) is recorded in
``applied_writes`` in the transaction of its effect.  A redelivered task finds its writes
there and applies none twice (returning what each returned the first time); and the
index's recent write ids must all be there, or the database went back in time
(worker/mirror.py).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time

import sqlalchemy as sa

from worker.tables import applied_writes


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
