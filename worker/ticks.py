"""One run per schedule tick, however many beat processes sent it.

Each scheduled task claims ``crm:tick:<name>:<tick number>`` with SET NX before working;
a second beat's copy of the same tick finds the claim and returns at once.  This needs no
extra scheduler (celery-redbeat) and no lock that a dead beat could leave behind: the
claim expires with its tick.
"""
from __future__ import annotations

from worker import keys


def tick_number(interval: int, now: int) -> int:
    """Ticks are wall-clock windows of ``interval`` seconds, the same for every beat."""
    return now // interval


def tick_key(name: str, interval: int, now: int) -> str:
    return keys.tick(name, tick_number(interval, now))


def claim(r, name: str, interval: int, now: int) -> bool:
    """True for the first claim of the tick that ``now`` falls in."""
    return bool(r.set(tick_key(name, interval, now), 1, nx=True, ex=max(interval * 2, 60)))
