"""The beat schedule, and nothing else.

Two beat processes may run by mistake: each entry sends ``once_per_tick=True`` and the
task claims its tick in Redis (:mod:`worker.ticks`), so a tick sent twice runs once.
"""
from __future__ import annotations

from datetime import timedelta


def entries(settings) -> dict:
    """The schedule for ``settings`` (intervals come from the environment)."""
    precompute = settings.precompute_interval
    reconcile = settings.reconcile_interval
    return {
        # Keeps the common views of recently active users ready and drops idle users'
        # sets; often enough that a user back from a break finds them warm.
        "precompute-active": {
            "task": "crm.precompute_active",
            "schedule": timedelta(seconds=precompute),
            "kwargs": {"once_per_tick": True},
            "options": {"queue": "precompute", "expires": precompute},
        },
        # Keeps the reports users asked for in the last hour computed, so a dashboard that
        # is open stays one Redis round trip away while data streams in.
        "precompute-reports": {
            "task": "crm.precompute_reports",
            "schedule": timedelta(seconds=settings.report_interval),
            "kwargs": {"once_per_tick": True},
            "options": {"queue": "reports", "expires": settings.report_interval},
        },
        # Reads the users' mailboxes: each due mailbox gets one sync run on queue "sync".
        "sync-mailboxes": {
            "task": "crm.sync_mailboxes",
            "schedule": timedelta(seconds=settings.sync_interval),
            "kwargs": {"once_per_tick": True},
            "options": {"queue": "sync", "expires": settings.sync_interval},
        },
        # Finds and repairs drift between the index and the database (a crash between a
        # commit and the index write, a flushed Redis); hourly bounds how long drift lives.
        "reconcile-index": {
            "task": "crm.reconcile_index",
            "schedule": timedelta(seconds=reconcile),
            "kwargs": {"once_per_tick": True},
            "options": {"queue": "maintenance", "expires": reconcile},
        },
    }
