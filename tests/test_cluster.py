"""The index on a real Redis Cluster: three masters with a replica each, on spare loopback
ports, started and stopped by the tests.  Installations land on different masters; the
index, the database and the oracle agree; a master killed during queries makes its
installations answer from the database, exactly, until its replica takes over."""
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings

from tests.cluster import LocalCluster
from tests.conftest import make_context, wipe
from tests.helpers import Oracle, assert_index_matches, query, record
from tests.replay import operations_st, replay
from worker import keys
from worker.access import change
from worker.ingest import delete, ingest
from worker.maintenance import rebuild, reconcile
from worker.precompute import precompute_user
from worker.redis_index import connect
from worker.settings import Settings, SettingsError

INSTALLATIONS = range(1, 7)


@pytest.fixture(scope="module")
def cluster():
    started = LocalCluster(masters=3, replicas=1).start()
    yield started
    started.stop()


@pytest.fixture
def on_cluster(engine, cluster):
    r = connect(cluster.url)
    wipe(engine, r)
    yield make_context(engine, r)
    r.close()


def test_a_cluster_url_selects_the_cluster_client_and_asks_for_celerys_own_urls(cluster):
    from redis.cluster import RedisCluster
    assert isinstance(connect(cluster.url), RedisCluster)
    with pytest.raises(SettingsError, match="CELERY_BROKER_URL and CELERY_RESULT_BACKEND"):
        Settings.from_env({"CRM_REDIS_URL": cluster.url})
    assert Settings.from_env({"CRM_REDIS_URL": cluster.url, "CELERY_BROKER_URL": "redis://h/1",
                              "CELERY_RESULT_BACKEND": "redis://h/2"}).redis_url == cluster.url


def test_installations_spread_over_the_masters_and_everything_works(on_cluster, cluster):
    ctx = on_cluster
    masters = {cluster.master_of(keys.ready(i)) for i in INSTALLATIONS}
    assert len(masters) >= 2  # the test means something only if installations are spread
    for i in INSTALLATIONS:
        change(ctx, i, 1, [1, 2], "set")
        ingest(ctx, [record(installation_id=i, source_id=f"m{n}", client_id=n % 3 + 1,
                            type=("email", "sms")[n % 2]) for n in range(30)])
        delete(ctx, i, ["m0"])
        assert precompute_user(ctx, i, 1, int(time.time()), ctx.mirror.token(i))["views"] == 2
        assert query(ctx, installation_id=i, user_id=1)["total"] == 19
        assert query(ctx, installation_id=i, user_id=1, types=["email"], statuses=["open"])["source"] == "precomputed"
    assert set(rebuild(ctx)["rebuilt"]) == {str(i) for i in INSTALLATIONS}
    report = reconcile(ctx)
    assert report["installations"] == 6 and report["meetings_repaired"] == report["access_repaired"] == 0
    for i in INSTALLATIONS:
        assert_index_matches(ctx.engine, ctx.redis, i)
    from worker.cli import status_report
    status = status_report(ctx)
    assert all(row["index"]["ready"] for row in status["installations"].values())
    assert status["redis_used_memory"] > 3 * 1_000_000  # three primaries, summed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=operations_st)
def test_index_database_and_oracle_agree_on_a_cluster(engine, cluster, operations):
    r = connect(cluster.url)
    try:
        replay(make_context(engine, r), operations)
    finally:
        r.close()


@pytest.mark.mysql  # writers racing past SQLite's one at a time within the tests' 2 s lock wait
def test_rebuilds_that_overtake_each_other_on_a_cluster(on_cluster):
    """Six rebuilds of one installation at once (an operator's racing the ones queries
    queued): each ends normally, the overtaken ones say so, the latest is published."""
    ctx = on_cluster
    change(ctx, 1, 1, [1, 2], "set")
    for start in range(0, 3000, 1000):
        ingest(ctx, [record(installation_id=1, source_id=f"m{n:04d}", client_id=n % 3 + 1)
                     for n in range(start, start + 1000)])
    results, errors = [], []

    def run():
        try:
            results.append(rebuild(make_context(ctx.engine, ctx.redis), 1)["rebuilt"]["1"])
        except Exception as exc:  # noqa: BLE001 (the test reports any failure below)
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert any(r["superseded"] for r in results) and not all(r["superseded"] for r in results)
    assert ctx.redis.get(keys.ready(1)) == ctx.redis.get(keys.generation(1))
    assert_index_matches(ctx.engine, ctx.redis, 1)
    assert query(ctx, installation_id=1, user_id=1)["total"] == 2000


