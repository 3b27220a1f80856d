"""Precomputed per-user sets: built, kept fresh on every write, never stale after an
access change, evicted when idle or over budget; the beat schedule runs each tick once."""
import os
import subprocess
import sys
import threading
import time

import pytest
from freezegun import freeze_time

from tests.conftest import make_context
from tests.helpers import VIEWS, page_sources, query, record
from worker.context import Limits
from worker import keys
from worker.access import change
from worker.ingest import delete, ingest
from worker.precompute import BuildArgs, list_views, precompute_active, precompute_user, stats


@pytest.fixture
def user_with_meetings(clean):
    ctx = clean
    change(ctx, 1, 1, [1, 2, 3], "set")
    ingest(ctx, [record(source_id=f"m{c}-{n}", client_id=c, type=("email", "sms")[n % 2],
                              status=("open", "closed")[n % 3 == 0], meeting_date=f"2024-01-{n + 1:02d}T00:00:00Z")
                       for c in (1, 2, 3, 4) for n in range(12)])
    return ctx


def test_precompute_then_answers_come_from_the_sets(user_with_meetings):
    ctx = user_with_meetings
    built = precompute_user(ctx, 1, 1, 100, ctx.mirror.token(1), VIEWS)
    assert built == {"user_id": 1, "views": 2, "entries": 36 + 12, "ready": True}
    page = query(ctx, installation_id=1, user_id=1, types=["email"], statuses=["open"], limit=3)
    assert page["source"] == "precomputed" and page["total"] == 12
    # Shapes that are not views come from the index; the answer is the same either way.
    other = query(ctx, views=frozenset(), installation_id=1, user_id=1, types=["email"], statuses=["open"],
                  limit=3)
    assert other["source"] == "index" and page_sources(other) == page_sources(page)


def test_a_query_fills_its_view_for_next_time(user_with_meetings):
    ctx = user_with_meetings
    r = ctx.redis
    assert query(ctx, installation_id=1, user_id=1)["source"] == "index"
    assert query(ctx, installation_id=1, user_id=1)["source"] == "precomputed"
    assert stats(r, [1])["hits"] == 1 and stats(r, [1])["misses"] == 1


def test_writes_reach_every_affected_set_before_the_task_returns(user_with_meetings):
    ctx = user_with_meetings
    change(ctx, 1, 2, [1], "set")
    for user in (1, 2):
        precompute_user(ctx, 1, user, 100, ctx.mirror.token(1), VIEWS)
    ingest(ctx, [record(source_id="new", client_id=1, meeting_date="2025-01-01T00:00:00Z")])
    for user in (1, 2):
        page = query(ctx, installation_id=1, user_id=user, types=["email"], statuses=["open"], limit=1)
        assert page["source"] == "precomputed" and page_sources(page) == ["new"]
    # A status change moves it between views; a delete removes it everywhere.
    ingest(ctx, [record(source_id="new", client_id=1, status="closed", meeting_date="2025-01-01T00:00:00Z")])
    page = query(ctx, installation_id=1, user_id=2, types=["email"], statuses=["open"], limit=1)
    assert page_sources(page) != ["new"]
    assert page_sources(query(ctx, installation_id=1, user_id=2, limit=1)) == ["new"]
    delete(ctx, 1, ["new"])
    for user in (1, 2):
        assert "new" not in page_sources(query(ctx, installation_id=1, user_id=user, limit=200))


