"""Secured queries: ``crm.query_meetings`` from the Redis index, with the same query as
SQL on the database when the index cannot answer.

Both paths order by (sort value in whole seconds, id) and build items with the same
function, so their answers are identical: same items, same order, same total.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
import time

import sqlalchemy as sa

from worker import cursors, keys, metrics
from worker.tables import meetings
from worker.errors import REDIS_FAULTS, InvalidArgument, is_transient
from worker.mirror import owns_index
from worker.precompute import fill_view
from worker.records import item_json, parse_time, positive_int, to_seconds, token
from worker.redis_index import ScriptArgs
from worker.visibility import visible_condition, visible_parts

log = logging.getLogger(__name__)

SORTS = {"meeting_date": "meeting_s", "updated_at": "updated_s"}
ORDERS = ("asc", "desc")
MAX_LIMIT = 200
MAX_OFFSET = 10**9
MAX_FILTER = 10_000
ARGUMENTS = {"installation_id", "user_id", "types", "statuses", "client_ids", "date_from", "date_to",
             "sort", "order", "offset", "limit", "cursor"}


@dataclasses.dataclass(frozen=True)
class Query:
    installation_id: int
    user_id: int
    types: tuple | None
    statuses: tuple | None
    client_ids: tuple | None
    date_from: int | None  # whole seconds, inclusive
    date_to: int | None    # whole seconds, exclusive
    sort: str
    order: str
    offset: int
    limit: int
    after: bytes | None = None  # the cursor's member: continue strictly after it

    @property
    def letter(self) -> bytes:
        return keys.SORT_LETTER[self.sort]

    @property
    def desc(self) -> bool:
        return self.order == "desc"

    def fingerprint(self) -> bytes:
        """What a cursor is bound to: everything but the page position."""
        return json.dumps([self.installation_id, self.user_id, self.types, self.statuses, self.client_ids,
                           self.date_from, self.date_to, self.sort, self.order]).encode()

    def empty(self) -> bool:
        return self.types == () or self.statuses == () or self.client_ids == ()


def token_list(field, value, maker):
    """An optional list argument, validated item by item, as a sorted tuple."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidArgument(field, f"must be a list or null, got {type(value).__name__}")
    if len(value) > MAX_FILTER:
        raise InvalidArgument(field, f"holds {len(value)} values; at most {MAX_FILTER}")
    return tuple(sorted({maker(f"{field}[]", v) for v in value}))


def bounded_int(field, value, lo, hi):
    if type(value) is not int:
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__} {value!r:.40}")
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must be between {lo} and {hi}, got {value}")
    return value


def parse(args: dict, secret: bytes) -> Query:
    """Validate the task's arguments into a :class:`Query`; raise :class:`InvalidArgument`."""
    unknown = set(args) - ARGUMENTS
    if unknown:
        raise InvalidArgument(sorted(unknown)[0], "is not an argument of crm.query_meetings")
    for field in ("installation_id", "user_id"):
        if field not in args:
            raise InvalidArgument(field, "is required")
    sort = args.get("sort", "meeting_date")
    if not isinstance(sort, str) or sort not in SORTS:
        raise InvalidArgument("sort", f"must be one of {sorted(SORTS)}, got {sort!r:.40}")
    order = args.get("order", "desc")
    if not isinstance(order, str) or order not in ORDERS:
        raise InvalidArgument("order", f"must be 'asc' or 'desc', got {order!r:.40}")
    dates = {}
    for field in ("date_from", "date_to"):
        value = args.get(field)
        dates[field] = None if value is None else to_seconds(parse_time(field, value))
    query = Query(
        installation_id=positive_int("installation_id", args["installation_id"]),
        user_id=positive_int("user_id", args["user_id"]),
        types=token_list("types", args.get("types"), token),
        statuses=token_list("statuses", args.get("statuses"), token),
        client_ids=token_list("client_ids", args.get("client_ids"), positive_int),
        date_from=dates["date_from"], date_to=dates["date_to"],
        sort=sort, order=order,
        offset=bounded_int("offset", args.get("offset", 0), 0, MAX_OFFSET),
        limit=bounded_int("limit", args.get("limit", 20), 1, MAX_LIMIT),
    )
    cursor = args.get("cursor")
    if cursor is not None:
        if query.offset:
            raise InvalidArgument("cursor", "cannot be combined with a non-zero offset")
        query = dataclasses.replace(query, after=decode_cursor(cursor, query, secret))
    return query


