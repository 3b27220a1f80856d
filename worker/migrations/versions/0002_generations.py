"""Generations of installations and the record of applied writes.

``installations.generation`` is the token the Redis index must carry to answer for the
installation (replaced by every rebuild); ``applied_writes`` records each write (a task's
chunk, an access change) in the transaction of its effect, so that a redelivered task
changes nothing twice and an index holding writes the database does not have is noticed.

Revision ID: 0002
Revises: 0001
"""
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    with op.batch_alter_table("installations") as batch:
        batch.add_column(sa.Column("generation", sa.String(32), nullable=True))
    conn = op.get_bind()
    for (installation_id,) in conn.execute(sa.text("SELECT id FROM installations")).all():
        conn.execute(sa.text("UPDATE installations SET generation = :g WHERE id = :i"),
                     {"g": secrets.token_hex(16), "i": installation_id})
    op.create_table(
        "applied_writes",
        sa.Column("write_id", sa.String(100), primary_key=True),
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("at_us", BigInt, nullable=False),
        sa.Column("result", sa.Text),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_applied_writes_installation", "applied_writes", ["installation_id", "at_us"])


def downgrade():
    op.drop_table("applied_writes")
    with op.batch_alter_table("installations") as batch:
        batch.drop_column("generation")
