"""Cached answers: a user's report or page of threads, kept in Redis and served while
nothing it could include changed (``answer_cache.lua``).

An answer is stored under a tag read before computing it: the index's token and the
installation's data version.  Every write to the index stamps what it touched (the
clients of the meetings it wrote, old and new, and the others an email links to; the
users whose mailbox or access list changed) with the next data version, and a revocation
stamps the user before the database commits.  A copy is current while the token holds
and neither the user nor any client the user may see has a stamp above its tag: a write
to other clients leaves it current, a write landing while it is computed makes it stale
at once.  When the index does not mirror the database, nothing is cached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from worker import keys
from worker.errors import REDIS_FAULTS, is_transient
from worker.redis_index import ScriptArgs

log = logging.getLogger(__name__)

#: Seconds a copy lives at most (``going_cold`` measures silence up to the time it was
#: computed).
CACHE_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class AnswerCacheArgs(ScriptArgs):
    """ARGV of ``answer_cache.lua``."""
    token: str
    user: int
    field: str
    request: str
    max_requests: int
    mode: str


def digest(*parts) -> str:
    """The key of one answer among a user's: its name and arguments, hashed."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def check(ctx, installation_id: int, user_id: int, answer: str, token: str, mode: str, request: str = "",
          max_requests: int = 0, client=None):
    """``answer_cache.lua`` for the user's answer ``answer`` (a :func:`digest`): ``mode``
    "ask" (a report request: noted in ``report_requests`` up to ``max_requests`` and the
    copy returned when current), "read" (the copy, nothing noted) or "check" (the beat's:
    nothing noted, no copy).  ``client``: a pipeline to queue the call on."""
    return ctx.scripts["answer_cache"](
        keys=[keys.ready(installation_id), keys.data_version(installation_id),
              keys.answer_cache(installation_id, user_id, answer), keys.report_requests(installation_id),
              keys.user_clients(installation_id, user_id), keys.client_stamps(installation_id),
              keys.user_stamps(installation_id)],
        args=AnswerCacheArgs(token, user_id, f"{user_id}:{answer}", request, max_requests, mode).argv(),
        client=client)


def store(ctx, installation_id: int, user_id: int, answer: str, tag: str, body: dict) -> None:
    """Keep ``body`` as the user's answer ``answer`` under ``tag`` (read before computing
    it, from :func:`check`); an index that cannot be reached keeps nothing."""
    key = keys.answer_cache(installation_id, user_id, answer)
    try:
        pipe = ctx.redis.pipeline(transaction=True)  # keys of one installation: one slot
        pipe.hset(key, mapping={"t": tag, "b": json.dumps(body, separators=(",", ":"))})
        pipe.expire(key, CACHE_SECONDS)
        pipe.execute()
    except REDIS_FAULTS as exc:
        if not is_transient(exc):
            raise


def read(ctx, installation_id: int, user_id: int, answer: str, token: str | None, request: str = "",
         max_requests: int = 0):
    """The user's current copy of ``answer`` as (copy or None, tag to store a computed one
    under, or None when nothing may be cached).  ``request``: a report request to note
    (mode "ask"), else nothing is noted (mode "read").  An index that cannot be reached
    answers (None, None): the answer is computed, and not kept."""
    if token is None:
        return None, None
    try:
        found = check(ctx, installation_id, user_id, answer, token, "ask" if request else "read",
                      request=request, max_requests=max_requests)
    except REDIS_FAULTS as exc:
        if not is_transient(exc):
            raise
        log.warning("index unreachable (%s); answer computed without its cache", exc.__class__.__name__)
        return None, None
    if int(found[0]) == 1:
        return json.loads(found[1]), None
    if int(found[0]) == 2:
        return None, found[1].decode()
    return None, None