def encode_cursor(query: Query, member: bytes, secret: bytes) -> str:
    """The next page's cursor: the last item's member (sort value and id), signed and bound
    to this query (worker/cursors.py)."""
    return cursors.encode(secret, query.fingerprint(), member)


def decode_cursor(cursor, query: Query, secret: bytes) -> bytes:
    member = cursors.decode(secret, query.fingerprint(), cursor)
    if len(member) != 12 or member[:1] != query.letter:
        raise cursors.foreign()
    return member


# -- the two paths ---------------------------------------------------------------------

def _date_bounds(letter: bytes, date_from, date_to) -> tuple[bytes, bytes]:
    lo = b"[" + letter + (struct.pack(">I", date_from) if date_from is not None else b"")
    hi = b"(" + (letter + struct.pack(">I", date_to) if date_to is not None else bytes([letter[0] + 1]))
    return lo, hi


def lex_bounds(query: Query) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """ZRANGEBYLEX bounds: (count min, count max, page min, page max, date min, date max).
    The date range is on meeting_date; when the sort is meeting_date it narrows the count
    bounds directly, otherwise it comes as the separate date bounds ("" when absent)."""
    dated = query.date_from is not None or query.date_to is not None
    dmin = dmax = b""
    if query.sort == "meeting_date" or not dated:
        cmin, cmax = _date_bounds(query.letter, query.date_from, query.date_to)
    else:
        cmin, cmax = _date_bounds(query.letter, None, None)
        dmin, dmax = _date_bounds(keys.DATE, query.date_from, query.date_to)
    pmin, pmax = cmin, cmax
    if query.after is not None:
        if query.desc:
            pmax = min(pmax, b"(" + query.after, key=lambda b: b[1:])
        else:
            pmin = max(pmin, b"(" + query.after, key=lambda b: b[1:])
    return cmin, cmax, pmin, pmax, dmin, dmax


@dataclasses.dataclass(frozen=True)
class QueryArgs(ScriptArgs):
    """The ARGV of ``query.lua``, in order (its header names each; a test checks both)."""
    prefix: str
    token: str
    user: int
    view: str
    letter: bytes
    descending: str
    cmin: bytes
    cmax: bytes
    pmin: bytes
    pmax: bytes
    offset: int
    limit: int
    now: int
    types: str
    statuses: str
    client_filter: str
    dmin: bytes
    dmax: bytes
    max_merge: int
    whole: str
    first_page: str


@dataclasses.dataclass(frozen=True)
class HeadArgs(ScriptArgs):
    """The ARGV of ``head.lua``, in order."""
    token: str
    user: int
    view: str
    side: str
    now: int


#: Members and items a precomputed set's cached head holds (scripts/page.lua HEAD).
HEAD = 21


def call_script(ctx, query: Query, view: str, limit: int, now: int, token: str) -> list:
    """Run ``query.lua`` for ``query``: from the user's precomputed set for ``view`` when
    it has one ("" for none), else from the per-client sets; it answers only when the
    index is ready for ``token`` (worker/mirror.py).  The first page of a whole view
    tries ``head.lua`` first: the same answer when the view's head is cached, from a
    script of five keys and five arguments instead of 29."""
    i, u = query.installation_id, query.user_id
    if view and limit <= HEAD and query.offset == 0 and query.after is None \
            and query.date_from is None and query.date_to is None:
        blob = ctx.scripts["head"](
            keys=[keys.ready(i), keys.user_views(i, u), keys.view_head(i, u, view), keys.stats(i),
                  keys.active_users(i)],
            args=HeadArgs(token, u, view, "d" if query.desc else "a", now).argv())
        if blob:
            return [b"precomputed:head", blob]
    cmin, cmax, pmin, pmax, dmin, dmax = lex_bounds(query)
    args = QueryArgs(
        prefix=keys.prefix(i), token=token, user=u, view=view, letter=query.letter,
        descending="1" if query.desc else "0", cmin=cmin, cmax=cmax, pmin=pmin, pmax=pmax,
        offset=query.offset, limit=limit, now=now, types=",".join(query.types or ()),
        statuses=",".join(query.statuses or ()), client_filter=",".join(map(str, query.client_ids or ())),
        dmin=dmin, dmax=dmax, max_merge=ctx.limits.max_merge,
        whole="1" if query.date_from is None and query.date_to is None else "0",
        first_page="1" if query.offset == 0 and query.after is None else "0")
    return ctx.scripts["query"](
        keys=[keys.payloads(i), keys.user_clients(i, u), keys.ready(i), keys.user_views(i, u),
              keys.scratch(i), keys.pairs(i), keys.active_users(i), keys.stats(i)],
        args=args.argv())


