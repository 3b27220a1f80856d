"""Every Redis key of the index, defined once.

All keys of one installation share the hash tag ``{i:<installation_id>}`` so that they sit
in one Redis Cluster slot and the Lua scripts may work on them together.  The scripts in
``worker/scripts`` derive per-client and per-user keys from :func:`prefix` with the same
templates as below (``tests/test_keys.py`` checks that the two agree).

Sorted-set members encode their own order: one letter for the sort field (``d``:
meeting_date, ``u``: updated_at), the sort value as 4 big-endian bytes of whole seconds,
and the meeting id as 7 big-endian bytes.  Every score is 0, so Redis orders members by
these bytes: by sort value, ties by id, and a cursor is simply the last member.
"""
from __future__ import annotations

import struct

DATE = b"d"
UPDATED = b"u"
SORT_LETTER = {"meeting_date": DATE, "updated_at": UPDATED}

#: Set (global, no hash tag) of installation ids that have an index.
INSTALLATIONS = "crm:installations"
#: String (global): the ``database_id`` of the database this Redis mirrors.
DATABASE = "crm:database"
#: Hash (global): the service's counters for Prometheus, field -> count (worker/metrics.py).
METRICS = "crm:metrics"


def tick(task: str, number: int) -> str:
    """String (global) with a TTL of two ticks: the claim of one schedule tick of a task
    (worker/ticks.py)."""
    return f"crm:tick:{task}:{number}"


def sync_claim(installation_id: int, user_id: int) -> str:
    """String (global, outside the installation's keys, so that a rebuild's wipe leaves it)
    with a TTL, renewed while the run goes on: the claim of the sync run that holds one
    user's mailbox (worker/mailbox/sync.py)."""
    return f"crm:sync:{installation_id}:{user_id}"


def prefix(installation_id: int) -> str:
    """Start of every key of one installation."""
    return "{i:%d}:" % installation_id


def pattern(installation_id: int) -> str:
    """SCAN pattern of every key of one installation."""
    return prefix(installation_id) + "*"


def client_set(installation_id: int, client_id: int, type_: str, status: str) -> str:
    """Sorted set, lifetime of the data: one (client, type, status)'s meetings, both sort
    fields' members (``d…`` and ``u…``) in one key to halve the per-key overhead."""
    return f"{prefix(installation_id)}z:{client_id}:{type_}:{status}"


def extra_set(installation_id: int, user_id: int, type_: str, status: str) -> str:
    """Sorted set, members as :func:`client_set`: the emails of one (type, status) that the
    user may see although they may not see its ``client_id``: read from the user's own
    mailbox, or linked to another client of theirs.  Kept by the writers (views.lua) and
    recomputed by every change of the user's access (access.lua), so that the user's
    client sets and this set never hold the same meeting: totals are sums."""
    return f"{prefix(installation_id)}x:{user_id}:{type_}:{status}"


def mailbox(installation_id: int, user_id: int) -> str:
    """Set of 7-byte meeting ids: the emails read from the user's mailbox."""
    return f"{prefix(installation_id)}mb:{user_id}"


def secondary(installation_id: int, client_id: int) -> str:
    """Set of 7-byte meeting ids: the emails linked to the client besides their own
    ``client_id``."""
    return f"{prefix(installation_id)}sc:{client_id}"


def payloads(installation_id: int) -> str:
    """Hash, lifetime of the data: 7-byte meeting id -> ``"client type status meeting_s
    updated_s updated_us[ reach]|<item JSON>"``; ``reach`` (emails only) is
    ``<secondary clients>/<mailbox users>``, comma separated.  The space-separated head lets the scripts find
    a meeting's index entries without decoding JSON."""
    return f"{prefix(installation_id)}m"


def pairs(installation_id: int) -> str:
    """Set: the ``type:status`` pairs present in the installation."""
    return f"{prefix(installation_id)}ts"


def user_clients(installation_id: int, user_id: int) -> str:
    """Set: the client ids the user may see (mirror of the ``user_clients`` table)."""
    return f"{prefix(installation_id)}uc:{user_id}"


def client_users(installation_id: int, client_id: int) -> str:
    """Set: the users who may see the client (the reverse of :func:`user_clients`)."""
    return f"{prefix(installation_id)}cu:{client_id}"


def access_versions(installation_id: int) -> str:
    """Hash: user id -> ``users.access_version`` of the access list now in Redis; a write
    of an older version is ignored, so concurrent writers cannot restore revoked access."""
    return f"{prefix(installation_id)}av"


def generation(installation_id: int) -> str:
    """String ``<database_id>:<generation>``: the database and the generation of the
    installation that the index is written for (:mod:`worker.mirror`).  Every writing
    script compares it with the caller's token and writes nothing when they differ."""
    return f"{prefix(installation_id)}gen"


def ready(installation_id: int) -> str:
    """String ``<database_id>:<generation>``, set once a rebuild of that generation is
    complete; the reading scripts answer only when it equals the caller's token.  Absent
    after a flush or during a rebuild, when queries fall back to SQL."""
    return f"{prefix(installation_id)}ready"


