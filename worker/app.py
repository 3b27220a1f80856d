"""The Celery app: ``celery -A worker worker`` and ``celery -A worker beat``."""
from __future__ import annotations

import inspect
import logging
import random
import sys

from celery import Celery, Task
from celery.signals import worker_process_init
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from kombu import Exchange, Queue

import beat_schedule
from worker import context, logs, metrics
from worker.errors import REDIS_FAULTS, InvalidArgument, is_transient
from worker.mailbox.secrets import redact_call
from worker.settings import Settings, SettingsError, redact

log = logging.getLogger(__name__)

QUEUES = ("ingest", "query", "precompute", "maintenance", "reports", "sync")
ROUTES = {
    "crm.ingest_meetings": "ingest",
    "crm.delete_meetings": "ingest",
    "crm.set_user_clients": "ingest",
    "crm.grant_clients": "ingest",
    "crm.revoke_clients": "ingest",
    "crm.upsert_clients": "ingest",
    "crm.upsert_users": "ingest",
    "crm.upsert_contacts": "ingest",
    "crm.ingest_emails": "ingest",
    "crm.query_meetings": "query",
    "crm.query_threads": "query",
    "crm.get_thread": "query",
    "crm.search_contacts": "query",
    "crm.precompute_user": "precompute",
    "crm.precompute_active": "precompute",
    "crm.rebuild_index": "maintenance",
    "crm.reconcile_index": "maintenance",
    "crm.report": "reports",
    "crm.precompute_reports": "reports",
    "crm.noop": "query",
    "crm.upsert_mailboxes": "ingest",
    "crm.set_mailbox_token": "ingest",
    "crm.mailbox_status": "query",
    "crm.sync_mailboxes": "sync",
    "crm.sync_mailbox": "sync",
}


def caller_mistake(exc: InvalidArgument) -> ValueError:
    """The error a caller's ``result.get()`` raises for an invalid argument: a plain
    ``ValueError`` with the field-first message, which any client rebuilds as such (the
    result backend stores its type as ``builtins.ValueError``; a client without project
    code could not rebuild ``worker.errors.InvalidArgument``)."""
    err = ValueError(str(exc))
    setattr(err, logs.CALLER_MISTAKE, True)
    return err


class SecretRequest(Request):
    """The worker's view of a task that carries a secret (``secret_arguments``): what the
    worker logs and sends as events (``task-received``, which Flower shows) is the call with
    its secrets replaced, whatever ``argsrepr``/``kwargsrepr`` the client sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            shown_args, shown_kwargs = self.task.redacted(self._args, self._kwargs)
            self._argsrepr, self._kwargsrepr = saferepr(shown_args), saferepr(shown_kwargs)
        except Exception:  # arguments of an unexpected shape: show none of them
            self._argsrepr = self._kwargsrepr = "'(redacted)'"
        self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = self._argsrepr, self._kwargsrepr

    def info(self, safe=False):
        return super().info(safe=True)


class CrmTask(Task):
    """Retries transient faults (database or Redis unreachable, deadlock, lock wait
    timeout, write conflict) with exponential backoff and jitter; anything else fails at
    once and reaches the caller's ``result.get()``: invalid arguments (unknown or missing
    ones included) as a ``ValueError`` whose message starts with the field."""
    max_retries = 12
    retry_backoff_cap = 60
    _arguments: inspect.Signature | None = None
    #: True for a task whose arguments carry a secret (a mailbox password or token): its
    #: arguments are redacted in what the worker logs and shows, and in the result backend
    #: (``result_extended`` keeps a task's arguments there).
    secret_arguments = False
    #: No text of a result goes into the task-succeeded event (what Flower and any event
    #: consumer see): a result is a page of customer data, which the result backend alone
    #: carries.  Celery builds that text for every task, walking the result, even when
    #: nothing reads it: a quarter of a warm query task's own time.
    resultrepr_maxsize = 0

    def redacted(self, args, kwargs) -> tuple[list, dict]:
        return redact_call(inspect.signature(self.run), args, kwargs)

    def __call__(self, *args, **kwargs):
        try:
            return self._checked_call(*args, **kwargs)
        finally:
            if self.secret_arguments and not self.request.called_directly:
                # After any retry was sent with the real arguments; before the result (or
                # the failure) is stored with the request's.
                request = self.request
                request.args, request.kwargs = self.redacted(request.args, request.kwargs)
                request.argsrepr, request.kwargsrepr = saferepr(request.args), saferepr(request.kwargs)

    def _checked_call(self, *args, **kwargs):
        try:
            if self._arguments is None:
                self._arguments = inspect.signature(self.run)
            try:
                self._arguments.bind(*args, **kwargs)
            except TypeError as exc:
                raise _argument_error(self.name, exc) from None
            return super().__call__(*args, **kwargs)
        except InvalidArgument as exc:
            if self.request.called_directly:
                raise
            raise caller_mistake(exc) from None
        except Exception as exc:
            if not is_transient(exc) or self.request.called_directly:
                raise
            delay = min(self.retry_backoff_cap, 2 ** self.request.retries) * (0.5 + random.random() / 2)
            log.warning("%s: transient %s, retry in %.1fs", self.name, exc.__class__.__name__, delay)
            if not isinstance(exc, REDIS_FAULTS):  # a Redis that failed would not count it
                metrics.count(context.current().redis, {f"retry:{exc.__class__.__name__}": 1})
            raise self.retry(exc=exc, countdown=delay)


def _argument_error(task: str, exc: TypeError) -> InvalidArgument:
    """``missing a required argument: 'user_id'`` -> ``user_id: is required``."""
    text = str(exc)
    name = text.split("'")[1] if text.count("'") >= 2 else "arguments"
    if "missing" in text:
        return InvalidArgument(name, "is required")
    if "unexpected keyword" in text:
        return InvalidArgument(name, f"is not an argument of {task}")
    return InvalidArgument("arguments", f"do not fit {task}: pass them by name")


def configure(app: Celery, settings) -> None:
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A finished task whose result cannot be stored (a lost connection) keeps trying
        # instead of reporting a failure for work that was done.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_backend_base_sleep_between_retries_ms=50,
        result_backend_max_sleep_between_retries_ms=5000,
        # Each queue its own direct exchange and routing key, named after it: that is what a
        # client holding no project code publishes to with send_task(..., queue=name).
        # (A bare Queue(name) would take the default exchange and key, "query", and a
        # worker started with -Q would bind every queue to that one key.)
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="query",
        task_routes={name: {"queue": queue} for name, queue in ROUTES.items()},
        result_expires=3600,
        result_extended=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule.entries(settings),
    )


logs.install()
app = Celery("crm", task_cls=CrmTask, include=[
    "tasks.ingest", "tasks.access", "tasks.query", "tasks.precompute", "tasks.maintenance", "tasks.email",
    "tasks.reports", "tasks.mailbox"])
try:
    configure(app, Settings.from_env())
except SettingsError as exc:
    # One line that names the variable, not a traceback from deep inside Celery's loader.
    print(f"crm-insight: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
log.debug("broker %s, result backend %s", redact(app.conf.broker_url), redact(app.conf.result_backend))


@worker_process_init.connect
def _fresh_connections(**_):
    """A forked pool process must not share its parent's sockets."""
    context.reset()