@pytest.mark.parametrize("sliced", [False, True], ids=["in-one-call", "in-slices"])
def test_revocations_racing_precomputation_never_leak(user_with_meetings, sliced):
    ctx = user_with_meetings
    r = ctx.redis
    if sliced:  # every view is built a few clients at a time
        ctx = make_context(ctx.engine, r, Limits(fill_inline=1, slice_clients=3))
    clients = list(range(1, 41))
    ingest(ctx, [record(source_id=f"r{c}", client_id=c) for c in clients])
    change(ctx, 1, 5, clients, "set")
    stop = threading.Event()

    def precompute_forever():
        while not stop.is_set():
            precompute_user(ctx, 1, 5, int(time.time()), ctx.mirror.token(1), VIEWS)

    threads = [threading.Thread(target=precompute_forever) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for c in clients:
            change(ctx, 1, 5, [c], "revoke")
            for shape in ({"limit": 200}, {"limit": 10}, {"types": ["email"], "statuses": ["open"], "limit": 200}):
                page = query(ctx, installation_id=1, user_id=5, **shape)
                leaked = {i["client_id"] for i in page["items"]} & set(range(1, c + 1))
                assert not leaked, f"revoked clients {leaked} seen from {page['source']}"
    finally:
        stop.set()
        for t in threads:
            t.join()
    for view in VIEWS:
        assert r.zcard(keys.view_set(1, 5, view)) == 0


def test_a_view_being_built_is_kept_fresh_but_not_served(user_with_meetings):
    """Between the slices of a build, writes reach the growing set; queries do not use it
    until it is complete; an access change cancels it."""
    ctx = user_with_meetings
    r = ctx.redis
    token = ctx.mirror.token(1)
    keys_ = [keys.user_clients(1, 1), keys.user_views(1, 1), keys.pairs(1), keys.view_set(1, 1, "d:*:*"),
             keys.ready(1)]

    def build(name, step, **args):
        return ctx.scripts["build"](keys=keys_, args=BuildArgs(
            prefix=keys.prefix(1), token=token, user=1, view="d:*:*", build=name, step=step, **args).argv())
    assert build("b:one", "begin") == 3
    assert build("b:one", "slice", first=1, count=1) > 0  # client 1 merged
    ingest(ctx, [record(source_id="during-3", client_id=3, meeting_date="2030-01-01T00:00:00Z"),
                 record(source_id="during-1", client_id=1, meeting_date="2030-01-02T00:00:00Z")])
    delete(ctx, 1, ["m1-0"])
    page = query(ctx, installation_id=1, user_id=1, limit=200)
    assert page["source"] == "index"  # not served half built
    assert build("b:one", "slice", first=2, count=2) > 0
    assert build("b:one", "end", now=100) == 36 + 1
    page = query(ctx, installation_id=1, user_id=1, limit=200)
    assert page["source"] == "precomputed" and page_sources(page)[:2] == ["during-1", "during-3"]
    assert "m1-0" not in page_sources(page)
    # An access change in the middle cancels a build.
    assert build("b:two", "begin") == 3
    change(ctx, 1, 1, [3], "revoke")
    assert build("b:two", "slice", first=1, count=5) == -1
    assert not r.exists(keys.view_set(1, 1, "d:*:*"))


def test_the_cached_first_page_follows_every_write(user_with_meetings):
    """The first page of a precomputed set is served from its cached head; any change to
    a meeting on it, or to the user's access, is seen at once."""
    ctx = user_with_meetings
    r = ctx.redis
    precompute_user(ctx, 1, 1, 100, ctx.mirror.token(1), VIEWS)
    first = query(ctx, installation_id=1, user_id=1, limit=3)
    assert first["source"] == "precomputed" and r.exists(keys.view_head(1, 1, "d:*:*"))
    top = first["items"][0]
    changed = record(source_id=top["source_id"], client_id=top["client_id"], type=top["type"],
                     status=top["status"], meeting_date=top["meeting_date"], subject="renamed")
    ingest(ctx, [changed])
    again = query(ctx, installation_id=1, user_id=1, limit=3)
    assert again["items"][0]["subject"] == "renamed" and again["total"] == first["total"]
    ascending = query(ctx, installation_id=1, user_id=1, limit=3, order="asc")
    assert ascending["items"] != again["items"] and ascending["source"] == "precomputed"
    change(ctx, 1, 1, [top["client_id"]], "revoke")
    after = query(ctx, installation_id=1, user_id=1, limit=20)
    assert top["client_id"] not in {i["client_id"] for i in after["items"]}


def test_the_head_script_answers_as_the_query_script_or_not_at_all(user_with_meetings):
    """head.lua, the warm path's short script, gives query.lua's answer, counts one hit
    per answer, and answers nothing it should not: a view being built, another token, a
    head that is gone."""
    from worker.query import call_script, parse
    ctx = user_with_meetings
    r = ctx.redis
    token = ctx.mirror.token(1)
    precompute_user(ctx, 1, 1, 100, token, VIEWS)
    q = parse({"installation_id": 1, "user_id": 1, "types": ["email"], "statuses": ["open"], "limit": 5},
              ctx.cursor_secret())
    view = "d:email:open"
    head = keys.view_head(1, 1, view)

    def hits():
        return int(r.hget(keys.stats(1), "hit") or 0)
    first = call_script(ctx, q, view, 6, 100, token)  # query.lua caches the head
    assert first[0] == b"precomputed:head" and r.exists(head)
    before = hits()
    assert call_script(ctx, q, view, 6, 100, token) == first
    assert hits() == before + 1
    # A view being built in slices is never served, head or not.
    used = r.hget(keys.user_views(1, 1), view)
    r.hset(keys.user_views(1, 1), view, "b:rebuild")
    assert call_script(ctx, q, view, 6, 100, token)[0] != b"precomputed:head"
    r.hset(keys.user_views(1, 1), view, used)
    # Another generation's token: not ready, whatever is cached.
    assert call_script(ctx, q, view, 6, 100, token + "x") == [b"notready"]
    # A deleted head is built again by query.lua, the same.
    r.delete(head)
    assert call_script(ctx, q, view, 6, 100, token) == first and r.exists(head)
    # A later page, or a page larger than the head, is not the head's to answer.
    assert call_script(ctx, q, view, 30, 100, token)[0] == b"precomputed"


def test_idle_users_lose_their_sets(user_with_meetings):
    ctx = user_with_meetings
    r = ctx.redis
    change(ctx, 1, 2, [1], "set")
    with freeze_time("2024-06-01 00:00:00"):
        query(ctx, installation_id=1, user_id=1)
    with freeze_time("2024-06-01 20:00:00"):
        query(ctx, installation_id=1, user_id=2)
    day = 86400
    now = int(time.mktime(time.strptime("2024-06-02 06:00:00", "%Y-%m-%d %H:%M:%S"))) - time.timezone
    report = precompute_active(ctx, {1: ctx.mirror.token(1)}, idle=day, budget=10**9, now=now)
    assert report["dropped_idle_views"] == 1 and report["refreshed_users"] == 1
    assert {(v.user_id, v.view) for v in list_views(r, 1)} == {(2, "d:*:*"), (2, "d:email:open")}


def test_budget_evicts_least_recently_used(user_with_meetings):
    ctx = user_with_meetings
    r = ctx.redis
    for user in (1, 2, 3):
        change(ctx, 1, user, [1, 2, 3], "set")
    for n, user in enumerate((1, 2, 3)):
        query(ctx, now=1000 + n, installation_id=1, user_id=user)  # fills d:*:*
    sizes = {v.user_id: v.size for v in list_views(r, 1)}
    budget = sizes[2] + sizes[3]
    one_view = make_context(ctx.engine, r, precompute_views=(("meeting_date", None, None),))
    report = precompute_active(one_view, {1: ctx.mirror.token(1)}, idle=10**6, budget=budget, now=2000)
    left = {v.user_id for v in list_views(r, 1)}
    assert report["evicted_views"] >= 1 and 1 not in left and 3 in left
    assert sum(v.size for v in list_views(r, 1)) <= budget


def test_beat_schedule_names_registered_tasks_and_expires():
    import beat_schedule
    from worker.app import app
    from worker.settings import Settings
    app.loader.import_default_modules()
    entries = beat_schedule.entries(Settings.from_env())
    assert entries
    for name, entry in entries.items():
        assert entry["task"] in app.tasks, name
        assert entry["options"]["expires"] > 0
        assert entry["kwargs"] == {"once_per_tick": True}
    assert app.conf.beat_schedule.keys() == entries.keys()


def test_tick_windows():
    from worker.ticks import tick_key
    assert tick_key("x", 300, 299) != tick_key("x", 300, 300) and tick_key("x", 300, 0) == tick_key("x", 300, 299)


def test_one_tick_runs_once_however_many_beats_send_it(clean):
    from tasks.precompute import precompute_active as task
    assert clean  # empty tables and keyspace
    with freeze_time("2024-06-01 00:00:10"):
        first, second = task.run(once_per_tick=True), task.run(once_per_tick=True)
    assert "skipped" not in first and second["skipped"] and first["tick"] == second["tick"]
    with freeze_time("2024-06-01 00:05:10"):
        assert "skipped" not in task.run(once_per_tick=True)
    # Called by hand (no once_per_tick), it always runs.
    with freeze_time("2024-06-01 00:05:11"):
        assert "skipped" not in task.run()


def test_two_beat_processes_one_run_per_tick(worker_env, tmp_path, monkeypatch):
    """Two real `celery beat` processes against one Redis and one worker, 5-second ticks
    (the shortest allowed), for long enough that each beat sends twice."""
    import json

    from worker import context
    engine, r, webapp = worker_env
    monkeypatch.setenv("CRM_PRECOMPUTE_INTERVAL", "5")  # the worker's context too
    context.reset()
    env = dict(os.environ, CRM_RECONCILE_INTERVAL="3600")
    beats = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "warning",
                               "-s", str(tmp_path / f"beat{n}")], env=env, cwd=os.getcwd(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in range(2)]
    try:
        time.sleep(16)
    finally:
        for b in beats:
            b.terminate()
        for b in beats:
            b.wait(10)
        time.sleep(2)  # let the worker finish what was sent
        monkeypatch.undo()
        context.reset()
    from tests.conftest import BACKEND_URL
    from worker.redis_index import connect
    backend = connect(BACKEND_URL)
    runs = {}
    for key in backend.scan_iter(match="celery-task-meta-*"):
        meta = json.loads(backend.get(key))
        if meta.get("name") == "crm.precompute_active" and meta["status"] == "SUCCESS" \
                and meta["result"].get("tick") is not None:
            result = meta["result"]
            runs.setdefault(result["tick"], []).append("skipped" not in result)
    assert sum(len(v) for v in runs.values()) >= 3 and len(runs) >= 2, f"the beats sent too little: {runs}"
    print("beat runs per tick:", runs)
    assert all(v.count(True) == 1 for v in runs.values()), f"a tick ran twice or never: {runs}"
