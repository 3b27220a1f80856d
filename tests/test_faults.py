"""Faults a real deployment meets: writers racing a rebuild, tasks delivered more than
once, hostile arguments, dates at the edge of the calendar."""
import json
import threading

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import TIMEOUT, assert_index_matches, call, query, record
from worker.access import change
from worker.tables import meetings, user_clients
from worker.ingest import delete, ingest
from worker.maintenance import rebuild


def _sources(engine):
    with engine.connect() as conn:
        return set(conn.execute(sa.select(meetings.c.source_id)).scalars())


@pytest.mark.mysql  # writers racing past SQLite's one at a time within the tests' 2 s lock wait
@pytest.mark.parametrize("rounds", [3])
def test_deletes_racing_a_rebuild_never_come_back(clean, rounds):
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    change(ctx, 1, 1, list(range(1, 21)), "set")
    for round_ in range(rounds):
        batch = [record(source_id=f"r{round_}-{n}", client_id=n % 20 + 1) for n in range(2500)]
        for start in range(0, len(batch), 1000):
            ingest(ctx, batch[start:start + 1000])
        doomed = [f"r{round_}-{n}" for n in range(0, 2500, 3)]
        done = threading.Event()

        def deleter():
            for start in range(0, len(doomed), 25):
                delete(ctx, 1, doomed[start:start + 25])
            done.set()
        worker = threading.Thread(target=deleter)
        worker.start()
        while not done.is_set():
            rebuild(ctx, 1)
        worker.join()
        assert not set(doomed) & _sources(engine)
        assert_index_matches(engine, r)
        seen = {i["source_id"] for i in query(ctx, installation_id=1, user_id=1, limit=200)["items"]}
        assert not seen & set(doomed)


def test_ingest_racing_deletes_of_the_same_meetings(clean):
    """A delete that lands between an ingest's commit and its index write must win."""
    ctx = clean
    engine, r = ctx.engine, ctx.redis
    change(ctx, 1, 1, [1], "set")
    stop = threading.Event()

    def deleter():
        while not stop.is_set():
            with engine.connect() as conn:
                present = list(conn.execute(sa.select(meetings.c.source_id).limit(50)).scalars())
            if present:
                delete(ctx, 1, present)
    worker = threading.Thread(target=deleter)
    worker.start()
    try:
        for n in range(30):
            ingest(ctx, [record(source_id=f"x{n}-{k}") for k in range(40)])
    finally:
        stop.set()
        worker.join()
    assert_index_matches(engine, r)


def _redeliver(webapp, name, kwargs, task_id):
    """Deliver a task again under the same id, as the broker does after a lost ack."""
    from worker.app import ROUTES
    webapp.AsyncResult(task_id).forget()
    return webapp.send_task(name, kwargs=kwargs, queue=ROUTES[name], task_id=task_id).get(timeout=TIMEOUT)


def test_a_grant_delivered_again_after_a_revoke_changes_nothing(worker_env):
    engine, r, webapp = worker_env
    call(webapp, "crm.ingest_meetings", records=[record(source_id="a", client_id=1), record(source_id="b", client_id=2)])
    call(webapp, "crm.set_user_clients", installation_id=1, user_id=3, client_ids=[1])
    grant = {"installation_id": 1, "user_id": 3, "client_ids": [2]}
    first = webapp.send_task("crm.grant_clients", kwargs=grant, queue="ingest", task_id="grant-1").get(timeout=TIMEOUT)
    assert first == {"user_id": 3, "clients": 2}
    assert call(webapp, "crm.revoke_clients", installation_id=1, user_id=3, client_ids=[2])["clients"] == 1
    assert _redeliver(webapp, "crm.grant_clients", grant, "grant-1") == first  # the same answer
    assert call(webapp, "crm.query_meetings", installation_id=1, user_id=3)["total"] == 1
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(user_clients.c.client_id).where(user_clients.c.user_id == 3)).scalars()) \
            == {1}
    assert_index_matches(engine, r)


