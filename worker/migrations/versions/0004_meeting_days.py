"""Reports: the daily activity rollup ``meeting_days`` (worker/rollups.py), filled from
the meetings already stored.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "meeting_days",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("type", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(32), primary_key=True),
        sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("week", sa.Integer, nullable=False),
        sa.Column("month", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_index("ix_meeting_days_day", "meeting_days", ["installation_id", "day", "client_id"])
    from worker.rollups import recount
    bind = op.get_bind()
    for (installation_id,) in bind.execute(sa.text("SELECT id FROM installations ORDER BY id")).all():
        recount(bind, installation_id)


def downgrade():
    op.drop_table("meeting_days")
