"""Each client's last meeting and median gap between its meetings, kept lazily for the
``going_cold`` report (worker/reports/clients.py): empty at first, filled as reports ask.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "client_gaps",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("stamp", sa.String(100), nullable=False),
        sa.Column("last_s", BigInt),
        sa.Column("median_gap2", BigInt),
    )


def downgrade():
    op.drop_table("client_gaps")
