"""The report tasks (queue ``reports``): a manager's dashboard, secured per user."""
import time

from worker.app import app
from worker.context import current
from worker.maintenance import installation_ids
from worker.reports import precompute
from worker.reports import report as compute_report
from worker.ticks import claim, tick_number


@app.task(name="crm.report")
def report(installation_id, user_id, name, params=None):
    """One report (activity, response_times, awaiting_reply, workload, going_cold) over
    what the user may see; see the README for each report's rows."""
    return compute_report(current(), installation_id, user_id, name, params)


@app.task(name="crm.precompute_reports")
def precompute_reports(once_per_tick=False):
    """Compute again the reports users asked for lately whose cached copy is stale or
    about to expire.  The beat sends ``once_per_tick=True``: a second beat's copy of a
    tick does nothing.  Works at most half an interval; what is left waits for the next."""
    ctx = current()
    settings, now = ctx.settings, int(time.time())
    interval = settings.report_interval
    if once_per_tick is True and not claim(ctx.redis, "precompute_reports", interval, now):
        return {"skipped": "this tick already ran", "tick": tick_number(interval, now)}
    deadline = time.monotonic() + interval / 2
    totals = {"computed": 0, "current": 0, "forgotten": 0, "left": 0}
    for installation_id in installation_ids(ctx.engine):
        token = ctx.mirror.token(installation_id)
        if token is None:
            continue
        counts = precompute(ctx, installation_id, token, now, settings.report_idle, interval, deadline)
        for name, n in counts.items():
            totals[name] += n
    return {**totals, "tick": tick_number(interval, now) if once_per_tick is True else None}
