"""Ingestion against the real MariaDB and Redis: counts, versions, redelivery, rejection,
transient faults, and the index agreeing with the database."""
import threading
import time

import pytest
import sqlalchemy as sa

from tests.helpers import assert_index_matches, record
from worker.tables import meetings
from worker.errors import InvalidArgument
from worker.ingest import delete, ingest


def stored(engine, source_id, installation_id=1):
    with engine.connect() as conn:
        return conn.execute(sa.select(meetings).where(meetings.c.installation_id == installation_id,
                                                      meetings.c.source_id == source_id)).first()


def test_insert_then_redelivery_changes_nothing(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    batch = [record(source_id=f"m{n}", client_id=n % 3 + 1) for n in range(10)]
    assert ingest(ctx, batch, now_us=1) == {"accepted": 10, "updated": 0, "unchanged": 0, "rejected": []}
    before = sorted(r.hgetall("{i:1}:m").items())
    # Redelivery: no updated_at, so each record takes the ingestion time; it still changes nothing.
    assert ingest(ctx, batch, now_us=2) == {"accepted": 10, "updated": 0, "unchanged": 10, "rejected": []}
    assert sorted(r.hgetall("{i:1}:m").items()) == before
    assert stored(engine, "m0").updated_us == 1
    assert_index_matches(engine, r)


def test_out_of_order_updates_keep_the_newest(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    new = record(status="closed", updated_at="2024-02-02T00:00:00Z", subject="new")
    old = record(status="open", updated_at="2024-02-01T00:00:00Z", subject="old")
    assert ingest(ctx, [new])["accepted"] == 1
    assert ingest(ctx, [old]) == {"accepted": 1, "updated": 0, "unchanged": 1, "rejected": []}
    assert stored(engine, "m1").subject == "new"
    newer = record(status="open", client_id=9, updated_at="2024-02-03T00:00:00+05:00", subject="newer")
    assert ingest(ctx, [newer]) == {"accepted": 1, "updated": 1, "unchanged": 0, "rejected": []}
    row = stored(engine, "m1")
    assert (row.subject, row.client_id, row.status) == ("newer", 9, "open")
    # The old (client 1, closed) entries are gone from the index, the new ones are there.
    assert r.zcard("{i:1}:z:1:email:closed") == 0
    assert r.zcard("{i:1}:z:9:email:open") == 2
    assert_index_matches(engine, r)


def test_new_rows_beside_stored_ones(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(source_id="m")])
    mixed = [record(source_id="a"), record(source_id="m"), record(source_id="z")]
    assert ingest(ctx, mixed) == {"accepted": 3, "updated": 0, "unchanged": 1, "rejected": []}
    assert_index_matches(engine, r)


def test_versions_within_one_batch(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    batch = [record(subject="b", updated_at="2024-01-02T00:00:00Z"),
             record(subject="a", updated_at="2024-01-01T00:00:00Z"),
             record(subject="c", updated_at="2024-01-01T12:00:00Z")]
    assert ingest(ctx, batch) == {"accepted": 3, "updated": 0, "unchanged": 2, "rejected": []}
    assert stored(engine, "m1").subject == "b"
    assert_index_matches(engine, r)


def test_content_change_without_updated_at_is_an_update(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(subject="one")], now_us=10)
    assert ingest(ctx, [record(subject="two")], now_us=20)["updated"] == 1
    assert stored(engine, "m1").updated_us == 20
    assert_index_matches(engine, r)


def test_invalid_records_are_rejected_one_by_one(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    batch = [record(source_id="ok1"), record(source_id="bad", client_id="7"), "junk",
             record(source_id="ok2", type="SMS"), record(source_id="ok3")]
    result = ingest(ctx, batch)
    assert result["accepted"] == 2
    assert [(x["index"], x["source_id"]) for x in result["rejected"]] == [(1, "bad"), (2, None), (3, "ok2")]
    assert result["rejected"][0]["error"].startswith("client_id: must be an integer")
    assert result["rejected"][2]["error"].startswith("type: must be a token")
    assert stored(engine, "ok1") and stored(engine, "ok3") and not stored(engine, "ok2")
    assert_index_matches(engine, r)


def test_batch_limits_are_arguments_errors(clean):
    ctx = clean
    with pytest.raises(InvalidArgument, match="at most 1000"):
        ingest(ctx, [record(source_id=str(n)) for n in range(1001)])
    with pytest.raises(InvalidArgument, match="^records: must be a list"):
        ingest(ctx, {"source_id": "x"})


def test_many_installations_and_small_transactions(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    batch = [record(installation_id=n % 3 + 1, source_id=f"s{n}", client_id=n % 7 + 1,
                    type=("email", "sms", "call")[n % 3], status=("open", "closed")[n % 2]) for n in range(1000)]
    assert ingest(ctx, batch, chunk_size=97)["accepted"] == 1000
    for i in (1, 2, 3):
        assert_index_matches(engine, r, i)
        assert r.get(f"{{i:{i}}}:ready") == ctx.mirror.token(i).encode()
    # The same source_id in two installations is two meetings.
    assert stored(engine, "s0", 1) is not None and stored(engine, "s1", 2) is not None


def test_source_ids_compare_byte_for_byte(clean):
    ctx = clean
    engine = ctx.engine
    batch = [record(source_id="abc"), record(source_id="ABC"), record(source_id="abc "), record(source_id="ábc")]
    assert ingest(ctx, batch)["accepted"] == 4
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(meetings)).scalar() == 4


def test_delete_removes_from_database_and_index(clean):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(source_id=f"m{n}") for n in range(5)])
    assert delete(ctx, 1, ["m1", "m3", "missing"]) == {"deleted": 2}
    assert delete(ctx, 1, ["m1", "m3"]) == {"deleted": 0}
    assert stored(engine, "m1") is None and stored(engine, "m0") is not None
    assert r.hlen("{i:1}:m") == 3
    assert_index_matches(engine, r)
    with pytest.raises(InvalidArgument, match="^source_ids"):
        delete(ctx, 1, "m1")


