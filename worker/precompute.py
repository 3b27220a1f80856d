"""Precomputed per-user secured result sets.

A view is (sort field, types, statuses); its set holds the members of every meeting the
user may see that matches, in sort order, so the first pages cost O(log N + page).  Sets
are kept fresh by the index scripts on every write and dropped on every access change;
here they are built, refreshed for active users, and evicted when idle or over budget.
"""
from __future__ import annotations

import dataclasses
import secrets

import redis

from worker import keys, metrics
from worker.redis_index import ScriptArgs

#: build.lua's replies besides a count.
TOO_BROAD, CANCELLED, NOT_MIRRORED = -2, -1, -3


@dataclasses.dataclass(frozen=True)
class BuildArgs(ScriptArgs):
    """The ARGV of ``build.lua``, in order (its header names each; a test checks both)."""
    prefix: str
    token: str
    user: int
    view: str
    build: str
    step: str
    first: int = 0
    count: int = 0
    now: int = 0
    max_sets: int = 0


def _builder(ctx, installation_id: int, user_id: int, view: str, token: str):
    """A function that runs one step of build.lua for this user's view."""
    keys_ = [keys.user_clients(installation_id, user_id), keys.user_views(installation_id, user_id),
             keys.pairs(installation_id), keys.view_set(installation_id, user_id, view), keys.ready(installation_id)]
    build = "b:" + secrets.token_hex(8)

    def step(name: str, **args) -> int:
        return int(ctx.scripts["build"](keys=keys_, args=BuildArgs(
            prefix=keys.prefix(installation_id), token=token, user=user_id, view=view, build=build, step=name,
            **args).argv()))
    return step


def fill_view(ctx, installation_id: int, user_id: int, view: str, now: int, token: str) -> bool:
    """Build the user's view in one call when it merges at most ``limits.fill_inline``
    sets (a query's miss); False when it is broader (build it with precompute_user)."""
    step = _builder(ctx, installation_id, user_id, view, token)
    return step("whole", now=now, max_sets=ctx.limits.fill_inline) != TOO_BROAD


def build_view(ctx, installation_id: int, user_id: int, view: str, now: int, token: str) -> int:
    """Build the user's view: in one call when small, else a slice of clients at a time.
    Returns its entries, CANCELLED (an access change or an eviction dropped it meanwhile)
    or NOT_MIRRORED (the index is not ready for ``token``)."""
    step = _builder(ctx, installation_id, user_id, view, token)
    entries = step("whole", now=now, max_sets=ctx.limits.fill_inline)
    if entries != TOO_BROAD:
        return entries
    clients = step("begin")
    if clients < 0:
        return clients
    for first in range(1, clients + 1, ctx.limits.slice_clients):
        merged = step("slice", first=first, count=ctx.limits.slice_clients)
        if merged < 0:
            return merged
    return step("end", now=now)


def precompute_user(ctx, installation_id: int, user_id: int, now: int, token: str | None, views=None) -> dict:
    """Build the user's sets for ``views`` (default: the configured ones) now, each
    replacing its previous version (a broad view in slices, served once complete), from
    an index ready for ``token`` only.  Returns the number of views built and of entries
    they hold."""
    built = entries = 0
    for view in sorted(ctx.views if views is None else views):
        count = NOT_MIRRORED if token is None else build_view(ctx, installation_id, user_id, view, now, token)
        if count == NOT_MIRRORED:
            return {"user_id": user_id, "views": built, "entries": entries, "ready": False}
        if count == CANCELLED:
            continue  # an access change or an eviction; the next run builds it
        built += 1
        entries += count
    return {"user_id": user_id, "views": built, "entries": entries, "ready": True}


def drop_user(r: redis.Redis, installation_id: int, user_id: int, views=None) -> int:
    """Drop the user's precomputed sets (``views``, or all); returns how many."""
    pv = keys.user_views(installation_id, user_id)
    names = [v.decode() for v in r.hkeys(pv)] if views is None else list(views)
    if not names:
        return 0
    pipe = r.pipeline(transaction=True)
    pipe.delete(*[keys.view_set(installation_id, user_id, v) for v in names],
                *[keys.view_head(installation_id, user_id, v) for v in names])
    pipe.hdel(pv, *names)
    for view in names:
        pipe.srem(keys.view_users(installation_id, view), user_id)
    pipe.execute()
    return len(names)


