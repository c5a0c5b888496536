"""`cjs validate`: per_request vs serial_bundle, in-process and from recorded runs; the HTML report
renders in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from scipy.stats import spearmanr

from tests.test_replay import cli, one_json
from tools.cli import main

ARGS = ["validate", "--essays", "10", "--profile", "flaky", "--seed", "3", "--json"]


def _embedded(args: list[str]) -> Any:
    return CliRunner().invoke(
        main, args, env={"REDIS_URL": "", "CJS_PREFIX": ""}, catch_exceptions=False
    )


def _check_mode(view: dict[str, Any], mode: str) -> None:
    assert view["mode"] == mode and view["status"] == "finalized"
    assert view["counters_match_events"] is True
    assert all(c["projection"] == c["events"] for c in view["counters"].values())
    attempts = view["error_rates"]["attempts"]["mock"]
    assert attempts["calls"] == view["provider_calls"] > 0
    assert sum(e["count"] for e in attempts["errors"].values()) > 0  # flaky: errors happen
    assert set(attempts["errors"]) <= {
        "rate_limit",
        "overloaded",
        "server_error",
        "timeout",
        "max_tokens",
    }
    assert view["error_rates"]["comparisons"]["mock"]["requests"] == view["requests_in_stream"]
    for group in ("anchors", "students"):
        pos = view["positions"][group]
        assert pos["balanced"] and pos["as_a"] + pos["as_b"] > 0
        assert sum(r["a"] for r in pos["per_essay"]) == pos["as_a"]
    assert view["positions"]["anchors"]["essays"] + view["positions"]["students"]["essays"] == 10
    assert view["callbacks"] == {"late": 0, "duplicate": 0, "orphan": 0, "expired_requests": 0}
    tokens = view["tokens"]
    assert tokens["by_kind"]["input_tokens"] > 0 and "total" not in tokens  # kinds are not summed
    assert tokens["per_comparison"]["output_tokens"] > 0
    # the mock judge costs nothing; the cost from the events equals the projection's
    assert view["cost"]["usd"] == view["cost"]["projection_usd"] == 0.0
    if mode == "serial_bundle":
        assert view["bundles"]["count"] > 0
        assert view["bundles"]["requests_bundled"] == view["requests_in_stream"]
        assert 1 <= view["bundles"]["max_size"] <= 64
    else:
        assert view["bundles"]["count"] == 0


def test_validate_in_process_compares_the_modes_and_writes_a_report(tmp_path: Path) -> None:
    result = _embedded([*ARGS, "--report", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    out = one_json(result.stdout)
    assert set(out["modes"]) == {"per_request", "serial_bundle"}
    for mode, view in out["modes"].items():
        _check_mode(view, mode)
    c = out["comparison"]
    assert c["modes"] == ["per_request", "serial_bundle"]
    # 10 essays of a noisy judge: any value, but the one the two runs' θ give.
    theta = {m: {e["essay_id"]: e["theta"] for e in out["modes"][m]["essays"]} for m in c["modes"]}
    ids = sorted(set(theta["per_request"]) & set(theta["serial_bundle"]))
    rho = spearmanr(
        [theta["per_request"][i] for i in ids], [theta["serial_bundle"][i] for i in ids]
    ).statistic
    assert len(ids) == 10 and c["spearman_between_modes"] == round(float(rho), 4)
    agree = c["grade_agreement"]["students"]
    assert agree["n"] > 0 and 0 <= agree["exact"] <= agree["within_one"] <= 1
    assert c["counters_match_events"] and c["positions_balanced"]
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "per_request" in md and "Spearman" in md
    # The dashboard's charts (errors, two balance charts, θ scatter), drawn by plotly.js inlined
    # in the page: nothing is loaded from elsewhere.
    assert page.count("Plotly.newPlot(") >= 4
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=", page)
    assert _embedded(["validate", "--modes", "per_request,batch_api"]).exit_code == 2


@pytest.mark.redis
def test_recorded_runs_give_the_same_analysis_as_the_live_ones(
    redis_server: Any, tmp_path: Path
) -> None:
    url = redis_server.url
    live = one_json(cli([*ARGS, "--keep"], url, "v:").stdout)
    kept = live["kept_prefix"]
    assert kept.startswith("v:validate-") and "namespace 'v:validate-" in live["source"]
    files = []
    for mode in ("per_request", "serial_bundle"):
        path = tmp_path / f"{mode}.jsonl.gz"
        assert (
            cli(["export", live["modes"][mode]["batch_id"], "-o", str(path)], url, kept).exit_code
            == 0
        )
        files.append(str(path))
    # Without --keep nothing stays behind, and the live namespace never held the runs.
    small = ["validate", "--essays", "4", "--profile", "ideal", "--json"]
    again = one_json(cli(small, url, "v:").stdout)
    assert again["kept_prefix"] is None and "deleted afterwards" in again["source"]
    client = redis.Redis.from_url(url)
    names = {k.decode() for k in client.scan_iter(match="v:*")}
    client.close()
    assert names and all(n.startswith(kept) for n in names), sorted(names)[:5]
    recorded = cli(["validate", "--runs", *files, "--json"], url, "")
    assert recorded.exit_code == 0, recorded.output
    rec = one_json(recorded.stdout)
    assert rec["source"] == "recorded runs"
    for mode in ("per_request", "serial_bundle"):
        a, b = dict(live["modes"][mode]), dict(rec["modes"][mode])
        for volatile in ("wall_s", "counters_source"):
            a.pop(volatile), b.pop(volatile)
        assert a == b
    assert rec["comparison"] == live["comparison"]


def _png_is_drawn(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed image data)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CJS_REQUIRE_CHROMIUM", "") in ("1", "true", "yes"):
            pytest.fail("CJS_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium not installed")
    result = _embedded(
        ["validate", "--essays", "8", "--seed", "5", "--json", "--report", str(tmp_path / "rep")]
    )
    assert result.exit_code == 0, result.output
    shot = tmp_path / "shot.png"
    page = (tmp_path / "rep" / "report.html").resolve()
    subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--virtual-time-budget=10000",  # plotly.js draws the charts after the load
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    width, height, distinct = _png_is_drawn(shot)
    assert (width, height) == (1200, 1600)
    assert distinct > 50  # text, bars and axes, not a blank page


def test_validate_one_mode_from_an_input_file(tmp_path: Path) -> None:
    essays = [
        {"essay_id": f"s{i}", "text": f"essay {i} " * (5 + i), "mock_quality": i / 2}
        for i in range(6)
    ]
    essays[0]["anchor_grade"] = "F"
    essays[5]["anchor_grade"] = "A"
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"essays": essays}))
    result = _embedded(["validate", "--input", str(path), "--modes", "serial_bundle", "--json"])
    assert result.exit_code == 0, result.output
    out = one_json(result.stdout)
    assert list(out["modes"]) == ["serial_bundle"] and out["comparison"] is None
    assert out["modes"]["serial_bundle"]["positions"]["anchors"]["essays"] == 2
    path.write_text(json.dumps({"essays": essays[:1]}))
    assert _embedded(["validate", "--input", str(path), "--json"]).exit_code == 2
