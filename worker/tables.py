"""Every table of the service, defined once: what the code queries.  The schema itself is
created and upgraded by the Alembic migrations in ``worker/migrations`` (``crm init``).

- meetings and who may see them: ``meetings``, ``meeting_reach``, ``user_clients``, ``users``;
- the service's own bookkeeping: ``installations``, ``applied_writes``, ``crm_meta``;
- the daily activity rollup: ``meeting_days`` (worker/rollups.py);
- email insight: the directory (``clients``, ``client_domains``, ``user_addresses``,
  ``contacts``, ``contact_addresses``, ``contact_terms``) and stored messages (``emails``
  and the tables beside it).
"""
from __future__ import annotations

import collections

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()


class Utf8Key(sa.TypeDecorator):
    """A text key compared byte for byte: VARBINARY on MySQL/TiDB, where every text
    collation treats trailing spaces (and, for most, letter case) as equal."""
    impl = sa.String(255)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.VARBINARY(1020))
        return dialect.type_descriptor(sa.String(255))

    def process_bind_param(self, value, dialect):
        if value is not None and dialect.name == "mysql":
            return value.encode()
        return value

    def process_result_value(self, value, dialect):
        return value.decode() if isinstance(value, (bytes, bytearray)) else value


BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
#: A thread id: ``t`` and 24 hex digits, ASCII compared byte for byte on MariaDB/MySQL
#: (migration 0011; TiDB keeps its byte-wise ``utf8mb4_bin``).
ThreadId = sa.String(40).with_variant(mysql.VARCHAR(40, charset="ascii", collation="ascii_bin"), "mysql")

#: One row per meeting.  ``id`` is derived from (installation_id, source_id), not
#: auto-incremented: the index is written from the batch itself, and TiDB spreads the
#: random keys over regions instead of appending to one hot region.
meetings = sa.Table(
    "meetings", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("source_id", Utf8Key(), nullable=False),
    sa.Column("client_id", BigInt, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("meeting_s", BigInt, nullable=False),   # whole seconds since the epoch, UTC
    sa.Column("updated_s", BigInt, nullable=False),   # whole seconds, the sort key of updated_at
    sa.Column("updated_us", BigInt, nullable=False),  # microseconds, orders versions
    sa.Column("subject", sa.String(998)),
    sa.Column("details", LongText),  # compact JSON text
    # Who else may see it, for the index: "<secondary clients>/<mailbox users>", comma
    # separated; null when only client_id makes it visible (see meeting_reach).
    sa.Column("reach", sa.Text),
    sa.UniqueConstraint("installation_id", "source_id", name="uq_meetings_source"),
    # The secured query: one range per (client, type, status), ordered by the sort key.
    sa.Index("ix_meetings_client_date", "installation_id", "client_id", "type", "status", "meeting_s", "id"),
    sa.Index("ix_meetings_client_updated", "installation_id", "client_id", "type", "status", "updated_s", "id"),
)

StoredRow = collections.namedtuple(
    "StoredRow", "id installation_id source_id client_id type status meeting_s updated_s updated_us subject details reach",
    defaults=(None,))
#: The columns of :data:`meetings` in :class:`StoredRow` order.
COLUMNS = [meetings.c[name] for name in StoredRow._fields]

#: Which clients each user may see.
user_clients = sa.Table(
    "user_clients", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_user_clients_client", "installation_id", "client_id", "user_id"),
)

#: One row per user whose access was ever set: the lock that serializes access changes,
#: and the version that orders their copies in Redis.
users = sa.Table(
    "users", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("access_version", BigInt, nullable=False),
    sa.Column("name", sa.String(255)),  # crm.upsert_users
    sa.Column("emails", sa.Text),       # crm.upsert_users: JSON list of addresses as given
)

#: Who besides ``meetings.client_id`` makes a meeting visible: one row per other linked
#: client (``user_id`` 0) and per mailbox it was read from (``client_id`` 0).  Emails only.
#: The primary client has no row (since migration 0005): the meetings of a user's own
#: clients are found through ``meetings``' own index, and a broad user's "seen beyond"
#: lookup would otherwise walk every one of them again.
meeting_reach = sa.Table(
    "meeting_reach", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_meeting_reach_client", "installation_id", "client_id", "meeting_id"),
    sa.Index("ix_meeting_reach_user", "installation_id", "user_id", "meeting_id"),
)

#: Installations seen by ingestion or access changes.  ``generation`` is the token the
#: Redis index must carry to answer for the installation; every rebuild replaces it
#: (worker/mirror.py).
installations = sa.Table(
    "installations", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.String(32)),
)

