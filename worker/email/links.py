"""Who an email links to, which way it went, and who may see it — derived in one place
from its stored participants, its mailboxes and the directory as it stands, so that new
messages and re-linked ones (after a client, contact or user change) follow one rule.

The rule (contract, "Links"): participants in role order (from, to, cc, reply-to), then
header order; an address of a contact that has a client links to that client through the
contact; otherwise the address's registrable domain links to the client that owns it,
unless it is a free-mail domain or one of the installation's own.  The installation's own
users link nothing.  ``client_id`` is the first link's client (0, shown as null, when
none); the email is visible to the users of any linked client and to the users from whose
mailboxes it was read.
"""
from __future__ import annotations

import collections
import dataclasses
import json

import sqlalchemy as sa

from worker import rollups
from worker.db import update_rows
from worker.email.addresses import domain_of, is_freemail
from worker.tables import (client_domains, contact_addresses, contacts, email_links, email_mailboxes,
                           email_participants, emails, installations, meeting_reach, meetings, user_addresses)

CONTACT = "contact_address"
DOMAIN = "client_domain"


@dataclasses.dataclass
class Directory:
    """The part of the directory that a set of messages needs."""
    users: set            # those of the addresses asked about that are the installation's users'
    own_domains: set      # those of their domains that are a user's registrable domain, free-mail aside
    contacts: dict        # address -> [(source_id, contact_id, client_id)], by source_id
    domains: dict         # registrable domain -> client_id


def own_domains_of(addresses) -> set:
    return {d for d in (domain_of(a) for a in addresses) if not is_freemail(d)}


def load_directory(conn, installation_id: int, addresses: set) -> Directory:
    """What the directory says of ``addresses`` (and of their domains), read through the
    indexes: a few rows per participant, not the installation's whole directory."""
    found = collections.defaultdict(list)
    wanted = sorted(addresses)
    domains = sorted({domain_of(a) for a in addresses})
    users, own = set(), set()
    u = user_addresses.c
    for start in range(0, len(wanted), 500):
        users.update(conn.execute(sa.select(u.address).where(
            u.installation_id == installation_id, u.address.in_(wanted[start:start + 500]))).scalars())
    for start in range(0, len(domains), 500):
        own.update(conn.execute(sa.select(u.domain).distinct().where(
            u.installation_id == installation_id, u.domain.in_(domains[start:start + 500]))).scalars())
    for start in range(0, len(wanted), 500):
        for address, source_id, contact_id, client_id in conn.execute(
                sa.select(contact_addresses.c.address, contacts.c.source_id, contacts.c.id, contacts.c.client_id)
                .join(contacts, contacts.c.id == contact_addresses.c.contact_id)
                .where(contact_addresses.c.installation_id == installation_id,
                       contact_addresses.c.address.in_(wanted[start:start + 500]))):
            found[address].append((source_id, contact_id, client_id))
    for entries in found.values():
        entries.sort()
    owners = {}
    for start in range(0, len(domains), 500):
        owners.update(conn.execute(sa.select(client_domains.c.domain, client_domains.c.client_id).where(
            client_domains.c.installation_id == installation_id,
            client_domains.c.domain.in_(domains[start:start + 500]))).all())
    return Directory(users, {d for d in own if not is_freemail(d)}, dict(found), owners)


def derive_links(participants, directory: Directory) -> list[tuple[int, int | None, str, int]]:
    """[(client_id, contact_id or None, reason, participant position)] in link order."""
    links = []
    for position, (_role, address, _name) in enumerate(participants):
        if address in directory.users:
            continue
        linked = False
        for _source_id, contact_id, client_id in directory.contacts.get(address, ()):
            if client_id:
                links.append((client_id, contact_id, CONTACT, position))
                linked = True
                break
        if linked:
            continue
        domain = domain_of(address)
        if domain in directory.own_domains or is_freemail(domain):
            continue
        owner = directory.domains.get(domain)
        if owner:
            links.append((owner, None, DOMAIN, position))
    return links


def direction_of(from_address: str | None, directory: Directory) -> str:
    if from_address and (from_address in directory.users or domain_of(from_address) in directory.own_domains):
        return "outbound"
    return "inbound"


def details_json(participants, thread_id: str, direction: str) -> str:
    by_role = collections.defaultdict(list)
    for role, address, name in participants:
        by_role[role].append({"address": address, "name": name or None})
    details = {"thread_id": thread_id, "direction": direction,
               "from": by_role["from"][0] if by_role["from"] else None,
               "to": by_role["to"], "cc": by_role["cc"], "reply_to": by_role["reply_to"]}
    return json.dumps(details, ensure_ascii=False, separators=(",", ":"))


