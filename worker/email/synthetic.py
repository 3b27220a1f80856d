"""``crm seed --emails N``: a deterministic synthetic mail corpus, ingested through the
same code as ``crm.ingest_emails``.

Users of the installation write with people of the clients (on the clients' domains),
with contacts (some on free-mail), and with strangers; conversations have replies that
carry In-Reply-To and References, localized prefixes (``AW:``, ``SV:``, ``Re[2]:``),
forwards, and copies of one message in the mailboxes of several users.  A few messages
have no Message-ID, a broken Date or an unknown charset, as real mail does.
"""
from __future__ import annotations

import base64
import email.utils
import random

from worker.email import directory, ingest

START = 1_640_995_200  # 2022-01-01T00:00:00Z
PREFIXES = ("Re: ", "RE: ", "AW: ", "SV: ", "Re[2]: ", "Antw: ", "回复: ")
FREE = ("gmail.com", "yahoo.com", "outlook.com")


def _raw(headers) -> str:
    text = "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\nHello,\r\nsee below.\r\n"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def messages(installation_id: int, count: int, clients: int, users: int, seed: int = 42):
    """Yield (mailbox user ids, message dict) in conversation order."""
    rng = random.Random(f"{seed}:{installation_id}:emails")
    made = conv = 0
    while made < count:
        conv += 1
        client = rng.randrange(1, clients + 1)
        user = rng.randrange(1, users + 1)
        colleague = rng.randrange(1, users + 1)
        if rng.random() < 0.15:
            outsider = f"contact{client}@{rng.choice(FREE)}"
        elif rng.random() < 0.05:
            outsider = f"someone{conv}@unknown{conv % 97}.example"
        else:
            outsider = f"person{rng.randrange(5)}@client{client}.example"
        insider = f"user{user}@crm.example"
        subject = f"Project {conv} {rng.choice(['kickoff', 'pricing', 'renewal', 'support'])}"
        ids: list[str] = []
        when = START + rng.randrange(3 * 365 * 86400)
        for n in range(rng.choice((1, 1, 2, 3, 4, 6))):
            if made >= count:
                return
            inbound = n % 2 == 0
            sender, to = (outsider, insider) if inbound else (insider, outsider)
            key = f"c{conv}.{n}.i{installation_id}@{sender.split('@')[1]}"
            when += rng.randrange(600, 2 * 86400)
            forward = n > 0 and rng.random() < 0.05
            prefix = "Fwd: " if forward else (rng.choice(PREFIXES) if n else "")
            headers = [("Message-ID", f"<{key}>"), ("From", f"Person {conv} <{sender}>"), ("To", to),
                       ("Subject", prefix + subject), ("Date", email.utils.formatdate(when))]
            if rng.random() < 0.3:
                headers.append(("Cc", f"user{colleague}@crm.example"))
            if ids and not forward:
                headers += [("In-Reply-To", f"<{ids[-1]}>"), ("References", " ".join(f"<{i}>" for i in ids))]
            roll = rng.random()
            if roll < 0.01:
                headers = [h for h in headers if h[0] != "Message-ID"]
            elif roll < 0.02:
                headers = [h if h[0] != "Date" else ("Date", "not a date") for h in headers]
            elif roll < 0.03:
                headers.append(("X-Note", "=?x-unknown?q?caf=E9?="))
                headers = [h if h[0] != "Subject" else ("Subject", "=?x-unknown?q?caf=E9?= " + subject)
                           for h in headers]
            ids.append(key)
            mailboxes = {user}
            if any(h[0] == "Cc" for h in headers):
                mailboxes.add(colleague)
            yield sorted(mailboxes), {"raw": _raw(headers)}
            made += 1


def seed_directory(ctx, installation_id: int, clients: int, users: int) -> None:
    """The clients (one domain each), users and contacts the corpus writes with (at most
    1,000 of each)."""
    directory.upsert_clients(ctx, installation_id, [
        {"client_id": c, "name": f"Client {c}", "domains": [f"client{c}.example"]}
        for c in range(1, min(clients, 1000) + 1)])
    directory.upsert_users(ctx, installation_id, [
        {"user_id": u, "name": f"User {u}", "emails": [f"user{u}@crm.example"]} for u in range(1, min(users, 1000) + 1)])
    directory.upsert_contacts(ctx, installation_id, [
        {"source_id": f"contact-{c}", "name": f"Contact {c}", "emails": [f"contact{c}@gmail.com",
                                                                          f"person0@client{c}.example"],
         "client_id": c, "job_title": rng_title(c)} for c in range(1, min(clients, 1000) + 1)])


def seed_emails(ctx, installation_id: int, count: int, clients: int, users: int, seed: int = 42,
                batch: int = 500, progress=None) -> dict:
    """Upsert the directory, then ingest ``count`` messages, 500 per task per mailbox.
    ``progress``: called with 1 for each message handed on."""
    seed_directory(ctx, installation_id, clients, users)
    pending: dict[int, list] = {}
    totals = {"accepted": 0, "new": 0, "duplicates": 0, "rejected": 0}

    def flush(user):
        result = ingest.ingest_emails(ctx, installation_id, user, pending.pop(user))
        for k in ("accepted", "new", "duplicates"):
            totals[k] += result[k]
        totals["rejected"] += len(result["rejected"])
    for mailboxes, message in messages(installation_id, count, min(clients, 1000), min(users, 1000), seed):
        for user in mailboxes:
            pending.setdefault(user, []).append(message)
            if len(pending[user]) >= batch:
                flush(user)
        if progress:
            progress(1)
    for user in sorted(pending):
        flush(user)
    return totals


def rng_title(n: int) -> str:
    return ("CEO", "CTO", "Buyer", "Engineer", "Office manager")[n % 5]
