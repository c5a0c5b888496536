"""The edges a user meets first: every command against bad input and a faulty environment.

The matrix runs each command in process (click's runner) against a real redis-server the
module starts, holding a finished batch: each case must end with its documented exit code
(README.md), one `Error:` line and no traceback, and leave every key and stream of the server
as it was (nothing appended on a rejected input). Startup-sensitive and signal cases run as
processes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result

from app.errors import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.redis_server import RedisServer, skip_or_fail_without_redis
from tools.cli import COMMANDS, main

pytestmark = pytest.mark.redis

PREFIX = "edge:"
ROOT = Path(__file__).resolve().parents[1]
CJS = [sys.executable, "-c", "from tools.cli import main; main()"]
GOOD = {
    "essays": [
        {"essay_id": "a", "text": "one two three"},
        {"essay_id": "b", "text": "four five", "anchor_grade": "C"},
        {"essay_id": "c", "text": "six seven eight nine"},
    ]
}


class Env:
    """The module's server, its finished batch, and the files the cases name."""

    def __init__(self, server: RedisServer, files: Path) -> None:
        self.server = server
        self.url = server.url
        self.files = files
        self.batch_id = ""

    def path(self, name: str) -> str:
        return str(self.files / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(args: list[str], env: Mapping[str, str | None]) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=True)


