"""Threads: the connected components of messages and the ids they mention.

The rule is notmuch's: nodes are message keys (stored messages) and the ids their
``References`` and ``In-Reply-To`` name (ghosts until stored); each message is joined to
every id it names, and a thread is a connected component, so a reply that arrives before
its parent is threaded at once and a message that names two threads merges them.

Where it differs from JWZ threading (Zawinski's algorithm, RFC 5256 REFERENCES): a thread
here is a set, not a tree (there is no parent order to get wrong; messages list by date);
and JWZ merges root threads that share a base subject whatever their headers, while here
only a message with neither header, and referenced by no stored message, may join by
subject — so a subject never merges threads that headers keep apart.  Such a message is
joined to a subject node: its normalized subject (localized prefixes gone) with the
unordered pair of its sender and first recipient, in one fixed 30-day bucket of its date
(days since the epoch // 30, not a window around it); and, for each mailbox that gave a
``provider_thread_id``, to that mailbox's provider thread node: the provider's own
grouping (a Gmail or Graph conversation id) is a hint with the same weight as a subject,
scoped to the mailbox because providers number threads per account.  Subject and hint
nodes are the *weak* nodes: they never name a thread, and a message leaves them as soon
as a stored message references it.

The edges are a function of the stored messages alone, and a thread's id is derived from
its smallest key, so any arrival order of the same messages gives the same threads.
Threads merge when a message links two, and split again only when a weak edge goes.  The
caller holds the installation's email lock (ingest.py): components are read and
rewritten by one writer at a time.
"""
from __future__ import annotations

import hashlib

import sqlalchemy as sa

from worker.db import update_rows
from worker.tables import email_refs, emails

SUBJECT_WINDOW_S = 30 * 86400
#: The names of weak nodes (subjects, provider hints) start with this.  It holds a space,
#: which no message key does (parse.message_key), so a weak node never names a message.
#: Stored in ``email_refs``: the value stays.
WEAK_PREFIX = "subject "


def thread_id(installation_id: int, smallest_key: str) -> str:
    return "t" + hashlib.blake2b(f"{installation_id}\x00{smallest_key}".encode(), digest_size=12).hexdigest()


