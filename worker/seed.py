"""A deterministic synthetic CRM, ingested through the same code as ``crm.ingest_meetings``."""
from __future__ import annotations

import dataclasses
import random
import sys
import time

import sqlalchemy as sa

from worker.access import change
from worker.tables import crm_meta, installations
from worker.ingest import ingest
from worker.records import iso_micros, iso_seconds

TYPES = (("email", 40), ("sms", 30), ("call", 20), ("video", 10))
STATUSES = (("open", 30), ("closed", 70))
START = 1_609_459_200  # 2021-01-01T00:00:00Z
SPAN = 3 * 365 * 86400  # dates over three years


@dataclasses.dataclass(frozen=True)
class Shape:
    installations: int = 1
    clients: int = 5000
    users: int = 2000
    meetings: int = 500_000
    seed: int = 42
    details_bytes: int = 100  # about this much JSON in each meeting's details


def _pick(rng: random.Random, weighted) -> str:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def meetings(shape: Shape, installation_id: int):
    """Yield the installation's meeting records, in a fixed order for a given seed."""
    rng = random.Random(f"{shape.seed}:{installation_id}:meetings")
    filler = "x" * max(0, shape.details_bytes - 60)
    for n in range(shape.meetings):
        meeting_s = START + rng.randrange(SPAN)
        yield {
            "installation_id": installation_id,
            "source_id": f"<m{n}.i{installation_id}@crm.example>",
            "client_id": rng.randrange(1, shape.clients + 1),
            "type": _pick(rng, TYPES),
            "status": _pick(rng, STATUSES),
            "meeting_date": iso_seconds(meeting_s),
            "updated_at": iso_micros(meeting_s * 1_000_000 + rng.randrange(86400 * 1_000_000)),
            "subject": f"Meeting {n}",
            "details": {"seq": n, "note": filler},
        }


def access_lists(shape: Shape, installation_id: int):
    """Yield (user_id, client_ids): 20-200 clients each, every 100th user 2,000."""
    rng = random.Random(f"{shape.seed}:{installation_id}:access")
    for user_id in range(1, shape.users + 1):
        count = 2000 if user_id % 100 == 0 else rng.randint(20, 200)
        count = min(count, shape.clients)
        yield user_id, sorted(rng.sample(range(1, shape.clients + 1), count))


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int, stream=sys.stderr):
        self.label, self.total, self.stream = label, max(total, 1), stream
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown > 0.2 or self.done >= self.total:
            self.shown = now
            width = 30
            filled = int(width * self.done / self.total)
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(f"\r{self.label:<10} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {rate:,.0f}/s")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()


#: The demo CRM that `crm run` seeds on a first start.
DEMO = Shape(clients=300, users=60, meetings=20_000)
#: Raw messages the demo adds through crm.ingest_emails' code (threads, reports).
DEMO_EMAILS = 2_000


def demo_state(engine) -> str:
    """``"none"`` (nothing seeded, empty database), ``"started"`` (a demo seed did not
    finish), ``"complete"``, or ``"foreign"`` (the database holds data of its own)."""
    with engine.connect() as conn:
        state = conn.execute(sa.select(crm_meta.c.value).where(crm_meta.c.name == "demo_seed")).scalar()
        if state is not None:
            return state
        return "foreign" if conn.execute(sa.select(installations.c.id).limit(1)).first() else "none"


def mark_demo(engine, state: str) -> None:
    with engine.begin() as conn:
        conn.execute(crm_meta.delete().where(crm_meta.c.name == "demo_seed"))
        conn.execute(crm_meta.insert().values(name="demo_seed", value=state))


def seed(ctx, shape: Shape, batch: int = 1000, quiet: bool = False) -> dict:
    """Ingest the synthetic CRM through the tasks' code; returns counts."""
    totals = {"meetings": 0, "users": 0}
    for installation_id in range(1, shape.installations + 1):
        bar = None if quiet else Progress(f"access {installation_id}", shape.users)
        for user_id, clients in access_lists(shape, installation_id):
            change(ctx, installation_id, user_id, clients, "set")
            totals["users"] += 1
            if bar:
                bar.add(1)
        bar = None if quiet else Progress(f"meetings {installation_id}", shape.meetings)
        pending = []
        for record in meetings(shape, installation_id):
            pending.append(record)
            if len(pending) == batch:
                totals["meetings"] += ingest(ctx, pending)["accepted"]
                if bar:
                    bar.add(len(pending))
                pending = []
        if pending:
            totals["meetings"] += ingest(ctx, pending)["accepted"]
            if bar:
                bar.add(len(pending))
    return totals
