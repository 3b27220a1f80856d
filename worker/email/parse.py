"""Raw RFC 5322 bytes -> what email insight stores of a message.

Headers only, with the standard library's ``compat32`` policy: it parses all of what real
mail holds (``policy.default`` raises on some real address headers), and the body is not
needed.  Every header value is decoded defensively: an unknown charset, a broken encoded
word or a control character never fails a message.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import email.header
import email.utils
import hashlib
import json
import re
from email.parser import BytesHeaderParser
from email.policy import compat32

from worker.email.addresses import canonical_address
from worker.records import MAX_SECONDS, MAX_SUBJECT

MAX_RAW = 10 * 1024 * 1024
MAX_KEY = 250
#: Ids kept per message (In-Reply-To's, then References'): the first (the parent named by
#: In-Reply-To when there is one, else the thread's root) and the last ones.  A hostile
#: message may list thousands; each would become a ghost id.
MAX_REFS = 100
#: Participants kept per role: a message to 10,000 recipients is a mailing, not a meeting.
MAX_PER_ROLE = 100
ROLES = ("from", "to", "cc", "reply_to")
_HEADERS = {"from": "From", "to": "To", "cc": "Cc", "reply_to": "Reply-To"}
#: The headers of a message's content fingerprint, with its body: what a copy of the same
#: message holds in every mailbox (trace headers such as Received, Delivered-To or
#: X-Gmail-Labels differ per mailbox and are not part of it).
FINGERPRINTED = ("from", "date", "subject", "to", "cc")
_ID = re.compile(r"<([^<>]*)>")
_SPACE = re.compile(r"\s+")
_BODY = re.compile(rb"\r?\n\r?\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Reply and forward prefixes, localized: Re, Fw, Fwd, AW/WG (de), SV/VS (nordic), Antw
# (nl), RV/RE (es/pt), TR (fr), Odp/PD (pl), YNT/İLT (tr), Ris (it), Vá (hu), Odg (hr),
# 回复/转发 (zh); each with an optional counter: "Re[2]:", "Re(3):", "RE^2:".
_PREFIX = re.compile(
    r"^\s*(?:\[[^\]]{1,40}\]\s*)?"
    r"(?:re|fw|fwd|aw|wg|sv|vs|antw|doorst|rv|enc|tr|odp|pd|ynt|ilt|i̇lt|ris|inoltro|vá|továbbítás|odg|"
    r"atb|vb|vl|ref|回复|回覆|转发|答复)"
    r"\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:：]\s*", re.I)


class Unusable(ValueError):
    """The message cannot be stored; the text says why."""


@dataclasses.dataclass
class Parsed:
    base_key: str             # the contract's key before any "#n"
    from_address: str | None  # canonical
    date_s: int | None        # the Date header, None when missing or unparseable
    subject: str | None
    subject_key: str | None   # normalized subject: prefixes gone, folded, spaces collapsed
    refs: list[str]           # In-Reply-To and References ids, capped
    participants: list[tuple[str, str, str]]  # (role, canonical address, display name)
    fingerprint: str = ""     # sha256 hex of the content (see fingerprint())


def decode_raw(raw) -> bytes:
    """base64url (padding optional, standard alphabet accepted too) -> bytes."""
    if not isinstance(raw, str):
        raise Unusable(f"raw: must be a base64url string, got {type(raw).__name__}")
    if len(raw) > (MAX_RAW * 4) // 3 + 8:
        raise Unusable(f"raw: the message is over {MAX_RAW // (1024 * 1024)} MiB")
    text = raw.strip().replace("+", "-").replace("/", "_").rstrip("=")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise Unusable("raw: is not base64url") from None
    if len(data) > MAX_RAW:
        raise Unusable(f"raw: the message is over {MAX_RAW // (1024 * 1024)} MiB")
    if not data.strip():
        raise Unusable("raw: the message is empty")
    return data


def _text(value) -> str:
    """A header value as clean text: encoded words decoded (unknown charsets replaced),
    control characters (header injection, folding) turned into single spaces."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        value = str(value)
    try:
        parts = email.header.decode_header(value)
        out = []
        for chunk, charset in parts:
            if isinstance(chunk, bytes):
                try:
                    chunk = chunk.decode(charset or "ascii", errors="replace")
                except LookupError:
                    chunk = chunk.decode("utf-8", errors="replace")
            out.append(chunk)
        text = "".join(out)
    except Exception:  # a malformed encoded word: keep the raw text
        text = str(value)
    text = text.encode("utf-8", errors="replace").decode("utf-8")  # no lone surrogates
    return _CONTROL.sub(" ", text).strip()


