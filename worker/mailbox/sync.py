"""One sync run of one mailbox (``crm.sync_mailbox``).

1. **Claim** the mailbox in Redis (a TTL'd claim, renewed while the run goes on): a
   second run of the same mailbox returns at once.  A killed worker's claim expires
   after ``CRM_SYNC_CLAIM`` seconds.
2. **Log in** with the decrypted secret.  A refusal is ``auth_failed``, a server out of
   reach ``unreachable``; both back the mailbox off (worker/mailbox/accounts.py).
3. Per **folder**: one STATUS.  Its UIDVALIDITY against the checkpoint's (a change
   re-walks the folder from UID 1: copies already stored come back as duplicates, never
   as losses); its UIDNEXT against the last stored UID (nothing new: done, in one round
   trip).  Otherwise the folder is opened read-only, the new UIDs listed and described
   (size, INTERNALDATE, Gmail's ids), and fetched with ``BODY.PEEK[]`` in chunks of at
   most 200 messages and 10 MiB; a message over 10 MiB is rejected without download.
4. Each chunk goes through the path of ``crm.ingest_emails`` (worker/email/ingest.py),
   read as from the mailbox's user, and the folder's **checkpoint advances in the
   transaction that stores it**.  The update is conditional (same UIDVALIDITY, a last UID
   below the new one): a crash anywhere resumes after the last committed chunk, with
   nothing lost and nothing stored twice.
5. The run stops fetching when its **time budget** (``CRM_SYNC_BUDGET``) is spent (each
   folder left still gets its STATUS, so that its backlog is known); the next tick goes
   on from the checkpoint.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time

import sqlalchemy as sa
from imapclient import exceptions as imap_errors
from redis.exceptions import LockError

from worker import keys, metrics
from worker.db import run_transaction
from worker.email.ingest import store_messages
from worker.email.parse import MAX_RAW
from worker.errors import InvalidArgument
from worker.mailbox import accounts, imap, secrets
from worker.records import iso_seconds, positive_int
from worker.tables import mailbox_folders
from worker.writes import new_write_id

log = logging.getLogger(__name__)

#: At most this many messages, and this many bytes, per FETCH of bodies (and per stored chunk).
CHUNK_MESSAGES = 200
CHUNK_BYTES = 10 * 1024 * 1024
#: UIDs described (size, date) per FETCH.
DESCRIBE = 1000


class Overtaken(Exception):
    """The folder's checkpoint moved under this run (another run, a UIDVALIDITY reset)."""


