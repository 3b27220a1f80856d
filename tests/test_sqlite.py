"""The embedded default: SQLite as the source of truth, with the real Redis index."""
import sqlalchemy as sa

from tests.conftest import make_context
from tests.helpers import assert_index_matches, page_sources, query, record
from worker.access import change
from worker.ingest import delete, ingest
from worker.query import from_database, parse


def test_ingest_query_and_fallback_on_sqlite(sqlite_engine, redis_client):
    engine, r = sqlite_engine, redis_client
    ctx = make_context(engine, r)
    r.flushdb()
    batch = [record(source_id=f"m{n}", client_id=n % 3 + 1, meeting_date=f"2024-01-{n % 28 + 1:02d}T00:00:00Z",
                    details={"n": n}) for n in range(60)]
    assert ingest(ctx, batch)["accepted"] == 60
    assert ingest(ctx, batch)["unchanged"] == 60
    ingest(ctx, [record(source_id="m0", client_id=1, status="closed", updated_at="2030-01-01T00:00:00Z")])
    # New rows before and after stored ones: the new ones are written, none twice.
    mixed = [record(source_id="a-new", client_id=3), batch[2], record(source_id="z-new", client_id=3)]
    assert ingest(ctx, mixed) == {"accepted": 3, "updated": 0, "unchanged": 1, "rejected": []}
    assert delete(ctx, 1, ["a-new", "z-new"]) == {"deleted": 2}
    change(ctx, 1, 1, [1, 2], "set")
    assert delete(ctx, 1, ["m1"]) == {"deleted": 1}
    assert_index_matches(engine, r)
    result = query(ctx, installation_id=1, user_id=1, limit=200)
    assert result["total"] == 39 and {i["client_id"] for i in result["items"]} == {1, 2}
    with engine.connect() as conn:
        total, _, items = from_database(conn, parse({"installation_id": 1, "user_id": 1, "limit": 200}, ctx.cursor_secret()))
    assert total == 39 and len(items) == 39
    r.flushdb()
    fallback = query(ctx, installation_id=1, user_id=1, limit=200)
    assert fallback["source"] == "database" and page_sources(fallback) == page_sources(result)


def test_schema_upgrade_is_idempotent(sqlite_engine):
    from worker.schema import upgrade
    assert upgrade(sqlite_engine) == upgrade(sqlite_engine) == "0011"
    tables = set(sa.inspect(sqlite_engine).get_table_names())
    assert {"meetings", "user_clients", "users", "installations", "crm_meta", "alembic_version"} <= tables


def test_migration_0005_fills_the_domains_of_existing_user_addresses(tmp_path):
    from alembic import command
    from alembic.config import Config

    from worker.schema import MIGRATIONS, upgrade
    sqlite_engine = sa.create_engine(f"sqlite:///{tmp_path}/old.db")
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    with sqlite_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
        conn.exec_driver_sql("INSERT INTO user_addresses (installation_id, address, user_id) VALUES "
                             "(1, 'ann@mail.acme.co.uk', 1), (1, 'bob@gmail.com', 2)")
    assert upgrade(sqlite_engine) == "0011"
    with sqlite_engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT address, domain FROM user_addresses ORDER BY address").all()
    assert [tuple(r) for r in rows] == [("ann@mail.acme.co.uk", "acme.co.uk"), ("bob@gmail.com", "gmail.com")]


def test_migration_0006_marks_the_emails_that_a_record_replaced(tmp_path):
    from alembic import command
    from alembic.config import Config

    from worker.schema import MIGRATIONS, upgrade
    sqlite_engine = sa.create_engine(f"sqlite:///{tmp_path}/old.db")
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    with sqlite_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0005")
        for n, (type_, status) in enumerate([("email", "inbound"), ("call", "done"), ("email", "open")], 1):
            conn.exec_driver_sql(
                "INSERT INTO meetings (id, installation_id, source_id, client_id, type, status, meeting_s, updated_s, "
                f"updated_us) VALUES ({n}, 1, 'k{n}', 1, '{type_}', '{status}', 0, 0, 0)")
            conn.exec_driver_sql(
                "INSERT INTO emails (meeting_id, installation_id, message_key, base_key, date_s, thread_id, threading, "
                f"participants) VALUES ({n}, 1, 'k{n}', 'k{n}', 0, 't', 0, '[]')")
    assert upgrade(sqlite_engine) == "0011"
    with sqlite_engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT message_key, by_record, fingerprint FROM emails ORDER BY 1").all()
    assert [tuple(r) for r in rows] == [("k1", 0, None), ("k2", 1, None), ("k3", 1, None)]


def test_email_insight_on_sqlite_matches_the_oracle(sqlite_engine, redis_client):
    """The embedded default runs the same email SQL (window functions, CASE updates,
    reach rows): threads, their figures and pages, single threads and contacts equal the
    brute force for several access lists."""
    import random

    from tests.email_corpus import CONTACTS, corpus, expected_threads
    from tests.email_corpus import I, ingest_corpus, setup_directory
    from worker.email import queries
    r = redis_client
    r.flushdb()
    ctx = make_context(sqlite_engine, r)
    setup_directory(ctx)
    messages = corpus(seed=5)
    ingest_corpus(ctx, messages, rng=random.Random(5))
    assert_index_matches(sqlite_engine, r, I)
    for user, clients in ((1, {1}), (2, {2, 3}), (3, set()), (4, {1, 2, 3})):
        change(ctx, I, user, sorted(clients), "set")
        want = expected_threads(messages, clients, user)
        got = queries.query_threads(ctx, I, user, limit=200)
        assert got["total"] == len(want)
        assert sorted(i["messages"] for i in got["items"]) == sorted(e["messages"] for e in want.values())
        awaiting = queries.query_threads(ctx, I, user, awaiting_reply=True, limit=200)
        assert awaiting["total"] == sum(e["awaiting"] is not None for e in want.values())
        paged, cursor = [], None
        while True:
            page = queries.query_threads(ctx, I, user, limit=2, cursor=cursor)
            paged += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert paged == got["items"]
        for item in got["items"]:
            keys_ = {m["source_id"] for m in queries.get_thread(ctx, I, user, item["thread_id"])["messages"]}
            assert keys_ in [e["keys"] for e in want.values()]
        contacts_ = queries.search_contacts(ctx, I, user, limit=200)
        assert {c["source_id"] for c in contacts_["items"]} == {s for s, (_, _, c, _) in CONTACTS.items() if c in clients}