def test_an_ingest_delivered_again_after_a_delete_does_not_bring_it_back(worker_env):
    engine, r, webapp = worker_env
    call(webapp, "crm.set_user_clients", installation_id=1, user_id=3, client_ids=[1])
    batch = {"records": [record(source_id="a"), record(source_id="b")]}
    first = webapp.send_task("crm.ingest_meetings", kwargs=batch, queue="ingest", task_id="ingest-1").get(
        timeout=TIMEOUT)
    assert call(webapp, "crm.delete_meetings", installation_id=1, source_ids=["a"]) == {"deleted": 1}
    assert _redeliver(webapp, "crm.ingest_meetings", batch, "ingest-1") == first
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=3)
    assert [i["source_id"] for i in page["items"]] == ["b"] and _sources(engine) == {"b"}
    # A delete delivered again after a later ingest brought the meeting back: it stays.
    delete_once = {"installation_id": 1, "source_ids": ["b"]}
    assert webapp.send_task("crm.delete_meetings", kwargs=delete_once, queue="ingest", task_id="delete-1").get(
        timeout=TIMEOUT) == {"deleted": 1}
    call(webapp, "crm.ingest_meetings", records=[record(source_id="b", subject="back")])
    assert _redeliver(webapp, "crm.delete_meetings", delete_once, "delete-1") == {"deleted": 1}
    assert _sources(engine) == {"b"}
    assert_index_matches(engine, r)


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59"])
def test_a_date_outside_the_calendar_rejects_its_record_only(clean, value):
    ctx = clean
    for field in ("meeting_date", "updated_at"):
        result = ingest(ctx, [record(source_id="ok"), record(source_id="bad", **{field: value})])
        assert result["accepted"] == 1 and result["rejected"][0]["error"].startswith(f"{field}:")
    for field in ("date_from", "date_to"):
        with pytest.raises(ValueError, match=f"^{field}:"):
            query(ctx, installation_id=1, user_id=1, **{field: value})


HOSTILE = [
    ({"installation_id": "1\x00", "user_id": 1}, "installation_id"),
    ({"installation_id": 1, "user_id": 1, "client_ids": [[[[[1]]]]]}, "client_ids"),
    ({"installation_id": 1, "user_id": 1, "statuses": 7}, "statuses"),
    ({"installation_id": 1, "user_id": 1, "offset": 1e-05}, "offset"),
    ({"installation_id": 1, "user_id": 1, "date_from": "0001-01-01T00:00:00+01:00"}, "date_from"),
    ({"installation_id": 1, "user_id": 1, "surprise": True}, "surprise"),
    ({"installation_id": 1}, "user_id"),
]


@pytest.mark.parametrize("kwargs,field", HOSTILE)
def test_hostile_query_arguments_fail_field_first_as_a_value_error(worker_env, kwargs, field):
    """What a client holding no project code sees: a ValueError (stored as
    builtins.ValueError) whose message starts with the field; the worker goes on."""
    _, _, webapp = worker_env
    sent = webapp.send_task("crm.query_meetings", kwargs=kwargs, queue="query")
    with pytest.raises(ValueError, match=f"^{field}"):
        sent.get(timeout=TIMEOUT)
    from tests.conftest import BACKEND_URL
    from worker.redis_index import connect
    stored = json.loads(connect(BACKEND_URL).get(f"celery-task-meta-{sent.id}"))["result"]
    assert (stored["exc_module"], stored["exc_type"]) == ("builtins", "ValueError")
    assert call(webapp, "crm.noop") is None


def test_a_worker_log_carries_outcomes_not_payloads(tmp_path):
    """A real worker process at INFO, as `crm run` starts it."""
    from tests.deployments import Deployment
    d = Deployment(f"sqlite:///{tmp_path / 'logs.sqlite3'}", tmp_path)
    try:
        assert d.crm("init").returncode == 0
        d.start()
        d.call("crm.set_user_clients", installation_id=1, user_id=3, client_ids=[1])
        d.call("crm.ingest_meetings", records=[record(source_id="secret-source", subject="Secret subject")])
        assert d.call("crm.query_meetings", installation_id=1, user_id=3)["total"] == 1
        with pytest.raises(ValueError, match="^limit"):
            d.call("crm.query_meetings", installation_id=1, user_id=3, limit=777)
    finally:
        d.stop()
    text = (tmp_path / "worker.log").read_text()
    assert "crm.query_meetings" in text and "succeeded in" in text
    # (the value of a bad argument: "777" alone could be part of a run time)
    assert "Secret subject" not in text and "secret-source" not in text and "got 777" not in text
    rejected = [line for line in text.splitlines() if "rejected: invalid argument limit" in line]
    assert len(rejected) == 1 and "INFO" in rejected[0]
    assert "Traceback" not in text and "ERROR" not in text


