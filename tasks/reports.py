"""The report task (queue ``reports``): a manager's dashboard, secured per user."""
from worker.app import app
from worker.context import current
from worker.reports import report as compute_report


@app.task(name="crm.report")
def report(installation_id, user_id, name, params=None):
    """One report (activity, response_times, awaiting_reply, workload, going_cold) over
    what the user may see; see the README for each report's rows."""
    return compute_report(current(), installation_id, user_id, name, params)
