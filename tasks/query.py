"""The query task (queue ``query``): what web apps call all day."""
import functools
import logging

from worker import keys
from worker.app import app
from worker.db import get_engine
from worker.query import cursor_secret, parse, run
from worker.redis_index import get_redis
from worker.settings import get_settings

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def configured_views(settings) -> frozenset:
    """The view ids of ``settings.precompute_views`` (once per settings object: every
    query asks)."""
    return frozenset(keys.view_id(sort, [t] if t else None, [s] if s else None)
                     for sort, t, s in settings.precompute_views)


@app.task(name="crm.query_meetings")
def query_meetings(installation_id, user_id, types=None, statuses=None, client_ids=None, date_from=None,
                   date_to=None, sort="meeting_date", order="desc", offset=0, limit=20, cursor=None):
    """One secured page of the user's meetings; see the README for every argument."""
    settings = get_settings()
    engine, r = get_engine(), get_redis()
    secret = cursor_secret(engine, settings.cursor_secret)
    query = parse(dict(installation_id=installation_id, user_id=user_id, types=types, statuses=statuses,
                       client_ids=client_ids, date_from=date_from, date_to=date_to, sort=sort, order=order,
                       offset=offset, limit=limit, cursor=cursor), secret)
    result, follow_ups = run(engine, r, query, secret, configured_views(settings))
    if "rebuild" in follow_ups:
        schedule_rebuild(r, query.installation_id)
    if "precompute" in follow_ups:
        schedule_precompute(r, query.installation_id, query.user_id)
    return result


def schedule_rebuild(r, installation_id: int) -> None:
    """Queue one rebuild of an installation whose index is not ready (at most one per
    ten minutes, however many queries notice)."""
    if r.set(keys.rebuilding(installation_id), 1, nx=True, ex=600):
        log.warning("index of installation %d is not ready: rebuild queued", installation_id)
        app.send_task("crm.rebuild_index", kwargs={"installation_id": installation_id})


def schedule_precompute(r, installation_id: int, user_id: int) -> None:
    """Queue one build of a user's views that were too broad to fill during a query
    (at most one per user per five minutes)."""
    if r.set(keys.precompute_pending(installation_id, user_id), 1, nx=True, ex=300):
        app.send_task("crm.precompute_user", kwargs={"installation_id": installation_id, "user_id": user_id})


@app.task(name="crm.noop")
def noop():
    """Does nothing: the floor of a task round trip, for the benchmark and health checks."""
    return None
