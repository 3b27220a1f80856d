"""Client-security tasks (queue ``ingest``): who may see which clients.  Each change is
applied once, however often it is delivered (its task id is recorded with it)."""
from worker.access import change
from worker.app import app
from worker.context import current


@app.task(name="crm.set_user_clients", bind=True)
def set_user_clients(self, installation_id, user_id, client_ids):
    """Replace the user's clients."""
    return change(current(), installation_id, user_id, client_ids, "set", task_id=self.request.id)


@app.task(name="crm.grant_clients", bind=True)
def grant_clients(self, installation_id, user_id, client_ids):
    """Add clients to the user's list."""
    return change(current(), installation_id, user_id, client_ids, "grant", task_id=self.request.id)


@app.task(name="crm.revoke_clients", bind=True)
def revoke_clients(self, installation_id, user_id, client_ids):
    """Remove clients from the user's list; their meetings are gone when this returns."""
    return change(current(), installation_id, user_id, client_ids, "revoke", task_id=self.request.id)
