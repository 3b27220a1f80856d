"""Through a real worker, by task name, with JSON, as a web app holding no project code
would: results through the result backend, errors through ``result.get()``."""
import pytest

from tests.helpers import TIMEOUT, assert_index_matches, call, record


def test_registered_task_names_snapshot():
    """Renaming a task strands messages already queued: this list changes only on purpose."""
    from worker.app import app
    app.loader.import_default_modules()  # what a worker imports at start
    names = sorted(n for n in app.tasks if n.startswith("crm."))
    assert names == [
        "crm.delete_meetings", "crm.get_thread", "crm.grant_clients", "crm.ingest_emails", "crm.ingest_meetings",
        "crm.mailbox_status", "crm.noop", "crm.precompute_active", "crm.precompute_reports", "crm.precompute_user",
        "crm.query_meetings", "crm.query_threads", "crm.rebuild_index", "crm.reconcile_index", "crm.report",
        "crm.revoke_clients", "crm.search_contacts", "crm.set_mailbox_token", "crm.set_user_clients",
        "crm.sync_mailbox", "crm.sync_mailboxes", "crm.upsert_clients", "crm.upsert_contacts",
        "crm.upsert_mailboxes", "crm.upsert_users",
    ]


def test_every_task_has_a_route_to_a_declared_queue():
    from worker.app import QUEUES, ROUTES, app
    app.loader.import_default_modules()
    for name in (n for n in app.tasks if n.startswith("crm.")):
        assert ROUTES[name] in QUEUES
    assert app.conf.task_routes["crm.query_meetings"] == {"queue": "query"}
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.broker_transport_options["visibility_timeout"] == 30  # CRM_VISIBILITY_TIMEOUT in tests
    # A finished task whose result store hits a dropped connection retries the store.
    assert app.conf.result_backend_always_retry and app.conf.result_backend_max_retries >= 10


def test_queues_have_the_exchange_and_key_a_client_publishes_to(webapp):
    """A client with no project code sends to queue "ingest" through exchange "ingest" with
    routing key "ingest"; a worker started with -Q must bind exactly that."""
    from worker.app import QUEUES, app
    for name in QUEUES:
        ours, theirs = app.amqp.queues[name], webapp.amqp.queues[name]
        assert (ours.exchange.name, ours.routing_key) == (theirs.exchange.name, theirs.routing_key) == (name, name)


def test_web_app_round_trip(worker_env):
    engine, r, webapp = worker_env
    result = call(webapp, "crm.ingest_meetings", records=[
        record(source_id="a", client_id=1), record(source_id="b", client_id=2, type="sms"),
        record(source_id="c", client_id=3, subject="x" * 999)])
    assert result["accepted"] == 2 and result["rejected"][0]["index"] == 2
    assert call(webapp, "crm.set_user_clients", installation_id=1, user_id=7, client_ids=[1, 2]) == \
        {"user_id": 7, "clients": 2}
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=7, limit=1)
    assert page["total"] == 2 and len(page["items"]) == 1 and page["next_cursor"]
    rest = call(webapp, "crm.query_meetings", installation_id=1, user_id=7, limit=1, cursor=page["next_cursor"])
    assert rest["next_cursor"] is None
    assert {page["items"][0]["source_id"], rest["items"][0]["source_id"]} == {"a", "b"}
    # An update, then a revocation, then a delete: each visible when the task returns.
    call(webapp, "crm.ingest_meetings", records=[record(source_id="a", client_id=1, status="closed")])
    assert call(webapp, "crm.query_meetings", installation_id=1, user_id=7, statuses=["closed"])["total"] == 1
    assert call(webapp, "crm.revoke_clients", installation_id=1, user_id=7, client_ids=[2]) == \
        {"user_id": 7, "clients": 1}
    assert [i["source_id"] for i in call(webapp, "crm.query_meetings", installation_id=1, user_id=7)["items"]] == ["a"]
    assert call(webapp, "crm.grant_clients", installation_id=1, user_id=7, client_ids=[3]) == \
        {"user_id": 7, "clients": 2}
    assert call(webapp, "crm.delete_meetings", installation_id=1, source_ids=["a"]) == {"deleted": 1}
    assert call(webapp, "crm.query_meetings", installation_id=1, user_id=7)["total"] == 0
    assert_index_matches(engine, r)