#: One row per write (a task's chunk, an access change), in the transaction of its effect:
#: a redelivered task finds its writes here and applies none twice (``result`` is what the
#: write returned); and the index's recent write ids must all be here, or the database went
#: back in time (a restore) and the index no longer mirrors it.
applied_writes = sa.Table(
    "applied_writes", metadata,
    sa.Column("write_id", sa.String(100), primary_key=True),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("at_us", BigInt, nullable=False),
    sa.Column("result", sa.Text),
    sa.Index("ix_applied_writes_installation", "installation_id", "at_us"),
)

#: Service-wide values kept with the data, e.g. the cursor signing secret.
crm_meta = sa.Table(
    "crm_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)


# -- the daily activity rollup (worker/rollups.py) ---------------------------------------

meeting_days = sa.Table(
    "meeting_days", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(32), primary_key=True),
    sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),   # days since 1970-01-01, UTC
    sa.Column("week", sa.Integer, nullable=False),   # the day number of that week's Monday
    sa.Column("month", sa.Integer, nullable=False),  # YYYYMM
    sa.Column("count", sa.Integer, nullable=False),
    # A dashboard's recent range: the days first, then the user's clients among them.
    sa.Index("ix_meeting_days_day", "installation_id", "day", "client_id"),
)

#: The same counts per week and per month, without the status (what ``activity`` reads
#: for the whole buckets of its range): ``kind`` ``w`` (``bucket`` = the day number of the
#: week's Monday) or ``m`` (``bucket`` = YYYYMM).  Kept with ``meeting_days`` by the same
#: writes (worker/rollups.py).
meeting_buckets = sa.Table(
    "meeting_buckets", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(1), primary_key=True),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), primary_key=True),
    sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.Integer, nullable=False),
    # A dashboard's recent range: the buckets first, then the user's clients among them.
    sa.Index("ix_meeting_buckets_bucket", "installation_id", "kind", "bucket", "client_id"),
)

# -- email insight ----------------------------------------------------------------------

#: A client's name and its registrable domains (JSON list), as last upserted.
clients = sa.Table(
    "clients", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("domains", sa.Text, nullable=False),
    sa.Column("updated_us", BigInt, nullable=False),
)

#: Registrable domain -> the one client of the installation that owns it.
client_domains = sa.Table(
    "client_domains", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("domain", Utf8Key(), primary_key=True),
    sa.Column("client_id", BigInt, nullable=False),
)

#: Canonical address -> the user of the installation who writes from it; ``domain`` is
#: its registrable domain (migration 0005).
user_addresses = sa.Table(
    "user_addresses", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("address", Utf8Key(), primary_key=True),
    sa.Column("user_id", BigInt, nullable=False),
    sa.Column("domain", Utf8Key(), nullable=False, server_default=""),
    sa.Index("ix_user_addresses_domain", "installation_id", "domain"),
)