def message_key(header: str | None, raw: bytes) -> str:
    """The first ``<…>`` token of Message-ID, trimmed; ``sha256:<hex>`` of the raw bytes
    when there is none, or it is empty, over 250 characters or holds whitespace."""
    found = _ID.search(_CONTROL.sub(" ", header or ""))
    key = found.group(1).strip() if found else ""
    if not key or len(key) > MAX_KEY or any(c.isspace() for c in key):
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return key


def fingerprint(msg, data: bytes) -> str:
    """What makes two messages of one key the same message: From, Date, Subject, To and
    Cc as sent (every occurrence, folding and runs of white space made one space; a
    missing header differs from an empty one) and the body bytes (line endings made LF,
    trailing newlines dropped), as sha256 hex.  Copies of one message read from several
    mailboxes differ only in trace headers, which are not part of it; a forged copy that
    reuses a known Message-ID, sender and date differs in its content."""
    values: dict[str, list[str]] = {name: [] for name in FINGERPRINTED}
    for name, value in msg.raw_items():
        name = name.strip().lower()
        if name in values:
            values[name].append(_SPACE.sub(" ", str(value)).strip())
    # ensure_ascii: the undecodable bytes of a header (kept as surrogates) are written
    # out as escapes, the same for every copy.
    head = json.dumps([values[name] or None for name in FINGERPRINTED]).encode()
    found = _BODY.search(data)
    body = data[found.end():] if found else b""
    body = body.replace(b"\r\n", b"\n").rstrip(b"\n")
    return hashlib.sha256(head + b"\x00" + body).hexdigest()


def _ids(value: str) -> list[str]:
    out = []
    for token in _ID.findall(_CONTROL.sub(" ", value or "")):
        token = token.strip()
        if token and len(token) <= MAX_KEY and not any(c.isspace() for c in token):
            out.append(token)
    return out


def subject_key(subject: str) -> str | None:
    text = subject
    while True:
        stripped = _PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    text = " ".join(text.casefold().split())
    return text[:200] or None


def _date(value: str) -> int | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    try:
        seconds = int(when.timestamp())
    except (OverflowError, ValueError, OSError):
        return None
    return seconds if 0 <= seconds <= MAX_SECONDS else None


def parse(data: bytes) -> Parsed:
    try:
        msg = BytesHeaderParser(policy=compat32).parsebytes(data)
    except Exception as exc:  # compat32 rarely raises; a message it cannot read is rejected
        raise Unusable(f"raw: unreadable headers ({exc.__class__.__name__})") from None
    if not msg.keys():
        raise Unusable("raw: the message has no headers")
    participants = []
    for role in ROLES:
        # The structure is read before encoded words are decoded: a display name that
        # decodes to "Evil\r\nBcc: x@y" stays a name and adds no address.
        values = [_CONTROL.sub(" ", str(v)) for v in msg.get_all(_HEADERS[role], [])]
        seen = set()
        for name, address in email.utils.getaddresses(values)[:10 * MAX_PER_ROLE]:
            canonical = canonical_address(address)
            if canonical is None or canonical in seen:
                continue
            seen.add(canonical)
            participants.append((role, canonical, _text(name)[:255]))
            if len(seen) >= MAX_PER_ROLE:
                break
        if role == "from":
            participants = participants[:1]  # one sender
    refs = _ids(_text(msg.get("In-Reply-To"))) + _ids(_text(msg.get("References")))
    unique = list(dict.fromkeys(refs))
    if len(unique) > MAX_REFS:
        unique = unique[:1] + unique[-(MAX_REFS - 1):]
    subject = _text(msg.get("Subject"))[:MAX_SUBJECT] or None
    key = message_key(_text(msg.get("Message-ID")), data)
    return Parsed(
        base_key=key,
        from_address=participants[0][1] if participants and participants[0][0] == "from" else None,
        date_s=_date(_text(msg.get("Date"))),
        subject=subject,
        subject_key=subject_key(subject) if subject else None,
        refs=[r for r in unique if r != key],
        participants=participants,
        fingerprint=fingerprint(msg, data),
    )