@pytest.mark.parametrize("name,kwargs,message", [
    ("crm.query_meetings", {"installation_id": 1, "user_id": 1, "limit": 500}, "limit: must be between 1 and 200"),
    ("crm.query_meetings", {"installation_id": 1, "user_id": 1, "sort": "details"}, "sort: must be one of"),
    ("crm.query_meetings", {"installation_id": 1, "user_id": 1, "cursor": "forged"}, "cursor: "),
    ("crm.ingest_meetings", {"records": "nope"}, "records: must be a list"),
    ("crm.set_user_clients", {"installation_id": 1, "user_id": 1, "client_ids": ["x"]}, "client_ids[]: must be"),
    ("crm.query_meetings", {"installation_id": 1}, "user_id"),
])
def test_errors_reach_the_caller_and_are_not_retried(worker_env, name, kwargs, message):
    _, _, webapp = worker_env
    from worker.app import ROUTES
    async_result = webapp.send_task(name, kwargs=kwargs, queue=ROUTES[name])
    with pytest.raises(Exception) as info:
        async_result.get(timeout=TIMEOUT)
    assert message in str(info.value)
    assert async_result.state == "FAILURE"
    assert (async_result.info is not None) and async_result.result is not None
    # Failed at once: the worker did not schedule a retry.
    assert webapp.backend.get_task_meta(async_result.id).get("retries", 0) == 0
    # And the worker still serves.
    assert call(webapp, "crm.query_meetings", installation_id=1, user_id=1)["total"] == 0


def test_precompute_and_queries_through_the_worker(worker_env):
    _, _, webapp = worker_env
    call(webapp, "crm.set_user_clients", installation_id=1, user_id=2, client_ids=[1])
    call(webapp, "crm.ingest_meetings", records=[record(source_id=f"m{n}", meeting_date=f"2024-01-0{n + 1}T00:00:00Z")
                                                 for n in range(3)])
    built = call(webapp, "crm.precompute_user", installation_id=1, user_id=2)
    assert built["views"] == 2 and built["entries"] == 6
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=2, types=["email"], statuses=["open"])
    assert page["source"] == "precomputed" and page["total"] == 3
    call(webapp, "crm.ingest_meetings", records=[record(source_id="late", meeting_date="2024-02-01T00:00:00Z")])
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=2, types=["email"], statuses=["open"])
    assert page["source"] == "precomputed" and page["items"][0]["source_id"] == "late"
    assert "refreshed_users" in call(webapp, "crm.precompute_active")


def test_flushed_index_answers_from_the_database_and_is_rebuilt(worker_env):
    engine, r, webapp = worker_env
    call(webapp, "crm.set_user_clients", installation_id=1, user_id=2, client_ids=[1])
    call(webapp, "crm.ingest_meetings", records=[record(source_id="m1")])
    r.flushdb()
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=2)
    assert page["source"] == "database" and page["total"] == 1
    # The query queued a rebuild; once it ran, the index answers again.
    import time
    deadline = time.monotonic() + TIMEOUT
    while not r.exists("{i:1}:ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    page = call(webapp, "crm.query_meetings", installation_id=1, user_id=2)
    assert page["source"] in ("index", "precomputed") and page["total"] == 1
    assert_index_matches(engine, r)


def test_maintenance_tasks(worker_env):
    engine, r, webapp = worker_env
    call(webapp, "crm.ingest_meetings", records=[record(source_id="m1")])
    assert call(webapp, "crm.rebuild_index", installation_id=1)["rebuilt"]["1"]["meetings"] == 1
    r.hdel("{i:1}:m", (r.hkeys("{i:1}:m"))[0])  # drift: a payload lost
    report = call(webapp, "crm.reconcile_index")
    assert report["meetings_repaired"] == 1
    assert_index_matches(engine, r)


@pytest.mark.mysql  # row locks and their timeouts: SQLite locks the whole file
def test_a_transient_fault_outlasting_the_in_place_retries_is_retried_by_the_task(worker_env):
    """A row lock held longer than the chunk's own four tries (2 s lock waits in tests):
    the task is retried by Celery with backoff, and the update lands once the lock goes."""
    import threading
    import time

    import sqlalchemy as sa

    from worker.tables import meetings
    engine, r, webapp = worker_env
    call(webapp, "crm.ingest_meetings", records=[record(subject="v1", updated_at="2024-01-01T00:00:00Z")])
    locked, release = threading.Event(), threading.Event()

    def hold():
        with engine.begin() as conn:
            conn.execute(sa.select(meetings.c.id).where(meetings.c.installation_id == 1,
                                                        meetings.c.source_id == "m1").with_for_update())
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait(5)
    try:
        pending = webapp.send_task("crm.ingest_meetings", queue="ingest", kwargs={"records": [
            record(subject="v2", updated_at="2024-01-02T00:00:00Z")]})
        time.sleep(10)  # past the in-place tries: the task has gone back to the broker
        assert not pending.ready()
    finally:
        release.set()
        holder.join()
    assert pending.get(timeout=60)["updated"] == 1
    assert_index_matches(engine, r)
    assert webapp.backend.get_task_meta(pending.id)["retries"] >= 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(meetings.c.subject).where(meetings.c.source_id == "m1")).scalar() == "v2"