@dataclasses.dataclass
class FolderResult:
    folder: str
    state: str = "ok"
    fetched: int = 0
    new: int = 0
    duplicates: int = 0
    rejected: list = dataclasses.field(default_factory=list)
    backlog: int = 0
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def chunks(described: list[imap.Described], max_messages: int = CHUNK_MESSAGES, max_bytes: int = CHUNK_BYTES):
    """``described`` (ascending UIDs) cut into chunks of at most ``max_messages`` messages
    and ``max_bytes`` bytes; a message over ``MAX_RAW`` takes a chunk of its own (it is
    rejected there, never downloaded)."""
    chunk, size = [], 0
    for d in described:
        big = d.size > MAX_RAW
        if chunk and (big or len(chunk) >= max_messages or size + d.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(d)
        size += d.size
        if big:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _message(d: imap.Described, raw: bytes) -> dict:
    """One message in ``crm.ingest_emails``'s form."""
    m = {"raw": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    if d.internaldate is not None:
        m["received_at"] = d.internaldate.isoformat()
    if d.gmail_msgid is not None:
        m["provider_id"] = d.gmail_msgid
    if d.gmail_thrid is not None:
        m["provider_thread_id"] = d.gmail_thrid
    return m


class Run:
    """One sync run of the mailbox of ``(installation_id, user_id)``."""

    def __init__(self, ctx, installation_id: int, user_id: int, row, claim, budget_s: float):
        self.ctx, self.installation_id, self.user_id, self.row = ctx, installation_id, user_id, row
        self.claim = claim
        self.deadline = time.monotonic() + budget_s
        self.more = False

    # -- checkpoints ---------------------------------------------------------------------

    def _where(self, folder: str):
        return sa.and_(mailbox_folders.c.installation_id == self.installation_id,
                       mailbox_folders.c.user_id == self.user_id, mailbox_folders.c.folder == folder)

    def checkpoint(self, folder: str):
        def work(conn):
            row = conn.execute(sa.select(mailbox_folders).where(self._where(folder))).first()
            if row is None:
                conn.execute(mailbox_folders.insert().values(
                    installation_id=self.installation_id, user_id=self.user_id, folder=folder, last_uid=0,
                    synced=0, rejected=0, state="ok"))
                row = conn.execute(sa.select(mailbox_folders).where(self._where(folder))).first()
            return row
        return run_transaction(self.ctx.engine, work, retry_duplicates=True)

    def _set(self, folder: str, **values) -> None:
        run_transaction(self.ctx.engine, lambda conn: conn.execute(
            mailbox_folders.update().where(self._where(folder)).values(**values)))

    def _advance(self, conn, folder: str, uidvalidity: int, top: int, synced: int = 0, rejected: int = 0,
                 strict: bool = True) -> None:
        """Move the folder's last UID up to ``top`` in the caller's transaction, and count
        what was stored and rejected.  ``strict``: the checkpoint must move (else another
        run or a reset overtook this one: the transaction rolls back)."""
        c = mailbox_folders.c
        where = [self._where(folder), c.uidvalidity == uidvalidity]
        if strict:
            where.append(c.last_uid < top)
        moved = conn.execute(mailbox_folders.update().where(*where).values(
            last_uid=sa.case((c.last_uid < top, top), else_=c.last_uid),
            synced=c.synced + synced, rejected=c.rejected + rejected))
        if strict and moved.rowcount != 1:
            raise Overtaken(f"{folder}: the checkpoint moved under this run")

    # -- the run ------------------------------------------------------------------------

    def folders(self, session: imap.Session) -> list[str]:
        if self.row.folders:
            return json.loads(self.row.folders)
        if self.row.resolved:
            return json.loads(self.row.resolved)
        found = session.default_folders()
        accounts.remember_folders(self.ctx.engine, self.installation_id, self.user_id, found)
        return found

    def folder(self, session: imap.Session, folder: str) -> FolderResult:
        result = FolderResult(folder)
        now = int(time.time())
        cp = self.checkpoint(folder)
        try:
            status = session.status(folder)
        except imap.FolderMissing as exc:
            self._set(folder, state="missing", error=accounts.one_line(str(exc)), last_sync_s=now)
            if not self.row.folders:  # a default folder gone: look for the defaults again next run
                accounts.remember_folders(self.ctx.engine, self.installation_id, self.user_id, None)
            result.state, result.error = "missing", accounts.one_line(str(exc))
            return result
        last_uid = cp.last_uid
        if cp.uidvalidity != status.uidvalidity:
            if cp.uidvalidity is not None:
                log.info("installation %d user %d: a folder's UIDVALIDITY changed; walking it again",
                         self.installation_id, self.user_id)
            self._set(folder, uidvalidity=status.uidvalidity, last_uid=0, highestmodseq=None)
            last_uid = 0
        if status.uidnext - 1 <= last_uid or status.messages == 0:
            self._set(folder, state="ok", error=None, uidnext=status.uidnext, highestmodseq=status.highestmodseq,
                      backlog=0, last_sync_s=now)
            return result
        if self.spent():  # the budget limits fetching, not looking: the backlog from STATUS, at most
            result.backlog = min(status.messages, status.uidnext - 1 - last_uid)
            self._set(folder, uidnext=status.uidnext, backlog=result.backlog)
            return result
        uidvalidity, uids = session.uids_after(folder, last_uid)
        if uidvalidity != status.uidvalidity:  # recreated between STATUS and EXAMINE
            self._set(folder, uidvalidity=uidvalidity, last_uid=0, highestmodseq=None)
            last_uid = 0
            uidvalidity, uids = session.uids_after(folder, 0)
        top = last_uid  # the last UID committed by this run
        for start in range(0, len(uids), DESCRIBE):
            if self.spent():
                break
            group = uids[start:start + DESCRIBE]
            described = session.describe(group)
            stopped = False
            for chunk in chunks([described[u] for u in group if u in described]):
                if self.spent():
                    stopped = True
                    break
                self._store_chunk(session, folder, uidvalidity, chunk, result)
                top = chunk[-1].uid
            if stopped:
                break
            if group[-1] > top:  # expunged since the SEARCH: step past them
                self._commit_top(folder, uidvalidity, group[-1], 0)
                top = group[-1]
        result.backlog = sum(1 for u in uids if u > top)
        self.more = self.more or result.backlog > 0
        self._set(folder, state="ok", error=None, uidnext=status.uidnext, backlog=result.backlog,
                  last_sync_s=now, **({"highestmodseq": status.highestmodseq} if not result.backlog else {}))
        return result

    def spent(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.more = True
            return True
        return False

    def _commit_top(self, folder: str, uidvalidity: int, top: int, rejected: int) -> None:
        run_transaction(self.ctx.engine, lambda conn: self._advance(conn, folder, uidvalidity, top,
                                                                    rejected=rejected, strict=False))

    def _bodies(self, session: imap.Session, uids: list[int]) -> tuple[dict, dict]:
        """(uid -> bytes, uid -> error): a server answer that cannot be read is read again
        message by message, and rejects only the message it belongs to."""
        try:
            return session.bodies(uids, MAX_RAW + 1), {}
        except imap_errors.ProtocolError:
            if len(uids) == 1:
                return {}, {uids[0]: "raw: the server's answer for this message could not be read"}
        bodies, errors = {}, {}
        for uid in uids:
            got, bad = self._bodies(session, [uid])
            bodies.update(got)
            errors.update(bad)
        return bodies, errors

    def _store_chunk(self, session: imap.Session, folder: str, uidvalidity: int, chunk: list[imap.Described],
                     result: FolderResult) -> None:
        self.renew()
        rejected = [{"uid": d.uid, "error": f"raw: the message is {d.size} bytes, over {MAX_RAW // (1 << 20)} MiB; "
                                            "not downloaded"} for d in chunk if d.size > MAX_RAW]
        wanted = [d for d in chunk if d.size <= MAX_RAW]
        bodies, errors = self._bodies(session, [d.uid for d in wanted]) if wanted else ({}, {})
        rejected += [{"uid": uid, "error": error} for uid, error in sorted(errors.items())]
        fetched = [d for d in wanted if d.uid in bodies]
        result.fetched += len(fetched)
        messages = [_message(d, bodies[d.uid]) for d in fetched]
        uid_of = [d.uid for d in fetched]

        def advance(conn, part):
            self._advance(conn, folder, uidvalidity, max(uid_of[m.index] for m in part), synced=len(part))
        if messages:
            write_id = new_write_id(None, "crm.sync_mailbox", self.installation_id)
            stored = store_messages(self.ctx, self.installation_id, self.user_id, messages, write_id,
                                    in_transaction=advance)
            result.new += stored["new"]
            result.duplicates += stored["duplicates"]
            rejected += [{"uid": uid_of[r["index"]], "error": r["error"]} for r in stored["rejected"]]
        rejected.sort(key=lambda r: r["uid"])
        result.rejected += rejected
        self._commit_top(folder, uidvalidity, chunk[-1].uid, len(rejected))
        metrics.count(self.ctx.redis, {"sync_messages:fetched": len(fetched), "sync_messages:rejected": len(rejected)})

    def renew(self) -> None:
        try:
            self.claim.reacquire()
        except LockError:
            raise Overtaken("the claim on this mailbox expired") from None


def sync_mailbox(ctx, installation_id, user_id) -> dict:
    """``crm.sync_mailbox``: one run within the budget; returns what it did per folder."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    with ctx.engine.connect() as conn:
        row = accounts.load(conn, installation_id, user_id)
    if row is None:
        raise InvalidArgument("user_id", f"has no mailbox in installation {installation_id}")
    now = int(time.time())
    base = {"user_id": user_id}
    if not row.enabled:
        return {**base, "state": "disabled", "folders": []}
    if row.next_attempt_s > now and row.failures:
        return {**base, "state": row.state, "skipped": "backing off after a failure",
                "next_attempt_at": iso_seconds(row.next_attempt_s), "folders": []}
    settings = ctx.settings
    claim = ctx.redis.lock(keys.sync_claim(installation_id, user_id), timeout=settings.sync_claim,
                           blocking=False)
    if not claim.acquire():
        return {**base, "state": "syncing", "skipped": "another run is syncing this mailbox", "folders": []}
    try:
        return {**base, **_run(ctx, installation_id, user_id, row, claim, settings.sync_budget)}
    finally:
        try:
            claim.release()
        except LockError:  # lapsed (a stall longer than CRM_SYNC_CLAIM): another run may hold it now
            log.warning("installation %d user %d: the sync claim lapsed before the run ended",
                        installation_id, user_id)


def _run(ctx, installation_id: int, user_id: int, row, claim, budget_s: float) -> dict:
    secret = secrets.decrypt(ctx.settings.secret_keys, row.secret) if row.secret else ""
    account = imap.Account(row.host, row.port, row.security, row.ca_cert, row.username, row.auth, secret)
    run = Run(ctx, installation_id, user_id, row, claim, budget_s)
    results: list[FolderResult] = []
    now = int(time.time())
    try:
        with imap.Session(account) as session:
            for folder in run.folders(session):
                try:
                    results.append(run.folder(session, folder))
                except imap_errors.IMAPClientError as exc:  # a NO or BAD on one folder
                    error = accounts.one_line(f"{folder}: {exc.__class__.__name__}: {exc}")
                    run._set(folder, state="error", error=error, last_sync_s=now)
                    results.append(FolderResult(folder, state="error", error=error))
            round_trips = session.commands  # after login, before logout
    except imap.AuthFailed as exc:
        return _failed(ctx, installation_id, user_id, "auth_failed", exc, results)
    except imap.Unreachable as exc:
        return _failed(ctx, installation_id, user_id, "unreachable", exc, results)
    except Overtaken as exc:
        return {"state": "syncing", "skipped": str(exc), "folders": [r.as_dict() for r in results]}
    accounts.record_success(ctx.engine, installation_id, user_id, run.more, int(time.time()))
    metrics.count(ctx.redis, {"sync_runs:ok": 1,
                              "sync_messages:stored": sum(r.new + r.duplicates for r in results)})
    return {"state": "syncing" if run.more else "ok", "more": run.more, "round_trips": round_trips,
            "folders": [r.as_dict() for r in results]}


def _failed(ctx, installation_id: int, user_id: int, state: str, exc: Exception, results: list) -> dict:
    at = accounts.record_failure(ctx.engine, installation_id, user_id, state, str(exc), int(time.time()))
    log.warning("installation %d user %d: mailbox %s (%s)", installation_id, user_id, state, exc.__class__.__name__)
    metrics.count(ctx.redis, {f"sync_runs:{state}": 1})
    return {"state": state, "error": accounts.one_line(str(exc)), "next_attempt_at": iso_seconds(at),
            "folders": [r.as_dict() for r in results]}
