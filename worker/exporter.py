"""``crm exporter``: the service's own metrics for Prometheus, which Flower's cannot give:
who answered the queries (the index, a precomputed set, or the database because the
index was lost or not ready), whether each installation's index is ready for this
database, what reconcile repaired, what precomputed sets cost and how they are used, what
ingestion accepted and rejected, and which faults were retried.  It reads the counters
(worker/metrics.py) and computes the gauges on each scrape.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from worker import keys
from worker.errors import REDIS_FAULTS
from worker.mailbox.accounts import STATES, overview
from worker.maintenance import installation_ids
from worker.precompute import list_views


class Collector:
    """A prometheus_client collector that reads the service's state on each scrape."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        ctx, r = self.ctx, self.ctx.redis
        reachable = GaugeMetricFamily("crm_index_reachable", "1 when the index Redis answers")
        ready = GaugeMetricFamily("crm_index_ready", "1 when the installation's index is ready for this "
                                  "database's token (else queries answer from the database)", labels=["installation"])
        answers = CounterMetricFamily("crm_query_answers", "Query answers by who answered them",
                                      labels=["installation", "source"])
        hits = CounterMetricFamily("crm_precomputed_lookups", "Queries of a precomputable shape, by whether the "
                                   "user's precomputed set answered", labels=["installation", "result"])
        views = GaugeMetricFamily("crm_precomputed_views", "Precomputed sets held", labels=["installation"])
        size = GaugeMetricFamily("crm_precomputed_bytes", "Bytes the precomputed sets take", labels=["installation"])
        globals_ = {}
        try:
            ids = installation_ids(ctx.engine)
            for i in ids:
                token = ctx.mirror.token(i)
                current = r.get(keys.ready(i))
                ready.add_metric([str(i)], float(token is not None and current is not None
                                                 and current.decode() == token))
                stats = {k.decode(): int(v) for k, v in r.hgetall(keys.stats(i)).items()}
                answers.add_metric([str(i), "precomputed"], stats.get("hit", 0))
                for source in ("index", "database"):
                    answers.add_metric([str(i), source], stats.get(f"answer:{source}", 0))
                hits.add_metric([str(i), "hit"], stats.get("hit", 0))
                hits.add_metric([str(i), "miss"], stats.get("miss", 0))
                infos = list_views(r, i)
                views.add_metric([str(i)], len(infos))
                size.add_metric([str(i)], sum(info.size for info in infos))
            globals_ = {k.decode(): float(v) for k, v in r.hgetall(keys.METRICS).items()}
            reachable.add_metric([], 1)
        except REDIS_FAULTS:
            reachable.add_metric([], 0)
        yield from (reachable, ready, answers, hits, views, size)
        yield from _global_families(globals_)
        yield from _mailbox_families(ctx.engine, int(time.time()))


#: Global counters: (metric, help, label, field prefix).
GLOBAL = (
    ("crm_ingest_records", "Records of crm.ingest_meetings by outcome", "outcome", "ingest:"),
    ("crm_task_retries", "Tasks retried for a transient fault, by cause", "cause", "retry:"),
    ("crm_reconcile_repairs", "What crm.reconcile_index found and repaired, by kind", "kind", "repair:"),
    ("crm_precompute_dropped_views", "Precomputed sets dropped by crm.precompute_active, by reason", "reason",
     "drop:"),
    ("crm_index_rebuilds", "Rebuilds of an installation's index, by cause", "cause", "rebuild:"),
    ("crm_sync_messages", "Messages of mailbox sync runs, by outcome (fetched from the server, stored, "
     "rejected)", "outcome", "sync_messages:"),
    ("crm_sync_runs", "Mailbox sync runs, by how they ended", "outcome", "sync_runs:"),
)


def _mailbox_families(engine, now: int):
    """Per mailbox: its state (1 for the state it is in), the seconds since its last
    successful sync, and the messages left to fetch."""
    state = GaugeMetricFamily("crm_mailbox_state", "1 for the state the mailbox's sync is in",
                              labels=["installation", "user", "state"])
    lag = GaugeMetricFamily("crm_mailbox_lag_seconds", "Seconds since the mailbox's last successful sync run",
                            labels=["installation", "user"])
    backlog = GaugeMetricFamily("crm_mailbox_backlog", "Messages on the server not fetched yet",
                                labels=["installation", "user"])
    for m in overview(engine, now):
        ids = [str(m["installation_id"]), str(m["user_id"])]
        for name in STATES:
            state.add_metric(ids + [name], float(m["state"] == name))
        lag.add_metric(ids, m["lag_s"])
        backlog.add_metric(ids, m["backlog"])
    yield from (state, lag, backlog)


def _global_families(values: dict):
    for name, text, label, prefix in GLOBAL:
        family = CounterMetricFamily(name, text, labels=[label])
        for field, value in sorted(values.items()):
            if field.startswith(prefix):
                family.add_metric([field[len(prefix):]], value)
        yield family
    last = GaugeMetricFamily("crm_reconcile_last_run_timestamp_seconds", "When crm.reconcile_index last finished")
    last.add_metric([], values.get("reconcile:last_run", 0))
    yield last


def serve(ctx, address: str, port: int) -> None:
    """Serve /metrics until interrupted."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(ctx))
    start_http_server(port, addr=address, registry=registry)
    while True:
        time.sleep(3600)
