"""The first schema: meetings, access lists, users, installations, service values.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")


def upgrade():
    op.create_table(
        "meetings",
        sa.Column("id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("installation_id", BigInt, nullable=False),
        sa.Column("source_id", sa.String(255).with_variant(mysql.VARBINARY(1020), "mysql"), nullable=False),
        sa.Column("client_id", BigInt, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("meeting_s", BigInt, nullable=False),
        sa.Column("updated_s", BigInt, nullable=False),
        sa.Column("updated_us", BigInt, nullable=False),
        sa.Column("subject", sa.String(998)),
        sa.Column("details", LongText),
        sa.UniqueConstraint("installation_id", "source_id", name="uq_meetings_source"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_meetings_client_date", "meetings",
                    ["installation_id", "client_id", "type", "status", "meeting_s", "id"])
    op.create_index("ix_meetings_client_updated", "meetings",
                    ["installation_id", "client_id", "type", "status", "updated_s", "id"])
    op.create_table(
        "user_clients",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("client_id", BigInt, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_user_clients_client", "user_clients", ["installation_id", "client_id", "user_id"])
    op.create_table(
        "users",
        sa.Column("installation_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("user_id", BigInt, primary_key=True, autoincrement=False),
        sa.Column("access_version", BigInt, nullable=False),
    )
    op.create_table("installations", sa.Column("id", BigInt, primary_key=True, autoincrement=False))
    op.create_table(
        "crm_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )


def downgrade():
    for table in ("crm_meta", "installations", "users", "user_clients", "meetings"):
        op.drop_table(table)