#: Contacts; ``sort_name`` is the folded name (search order), ``emails`` the JSON list.
contacts = sa.Table(
    "contacts", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("source_id", Utf8Key(), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("sort_name", Utf8Key(), nullable=False),
    sa.Column("emails", sa.Text, nullable=False),
    sa.Column("client_id", BigInt),
    sa.Column("job_title", sa.String(255)),
    sa.Column("job_key", Utf8Key()),
    sa.Column("updated_us", BigInt, nullable=False),
    sa.UniqueConstraint("installation_id", "source_id", name="uq_contacts_source"),
    sa.Index("ix_contacts_client_name", "installation_id", "client_id", "sort_name", "source_id"),
)

#: Canonical address -> contact(s) that have it.
contact_addresses = sa.Table(
    "contact_addresses", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("address", Utf8Key(), primary_key=True),
    sa.Column("contact_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_contact_addresses_contact", "contact_id"),
)

#: Search terms of a contact: each folded word of its name and each address.
contact_terms = sa.Table(
    "contact_terms", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("term", Utf8Key(), primary_key=True),
    sa.Column("contact_id", BigInt, primary_key=True, autoincrement=False),
    sa.Index("ix_contact_terms_contact", "contact_id"),
)

#: One row per stored message (its meeting row has the same id).  ``message_key`` is the
#: contract's key: ``base_key`` (from Message-ID) itself, or ``base_key#n`` for another
#: message under a key that was taken; ``fingerprint``: sha256 hex of its content
#: (parse.fingerprint), what a copy must match to merge with it (null for messages stored
#: before fingerprints: they merge only with re-reads from the mailboxes that hold them);
#: ``by_record``: a ``crm.ingest_meetings`` record of the same key owns the meeting row,
#: and decides alone its fields and who sees it; ``threading``: it has References or
#: In-Reply-To; ``participants``: JSON ``[[role, address, name], …]`` in role and header
#: order.
emails = sa.Table(
    "emails", metadata,
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("message_key", Utf8Key(), nullable=False),
    sa.Column("base_key", Utf8Key(), nullable=False),
    sa.Column("from_address", Utf8Key()),
    sa.Column("date_s", BigInt, nullable=False),
    sa.Column("thread_id", ThreadId, nullable=False),
    sa.Column("subject_key", Utf8Key()),
    sa.Column("threading", sa.Boolean, nullable=False),
    sa.Column("participants", LongText, nullable=False),
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("by_record", sa.Boolean, nullable=False, server_default=sa.text("0")),
    sa.UniqueConstraint("installation_id", "message_key", name="uq_emails_key"),
    sa.Index("ix_emails_base", "installation_id", "base_key"),
    sa.Index("ix_emails_thread", "installation_id", "thread_id", "date_s"),
    sa.Index("ix_emails_subject", "installation_id", "subject_key", "date_s"),
)

#: The mailboxes a message was read from.
email_mailboxes = sa.Table(
    "email_mailboxes", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("provider_id", sa.String(255)),
    sa.Column("provider_thread_id", sa.String(255)),
    sa.Index("ix_email_mailboxes_user", "installation_id", "user_id"),
)

#: Participants by canonical address and registrable domain: what re-linking looks up.
email_participants = sa.Table(
    "email_participants", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("role", sa.String(8), nullable=False),
    sa.Column("address", Utf8Key(), nullable=False),
    sa.Column("domain", Utf8Key(), nullable=False),
    sa.Index("ix_email_participants_address", "installation_id", "address"),
    sa.Index("ix_email_participants_domain", "installation_id", "domain"),
)

#: Thread edges: a message's References/In-Reply-To ids (ghosts when not stored), and
#: its subject node when it may join a thread by subject (threads.py).
email_refs = sa.Table(
    "email_refs", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("ref_key", Utf8Key(), primary_key=True),
    sa.Index("ix_email_refs_key", "installation_id", "ref_key"),
)

#: A message's links, in participant order: the client, the contact (or null for a link
#: by domain) and why.
email_links = sa.Table(
    "email_links", metadata,
    sa.Column("installation_id", BigInt, nullable=False),
    sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, nullable=False),
    sa.Column("contact_id", BigInt),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Index("ix_email_links_client", "installation_id", "client_id"),
)

#: Each thread's state, kept in the transaction of every change to its messages
#: (worker/email/thread_state.py): what a user who sees the whole thread is shown, so that
#: a thread list does not group every visible message again.  Made of the thread's stored
#: messages whose meeting row is still the email's (a record that replaced one takes it
#: out).  ``inbound``: how many are inbound; ``participants``: JSON ``[[address, name], …]``
#: in message order; ``clients``: JSON sorted ids of every client a message links to.
threads = sa.Table(
    "threads", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("thread_id", ThreadId, primary_key=True),
    sa.Column("messages", sa.Integer, nullable=False),
    sa.Column("inbound", sa.Integer, nullable=False),
    sa.Column("first_s", BigInt, nullable=False),
    sa.Column("last_s", BigInt, nullable=False),
    sa.Column("last_direction", sa.String(32), nullable=False),
    sa.Column("awaiting_s", BigInt),
    sa.Column("subject", sa.String(998)),
    sa.Column("participants", LongText, nullable=False),
    sa.Column("clients", sa.Text, nullable=False),
)

