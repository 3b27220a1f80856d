"""Test set-up: the real MariaDB/MySQL and the real Redis, on databases of their own.

``CRM_TEST_DATABASE_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/crm_test``) and
``CRM_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/13``; the broker and the result
backend take the next two database numbers) choose them.  Left at their defaults and
not answering (a fresh machine), they are replaced by the embedded redis-server and an
SQLite file (tests/services.py), and the tests marked ``mysql`` are skipped.  Each test
starts from empty tables and an empty keyspace.
"""
import dataclasses
import os

import pytest
from cryptography.fernet import Fernet

from tests import services  # noqa: E402

DEFAULT_DATABASE_URL = "mysql+pymysql://root@127.0.0.1:3306/crm_test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DATABASE_URL = os.environ.get("CRM_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
REDIS_URL = os.environ.get("CRM_TEST_REDIS_URL", DEFAULT_REDIS_URL)
#: Left at their defaults and not answering (a fresh machine): the embedded redis-server
#: and an SQLite file instead; the tests marked ``mysql`` are skipped.
#: The choice is kept in the environment: this module is imported twice (as pytest's
#: conftest and as tests.conftest), and both must use the same servers.
EMBEDDED = [e for e in os.environ.get("CRM_TEST_EMBEDDED", "").split(",") if e]
if "CRM_TEST_REDIS_URL" not in os.environ and services.redis_fault(REDIS_URL):
    REDIS_URL = os.environ["CRM_TEST_REDIS_URL"] = services.start_embedded_redis() + "/13"
    EMBEDDED.append("redis")
if "CRM_TEST_DATABASE_URL" not in os.environ and services.database_fault(DATABASE_URL):
    DATABASE_URL = os.environ["CRM_TEST_DATABASE_URL"] = services.sqlite_url()
    EMBEDDED.append("database")
os.environ["CRM_TEST_EMBEDDED"] = ",".join(EMBEDDED)
#: Whether the tests' database speaks the MySQL protocol (MariaDB, MySQL, TiDB).
MYSQL = DATABASE_URL.startswith("mysql")
_base, _db = REDIS_URL.rsplit("/", 1)
BROKER_URL = f"{_base}/{int(_db) + 1}"
BACKEND_URL = f"{_base}/{int(_db) + 2}"

#: Mailbox secrets are encrypted under a key of the run's own (kept in the environment for
#: the second import of this module).
os.environ.setdefault("CRM_TEST_SECRET_KEY", Fernet.generate_key().decode())

# Before anything imports the app: the tests never touch the configured service.
os.environ.update({
    "CRM_DATABASE_URL": DATABASE_URL,
    "CRM_REDIS_URL": REDIS_URL,
    "CELERY_BROKER_URL": BROKER_URL,
    "CELERY_RESULT_BACKEND": BACKEND_URL,
    "CRM_VISIBILITY_TIMEOUT": "30",
    "CRM_DB_LOCK_WAIT_TIMEOUT": "2",
    "CRM_SECRET_KEY": os.environ["CRM_TEST_SECRET_KEY"],
})
os.environ.pop("CRM_CURSOR_SECRET", None)

from worker.context import Context, Limits  # noqa: E402
from worker.db import make_engine
from worker.redis_index import connect  # noqa: E402
from worker.schema import create_database, data_tables, upgrade  # noqa: E402
from worker.settings import Settings  # noqa: E402

#: The settings of the tests' own contexts: the environment above, with the views the
#: tests expect precomputed.
SETTINGS = dataclasses.replace(Settings.from_env(), precompute_views=(
    ("meeting_date", None, None), ("meeting_date", "email", "open")), mirror_check_ms=0)


def pytest_configure(config):
    config.addinivalue_line("markers", "mysql: needs a MySQL-protocol server (dump and restore, a second "
                                       "database, the benchmark); skipped on the embedded fallback")


def pytest_collection_modifyitems(config, items):
    if MYSQL:
        return
    skip = pytest.mark.skip(reason="needs a MySQL-protocol server")
    skipped = [item for item in items if item.get_closest_marker("mysql")]
    for item in skipped:
        item.add_marker(skip)
    config._crm_skipped = len(skipped)


def pytest_terminal_summary(terminalreporter, config):
    if EMBEDDED:
        terminalreporter.write_line(
            f"no local {' or '.join(EMBEDDED)} answered: ran on "
            + " and ".join({"redis": "the embedded redis-server", "database": "SQLite"}[e] for e in EMBEDDED))
    skipped = getattr(config, "_crm_skipped", 0)
    if skipped:
        terminalreporter.write_line(
            f"{skipped} tests skipped: they need a MySQL-protocol server; start MariaDB/MySQL on "
            "127.0.0.1:3306 (root, no password) or point CRM_TEST_DATABASE_URL at one")


def pytest_sessionstart(session):
    """The services the tests run against must answer; else one clear message, not a
    thousand lines of errors."""
    from worker.settings import redact
    problems = []
    fault = services.database_fault(DATABASE_URL)
    if fault:
        problems.append(f"the database at {redact(DATABASE_URL)} does not answer ({fault}): "
                        "start MariaDB/MySQL there, or point CRM_TEST_DATABASE_URL at one")
    fault = services.redis_fault(REDIS_URL)
    if fault:
        problems.append(f"Redis at {redact(REDIS_URL)} does not answer ({fault}): "
                        "start redis-server there, or point CRM_TEST_REDIS_URL at one")
    if problems:
        pytest.exit("cannot run the tests:\n  " + "\n  ".join(problems), returncode=3)


@pytest.fixture(scope="session")
def engine():
    create_database(DATABASE_URL)
    engine = make_engine(DATABASE_URL, SETTINGS.db_lock_wait_timeout)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def redis_client():
    return connect(REDIS_URL)


def make_context(engine, r, limits: Limits = Limits(), **settings) -> Context:
    """A context of the tests' own (each test builds its own: nothing is shared by accident)."""
    return Context(dataclasses.replace(SETTINGS, **settings), engine, r, limits)


def wipe(engine, r) -> None:
    with engine.begin() as conn:
        for table in data_tables():
            conn.execute(table.delete())
    r.flushdb()


@pytest.fixture
def clean(engine, redis_client):
    """Empty tables and keyspace; yields a context of the test's own on them."""
    wipe(engine, redis_client)
    yield make_context(engine, redis_client)


@pytest.fixture
def sqlite_engine(tmp_path):
    """The embedded default: an SQLite file, migrated by the same code as `crm init`."""
    from worker.db import make_engine
    engine = make_engine(f"sqlite:///{tmp_path / 'crm.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def celery_worker_session(engine, redis_client):
    """One real worker for the session (threads pool, every queue), through the real
    broker and result backend."""
    from celery.contrib.testing.worker import start_worker

    from worker.app import app
    for url in (BROKER_URL, BACKEND_URL):
        connect(url).flushdb()
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=30) as worker:
        yield worker


@pytest.fixture(scope="session")
def webapp():
    """A Celery client that holds no project code, as a web app would have."""
    from celery import Celery
    client = Celery("webapp", broker=BROKER_URL, backend=BACKEND_URL)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                       result_accept_content=["json"])
    return client


@pytest.fixture
def worker_env(celery_worker_session, clean, webapp):
    """A running worker, clean data, and the web app's client."""
    return clean.engine, clean.redis, webapp
