"""A synthetic mail world for the email tests, a brute-force oracle of what each user must
see, written independently of worker/email (its own linking rule, its own threads), and
the helpers that store the world through the service."""
from __future__ import annotations

import base64
import dataclasses
import email.utils
import random

from worker.email import directory, ingest

CLIENTS = {1: ["c1.com"], 2: ["c2.com"], 3: ["c3.co.uk"]}
USERS = {1: ["u1@ours.com"], 2: ["u2@ours.com"], 3: ["u3@gmail.com"]}
OWN = {"ours.com"}
FREE = {"gmail.com", "yahoo.com", "hotmail.com"}
# source_id -> (name, addresses, client, job title)
CONTACTS = {
    "k1": ("Pat Quinn", ["pat@gmail.com"], 2, "CTO"),
    "k2": ("Sam Ödegaard", ["sam@c1.com", "sam.alt@yahoo.com"], 3, "Buyer"),
    "k3": ("Lee Park", ["lee@hotmail.com"], None, None),
}
OUTSIDERS = ["a@c1.com", "b@sub.c1.com", "c@c2.com", "d@mail.c3.co.uk", "pat@gmail.com", "sam@c1.com",
             "sam.alt@yahoo.com", "lee@hotmail.com", "x@unknown.org", "y@c4.com"]
INSIDERS = [a for addresses in USERS.values() for a in addresses]


def registrable(domain: str) -> str:
    parts = domain.split(".")
    return ".".join(parts[-3:]) if domain.endswith(".co.uk") else ".".join(parts[-2:])


def links_of(participants) -> list[int]:
    """The contract's link rule, by brute force: the clients in link order."""
    by_address = {a: c for _, (_, addresses, c, _) in CONTACTS.items() for a in addresses}
    owners = {d: c for c, domains in CLIENTS.items() for d in domains}
    out = []
    for _role, address in participants:
        if address in INSIDERS:
            continue
        if by_address.get(address):
            out.append(by_address[address])
            continue
        domain = registrable(address.split("@")[1])
        if domain in OWN or domain in FREE:
            continue
        if domain in owners:
            out.append(owners[domain])
    return out


