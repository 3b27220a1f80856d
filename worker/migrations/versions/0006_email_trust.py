"""Email trust: a content fingerprint per stored message (copies merge only when key and
fingerprint agree), the mark of a meeting row owned by a ``crm.ingest_meetings`` record
(email logic never changes it again), and the keys of deleted messages (never given to
another message).

Messages stored before have no fingerprint: they merge only with re-reads from the
mailboxes that hold them already.  A record is taken to own a stored email's meeting row
when that row is no longer an email's (another type, or a status that is not a
direction); a record of type email with an inbound/outbound status cannot be told apart.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def Key(length=255):
    """Text compared byte for byte (VARBINARY on MySQL/TiDB), as worker.tables.Utf8Key."""
    return sa.String(length).with_variant(mysql.VARBINARY(4 * length), "mysql")


def upgrade():
    with op.batch_alter_table("emails") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("by_record", sa.Boolean, nullable=False, server_default=sa.text("0")))
    op.execute("UPDATE emails SET by_record = 1 WHERE meeting_id IN (SELECT id FROM meetings "
               "WHERE type <> 'email' OR status NOT IN ('inbound', 'outbound'))")
    op.create_table(
        "retired_keys",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("message_key", Key(), primary_key=True),
    )


def downgrade():
    op.drop_table("retired_keys")
    with op.batch_alter_table("emails") as batch:
        batch.drop_column("by_record")
        batch.drop_column("fingerprint")