def subject_node(subject_key: str | None, participants, date_s: int) -> str | None:
    if not subject_key:
        return None
    sender = [a for role, a, _ in participants if role == "from"]
    to = [a for role, a, _ in participants if role in ("to", "cc")]
    pair = sorted(set(sender[:1] + to[:1]))
    digest = hashlib.blake2b("\x00".join([subject_key, *pair, str(date_s // SUBJECT_WINDOW_S)]).encode(),
                             digest_size=16).hexdigest()
    return WEAK_PREFIX + digest


def provider_node(user_id: int, provider_thread_id: str | None) -> str | None:
    if not provider_thread_id:
        return None
    digest = hashlib.blake2b(f"{user_id}\x00{provider_thread_id}".encode(), digest_size=16).hexdigest()
    return WEAK_PREFIX + "p" + digest


def _chunks(values, size=500):
    values = sorted(values)
    for start in range(0, len(values), size):
        yield values[start:start + size]


def link_new(conn, installation_id: int, new: list, hints: list = ()) -> set:
    """Write the edges of newly stored messages ``new`` ([(meeting_id, key, refs,
    [weak nodes]: subject and provider hints)]) and drop the weak edges of stored messages
    they reference; add the provider hints ``hints`` ([(meeting_id, key, node)]) that a
    new mailbox gives a stored message without threading headers.
    Returns the nodes whose components must be recomputed."""
    start = set()
    keys = {key for _, key, _, _ in new} | {key for _, key, _ in hints}
    referenced = set()
    for part in _chunks(keys):
        referenced.update(conn.execute(sa.select(email_refs.c.ref_key).where(
            email_refs.c.installation_id == installation_id, email_refs.c.ref_key.in_(part))).scalars())
    named = {ref for _, _, refs, _ in new for ref in refs}
    rows = []
    for meeting_id, key, refs, weak in new:
        start.add(key)
        for ref in refs:
            rows.append({"installation_id": installation_id, "meeting_id": meeting_id, "ref_key": ref})
            start.add(ref)
        if not refs and key not in referenced and key not in named:
            for node in sorted(set(weak)):
                rows.append({"installation_id": installation_id, "meeting_id": meeting_id, "ref_key": node})
                start.add(node)
    if hints:
        candidates = {h for h in hints if h[1] not in referenced and h[1] not in named}
        have = set()
        for part in _chunks({m for m, _, _ in candidates}):
            have.update(tuple(r) for r in conn.execute(sa.select(email_refs.c.meeting_id, email_refs.c.ref_key).where(
                email_refs.c.meeting_id.in_(part))).all())
        # Only a message whose edges are all weak (no threading headers) takes a hint.
        strong = {m for m, ref in have if not ref.startswith(WEAK_PREFIX)}
        for meeting_id, key, node in sorted(candidates):
            if meeting_id not in strong and (meeting_id, node) not in have:
                rows.append({"installation_id": installation_id, "meeting_id": meeting_id, "ref_key": node})
                start.update((node, key))
    if rows:
        conn.execute(email_refs.insert(), rows)
    # Stored messages that a new one references leave their weak threads.
    for part in _chunks(named):
        stored = dict(conn.execute(sa.select(emails.c.meeting_id, emails.c.message_key).where(
            emails.c.installation_id == installation_id, emails.c.message_key.in_(part))).all())
        if not stored:
            continue
        weak_edges = email_refs.c.meeting_id.in_(sorted(stored)), email_refs.c.ref_key.like(WEAK_PREFIX + "%")
        left = conn.execute(sa.select(email_refs.c.meeting_id, email_refs.c.ref_key).where(*weak_edges)).all()
        if left:
            conn.execute(email_refs.delete().where(*weak_edges))
            # The message and what stays joined to the nodes it left: both may split.
            start.update(stored[i] for i, _ in left)
            start.update(node for _, node in left)
    return start


def recompute(conn, installation_id: int, start: set) -> tuple[dict[int, str], set[str]]:
    """Walk the components of the nodes ``start`` and give each message its thread id;
    returns {meeting_id: thread id} for the messages whose id changed, and the ids they
    had (threads that lost messages)."""
    message_nodes, current = _component(conn, installation_id, start)
    changed = {}
    for meeting_id, tid in _thread_ids(installation_id, message_nodes).items():
        if current.get(meeting_id) != tid:
            changed[meeting_id] = tid
    update_rows(conn, emails, "meeting_id", [{"meeting_id": m, "thread_id": t} for m, t in sorted(changed.items())])
    return changed, {current[m] for m in changed if current.get(m)}


def _component(conn, installation_id: int, start: set) -> tuple[dict[int, set], dict[int, str]]:
    """The stored messages connected to the nodes ``start``: {meeting id: the nodes it
    joins (its key, the ids it names, its weak nodes)} and their current thread ids."""
    message_nodes: dict[int, set] = {}
    current: dict[int, str] = {}
    seen, frontier = set(), set(start)
    while frontier:
        seen |= frontier
        found = set()
        for part in _chunks(frontier):
            found.update(conn.execute(sa.select(emails.c.meeting_id).where(
                emails.c.installation_id == installation_id, emails.c.message_key.in_(part))).scalars())
            found.update(conn.execute(sa.select(email_refs.c.meeting_id).where(
                email_refs.c.installation_id == installation_id, email_refs.c.ref_key.in_(part))).scalars())
        found -= set(message_nodes)
        if not found:
            break
        for part in _chunks(found):
            for meeting_id, key, tid in conn.execute(sa.select(emails.c.meeting_id, emails.c.message_key,
                                                               emails.c.thread_id).where(emails.c.meeting_id.in_(part))):
                message_nodes.setdefault(meeting_id, set()).add(key)
                current[meeting_id] = tid
            for meeting_id, ref in conn.execute(sa.select(email_refs.c.meeting_id, email_refs.c.ref_key)
                                                .where(email_refs.c.meeting_id.in_(part))):
                message_nodes.setdefault(meeting_id, set()).add(ref)
        frontier = {n for i in found for n in message_nodes.get(i, ())} - seen
    return message_nodes, current


def _thread_ids(installation_id: int, message_nodes: dict[int, set]) -> dict[int, str]:
    """Union-find over the nodes, each message joining its own: every message's thread id,
    derived from the smallest id (not weak node) of its component."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for nodes in message_nodes.values():
        first, *rest = sorted(nodes)
        find(first)
        for other in rest:
            a, b = find(first), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    smallest: dict[str, str] = {}
    for node in parent:
        if node.startswith(WEAK_PREFIX):
            continue
        root = find(node)
        if root not in smallest or node < smallest[root]:
            smallest[root] = node
    return {meeting_id: thread_id(installation_id, smallest[find(next(iter(nodes)))])
            for meeting_id, nodes in message_nodes.items()}
