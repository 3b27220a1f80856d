"""Shared test helpers: record builders and the brute-force oracle."""
import json

from tests.conftest import make_context
from worker.keys import member
from worker.query import parse, run
from worker.records import parse_time, to_micros, to_seconds


#: Seconds a test waits for a task's result.
TIMEOUT = 30


def call(webapp, task, task_id=None, **kwargs):
    """Send ``task`` by name with JSON ``kwargs`` to its queue, as a web app holding no
    project code does, and wait for its result (``task_id``: the id a caller chose)."""
    from worker.app import ROUTES
    return webapp.send_task(task, kwargs=kwargs, queue=ROUTES[task], task_id=task_id).get(timeout=TIMEOUT)


def record(installation_id=1, source_id="m1", client_id=1, type="email", status="open",
           meeting_date="2024-01-01T10:00:00Z", **extra):
    out = {"installation_id": installation_id, "source_id": source_id, "client_id": client_id,
           "type": type, "status": status, "meeting_date": meeting_date}
    out.update(extra)
    return out


#: The views the tests' contexts keep precomputed (tests/conftest.py SETTINGS).
VIEWS = frozenset({"d:*:*", "d:email:open"})


def query(ctx, now=None, views=None, **args):
    """Run crm.query_meetings' plain function; returns the result dict.  ``views=()``:
    the same service keeping no precomputed views (the index answers cold)."""
    if views is not None:
        ctx = make_context(ctx.engine, ctx.redis, ctx.limits, precompute_views=views)
    return run(ctx, parse(args, ctx.cursor_secret()), now=now)[0]


