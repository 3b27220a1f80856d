"""Meeting records: validation of the contract's field rules, and their stored forms.

Times are kept at one-second resolution for sorting and filtering (``meeting_s``,
``updated_s``: whole seconds since the epoch, UTC); ``updated_at`` keeps microseconds
(``updated_us``) to order versions of the same ``source_id``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import time

import sqlalchemy as sa

from worker.errors import InvalidArgument
from worker.tables import meetings

MAX_BATCH = 1000
TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
MAX_SOURCE_ID = 255
MAX_SUBJECT = 998
MAX_DETAILS = 64 * 1024
#: Sort values are unsigned 32-bit seconds: 1970-01-01 to 2106-02-07.
MAX_SECONDS = 2**32 - 1
#: Meeting ids are below 2**53, so JavaScript clients read them exactly.
ID_SPACE = 2**53 - 1
FIELDS = {"installation_id", "source_id", "client_id", "type", "status", "meeting_date",
          "subject", "details", "updated_at"}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclasses.dataclass
class Meeting:
    """A validated meeting, in the form the database and the index store."""
    installation_id: int
    source_id: str
    client_id: int
    type: str
    status: str
    meeting_s: int
    updated_us: int | None  # None: not given, the time of ingestion applies
    subject: str | None
    details: str | None  # compact JSON text of the details object
    id: int = 0

    @property
    def updated_s(self) -> int:
        return self.updated_us // 1_000_000

    def content(self) -> tuple:
        """What a version holds, besides its ``updated_at``."""
        return (self.client_id, self.type, self.status, self.meeting_s, self.subject, self.details)


def positive_int(field: str, value) -> int:
    if type(value) is not int:
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__} {value!r:.40}")
    if value <= 0:
        raise InvalidArgument(field, f"must be > 0, got {value}")
    if value > ID_SPACE:
        raise InvalidArgument(field, f"must be at most {ID_SPACE}, got {value}")
    return value


def token(field: str, value) -> str:
    if not isinstance(value, str) or not TOKEN.match(value):
        raise InvalidArgument(field, f"must be a token matching [a-z][a-z0-9_]{{0,31}}, got {value!r:.40}")
    return value


def parse_time(field: str, value) -> dt.datetime:
    """An ISO 8601 timestamp with a UTC offset, as an aware datetime."""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be an ISO 8601 string with a UTC offset, got {value!r:.40}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(field, f"is not an ISO 8601 timestamp: {value!r:.60}") from None
    if when.tzinfo is None or "T" not in text.upper():
        raise InvalidArgument(field, f"needs a date, a time and a UTC offset, got {value!r:.60}")
    try:
        when = when.astimezone(dt.timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+01:00 and 9999-12-31T23:59-23:59 have no UTC time
        when = None
    if when is None or not 0 <= (when - EPOCH) // dt.timedelta(seconds=1) <= MAX_SECONDS:
        raise InvalidArgument(field, f"must lie between 1970-01-01 and 2106-02-07, got {value!r:.60}")
    return when


def to_seconds(when: dt.datetime) -> int:
    return (when - EPOCH) // dt.timedelta(seconds=1)


def to_micros(when: dt.datetime) -> int:
    return (when - EPOCH) // dt.timedelta(microseconds=1)


_YEAR_10000 = 253_402_300_800  # 10000-01-01T00:00:00Z


def iso_seconds(seconds: int) -> str:
    if 0 <= seconds < _YEAR_10000:  # four-digit years: the same text, a few times faster
        return "%04d-%02d-%02dT%02d:%02d:%02dZ" % time.gmtime(seconds)[:6]
    return (EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_micros(micros: int) -> str:
    when = EPOCH + dt.timedelta(microseconds=micros)
    if when.microsecond:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def validate(record) -> Meeting:
    """Check one input record against the contract; raise :class:`InvalidArgument`."""
    if not isinstance(record, dict):
        raise InvalidArgument("record", f"must be a JSON object, got {type(record).__name__}")
    unknown = set(record) - FIELDS
    if unknown:
        raise InvalidArgument(sorted(unknown)[0], "is not a meeting field")
    for field in ("installation_id", "source_id", "client_id", "type", "status", "meeting_date"):
        if field not in record:
            raise InvalidArgument(field, "is required")
    source_id = record["source_id"]
    if not isinstance(source_id, str) or not 1 <= len(source_id) <= MAX_SOURCE_ID:
        raise InvalidArgument("source_id", f"must be a string of 1..{MAX_SOURCE_ID} characters, got {source_id!r:.40}")
    if "\x00" in source_id:
        raise InvalidArgument("source_id", "must not contain NUL characters")
    _encodable("source_id", source_id)
    subject = record.get("subject")
    if subject is not None and (not isinstance(subject, str) or len(subject) > MAX_SUBJECT):
        raise InvalidArgument("subject", f"must be a string of at most {MAX_SUBJECT} characters")
    if subject is not None:
        _encodable("subject", subject)
    details = record.get("details")
    details_text = None
    if details is not None:
        if not isinstance(details, dict):
            raise InvalidArgument("details", f"must be a JSON object, got {type(details).__name__}")
        try:
            details_text = json.dumps(details, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("details", f"must be plain JSON: {exc}") from None
        if len(_encodable("details", details_text)) > MAX_DETAILS:
            raise InvalidArgument("details", f"must serialize to at most {MAX_DETAILS} bytes")
    updated = record.get("updated_at")
    return Meeting(
        installation_id=positive_int("installation_id", record["installation_id"]),
        source_id=source_id,
        client_id=positive_int("client_id", record["client_id"]),
        type=token("type", record["type"]),
        status=token("status", record["status"]),
        meeting_s=to_seconds(parse_time("meeting_date", record["meeting_date"])),
        updated_us=None if updated is None else to_micros(parse_time("updated_at", updated)),
        subject=subject,
        details=details_text,
    )


def _encodable(field: str, text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(field, "must be valid Unicode (it holds a lone surrogate)") from None


def meeting_id(installation_id: int, source_id: str, salt: int = 0) -> int:
    """The meeting's id, derived from its unique key: known before any database round trip,
    and spread evenly so that TiDB has no write hotspot.  ``salt`` > 0 only after a
    collision with another meeting's id."""
    digest = hashlib.blake2b(f"{installation_id}\x00{source_id}\x00{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ID_SPACE + 1


def item_json(row) -> str:
    """The meeting item of the contract, as JSON text.  ``row`` has the columns of
    :data:`worker.tables.meetings`; ``client_id`` 0 (an email linked to no client) is null.  Both query paths build items with this one function."""
    details = row.details
    return (
        '{"id":%d,"source_id":%s,"client_id":%s,"type":"%s","status":"%s","meeting_date":"%s",'
        '"updated_at":"%s","subject":%s,"details":%s}'
        % (row.id, json.dumps(row.source_id, ensure_ascii=False), row.client_id or "null", row.type, row.status,
           iso_seconds(row.meeting_s), iso_micros(row.updated_us),
           json.dumps(row.subject, ensure_ascii=False), details if details is not None else "null")
    )


def free_ids(conn, installation_id: int, source_ids: list[str]) -> list[int]:
    """The derived ids of new meetings ``source_ids``, salting the rare one that collides
    with an id already taken by another meeting (stored, or earlier in the list)."""
    out: list = [0] * len(source_ids)
    taken: set = set()
    pending, salt = list(range(len(source_ids))), 0
    while pending:
        wanted = {i: meeting_id(installation_id, source_ids[i], salt) for i in pending}
        stored = set(conn.execute(sa.select(meetings.c.id).where(meetings.c.id.in_(sorted(set(wanted.values())))))
                     .scalars())
        again = []
        for i in pending:
            if wanted[i] in stored or wanted[i] in taken:
                again.append(i)
            else:
                taken.add(wanted[i])
                out[i] = wanted[i]
        pending, salt = again, salt + 1
    return out
