"""The client reports: ``activity`` (the rollups, worker/rollups.py: whole weeks or months
from ``meeting_buckets``, the days at a range's edges from ``meeting_days``, plus raw rows
for what the rollups cannot say) and ``going_cold`` (each client's last meeting and
median gap, kept per client in ``client_gaps`` and trusted while the client's stamp in
the index has not moved)."""
from __future__ import annotations

import collections

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

from worker import keys, rollups
from worker.errors import REDIS_FAULTS, is_transient
from worker.records import iso_seconds
from worker.reports.shared import DAY, Params, filters, hinted, percentile, visible
from worker.tables import client_gaps, meeting_buckets, meeting_days, meetings
from worker.visibility import own_clients, seen_beyond


def _month_label(month: int) -> str:
    return f"{month // 100:04d}-{month % 100:02d}"


def _bucket_label(day: int, bucket: str) -> str:
    if bucket == "week":
        return rollups.date_of(rollups.week_of(day)).isoformat()
    return _month_label(rollups.month_of(day))


def _bucket_start(day: int, bucket: str) -> int:
    """The first day of the week (Monday) or month that ``day`` falls in."""
    if bucket == "week":
        return rollups.week_of(day)
    return day - (rollups.date_of(day).day - 1)


def _bucket_of(start_day: int, bucket: str) -> int:
    """The ``meeting_buckets`` number of the bucket that starts on ``start_day``."""
    return start_day if bucket == "week" else rollups.month_of(start_day)


def _next_bucket(day: int, bucket: str) -> int:
    """The first day of the week or month after the one ``day`` falls in."""
    if bucket == "week":
        return rollups.week_of(day) + 7
    return _bucket_start(_bucket_start(day, bucket) + 32, bucket)


def _spans(first_day: int | None, end_day: int | None, bucket: str):
    """The whole days ``[first_day, end_day)`` (None: open) as the whole buckets inside them
    (``(lo, hi)``: the first day of the first, and the day after the last; None when there
    are none) and the day ranges left at the edges, in buckets the range covers in part."""
    lo = None if first_day is None else (
        first_day if _bucket_start(first_day, bucket) == first_day else _next_bucket(first_day, bucket))
    hi = None if end_day is None else _bucket_start(end_day, bucket)
    if lo is not None and hi is not None and lo >= hi:  # inside one bucket, or two in part
        return None, ([(first_day, end_day)] if first_day < end_day else [])
    edges = []
    if first_day is not None and first_day < lo:
        edges.append((first_day, lo))
    if end_day is not None and hi < end_day:
        edges.append((hi, end_day))
    return (lo, hi), edges