LETTER_SORT = {"d": "meeting_date", "u": "updated_at"}


def view_query(installation_id: int, user_id: int, view: str) -> Query:
    """The query whose answer a precomputed view holds."""
    letter, types, statuses = view.split(":")
    return Query(installation_id=installation_id, user_id=user_id,
                 types=None if types == "*" else tuple(types.split(",")),
                 statuses=None if statuses == "*" else tuple(statuses.split(",")),
                 client_ids=None, date_from=None, date_to=None, sort=LETTER_SORT[letter],
                 order="desc", offset=0, limit=1)


def precomputable(query: Query, views: frozenset) -> str:
    """The view id that may answer ``query`` from a precomputed set, else ""."""
    if query.client_ids is not None:
        return ""
    if query.sort != "meeting_date" and (query.date_from is not None or query.date_to is not None):
        return ""  # the view holds updated_at members only; the range is on meeting_date
    view = keys.view_id(query.sort, query.types, query.statuses)
    return view if view in views else ""


def from_index(ctx, query: Query, now: int, token: str):
    """The answer from Redis as (source, total, members, items as one JSON array); or
    ``"notready"`` when the index is not ready for ``token``, ``"toobig"`` when the answer
    would merge too many sets, ``"drift"`` when a payload is missing.  The source may be
    ``index:fill``: the view this query could use should be precomputed."""
    view = precomputable(query, ctx.views)
    reply = call_script(ctx, query, view, query.limit + 1, now, token)
    source = reply[0].decode()
    if source == "drift":
        # A member without its payload: the index has drifted; the database answers.
        log.error("index drift: payload missing for installation %d; answering from the database",
                  query.installation_id)
    if len(reply) == 1:
        return source
    if source == "precomputed:head":
        return ("precomputed",) + unpack_head(reply[1], query.limit + 1)
    packed = reply[2]
    members = [packed[i:i + 12] for i in range(0, len(packed), 12)]
    return source, int(reply[1]), members, reply[3]


def unpack_head(head: bytes, size: int) -> tuple[int, list, bytes]:
    """The first ``size`` members and items of a precomputed set's cached head (layout:
    scripts/page.lua head_of): (total, members, items as one JSON array)."""
    total, n = struct.unpack_from(">II", head)
    k = min(n, size)
    members = [head[8 + 12 * i:20 + 12 * i] for i in range(k)]
    if not k:
        return total, members, b"[]"
    offsets = 8 + 12 * n
    end = struct.unpack_from(">I", head, offsets + 4 * (k - 1))[0]
    text = offsets + 4 * n
    return total, members, b"[" + head[text:text + end] + b"]"


def narrowing(client_ids, date_from, date_to) -> list:
    """Conditions on ``meetings``: the client filter, and the date range [from, to)."""
    m = meetings.c
    conds = []
    if client_ids is not None:
        conds.append(m.client_id.in_(client_ids))
    if date_from is not None:
        conds.append(m.meeting_s >= date_from)
    if date_to is not None:
        conds.append(m.meeting_s < date_to)
    return conds


def sql_conditions(query: Query, with_cursor: bool):
    """Conditions on ``meetings`` for ``query``, client security included; and its sort
    column."""
    conds, col = _query_conditions(query, with_cursor)
    return [visible_condition(query.installation_id, query.user_id), *conds], col


