"""The mailboxes an installation's users let the service read: ``crm.upsert_mailboxes``,
``crm.set_mailbox_token``, ``crm.mailbox_status``, and the state each sync run leaves.

A mailbox is one per user (``(installation_id, user_id)``).  Its secret is stored
encrypted (worker/mailbox/secrets.py) and never leaves this module except to the sync
run that logs in with it.  States: ``syncing`` (never synced to the end yet, or mail left
for the next run, or a run under way), ``ok``, ``auth_failed``, ``unreachable`` and
``disabled``.  A failure backs the mailbox off, 60 s doubling up to an hour; new
credentials end the backoff at once.
"""
from __future__ import annotations

import ipaddress
import json
import ssl
import time

import sqlalchemy as sa

from worker import keys as redis_keys
from worker.db import run_transaction
from worker.errors import InvalidArgument
from worker.mailbox import secrets
from worker.records import iso_seconds, positive_int
from worker.tables import mailbox_folders, mailboxes

MAX_MAILBOXES = 500
MAX_FOLDERS = 50
SECURITY = ("tls", "starttls", "none")
DEFAULT_PORT = {"tls": 993, "starttls": 143, "none": 143}
STATES = ("ok", "syncing", "auth_failed", "unreachable", "disabled")
_FIELDS = {"user_id", "host", "port", "security", "ca_cert", "username", "password", "oauth2_access_token",
           "folders", "enabled"}