@pytest.mark.mysql  # row locks and their timeouts: SQLite locks the whole file
def test_lock_wait_timeout_is_retried(clean, caplog):
    """A real InnoDB lock wait timeout (1205): another transaction holds the row longer
    than the session's innodb_lock_wait_timeout (2 s in tests); the chunk is retried and
    succeeds once the lock is gone."""
    ctx = clean
    engine = ctx.engine
    ingest(ctx, [record(subject="v1", updated_at="2024-01-01T00:00:00Z")])
    holder_ready, release = threading.Event(), threading.Event()

    def hold_lock():
        with engine.begin() as conn:
            conn.execute(sa.select(meetings.c.id).where(
                meetings.c.installation_id == 1, meetings.c.source_id == "m1").with_for_update())
            holder_ready.set()
            release.wait(10)

    t = threading.Thread(target=hold_lock)
    t.start()
    holder_ready.wait(5)
    threading.Timer(2.5, release.set).start()  # after the first attempt timed out
    try:
        result = ingest(ctx, [record(subject="v2", updated_at="2024-01-02T00:00:00Z")])
    finally:
        t.join()
    assert result["updated"] == 1
    assert "transient database fault, retry 1: OperationalError" in caplog.text
    assert stored(engine, "m1").subject == "v2"


@pytest.mark.mysql  # row locks and their timeouts: SQLite locks the whole file
def test_deadlock_is_retried(clean, caplog):
    """A real deadlock (1213): two ingests lock the same two rows in opposite order —
    here forced by a transaction that holds one row and then asks for the other."""
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(source_id="a"), record(source_id="b")])
    got_b, go = threading.Event(), threading.Event()
    errors = []

    def rival():
        try:
            with engine.begin() as conn:
                conn.execute(sa.select(meetings.c.id).where(
                    meetings.c.installation_id == 1, meetings.c.source_id == "b").with_for_update())
                got_b.set()
                go.wait(5)
                time.sleep(0.3)
                conn.execute(sa.select(meetings.c.id).where(
                    meetings.c.installation_id == 1, meetings.c.source_id == "a").with_for_update())
        except Exception as exc:  # the rival may be the deadlock victim
            errors.append(exc)

    t = threading.Thread(target=rival)
    t.start()
    got_b.wait(5)
    go.set()
    # The ingest locks "a" then waits for "b": one of the two is chosen as the victim.
    result = ingest(ctx, [record(source_id="a", subject="x"), record(source_id="b", subject="y")])
    t.join()
    deadlocks = [e for e in errors if getattr(getattr(e, "orig", None), "args", (0,))[0] == 1213]
    assert deadlocks or "transient database fault, retry 1" in caplog.text, "no deadlock happened"
    assert result["updated"] == 2
    assert stored(engine, "b").subject == "y"
    assert_index_matches(engine, r)


def test_an_id_collision_is_salted_away(clean):
    """Another meeting already holds the id derived for a new one: the new one gets the
    next salted id, and both stay queryable."""
    from worker.records import meeting_id
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    ingest(ctx, [record(source_id="first")])
    taken = meeting_id(1, "victim")
    with engine.begin() as conn:  # forge the collision: "first" moves onto victim's id
        conn.execute(meetings.update().where(meetings.c.source_id == "first").values(id=taken))
    from worker.maintenance import rebuild
    rebuild(ctx, 1)
    assert ingest(ctx, [record(source_id="victim", client_id=2)])["accepted"] == 1
    assert stored(engine, "victim").id == meeting_id(1, "victim", salt=1)
    assert stored(engine, "first").id == taken
    assert_index_matches(engine, r)
