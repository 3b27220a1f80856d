"""The context of one process: everything the plain functions beneath the tasks need.

Settings, the database engine, the index Redis with its loaded scripts, the precomputed
view ids, the limits of the index scripts, the cursor secret, whether the database has
TiFlash replicas, and the tokens of the installations (worker/mirror.py) live here and
nowhere else.  A worker process builds one
when it first needs it (after a fork, :func:`reset` drops the parent's); the tasks hand it
to the plain functions, which take it as their first argument.  Tests and the benchmark
build their own.
"""
from __future__ import annotations

import dataclasses
import threading

import redis
import sqlalchemy as sa

from worker import keys
from worker.db import make_engine, tiflash_available
from worker.tables import crm_meta
from worker.mirror import Mirror
from worker.redis_index import Scripts, connect
from worker.settings import Settings


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on the work of one script call: each keeps Redis answering others."""
    #: Most per-client sorted sets one answer from the index may merge; a broader query
    #: (the views of users with thousands of clients) is answered by SQL.
    max_merge: int = 4000
    #: Most sets a query merges into a precomputed set on the spot; a broader view is
    #: built by crm.precompute_user in slices.
    fill_inline: int = 256
    #: Clients merged per slice of a build (worker/scripts/build.lua): a few hundred sets,
    #: a few milliseconds of Redis time.
    slice_clients: int = 64


class Context:
    def __init__(self, settings: Settings, engine: sa.Engine, redis_client: redis.Redis, limits: Limits = Limits()):
        self.settings, self.engine, self.redis, self.limits = settings, engine, redis_client, limits
        self.scripts = Scripts(redis_client)
        #: The ids of the views kept precomputed (settings.precompute_views).
        self.views = frozenset(keys.view_id(sort, [t] if t else None, [s] if s else None)
                               for sort, t, s in settings.precompute_views)
        self.mirror = Mirror(self)
        self._secret: bytes | None = None
        self._tiflash: bool | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings | None = None, limits: Limits = Limits()) -> "Context":
        settings = settings or Settings.from_env()
        return cls(settings, make_engine(settings.database_url, settings.db_lock_wait_timeout),
                   connect(settings.redis_url), limits)

    def cursor_secret(self) -> bytes:
        """The key that signs cursors: the configured secret, else the one ``crm init``
        stored in the database, bound to the database's identity (a cursor of another
        database fails, whatever secret the two share)."""
        with self._lock:
            if self._secret is None:
                with self.engine.connect() as conn:
                    values = dict(conn.execute(sa.select(crm_meta.c.name, crm_meta.c.value).where(
                        crm_meta.c.name.in_(["cursor_secret", "database_id"]))).all())
                secret = self.settings.cursor_secret or values.get("cursor_secret")
                if "database_id" not in values or not secret:
                    raise RuntimeError("the database has no identity or cursor secret: run `crm init`")
                self._secret = f"{secret}\x00{values['database_id']}".encode()
            return self._secret

    def tiflash(self) -> bool:
        """Whether reports read TiDB's TiFlash replicas (checked once per context)."""
        with self._lock:
            if self._tiflash is None:
                with self.engine.connect() as conn:
                    self._tiflash = tiflash_available(conn)
            return self._tiflash

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()


_current: Context | None = None
_current_lock = threading.Lock()


def current() -> Context:
    """This process's context, built from the environment on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Context.from_settings()
        return _current


def reset() -> None:
    """Drop this process's context: after a fork (the parent's sockets are not ours), or
    when the environment changed."""
    global _current
    with _current_lock:
        _current = None