def _complete(last_use: bytes | None) -> bool:
    """A view's entry in pv:<user> says it is built (not missing, not being built)."""
    return last_use is not None and not last_use.startswith(b"b:")


@dataclasses.dataclass
class ViewInfo:
    installation_id: int
    user_id: int
    view: str
    last_used: float
    size: int = 0


def list_views(r: redis.Redis, installation_id: int) -> list[ViewInfo]:
    """Every precomputed set of the installation, with its last use and size in bytes."""
    found = []
    match = keys.user_views(installation_id, "*")
    for key in r.scan_iter(match=match, count=1000):
        user_id = int(key.rsplit(b":", 1)[1])
        for view, used in r.hgetall(key).items():
            if _complete(used):  # one being built is not served, nor counted yet
                found.append(ViewInfo(installation_id, user_id, view.decode(), float(used)))
    if found:
        pipe = r.pipeline(transaction=False)
        for info in found:
            pipe.memory_usage(keys.view_set(info.installation_id, info.user_id, info.view))
            pipe.memory_usage(keys.view_head(info.installation_id, info.user_id, info.view))
        sizes = pipe.execute()
        for n, info in enumerate(found):
            info.size = (sizes[2 * n] or 0) + (sizes[2 * n + 1] or 0)
    return found


def precompute_active(ctx, tokens: dict, idle: int, budget: int, now: int) -> dict:
    """Drop the sets of users idle longer than ``idle`` seconds, build the missing sets of
    recently active users (most recent first) while the budget lasts, then evict the least
    recently used sets until all of them fit in ``budget`` bytes.  ``tokens``: installation
    id -> its token (worker/mirror.py)."""
    dropped_idle = refreshed = evicted = 0
    r, views = ctx.redis, ctx.views
    installation_ids = sorted(tokens)
    for installation_id in installation_ids:
        active = keys.active_users(installation_id)
        for user in r.zrangebyscore(active, "-inf", now - idle):
            dropped_idle += drop_user(r, installation_id, int(user))
        r.zremrangebyscore(active, "-inf", now - idle)
        sizes = {(v.user_id, v.view): v.size for v in list_views(r, installation_id)}
        used = sum(sizes.values())
        for user in r.zrevrangebyscore(active, "+inf", f"({now - idle}"):
            if used >= budget:
                break
            user = int(user)
            # Sets are kept fresh on every write: only the missing ones need building
            # (drift in the others is reconcile_index's to find).
            present = r.hgetall(keys.user_views(installation_id, user))
            missing = [v for v in views if not _complete(present.get(v.encode()))]
            if not missing:
                continue
            result = precompute_user(ctx, installation_id, user, now, tokens[installation_id], missing)
            if not result["ready"]:
                break
            refreshed += 1
            pipe = r.pipeline(transaction=False)
            for view in missing:
                pipe.memory_usage(keys.view_set(installation_id, user, view))
            for view, size in zip(missing, pipe.execute()):
                used += (size or 0) - sizes.get((user, view), 0)
    every = [info for i in installation_ids for info in list_views(r, i)]
    total = sum(info.size for info in every)
    for info in sorted(every, key=lambda v: v.last_used):
        if total <= budget:
            break
        drop_user(r, info.installation_id, info.user_id, [info.view])
        total -= info.size
        evicted += 1
    metrics.count(r, {"drop:idle": dropped_idle, "drop:budget": evicted})
    return {"refreshed_users": refreshed, "dropped_idle_views": dropped_idle, "evicted_views": evicted,
            "bytes": total, "views": len(every) - evicted}


def stats(r: redis.Redis, installation_ids) -> dict:
    """Users and bytes precomputed, and the hit rate of the precomputed sets."""
    users, views, size, hit, miss = set(), 0, 0, 0, 0
    for installation_id in installation_ids:
        for info in list_views(r, installation_id):
            users.add((installation_id, info.user_id))
            views += 1
            size += info.size
        counters = r.hgetall(keys.stats(installation_id))
        hit += int(counters.get(b"hit", 0))
        miss += int(counters.get(b"miss", 0))
    return {"users": len(users), "views": views, "bytes": size, "hits": hit, "misses": miss,
            "hit_rate": round(hit / (hit + miss), 4) if hit + miss else None}
