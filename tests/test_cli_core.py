"""The command line: demo on the embedded Redis, submit's validation, --json discipline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tools.cli import main


def _run(args: list[str], env: dict[str, str] | None = None) -> Any:
    runner = CliRunner()
    return runner.invoke(main, args, env={"REDIS_URL": "", **(env or {})}, catch_exceptions=False)


def _one_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line, got {len(lines)}"
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("mode", "profile"), [("per_request", "cj_generic_batch"), ("serial_bundle", "flaky")]
)
def test_demo_runs_to_a_finalized_batch_with_exact_counters(mode: str, profile: str) -> None:
    result = _run(
        ["demo", "--json", "--essays", "14", "--mode", mode, "--profile", profile, "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    out = _one_json(result.stdout)
    status = out["status"]
    assert out["mode"] == mode and out["profile"] == profile
    assert status["status"] == "finalized"
    assert status["finalize_reason"] in ("stable", "budget", "all_pairs")
    assert status["completed"] + status["failed"] == status["callbacks_accepted"]
    assert status["callbacks_accepted"] <= status["submitted"] <= status["denominator"]
    assert 0 < status["completion_pct"] <= 100
    assert status["in_flight"] == 0 and status["completed_at"]
    assert (status["duplicates"], status["orphans"], status["late_callbacks"]) == (0, 0, 0)
    assert len(out["results"]) == 14
    assert sorted(r["rank"] for r in out["results"]) == list(range(1, 15))
    assert all(r["se"] > 0 for r in out["results"])
    assert out["spearman_true"] > 0.5
    # Every provider call is an event: completed comparisons plus failed attempts.
    assert out["provider_calls"] >= status["completed"]
    if profile == "flaky":
        assert out["provider_calls"] > status["completed"]


def test_demo_is_deterministic_for_a_seed() -> None:
    first = _one_json(
        _run(["demo", "--json", "--essays", "10", "--seed", "11", "--profile", "ideal"]).stdout
    )
    second = _one_json(
        _run(["demo", "--json", "--essays", "10", "--seed", "11", "--profile", "ideal"]).stdout
    )
    assert [r["essay_id"] for r in first["results"]] == [r["essay_id"] for r in second["results"]]
    assert [r["theta"] for r in first["results"]] == [r["theta"] for r in second["results"]]


def test_every_command_has_help() -> None:
    commands = main.list_commands(click.Context(main))
    assert set(commands) == {
        "archive",
        "batches",
        "dashboard",
        "demo",
        "dlq",
        "export",
        "import",
        "positions",
        "replay",
        "results",
        "status",
        "stuck",
        "submit",
        "validate",
        "worker",
    }
    for command in commands:
        result = _run([command, "--help"])
        assert result.exit_code == 0
        assert "Usage:" in result.output


def _write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD = {
    "essays": [
        {"essay_id": "a", "text": "one"},
        {"essay_id": "b", "text": "two", "anchor_grade": "C"},
    ]
}


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"essays": [{"essay_id": "a", "text": "x"}]}, "at least 2 essays"),
        (
            {"essays": [{"essay_id": "a", "text": "x"}, {"essay_id": "a", "text": "y"}]},
            "duplicate essay_id 'a'",
        ),
        (
            {"essays": [{"essay_id": "", "text": "x"}, {"essay_id": "b", "text": "y"}]},
            "essays.0.essay_id",
        ),
        (
            {"essays": [{"essay_id": "a", "text": "  "}, {"essay_id": "b", "text": "y"}]},
            "essays.0.text",
        ),
        (
            {
                "essays": [
                    {"essay_id": "a", "text": "x", "anchor_grade": "Z"},
                    {"essay_id": "b", "text": "y"},
                ]
            },
            "unknown grade 'Z'",
        ),
        ({"grade_scale": "nope", "essays": GOOD["essays"]}, "grade_scale"),
        ("{not json", "not valid"),
    ],
)
def test_submit_rejects_bad_input_with_exit_2_and_appends_nothing(
    tmp_path: Path, payload: Any, needle: str
) -> None:
    path = _write(tmp_path, "batch.json", payload)
    result = _run(["submit", str(path)], env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2
    assert needle in result.stderr


def test_submit_unreadable_file(tmp_path: Path) -> None:
    result = _run(["submit", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_submit_dry_run_plans_without_redis(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path, "batch.csv", "essay_id,text,anchor_grade\na,one,\nb,two,B\nc,three,\n"
    )
    result = _run(["submit", str(csv_path), "--grade-scale", "swedish_6", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = _one_json(result.stdout)
    assert plan["essays"] == 3 and plan["anchors_per_grade"]["B"] == 1
    assert plan["denominator"] == 3 == plan["all_pairs"]


def test_submit_needs_redis_url(tmp_path: Path) -> None:
    result = _run(["submit", str(_write(tmp_path, "b.json", GOOD))])
    assert result.exit_code != 0 and "REDIS_URL" in result.output


def test_positions_and_results_report_balance_bias_and_grades(redis_server: Any) -> None:
    """`positions` and `results` on a batch the demo ran on a real server."""
    env = {"REDIS_URL": redis_server.url, "CJS_PREFIX": "pos:"}
    demo = _one_json(_run(["demo", "--json", "--essays", "16", "--seed", "5"], env).stdout)
    batch = demo["batch_id"]
    report = _one_json(_run(["positions", batch, "--json"], env).stdout)
    # Invariant 8: every essay's A-count minus B-count is in {-1, 0, 1}.
    assert report["max_abs_balance"] <= 1
    assert all(abs(e["as_a"] - e["as_b"]) <= 1 for e in report["essays"])
    assert report["comparisons"] == demo["status"]["completed"]
    assert 0 <= report["binomial_p_value"] <= 1
    assert report["position_bias"]["se"] > 0
    groups = report["groups"]
    assert groups["anchors"]["as_a"] + groups["students"]["as_a"] == report["requested"]
    results = _one_json(_run(["results", batch, "--json"], env).stdout)
    assert results["ssr"] == demo["ssr"] and results["split_half"] is not None
    students = [e for e in results["essays"] if not e["is_anchor"]]
    for e in students:
        assert abs(sum(e["grade_probabilities"].values()) - 1) < 0.01
        assert e["grade"] == max(e["grade_probabilities"], key=e["grade_probabilities"].get)
        assert e["confidence"] in ("high", "mid", "low")
    assert isinstance(results["warnings"], list)
    text = _run(["positions", batch], env)
    assert text.exit_code == 0 and "binomial p" in text.stdout


def test_submit_refuses_a_model_that_cannot_judge(tmp_path: Path) -> None:
    path = _write(tmp_path, "b.json", GOOD)
    result = _run(
        ["submit", str(path), "--provider", "anthropic", "--model", "claude-opus-5-5", "--dry-run"]
    )
    assert result.exit_code == 2 and "forced tool use" in result.stderr
    ok = _run(["submit", str(path), "--provider", "anthropic", "--dry-run", "--json"])
    assert ok.exit_code == 0 and _one_json(ok.stdout)["model"] == "claude-sonnet-4-6"
