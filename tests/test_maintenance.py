"""Rebuild and reconcile: the index comes back from the database, drift is found and mended."""
from tests.conftest import make_context
from tests.helpers import VIEWS, assert_index_matches, query, record
from worker import keys
from worker.access import change
from worker.ingest import ingest
from worker.maintenance import rebuild, reconcile
from worker.precompute import precompute_user


def seed(ctx):
    ingest(ctx, [record(source_id=f"m{n}", client_id=n % 4 + 1, type=("email", "sms")[n % 2])
                       for n in range(40)])
    change(ctx, 1, 1, [1, 2], "set")
    change(ctx, 1, 2, [3], "set")


def test_rebuild_after_a_flush(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    seed(ctx)
    r.flushdb()
    assert query(ctx, installation_id=1, user_id=1)["source"] == "database"
    report = rebuild(ctx)
    assert report["rebuilt"]["1"] == {"meetings": 40, "users": 2, "superseded": False}
    assert_index_matches(engine, r)
    assert query(ctx, installation_id=1, user_id=1)["source"] in ("index", "precomputed")


def test_reconcile_finds_and_repairs_drift(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    seed(ctx)
    precompute_user(ctx, 1, 1, 1, ctx.mirror.token(1), VIEWS)
    clean_report = reconcile(ctx)
    assert clean_report["meetings_repaired"] == clean_report["access_repaired"] == clean_report["views_dropped"] == 0
    assert clean_report["meetings_checked"] == 40 and clean_report["views_checked"] == 2
    # Drift of every kind: a lost payload, a stray entry, a stale grant, a wrong view.
    r.hdel(keys.payloads(1), r.hkeys(keys.payloads(1))[0])
    r.zadd(keys.client_set(1, 1, "email", "open"), {keys.member(b"d", 5, 123): 0})
    r.sadd(keys.user_clients(1, 2), 4)
    r.zadd(keys.view_set(1, 1, "d:*:*"), {keys.member(b"d", 5, 456): 0})
    report = reconcile(ctx)
    assert report["meetings_repaired"] == 1 and report["orphan_entries_removed"] >= 1
    assert report["access_repaired"] == 1 and report["views_dropped"] == 1
    assert_index_matches(engine, r)
    again = reconcile(ctx)
    assert again["meetings_repaired"] == again["access_repaired"] == again["orphan_entries_removed"] == 0


def test_reconcile_rebuilds_an_index_that_is_not_ready(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    seed(ctx)
    r.flushdb()
    assert reconcile(ctx)["rebuilt"] == [1]
    assert_index_matches(engine, r)


def test_an_index_of_another_database_does_not_answer(clean, sqlite_engine):
    """The same Redis, pointed at by a new database: its index was written from another,
    so it must not answer until rebuilt from this one."""
    from worker.maintenance import claim_index
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    claim_index(ctx)
    seed(ctx)
    assert claim_index(ctx) == []                             # same database: nothing to do
    assert query(ctx, installation_id=1, user_id=1)["source"] != "database"
    other = make_context(sqlite_engine, r)
    assert claim_index(other) == [1]                          # another database takes the Redis
    assert not r.exists(keys.ready(1))
    assert query(other, installation_id=1, user_id=1)["total"] == 0  # its own (empty) data
    assert query(ctx, installation_id=1, user_id=1)["source"] == "database"  # no longer its index
    assert claim_index(ctx) == []                             # and back: rebuilt before answering
    assert query(ctx, installation_id=1, user_id=1)["source"] == "database"
    rebuild(ctx, 1)
    assert_index_matches(engine, r)
    assert query(ctx, installation_id=1, user_id=1)["source"] != "database"
