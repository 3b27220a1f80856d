"""Keep customer data out of the logs.

Celery logs every task's return value at INFO (``… succeeded in 0.003s: {…}``), an
argument error as ERROR with a traceback, and the task's arguments at DEBUG.  A query page
or a batch of records is customer data: the filters below keep the outcome and drop the
payload, whatever the log level.
"""
from __future__ import annotations

import logging

#: Set on an exception that reports a caller's mistake (see worker.app.CrmTask).
CALLER_MISTAKE = "crm_caller_mistake"


class NoPayloads(logging.Filter):
    """On Celery's task-trace logger: a success names the task and its run time only; a
    caller's mistake is one INFO line naming the argument, without value or traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, dict):
            return True
        if "return_value" in args:
            record.msg = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
        exc = record.exc_info[1] if record.exc_info else None
        if getattr(exc, CALLER_MISTAKE, False):
            field = str(exc).split(":", 1)[0][:80]
            record.levelno, record.levelname = logging.INFO, "INFO"
            if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
                return False  # logged as an error, it is not one: below the level asked for
            record.exc_info = record.exc_text = None
            record.msg = "Task %(name)s[%(id)s] rejected: invalid argument %(field)s"
            record.args = {**args, "field": field}
        return True


class NoArguments(logging.Filter):
    """On Celery's pool logger: its DEBUG line about each task carries the message body."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("TaskPool: Apply") and record.args:
            record.args = (record.args[0], "(not logged)", "(not logged)")
        return True


def install() -> None:
    logging.getLogger("celery.app.trace").addFilter(NoPayloads())
    logging.getLogger("celery.pool").addFilter(NoArguments())
