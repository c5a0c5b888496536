"""compose.yaml, the Dockerfile and the Prometheus config agree (Docker does not run here)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from tools.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _dockerfile() -> list[str]:
    return [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]


def test_workers_run_commands_the_cli_accepts() -> None:
    services = _compose()["services"]
    assert {"redis", "cj", "lps", "reaper", "prometheus"} <= set(services)
    entrypoint = next(line for line in _dockerfile() if line.startswith("ENTRYPOINT"))
    assert '"cjs"' in entrypoint
    for name in ("cj", "lps", "reaper"):
        command = services[name]["command"]
        assert command[:2] == ["worker", name]
        # The command parses: --help after the real arguments exits 0 only if every option exists.
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        # The password comes from REDIS_PASSWORD, the one Redis requires (see below).
        assert services[name]["environment"]["REDIS_URL"].startswith(
            "redis://:${REDIS_PASSWORD:?"
        ), services[name]["environment"]["REDIS_URL"]
        assert services[name]["environment"]["REDIS_URL"].endswith("@redis:6379/0")
        port = command[command.index("--metrics-port") + 1]
        assert str(port) in [str(p) for p in services[name]["expose"]]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        # The healthcheck asks the metrics endpoint the command opens.
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/metrics" in check, check


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"redis-server is not given {name}"
    return command[command.index(name) + 1]


def test_redis_has_aof_and_a_volume() -> None:
    redis = _compose()["services"]["redis"]
    assert _flag(redis["command"], "--appendonly") == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_redis_requires_a_password_never_evicts_and_listens_on_loopback_only() -> None:
    redis = _compose()["services"]["redis"]
    # `:?` makes compose refuse to start without the password instead of running open.
    assert _flag(redis["command"], "--requirepass").startswith("${REDIS_PASSWORD:?")
    assert _flag(redis["command"], "--maxmemory")
    # The streams are the source of truth: Redis must fail writes, not evict keys.
    assert _flag(redis["command"], "--maxmemory-policy") == "noeviction"
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert "PONG" in " ".join(redis["healthcheck"]["test"])


def test_redis_keeps_a_live_batch_small_on_every_node() -> None:
    """The listpack sizes bench/soak.py measures with (docs/operations.md)."""
    compose = _compose()
    for command in (compose["services"]["redis"]["command"], compose["x-cluster-node"]["command"]):
        assert int(_flag(command, "--hash-max-listpack-entries")) == 1024
        assert int(_flag(command, "--stream-node-max-bytes")) == 16384


def test_published_ports_are_bound_to_loopback() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_prometheus_scrapes_the_worker_ports_and_loads_the_alert_rules() -> None:
    services = _compose()["services"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    # Relative to the config file: deploy/prometheus/ in the repository (promtool), and
    # /etc/prometheus/ in the container, where compose mounts the rules beside it.
    assert config["rule_files"] == ["alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == ROOT / "deploy/prometheus/alerts.yml"
    assert mounts["/etc/prometheus/prometheus.yml"] == ROOT / "deploy/prometheus/prometheus.yml"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("cj", "lps", "reaper"):
        sd = jobs[name]["dns_sd_configs"][0]
        assert sd["names"] == [name]
        port = services[name]["command"][services[name]["command"].index("--metrics-port") + 1]
        assert str(sd["port"]) == str(port)
    rules = yaml.safe_load(mounts["/etc/prometheus/alerts.yml"].read_text())
    assert rules["groups"] and all(group["rules"] for group in rules["groups"])


def test_dockerfile_copies_every_package_and_exposes_the_metrics_port() -> None:
    lines = _dockerfile()
    copied = {shlex.split(line)[1] for line in lines if line.startswith("COPY")}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    packages = {
        init.parent.name
        for init in ROOT.glob("*/__init__.py")
        if any(fnmatch(init.parent.name, pattern) for pattern in find["include"])
    }
    assert {"events", "streams", "projections", "cj", "lps", "app", "tools"} <= packages
    for package in packages:
        assert package in copied, f"Dockerfile does not copy {package}/"
    assert "EXPOSE 9100" in lines
    # No `*_created` series beside every counter and histogram (read by prometheus_client).
    assert any("PROMETHEUS_DISABLE_CREATED_SERIES=True" in line for line in lines)
    assert any(re.match(r"FROM python:3\.1[1-9]", line) for line in lines)


def test_prometheus_sends_alerts_to_the_alertmanager_service() -> None:
    services = _compose()["services"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    alertmanager = services["alertmanager"]
    assert "alertmanager" in services["prometheus"]["depends_on"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in alertmanager["volumes"]}
    assert mounts["/etc/alertmanager/alertmanager.yml"] == (
        ROOT / "deploy/alertmanager/alertmanager.yml"
    )
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]


def test_worker_down_alerts_count_compose_replicas() -> None:
    """The *WorkerDown rules compare answering targets with compose's replicas (a vanished
    crash-looping replica has no `up` series to be 0): the numbers must stay in step."""
    services = _compose()["services"]
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    for alert, job in (
        ("CJWorkerDown", "cj"),
        ("LPSWorkerDown", "lps"),
        ("CJReaperDown", "reaper"),
    ):
        replicas = services[job]["deploy"]["replicas"]
        expr = " ".join(rules[alert]["expr"].split())
        assert f'count(up{{job="{job}"}} == 1) or vector(0)' in expr, expr
        assert re.search(rf"\) < {replicas - 0.5}\b", expr), (alert, replicas, expr)


def test_the_dashboard_service_runs_a_command_the_cli_accepts_on_loopback_only() -> None:
    service = _compose()["services"]["dashboard"]
    result = CliRunner().invoke(main, [*service["command"], "--help"])
    assert result.exit_code == 0, result.output
    port = service["command"][service["command"].index("--port") + 1]
    assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert "CJS_DASHBOARD_TOKEN" in service["environment"]
    assert "ANTHROPIC_API_KEY" not in service["environment"]


def test_grafana_is_provisioned_with_a_dashboard_over_metrics_that_exist() -> None:
    services = _compose()["services"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in services["grafana"]["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "cj-streams.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    dashboards = list(mounts[folder].glob("*.json"))
    assert dashboards
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    exporter = services["redis-exporter"]
    assert "REDIS_EXPORTER_CHECK_STREAMS" in exporter["environment"]
    assert jobs["redis"]["static_configs"][0]["targets"] == ["redis-exporter:9121"]
    # Every series a panel asks for: one the project defines, or one of redis_exporter's.
    ours = set(re.findall(r'"((?:lps|cj|events)_[a-z_]+)"', _sources()))
    for path in dashboards:
        board = json.loads(path.read_text())
        exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        assert len(exprs) >= 20
        for expr in exprs:
            for name in re.findall(r"\b((?:lps|cj|events|redis)_[a-z_]+)", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in ours or name.startswith("redis_stream_") or name == "up", name


def _sources() -> str:
    return "\n".join(
        p.read_text() for d in ("streams", "cj", "lps") for p in (ROOT / d).glob("*.py")
    )
