"""The activity rollup per week and per month (``meeting_buckets``), filled from the daily
rollup: a report over whole weeks or months reads one row per (client, type, bucket)
instead of grouping the days.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "meeting_buckets",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(1), primary_key=True),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("type", sa.String(32), primary_key=True),
        sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer, nullable=False),
    )
    # A dashboard's recent range: the buckets first, then the user's clients among them.
    op.create_index("ix_meeting_buckets_bucket", "meeting_buckets", ["installation_id", "kind", "bucket", "client_id"])
    for kind, column in (("w", "week"), ("m", "month")):
        op.execute(
            "INSERT INTO meeting_buckets (installation_id, kind, client_id, type, bucket, count) "
            f"SELECT installation_id, '{kind}', client_id, type, {column}, SUM(count) FROM meeting_days "
            f"GROUP BY installation_id, client_id, type, {column}")


def downgrade():
    op.drop_index("ix_meeting_buckets_bucket", "meeting_buckets")
    op.drop_table("meeting_buckets")