BACKOFF_FIRST = 60
BACKOFF_MAX = 3600


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _text(field: str, value, limit: int, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidArgument(field, f"must be a string of 1 to {limit} characters")
    if any(c in value for c in "\r\n\x00"):
        raise InvalidArgument(field, "must not hold line breaks or NUL")
    return value


def _valid(row) -> dict:
    """One entry of ``crm.upsert_mailboxes``, checked field by field (the first fault wins)."""
    if not isinstance(row, dict):
        raise InvalidArgument("mailboxes[]", f"must be an object, got {type(row).__name__}")
    unknown = set(row) - _FIELDS
    if unknown:
        raise InvalidArgument(sorted(unknown)[0], "is not a field of a mailbox")
    for field in ("user_id", "host", "security", "username"):
        if field not in row:
            raise InvalidArgument(field, "is required")
    user_id = positive_int("user_id", row["user_id"])
    host = _text("host", row["host"], 255).strip()
    if any(c.isspace() for c in host) or "/" in host:
        raise InvalidArgument("host", "must be a host name or an address, without a scheme or a path")
    security = row["security"]
    if security not in SECURITY:
        raise InvalidArgument("security", f"must be one of {', '.join(SECURITY)}, got {security!r:.40}")
    if security == "none" and not is_loopback(host):
        raise InvalidArgument("security", "none is accepted only for a loopback host (127.0.0.1, ::1, "
                                          "localhost); use tls or starttls")
    port = row.get("port", DEFAULT_PORT[security])
    if type(port) is not int or not 1 <= port <= 65535:
        raise InvalidArgument("port", f"must be an integer from 1 to 65535, got {port!r:.40}")
    ca_cert = row.get("ca_cert")
    if ca_cert is not None:
        if not isinstance(ca_cert, str) or len(ca_cert) > 65536:
            raise InvalidArgument("ca_cert", "must be PEM text of at most 64 KiB")
        try:
            ssl.create_default_context(cadata=ca_cert)
        except (ssl.SSLError, ValueError):
            raise InvalidArgument("ca_cert", "is not a PEM certificate") from None
    username = _text("username", row["username"], 320)
    given = [f for f in ("password", "oauth2_access_token") if row.get(f) is not None]
    if len(given) > 1:
        raise InvalidArgument("password", "give either password or oauth2_access_token, not both")
    auth, secret = None, None
    if given:
        auth = "password" if given[0] == "password" else "oauth2"
        secret = _text(given[0], row[given[0]], 8192)
    folders = row.get("folders")
    if folders is not None:
        if not isinstance(folders, list) or not 1 <= len(folders) <= MAX_FOLDERS:
            raise InvalidArgument("folders", f"must be a list of 1 to {MAX_FOLDERS} folder names")
        folders = [_text("folders[]", f, 255) for f in folders]
        if len(set(folders)) != len(folders):
            raise InvalidArgument("folders", "names a folder twice")
    enabled = row.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidArgument("enabled", f"must be true or false, got {enabled!r:.40}")
    return {"user_id": user_id, "host": host, "port": port, "security": security, "ca_cert": ca_cert,
            "username": username, "auth": auth, "secret": secret, "folders": folders, "enabled": enabled}


def _where(installation_id: int, user_id: int, table=mailboxes):
    return sa.and_(table.c.installation_id == installation_id, table.c.user_id == user_id)


def _server(row) -> tuple:
    """What identifies the folders and their UIDs: another server or account is another
    set of folders, whose checkpoints start again."""
    return (row["host"], row["port"], row["username"])


def upsert_mailboxes(ctx, installation_id, rows) -> dict:
    """``crm.upsert_mailboxes``: returns ``{"accepted", "updated", "unchanged", "rejected"}``."""
    installation_id = positive_int("installation_id", installation_id)
    if not isinstance(rows, list):
        raise InvalidArgument("mailboxes", f"must be a list, got {type(rows).__name__}")
    if len(rows) > MAX_MAILBOXES:
        raise InvalidArgument("mailboxes", f"holds {len(rows)} entries; at most {MAX_MAILBOXES}")
    valid, rejected = {}, []
    for index, row in enumerate(rows):
        try:
            checked = _valid(row)
            valid[checked["user_id"]] = (index, checked)  # the later entry of a user wins
        except InvalidArgument as exc:
            rejected.append({"index": index, "error": str(exc)})
    keys = ctx.settings.secret_keys
    if any(row["secret"] for _, row in valid.values()) and not keys:
        raise secrets.SecretKeyError(secrets.MISSING)
    now = int(time.time())

    def work(conn):
        updated = unchanged = 0
        for user_id, (index, row) in sorted(valid.items()):
            old = conn.execute(sa.select(mailboxes).where(_where(installation_id, user_id))).first()
            if old is None and row["secret"] is None:
                rejected.append({"index": index, "error": "password: a new mailbox needs a password or an "
                                                          "oauth2_access_token"})
                continue
            values = {k: row[k] for k in ("host", "port", "security", "ca_cert", "username", "enabled")}
            values["folders"] = json.dumps(row["folders"]) if row["folders"] is not None else None
            new_secret = row["secret"] is not None and (
                old is None or old.auth != row["auth"] or _decrypts_to(keys, old.secret) != row["secret"])
            if new_secret:
                values["auth"], values["secret"] = row["auth"], secrets.encrypt(keys, row["secret"])
            if old is not None:
                same = all(getattr(old, k) == v for k, v in values.items() if k not in ("auth", "secret"))
                if same and not new_secret:
                    unchanged += 1
                    continue
                updated += 1
                moved = _server(row) != (old.host, old.port, old.username) or values["folders"] != old.folders
                if moved:
                    conn.execute(mailbox_folders.delete().where(_where(installation_id, user_id, mailbox_folders)))
                    values["resolved"] = None
                values.update(_fresh_start(now))  # new credentials or settings: no backoff
                conn.execute(mailboxes.update().where(_where(installation_id, user_id)).values(
                    updated_s=now, **values))
            else:
                conn.execute(mailboxes.insert().values(installation_id=installation_id, user_id=user_id,
                                                       updated_s=now, **values, **_fresh_start(now)))
        return updated, unchanged
    updated, unchanged = run_transaction(ctx.engine, work)
    rejected.sort(key=lambda r: r["index"])
    return {"accepted": len(rows) - len(rejected), "updated": updated, "unchanged": unchanged,
            "rejected": rejected}


def _fresh_start(now: int) -> dict:
    """New credentials or a new server: no backoff, no stale error; synced at the next tick."""
    return {"state": "syncing", "failures": 0, "next_attempt_s": now, "last_error": None}


def _decrypts_to(keys, token: str | None) -> str | None:
    if token is None:
        return None
    try:
        return secrets.decrypt(keys, token)
    except secrets.SecretKeyError:
        return None


def set_mailbox_token(ctx, installation_id, user_id, oauth2_access_token) -> dict:
    """``crm.set_mailbox_token``: a refreshed OAuth2 access token for the user's mailbox;
    ends any backoff.  Returns ``{"user_id", "updated"}``."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    token = _text("oauth2_access_token", oauth2_access_token, 8192)
    keys = ctx.settings.secret_keys
    if not keys:
        raise secrets.SecretKeyError(secrets.MISSING)
    now = int(time.time())

    def work(conn):
        found = conn.execute(sa.update(mailboxes).where(_where(installation_id, user_id)).values(
            auth="oauth2", secret=secrets.encrypt(keys, token), updated_s=now, **_fresh_start(now)))
        return found.rowcount
    if not run_transaction(ctx.engine, work):
        raise InvalidArgument("user_id", f"has no mailbox in installation {installation_id}: "
                                         "add it with crm.upsert_mailboxes")
    return {"user_id": user_id, "updated": True}


# -- what a sync run reads and leaves --------------------------------------------------------

def load(conn, installation_id: int, user_id: int):
    return conn.execute(sa.select(mailboxes).where(_where(installation_id, user_id))).first()


def due(conn, now: int, limit: int = 10_000) -> list[tuple[int, int]]:
    """The enabled mailboxes whose next attempt has come, oldest first."""
    rows = conn.execute(sa.select(mailboxes.c.installation_id, mailboxes.c.user_id).where(
        mailboxes.c.enabled == sa.true(), mailboxes.c.next_attempt_s <= now).order_by(
        mailboxes.c.next_attempt_s).limit(limit))
    return [tuple(r) for r in rows]


def backoff(failures: int) -> int:
    """Seconds before attempt ``failures + 1``: 60, 120, 240, … up to an hour."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


def record_failure(engine, installation_id: int, user_id: int, state: str, error: str, now: int) -> int:
    """The run failed (``auth_failed`` or ``unreachable``); returns the next attempt."""
    def work(conn):
        row = load(conn, installation_id, user_id)
        failures = (row.failures if row is not None else 0) + 1
        at = now + backoff(failures)
        conn.execute(mailboxes.update().where(_where(installation_id, user_id)).values(
            state=state, last_error=one_line(error), failures=failures, next_attempt_s=at))
        return at
    return run_transaction(engine, work)


def record_success(engine, installation_id: int, user_id: int, more: bool, now: int) -> None:
    """The run ended well; ``more``: mail is left for the next run."""
    def work(conn):
        conn.execute(mailboxes.update().where(_where(installation_id, user_id)).values(
            state="syncing" if more else "ok", last_error=None, failures=0, next_attempt_s=now,
            last_sync_s=now))
    run_transaction(engine, work)


def remember_folders(engine, installation_id: int, user_id: int, folders: list[str] | None) -> None:
    """The default folders found on the server (None: look again next run)."""
    def work(conn):
        conn.execute(mailboxes.update().where(_where(installation_id, user_id)).values(
            resolved=None if folders is None else json.dumps(folders)))
    run_transaction(engine, work)


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


# -- crm.mailbox_status ----------------------------------------------------------------------

def mailbox_status(ctx, installation_id, user_id=None, now: int | None = None) -> dict:
    """``crm.mailbox_status``: per mailbox and folder, the state of the sync.  With
    ``user_id``, that user's own mailbox only.  Never a secret."""
    installation_id = positive_int("installation_id", installation_id)
    if user_id is not None:
        user_id = positive_int("user_id", user_id)
    now = int(time.time()) if now is None else now
    where = [mailboxes.c.installation_id == installation_id]
    if user_id is not None:
        where.append(mailboxes.c.user_id == user_id)
    with ctx.engine.connect() as conn:
        boxes = conn.execute(sa.select(mailboxes).where(*where).order_by(mailboxes.c.user_id)).all()
        fwhere = [mailbox_folders.c.installation_id == installation_id]
        if user_id is not None:
            fwhere.append(mailbox_folders.c.user_id == user_id)
        folders: dict = {}
        for f in conn.execute(sa.select(mailbox_folders).where(*fwhere).order_by(mailbox_folders.c.folder)):
            folders.setdefault(f.user_id, []).append(f)
    running = set(running_claims(ctx.redis, installation_id, [b.user_id for b in boxes]))
    interval = ctx.settings.sync_interval
    out = []
    for b in boxes:
        state = "disabled" if not b.enabled else ("syncing" if b.user_id in running else b.state)
        out.append({
            "user_id": b.user_id, "host": b.host, "port": b.port, "security": b.security,
            "username": b.username, "auth": b.auth, "enabled": bool(b.enabled), "state": state,
            "last_sync_at": iso_seconds(b.last_sync_s) if b.last_sync_s is not None else None,
            "last_error": b.last_error,
            "next_attempt_at": None if not b.enabled else iso_seconds(_next_attempt(b.next_attempt_s, now, interval)),
            "folders": [_folder_status(f) for f in folders.get(b.user_id, [])],
        })
    return {"mailboxes": out}


def _next_attempt(next_attempt_s: int, now: int, interval: int) -> int:
    """When the beat will next send a run: the first tick at or after the mailbox's next
    attempt (ticks are wall-clock windows of ``interval`` seconds)."""
    at = max(next_attempt_s, now)
    return -(-at // interval) * interval


def _folder_status(f) -> dict:
    return {"folder": f.folder, "state": f.state, "error": f.error,
            "last_sync_at": iso_seconds(f.last_sync_s) if f.last_sync_s is not None else None,
            "synced": f.synced, "rejected": f.rejected, "backlog": f.backlog,
            "checkpoint": {"uidvalidity": f.uidvalidity, "last_uid": f.last_uid, "highestmodseq": f.highestmodseq}}


def running_claims(r, installation_id: int, user_ids: list[int]) -> list[int]:
    """The users among ``user_ids`` whose mailbox a sync run holds now."""
    if not user_ids:
        return []
    pipe = r.pipeline(transaction=False)  # keys outside any one slot: no MULTI
    for u in user_ids:
        pipe.exists(redis_keys.sync_claim(installation_id, u))
    return [u for u, held in zip(user_ids, pipe.execute()) if held]


def overview(engine, now: int) -> list[dict]:
    """Per mailbox, for the metrics: state, seconds since its last successful sync (since it
    was added, before the first), and messages left to fetch."""
    backlog = sa.select(mailbox_folders.c.installation_id, mailbox_folders.c.user_id,
                        sa.func.sum(mailbox_folders.c.backlog).label("backlog")).group_by(
        mailbox_folders.c.installation_id, mailbox_folders.c.user_id).subquery()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(mailboxes.c.installation_id, mailboxes.c.user_id, mailboxes.c.enabled,
                                      mailboxes.c.state, mailboxes.c.last_sync_s, mailboxes.c.updated_s,
                                      backlog.c.backlog).outerjoin(backlog, sa.and_(
            backlog.c.installation_id == mailboxes.c.installation_id, backlog.c.user_id == mailboxes.c.user_id)))
        return [{"installation_id": r.installation_id, "user_id": r.user_id,
                 "state": r.state if r.enabled else "disabled",
                 "lag_s": max(0, now - (r.last_sync_s if r.last_sync_s is not None else r.updated_s)),
                 "backlog": int(r.backlog or 0)} for r in rows]


def rotate_key(engine, keys) -> int:
    """Every stored secret encrypted again under the first key of ``keys``; returns how many."""
    def work(conn):
        n = 0
        for row in conn.execute(sa.select(mailboxes.c.installation_id, mailboxes.c.user_id, mailboxes.c.secret).where(
                mailboxes.c.secret.is_not(None))).all():
            conn.execute(mailboxes.update().where(_where(row.installation_id, row.user_id)).values(
                secret=secrets.rotate(keys, row.secret)))
            n += 1
        return n
    return run_transaction(engine, work)
