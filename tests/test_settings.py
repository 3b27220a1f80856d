"""Settings come from the environment, validated; passwords never reach a log line."""
import pytest

from worker.settings import Settings, SettingsError, redact


def test_defaults():
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///") and s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.broker_url == "redis://127.0.0.1:6379/1" and s.result_backend == "redis://127.0.0.1:6379/2"
    assert s.visibility_timeout == 3600


def test_values_and_errors():
    s = Settings.from_env({"CRM_VISIBILITY_TIMEOUT": "8", "CRM_REDIS_URL": "redis://:pw@h:6380/3",
                           "CRM_PRECOMPUTE_VIEWS": "updated_at:*:open"})
    assert s.visibility_timeout == 8 and s.broker_url == "redis://:pw@h:6380/1"
    assert s.precompute_views == (("updated_at", None, "open"),)
    for env, name in (({"CRM_VISIBILITY_TIMEOUT": "soon"}, "CRM_VISIBILITY_TIMEOUT"),
                      ({"CRM_VISIBILITY_TIMEOUT": "0"}, "CRM_VISIBILITY_TIMEOUT"),
                      ({"CRM_DATABASE_URL": "postgresql://x/y"}, "CRM_DATABASE_URL"),
                      ({"CRM_REDIS_URL": "localhost"}, "CRM_REDIS_URL"),
                      ({"CRM_PRECOMPUTE_VIEWS": "details:*:*"}, "CRM_PRECOMPUTE_VIEWS")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


def test_redact_hides_passwords():
    assert redact("mysql+pymysql://crm:s3cret@db:4000/crm") == "mysql+pymysql://crm:***@db:4000/crm"
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    assert "s3cret" not in redact("redis://u:s3cret@h/0")


def test_unix_socket_redis_gives_celery_socket_urls():
    s = Settings.from_env({"CRM_REDIS_URL": "unix:///tmp/r.sock?db=0"})
    assert s.broker_url == "redis+socket:///tmp/r.sock?virtual_host=1"
