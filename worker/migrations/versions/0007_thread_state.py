"""Thread state kept at ingest: ``threads`` (each thread's figures, participants and
clients), ``thread_pairs`` (its response pairs), ``thread_mailboxes`` (its messages by
mailbox) and ``thread_reach`` (who sees each thread, and whether whole), filled here from
the stored messages.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")


def upgrade():
    op.create_table(
        "threads",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("thread_id", sa.String(40), primary_key=True),
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
    op.create_table(
        "thread_pairs",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("thread_id", sa.String(40), primary_key=True),
        sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("wait_s", BigInt, nullable=False),
        sa.Column("first", sa.Boolean, nullable=False),
    )
    op.create_table(
        "thread_mailboxes",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("thread_id", sa.String(40), primary_key=True),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("received", sa.Integer, nullable=False),
        sa.Column("sent", sa.Integer, nullable=False),
    )
    op.create_table(
        "thread_reach",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("thread_id", sa.String(40), primary_key=True),
        sa.Column("whole", sa.Boolean, nullable=False),
        sa.Column("last_s", BigInt, nullable=False),
        sa.Column("awaiting", sa.Boolean, nullable=False),
    )
    op.create_index("ix_thread_reach_user", "thread_reach", ["installation_id", "user_id", "thread_id"])
    op.create_index("ix_thread_reach_thread", "thread_reach", ["installation_id", "thread_id"])
    from worker.email.thread_state import refresh
    bind = op.get_bind()
    pairs = bind.execute(sa.text("SELECT DISTINCT installation_id, thread_id FROM emails WHERE thread_id <> ''")).all()
    by_installation: dict = {}
    for installation_id, thread_id in pairs:
        by_installation.setdefault(installation_id, []).append(thread_id)
    for installation_id, thread_ids in by_installation.items():
        for start in range(0, len(thread_ids), 500):
            refresh(bind, installation_id, thread_ids[start:start + 500])


def downgrade():
    for table in ("thread_mailboxes", "thread_pairs", "thread_reach", "threads"):
        op.drop_table(table)
