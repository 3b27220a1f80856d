"""The query task (queue ``query``): what web apps call all day."""
import logging

from worker import keys
from worker.app import app
from worker.context import current
from worker.query import parse, run

log = logging.getLogger(__name__)


@app.task(name="crm.query_meetings")
def query_meetings(installation_id, user_id, types=None, statuses=None, client_ids=None, date_from=None,
                   date_to=None, sort="meeting_date", order="desc", offset=0, limit=20, cursor=None):
    """One secured page of the user's meetings; see the README for every argument."""
    ctx = current()
    query = parse(dict(installation_id=installation_id, user_id=user_id, types=types, statuses=statuses,
                       client_ids=client_ids, date_from=date_from, date_to=date_to, sort=sort, order=order,
                       offset=offset, limit=limit, cursor=cursor), ctx.cursor_secret())
    result, follow_ups = run(ctx, query)
    if "rebuild" in follow_ups:
        schedule_rebuild(ctx.redis, query.installation_id)
    if "precompute" in follow_ups:
        schedule_precompute(ctx.redis, query.installation_id, query.user_id)
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
