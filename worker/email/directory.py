"""The directory: clients and their domains, the installation's users and their
addresses, contacts.  Each upsert takes the installation's email lock, writes the rows
that changed, and re-links the stored messages those changes concern, in bounded chunks,
before it returns (links.py).
"""
from __future__ import annotations

import json
import time

import sqlalchemy as sa

from worker.db import locking, run_transaction
from worker.tables import client_domains, clients, contact_addresses, contact_terms, contacts, user_addresses, users
from worker.email.addresses import canonical_address, domain_of, fold, is_freemail, name_terms, registrable_domain
from worker.email import thread_state
from worker.email.links import affected_messages, lock_installation, materialize, own_domains_of
from worker.errors import InvalidArgument
from worker.mirror import sync_ids
from worker.rebuild import writer_token
from worker.writes import new_write_id, once
from worker.records import meeting_id, parse_time, positive_int, to_micros

MAX_ROWS = 1000
MAX_EMAILS = 100
MAX_DOMAINS = 100
#: Stored messages re-linked per transaction: a domain that concerns a million messages
#: holds neither the database nor Redis for long.
RELINK_CHUNK = 500


def _text(field: str, value, required: bool = True, limit: int = 255) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > limit:
        raise InvalidArgument(field, f"must be a string of 1 to {limit} characters")
    return value.strip()