def test_a_callers_mistake_stays_out_of_a_warnings_only_log():
    """`crm run` logs warnings and errors: a caller's mistake, which Celery logs as an
    error, is an INFO line, so there it is not shown at all."""
    import io
    import logging

    from worker.logs import CALLER_MISTAKE, NoPayloads
    stream = io.StringIO()
    logger = logging.getLogger("crm.test.trace")
    logger.propagate, handler = False, logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(NoPayloads())
    mistake = ValueError("limit: must be between 1 and 500, got 777")
    setattr(mistake, CALLER_MISTAKE, True)
    args = {"name": "crm.query_meetings", "id": "t1", "exc": "ValueError('limit…')", "description": "raised"}
    try:
        for level, shown in ((logging.WARNING, ""),
                             (logging.INFO, "Task crm.query_meetings[t1] rejected: invalid argument limit\n")):
            logger.setLevel(level)
            logger.error("Task %(name)s[%(id)s] %(description)s: %(exc)s", args,
                         exc_info=(ValueError, mistake, None))
            assert stream.getvalue() == shown
            stream.seek(0), stream.truncate()
    finally:
        logger.removeHandler(handler)


# -- every task's arguments, fuzzed ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.sampled_from(["1\x00", "", "email", "2024-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=12)

TASKS = {
    "crm.ingest_meetings": ["records"],
    "crm.delete_meetings": ["installation_id", "source_ids"],
    "crm.set_user_clients": ["installation_id", "user_id", "client_ids"],
    "crm.grant_clients": ["installation_id", "user_id", "client_ids"],
    "crm.revoke_clients": ["installation_id", "user_id", "client_ids"],
    "crm.query_meetings": ["installation_id", "user_id", "types", "statuses", "client_ids", "date_from", "date_to",
                           "sort", "order", "offset", "limit", "cursor"],
    "crm.precompute_user": ["installation_id", "user_id"],
    "crm.rebuild_index": ["installation_id"],
    "crm.reconcile_index": ["installation_id"],
    "crm.upsert_mailboxes": ["installation_id", "mailboxes"],
    "crm.set_mailbox_token": ["installation_id", "user_id", "oauth2_access_token"],
    "crm.mailbox_status": ["installation_id", "user_id"],
    "crm.sync_mailbox": ["installation_id", "user_id"],
}


def _counts(engine):
    with engine.connect() as conn:
        return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in (meetings, user_clients)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_ends_in_a_result_or_a_field_first_error(clean, name, data):
    """Hostile JSON for every argument: the task returns, or raises InvalidArgument naming
    a field; nothing is written by a call that fails."""
    from worker.app import app
    from worker.errors import InvalidArgument
    ctx = clean
    engine = ctx.engine
    app.loader.import_default_modules()
    task = app.tasks[name]
    names = TASKS[name]
    kwargs = data.draw(st.dictionaries(st.sampled_from(names + ["bogus"]), json_values, max_size=len(names) + 1))
    if data.draw(st.booleans()):  # often well-formed ids, so that deeper checks are reached
        kwargs.update({k: 1 for k in ("installation_id", "user_id") if k in names})
    before = _counts(engine)
    try:
        task(**kwargs)
    except InvalidArgument as exc:
        assert str(exc).split(":", 1)[0].split("[")[0] in names + ["bogus", "record", "arguments"] or \
            str(exc).split(":", 1)[0] in {f for f in ("installation_id", "source_id", "client_id", "type", "status",
                                                      "meeting_date", "subject", "details", "updated_at")}, str(exc)
        assert _counts(engine) == before
