"""What every report shares: its parameters, the user's visible meetings in range, the
TiFlash hint and the percentile rule (worker/visibility.py holds the rules of who sees
what)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import sqlalchemy as sa

from worker import rollups
from worker.query import narrowing
from worker.visibility import visible_parts


NAMES = ("activity", "response_times", "awaiting_reply", "workload", "going_cold")
PARAMS = ("client_ids", "date_from", "date_to", "bucket")
BUCKETS = ("month", "week")
#: Histogram of response times: label, upper bound in seconds (exclusive).
HISTOGRAM = (("<1h", 3_600), ("1-4h", 14_400), ("4-24h", 86_400), ("1-3d", 259_200), ("3-7d", 604_800),
             (">7d", None))
DAY = rollups.DAY


@dataclasses.dataclass(frozen=True)
class Params:
    client_ids: tuple | None
    date_from: int | None   # whole seconds, inclusive
    date_to: int | None     # whole seconds, exclusive
    bucket: str

    def to_json(self) -> list:
        return [None if self.client_ids is None else list(self.client_ids), self.date_from, self.date_to,
                self.bucket]

    @classmethod
    def from_json(cls, raw) -> "Params":
        client_ids, date_from, date_to, bucket = raw
        if bucket not in BUCKETS:
            raise ValueError(bucket)
        return cls(None if client_ids is None else tuple(int(c) for c in client_ids),
                   None if date_from is None else int(date_from), None if date_to is None else int(date_to), bucket)

    @property
    def narrowed(self) -> bool:
        """Narrowed by client or date: the thread reports then read the messages in range,
        not the threads' kept state."""
        return self.client_ids is not None or self.date_from is not None or self.date_to is not None

    def digest(self, name: str) -> str:
        text = json.dumps([name, self.client_ids, self.date_from, self.date_to, self.bucket])
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


#: No narrowing: every visible meeting.
ALL = Params(client_ids=None, date_from=None, date_to=None, bucket="month")


def filters(p: Params) -> list:
    return narrowing(p.client_ids, p.date_from, p.date_to)


def visible(installation_id: int, user_id: int, p: Params, columns, *conds, hint: str | None = None):
    """The user's visible meetings in range and filter, as two disjoint parts that each
    use an index: those of the user's own clients, and those seen beyond them (reached
    through another linked client or the user's mailbox).  A UNION ALL subquery."""
    return sa.union_all(*visible_parts(installation_id, user_id, columns, *filters(p), *conds,
                                       hint=hint)).subquery("seen")


#: On TiDB with TiFlash replicas of the tables, read the columnar replicas (the hint goes
#: in the query block that reads the tables, by their unaliased names).
TIFLASH_HINT = "/*+ READ_FROM_STORAGE(TIFLASH[meetings, emails, meeting_days]) */"


def packed_ints(column):
    """The values of an integer column, packed by the database into one text (GROUP_CONCAT,
    each value ended by ";"): PyMySQL reads a row in about 5 µs, splitting a text costs a
    small fraction of that per value.  Read back with :func:`unpack_ints`."""
    return sa.func.group_concat(sa.cast(column, sa.String) + ";")


def unpack_ints(text, count: int) -> list[int] | None:
    """The ``count`` values of a :func:`packed_ints` text; None when the text came back
    cut (``group_concat_max_len``): cut inside a value it does not end with ";", cut
    between values it holds fewer than ``count``."""
    if not count:
        return []
    if isinstance(text, (bytes, bytearray)):
        text = text.decode()
    if not text or not text.endswith(";"):
        return None
    values = text[:-1].split(";,")
    return list(map(int, values)) if len(values) == count else None


def hinted(stmt, hint: str | None):
    return stmt.prefix_with(hint, dialect="mysql") if hint else stmt


def percentile(sorted_values: list, q: float) -> float | None:
    """Linear interpolation between closest ranks (the inclusive method)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))