def _query_conditions(query: Query, with_cursor: bool):
    """The query's own conditions (filters, and the cursor), without client security."""
    m = meetings.c
    conds = [*narrowing(query.client_ids, query.date_from, query.date_to)]
    if query.types is not None:
        conds.append(m.type.in_(query.types))
    if query.statuses is not None:
        conds.append(m.status.in_(query.statuses))
    col = m[SORTS[query.sort]]
    if with_cursor and query.after is not None:
        value, last_id = keys.member_seconds(query.after), keys.member_id(query.after)
        if query.desc:
            conds.append(sa.or_(col < value, sa.and_(col == value, m.id < last_id)))
        else:
            conds.append(sa.or_(col > value, sa.and_(col == value, m.id > last_id)))
    return conds, col


def from_database(conn, query: Query):
    """The same answer as SQL: (total, members, item JSON as bytes)."""
    conds, col = _query_conditions(query, with_cursor=False)
    counts = [sa.select(sa.func.count()).select_from(part.subquery()).scalar_subquery()
              for part in visible_parts(query.installation_id, query.user_id, (meetings.c.id,), *conds)]
    total = conn.execute(sa.select(counts[0] + counts[1])).scalar()
    conds, col = _query_conditions(query, with_cursor=True)
    direction = sa.desc if query.desc else sa.asc
    # Each part sorted and cut to what the page may need, then the two merged.
    wanted = query.offset + query.limit + 1
    parts = [sa.select(part.order_by(direction(col), direction(meetings.c.id)).limit(wanted).subquery())
             for part in visible_parts(query.installation_id, query.user_id, tuple(meetings.c), *conds)]
    both = sa.union_all(*parts).subquery("page")
    rows = conn.execute(
        sa.select(both).order_by(direction(both.c[col.name]), direction(both.c.id))
        .limit(query.limit + 1).offset(query.offset)).all()
    members = [keys.member(query.letter, getattr(row, SORTS[query.sort]), row.id) for row in rows]
    return total, members, [item_json(row).encode() for row in rows]


def run(ctx, query: Query, now: int | None = None) -> tuple[dict, set]:
    """Answer ``query``; return (result, follow-ups): ``"rebuild"`` when the index was
    not ready, ``"precompute"`` when the user's view should be built."""
    if query.empty():
        return {"total": 0, "items": [], "next_cursor": None, "source": "index"}, set()
    now = int(time.time()) if now is None else now
    answer = None
    follow_ups = set()
    mirror = ctx.mirror
    token = mirror.token(query.installation_id)
    try:
        if token is not None:
            answer = from_index(ctx, query, now, token)
        if answer == "notready":
            # This process may hold the token of a generation a rebuild has replaced.
            fresh = mirror.refresh(query.installation_id)
            if fresh is not None and fresh != token:
                token, answer = fresh, from_index(ctx, query, now, fresh)
        if answer == "notready" and owns_index(ctx):
            follow_ups.add("rebuild")
        if isinstance(answer, tuple) and answer[0] == "index:fill":
            # The user's view is missing: built now when small (the next query reads it),
            # else queued for crm.precompute_user, which builds it in slices.
            answer = ("index",) + answer[1:]
            if not fill_view(ctx, query.installation_id, query.user_id, precomputable(query, ctx.views), now, token):
                follow_ups.add("precompute")
    except REDIS_FAULTS as exc:
        if not is_transient(exc):
            raise
        log.warning("index unreachable (%s); answering from the database", exc.__class__.__name__)
    if answer == "toobig" and precomputable(query, ctx.views):
        follow_ups.add("precompute")  # built in slices, it answers the next time
    if answer is None or isinstance(answer, str):
        # Redis unreachable, index not ready or drifted, or a merge too broad for Redis:
        # the same query as SQL.
        with ctx.engine.connect() as conn:
            total, members, items = from_database(conn, query)
        source = "database"
        # One parse for the page: each item alone costs a json.loads call.
        items = json.loads(b"[" + b",".join(items) + b"]")
        if answer is not None:  # Redis answered, so it can count
            metrics.count_answer(ctx.redis, query.installation_id, "database")
    else:
        source, total, members, array = answer
        items = json.loads(array)
    more = len(items) > query.limit
    result = {
        "total": total,
        "items": items[:query.limit],
        "next_cursor": encode_cursor(query, members[query.limit - 1], ctx.cursor_secret()) if more else None,
        "source": source,
    }
    return result, follow_ups