def _list(field: str, value, limit: int) -> list:
    if not isinstance(value, list):
        raise InvalidArgument(field, f"must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidArgument(field, f"holds {len(value)} entries; at most {limit}")
    return value


def _addresses(field: str, value) -> list[str]:
    out = []
    for item in _list(field, value, MAX_EMAILS):
        canonical = canonical_address(item) if isinstance(item, str) else None
        if canonical is None:
            raise InvalidArgument(field, f"{item!r:.80} is not an email address")
        if canonical not in out:
            out.append(canonical)
    return out


def _updated(row: dict, now_us: int) -> int:
    value = row.get("updated_at")
    return now_us if value is None else to_micros(parse_time("updated_at", value))


def _check_fields(row, allowed: set, required: set):
    if not isinstance(row, dict):
        raise InvalidArgument("row", f"must be an object, got {type(row).__name__}")
    unknown = set(row) - allowed
    if unknown:
        raise InvalidArgument(sorted(unknown)[0], "is not a field of this record")
    missing = required - set(row)
    if missing:
        raise InvalidArgument(sorted(missing)[0], "is required")


def _relink(ctx, installation_id: int, token: str, ids: list[int], now_us: int) -> int:
    """Re-derive the links of ``ids`` in chunks, each its own transaction, and bring the
    index up to date with each chunk before the next.  Returns the messages changed."""
    changed_total = 0
    for start in range(0, len(ids), RELINK_CHUNK):
        part = ids[start:start + RELINK_CHUNK]

        def work(conn):
            lock_installation(conn, installation_id)
            changed = materialize(conn, installation_id, part, now_us)
            thread_state.refresh(conn, installation_id, thread_state.threads_of(conn, changed))
            return changed
        changed = run_transaction(locking(ctx.engine), work)
        if changed:
            ctx.mirror.write(installation_id, lambda t: sync_ids(ctx, installation_id, t, changed), token)
        changed_total += len(changed)
    return changed_total


def _upsert(ctx, installation_id, rows, field: str, validate, write, task_id) -> dict:
    """The shared shape of the three upserts: validate each row (rejecting it alone),
    write the valid ones under the installation's lock once per task, re-link.  ``field``
    names the rows (clients, users, contacts) and so the task (``crm.upsert_<field>``)."""
    installation_id = positive_int("installation_id", installation_id)
    _list(field, rows, MAX_ROWS)
    now_us = int(time.time() * 1_000_000)
    valid, rejected = [], []
    for index, row in enumerate(rows):
        try:
            valid.append((index, validate(row, now_us)))
        except InvalidArgument as exc:
            rejected.append({"index": index, "error": str(exc)})
    token = writer_token(ctx, installation_id)
    write_id = new_write_id(task_id, f"crm.upsert_{field}", installation_id)

    def work(conn):
        lock_installation(conn, installation_id)
        return write(conn, installation_id, valid)
    result, _ = run_transaction(locking(ctx.engine), lambda conn: once(conn, write_id, installation_id, work),
                                retry_duplicates=True)
    rejected = sorted(rejected + result.pop("rejected"), key=lambda r: r["index"])
    with ctx.engine.connect() as conn:
        ids = affected_messages(conn, installation_id, result.pop("addresses"), result.pop("domains"))
    _relink(ctx, installation_id, token, ids, now_us)
    return {**result, "rejected": rejected}


def _newest(valid: list, key) -> tuple[dict, int]:
    """Within a batch the newest version of a key wins (the later one on a tie)."""
    newest = {}
    for index, row in valid:
        k = key(row)
        if k not in newest or row["updated_us"] >= newest[k][1]["updated_us"]:
            newest[k] = (index, row)
    return newest, len(valid) - len(newest)


# -- clients ---------------------------------------------------------------------------

def _valid_client(row, now_us: int) -> dict:
    _check_fields(row, {"client_id", "name", "domains", "updated_at"}, {"client_id", "name"})
    domains = []
    for item in _list("domains", row.get("domains", []), MAX_DOMAINS):
        if not isinstance(item, str) or not item.strip() or len(item) > 253 or "@" in item or " " in item.strip():
            raise InvalidArgument("domains", f"{item!r:.80} is not a domain")
        domain = registrable_domain(item)
        if "." not in domain:
            raise InvalidArgument("domains", f"{item!r:.80} is not a registrable domain")
        if is_freemail(domain):
            raise InvalidArgument("domains", f"{domain} is a free-mail domain and cannot belong to a client")
        if domain not in domains:
            domains.append(domain)
    return {"client_id": positive_int("client_id", row["client_id"]), "name": _text("name", row["name"]),
            "domains": sorted(domains), "updated_us": _updated(row, now_us)}


def _write_clients(conn, installation_id: int, valid: list) -> dict:
    newest, unchanged = _newest(valid, lambda r: r["client_id"])
    updated, rejected, touched_domains = 0, [], set()
    for client_id, (index, row) in sorted(newest.items()):
        old = conn.execute(sa.select(clients).where(clients.c.installation_id == installation_id,
                                                    clients.c.client_id == client_id)).first()
        if old is not None and (old.updated_us > row["updated_us"] or
                                (old.name, json.loads(old.domains)) == (row["name"], row["domains"])):
            unchanged += 1
            continue
        owners = dict(conn.execute(sa.select(client_domains.c.domain, client_domains.c.client_id).where(
            client_domains.c.installation_id == installation_id, client_domains.c.domain.in_(row["domains"]))).all())
        clash = next(((d, c) for d, c in sorted(owners.items()) if c != client_id), None)
        if clash:
            rejected.append({"index": index, "error": f"domains: {clash[0]} belongs to client {clash[1]}"})
            continue
        before = set(json.loads(old.domains)) if old is not None else set()
        after = set(row["domains"])
        values = {"name": row["name"], "domains": json.dumps(row["domains"]), "updated_us": row["updated_us"]}
        if old is None:
            conn.execute(clients.insert().values(installation_id=installation_id, client_id=client_id, **values))
        else:
            updated += 1
            conn.execute(clients.update().where(clients.c.installation_id == installation_id,
                                                clients.c.client_id == client_id).values(**values))
        if before - after:
            conn.execute(client_domains.delete().where(client_domains.c.installation_id == installation_id,
                                                       client_domains.c.domain.in_(sorted(before - after))))
        if after - before:
            conn.execute(client_domains.insert(), [{"installation_id": installation_id, "domain": d,
                                                    "client_id": client_id} for d in sorted(after - before)])
        touched_domains |= before ^ after
    accepted = len(valid) - len(rejected)
    return {"accepted": accepted, "updated": updated, "unchanged": unchanged, "rejected": rejected,
            "addresses": [], "domains": sorted(touched_domains)}


def upsert_clients(ctx, installation_id, rows, task_id: str | None = None) -> dict:
    """``crm.upsert_clients``."""
    return _upsert(ctx, installation_id, rows, "clients", _valid_client, _write_clients, task_id)


# -- users -----------------------------------------------------------------------------

def _valid_user(row, now_us: int) -> dict:
    _check_fields(row, {"user_id", "name", "emails"}, {"user_id"})
    name = row.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 255):
        raise InvalidArgument("name", "must be a string of at most 255 characters")
    return {"user_id": positive_int("user_id", row["user_id"]), "name": name,
            "emails": _addresses("emails", row.get("emails", [])), "updated_us": now_us}


