"""Cursors: the position of a page's last item, signed and bound to the query that
returned it.  One format for every paged task (``crm.query_meetings``,
``crm.query_threads``, ``crm.search_contacts``):

    base64url(position || MAC),  MAC = HMAC-SHA256(secret, fingerprint || NUL || position)[:12]

``position`` is bytes the caller chooses (a sorted-set member; a JSON list); the
fingerprint is everything of the query but its page.  An altered cursor, or one of
another query, user or database (the secret includes the database's identity:
worker/context.py), fails with a field-first error.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json

from worker.errors import InvalidArgument

MAX_CURSOR = 2048
MAC_BYTES = 12


def _mac(secret: bytes, fingerprint: bytes, position: bytes) -> bytes:
    return hmac.new(secret, fingerprint + b"\x00" + position, hashlib.sha256).digest()[:MAC_BYTES]


def foreign() -> InvalidArgument:
    return InvalidArgument("cursor", "is malformed, was altered, or belongs to another query "
                                     "(a cursor only continues the query that returned it)")


def encode(secret: bytes, fingerprint: bytes, position: bytes) -> str:
    return base64.urlsafe_b64encode(position + _mac(secret, fingerprint, position)).decode().rstrip("=")


def decode(secret: bytes, fingerprint: bytes, cursor) -> bytes:
    """The position a cursor holds; raises :class:`InvalidArgument` for anything else."""
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR:
        raise InvalidArgument("cursor", "must be the next_cursor string of an earlier page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (ValueError, TypeError):
        raise foreign() from None
    position, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if len(raw) <= MAC_BYTES or not hmac.compare_digest(mac, _mac(secret, fingerprint, position)):
        raise foreign()
    return position


def encode_json(secret: bytes, fingerprint: bytes, position: list) -> str:
    return encode(secret, fingerprint, json.dumps(position, separators=(",", ":"), ensure_ascii=False).encode())


def decode_json(secret: bytes, fingerprint: bytes, cursor) -> list:
    position = decode(secret, fingerprint, cursor)
    try:
        value = json.loads(position)
    except ValueError:
        raise foreign() from None
    if not isinstance(value, list):
        raise foreign()
    return value
