"""Precomputation tasks (queue ``precompute``)."""
import time

from worker.app import app
from worker.context import current
from worker.maintenance import installation_ids
from worker.precompute import precompute_active as refresh_active
from worker.precompute import precompute_user as build_user
from worker.records import positive_int
from worker.ticks import claim, tick_number


@app.task(name="crm.precompute_user")
def precompute_user(installation_id, user_id):
    """Build the user's secured sorted sets for the configured views now."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    ctx = current()
    return build_user(ctx, installation_id, user_id, int(time.time()), ctx.mirror.token(installation_id))


@app.task(name="crm.precompute_active")
def precompute_active(once_per_tick=False):
    """Refresh recently active users' sets within the memory budget; drop idle users'.
    The beat sends ``once_per_tick=True``: a second beat's copy of a tick does nothing."""
    ctx = current()
    settings, now = ctx.settings, int(time.time())
    if once_per_tick is True and not claim(ctx.redis, "precompute_active", settings.precompute_interval, now):
        return {"skipped": "this tick already ran", "tick": tick_number(settings.precompute_interval, now)}
    tokens = {i: token for i in installation_ids(ctx.engine) if (token := ctx.mirror.token(i)) is not None}
    report = refresh_active(ctx, tokens, settings.precompute_idle, settings.precompute_budget, now)
    return {**report, "tick": tick_number(settings.precompute_interval, now) if once_per_tick is True else None}
