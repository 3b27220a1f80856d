"""The Redis index: connections, the Lua scripts, and the plain functions that write it.
Each writer takes the process's context (worker/context.py) for its client and scripts.

SQL stays the source of truth; everything here can be rebuilt from the database
(:mod:`worker.maintenance`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable

import redis

from worker import keys
from worker.records import item_json

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
#: The scripts a client runs; shared files (common.lua, views.lua) are not run alone.
NAMES = ("apply", "delete", "access", "query", "head", "build", "publish", "answer_cache", "wipe")


#: URL schemes that name a seed node of a Redis Cluster.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def connect(url: str) -> redis.Redis:
    """A new client for ``url`` (bytes replies, short timeouts: a dead Redis must make
    queries fall back to SQL quickly, not hang them).  ``redis+cluster://host:port`` (or
    ``rediss+cluster://``) names a seed node of a Redis Cluster: the client finds the
    others and sends each command to the node that holds its keys."""
    if is_cluster_url(url):
        from redis.backoff import NoBackoff
        from redis.cluster import RedisCluster
        from redis.retry import Retry
        plain = url.replace("+cluster://", "://", 1)
        # One more try per command, at once: a node that is down makes the caller answer
        # from the database, instead of waiting out a failover inside one query.
        return RedisCluster.from_url(plain, socket_timeout=5, socket_connect_timeout=2,
                                     retry=Retry(NoBackoff(), retries=1))
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                health_check_interval=30)


def _read(name: str) -> str:
    with open(os.path.join(SCRIPTS, f"{name}.lua")) as f:
        return f.read()


def script_source(name: str) -> str:
    """The text of ``scripts/<name>.lua`` as sent to Redis: ``common.lua`` and ``keys.lua``
    (the key templates), then the shared files the script declares in its
    ``-- requires: a, b`` header line, then the script.  A script whose header says
    ``-- standalone`` is sent alone: Redis runs a script's whole text on every call, and
    defining the shared functions costs a short script about a third of its time."""
    text = _read(name)
    if re.search(r"^-- standalone\b", text, re.M):
        return text
    found = re.search(r"^-- requires: ([\w, ]+)$", text, re.M)
    shared = ["common", "keys"] + ([part.strip() for part in found.group(1).split(",")] if found else [])
    return "\n".join([_read(part) for part in shared] + [text])


@dataclasses.dataclass(frozen=True)
class ScriptArgs:
    """The ARGV of one script, built by name: its fields in order, then ``rest``, the
    variable tail of a script that takes one.  Each script copies its ARGV into locals
    named like the fields (tests/test_keys.py checks every script against its class)."""

    def argv(self) -> list:
        names = type(self).__dict__.get("_names")
        if names is None:  # once per class: the query path builds one per call
            names = tuple(f.name for f in dataclasses.fields(self) if f.name != "rest")
            type.__setattr__(type(self), "_names", names)
        out = [getattr(self, name) for name in names]
        if "rest" in self.__dataclass_fields__:
            out.extend(self.rest)
        return out


@dataclasses.dataclass(frozen=True)
class ApplyArgs(ScriptArgs):
    """ARGV of ``apply.lua``; ``rest``: (7-byte id, head, item JSON) of each meeting."""
    prefix: str
    token: str
    write_id: str
    rest: list


@dataclasses.dataclass(frozen=True)
class DeleteArgs(ScriptArgs):
    """ARGV of ``delete.lua``; ``rest``: 7-byte meeting ids."""
    prefix: str
    token: str
    rest: list


@dataclasses.dataclass(frozen=True)
class AccessArgs(ScriptArgs):
    """ARGV of ``access.lua``; ``rest``: client ids."""
    prefix: str
    token: str
    user: int
    mode: str
    version: int
    write_id: str
    rest: list


class Scripts:
    """The scripts registered with one client (EVALSHA, reloaded when Redis lost them)."""

    def __init__(self, r: redis.Redis):
        self._scripts = {name: r.register_script(script_source(name)) for name in NAMES}

    def __getitem__(self, name: str):
        return self._scripts[name]


def head(row) -> str:
    """The space-separated head of a payload (worker/keys.py payloads); ``reach`` only
    for a meeting that others than its client's users may see (emails)."""
    text = "%d %s %s %d %d %d" % (row.client_id, row.type, row.status, row.meeting_s,
                                  row.updated_s, row.updated_us)
    reach = getattr(row, "reach", None)
    return f"{text} {reach}" if reach else text


class NotMirrored(Exception):
    """The index is not written for the caller's token (another database's, another
    generation's, or none): nothing was written.  See :mod:`worker.mirror`."""


def apply_meetings(ctx, installation_id: int, rows: Iterable, token: str, write_id: str = "") -> tuple[int, int]:
    """Write ``rows`` (database rows of one installation) into the index in one atomic
    step; a stored newer or identical version is kept.  Returns (written, fanned_out);
    raises :class:`NotMirrored` when the index is not written for ``token``."""
    rest: list = []
    for row in rows:
        rest += [keys.id_field(row.id), head(row), item_json(row)]
    if not rest and not write_id:
        return 0, 0
    written, fanned = ctx.scripts["apply"](
        keys=[keys.payloads(installation_id), keys.pairs(installation_id), keys.generation(installation_id),
              keys.writes(installation_id)],
        args=ApplyArgs(keys.prefix(installation_id), token, write_id, rest).argv())
    if int(written) < 0:
        raise NotMirrored(installation_id)
    return int(written), int(fanned)


def delete_meetings(ctx, installation_id: int, ids: Iterable[int], token: str) -> tuple[int, int]:
    """Remove meetings from the index and every precomputed set in one atomic step."""
    rest = [keys.id_field(i) for i in ids]
    if not rest:
        return 0, 0
    removed, fanned = ctx.scripts["delete"](
        keys=[keys.payloads(installation_id), keys.generation(installation_id)],
        args=DeleteArgs(keys.prefix(installation_id), token, rest).argv())
    if int(removed) < 0:
        raise NotMirrored(installation_id)
    return int(removed), int(fanned)


def _access(ctx, installation_id, user_id, token, mode, version, write_id, client_ids) -> int:
    written = int(ctx.scripts["access"](
        keys=[keys.user_clients(installation_id, user_id), keys.access_versions(installation_id),
              keys.user_views(installation_id, user_id), keys.generation(installation_id),
              keys.writes(installation_id)],
        args=AccessArgs(keys.prefix(installation_id), token, user_id, mode, version, write_id,
                        sorted(client_ids)).argv()))
    if written < 0:
        raise NotMirrored(installation_id)
    return written


def remove_access(ctx, installation_id: int, user_id: int, client_ids, token: str) -> None:
    """Take clients away from a user now, with the user's precomputed sets."""
    _access(ctx, installation_id, user_id, token, "remove", 0, "", client_ids)


def set_access(ctx, installation_id: int, user_id: int, version: int, client_ids, token: str,
               write_id: str = "", force: bool = False) -> bool:
    """Make ``client_ids`` the user's whole access list at ``version``; an older version
    than the one stored is ignored unless ``force`` (a repair made under the user's row
    lock).  True when written."""
    return bool(_access(ctx, installation_id, user_id, token, "force" if force else "set", version, write_id,
                        client_ids))

