"""compose.yaml cannot run here (no Docker engine): check that it parses and that it
names the project's real commands, queues and variables."""
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def compose():
    with open(os.path.join(ROOT, "compose.yaml")) as f:
        return yaml.safe_load(f)


def command(service) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_services_and_start_order(compose):
    services = compose["services"]
    assert {"tidb", "redis", "init", "worker-query", "worker-bulk", "worker-reports", "worker-sync", "beat",
            "flower", "exporter"} <= set(services)
    assert services["exporter"]["ports"] == ["127.0.0.1:9808:9808"]
    assert services["tidb"]["image"].startswith("pingcap/tidb:")
    for name, service in services.items():
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert condition["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
    for name in ("worker-query", "worker-bulk", "worker-reports", "worker-sync", "beat", "flower"):
        deps = services[name]["depends_on"]
        assert deps["init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]


def test_commands_are_the_projects(compose):
    from worker.app import QUEUES
    from worker.cli import parser
    services = compose["services"]
    init = services["init"]["command"]
    assert init[:2] == ["crm", "init"]
    parser().parse_args(init[1:])  # the options exist
    queues = set()
    for name in ("worker-query", "worker-bulk", "worker-reports", "worker-sync"):
        cmd = services[name]["command"]
        assert cmd[:4] == ["celery", "-A", "worker", "worker"]
        queues |= set(cmd[cmd.index("-Q") + 1].split(","))
    assert queues == set(QUEUES)
    assert services["worker-query"]["command"][services["worker-query"]["command"].index("-Q") + 1] == "query"
    assert command(services["beat"]).startswith("celery -A worker beat")
    flower = command(services["flower"])
    assert flower.startswith("celery -A worker --quiet flower") and "basic-auth" not in flower
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]  # /metrics and /healthcheck stay local


def test_environment_names_are_the_contracts(compose):
    env = compose["x-crm-env"]
    for name in ("CRM_DATABASE_URL", "CRM_REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
                 "CRM_VISIBILITY_TIMEOUT"):
        assert name in env
    assert env["CRM_DATABASE_URL"].startswith("mysql+pymysql://") and "@tidb:4000/" in env["CRM_DATABASE_URL"]
    from worker.settings import Settings
    # The values validate, with ${VAR:-default} taken as compose would with VAR unset.
    resolved = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    Settings.from_env({k: v for k, v in resolved.items() if v})


def test_image_builds_from_the_project(compose):
    build = compose["x-crm-service"]["build"]
    with open(os.path.join(ROOT, build["dockerfile"])) as f:
        dockerfile = f.read()
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert "pip install" in dockerfile
