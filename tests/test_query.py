"""Secured queries: the Redis path, the SQL fallback and a brute-force oracle agree;
hostile arguments get a clear error or a correct answer, never another user's meeting."""
import json

import pytest
import redis
from hypothesis import HealthCheck, given, settings

from tests.conftest import make_context
from tests.helpers import VIEWS, page_sources, query, record
from tests.replay import TYPES, operations_st, replay
from worker import keys
from worker.access import change
from worker.context import Limits
from worker.errors import InvalidArgument
from worker.ingest import ingest
from worker.maintenance import rebuild
from worker.precompute import precompute_user
from worker.query import from_database, parse, run


@pytest.mark.parametrize("small", [False, True], ids=["defaults", "slices-and-merges"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=operations_st)
def test_index_database_and_oracle_agree(engine, redis_client, small, operations):
    """Random tenants, clients, users, access lists, meetings with updates and deletes,
    precomputations and queries: the index, the database and the oracle agree.  With
    `small`, views are built in slices and more answers come from k-way merges."""
    limits = Limits(fill_inline=1, slice_clients=2) if small else Limits()
    replay(make_context(engine, redis_client, limits), operations)


@pytest.fixture
def two_users(clean):
    """User 1 sees clients 1 and 2; user 2 sees client 3; installation 2 has a user 1 too."""
    ctx = clean
    ingest(ctx, [record(source_id=f"m{c}-{n}", client_id=c, meeting_date=f"2024-01-0{n + 1}T00:00:00Z")
                       for c in (1, 2, 3) for n in range(3)])
    ingest(ctx, [record(installation_id=2, source_id="other", client_id=1)])
    change(ctx, 1, 1, [1, 2], "set")
    change(ctx, 1, 2, [3], "set")
    change(ctx, 2, 1, [1], "set")
    return ctx


HOSTILE = [
    ({"sort": "*->details"}, "sort"), ({"sort": "clientid"}, "sort"), ({"sort": None}, "sort"),
    ({"order": "DESC"}, "order"), ({"order": "desc; DROP TABLE meetings"}, "order"),
    ({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"limit": "20"}, "limit"), ({"limit": True}, "limit"),
    ({"limit": 2.0}, "limit"), ({"offset": -1}, "offset"), ({"offset": "0"}, "offset"),
    ({"types": "email"}, "types"), ({"types": ["email", 5]}, "types[]"), ({"types": ["*"]}, "types[]"),
    ({"statuses": ["open:*"]}, "statuses[]"), ({"client_ids": ["1"]}, "client_ids[]"),
    ({"client_ids": 1}, "client_ids"), ({"date_from": "2024-13-01T00:00:00Z"}, "date_from"),
    ({"date_to": 20240101}, "date_to"), ({"cursor": "x"}, "cursor"), ({"cursor": 5}, "cursor"),
    ({"cursor": "A" * 5000}, "cursor"), ({"user_id": -1}, "user_id"), ({"installation_id": "1"}, "installation_id"),
    ({"bogus": 1}, "bogus"),
]


@pytest.mark.parametrize("extra,field", HOSTILE)
def test_hostile_arguments_fail_clearly(two_users, extra, field):
    ctx = two_users
    with pytest.raises(InvalidArgument) as info:
        query(ctx, **{"installation_id": 1, "user_id": 1, **extra})
    assert info.value.field == field


def test_foreign_client_ids_and_foreign_users_see_nothing(two_users):
    ctx = two_users
    mine = query(ctx, installation_id=1, user_id=1, limit=200)
    assert mine["total"] == 6 and {i["client_id"] for i in mine["items"]} == {1, 2}
    assert query(ctx, installation_id=1, user_id=1, client_ids=[3])["total"] == 0
    assert query(ctx, installation_id=1, user_id=1, client_ids=[2, 3])["total"] == 3
    assert query(ctx, installation_id=1, user_id=99)["total"] == 0      # unknown user
    other = query(ctx, installation_id=2, user_id=1, limit=200)          # same id, other tenant
    assert [i["source_id"] for i in other["items"]] == ["other"]
    assert query(ctx, installation_id=3, user_id=1)["total"] == 0       # unknown installation
    assert query(ctx, installation_id=1, user_id=1, client_ids=[])["total"] == 0


def test_cursors_are_bound_to_their_query_and_signed(two_users):
    ctx = two_users
    first = query(ctx, installation_id=1, user_id=1, limit=2)
    cursor = first["next_cursor"]
    assert cursor
    for other in ({"user_id": 2}, {"types": ["email"]}, {"order": "asc"}, {"sort": "updated_at"},
                  {"installation_id": 2}):
        with pytest.raises(InvalidArgument, match="^cursor: "):
            query(ctx, **{"installation_id": 1, "user_id": 1, "limit": 2, "cursor": cursor, **other})
    raw = bytearray(cursor.encode())
    raw[3] = ord("A") if raw[3] != ord("A") else ord("B")  # one character changed
    with pytest.raises(InvalidArgument, match="^cursor: "):
        query(ctx, installation_id=1, user_id=1, limit=2, cursor=raw.decode())
    with pytest.raises(InvalidArgument, match="non-zero offset"):
        query(ctx, installation_id=1, user_id=1, limit=2, cursor=cursor, offset=2)
    # The cursor is valid for the query it came from, with any limit.
    assert query(ctx, installation_id=1, user_id=1, limit=4, cursor=cursor)["items"]


def test_cursor_paging_across_inserts_before_the_cursor(two_users):
    ctx = two_users
    seen, cursor, n = [], None, 0
    while True:
        page = query(ctx, installation_id=1, user_id=1, limit=2, cursor=cursor)
        seen += page_sources(page)
        cursor = page["next_cursor"]
        # After each page, a newer meeting (before the cursor) and an older one arrive.
        ingest(ctx, [record(source_id=f"new{n}", client_id=1, meeting_date="2030-01-01T00:00:00Z"),
                           record(source_id=f"old{n}", client_id=2, meeting_date="2000-01-01T00:00:00Z")])
        n += 1
        if cursor is None:
            break
    first = ["m1-0", "m1-1", "m1-2", "m2-0", "m2-1", "m2-2"]
    assert len(seen) == len(set(seen)), "a meeting was repeated"
    assert all(s in seen for s in first), "a meeting was skipped"
    assert not any(s.startswith("new") for s in seen), "an item before the cursor appeared later"


def test_deep_offsets_and_every_page(clean):
    ctx = clean
    ingest(ctx, [record(source_id=f"m{n:04d}", client_id=n % 5 + 1,
                              meeting_date=f"2024-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z") for n in range(900)])
    change(ctx, 1, 1, [1, 2, 3, 4, 5], "set")
    everything = page_sources(query(ctx, installation_id=1, user_id=1, limit=200, offset=0))
    everything += sum((page_sources(query(ctx, installation_id=1, user_id=1, limit=200, offset=o))
                       for o in range(200, 1000, 200)), [])
    assert everything == [f"m{n:04d}" for n in reversed(range(900))]
    assert page_sources(query(ctx, installation_id=1, user_id=1, limit=5, offset=895)) == \
        ["m0004", "m0003", "m0002", "m0001", "m0000"]
    assert query(ctx, installation_id=1, user_id=1, offset=10**9)["items"] == []


def test_no_key_outlives_the_queries(two_users):
    ctx = two_users
    r = ctx.redis
    before = set(r.keys("*"))
    for n in range(2000):
        query(ctx, views=(), installation_id=1, user_id=n % 3 + 1, types=[TYPES[n % 3]],
              sort=("meeting_date", "updated_at")[n % 2], date_from="2024-01-02T00:00:00Z" if n % 4 else None,
              client_ids=[1, 2] if n % 5 == 0 else None, offset=n % 4)
    after = set(r.keys("*"))
    # Only the bookkeeping of who queried when may be new; no scratch or result key remains.
    assert {k for k in after - before} <= {b"{i:1}:active", b"{i:1}:stats"}
    assert not r.exists(keys.scratch(1))


def test_fallback_answers_identically_after_a_flush(two_users):
    ctx = two_users
    r = ctx.redis
    shapes = [{}, {"types": ["email"], "statuses": ["open"]}, {"sort": "updated_at", "order": "asc", "limit": 4},
              {"date_from": "2024-01-02T00:00:00Z", "client_ids": [2]}]
    before = [query(ctx, installation_id=1, user_id=1, **s) for s in shapes]
    from_index = query(ctx, installation_id=1, user_id=1, limit=2)
    assert from_index["source"] in ("index", "precomputed") and from_index["next_cursor"]
    r.flushdb()
    after = [query(ctx, installation_id=1, user_id=1, **s) for s in shapes]
    for b, a in zip(before, after):
        assert a["source"] == "database"
        assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
    # A cursor from the index continues on the database, and the other way round: each
    # gives the items right after the page that returned it.
    everything = page_sources(query(ctx, installation_id=1, user_id=1, limit=200))
    assert len(everything) == 6
    on_database = query(ctx, installation_id=1, user_id=1, limit=3, cursor=from_index["next_cursor"])
    assert on_database["source"] == "database" and page_sources(on_database) == everything[2:5]
    from_database_page = query(ctx, installation_id=1, user_id=1, limit=3)
    assert from_database_page["source"] == "database"
    rebuild(ctx, 1)
    on_index = query(ctx, installation_id=1, user_id=1, limit=2, cursor=from_database_page["next_cursor"])
    assert on_index["source"] in ("index", "precomputed") and page_sources(on_index) == everything[3:5]


def test_fallback_when_redis_is_unreachable(two_users):
    dead = make_context(two_users.engine, redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    result, _ = run(dead, parse({"installation_id": 1, "user_id": 1}, dead.cursor_secret()))
    assert result["source"] == "database" and result["total"] == 6


def test_a_merge_too_broad_for_redis_is_answered_by_sql(two_users):
    """Users who see thousands of clients would make one answer merge thousands of sets,
    holding Redis for long: such queries go to the database, with the same answer, and
    ask for the user's view to be built (in slices), which then answers."""
    ctx = two_users
    before = query(ctx, views=(), installation_id=1, user_id=1, limit=4)
    narrow = make_context(ctx.engine, ctx.redis, Limits(max_merge=1))
    result, follow_ups = run(narrow, parse({"installation_id": 1, "user_id": 1, "limit": 4}, ctx.cursor_secret()))
    assert before["source"] == "index" and result["source"] == "database" and follow_ups == {"precompute"}
    assert page_sources(before) == page_sources(result) and before["total"] == result["total"]
    assert precompute_user(ctx, 1, 1, 1, ctx.mirror.token(1), VIEWS)["views"] == 2
    again = query(ctx, installation_id=1, user_id=1, limit=4)
    assert again["source"] == "precomputed" and page_sources(again) == page_sources(before)
    # One set is not too many: a single client's answer still comes from the index.
    assert query(narrow, views=(), installation_id=1, user_id=2, types=["email"],
                 statuses=["open"])["source"] == "index"


def test_merged_and_unioned_answers_agree(clean):
    """Many clients: pages come from a k-way merge, deep pages from a union; both equal
    the database's answer, in both orders and with cursors."""
    ctx = clean
    engine = ctx.engine
    batch = [record(source_id=f"m{n}", client_id=n % 40 + 1, type=("email", "sms")[n % 2],
                    meeting_date=f"2024-01-{n % 28 + 1:02d}T{n % 24:02d}:00:00Z") for n in range(1200)]
    ingest(ctx, batch[:600])
    ingest(ctx, batch[600:])
    change(ctx, 1, 1, list(range(1, 41)), "set")
    for order in ("asc", "desc"):
        for offset in (0, 7, 590, 1190, 1999):
            args = {"installation_id": 1, "user_id": 1, "order": order, "offset": offset, "limit": 13}
            got = query(ctx, views=(), **args)
            with engine.connect() as conn:
                total, _, items = from_database(conn, parse(args, ctx.cursor_secret()))
            assert got["total"] == total == 1200 and got["source"] == "index"
            assert page_sources(got) == [json.loads(t)["source_id"] for t in items][:13]


def test_seen_beyond_is_driven_from_the_reached_rows_and_keeps_an_optimizer_hint_first():
    """MariaDB scanned every meeting against the reached rows until the join order was
    fixed; a TiDB optimizer hint is only read right after SELECT."""
    from sqlalchemy.dialects import mysql, sqlite

    from worker.tables import meetings
    from worker.visibility import seen_beyond
    stmt = seen_beyond(1, 2, (meetings.c.id,), hint="/*+ READ_FROM_STORAGE(TIFLASH[meetings]) */")
    text = str(stmt.compile(dialect=mysql.dialect()))
    assert text.startswith("SELECT /*+ READ_FROM_STORAGE(TIFLASH[meetings]) */ STRAIGHT_JOIN meetings.id")
    assert "FROM user_clients INNER JOIN meeting_reach" in text.replace("\n", " ")
    assert "STRAIGHT_JOIN" not in str(stmt.compile(dialect=sqlite.dialect()))