class Oracle:
    """What the service must answer, by brute force over plain Python data."""

    def __init__(self):
        self.meetings = {}  # (installation, source_id) -> dict with updated_us
        self.access = {}    # (installation, user) -> set(clients)

    def ingest(self, records, now_us):
        """The contract's version rules: within a batch the later of equal versions wins;
        against the stored version only a newer one counts, and a record without
        updated_at that holds what is stored is a redelivery."""
        newest = {}
        for rec in records:
            key = (rec["installation_id"], rec["source_id"])
            updated = rec.get("updated_at")
            us = to_micros(parse_time("updated_at", updated)) if updated else now_us
            new = dict(rec, meeting_s=to_seconds(parse_time("meeting_date", rec["meeting_date"])), updated_us=us,
                       implicit=updated is None)
            if key not in newest or us >= newest[key]["updated_us"]:
                newest[key] = new
        for key, new in newest.items():
            old = self.meetings.get(key)
            if old is None:
                self.meetings[key] = new
            elif new["updated_us"] > old["updated_us"] and not (new["implicit"] and self._same(old, new)):
                self.meetings[key] = new

    @staticmethod
    def _same(a, b):
        fields = ("client_id", "type", "status", "meeting_s", "subject", "details")
        return all(a.get(f) == b.get(f) for f in fields)

    def delete(self, installation_id, source_ids):
        for s in source_ids:
            self.meetings.pop((installation_id, s), None)

    def set_access(self, installation_id, user_id, clients, mode):
        cur = self.access.setdefault((installation_id, user_id), set())
        if mode == "set":
            cur.clear()
            cur.update(clients)
        elif mode == "grant":
            cur.update(clients)
        else:
            cur.difference_update(clients)

    def answer(self, installation_id, user_id, types=None, statuses=None, client_ids=None, date_from=None,
               date_to=None, sort="meeting_date", order="desc", offset=0, limit=20, ids=None):
        """(total, [source_id, ...] of the page)"""
        allowed = self.access.get((installation_id, user_id), set())
        lo = to_seconds(parse_time("d", date_from)) if date_from else None
        hi = to_seconds(parse_time("d", date_to)) if date_to else None
        found = []
        for (inst, source), m in self.meetings.items():
            if inst != installation_id or m["client_id"] not in allowed:
                continue
            if types is not None and m["type"] not in types:
                continue
            if statuses is not None and m["status"] not in statuses:
                continue
            if client_ids is not None and m["client_id"] not in client_ids:
                continue
            if lo is not None and m["meeting_s"] < lo:
                continue
            if hi is not None and m["meeting_s"] >= hi:
                continue
            found.append(m)
        value = (lambda m: m["meeting_s"]) if sort == "meeting_date" else (lambda m: m["updated_us"] // 1_000_000)
        found.sort(key=lambda m: (value(m), ids[(m["installation_id"], m["source_id"])]), reverse=order == "desc")
        return len(found), [m["source_id"] for m in found[offset:offset + limit]]


def ids_of(engine, installation_id=None):
    """(installation, source_id) -> id, from the database."""
    import sqlalchemy as sa

    from worker.tables import meetings
    with engine.connect() as conn:
        return {(i, s): mid for mid, i, s in conn.execute(
            sa.select(meetings.c.id, meetings.c.installation_id, meetings.c.source_id))}


def page_sources(result):
    return [item["source_id"] for item in result["items"]]


def dumps(obj):
    return json.dumps(obj, sort_keys=True)


__all__ = ["call", "TIMEOUT", "record", "query", "Oracle", "ids_of", "page_sources", "member", "VIEWS"]


def index_snapshot(r, installation_id):
    """Everything the index holds for an installation's meetings and access lists."""
    from worker import keys
    prefix = keys.prefix(installation_id)
    zsets = {k.decode(): set(r.zrange(k, 0, -1)) for k in r.scan_iter(match=prefix + "z:*")}
    extra = {k.decode(): set(r.zrange(k, 0, -1)) for k in r.scan_iter(match=prefix + "x:*")}
    payload = {int.from_bytes(f, "big"): v for f, v in r.hgetall(keys.payloads(installation_id)).items()}
    access = {int(k.rsplit(b":", 1)[1]): {int(c) for c in r.smembers(k)} for k in r.scan_iter(match=prefix + "uc:*")}
    reverse = {int(k.rsplit(b":", 1)[1]): {int(u) for u in r.smembers(k)} for k in r.scan_iter(match=prefix + "cu:*")}
    return {"z": {k: v for k, v in zsets.items() if v}, "payload": payload, "access": access, "reverse": reverse,
            "x": {k: v for k, v in extra.items() if v}}


def expected_snapshot(engine, installation_id):
    """What the index must hold, computed from the database alone."""
    import sqlalchemy as sa

    from worker import keys
    from worker.tables import meetings, user_clients
    from worker.records import item_json
    z, payload, access, reverse, extra = {}, {}, {}, {}, {}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(meetings).where(meetings.c.installation_id == installation_id)).all()
        for u, c in conn.execute(sa.select(user_clients.c.user_id, user_clients.c.client_id)
                                 .where(user_clients.c.installation_id == installation_id)):
            access.setdefault(u, set()).add(c)
            reverse.setdefault(c, set()).add(u)
    for row in rows:
        key = keys.client_set(installation_id, row.client_id, row.type, row.status)
        members = {member(b"d", row.meeting_s, row.id), member(b"u", row.updated_s, row.id)}
        z.setdefault(key, set()).update(members)
        head = "%d %s %s %d %d %d" % (row.client_id, row.type, row.status, row.meeting_s, row.updated_s,
                                      row.updated_us)
        if row.reach:
            head += " " + row.reach
            # The users it reaches besides its client's: mailbox owners and the users of
            # its other clients; those who may not see its client hold it in x:<user>:*.
            secondary, mailbox_users = row.reach.split("/")
            reached = {int(u) for u in mailbox_users.split(",") if u}
            for c in secondary.split(","):
                if c:
                    reached |= reverse.get(int(c), set())
            for u in reached:
                if row.client_id not in access.get(u, set()):
                    extra.setdefault(keys.extra_set(installation_id, u, row.type, row.status), set()).update(members)
        payload[row.id] = (head + "|" + item_json(row)).encode()
    return {"z": z, "payload": payload, "access": access, "reverse": reverse, "x": extra}


def assert_index_matches(engine, r, installation_id=1):
    got, want = index_snapshot(r, installation_id), expected_snapshot(engine, installation_id)
    for part in ("z", "payload", "access", "reverse", "x"):
        assert got[part] == want[part], f"index and database differ in {part}"


def assert_thread_state_matches(engine, installation_id=1):
    """The kept thread state (threads, thread_pairs, thread_mailboxes, thread_reach) equals
    the state computed afresh from every stored message: what incremental maintenance
    must keep."""
    import collections

    import sqlalchemy as sa

    from worker.email import thread_state
    from worker.tables import emails
    with engine.connect() as conn:
        ids = set(conn.execute(sa.select(emails.c.thread_id).where(emails.c.installation_id == installation_id,
                                                                   emails.c.thread_id != "")).scalars())
        found = thread_state.load(conn, installation_id, ids)
        stored = {table.name: sorted(tuple(r) for r in conn.execute(sa.select(table).where(
            table.c.installation_id == installation_id))) for table in thread_state.TABLES}
    want = collections.defaultdict(list)
    for tid, messages in found.items():
        for table, row in thread_state.rows_of(installation_id, tid, messages):
            want[table.name].append(tuple(row[c.name] for c in table.columns))
    for table in thread_state.TABLES:
        assert stored[table.name] == sorted(want[table.name]), f"kept {table.name} differs from the messages'"
