"""The mailboxes the service syncs itself over IMAP, and their per-folder checkpoints
(worker/mailbox/).

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Key = sa.String(255).with_variant(mysql.VARBINARY(1020), "mysql")


def upgrade():
    op.create_table(
        "mailboxes",
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
    )
    op.create_index("ix_mailboxes_due", "mailboxes", ["enabled", "next_attempt_s"])
    op.create_table(
        "mailbox_folders",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("folder", Key, primary_key=True),
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


def downgrade():
    op.drop_table("mailbox_folders")
    op.drop_index("ix_mailboxes_due", "mailboxes")
    op.drop_table("mailboxes")