def writes(installation_id: int) -> str:
    """List, newest first, capped at :data:`RECENT_WRITES`: the ids of the last database
    writes applied to the index.  Each must exist in the database's ``applied_writes``;
    one that does not means the database went back in time (a restore)."""
    return f"{prefix(installation_id)}w"


#: How many applied write ids :func:`writes` keeps.
RECENT_WRITES = 16


def rebuilding(installation_id: int) -> str:
    """String with a TTL: a rebuild of this installation is queued or running."""
    return f"{prefix(installation_id)}rebuilding"


def precompute_pending(installation_id: int, user_id: int) -> str:
    """String with a TTL: a build of the user's views is queued."""
    return f"{prefix(installation_id)}pp:{user_id}"


def user_views(installation_id: int, user_id: int) -> str:
    """Hash: view id -> last use (epoch seconds) of the user's precomputed sets, or
    ``b:<token>`` while one is being built in slices (not served yet)."""
    return f"{prefix(installation_id)}pv:{user_id}"


def view_set(installation_id: int, user_id: int, view: str) -> str:
    """Sorted set: a user's precomputed secured result set for one view, members as in
    :func:`client_set` (one sort letter only).  Dropped when idle or over budget."""
    return f"{prefix(installation_id)}p:{user_id}:{view}"


def view_head(installation_id: int, user_id: int, view: str) -> str:
    """Hash: ``desc``/``asc`` -> the first members of :func:`view_set` with their payloads,
    packed (see query.lua); deleted by every write that touches the view."""
    return f"{prefix(installation_id)}ph:{user_id}:{view}"


def view_users(installation_id: int, view: str) -> str:
    """Set: the users who hold a precomputed set for ``view``; the writers' fan-out visits
    ``cu:<client>`` ∩ this set.  Changed only together with :func:`user_views`."""
    return f"{prefix(installation_id)}vu:{view}"


def views(installation_id: int) -> str:
    """Set: the view ids ever precomputed in the installation (a handful)."""
    return f"{prefix(installation_id)}views"


def active_users(installation_id: int) -> str:
    """Sorted set: user id scored by the time of their last query (epoch seconds)."""
    return f"{prefix(installation_id)}active"


def stats(installation_id: int) -> str:
    """Hash: ``hit``/``miss``/``fill`` counters of the installation's precomputed sets."""
    return f"{prefix(installation_id)}stats"


def scratch(installation_id: int) -> str:
    """Sorted set used inside one script call and deleted before it returns."""
    return f"{prefix(installation_id)}tmp"


def scratch_extra(installation_id: int) -> str:
    """Sorted set used inside one query and deleted before it returns: the emails of a
    user's extra sets whose client the query's client filter names."""
    return f"{prefix(installation_id)}tmpx"


def data_version(installation_id: int) -> str:
    """Counter: bumped by every script that writes the installation's index (meetings,
    emails, access).  Its value stamps what each write touched (:func:`client_stamps`,
    :func:`user_stamps`); a cached report carries the value read before computing it."""
    return f"{prefix(installation_id)}dv"


def client_stamps(installation_id: int) -> str:
    """Hash client id -> the data version of the last write that touched a meeting the
    client makes visible (its own ``client_id``, old or new, or another client an email
    links to).  A user's cached reports are stale once one of the user's clients has a
    stamp newer than theirs."""
    return f"{prefix(installation_id)}cs"


def user_stamps(installation_id: int) -> str:
    """Hash user id -> the data version of the last write that touched what the user
    sees beyond their clients (an email read from the user's mailbox) or the user's
    access list."""
    return f"{prefix(installation_id)}us"


def answer_cache(installation_id: int, user_id: int, digest: str) -> str:
    """Hash ``t`` -> ``<token>|s<data version>``, ``b`` -> answer JSON, with a TTL: one
    user's answer (a report for one (name, params), a page of threads for one set of
    arguments) under its digest, served while the token holds and nothing the answer could
    include changed after that data version (worker/answer_cache.py, answer_cache.lua).
    (An earlier layout kept strings under ``rc:``; they expire.)"""
    return f"{prefix(installation_id)}rr:{user_id}:{digest}"


def report_requests(installation_id: int) -> str:
    """Hash ``<user>:<digest>`` -> ``[last asked (s), name, params]``: the reports users
    asked for lately, which the beat keeps computed (worker/reports/__init__.py ``precompute``)."""
    return f"{prefix(installation_id)}rq"


def view_id(sort: str, types, statuses) -> str:
    """The id of a precomputable view: sort letter, sorted types, sorted statuses, ``*``
    for any: ``d:email:open``, ``d:*:*``, ``u:email,sms:*``."""
    letter = SORT_LETTER[sort].decode()
    return "%s:%s:%s" % (letter, ",".join(sorted(set(types))) if types else "*",
                         ",".join(sorted(set(statuses))) if statuses else "*")


def member(letter: bytes, seconds: int, meeting_id: int) -> bytes:
    return letter + struct.pack(">I", seconds) + meeting_id.to_bytes(7, "big")


def member_id(member_bytes: bytes) -> int:
    return int.from_bytes(member_bytes[5:12], "big")


def member_seconds(member_bytes: bytes) -> int:
    return struct.unpack(">I", member_bytes[1:5])[0]


def id_field(meeting_id: int) -> bytes:
    return meeting_id.to_bytes(7, "big")
