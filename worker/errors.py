"""Errors the tasks raise, and which faults are worth retrying.

Invalid input raises :class:`InvalidArgument` (a ``ValueError``) naming the field and the
value; it is never retried.  Only faults that may be gone on the next try are retried.
"""
from __future__ import annotations

import redis.exceptions
import sqlalchemy.exc


class InvalidArgument(ValueError):
    """A task argument or record field breaks the contract."""

    def __init__(self, field: str, message: str | None = None):
        # One argument: the whole message, as Celery rebuilds the exception from its args.
        text = field if message is None else f"{field}: {message}"
        super().__init__(text)
        self.field = text.split(":", 1)[0]


#: Every fault of the index Redis, a cluster's included (some of redis-py's cluster
#: exceptions are not RedisErrors).
REDIS_FAULTS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


# MySQL/MariaDB/TiDB error codes worth a second try, and why:
TRANSIENT_DB_CODES = {
    1205,  # lock wait timeout: the other transaction will finish
    1213,  # deadlock: one side was rolled back, the retry wins
    2003,  # cannot connect: server restarting
    2006,  # server has gone away: reconnect
    2013,  # lost connection during query
    1040,  # too many connections: others will disconnect
    8002,  # TiDB: SELECT FOR UPDATE write conflict in optimistic mode
    8022,  # TiDB: transaction commit failed, retryable
    8028,  # TiDB: schema changed during the transaction
    9007,  # TiDB: write conflict
    9001, 9002, 9005,  # TiDB: PD / TiKV server timeout or busy
    1305,  # savepoint gone: the server rolled the whole transaction back (a deadlock inside it)
}


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is a fault that may be gone on the next try."""
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError, redis.exceptions.TryAgainError,
                        # Redis Cluster: a slot moving, a failover under way, a node down.
                        redis.exceptions.AskError, redis.exceptions.ClusterDownError,
                        redis.exceptions.SlotNotCoveredError)):
        return True
    if type(exc) is redis.exceptions.RedisClusterException:  # no node of the cluster answers
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        args = getattr(orig, "args", ())
        if args and isinstance(args[0], int) and args[0] in TRANSIENT_DB_CODES:
            return True
        # SQLite, the embedded default: another process holds the write lock.
        if "database is locked" in str(orig):
            return True
    return False
