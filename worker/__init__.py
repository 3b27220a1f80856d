"""crm-insight: the Celery app and the machinery beneath the tasks."""
from worker.app import app

__all__ = ["app"]
