"""Client-security tasks (queue ``ingest``): who may see which clients."""
from worker.access import change
from worker.app import app
from worker.db import get_engine
from worker.redis_index import get_redis


@app.task(name="crm.set_user_clients")
def set_user_clients(installation_id, user_id, client_ids):
    """Replace the user's clients."""
    return change(get_engine(), get_redis(), installation_id, user_id, client_ids, "set")


@app.task(name="crm.grant_clients")
def grant_clients(installation_id, user_id, client_ids):
    """Add clients to the user's list."""
    return change(get_engine(), get_redis(), installation_id, user_id, client_ids, "grant")


@app.task(name="crm.revoke_clients")
def revoke_clients(installation_id, user_id, client_ids):
    """Remove clients from the user's list; their meetings are gone when this returns."""
    return change(get_engine(), get_redis(), installation_id, user_id, client_ids, "revoke")