def _partial_days(p: Params) -> set[int]:
    """The days that the range covers only in part (a bound inside them): read from the
    rows, while the rollup gives the whole days ``[ceil(date_from), floor(date_to))``."""
    days = set()
    if p.date_from is not None and p.date_from % DAY:
        days.add(p.date_from // DAY)
    if p.date_to is not None and p.date_to % DAY:
        days.add(p.date_to // DAY)
    return days


def activity(conn, installation_id: int, user_id: int, p: Params, hint: str | None = None) -> list[dict]:
    """Meetings per (client, type, bucket) with running totals.  The whole days of the
    range, for the user's own clients, come from the rollup; the rest (meetings seen
    through another link or the user's mailbox, the partial days at the range's edges)
    from the visible rows themselves."""
    counts: collections.Counter = collections.Counter()
    packed: dict = {}  # client -> its whole buckets, [(type, label, count)], one per pair
    first_day = None if p.date_from is None else -(-p.date_from // DAY)
    end_day = None if p.date_to is None else p.date_to // DAY
    own = own_clients(installation_id, user_id)
    whole, edges = _spans(first_day, end_day, p.bucket)
    label = _labeller(p.bucket)
    b, d = meeting_buckets.c, meeting_days.c
    parts = []
    if whole is not None:  # the whole weeks or months of the range, one row each
        lo, hi = whole
        conds = [b.installation_id == installation_id, b.kind == ("w" if p.bucket == "week" else "m"),
                 b.client_id.in_(own)]
        if p.client_ids is not None:
            conds.append(b.client_id.in_(p.client_ids))
        if lo is not None:
            conds.append(b.bucket >= _bucket_of(lo, p.bucket))
        if hi is not None:
            conds.append(b.bucket < _bucket_of(hi, p.bucket))
        if lo is None:  # from the first bucket on: every bucket of every client, packed
            _whole_buckets(conn, conds, label, hint, packed)
        else:  # a recent range: its few rows, found by the bucket index
            parts.append(sa.select(b.client_id, b.type, b.bucket, b["count"]).where(*conds))
    column = d.week if p.bucket == "week" else d.month
    for start, end in edges:  # the whole days of the buckets the range covers in part
        conds = [d.installation_id == installation_id, d.client_id.in_(own), d.day >= start, d.day < end]
        if p.client_ids is not None:
            conds.append(d.client_id.in_(p.client_ids))
        parts.append(sa.select(d.client_id, d.type, column, sa.func.sum(d["count"]))
                     .where(*conds).group_by(d.client_id, d.type, column))
    if parts:
        stmt = parts[0] if len(parts) == 1 else sa.union_all(*parts)
        for client_id, type_, number, n in conn.execute(hinted(stmt, hint)):
            counts[(client_id, type_, label(number))] += int(n)
    m = meetings.c
    raw = [seen_beyond(installation_id, user_id, (m.client_id, m.type, m.meeting_s), *filters(p), hint=hint)]
    # The partial days at the range's edges, from the rows of the clients the rollup says
    # had meetings on those days (a few, instead of a probe per client of the user).  A
    # range inside one day has one partial day: read once, it counts each meeting once.
    for edge_day in sorted(_partial_days(p)):
        active = sa.select(d.client_id).where(d.installation_id == installation_id, d.day == edge_day,
                                              d.client_id.in_(own))
        raw.append(sa.select(m.client_id, m.type, m.meeting_s).where(
            m.installation_id == installation_id, m.client_id.in_(active), *filters(p),
            m.meeting_s >= edge_day * DAY, m.meeting_s < (edge_day + 1) * DAY))
    for n, stmt in enumerate(raw):
        for client_id, type_, seconds in conn.execute(stmt if n == 0 else hinted(stmt, hint)):
            counts[(client_id, type_, _bucket_label(seconds // DAY, p.bucket))] += 1
    # Everything else joins the packed buckets per client: one (type, label) may then come
    # from both, and is summed.  Clients in order, client 0 (none) first.
    touched = {client_id for client_id, _, _ in counts}
    for (client_id, type_, bucket), n in counts.items():
        packed.setdefault(client_id, []).append((type_, bucket, n))
    rows: list = []
    for client_id in sorted(packed):
        entries = packed[client_id]
        if client_id in touched:
            summed: collections.Counter = collections.Counter()
            for type_, bucket, n in entries:
                summed[(type_, bucket)] += n
            entries = [(type_, bucket, n) for (type_, bucket), n in summed.items()]
        _client_rows(rows, client_id or None, entries)
    return rows


def _client_rows(rows: list, client_id, entries: list) -> None:
    """Append one client's rows, ordered by (type, bucket), with running totals per type;
    ``entries`` hold each (type, bucket label) once."""
    entries.sort()
    running, last_type, append = 0, None, rows.append
    for type_, bucket, n in entries:
        if n <= 0:
            continue
        if type_ != last_type:
            running, last_type = 0, type_
        running += n
        append({"client_id": client_id, "type": type_, "bucket": bucket, "count": n, "running_total": running})


def _labeller(bucket: str):
    """A function from a bucket number (a week's first day, or a month ``YYYYMM``, as an
    int or its text) to its label, remembering the few dozen it has seen."""
    labels: dict = {}

    def label(number) -> str:
        found = labels.get(number)
        if found is None:
            n = int(number)
            found = labels[number] = _bucket_label(n, "week") if bucket == "week" else _month_label(n)
        return found
    return label


def _whole_buckets(conn, conds, label, hint, packed: dict) -> None:
    """The ``meeting_buckets`` rows matching ``conds`` into ``packed`` (client -> [(type,
    label, count)]), packed by the database into one row per client (``type bucket
    count;`` entries, comma-separated): a user with 2,000 clients has about 145,000 of
    them, and PyMySQL reads a row in about 4 µs where splitting a string costs a fraction
    of that.  A client whose entries came back cut (``group_concat_max_len``) is read
    again row by row."""
    b = meeting_buckets.c
    # Each entry ends with ";": text cut inside an entry does not end with one, and text
    # cut between entries holds fewer than the count.
    entry = b.type + " " + sa.cast(b.bucket, sa.String) + " " + sa.cast(b["count"], sa.String) + ";"
    stmt = sa.select(b.client_id, sa.func.group_concat(entry), sa.func.count()).where(*conds).group_by(b.client_id)
    cut = []
    labels: dict = {}  # bucket number (text) -> label, for every client
    for client_id, text, n in conn.execute(hinted(stmt, hint)):
        if isinstance(text, (bytes, bytearray)):
            text = text.decode()
        # "t b c;,t b c;" -> [t, b, c, t, b, c]: types are tokens, without " ", "," or ";".
        fields = text[:-1].replace(";,", " ").split(" ")
        if len(fields) != 3 * n or not text.endswith(";"):
            cut.append(client_id)
            continue
        numbers = fields[1::3]
        for number in set(numbers).difference(labels):
            labels[number] = label(number)
        packed[client_id] = list(zip(fields[0::3], map(labels.__getitem__, numbers), map(int, fields[2::3])))
    if cut:
        for client_id, type_, number, count in conn.execute(hinted(sa.select(
                b.client_id, b.type, b.bucket, b["count"]).where(*conds, b.client_id.in_(cut)), hint)):
            packed.setdefault(client_id, []).append((type_, label(number), count))


def going_cold(conn, installation_id: int, user_id: int, p: Params, now: int, hint: str | None = None,
               stamps=None) -> list[dict]:
    """Clients whose silence is longer than twice their median gap.  Without a date range
    and with ``stamps`` (the index's client stamps: :func:`client_stamps`), the user's own
    clients come from their kept figures (``client_gaps``, recomputed for the clients whose
    stamp moved); the clients seen only through emails, and any date range, from the
    visible rows."""
    m = meetings.c
    last: dict = {}
    medians: dict = {}
    gaps: dict = collections.defaultdict(list)
    kept = _kept_gaps(conn, installation_id, user_id, p, stamps) if p.date_from is None and p.date_to is None \
        and stamps is not None else None
    if kept is None:
        rows = visible(installation_id, user_id, p, (m.id, m.client_id, m.meeting_s), m.client_id != 0, hint=hint)
        seen = sa.select(rows.c.client_id, rows.c.meeting_s,
                         (rows.c.meeting_s - sa.func.lag(rows.c.meeting_s).over(
                             partition_by=rows.c.client_id, order_by=(rows.c.meeting_s, rows.c.id))).label("gap")).cte("seen")
        for client_id, seconds, gap in conn.execute(sa.select(seen.c.client_id, seen.c.meeting_s, seen.c.gap)):
            if gap is not None:
                gaps[client_id].append(gap)
            if client_id not in last or seconds > last[client_id]:
                last[client_id] = seconds
    else:
        for client_id, (last_s, twice) in kept.items():
            if twice is not None:
                last[client_id], medians[client_id] = last_s, twice / 2
        # The clients seen only through emails: their few visible rows, in order (wrapped
        # in a window statement, this driven read lost its plan on MariaDB).
        beyond = collections.defaultdict(list)
        for meeting_id, client_id, seconds in conn.execute(seen_beyond(
                installation_id, user_id, (m.id, m.client_id, m.meeting_s), m.client_id != 0, *filters(p), hint=hint)):
            beyond[client_id].append((seconds, meeting_id))
        for client_id, found in beyond.items():
            found.sort()
            gaps[client_id] = [b[0] - a[0] for a, b in zip(found, found[1:])]
            last[client_id] = found[-1][0]
    medians.update((client_id, percentile(sorted(values), 0.5)) for client_id, values in gaps.items() if values)
    rows = []
    for client_id, median in medians.items():
        silence = now - last[client_id]
        if silence > 2 * median:
            rows.append({"client_id": client_id, "last_at": iso_seconds(last[client_id]), "median_gap_s": median,
                         "silence_s": silence})
    rows.sort(key=lambda r: (-r["silence_s"], r["client_id"]))
    return rows


def _kept_gaps(conn, installation_id: int, user_id: int, p: Params, stamps) -> dict | None:
    """{client: (last_s, twice the median gap or None)} of the user's own clients (narrowed
    by ``p.client_ids``): every meeting of a client the user holds is visible to them, so
    the figures are the client's own.  Rows whose stamp moved are computed again from the
    client's meetings and stored.  None when the index cannot say what moved."""
    g, own = client_gaps.c, own_clients(installation_id, user_id).subquery("own")
    # The user's clients with their kept rows, in one statement.
    rows = conn.execute(sa.select(own.c.client_id, g.stamp, g.last_s, g.median_gap2)
                        .select_from(own.outerjoin(client_gaps, sa.and_(
                            g.installation_id == installation_id, g.client_id == own.c.client_id)))).all()
    if p.client_ids is not None:
        wanted = set(p.client_ids)
        rows = [r for r in rows if r[0] in wanted]
    own = sorted(r[0] for r in rows)
    current = stamps(own) if own else {}
    if current is None:
        return None
    kept, found = {}, {}
    for client_id, stamp, last_s, twice in rows:
        if stamp == current[client_id]:  # None (never kept) equals no stamp
            kept[client_id] = (last_s, twice)
    stale = [c for c in own if c not in kept]
    m = meetings.c
    dates: dict = collections.defaultdict(list)
    # The stale clients' meetings are read on a connection of their own, opened after the
    # stamps were read: the report's connection may hold a snapshot older than a stamp it
    # saw (a writer commits, then stamps), and figures stored under a stamp must hold
    # every write that stamp counts.  Newer rows than the stamp only make them recomputed
    # once more.
    with conn.engine.connect() as fresh:
        for start in range(0, len(stale), 500):
            for client_id, seconds in fresh.execute(sa.select(m.client_id, m.meeting_s).where(
                    m.installation_id == installation_id, m.client_id.in_(stale[start:start + 500]))
                    .order_by(m.client_id, m.meeting_s, m.id)):
                dates[client_id].append(seconds)
    for client_id in stale:
        ds = dates.get(client_id, [])
        gaps = sorted(b - a for a, b in zip(ds, ds[1:]))
        found[client_id] = (ds[-1] if ds else None, int(percentile(gaps, 0.5) * 2) if gaps else None)
    if found:  # in a transaction of its own: the report's reads keep their snapshot
        with conn.engine.begin() as writer:
            _store_gaps(writer, installation_id, {c: (current[c], *v) for c, v in found.items()})
    return {**kept, **found}


def _store_gaps(conn, installation_id: int, rows: dict) -> None:
    values = [{"installation_id": installation_id, "client_id": c, "stamp": stamp, "last_s": last_s,
               "median_gap2": twice} for c, (stamp, last_s, twice) in sorted(rows.items())]
    t = client_gaps
    if conn.dialect.name == "mysql":
        stmt = mysql.insert(t)
        stmt = stmt.on_duplicate_key_update(stamp=stmt.inserted.stamp, last_s=stmt.inserted.last_s,
                                            median_gap2=stmt.inserted.median_gap2)
    else:
        stmt = sqlite.insert(t)
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.installation_id, t.c.client_id],
                                          set_={"stamp": stmt.excluded.stamp, "last_s": stmt.excluded.last_s,
                                                "median_gap2": stmt.excluded.median_gap2})
    for start in range(0, len(values), 500):
        conn.execute(stmt, values[start:start + 500])


def client_stamps(ctx, installation_id: int):
    """A function that gives the index's stamp (``<token>|<n>``) of each client asked, or
    None when the index does not mirror the database (then nothing kept may be trusted);
    None itself when the installation has no token."""
    token = ctx.mirror.token(installation_id)
    if token is None:
        return None

    def stamps(client_ids: list) -> dict | None:
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.get(keys.ready(installation_id))
        pipe.hmget(keys.client_stamps(installation_id), client_ids)
        try:
            ready, values = pipe.execute()
        except REDIS_FAULTS as exc:
            if not is_transient(exc):
                raise
            return None
        if ready is None or ready.decode() != token:
            return None
        return {c: f"{token}|{int(v or 0)}" for c, v in zip(client_ids, values)}
    return stamps
