"""One IMAP session with one mailbox (imapclient): log in (password or SASL XOAUTH2), find
the default folders, ask a folder's STATUS, list the UIDs above a checkpoint, describe
them (size, INTERNALDATE, Gmail's ids) and fetch them with ``BODY.PEEK[]`` (never marking
mail read).

Faults come out as three kinds: :class:`AuthFailed` (the server refused the
credentials), :class:`Unreachable` (no connection, TLS refused, the connection dropped,
a timeout) and :class:`FolderMissing` (a folder that was deleted or renamed).  Their
messages are one line, made from the server's words and the error's class: never the
secret, never a message's content.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import imaplib
import logging
import ssl

from imapclient import IMAPClient
from imapclient import exceptions as imap_errors

# imapclient logs whole commands at DEBUG (LOGIN with its password, AUTHENTICATE with its
# token): keep its loggers above DEBUG whatever the root logger's level is.
log = logging.getLogger(__name__)
for _name in ("imapclient", "imapclient.imaplib", "imapclient.imapclient"):
    logging.getLogger(_name).setLevel(logging.INFO)

#: Seconds a connect or a read may take before the server counts as unreachable.
TIMEOUT = 60
GMAIL = b"X-GM-EXT-1"


class AuthFailed(Exception):
    """The server refused the mailbox's credentials."""


class Unreachable(Exception):
    """No usable connection to the server (refused, timed out, TLS failed, dropped)."""


class FolderMissing(Exception):
    """A folder the mailbox syncs is not on the server (deleted or renamed)."""


@dataclasses.dataclass(frozen=True)
class Account:
    host: str
    port: int
    security: str  # tls | starttls | none
    ca_cert: str | None
    username: str
    auth: str  # password | oauth2
    secret: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    messages: int
    highestmodseq: int | None


@dataclasses.dataclass(frozen=True)
class Described:
    """What the server says of one message before it is downloaded."""
    uid: int
    size: int
    internaldate: dt.datetime | None
    gmail_msgid: str | None = None
    gmail_thrid: str | None = None