def _write_files(d: Path, export: Path) -> None:
    (d / "good.json").write_text(json.dumps(GOOD))
    (d / "bad.json").write_text("{not json")
    (d / "one.json").write_text(json.dumps({"essays": GOOD["essays"][:1]}))
    (d / "dup.json").write_text(json.dumps({"essays": [GOOD["essays"][0]] * 2}))
    grade = {"essays": [{**GOOD["essays"][0], "anchor_grade": "Z"}, GOOD["essays"][1]]}
    (d / "grade.json").write_text(json.dumps(grade))
    long = {"essays": [{"essay_id": "a", "text": "x" * 101}, GOOD["essays"][1]]}
    (d / "long.json").write_text(json.dumps(long))
    (d / "extra.csv").write_text("essay_id,text,colour\na,one,red\nb,two,blue\n")
    (d / "plain.csv").write_text("essay_id,text\na,one\nb,two\n")
    (d / "latin1.json").write_bytes(b'{"essays": [{"essay_id": "\xe9", "text": "\xff"}]}')
    (d / "adir").mkdir()
    (d / "afile").write_text("not a directory")
    (d / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    whole = gzip.compress(export.read_bytes())
    (d / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (d / "notjsonl.jsonl").write_text("hello\nworld\n")
    (d / "empty.jsonl").write_text("")
    first = export.read_text().splitlines()[0]
    (d / "unknowntype.jsonl").write_text(first.replace('"BatchRegistered"', '"Nope"') + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    skip_or_fail_without_redis()
    server = RedisServer(tmp_path_factory.mktemp("edges-redis"))
    server.start(aof=False)
    files = tmp_path_factory.mktemp("edges-files")
    e = Env(server, files)
    base = {"REDIS_URL": e.url, "CJS_PREFIX": PREFIX}
    done = invoke(["demo", "--essays", "6", "--profile", "ideal", "--json"], base)
    assert done.exit_code == 0, done.output
    e.batch_id = json.loads(done.stdout)["batch_id"]
    export = files / "batch.jsonl"
    assert invoke(["export", e.batch_id, "-o", str(export)], base).exit_code == 0
    _write_files(files, export)
    yield e
    server.stop(kill=True)


def keyspace(url: str) -> dict[str, Any]:
    """Every key with its type, and each stream's length and last id."""
    client = redis.Redis.from_url(url)
    try:
        out: dict[str, Any] = {}
        for key in client.scan_iter(count=1000):
            type_reply = client.type(key)
            assert isinstance(type_reply, bytes)  # no decode_responses: replies are bytes
            kind = type_reply.decode()
            if kind == "stream":
                info = client.xinfo_stream(key)
                out[key.decode()] = (kind, info["length"], info["last-generated-id"])
            else:
                out[key.decode()] = kind
        return out
    finally:
        client.close()


def _silent_server() -> tuple[socket.socket, str]:
    """Accepts connections (the kernel does) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, f"redis://127.0.0.1:{s.getsockname()[1]}/0"


DOWN = "redis://:s3cret@127.0.0.1:1/0"
U, F, A = EXIT_USAGE, EXIT_FAILURE, EXIT_UNAVAILABLE

# (id, arguments ({f} is the files directory, {b} the finished batch), environment, exit code)
MATRIX: list[tuple[str, list[str], dict[str, str], int]] = [
    # submit: the batch file
    ("submit-bad-json", ["submit", "{f}/bad.json"], {}, U),
    ("submit-missing-file", ["submit", "{f}/missing.json"], {}, U),
    ("submit-one-essay", ["submit", "{f}/one.json"], {}, U),
    ("submit-duplicate-ids", ["submit", "{f}/dup.json"], {}, U),
    ("submit-unknown-grade", ["submit", "{f}/grade.json"], {}, U),
    ("submit-essay-too-long", ["submit", "{f}/long.json"], {"CJS_MAX_ESSAY_CHARS": "100"}, U),
    ("submit-budget-0", ["submit", "{f}/good.json", "--budget", "0"], {}, U),
    ("submit-csv-extra-column", ["submit", "{f}/extra.csv"], {}, U),
    ("submit-csv-unknown-scale", ["submit", "{f}/plain.csv", "--grade-scale", "nope"], {}, U),
    ("submit-directory", ["submit", "{f}/adir"], {}, U),
    ("submit-not-utf8", ["submit", "{f}/latin1.json"], {}, U),
    ("submit-unknown-mode", ["submit", "{f}/good.json", "--mode", "nope"], {}, U),
    # submit: the environment
    ("submit-no-redis-url", ["submit", "{f}/good.json"], {"REDIS_URL": ""}, U),
    ("submit-redis-down", ["submit", "{f}/good.json"], {"REDIS_URL": DOWN}, A),
    ("submit-not-a-url", ["submit", "{f}/good.json"], {"REDIS_URL": "notaurl"}, U),
    ("submit-bad-setting", ["submit", "{f}/good.json"], {"CJS_MAX_DELIVERIES": "abc"}, U),
    ("submit-no-such-db", ["submit", "{f}/good.json"], {"REDIS_URL": "{url}99"}, A),
    # status, results, positions, batches
    ("status-no-batch", ["status", "nope"], {}, F),
    ("status-no-redis-url", ["status", "{b}"], {"REDIS_URL": ""}, U),
    ("status-redis-down", ["status", "{b}"], {"REDIS_URL": DOWN}, A),
    ("status-bad-setting", ["status", "{b}"], {"CJS_PROCESSING_TIMEOUT_S": "-1"}, U),
    ("status-watch-interval-0", ["status", "{b}", "--watch", "--interval", "0"], {}, U),
    ("results-json-and-csv", ["results", "{b}", "--json", "--csv"], {}, U),
    ("results-no-batch", ["results", "nope"], {}, F),
    ("results-redis-down", ["results", "{b}"], {"REDIS_URL": DOWN}, A),
    ("positions-no-batch", ["positions", "nope", "--json"], {}, F),
    ("batches-bad-status", ["batches", "--status", "bogus"], {}, U),
    ("batches-redis-down", ["batches"], {"REDIS_URL": DOWN}, A),
    # export, import
    ("export-no-directory", ["export", "{b}", "-o", "/nonexistent/x.jsonl"], {}, U),
    ("export-to-directory", ["export", "{b}", "-o", "{f}/adir"], {}, U),
    ("export-no-batch", ["export", "nope", "-o", "{f}/out.jsonl"], {}, F),
    ("export-json-to-stdout", ["export", "{b}", "-o", "-", "--json"], {}, U),
    ("export-redis-down", ["export", "{b}", "-o", "{f}/out.jsonl"], {"REDIS_URL": DOWN}, A),
    ("import-corrupt-gzip", ["import", "{f}/corrupt.jsonl.gz"], {}, U),
    ("import-truncated-gzip", ["import", "{f}/truncated.jsonl.gz"], {}, U),
    ("import-not-jsonl", ["import", "{f}/notjsonl.jsonl"], {}, U),
    ("import-directory", ["import", "{f}/adir"], {}, U),
    ("import-empty", ["import", "{f}/empty.jsonl"], {}, U),
    ("import-unknown-type", ["import", "{f}/unknowntype.jsonl"], {}, U),
    ("import-twice", ["import", "{f}/batch.jsonl"], {}, F),
    ("import-redis-down", ["import", "{f}/batch.jsonl"], {"REDIS_URL": DOWN}, A),
    # validate
    (
        "validate-corrupt-run",
        ["validate", "--runs", "{f}/corrupt.jsonl.gz", "{f}/batch.jsonl"],
        {},
        U,
    ),
    ("validate-bad-modes", ["validate", "--modes", "bogus"], {}, U),
    ("validate-bad-input", ["validate", "--input", "{f}/bad.json"], {}, U),
    (
        "validate-long-essay",
        ["validate", "--input", "{f}/long.json"],
        {"CJS_MAX_ESSAY_CHARS": "100"},
        U,
    ),
    ("validate-report-on-a-file", ["validate", "--report", "{f}/afile/rep"], {}, U),
    ("validate-redis-down", ["validate", "--essays", "4"], {"REDIS_URL": DOWN}, A),
    # replay
    ("replay-no-argument", ["replay"], {}, U),
    ("replay-batch-and-all", ["replay", "{b}", "--all"], {}, U),
    ("replay-no-batch", ["replay", "nope"], {}, F),
    ("replay-all-redis-down", ["replay", "--all"], {"REDIS_URL": DOWN}, A),
    # stuck, dlq
    ("stuck-redis-down", ["stuck"], {"REDIS_URL": DOWN}, A),
    ("stuck-watch-json", ["stuck", "--watch", "--json"], {}, U),
    ("dlq-redis-down", ["dlq"], {"REDIS_URL": DOWN}, A),
    ("dlq-limit-0", ["dlq", "--limit", "0"], {}, U),
    ("dlq-unknown-stream", ["dlq", "--stream", "bogus"], {}, U),
    ("dlq-redrive-redis-down", ["dlq", "redrive"], {"REDIS_URL": DOWN}, A),
    ("dlq-redrive-no-redis-url", ["dlq", "redrive", "--dry-run"], {"REDIS_URL": ""}, U),
    ("dlq-redrive-unknown-stream", ["dlq", "redrive", "--stream", "bogus"], {}, U),
    # dashboard (every case fails before the server starts)
    ("dashboard-no-redis-url", ["dashboard"], {"REDIS_URL": ""}, U),
    ("dashboard-redis-down", ["dashboard"], {"REDIS_URL": DOWN}, A),
    ("dashboard-port-taken", ["dashboard", "--port", "{busy}"], {}, A),
    ("dashboard-port-out-of-range", ["dashboard", "--port", "99999"], {}, U),
    # archive (and reading archived batches)
    ("archive-negative-age", ["archive", "--older-than", "-1"], {}, U),
    ("archive-no-redis-url", ["archive", "--dry-run"], {"REDIS_URL": ""}, U),
    ("archive-redis-down", ["archive", "--dry-run"], {"REDIS_URL": DOWN}, A),
    ("archive-unknown-store", ["archive", "--dry-run"], {"CJS_ARCHIVE_URL": "nope://x"}, U),
    ("archive-options-not-json", ["archive", "--dry-run"], {"CJS_ARCHIVE_OPTIONS": "[1"}, U),
    ("validate-batches-no-batch", ["validate", "--batches", "nope", "{b}"], {}, F),
    # worker (every case fails before a consumer starts)
    ("worker-no-redis-url", ["worker", "all"], {"REDIS_URL": ""}, U),
    ("worker-not-a-url", ["worker", "all"], {"REDIS_URL": "notaurl"}, U),
    ("worker-port-out-of-range", ["worker", "all", "--metrics-port", "99999"], {}, U),
    ("worker-port-taken", ["worker", "all", "--metrics-port", "{busy}"], {}, A),
    ("worker-unknown-role", ["worker", "nope"], {}, U),
    # demo
    ("demo-one-essay", ["demo", "--essays", "1"], {}, U),
    ("demo-redis-down", ["demo", "--essays", "4"], {"REDIS_URL": DOWN}, A),
    ("demo-unknown-profile", ["demo", "--profile", "nope"], {}, U),
    ("demo-timeout-0", ["demo", "--timeout", "0"], {}, U),
    ("unknown-command", ["nope"], {}, U),
]


def test_the_matrix_covers_every_command() -> None:
    assert len(MATRIX) >= 40
    assert len({case[0] for case in MATRIX}) == len(MATRIX)
    covered = {case[1][0] for case in MATRIX}
    assert set(COMMANDS) - {"positions"} <= covered | {"positions"}
    assert set(COMMANDS) <= covered | {"nope"}


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize(("name", "args", "extra", "code"), MATRIX, ids=[c[0] for c in MATRIX])
def test_bad_input_or_environment_is_one_line_an_exit_code_and_appends_nothing(
    env: Env, busy_port: int, name: str, args: list[str], extra: dict[str, str], code: int
) -> None:
    fill = {"f": str(env.files), "b": env.batch_id, "busy": str(busy_port), "url": env.url[:-1]}
    argv = [a.format(**fill) for a in args]
    environment: dict[str, str | None] = {"REDIS_URL": env.url, "CJS_PREFIX": PREFIX}
    environment.update({k: v.format(**fill) for k, v in extra.items()})
    before = keyspace(env.url)
    result = invoke(argv, environment)
    after = keyspace(env.url)
    assert result.exit_code == code, (name, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    # Nothing else but click's usage lines around it.
    for line in result.stderr.splitlines():
        assert not line.strip() or line.startswith(("Error:", "Usage:", "Try ")), line
    assert "s3cret" not in result.output
    if environment["REDIS_URL"] == DOWN:
        assert "redis://:***@127.0.0.1:1/0" in errors[0]
    assert after == before, name


def test_a_redis_that_refuses_writes_is_exit_3_and_nothing_is_appended(env: Env) -> None:
    client = redis.Redis.from_url(env.url)
    before = keyspace(env.url)
    client.config_set("maxmemory", "1")
    try:
        result = invoke(
            ["submit", str(env.files / "good.json"), "--new"],
            {"REDIS_URL": env.url, "CJS_PREFIX": PREFIX},
        )
    finally:
        client.config_set("maxmemory", "0")
        client.close()
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert "maxmemory" in result.stderr and "Traceback" not in result.output
    assert keyspace(env.url) == before


def test_a_silent_redis_is_reported_within_3_seconds() -> None:
    """A server that accepts the connection and never answers: the default connect timeout."""
    s, url = _silent_server()
    try:
        started = time.monotonic()
        result = invoke(["status", "x"], {"REDIS_URL": url, "CJS_REDIS_CONNECT_TIMEOUT_S": None})
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert result.exit_code == EXIT_UNAVAILABLE and elapsed < 3.0, (elapsed, result.output)
    assert "did not answer within 2s" in result.stderr and url in result.stderr


def test_an_unreachable_redis_is_one_line_from_a_fresh_process_too() -> None:
    done = subprocess.run(
        [*CJS, "results", "x", "--csv"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": DOWN},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert done.stderr.count("\n") == 1 and "redis://:***@127.0.0.1:1/0" in done.stderr
    assert done.stdout == ""


# --- what a user sees when things go right ------------------------------------------------------


def base(env: Env, prefix: str) -> dict[str, str]:
    return {"REDIS_URL": env.url, "CJS_PREFIX": prefix}


def test_submit_accepts_a_bom_and_gives_the_same_batch_for_the_same_content(env: Env) -> None:
    bom = env.files / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    bom_csv = env.files / "bom.csv"
    bom_csv.write_bytes(b"\xef\xbb\xbfessay_id,text\na,one\nb,two\n")
    e = base(env, "idem:")
    first = invoke(["submit", str(bom), "--json"], e)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert out["existing"] is False
    streams = keyspace(env.url)
    again = invoke(["submit", str(env.files / "good.json")], e)  # same content, no BOM
    assert again.exit_code == 0 and again.stdout.strip() == out["batch_id"]
    assert "already submitted" in again.stderr
    assert keyspace(env.url) == streams  # nothing appended
    new = json.loads(invoke(["submit", str(bom), "--new", "--json"], e).stdout)
    assert new["existing"] is False and new["batch_id"] != out["batch_id"]
    other = json.loads(invoke(["submit", str(bom), "--seed", "9", "--json"], e).stdout)
    assert other["existing"] is False  # other settings: another batch
    assert invoke(["submit", str(bom_csv), "--dry-run"], e).exit_code == 0


def test_results_table_and_csv_have_headers_probabilities_reliability_and_warnings(
    env: Env,
) -> None:
    e = base(env, PREFIX)
    view = json.loads(invoke(["results", env.batch_id, "--json"], e).stdout)
    table = invoke(["results", env.batch_id], e)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["rank", "essay_id"])
    assert "essay_id" in header and "theta" in header and "grade" in header
    assert all(f"P({g})" in header for g in view["grade_scale"])
    assert re.search(r"SSR \d\.\d{3}\s+split-half [\d.n/a]+\s+position bias η", table.stdout)
    for warning in view["warnings"]:
        assert f"warning: {warning}" in lines
    csv_run = invoke(["results", env.batch_id, "--csv"], e)
    rows = csv_run.stdout.splitlines()
    columns = rows[0].split(",")
    assert columns[:7] == ["rank", "essay_id", "is_anchor", "anchor_grade", "theta", "se", "grade"]
    assert [f"p_{g}" for g in view["grade_scale"]] == [c for c in columns if c.startswith("p_")]
    assert {"ssr", "split_half", "position_bias", "position_bias_se"} <= set(columns)
    assert len(rows) == 1 + len(view["essays"])
    assert csv_run.stderr.count("warning:") == len(view["warnings"])


def test_status_watch_follows_a_batch_to_its_end(env: Env) -> None:
    e = base(env, PREFIX)
    result = invoke(["status", env.batch_id, "--watch", "--interval", "0.1", "--json"], e)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "finalized"
    assert f"{env.batch_id}: finalized" in result.stderr  # the progress line (no terminal)


def test_batches_lists_newest_first_with_a_status_filter(env: Env) -> None:
    e = base(env, PREFIX)
    out = json.loads(invoke(["batches", "--json"], e).stdout)
    assert env.batch_id in [b["batch_id"] for b in out["batches"]]
    assert out["counts"].get("finalized", 0) >= 1
    # A row carries what `cjs status` says of the batch, all but what needs its essays.
    row = next(b for b in out["batches"] if b["batch_id"] == env.batch_id)
    status = json.loads(invoke(["status", env.batch_id, "--json"], e).stdout)
    assert {k: v for k, v in status.items() if k in row} == row
    running = json.loads(invoke(["batches", "--status", "open", "--json"], e).stdout)
    assert all(b["status"] in ("registered", "running") for b in running["batches"])
    text = invoke(["batches", "--status", "finalized"], e)
    assert text.exit_code == 0 and env.batch_id in text.stdout


def test_replay_of_one_batch_counts_that_batch_only(env: Env) -> None:
    e = base(env, "replay:")
    good = str(env.files / "good.json")
    first = invoke(["submit", good], e).stdout.strip()
    assert invoke(["submit", good, "--seed", "2"], e).exit_code == 0
    one = json.loads(invoke(["replay", first, "--json"], e).stdout)
    everything = json.loads(invoke(["replay", "--all", "--json"], e).stdout)
    # Its BatchRegistered and WaveSubmitted, of the four entries of the two batches.
    assert (one["events"], one["entries_scanned"], everything["events"]) == (2, 4, 4)
    assert one["matches_live"] and everything["matches_live"]


@pytest.mark.parametrize("n", [2, 3])
def test_demo_of_a_tiny_batch_reports_without_error(n: int) -> None:
    result = invoke(["demo", "--essays", str(n), "--profile", "ideal"], {"REDIS_URL": ""})
    assert result.exit_code == 0, result.output
    assert result.exception is None and "split-half reliability" in result.stdout


def test_dead_letters_show_text_not_python_bytes(env: Env) -> None:
    from app.settings import Settings
    from app.wiring import cj_consumer
    from streams.keys import Keys

    keys = Keys("dlq:")

    async def dead_letter() -> None:
        r = redis.asyncio.Redis.from_url(env.url)
        await r.xadd(keys.callbacks, {b"typ\xc3\xa9": b"x", b"payload": b"\xff\xfe"})
        consumer = cj_consumer(r, keys, Settings(), "edge-test")
        await consumer.start()
        await consumer.step()
        await r.aclose()

    asyncio.run(dead_letter())
    result = invoke(["dlq"], base(env, "dlq:"))
    assert result.exit_code == 0 and "missing_field" in result.stdout
    assert "b'" not in result.stdout and 'b"' not in result.stdout, result.stdout
    assert "payload" in result.stdout and "typé" in result.stdout


def test_a_stalled_batch_that_fails_shows_reason_stalled(env: Env) -> None:
    from app.views import status_view
    from cj.continuation import advance
    from cj.registration import append_registration
    from cj.stalls import finalize_stalled
    from projections.store import load_state
    from streams.keys import Keys
    from tests.helpers import registration

    keys = Keys("stall:")

    async def stall() -> dict[str, Any]:
        r = redis.asyncio.Redis.from_url(env.url)
        reg = registration(4, batch_id="stalled-one")
        await append_registration(r, keys, reg)
        await advance(r, keys, reg.batch_id)
        await finalize_stalled(r, keys, reg.batch_id, 0.0)
        state = await load_state(r, keys, reg.batch_id)
        await r.aclose()
        assert state is not None
        return status_view(state)

    view = asyncio.run(stall())
    assert view["status"] == "failed" and view["finalize_reason"] == "stalled"
    assert view["failure_message"].startswith("stalled:")


def test_the_readme_lists_every_option_of_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Commands") :]
    block = block[block.index("```text") : block.index("```", block.index("```text") + 3)]
    entries = re.split(r"\n(?=cjs )", block)
    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None
        [entry] = [e for e in entries if e.startswith(f"cjs {name} ")]
        for param in command.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert max(param.opts, key=len) in entry, (name, param.opts)
        # A group's subcommands (`cjs dlq redrive`) are listed in its entry, each with its own
        # line and every option on it.
        for sub_name, sub in getattr(command, "commands", {}).items():
            [line] = [e for e in entry.splitlines() if f"cjs {name} {sub_name} " in e]
            for param in sub.params:
                if isinstance(param, click.Option) and "--help" not in param.opts:
                    assert max(param.opts, key=len) in line, (name, sub_name, param.opts)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (redis.exceptions.ConnectionError("Connection refused"), EXIT_UNAVAILABLE),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), EXIT_UNAVAILABLE),
        (redis.exceptions.AuthenticationError("invalid password"), EXIT_UNAVAILABLE),
        (
            redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
            EXIT_UNAVAILABLE,
        ),
        (
            redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
            EXIT_UNAVAILABLE,
        ),
        (
            redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
            EXIT_UNAVAILABLE,
        ),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), EXIT_UNAVAILABLE),
        (
            redis.exceptions.ResponseError("MISCONF Errors writing to the AOF file"),
            EXIT_UNAVAILABLE,
        ),
        (redis.exceptions.NoPermissionError("this user has no permissions"), EXIT_UNAVAILABLE),
        (redis.exceptions.ResponseError("NOGROUP No such key or consumer group"), EXIT_FAILURE),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), EXIT_FAILURE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_redis_errors_get_the_exit_code_of_the_workers_error_table(
    error: Exception, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI boundary reads streams/errors.py: Redis's state that passes (the workers wait it
    out) is 3, unavailable; any other refused command is 1. The URL in the line is masked."""
    from tools.cli import failure_of

    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@db.example:6379/0")
    message, exit_code = failure_of(error)
    assert exit_code == code, message
    assert "redis://:***@db.example:6379/0" in message and "s3cret" not in message


def test_the_exit_code_table_documents_every_code() -> None:
    from app import errors

    readme = (ROOT / "README.md").read_text()
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")} | {0}
    for code in codes:
        assert re.search(rf"^\| {code} \|", readme, re.M), code


def test_a_signal_sent_twice_at_once_still_drains(env: Env, tmp_path: Path) -> None:
    """`timeout` signals the worker and then its process group: both must mean one drain."""
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(
        [*CJS, "worker", "cj"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **base(env, "sig:")},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while "worker_started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for another process to log
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line).get("event") for line in log.read_text().splitlines()]
    assert "worker_forced_exit" not in events and "worker_stopped" in events


def test_the_markdown_report_keeps_every_table_row_whole(env: Env, tmp_path: Path) -> None:
    runs = []
    for name in ("one.jsonl", "two.jsonl"):
        (tmp_path / name).write_bytes((env.files / "batch.jsonl").read_bytes())
        runs.append(str(tmp_path / name))
    result = invoke(
        ["validate", "--runs", *runs, "--report", str(tmp_path / "rep"), "--json"],
        {"REDIS_URL": None},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == "recorded runs"
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    tables: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert len(tables) >= 2 and any("A−B" in row for t in tables for row in t)
    for table in tables:
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in table}
        assert len(widths) == 1, table
