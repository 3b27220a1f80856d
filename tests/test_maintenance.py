"""Rebuild and reconcile: the index comes back from the database, drift is found and mended."""
from tests.helpers import VIEWS, assert_index_matches, query, record, token_of
from worker import keys
from worker.access import change
from worker.ingest import ingest
from worker.maintenance import rebuild, reconcile
from worker.precompute import precompute_user


def seed(engine, r):
    ingest(engine, r, [record(source_id=f"m{n}", client_id=n % 4 + 1, type=("email", "sms")[n % 2])
                       for n in range(40)])
    change(engine, r, 1, 1, [1, 2], "set")
    change(engine, r, 1, 2, [3], "set")


def test_rebuild_after_a_flush(clean):
    engine, r = clean
    seed(engine, r)
    r.flushdb()
    assert query(engine, r, installation_id=1, user_id=1)["source"] == "database"
    report = rebuild(engine, r)
    assert report["rebuilt"]["1"] == {"meetings": 40, "users": 2}
    assert_index_matches(engine, r)
    assert query(engine, r, installation_id=1, user_id=1)["source"] in ("index", "precomputed")


def test_reconcile_finds_and_repairs_drift(clean):
    engine, r = clean
    seed(engine, r)
    precompute_user(r, 1, 1, VIEWS, now=1, token=token_of(engine, r, 1))
    clean_report = reconcile(engine, r)
    assert clean_report["meetings_repaired"] == clean_report["access_repaired"] == clean_report["views_dropped"] == 0
    assert clean_report["meetings_checked"] == 40 and clean_report["views_checked"] == 2
    # Drift of every kind: a lost payload, a stray entry, a stale grant, a wrong view.
    r.hdel(keys.payloads(1), r.hkeys(keys.payloads(1))[0])
    r.zadd(keys.client_set(1, 1, "email", "open"), {keys.member(b"d", 5, 123): 0})
    r.sadd(keys.user_clients(1, 2), 4)
    r.zadd(keys.view_set(1, 1, "d:*:*"), {keys.member(b"d", 5, 456): 0})
    report = reconcile(engine, r)
    assert report["meetings_repaired"] == 1 and report["orphan_entries_removed"] >= 1
    assert report["access_repaired"] == 1 and report["views_dropped"] == 1
    assert_index_matches(engine, r)
    again = reconcile(engine, r)
    assert again["meetings_repaired"] == again["access_repaired"] == again["orphan_entries_removed"] == 0


def test_reconcile_rebuilds_an_index_that_is_not_ready(clean):
    engine, r = clean
    seed(engine, r)
    r.flushdb()
    assert reconcile(engine, r)["rebuilt"] == [1]
    assert_index_matches(engine, r)


def test_an_index_of_another_database_does_not_answer(clean, sqlite_engine):
    """The same Redis, pointed at by a new database: its index was written from another,
    so it must not answer until rebuilt from this one."""
    from worker.maintenance import claim_index
    engine, r = clean
    claim_index(engine, r)
    seed(engine, r)
    assert claim_index(engine, r) == []                       # same database: nothing to do
    assert query(engine, r, installation_id=1, user_id=1)["source"] != "database"
    assert claim_index(sqlite_engine, r) == [1]               # another database takes the Redis
    assert not r.exists(keys.ready(1))
    assert query(sqlite_engine, r, installation_id=1, user_id=1)["total"] == 0  # its own (empty) data
    assert query(engine, r, installation_id=1, user_id=1)["source"] == "database"  # no longer its index
    assert claim_index(engine, r) == []                       # and back: rebuilt before answering
    assert query(engine, r, installation_id=1, user_id=1)["source"] == "database"
    rebuild(engine, r, 1)
    assert_index_matches(engine, r)
    assert query(engine, r, installation_id=1, user_id=1)["source"] != "database"