def _write_users(conn, installation_id: int, valid: list) -> dict:
    newest, unchanged = _newest(valid, lambda r: r["user_id"])
    all_before = set(conn.execute(sa.select(user_addresses.c.address).where(
        user_addresses.c.installation_id == installation_id)).scalars())
    updated, rejected, touched = 0, [], set()
    for user_id, (index, row) in sorted(newest.items()):
        old = conn.execute(sa.select(users.c.name, users.c.emails, users.c.access_version).where(
            users.c.installation_id == installation_id, users.c.user_id == user_id).with_for_update()).first()
        before = json.loads(old.emails) if old is not None and old.emails else []
        if old is not None and (old.name, before) == (row["name"], row["emails"]):
            unchanged += 1
            continue
        owners = dict(conn.execute(sa.select(user_addresses.c.address, user_addresses.c.user_id).where(
            user_addresses.c.installation_id == installation_id,
            user_addresses.c.address.in_(row["emails"]))).all())
        clash = next(((a, u) for a, u in sorted(owners.items()) if u != user_id), None)
        if clash:
            rejected.append({"index": index, "error": f"emails: {clash[0]} belongs to user {clash[1]}"})
            continue
        values = {"name": row["name"], "emails": json.dumps(row["emails"])}
        if old is None:
            conn.execute(users.insert().values(installation_id=installation_id, user_id=user_id,
                                               access_version=0, **values))
        else:
            if old.emails is not None or old.name is not None:
                updated += 1
            conn.execute(users.update().where(users.c.installation_id == installation_id,
                                              users.c.user_id == user_id).values(**values))
        gone, new = set(before) - set(row["emails"]), set(row["emails"]) - set(before)
        if gone:
            conn.execute(user_addresses.delete().where(user_addresses.c.installation_id == installation_id,
                                                       user_addresses.c.address.in_(sorted(gone))))
        if new:
            conn.execute(user_addresses.insert(), [{"installation_id": installation_id, "address": a,
                                                    "user_id": user_id, "domain": domain_of(a)} for a in sorted(new)])
        touched |= gone | new
    all_after = set(conn.execute(sa.select(user_addresses.c.address).where(
        user_addresses.c.installation_id == installation_id)).scalars())
    domains = own_domains_of(all_before) ^ own_domains_of(all_after)
    return {"accepted": len(valid) - len(rejected), "updated": updated, "unchanged": unchanged,
            "rejected": rejected, "addresses": sorted(touched), "domains": sorted(domains)}


def upsert_users(ctx, installation_id, rows, task_id: str | None = None) -> dict:
    """``crm.upsert_users``."""
    return _upsert(ctx, installation_id, rows, "users", _valid_user, _write_users, task_id)


# -- contacts --------------------------------------------------------------------------

def _valid_contact(row, now_us: int) -> dict:
    _check_fields(row, {"source_id", "name", "emails", "client_id", "job_title", "updated_at"}, {"source_id", "name"})
    client_id = row.get("client_id")
    return {"source_id": _text("source_id", row["source_id"]), "name": _text("name", row["name"]),
            "emails": _addresses("emails", row.get("emails", [])),
            "client_id": None if client_id is None else positive_int("client_id", client_id),
            "job_title": _text("job_title", row.get("job_title"), required=False),
            "updated_us": _updated(row, now_us)}


def contact_id(installation_id: int, source_id: str) -> int:
    return meeting_id(installation_id, "contact\x00" + source_id)


def _write_contacts(conn, installation_id: int, valid: list) -> dict:
    newest, unchanged = _newest(valid, lambda r: r["source_id"])
    updated, touched = 0, set()
    for source_id, (_index, row) in sorted(newest.items()):
        old = conn.execute(sa.select(contacts).where(contacts.c.installation_id == installation_id,
                                                     contacts.c.source_id == source_id)).first()
        content = (row["name"], row["emails"], row["client_id"], row["job_title"])
        if old is not None and (old.updated_us > row["updated_us"] or
                                (old.name, json.loads(old.emails), old.client_id, old.job_title) == content):
            unchanged += 1
            continue
        cid = old.id if old is not None else contact_id(installation_id, source_id)
        values = {"name": row["name"], "sort_name": fold(row["name"]), "emails": json.dumps(row["emails"]),
                  "client_id": row["client_id"], "job_title": row["job_title"],
                  "job_key": fold(row["job_title"]) if row["job_title"] else None, "updated_us": row["updated_us"]}
        before = json.loads(old.emails) if old is not None else []
        if old is None:
            conn.execute(contacts.insert().values(id=cid, installation_id=installation_id, source_id=source_id,
                                                  **values))
        else:
            updated += 1
            conn.execute(contacts.update().where(contacts.c.id == cid).values(**values))
            conn.execute(contact_addresses.delete().where(contact_addresses.c.contact_id == cid))
            conn.execute(contact_terms.delete().where(contact_terms.c.contact_id == cid))
        if row["emails"]:
            conn.execute(contact_addresses.insert(), [{"installation_id": installation_id, "address": a,
                                                       "contact_id": cid} for a in row["emails"]])
        terms = name_terms(row["name"]) | set(row["emails"])
        conn.execute(contact_terms.insert(), [{"installation_id": installation_id, "term": t[:255],
                                               "contact_id": cid} for t in sorted({t[:255] for t in terms})])
        touched |= set(before) | set(row["emails"])
    return {"accepted": len(valid), "updated": updated, "unchanged": unchanged, "rejected": [],
            "addresses": sorted(touched), "domains": []}


def upsert_contacts(ctx, installation_id, rows, task_id: str | None = None) -> dict:
    """``crm.upsert_contacts``."""
    return _upsert(ctx, installation_id, rows, "contacts", _valid_contact, _write_contacts, task_id)
