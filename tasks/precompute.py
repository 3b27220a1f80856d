"""Precomputation tasks (queue ``precompute``)."""
import time

from tasks.query import configured_views
from worker.app import app
from worker.db import get_engine
from worker.maintenance import installation_ids
from worker.mirror import get_mirror
from worker.precompute import precompute_active as refresh_active
from worker.precompute import precompute_user as build_user
from worker.records import positive_int
from worker.redis_index import get_redis
from worker.settings import get_settings
from worker.ticks import claim, tick_number


@app.task(name="crm.precompute_user")
def precompute_user(installation_id, user_id):
    """Build the user's secured sorted sets for the configured views now."""
    installation_id = positive_int("installation_id", installation_id)
    user_id = positive_int("user_id", user_id)
    engine, r = get_engine(), get_redis()
    token = get_mirror(engine, r).token(installation_id)
    return build_user(r, installation_id, user_id, configured_views(get_settings()), int(time.time()), token)


@app.task(name="crm.precompute_active")
def precompute_active(once_per_tick=False):
    """Refresh recently active users' sets within the memory budget; drop idle users'.
    The beat sends ``once_per_tick=True``: a second beat's copy of a tick does nothing."""
    settings, r = get_settings(), get_redis()
    now = int(time.time())
    if once_per_tick is True and not claim(r, "precompute_active", settings.precompute_interval, now):
        return {"skipped": "this tick already ran", "tick": tick_number(settings.precompute_interval, now)}
    engine = get_engine()
    mirror = get_mirror(engine, r)
    tokens = {i: token for i in installation_ids(engine) if (token := mirror.token(i)) is not None}
    report = refresh_active(r, tokens, configured_views(settings), settings.precompute_idle,
                            settings.precompute_budget, now)
    return {**report, "tick": tick_number(settings.precompute_interval, now) if once_per_tick is True else None}
