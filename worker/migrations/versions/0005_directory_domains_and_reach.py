"""Users' addresses by registrable domain: ingestion asks whether a participant's domain
is one of the installation's own without reading every user's address.  And
``meeting_reach`` without the rows of each email's primary client: the meetings of a
user's own clients are found through ``meetings``, so those rows only made a broad
user's "seen beyond" lookup walk all of them again.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def Key(length=255):
    """Text compared byte for byte (VARBINARY on MySQL/TiDB), as worker.tables.Utf8Key."""
    return sa.String(length).with_variant(mysql.VARBINARY(4 * length), "mysql")


def upgrade():
    with op.batch_alter_table("user_addresses") as batch:
        batch.add_column(sa.Column("domain", Key(), nullable=False, server_default=""))
    op.create_index("ix_user_addresses_domain", "user_addresses", ["installation_id", "domain"])
    from worker.email.addresses import domain_of
    from worker.tables import user_addresses as t
    bind = op.get_bind()
    rows = bind.execute(sa.select(t.c.installation_id, t.c.address)).all()
    for installation_id, address in rows:
        bind.execute(t.update().where(t.c.installation_id == installation_id, t.c.address == address)
                     .values(domain=domain_of(address)))
    op.execute("DELETE FROM meeting_reach WHERE user_id = 0 AND EXISTS (SELECT 1 FROM meetings "
               "WHERE meetings.id = meeting_reach.meeting_id AND meetings.client_id = meeting_reach.client_id)")


def downgrade():
    op.execute("INSERT INTO meeting_reach (installation_id, meeting_id, client_id, user_id) "
               "SELECT installation_id, id, client_id, 0 FROM meetings WHERE type = 'email' AND client_id <> 0")
    op.drop_index("ix_user_addresses_domain", "user_addresses")
    with op.batch_alter_table("user_addresses") as batch:
        batch.drop_column("domain")