def _why(exc: BaseException, secret: str = "") -> str:
    """The error's class and first 200 characters, with the secret (should a server echo
    it) replaced."""
    text = " ".join(str(exc).split())
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    text = text[:200]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class Session:
    """A logged-in session; use as a context manager.  ``commands`` counts the IMAP
    commands sent after login (each one round trip)."""

    def __init__(self, account: Account, timeout: float = TIMEOUT):
        self.account = account
        self.commands = 0
        try:
            self._client = self._connect(account, timeout)
        except (OSError, ssl.SSLError, imaplib.IMAP4.error, imap_errors.IMAPClientError) as exc:
            raise Unreachable(f"cannot reach {account.host}:{account.port} ({_why(exc)})") from None
        self._client.normalise_times = False  # INTERNALDATE with its own offset
        try:
            self._login()
        except imap_errors.LoginError as exc:
            self._drop()
            raise AuthFailed(f"{account.host} refused the {account.auth} login ({_why(exc, account.secret)})") from None
        except (OSError, imaplib.IMAP4.abort) as exc:
            self._drop()
            raise Unreachable(f"{account.host} dropped the connection at login ({_why(exc, account.secret)})") \
                from None
        self.capabilities = {c.upper() for c in self._client.capabilities()}
        self._count_commands()

    @staticmethod
    def _connect(account: Account, timeout: float) -> IMAPClient:
        context = None
        if account.security != "none":
            context = ssl.create_default_context(cadata=account.ca_cert) if account.ca_cert else \
                ssl.create_default_context()
        client = IMAPClient(account.host, port=account.port, ssl=account.security == "tls",
                            ssl_context=context if account.security == "tls" else None, timeout=timeout)
        if account.security == "starttls":
            client.starttls(context)
        return client

    def _login(self) -> None:
        if self.account.auth == "oauth2":
            self._client.oauth2_login(self.account.username, self.account.secret)
        else:
            self._client.login(self.account.username, self.account.secret)

    def _count_commands(self) -> None:
        imap = self._client._imap
        send = imap._command

        def counted(*args, **kwargs):
            self.commands += 1
            return send(*args, **kwargs)
        imap._command = counted

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        try:
            self._client.logout()
        except Exception:  # a dropped connection has nothing to log out of
            self._drop()

    def _drop(self) -> None:
        """Close the socket of a session that cannot log out (the connection is gone)."""
        try:
            self._client.shutdown()
        except OSError as exc:
            log.debug("%s: the connection was closed already (%s)", self.account.host, exc.__class__.__name__)

    @property
    def gmail(self) -> bool:
        return GMAIL in self.capabilities

    @property
    def condstore(self) -> bool:
        return b"CONDSTORE" in self.capabilities

    def _call(self, what: str, fn, *args, folder: str | None = None, **kwargs):
        """``fn(*args)``; a dropped connection or a timeout is :class:`Unreachable`, a NO on
        a folder that is gone :class:`FolderMissing`."""
        try:
            return fn(*args, **kwargs)
        except (OSError, imaplib.IMAP4.abort, imap_errors.IMAPClientAbortError) as exc:
            raise Unreachable(f"{self.account.host} dropped the connection during {what} ({_why(exc)})") from None
        except imap_errors.IMAPClientError as exc:
            text = str(exc).lower()
            if folder is not None and any(w in text for w in ("nonexistent", "doesn't exist", "does not exist",
                                                               "not found", "unknown mailbox", "no such")):
                raise FolderMissing(f"{folder}: not on the server ({_why(exc)})") from None
            raise

    # -- folders -------------------------------------------------------------------------

    def default_folders(self) -> list[str]:
        return default_folders(self._call("LIST", self._client.list_folders), self.gmail)

    def status(self, folder: str) -> FolderStatus:
        """One round trip: STATUS, with HIGHESTMODSEQ when the server has CONDSTORE."""
        what = ["UIDVALIDITY", "UIDNEXT", "MESSAGES"] + (["HIGHESTMODSEQ"] if self.condstore else [])
        got = self._call("STATUS", self._client.folder_status, folder, what, folder=folder)
        modseq = got.get(b"HIGHESTMODSEQ")
        return FolderStatus(int(got[b"UIDVALIDITY"]), int(got[b"UIDNEXT"]), int(got[b"MESSAGES"]),
                            int(modseq) if modseq is not None else None)

    def uids_after(self, folder: str, last_uid: int) -> tuple[int, list[int]]:
        """(UIDVALIDITY, the UIDs above ``last_uid``, ascending), the folder opened read-only."""
        opened = self._call("EXAMINE", self._client.select_folder, folder, readonly=True, folder=folder)
        uidvalidity = int(opened[b"UIDVALIDITY"])
        # "n:*" always names the last message, even below n: keep those above.
        found = self._call("UID SEARCH", self._client.search, ["UID", f"{last_uid + 1}:*"])
        return uidvalidity, sorted(u for u in found if u > last_uid)

    def describe(self, uids: list[int]) -> dict[int, Described]:
        items = ["RFC822.SIZE", "INTERNALDATE"] + (["X-GM-MSGID", "X-GM-THRID"] if self.gmail else [])
        got = self._call("FETCH", self._client.fetch, uids, items)
        asked = set(uids)
        return {uid: described(uid, data) for uid, data in got.items() if uid in asked}

    def bodies(self, uids: list[int], limit: int) -> dict[int, bytes]:
        """``BODY.PEEK[]`` of ``uids``: the messages as stored, the \\Seen flag left alone,
        each cut at ``limit`` bytes (``BODY.PEEK[]<0.limit>``): a server whose RFC822.SIZE
        understated a message never makes the worker hold more.  A UID missing from the
        answer (expunged meanwhile) is missing from the result."""
        got = self._call("FETCH", self._client.fetch, uids, [f"BODY.PEEK[]<0.{limit}>"])
        out = {}
        for uid, data in got.items():
            body = data.get(b"BODY[]<0>", data.get(b"BODY[]"))
            if isinstance(body, bytes):
                out[uid] = body
        return out


def default_folders(listed, gmail: bool) -> list[str]:
    """From a LIST answer (``(flags, delimiter, name)`` each): on Gmail (``X-GM-EXT-1``) the
    ``\\All`` folder alone (every message once, sent mail included); elsewhere INBOX and
    the folder flagged ``\\Sent`` (RFC 6154 SPECIAL-USE), when there is one."""
    def flagged(flag: bytes):
        return next((name for flags, _, name in listed if flag in {f.upper() for f in flags}), None)
    if gmail:
        everything = flagged(b"\\ALL")
        if everything:
            return [everything]
    sent = flagged(b"\\SENT")
    return ["INBOX"] + ([sent] if sent and sent.upper() != "INBOX" else [])


def described(uid: int, data: dict) -> Described:
    """One FETCH answer: size, INTERNALDATE and, on Gmail, X-GM-MSGID and X-GM-THRID.  Those
    are 64-bit numbers that Gmail's API spells in hexadecimal as a message's ``id`` and
    ``threadId``: they become ``provider_id`` and ``provider_thread_id`` in that spelling,
    so that a message a web app ingested through the API and the same message synced over
    IMAP carry the same ids."""
    size = data.get(b"RFC822.SIZE")
    when = data.get(b"INTERNALDATE")
    if isinstance(when, dt.datetime) and when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    msgid, thrid = data.get(b"X-GM-MSGID"), data.get(b"X-GM-THRID")
    return Described(uid=uid, size=int(size) if size is not None else 0,
                     internaldate=when if isinstance(when, dt.datetime) else None,
                     gmail_msgid=format(int(msgid), "x") if msgid is not None else None,
                     gmail_thrid=format(int(thrid), "x") if thrid is not None else None)