@dataclasses.dataclass
class Message:
    key: str              # the expected message key
    conversation: int     # the expected thread
    raw: bytes
    date_s: int
    sender: str
    participants: list    # [(role, address)]
    mailboxes: list       # users it is read from
    inbound: bool
    subject: str
    hints: dict = dataclasses.field(default_factory=dict)  # user -> provider_thread_id
    refs: list = dataclasses.field(default_factory=list)

    @property
    def links(self):
        return links_of(self.participants)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _raw(headers: list[tuple[str, str]]) -> bytes:
    return ("".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\nbody\r\n").encode()


def corpus(seed: int = 1, conversations: int = 12) -> list[Message]:
    """Conversations of 1-6 messages (replies carry In-Reply-To and References, some
    localized prefixes), each message in 1-2 mailboxes; two headerless messages that
    join by subject; a message without Message-ID."""
    rng = random.Random(seed)
    base = 1_700_000_000
    out = []
    for conv in range(conversations):
        outsider = rng.choice(OUTSIDERS)
        insider = rng.choice(INSIDERS)
        cc = rng.choice([None, rng.choice(OUTSIDERS)])
        subject = f"Deal {conv}"
        ids = []
        for n in range(rng.randint(1, 6)):
            inbound = n % 2 == 0 if rng.random() < 0.8 else n % 2 == 1
            sender, to = (outsider, insider) if inbound else (insider, outsider)
            key = f"m{conv}.{n}@{sender.split('@')[1]}"
            date_s = base + conv * 86400 + n * 3600 + rng.randint(0, 600)
            prefix = rng.choice(["Re: ", "AW: ", "SV: ", "Re[2]: ", "RE: "]) if n else ""
            headers = [("Message-ID", f"<{key}>"), ("From", f"Person <{sender}>"), ("To", to),
                       ("Subject", prefix + subject), ("Date", email.utils.formatdate(date_s))]
            participants = [("from", sender), ("to", to)]
            if cc:
                headers.append(("Cc", cc))
                participants.append(("cc", cc))
            if ids:
                headers += [("In-Reply-To", f"<{ids[-1]}>"), ("References", " ".join(f"<{i}>" for i in ids))]
            ids.append(key)
            mailboxes = sorted(rng.sample(sorted(USERS), rng.randint(1, 2)))
            out.append(Message(key, conv, _raw(headers), date_s, sender, participants, mailboxes,
                               sender not in INSIDERS, prefix + subject))
    # Headerless, same subject and correspondents, a day apart: one thread by subject.
    for n, (sender, to) in enumerate([("c@c2.com", "u1@ours.com"), ("u1@ours.com", "c@c2.com")]):
        date_s = base + 40 * 86400 + n * 86400
        key = f"plain{n}@x"
        subject = ("Re: " if n else "") + "Catch up"
        headers = [("Message-ID", f"<{key}>"), ("From", sender), ("To", to), ("Subject", subject),
                   ("Date", email.utils.formatdate(date_s))]
        out.append(Message(key, 1000, _raw(headers), date_s, sender, [("from", sender), ("to", to)], [1],
                           sender not in INSIDERS, subject))
    # No Message-ID: keyed by content.
    headers = [("From", "y@c4.com"), ("To", "u2@ours.com"), ("Subject", "no id"),
               ("Date", email.utils.formatdate(base + 50 * 86400))]
    raw = _raw(headers)
    import hashlib
    out.append(Message("sha256:" + hashlib.sha256(raw).hexdigest(), 2000, raw, base + 50 * 86400, "y@c4.com",
                       [("from", "y@c4.com"), ("to", "u2@ours.com")], [2], True, "no id"))
    return out


def visible(message: Message, user_clients: set, user_id: int) -> bool:
    return bool(set(message.links) & user_clients) or user_id in message.mailboxes


def expected_threads(messages, user_clients: set, user_id: int) -> dict:
    """conversation -> figures of the thread made of the user's visible messages."""
    groups = {}
    for m in sorted(messages, key=lambda m: (m.date_s, m.key)):
        if visible(m, user_clients, user_id):
            groups.setdefault(m.conversation, []).append(m)
    out = {}
    for conv, ms in groups.items():
        awaiting = None
        if ms[-1].inbound:
            for m in reversed(ms):
                if not m.inbound:
                    break
                awaiting = m.date_s
        out[conv] = {"messages": len(ms), "last_at": ms[-1].date_s, "first_at": ms[0].date_s,
                     "awaiting": awaiting, "keys": {m.key for m in ms}}
    return out


# A tangled world for the threading property test: replies to messages that may arrive
# later, ids that never arrive (ghosts), messages that join two threads, headerless
# messages that share a subject and correspondents, and providers' thread ids.
_SUBJECTS = ["Plan", "Re: Plan", "AW: Plan", "SV: plan", "Budget", "RE: Budget", "Other"]
_PAIRS = [("a@c1.com", "u1@ours.com"), ("u1@ours.com", "a@c1.com"), ("c@c2.com", "u2@ours.com")]
_WINDOW = 30 * 86400


def tangled(seed: int, size: int = 14) -> list[Message]:
    rng = random.Random(seed)
    base = 1_700_000_000
    keys = [f"t{n}@x" for n in range(size)]
    ghosts = ["ghost1@x", "ghost2@x"]
    out = []
    for n, key in enumerate(keys):
        sender, to = rng.choice(_PAIRS)
        # Two windows, so that a subject joins only within one.
        date_s = base + rng.choice([0, _WINDOW]) + rng.randint(0, 86400)
        refs = rng.sample([k for k in keys + ghosts if k != key], rng.randint(1, 3)) if rng.random() < 0.5 else []
        subject = rng.choice(_SUBJECTS)
        headers = [("Message-ID", f"<{key}>"), ("From", sender), ("To", to), ("Subject", subject),
                   ("Date", email.utils.formatdate(date_s))]
        if refs:
            headers += [("In-Reply-To", f"<{refs[-1]}>"), ("References", " ".join(f"<{r}>" for r in refs))]
        mailboxes = sorted(rng.sample([1, 2], rng.randint(1, 2)))
        hints = {u: rng.choice(["T1", "T2"]) for u in mailboxes if rng.random() < 0.4}
        out.append(Message(key, -1, _raw(headers), date_s, sender, [("from", sender), ("to", to)], mailboxes,
                           sender not in INSIDERS, subject, hints, refs))
    return out


def _normal_subject(subject: str) -> str:
    words = subject.lower().split(": ")
    return words[-1]


def oracle_partition(messages) -> set:
    """The threads as sets of keys: messages joined to the ids they name (stored or not);
    a message naming none and named by none joined to its subject in its 30-day window
    with its correspondents, and to each of its mailboxes' provider thread ids."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    def union(a, b):
        a, b = find(a), find(b)
        if a != b:
            parent[max(a, b)] = min(a, b)
    named = {r for m in messages for r in m.refs}
    for m in messages:
        find(m.key)
        for r in m.refs:
            union(m.key, r)
        if not m.refs and m.key not in named:
            pair = tuple(sorted({m.participants[0][1], m.participants[1][1]}))
            union(m.key, f"~subject {_normal_subject(m.subject)} {pair} {m.date_s // _WINDOW}")
            for user, hint in m.hints.items():
                union(m.key, f"~provider {user} {hint}")
    groups = {}
    for m in messages:
        groups.setdefault(find(m.key), set()).add(m.key)
    return {frozenset(g) for g in groups.values()}


# -- storing the world through the service --------------------------------------------

#: The installation of the email tests.
I = 1


def setup_directory(ctx):
    directory.upsert_clients(ctx, I, [{"client_id": c, "name": f"Client {c}", "domains": d} for c, d in CLIENTS.items()])
    directory.upsert_users(ctx, I, [{"user_id": u, "name": f"User {u}", "emails": a} for u, a in USERS.items()])
    directory.upsert_contacts(ctx, I, [{"source_id": s, "name": n, "emails": e, "client_id": c, "job_title": j}
                                       for s, (n, e, c, j) in CONTACTS.items()])


def ingest_corpus(ctx, messages, rng=None, chunk=7):
    """Each message from each of its mailboxes, in the given order, in small tasks."""
    deliveries = [(u, m) for m in messages for u in m.mailboxes]
    if rng is not None:
        rng.shuffle(deliveries)
    for start in range(0, len(deliveries), chunk):
        part = deliveries[start:start + chunk]
        for user in sorted({u for u, _ in part}):
            batch = [{"raw": b64(m.raw)} for u, m in part if u == user]
            result = ingest.ingest_emails(ctx, I, user, batch)
            assert result["rejected"] == []
