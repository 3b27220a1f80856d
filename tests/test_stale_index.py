"""An index answers only for the database, and the generation of the installation, that it
mirrors: a new database on a used Redis, a database restored from an older dump, two
databases pointed at one Redis by mistake.  Each case runs through real worker processes
and is checked against an oracle of what each database holds."""
import copy
import subprocess
import time

import pytest
import sqlalchemy as sa

from tests.conftest import DATABASE_URL
from tests.deployments import Deployment
from tests.helpers import Oracle, assert_index_matches, call, record
from worker import keys

MYSQL = DATABASE_URL.rsplit("/", 1)[0]
pytestmark = pytest.mark.mysql  # second databases on the server, mysqldump and restore


def pages(send, installation_id, user_id, **filters):
    """Every item of a query, page by page through the cursors: (total, sources, source)."""
    first = send("crm.query_meetings", installation_id=installation_id, user_id=user_id, limit=7, **filters)
    found, page = [i["source_id"] for i in first["items"]], first
    while page["next_cursor"]:
        page = send("crm.query_meetings", installation_id=installation_id, user_id=user_id, limit=7,
                    cursor=page["next_cursor"], **filters)
        found += [i["source_id"] for i in page["items"]]
    assert len(found) == len(set(found)) == first["total"]
    return first["total"], sorted(found), first["source"]


FIELD = {"types": "type", "statuses": "status", "client_ids": "client_id"}


def expected(oracle, installation_id, user_id, **filters):
    allowed = oracle.access.get((installation_id, user_id), set())
    found = sorted(s for (i, s), m in oracle.meetings.items() if i == installation_id and m["client_id"] in allowed
                   and all(m[FIELD[f]] in v for f, v in filters.items()))
    return len(found), found


def wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def deployment(tmp_path):
    started = []

    def make(database_url, **env):
        d = Deployment(database_url, tmp_path / f"d{len(started)}", **env)
        started.append(d)
        return d
    yield make
    for d in started:
        d.stop()


