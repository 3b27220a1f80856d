"""The service's counters: who answered the queries, what reconcile repaired, what
ingestion accepted and rejected, which faults were retried, why indexes were rebuilt.

Counters live in Redis, so that every worker process (and container) adds to the same
ones at no cost to the warm path: query.lua counts hits and misses in the installation's
stats hash (answers from a precomputed set are its hits), the other paths add to the
global hash ``crm:metrics``.  Counting never fails a task: a Redis that cannot be reached
is what ``crm_index_reachable`` reports.  The exporter (worker/exporter.py) reads them.
"""
from __future__ import annotations

import logging

from worker import keys
from worker.errors import REDIS_FAULTS

log = logging.getLogger(__name__)


def count(r, counts: dict) -> None:
    """Add ``counts`` (field -> n) to the global counters; best effort."""
    counts = {field: n for field, n in counts.items() if n}
    if not counts:
        return
    try:
        pipe = r.pipeline(transaction=False)
        for field, n in counts.items():
            pipe.hincrby(keys.METRICS, field, n)
        pipe.execute()
    except REDIS_FAULTS as exc:
        log.debug("metrics not counted: %s", exc.__class__.__name__)


def count_answer(r, installation_id: int, source: str) -> None:
    """An answer from the index or the database (precomputed ones are query.lua's hits)."""
    try:
        r.hincrby(keys.stats(installation_id), f"answer:{source}", 1)
    except REDIS_FAULTS as exc:
        log.debug("metrics not counted: %s", exc.__class__.__name__)
