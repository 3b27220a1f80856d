"""crm-insight: the Celery app and the machinery beneath the tasks.

Importing ``worker`` builds nothing and reads no environment; ``celery -A worker`` finds
the app as ``worker.celery`` (the app itself lives in :mod:`worker.app`).
"""


def __getattr__(name: str):
    if name == "celery":
        from worker.app import app
        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
