"""A Celery client holding no project code, as a web app has, with its broker and result
backend named explicitly: Celery prefers CELERY_BROKER_URL and CELERY_RESULT_BACKEND of
the environment to any URL given to an app, so the URLs go to the connection and the
backend themselves."""
from __future__ import annotations

from celery import Celery
from celery.backends.redis import RedisBackend


class TaskClient:
    def __init__(self, broker_url: str, backend_url: str, name: str = "webapp"):
        self.app = Celery(name)
        self.app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                             result_accept_content=["json"])
        self.backend = RedisBackend(app=self.app, url=backend_url)
        self.connection = self.app.connection_for_write(broker_url)

    def send(self, name: str, kwargs: dict | None = None, **options):
        """Send task ``name`` (options as for ``send_task``: queue, task_id, …)."""
        sent = self.app.send_task(name, kwargs=kwargs or {}, connection=self.connection, **options)
        return self.app.AsyncResult(sent.id, backend=self.backend)

    def call(self, name: str, kwargs: dict | None = None, queue: str = "query", timeout: float = 60):
        return self.send(name, kwargs, queue=queue).get(timeout=timeout)

    def close(self) -> None:
        self.connection.release()
