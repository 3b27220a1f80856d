"""The service's own metrics, as Prometheus scrapes them from `crm exporter`."""
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_context
from tests.helpers import query, record
from worker import keys
from worker.access import change
from worker.ingest import ingest
from worker.maintenance import reconcile
from worker.exporter import Collector
from worker.precompute import precompute_user


def scrape(ctx) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(ctx))
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_tell_who_answered_and_what_was_repaired(clean):
    ctx = clean
    r = ctx.redis
    change(ctx, 1, 1, [1, 2], "set")
    ingest(ctx, [record(source_id=f"m{n}", client_id=n % 2 + 1) for n in range(10)] + [record(source_id="")])
    query(ctx, installation_id=1, user_id=1, client_ids=[1])                          # index
    precompute_user(ctx, 1, 1, 1, ctx.mirror.token(1))
    query(ctx, installation_id=1, user_id=1, types=["email"], statuses=["open"])      # precomputed
    r.delete(keys.ready(1))
    query(ctx, installation_id=1, user_id=1)                                          # database
    got = scrape(ctx)
    assert got[("crm_index_ready", (("installation", "1"),))] == 0
    assert got[("crm_index_reachable", ())] == 1
    for source in ("index", "precomputed", "database"):
        assert got[("crm_query_answers_total", (("installation", "1"), ("source", source)))] == 1, source
    assert got[("crm_ingest_records_total", (("outcome", "accepted"),))] == 10
    assert got[("crm_ingest_records_total", (("outcome", "rejected"),))] == 1
    assert got[("crm_precomputed_views", (("installation", "1"),))] == 2
    assert got[("crm_precomputed_bytes", (("installation", "1"),))] > 0
    # Reconcile rebuilds the index that is not ready, then repairs drift, and says so.
    reconcile(ctx)
    r.hdel(keys.payloads(1), r.hkeys(keys.payloads(1))[0])
    reconcile(ctx)
    got = scrape(ctx)
    assert got[("crm_index_ready", (("installation", "1"),))] == 1
    assert got[("crm_index_rebuilds_total", (("cause", "not_ready"),))] == 1
    assert got[("crm_reconcile_repairs_total", (("kind", "meetings_repaired"),))] == 1
    assert got[("crm_reconcile_last_run_timestamp_seconds", ())] > 0


def test_an_unreachable_index_is_a_metric_not_an_error(clean):
    dead = make_context(clean.engine, redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    change(clean, 1, 1, [1], "set")
    assert scrape(dead)[("crm_index_reachable", ())] == 0
