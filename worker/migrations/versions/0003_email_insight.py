"""Email insight: clients and their domains, users' addresses, contacts, stored messages,
their mailboxes, participants, references, links, and who may reach each meeting.

``meetings.reach`` is the denormalized form of ``meeting_reach`` that the Redis index
needs: ``<secondary clients>/<mailbox users>`` (comma separated), null for a meeting that
only its ``client_id`` makes visible.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")


def Key(length=255):
    """Text compared byte for byte (VARBINARY on MySQL/TiDB), as worker.tables.Utf8Key."""
    return sa.String(length).with_variant(mysql.VARBINARY(4 * length), "mysql")


def upgrade():
    with op.batch_alter_table("meetings") as batch:
        batch.add_column(sa.Column("reach", sa.Text, nullable=True))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("emails", sa.Text, nullable=True))
    op.create_table(
        "meeting_reach",
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_meeting_reach_client", "meeting_reach", ["installation_id", "client_id", "meeting_id"])
    op.create_index("ix_meeting_reach_user", "meeting_reach", ["installation_id", "user_id", "meeting_id"])
    op.create_table(
        "clients",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("domains", sa.Text, nullable=False),
        sa.Column("updated_us", BigInt, nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "client_domains",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("domain", Key(), primary_key=True),
        sa.Column("client_id", BigInt, nullable=False),
    )
    op.create_table(
        "user_addresses",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("address", Key(), primary_key=True),
        sa.Column("user_id", BigInt, nullable=False),
    )
    op.create_table(
        "contacts",
        sa.Column("id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("source_id", Key(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("sort_name", Key(), nullable=False),
        sa.Column("emails", sa.Text, nullable=False),
        sa.Column("client_id", BigInt, nullable=True),
        sa.Column("job_title", sa.String(255), nullable=True),
        sa.Column("job_key", Key(), nullable=True),
        sa.Column("updated_us", BigInt, nullable=False),
        sa.UniqueConstraint("installation_id", "source_id", name="uq_contacts_source"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_contacts_client_name", "contacts", ["installation_id", "client_id", "sort_name", "source_id"])
    op.create_table(
        "contact_addresses",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("address", Key(), primary_key=True),
        sa.Column("contact_id", BigInt, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_contact_addresses_contact", "contact_addresses", ["contact_id"])
    op.create_table(
        "contact_terms",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("term", Key(), primary_key=True),
        sa.Column("contact_id", BigInt, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_contact_terms_contact", "contact_terms", ["contact_id"])
    op.create_table(
        "emails",
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("message_key", Key(), nullable=False),
        sa.Column("base_key", Key(), nullable=False),
        sa.Column("from_address", Key(), nullable=True),
        sa.Column("date_s", BigInt, nullable=False),
        sa.Column("thread_id", sa.String(40), nullable=False),
        sa.Column("subject_key", Key(), nullable=True),
        sa.Column("threading", sa.Boolean, nullable=False),
        sa.Column("participants", LongText, nullable=False),
        sa.UniqueConstraint("installation_id", "message_key", name="uq_emails_key"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_emails_base", "emails", ["installation_id", "base_key"])
    op.create_index("ix_emails_thread", "emails", ["installation_id", "thread_id", "date_s"])
    op.create_index("ix_emails_subject", "emails", ["installation_id", "subject_key", "date_s"])
    op.create_table(
        "email_mailboxes",
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("provider_id", sa.String(255), nullable=True),
        sa.Column("provider_thread_id", sa.String(255), nullable=True),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_email_mailboxes_user", "email_mailboxes", ["installation_id", "user_id"])
    op.create_table(
        "email_participants",
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("address", Key(), nullable=False),
        sa.Column("domain", Key(), nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_email_participants_address", "email_participants", ["installation_id", "address"])
    op.create_index("ix_email_participants_domain", "email_participants", ["installation_id", "domain"])
    op.create_table(
        "email_refs",
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("ref_key", Key(), primary_key=True),
    )
    op.create_index("ix_email_refs_key", "email_refs", ["installation_id", "ref_key"])
    op.create_table(
        "email_links",
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("meeting_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, nullable=False),
        sa.Column("contact_id", BigInt, nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
    )
    op.create_index("ix_email_links_client", "email_links", ["installation_id", "client_id"])


def downgrade():
    for table in ("email_links", "email_refs", "email_participants", "email_mailboxes", "emails",
                  "contact_terms", "contact_addresses", "contacts", "user_addresses", "client_domains",
                  "clients", "meeting_reach"):
        op.drop_table(table)
    with op.batch_alter_table("users") as batch:
        batch.drop_column("emails")
        batch.drop_column("name")
    with op.batch_alter_table("meetings") as batch:
        batch.drop_column("reach")
