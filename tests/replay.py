"""Random operations (ingest, delete, access changes, precomputation, queries) replayed
against the service and a brute-force oracle: the index, the database and the oracle
must agree on every answer, page by page.  Shared by the query and cluster tests."""
import json

from hypothesis import strategies as st

from tests.conftest import wipe
from tests.helpers import VIEWS, Oracle, ids_of, page_sources, query, record
from worker.access import change
from worker.ingest import delete, ingest
from worker.precompute import precompute_user
from worker.query import from_database, parse
from worker.rebuild import writer_token

DATES = ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.900Z", "2024-01-02T10:00:00+02:00",
         "2024-01-03T00:00:00Z", "2024-03-01T00:00:00Z", "2025-06-01T12:30:00Z"]
UPDATES = [None, "2024-05-01T00:00:00Z", "2024-05-01T00:00:00.5Z", "2024-05-02T00:00:00Z", "2024-06-01T00:00:00Z"]
TYPES = ["email", "sms", "call"]
STATUSES = ["open", "closed"]

records_st = st.builds(
    record,
    installation_id=st.sampled_from([1, 2]),
    source_id=st.sampled_from([f"s{n}" for n in range(14)]),
    client_id=st.integers(1, 6),
    type=st.sampled_from(TYPES),
    status=st.sampled_from(STATUSES),
    meeting_date=st.sampled_from(DATES),
    updated_at=st.sampled_from(UPDATES),
    subject=st.sampled_from([None, "hello", "другой"]),
)
subset = lambda values: st.one_of(st.none(), st.lists(st.sampled_from(values), max_size=3))  # noqa: E731
queries_st = st.fixed_dictionaries({
    "installation_id": st.sampled_from([1, 2]),
    "user_id": st.integers(1, 4),
    "types": subset(TYPES),
    "statuses": subset(STATUSES),
    "client_ids": st.one_of(st.none(), st.lists(st.integers(1, 7), max_size=4)),
    "date_from": st.sampled_from([None] + DATES),
    "date_to": st.sampled_from([None] + DATES),
    "sort": st.sampled_from(["meeting_date", "updated_at"]),
    "order": st.sampled_from(["asc", "desc"]),
    "offset": st.integers(0, 12),
    "limit": st.integers(1, 7),
})
operations_st = st.lists(st.one_of(
    st.tuples(st.just("ingest"), st.lists(records_st, min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.sampled_from([1, 2]), st.lists(st.sampled_from([f"s{n}" for n in range(14)]),
                                                                    max_size=4)),
    st.tuples(st.just("access"), st.sampled_from([1, 2]), st.integers(1, 4),
              st.lists(st.integers(1, 6), max_size=5), st.sampled_from(["set", "grant", "revoke"])),
    st.tuples(st.just("precompute"), st.sampled_from([1, 2]), st.integers(1, 4)),
    st.tuples(st.just("query"), queries_st),
), min_size=1, max_size=14)


def check(ctx, oracle, q):
    """All three answers to ``q`` agree, page by page through cursors too."""
    ids = ids_of(ctx.engine)
    want_total, want_page = oracle.answer(ids=ids, **q)
    got = query(ctx, **q)
    parsed = parse(dict(q), ctx.cursor_secret())
    with ctx.engine.connect() as conn:
        sql_total, _, sql_items = from_database(conn, parsed)
    sql_page = [json.loads(t)["source_id"] for t in sql_items][:q["limit"]]
    assert (got["total"], page_sources(got)) == (want_total, want_page), f"index vs oracle for {q}"
    assert (sql_total, sql_page) == (want_total, want_page), f"database vs oracle for {q}"
    assert got["source"] in ("index", "precomputed")
    # Walk every page with cursors from the start: the concatenation is the whole answer.
    walk = dict(q, offset=0)
    _, everything = oracle.answer(ids=ids, **dict(walk, limit=10_000))
    seen, cursor = [], None
    while True:
        page = query(ctx, **dict(walk, cursor=cursor))
        seen += page_sources(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == everything, f"cursor walk for {q}"



def replay(ctx, operations):
    """Apply ``operations`` (operations_st) and check every query against the oracle."""
    wipe(ctx.engine, ctx.redis)
    for installation_id in (1, 2):  # both tenants exist, so the index answers for them
        writer_token(ctx, installation_id)
    oracle = Oracle()
    now = 1_800_000_000_000_000
    for op in operations:
        if op[0] == "ingest":
            now += 1
            ingest(ctx, op[1], now_us=now, chunk_size=5)
            oracle.ingest(op[1], now)
        elif op[0] == "delete":
            delete(ctx, op[1], op[2])
            oracle.delete(op[1], op[2])
        elif op[0] == "access":
            change(ctx, *op[1:])
            oracle.set_access(*op[1:])
        elif op[0] == "precompute":
            precompute_user(ctx, op[1], op[2], 1, ctx.mirror.token(op[1]), VIEWS)
        else:
            check(ctx, oracle, op[1])
    # Finally every user's common views, which may come from precomputed sets.
    for installation_id in (1, 2):
        for user_id in (1, 2, 3, 4):
            check(ctx, oracle, {"installation_id": installation_id, "user_id": user_id, "limit": 5})
            check(ctx, oracle, {"installation_id": installation_id, "user_id": user_id, "limit": 3,
                                      "types": ["email"], "statuses": ["open"]})
            check(ctx, oracle, {"installation_id": installation_id, "user_id": user_id, "limit": 4,
                                      "client_ids": [1, 2, 3, 4, 5, 6, 7], "sort": "updated_at",
                                      "date_from": DATES[1], "order": "asc"})