def _load(send, oracle, installation_id, user_id, clients, meetings, prefix, updated="2024-01-01T00:00:00Z"):
    send("crm.set_user_clients", installation_id=installation_id, user_id=user_id, client_ids=clients)
    oracle.set_access(installation_id, user_id, clients, "set")
    records = [record(installation_id=installation_id, source_id=f"{prefix}{n}", client_id=clients[n % len(clients)],
                      type=("email", "sms")[n % 2], status=("open", "closed")[n // 2 % 2],
                      meeting_date=f"2024-02-{n % 28 + 1:02d}T10:00:00Z", updated_at=updated)
               for n in range(meetings)]
    assert send("crm.ingest_meetings", records=records)["accepted"] == meetings
    oracle.ingest(records, 0)


def test_a_new_database_on_a_used_redis_never_answers_with_the_old_index(worker_env, deployment, tmp_path):
    """The reproduction: user 99 of database A has clients 1-5; a new SQLite database is
    initialized and seeded on the same Redis database; user 99 does not exist there."""
    engine, r, webapp = worker_env
    a = Oracle()
    send_a = lambda name, **kw: call(webapp, name, **kw)  # noqa: E731
    _load(send_a, a, 1, 99, [1, 2, 3, 4, 5], 40, "a")
    call(webapp, "crm.precompute_user", installation_id=1, user_id=99)
    assert pages(send_a, 1, 99)[:2] == expected(a, 1, 99)
    cursor_a = call(webapp, "crm.query_meetings", installation_id=1, user_id=99, limit=5)["next_cursor"]

    b = deployment(f"sqlite:///{tmp_path / 'new.sqlite3'}", CRM_MIRROR_CHECK_MS="0")
    init = b.crm("init")
    assert init.returncode == 0, init.stderr
    b.start()
    oracle_b = Oracle()
    _load(b.call, oracle_b, 1, 7, [6, 7], 12, "b")
    for send, oracle in ((b.call, oracle_b), (send_a, a)):
        for user in (99, 7):
            assert pages(send, 1, user)[:2] == expected(oracle, 1, user)
            assert pages(send, 1, user, types=["email"], statuses=["open"])[:2] == \
                expected(oracle, 1, user, types=["email"], statuses=["open"])
    assert b.call("crm.precompute_user", installation_id=1, user_id=99)["entries"] == 0
    assert b.call("crm.query_meetings", installation_id=1, user_id=99)["total"] == 0
    # A's index was claimed away: A answers from its database, exactly.
    assert pages(send_a, 1, 99)[2] == "database"
    # A cursor of the other database does not continue anything here.
    with pytest.raises(ValueError, match="cursor"):
        b.call("crm.query_meetings", installation_id=1, user_id=99, limit=5, cursor=cursor_a)
    b_engine = sa.create_engine(b.database_url)
    assert_index_matches(b_engine, r, 1)
    b_engine.dispose()


def test_two_databases_pointed_at_one_redis_each_see_only_their_own(worker_env, deployment):
    engine, r, webapp = worker_env
    url_b = f"{MYSQL}/crm_test_b"
    subprocess.run(["mysql", "-h127.0.0.1", "-uroot", "-e", "DROP DATABASE IF EXISTS crm_test_b"], check=True)
    b = deployment(url_b, CRM_MIRROR_CHECK_MS="0")
    assert b.crm("init").returncode == 0
    b.start()
    send_a = lambda name, **kw: call(webapp, name, **kw)  # noqa: E731
    oracles = {"a": Oracle(), "b": Oracle()}
    sends = {"a": send_a, "b": b.call}
    # Interleaved, on the same installation, users and clients of both.
    for step in range(3):
        for name in ("a", "b"):
            _load(sends[name], oracles[name], 1, 10 + step, [step + 1, step + 4] if name == "a" else [step + 1],
                  6, f"{name}{step}-")
        sends["b"]("crm.revoke_clients", installation_id=1, user_id=10, client_ids=[1])
        oracles["b"].set_access(1, 10, [1], "revoke")
    for name in ("a", "b"):
        for user in (10, 11, 12, 13):
            assert pages(sends[name], 1, user)[:2] == expected(oracles[name], 1, user), (name, user)
    owner = r.get(keys.DATABASE)
    assert owner is not None  # one of them owns the index; the other answers from its database


def test_a_database_restored_from_an_older_dump_is_not_answered_by_the_newer_index(deployment, tmp_path, clean):
    ctx = clean
    r = ctx.redis
    name = "crm_test_restore"
    mysql = ["mysql", "-h127.0.0.1", "-uroot"]
    subprocess.run(mysql + ["-e", f"DROP DATABASE IF EXISTS {name}"], check=True)
    d = deployment(f"{MYSQL}/{name}", CRM_MIRROR_CHECK_MS="200")
    assert d.crm("init").returncode == 0
    d.start()
    then = Oracle()
    _load(d.call, then, 1, 5, [1], 10, "m")
    now = copy.deepcopy(then)
    d.call("crm.precompute_user", installation_id=1, user_id=5)
    dump = tmp_path / "dump.sql"
    with open(dump, "w") as f:
        subprocess.run(["mysqldump", "-h127.0.0.1", "-uroot", name], check=True, stdout=f)
    # After the dump: a grant, new meetings, and a meeting moved to the granted client.
    d.call("crm.grant_clients", installation_id=1, user_id=5, client_ids=[2])
    now.set_access(1, 5, [2], "grant")
    later = [record(source_id=f"n{n}", client_id=2, updated_at="2024-03-01T00:00:00Z") for n in range(5)]
    later.append(record(source_id="m0", client_id=2, updated_at="2024-03-01T00:00:00Z"))
    d.call("crm.ingest_meetings", records=later)
    now.ingest(later, 0)
    d.call("crm.set_user_clients", installation_id=1, user_id=6, client_ids=[2])
    now.set_access(1, 6, [2], "set")
    assert pages(d.call, 1, 5)[:2] == expected(now, 1, 5)
    assert pages(d.call, 1, 5, types=["email"], statuses=["open"])[:2] == \
        expected(now, 1, 5, types=["email"], statuses=["open"])
    # Restore the older dump while the worker keeps running.
    subprocess.run(mysql + ["-e", f"DROP DATABASE {name}; CREATE DATABASE {name}"], check=True)
    with open(dump) as f:
        subprocess.run(mysql + [name], check=True, stdin=f)
    time.sleep(0.3)  # CRM_MIRROR_CHECK_MS
    for user in (5, 6):
        for filters in ({}, {"types": ["email"], "statuses": ["open"]}):
            assert pages(d.call, 1, user, **filters)[:2] == expected(then, 1, user, **filters), (user, filters)
    # Rebuilt from the restored database, the index answers again, exactly.
    wait_for(lambda: d.call("crm.query_meetings", installation_id=1, user_id=5)["source"] != "database")
    assert pages(d.call, 1, 5)[:2] == expected(then, 1, 5)
    engine = sa.create_engine(f"{MYSQL}/{name}")
    assert_index_matches(engine, r, 1)
    engine.dispose()


def test_claiming_keeps_the_index_of_its_own_database(clean):
    """`crm init` run again on the same database changes nothing."""
    from worker.maintenance import claim_index
    from worker.ingest import ingest
    ctx = clean
    r = ctx.redis
    ingest(ctx, [record()])
    assert claim_index(ctx) == [] and r.get(keys.ready(1)) is not None
