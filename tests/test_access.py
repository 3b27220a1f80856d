"""Access lists: the database and the Redis mirror, and that revoked access stays gone."""
import threading

import pytest

from tests.helpers import assert_index_matches, query, record
from worker.access import change
from worker.errors import InvalidArgument
from worker.ingest import ingest
from worker.maintenance import rebuild


def test_set_grant_revoke(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    assert change(ctx, 1, 5, [3, 1, 2, 2], "set") == {"user_id": 5, "clients": 3}
    assert change(ctx, 1, 5, [4, 1], "grant") == {"user_id": 5, "clients": 4}
    assert change(ctx, 1, 5, [1, 9], "revoke") == {"user_id": 5, "clients": 3}
    assert {int(c) for c in r.smembers("{i:1}:uc:5")} == {2, 3, 4}
    assert change(ctx, 1, 5, [], "set") == {"user_id": 5, "clients": 0}
    assert r.smembers("{i:1}:uc:5") == set()
    assert_index_matches(engine, r)


@pytest.mark.parametrize("args,field", [
    ((0, 5, [1]), "installation_id"), ((1, "5", [1]), "user_id"), ((1, 5, "1,2"), "client_ids"),
    ((1, 5, [1, -2]), "client_ids[]"), ((1, 5, [1, None]), "client_ids[]"), ((1, 5, [True]), "client_ids[]"),
])
def test_bad_arguments(clean, args, field):
    ctx = clean
    with pytest.raises(InvalidArgument) as info:
        change(ctx, *args, "set")
    assert info.value.field == field


def test_revoked_client_disappears_at_once(clean):
    ctx = clean
    ingest(ctx, [record(source_id=f"m{c}", client_id=c) for c in (1, 2, 3)])
    change(ctx, 1, 7, [1, 2, 3], "set")
    assert query(ctx, installation_id=1, user_id=7)["total"] == 3
    change(ctx, 1, 7, [2], "revoke")
    for args in ({}, {"types": ["email"], "statuses": ["open"]}, {"client_ids": [2]}, {"sort": "updated_at"}):
        result = query(ctx, installation_id=1, user_id=7, **args)
        assert "m2" not in [i["source_id"] for i in result["items"]]


def test_an_older_access_version_never_overwrites_a_newer_one(clean):
    """A rebuild (or a slow writer) holding an old copy of the list cannot bring revoked
    access back: Redis keeps the newest version."""
    from worker.redis_index import set_access
    ctx = clean
    r = ctx.redis
    change(ctx, 1, 7, [1, 2], "set")      # version 1
    change(ctx, 1, 7, [2], "revoke")      # version 2
    assert not set_access(ctx, 1, 7, 1, [1, 2], ctx.mirror.token(1))   # a late copy of version 1
    assert {int(c) for c in r.smembers("{i:1}:uc:7")} == {1}


def test_concurrent_access_changes_end_as_the_database_says(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    barrier = threading.Barrier(4)

    def worker(n):
        barrier.wait()
        for k in range(15):
            change(ctx, 1, 9, [(n + 1) * 100 + k], "grant" if k % 3 else "revoke")
            change(ctx, 1, 9, [(n + 2) * 100 + k], "revoke")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_index_matches(engine, r)


def test_rebuild_racing_revocations_never_restores_access(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(source_id=f"m{c}", client_id=c) for c in range(1, 41)])
    change(ctx, 1, 3, list(range(1, 41)), "set")
    stop = threading.Event()

    def rebuilds():
        while not stop.is_set():
            rebuild(ctx, 1)

    t = threading.Thread(target=rebuilds)
    t.start()
    try:
        for c in range(1, 41):
            change(ctx, 1, 3, [c], "revoke")
            result = query(ctx, installation_id=1, user_id=3, limit=200)
            seen = {i["client_id"] for i in result["items"]}
            assert not seen & set(range(1, c + 1)), f"revoked clients visible: {seen & set(range(1, c + 1))}"
    finally:
        stop.set()
        t.join()
    rebuild(ctx, 1)
    assert_index_matches(engine, r)
    assert r.smembers("{i:1}:uc:3") == set()