def reach_text(primary: int, links, mailbox_users) -> str | None:
    secondary = sorted({c for c, *_ in links} - {primary})
    users = sorted(set(mailbox_users))
    if not secondary and not users:
        return None
    return "%s/%s" % (",".join(map(str, secondary)), ",".join(map(str, users)))


def lock_installation(conn, installation_id: int) -> None:
    """The installation's email lock: stored messages, their threads and links have one
    writer at a time (ingestion, re-linking)."""
    conn.execute(sa.select(installations.c.id).where(installations.c.id == installation_id).with_for_update())


@dataclasses.dataclass
class Fresh:
    """A message new to the store, whose meeting row is not written yet: ``row`` holds
    its columns but those derived here (client, direction, details, reach)."""
    row: dict
    participants: list
    from_address: str | None
    thread_id: str
    mailbox_user: int


@dataclasses.dataclass
class _Changes:
    """What one materialize call writes, gathered so that each table gets a few
    statements per chunk, not one per message."""
    installation_id: int
    inserts: list = dataclasses.field(default_factory=list)   # new meeting rows
    updates: list = dataclasses.field(default_factory=list)   # changed columns of stored ones
    relinked: list = dataclasses.field(default_factory=list)  # messages whose links are replaced
    links: list = dataclasses.field(default_factory=list)     # their link rows (and the new ones')
    reached: list = dataclasses.field(default_factory=list)   # messages whose reach rows are replaced
    reach: list = dataclasses.field(default_factory=list)     # their reach rows (and the new ones')
    removed: list = dataclasses.field(default_factory=list)   # rollup cells out
    added: list = dataclasses.field(default_factory=list)     # rollup cells in
    changed: list = dataclasses.field(default_factory=list)   # meeting ids written

    def set_links(self, meeting_id: int, links, replace: bool) -> None:
        """The message's link rows; ``replace``: its stored ones go first."""
        if replace:
            self.relinked.append(meeting_id)
        self.links += _link_rows(self.installation_id, meeting_id, links)

    def set_reach(self, meeting_id: int, primary: int, links, mailbox_users, replace: bool) -> None:
        """The message's reach rows; ``replace``: its stored ones go first."""
        if replace:
            self.reached.append(meeting_id)
        self.reach += _reach_rows(self.installation_id, meeting_id, primary, links, mailbox_users)


def materialize(conn, installation_id: int, ids, now_us: int, fresh: dict | None = None) -> list[int]:
    """Derive links, direction, visibility and details of the emails ``ids`` from what is
    stored now, and write what differs (meeting row, links, reach), except for those whose
    meeting row a record owns (``emails.by_record``), which are left as they are; and of
    the messages ``fresh`` ({meeting id: Fresh}), whose meeting rows are inserted here,
    complete, with their links and reach.  The caller holds the installation's email
    lock.  Returns the meeting ids whose row changed or was inserted."""
    fresh = fresh or {}
    stored, mailboxes, old_links = _load_stored(conn, sorted(set(ids) - set(fresh)))
    parts = {i: [tuple(p) for p in json.loads(row.participants)] for i, row in stored.items()}
    parts.update((i, f.participants) for i, f in fresh.items())
    directory = load_directory(conn, installation_id, {a for ps in parts.values() for _, a, _ in ps})
    changes = _Changes(installation_id)
    for meeting_id, f in sorted(fresh.items()):
        _derive_new(changes, meeting_id, f, directory)
    for meeting_id, row in stored.items():
        _derive_stored(changes, meeting_id, row, parts[meeting_id], mailboxes[meeting_id], old_links[meeting_id],
                       directory, now_us)
    _write(conn, changes)
    return changes.changed


def _load_stored(conn, ids: list[int]):
    """The stored messages ``ids`` (email and meeting columns; not those a record owns),
    their mailboxes and their links as stored."""
    stored, mailboxes, old_links = {}, collections.defaultdict(list), collections.defaultdict(list)
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        for row in conn.execute(
                sa.select(emails.c.meeting_id, emails.c.participants, emails.c.thread_id, emails.c.from_address,
                          meetings.c.client_id, meetings.c.type, meetings.c.status, meetings.c.meeting_s,
                          meetings.c.details, meetings.c.reach, meetings.c.updated_us)
                .join(meetings, meetings.c.id == emails.c.meeting_id)
                # A meeting record that replaced an email owns its row: its fields and
                # who sees it are the record's alone, whatever the email says.
                .where(emails.c.meeting_id.in_(part), sa.not_(emails.c.by_record))):
            stored[row.meeting_id] = row
        part = sorted(set(part) & set(stored))
        for meeting_id, user_id in conn.execute(sa.select(email_mailboxes.c.meeting_id, email_mailboxes.c.user_id)
                                                .where(email_mailboxes.c.meeting_id.in_(part))):
            mailboxes[meeting_id].append(user_id)
        for link in conn.execute(sa.select(email_links.c.meeting_id, email_links.c.client_id, email_links.c.contact_id,
                                           email_links.c.reason, email_links.c.position)
                                 .where(email_links.c.meeting_id.in_(part))
                                 .order_by(email_links.c.meeting_id, email_links.c.position)):
            old_links[link.meeting_id].append((link.client_id, link.contact_id, link.reason, link.position))
    return stored, mailboxes, old_links


