"""Maintenance tasks (queue ``maintenance``): rebuild and reconcile the index."""
import time

from worker.app import app
from worker.context import current
from worker.maintenance import rebuild, reconcile
from worker.records import positive_int
from worker.ticks import claim, tick_number


def _installation(value):
    return None if value is None else positive_int("installation_id", value)


@app.task(name="crm.rebuild_index")
def rebuild_index(installation_id=None):
    """Rebuild the Redis index (one installation, or all) from the database."""
    return rebuild(current(), _installation(installation_id))


@app.task(name="crm.reconcile_index")
def reconcile_index(installation_id=None, once_per_tick=False):
    """Compare the index with the database, repair drift, report what was found.
    The beat sends ``once_per_tick=True``: a second beat's copy of a tick does nothing."""
    installation_id = _installation(installation_id)
    ctx = current()
    interval, now = ctx.settings.reconcile_interval, int(time.time())
    if once_per_tick is True and not claim(ctx.redis, "reconcile_index", interval, now):
        return {"skipped": "this tick already ran", "tick": tick_number(interval, now)}
    return reconcile(ctx, installation_id)
