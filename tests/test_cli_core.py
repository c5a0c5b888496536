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
    assert status["finalize_reason"] in ("reliable", "budget", "all_pairs")
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
    assert plan["denominator"] == 3 == plan["all_pairs"] == plan["comparison_cap"]
    assert plan["expected_comparisons"] <= plan["comparison_cap"]


def test_submit_dry_run_shows_the_cap_and_the_expected_comparisons(tmp_path: Path) -> None:
    essays = [{"essay_id": f"e{i}", "text": f"essay {i}"} for i in range(100)]
    path = _write(tmp_path, "b.json", {"essays": essays})
    plan = _one_json(_run(["submit", str(path), "--dry-run", "--json"]).stdout)
    # Default cap 30 per essay; expected ~21 per essay for R 0.80 at a logit SD of 1.
    assert plan["comparison_cap"] == 1500 and plan["cap_per_essay"] == 30
    assert plan["target_reliability"] == 0.8 and plan["min_comparisons_per_essay"] == 10
    assert 900 < plan["expected_comparisons"] < 1200
    per = _one_json(
        _run(["submit", str(path), "--dry-run", "--json", "--comparisons-per-essay", "12"]).stdout
    )
    assert per["comparison_cap"] == 600 and per["expected_comparisons"] == 600
    low = _one_json(
        _run(["submit", str(path), "--dry-run", "--json", "--target-reliability", "0.5"]).stdout
    )
    assert low["target_reliability"] == 0.5 and low["expected_comparisons"] == 500  # the minimum
    text = _run(["submit", str(path), "--dry-run"])
    assert "expected_comparisons" in text.stdout and "comparison_cap" in text.stdout
    both = _run(["submit", str(path), "--dry-run", "--budget", "9", "--comparisons-per-essay", "3"])
    assert both.exit_code == 2 and "not both" in both.stderr
    bad = _run(["submit", str(path), "--dry-run", "--target-reliability", "1.5"])
    assert bad.exit_code == 2


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
    assert results["reliability"] == demo["reliability"]
    assert 0 < results["reliability"] < 1
    assert results["reliability"] == results["reliabilities"]["posterior"]["value"]
    half = results["reliabilities"]["split_half"]
    assert half["splits"] == 20 and half["unit"] == "comparison"
    assert half["spearman_brown"] == pytest.approx(2 * half["r"] / (1 + half["r"]), abs=1e-5)
    assert "inflates" in results["reliabilities"]["ssr"]["note"]
    assert "deflates" in half["note"]
    students = [e for e in results["essays"] if not e["is_anchor"]]
    scale = results["grade_scale"]
    for e in students:
        probs = e["grade_probabilities"]
        assert abs(sum(probs.values()) - 1) < 0.01
        assert e["grade"] == max(probs, key=probs.get)
        assert e["confidence"] in ("high", "mid", "low")
        assert e["grade_confidence"] == probs[e["grade"]]
        band = e["grade_band"]
        assert e["grade"] in band and band == scale[scale.index(band[0]) :][: len(band)]
        assert sum(probs[g] for g in band) >= 0.8 - 0.01
    decisions = results["grade_decisions"]
    assert 0 <= decisions["single_grade_share"] <= 1
    assert (decisions["note"] is None) == decisions["single_grades_supported"]
    assert isinstance(results["warnings"], list)
    table = _run(["results", batch], env)
    assert table.exit_code == 0 and "reliability R" in table.stdout and "band" in table.stdout
    rows = _run(["results", batch, "--csv"], env).stdout.splitlines()
    header = rows[0].split(",")
    assert {"grade_band", "grade_confidence", "confidence"} <= set(header)
    assert len(rows) == 1 + 16
    band = header.index("grade_band")
    # A band is its grades lowest first, space-separated, in one cell.
    assert all(row.split(",")[band] for row in rows[1:])
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


def test_submit_with_replica_acknowledgement_says_when_no_replica_held_it(
    redis_server: Any, tmp_path: Path
) -> None:
    """CJS_MIN_REPLICAS_ACK=1: `submit` waits for a replica to hold the batch before it says
    it is registered, as the workers' commits do (a failover right after the reply could take
    an unreplicated batch with its master). A server without replicas never acknowledges:
    the batch is registered, and the reply says that no replica holds it yet."""
    env = {
        "REDIS_URL": redis_server.url,
        "CJS_PREFIX": "ack:",
        "CJS_MIN_REPLICAS_ACK": "1",
        "CJS_REPLICA_ACK_TIMEOUT_MS": "50",
    }
    reply = _one_json(_run(["submit", str(_write(tmp_path, "b.json", GOOD)), "--json"], env).stdout)
    [warning] = [w for w in reply["warnings"] if "replica" in w]
    assert "within 50 ms" in warning and reply["batch_id"] in warning
    status = _one_json(_run(["status", reply["batch_id"], "--json"], env).stdout)
    assert status["status"] in ("registered", "running")
    env["CJS_MIN_REPLICAS_ACK"] = "0"
    again = _one_json(
        _run(["submit", str(_write(tmp_path, "c.json", GOOD)), "--json", "--new"], env).stdout
    )
    assert not [w for w in again["warnings"] if "replica" in w]  # not asked: not waited for
