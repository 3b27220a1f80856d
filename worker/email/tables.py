"""The tables of email insight (created by migration 0003)."""
from __future__ import annotations

import sqlalchemy as sa

from worker.db import BigInt, LongText, Utf8Key, metadata

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
    sa.Column("thread_id", sa.String(40), nullable=False),
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

#: The keys of deleted messages: a key is never given to another message (a caller may
#: still hold the old one).
retired_keys = sa.Table(
    "retired_keys", metadata,
    sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
    sa.Column("message_key", Utf8Key(), primary_key=True),
)

#: Every table holding a message's rows, for deletion.
PER_MESSAGE = (emails, email_mailboxes, email_participants, email_refs, email_links)