#: A thread's response pairs: each inbound message with the next outbound one (``n`` in
#: thread order, ``wait_s`` between them), one row per mailbox user the reply was read
#: from (``first`` on one row per pair).
thread_pairs = sa.Table(
    "thread_pairs", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("thread_id", ThreadId, primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("wait_s", BigInt, nullable=False),
    sa.Column("first", sa.Boolean, nullable=False),
)

#: A thread's messages by the mailbox they were read from: inbound (received) and
#: outbound (sent).
thread_mailboxes = sa.Table(
    "thread_mailboxes", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("thread_id", ThreadId, primary_key=True),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("received", sa.Integer, nullable=False),
    sa.Column("sent", sa.Integer, nullable=False),
)

#: Who sees each thread: one row per client a message links to (``user_id`` 0) and per
#: user whose mailbox a message was read from (``client_id`` 0).  ``whole``: every message
#: of the thread links that client, or was read from that mailbox, so whoever holds the row
#: sees the whole thread, as ``threads`` has it.  ``last_s`` and ``awaiting`` repeat the
#: thread's, so that a user's thread list sorts and filters these rows alone.
thread_reach = sa.Table(
    "thread_reach", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("thread_id", ThreadId, primary_key=True),
    sa.Column("whole", sa.Boolean, nullable=False),
    sa.Column("last_s", BigInt, nullable=False),
    sa.Column("awaiting", sa.Boolean, nullable=False),
    sa.Index("ix_thread_reach_user", "installation_id", "user_id", "thread_id"),
    sa.Index("ix_thread_reach_thread", "installation_id", "thread_id"),
)

#: Each client's meetings as ``going_cold`` needs them: the date of the last one and twice
#: the median gap between them (an integer: the median of whole seconds is one, or a half),
#: as they stood at ``stamp``, the index's ``<token>|<client stamp>`` (worker/keys.py
#: client_stamps) when they were computed.  Kept lazily: a report recomputes the rows of
#: the clients whose stamp moved since (worker/reports/clients.py).
client_gaps = sa.Table(
    "client_gaps", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("stamp", sa.String(100), nullable=False),
    sa.Column("last_s", BigInt),
    sa.Column("median_gap2", BigInt),
)

#: The keys of deleted messages: a key is never given to another message (a caller may
#: still hold the old one).
retired_keys = sa.Table(
    "retired_keys", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("message_key", Utf8Key(), primary_key=True),
)

#: The mailboxes the service reads itself (worker/mailbox/): how to reach each, its secret
#: (Fernet ciphertext, never returned), and the state of its last sync run.  ``folders``
#: is what the caller asked for (JSON, null: the defaults); ``resolved`` the folders found
#: on the server for the defaults (JSON), kept so that a sync with nothing new needs no LIST.
mailboxes = sa.Table(
    "mailboxes", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("security", sa.String(10), nullable=False),
    sa.Column("ca_cert", sa.Text),
    sa.Column("username", sa.String(320), nullable=False),
    sa.Column("auth", sa.String(10), nullable=False),
    sa.Column("secret", sa.Text),
    sa.Column("folders", sa.Text),
    sa.Column("resolved", sa.Text),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("last_error", sa.String(500)),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("next_attempt_s", BigInt, nullable=False),
    sa.Column("last_sync_s", BigInt),
    sa.Column("updated_s", BigInt, nullable=False),
    sa.Index("ix_mailboxes_due", "enabled", "next_attempt_s"),
)

#: Per mailbox and folder, the checkpoint of the sync: the folder's UIDVALIDITY, the last
#: UID whose message is stored (advanced in the transaction that stores it), and
#: HIGHESTMODSEQ when the server has CONDSTORE.
mailbox_folders = sa.Table(
    "mailbox_folders", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("folder", Utf8Key(), primary_key=True),
    sa.Column("uidvalidity", BigInt),
    sa.Column("last_uid", BigInt, nullable=False),
    sa.Column("highestmodseq", BigInt),
    sa.Column("uidnext", BigInt),
    sa.Column("synced", BigInt, nullable=False),
    sa.Column("rejected", BigInt, nullable=False),
    sa.Column("backlog", BigInt),
    sa.Column("last_sync_s", BigInt),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("error", sa.String(500)),
)

#: Every table holding a message's rows, for deletion.
PER_MESSAGE = (emails, email_mailboxes, email_participants, email_refs, email_links)