def test_cached_answers_on_a_cluster(on_cluster, cluster):
    """Reports and thread pages are cached, served and made stale on a cluster as on one
    Redis, with installations on different masters; the beat's check of the noted reports
    (a pipeline of script calls) runs there too."""
    from worker import answer_cache, reports
    from worker.email import queries
    ctx = on_cluster
    chosen = {cluster.master_of(keys.ready(i)): i for i in INSTALLATIONS}
    assert len(chosen) >= 2
    for i in chosen.values():
        change(ctx, i, 1, [1, 2], "set")
        ingest(ctx, [record(installation_id=i, source_id=f"m{n}", client_id=n % 3 + 1) for n in range(30)])
        first = reports.report(ctx, i, 1, "activity")
        assert first["source"] == "rollup" and reports.report(ctx, i, 1, "activity")["source"] == "cache"
        page = queries.query_threads(ctx, i, 1)
        stored = set(ctx.redis.scan_iter(match=keys.answer_cache(i, 1, "*"), target_nodes="primaries"))
        assert len(stored) == 2 and queries.query_threads(ctx, i, 1) == page
        ingest(ctx, [record(installation_id=i, source_id="other", client_id=3)])  # not the user's
        assert reports.report(ctx, i, 1, "activity")["source"] == "cache"
        ingest(ctx, [record(installation_id=i, source_id="mine", client_id=1)])
        again = reports.report(ctx, i, 1, "activity")
        assert again["source"] == "rollup" and again["rows"] != first["rows"]
        ingest(ctx, [record(installation_id=i, source_id="mine-2", client_id=2)])
        counts = reports.precompute(ctx, i, ctx.mirror.token(i), int(time.time()), idle=3600, interval=120,
                                    deadline=time.monotonic() + 30)
        assert counts["computed"] == 1 and reports.report(ctx, i, 1, "activity")["source"] == "cache"
        assert answer_cache.read(ctx, i, 1, "nothing-stored", ctx.mirror.token(i))[0] is None


def test_a_master_killed_during_queries(on_cluster, cluster):
    """Queries of every installation keep answering, exactly, while a master dies: from the
    database while its slots have no master, from the index again once its replica took
    over."""
    ctx = on_cluster
    oracle = Oracle()
    for i in INSTALLATIONS:
        change(ctx, i, 1, [1, 2], "set")
        oracle.set_access(i, 1, [1, 2], "set")
        batch = [record(installation_id=i, source_id=f"m{n}", client_id=n % 3 + 1) for n in range(24)]
        ingest(ctx, batch)
        oracle.ingest(batch, 0)
    expected = {i: sum(1 for (inst, _), m in oracle.meetings.items() if inst == i and m["client_id"] in (1, 2))
                for i in INSTALLATIONS}
    victim = cluster.master_of(keys.ready(1))
    cluster.wait_replicated(victim)
    sources, failures, stop = [], [], threading.Event()

    def ask():
        while not stop.is_set():
            for i in INSTALLATIONS:
                try:
                    page = query(ctx, installation_id=i, user_id=1, limit=50)
                    if page["total"] != expected[i] or len(page["items"]) != expected[i]:
                        failures.append((i, page["total"], page["source"]))
                    if i == 1:
                        sources.append((time.monotonic(), page["source"]))
                except Exception as exc:  # any escape is a failure of the test
                    failures.append((i, repr(exc)))
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        cluster.kill(victim)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            recent = [s for t, s in sources if t > killed_at + 1]
            if "database" in {s for t, s in sources if t > killed_at} and recent and recent[-1] != "database":
                break
    finally:
        stop.set()
        asker.join()
    assert not failures, failures[:5]
    after = [s for t, s in sources if t > killed_at]
    assert "database" in after, "the dead master's installation never fell back to the database"
    if after[-1] not in ("index", "precomputed"):
        alive = next(p for p in cluster.ports if p != victim)
        nodes = redis.Redis(host="127.0.0.1", port=alive).execute_command("CLUSTER NODES")
        client = ctx.redis.nodes_manager.get_node_from_slot(ctx.redis.keyslot(keys.ready(1))).name
        pytest.fail(f"the index never answered again after the failover; killed {victim}, the client "
                    f"asks {client} for installation 1; the cluster says:\n{nodes}")

