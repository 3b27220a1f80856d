"""The Redis index: connections, the Lua scripts, and the plain functions that write it.

SQL stays the source of truth; everything here can be rebuilt from the database
(:mod:`worker.maintenance`).
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Iterable

import redis

from worker import keys

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def connect(url: str) -> redis.Redis:
    """A new client for ``url`` (bytes replies, short timeouts: a dead Redis must make
    queries fall back to SQL quickly, not hang them)."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                health_check_interval=30)


def get_redis(url: str | None = None) -> redis.Redis:
    """The process-wide client for ``url`` (default: the configured index Redis)."""
    if url is None:
        from worker.settings import get_settings
        url = get_settings().redis_url
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = connect(url)
        return client


def reset_clients() -> None:
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


@functools.lru_cache(maxsize=None)
def script_source(name: str) -> str:
    """The text of ``scripts/<name>.lua``; apply, delete and build share ``views.lua``."""
    with open(os.path.join(SCRIPTS, f"{name}.lua")) as f:
        text = f.read()
    if name in ("apply", "delete", "build"):
        with open(os.path.join(SCRIPTS, "views.lua")) as f:
            text = f.read() + "\n" + text
    return text


def script(r: redis.Redis, name: str):
    """The registered script ``name`` for client ``r`` (EVALSHA, reloaded when missing)."""
    cache = r.__dict__.setdefault("_crm_scripts", {})
    found = cache.get(name)
    if found is None:
        found = cache[name] = r.register_script(script_source(name))
    return found


def head(row) -> str:
    return "%d %s %s %d %d %d" % (row.client_id, row.type, row.status, row.meeting_s,
                                  row.updated_s, row.updated_us)


def apply_meetings(r: redis.Redis, installation_id: int, rows: Iterable, item_json) -> tuple[int, int]:
    """Write ``rows`` (database rows of one installation) into the index in one atomic
    step; a stored newer or identical version is kept.  Returns (written, fanned_out)."""
    args: list = [keys.prefix(installation_id)]
    for row in rows:
        args += [keys.id_field(row.id), head(row), item_json(row)]
    if len(args) == 1:
        return 0, 0
    written, fanned = script(r, "apply")(
        keys=[keys.payloads(installation_id), keys.pairs(installation_id)], args=args)
    return int(written), int(fanned)


def delete_meetings(r: redis.Redis, installation_id: int, ids: Iterable[int]) -> tuple[int, int]:
    """Remove meetings from the index and every precomputed set in one atomic step."""
    args: list = [keys.prefix(installation_id)] + [keys.id_field(i) for i in ids]
    if len(args) == 1:
        return 0, 0
    removed, fanned = script(r, "delete")(keys=[keys.payloads(installation_id)], args=args)
    return int(removed), int(fanned)


def _access(r, installation_id, user_id, mode, version, client_ids) -> int:
    return int(script(r, "access")(
        keys=[keys.user_clients(installation_id, user_id), keys.access_versions(installation_id),
              keys.user_views(installation_id, user_id)],
        args=[keys.prefix(installation_id), user_id, mode, version, *sorted(client_ids)]))


def remove_access(r: redis.Redis, installation_id: int, user_id: int, client_ids) -> None:
    """Take clients away from a user now, with the user's precomputed sets."""
    _access(r, installation_id, user_id, "remove", 0, client_ids)


def set_access(r: redis.Redis, installation_id: int, user_id: int, version: int, client_ids) -> bool:
    """Make ``client_ids`` the user's whole access list at ``version``; an older version
    than the one stored is ignored.  True when written."""
    return bool(_access(r, installation_id, user_id, "set", version, client_ids))


def register_installation(r: redis.Redis, installation_id: int) -> None:
    r.sadd(keys.INSTALLATIONS, installation_id)