def _derive_new(changes: _Changes, meeting_id: int, f: Fresh, directory: Directory) -> None:
    """A new message's meeting row, complete, with its links and reach rows."""
    links, primary, direction, details, reach = _derive(f.participants, f.from_address, f.thread_id,
                                                        [f.mailbox_user], directory)
    changes.set_links(meeting_id, links, replace=False)
    changes.set_reach(meeting_id, primary, links, [f.mailbox_user], replace=False)
    changes.inserts.append({**f.row, "client_id": primary, "status": direction, "details": details, "reach": reach})
    changes.added.append(rollups.Cell(primary, f.row["type"], direction, f.row["meeting_s"]))
    changes.changed.append(meeting_id)


def _derive_stored(changes: _Changes, meeting_id: int, row, participants, mailbox_users, old_links,
                   directory: Directory, now_us: int) -> None:
    """A stored message as the directory stands now: what differs is written."""
    links, primary, direction, details, reach = _derive(participants, row.from_address, row.thread_id,
                                                        mailbox_users, directory)
    if links != old_links:
        changes.set_links(meeting_id, links, replace=True)
    if (primary, direction, details, reach) == (row.client_id, row.status, row.details, row.reach):
        return
    if reach != row.reach or primary != row.client_id:
        changes.set_reach(meeting_id, primary, links, mailbox_users, replace=True)
    if (primary, direction) != (row.client_id, row.status):
        changes.removed.append(rollups.cell(row))
        changes.added.append(rollups.Cell(primary, row.type, direction, row.meeting_s))
    updated_us = max(now_us, row.updated_us + 1)
    changes.updates.append({"id": meeting_id, "client_id": primary, "status": direction, "details": details,
                            "reach": reach, "updated_us": updated_us, "updated_s": updated_us // 1_000_000})
    changes.changed.append(meeting_id)


def _write(conn, changes: _Changes) -> None:
    """A few statements per table for the whole call."""
    if changes.inserts:
        conn.execute(meetings.insert(), changes.inserts)
    for table, ids, rows in ((email_links, changes.relinked, changes.links),
                             (meeting_reach, changes.reached, changes.reach)):
        for start in range(0, len(ids), 500):
            conn.execute(table.delete().where(table.c.meeting_id.in_(ids[start:start + 500])))
        if rows:
            conn.execute(table.insert(), rows)
    update_rows(conn, meetings, "id", changes.updates)
    rollups.apply(conn, changes.installation_id, changes.removed, changes.added)


def _derive(participants, from_address, thread_id: str, mailbox_users, directory: Directory):
    """An email's (links, primary client, direction, details JSON, reach) as the
    directory stands."""
    links = derive_links(participants, directory)
    primary = links[0][0] if links else 0
    direction = direction_of(from_address, directory)
    return (links, primary, direction, details_json(participants, thread_id, direction),
            reach_text(primary, links, mailbox_users))


def _link_rows(installation_id: int, meeting_id: int, links) -> list[dict]:
    return [{"installation_id": installation_id, "meeting_id": meeting_id, "position": position,
             "client_id": client_id, "contact_id": contact_id, "reason": reason}
            for client_id, contact_id, reason, position in links]


def _reach_rows(installation_id: int, meeting_id: int, primary: int, links, mailbox_users) -> list[dict]:
    """``meeting_reach``: the other linked clients (never the primary) and the mailboxes."""
    return ([{"installation_id": installation_id, "meeting_id": meeting_id, "client_id": c, "user_id": 0}
             for c in sorted({c for c, *_ in links} - {primary})]
            + [{"installation_id": installation_id, "meeting_id": meeting_id, "client_id": 0, "user_id": u}
               for u in sorted(set(mailbox_users))])


def affected_messages(conn, installation_id: int, addresses=(), domains=()) -> list[int]:
    """The stored messages in which one of ``addresses`` or an address on one of
    ``domains`` takes part."""
    found = set()
    p = email_participants.c
    for column, values in ((p.address, sorted(set(addresses))), (p.domain, sorted(set(domains)))):
        for start in range(0, len(values), 500):
            found.update(conn.execute(sa.select(p.meeting_id).where(
                p.installation_id == installation_id, column.in_(values[start:start + 500]))).scalars())
    return sorted(found)
