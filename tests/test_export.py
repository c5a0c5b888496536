"""`cjs export` / `cjs import`: a recorded batch carried elsewhere works as the original."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from events.streams import STREAMS
from tests.test_replay import cli, on_redis, one_json


def _lines(path: Path) -> list[dict[str, Any]]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _views(url: str, prefix: str, b: str) -> dict[str, Any]:
    commands = ("status", "results", "positions")
    return {cmd: one_json(cli([cmd, b, "--json"], url, prefix).stdout) for cmd in commands}


@pytest.mark.redis
def test_export_import_roundtrip_preserves_ids_views_and_replay(
    redis_server: Any, tmp_path: Path
) -> None:
    url = redis_server.url
    args = [
        "demo",
        "--json",
        "--essays",
        "9",
        "--mode",
        "serial_bundle",
        "--profile",
        "flaky",
        "--seed",
        "4",
    ]
    b = one_json(cli(args, url, "a:").stdout)["batch_id"]
    # Another batch in the same namespace: none of its events may leak into the export.
    cli(["demo", "--json", "--essays", "6", "--seed", "9"], url, "a:")

    out = tmp_path / "run.jsonl.gz"
    exported = cli(["export", b, "-o", str(out), "--json"], url, "a:")
    assert exported.exit_code == 0, exported.output
    summary = one_json(exported.stdout)
    lines = _lines(out)
    assert summary["events"] == len(lines) > 0
    assert all(set(line) == {"type", "stream", "entry_id", "data"} for line in lines)
    assert {line["stream"] for line in lines} == set(STREAMS)  # bundles and failed attempts too
    keys = [tuple(int(x) for x in line["entry_id"].split("-")) for line in lines]
    assert keys == sorted(keys)
    for line in lines:
        data = line["data"]
        assert data.get("batch_id") == b or b in data.get("batch_ids", [])
    assert lines[0]["type"] == "BatchRegistered"
    assert summary["by_stream"]["cj:callbacks"] == sum(
        line["type"].startswith("Comparison") and line["stream"] == "cj:callbacks" for line in lines
    )

    imported = cli(["import", str(out), "--prefix", "b:", "--json"], url, "")
    assert imported.exit_code == 0, imported.output
    report = one_json(imported.stdout)
    assert report["batches"] == [b] and all(report["ids_preserved"].values())
    assert _views(url, "b:", b) == _views(url, "a:", b)
    replayed = one_json(cli(["replay", b, "--json"], url, "b:").stdout)
    assert replayed["matches_live"] is True and replayed["callbacks_applied"] > 0
    again = tmp_path / "again.jsonl"
    cli(["export", b, "-o", str(again)], url, "b:")
    assert again.read_bytes() == gzip.decompress(out.read_bytes())  # byte for byte, ids included

    # The imported events are history, not work: the groups start after them.
    async def groups(r: Any) -> dict[str, int]:
        lag = {}
        for stream in ("b:lps:requests", "b:cj:callbacks"):
            info = (await r.xinfo_groups(stream))[0]
            last = (await r.xrevrange(stream, count=1))[0][0]
            lag[stream] = int(info["last-delivered-id"] == last) + int(info["pending"] == 0)
        return lag

    assert set(on_redis(url, groups).values()) == {2}

    # Refused where the batch already is, with a clear message, and nothing appended.
    lengths = on_redis(url, lambda r: _lengths(r, "b:"))
    refused = cli(["import", str(out), "--prefix", "b:"], url, "")
    assert refused.exit_code == 1 and "already holds batch" in refused.output
    assert on_redis(url, lambda r: _lengths(r, "b:")) == lengths
    assert cli(["import", str(out), "--prefix", "a:"], url, "").exit_code == 1

    # Into a namespace whose streams already run past the recorded ids: new ids, same results.
    cli(["demo", "--json", "--essays", "5", "--seed", "2"], url, "c:")
    later = one_json(cli(["import", str(out), "--prefix", "c:", "--json"], url, "").stdout)
    assert not all(later["ids_preserved"].values())
    assert _views(url, "c:", b)["results"] == _views(url, "a:", b)["results"]
    assert one_json(cli(["replay", "--all", "--json"], url, "c:").stdout)["matches_live"] is True


async def _lengths(r: Any, prefix: str) -> list[int]:
    return [int(await r.xlen(f"{prefix}{name}")) for name in STREAMS]


@pytest.mark.redis
def test_import_rejects_bad_files_naming_the_line(redis_server: Any, tmp_path: Path) -> None:
    url = redis_server.url
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "Nope", "stream": "cj:batches", "entry_id": "1-0", "data": {}}\n')
    result = cli(["import", str(bad), "--prefix", "x:"], url, "")
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output and "Nope" in result.output
    bad.write_text("not json\n")
    assert cli(["import", str(bad), "--prefix", "x:"], url, "").exit_code == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli(["import", str(empty), "--prefix", "x:"], url, "")
    assert result.exit_code == 2 and "no BatchRegistered" in result.output
    assert cli(["export", "missing", "-o", str(tmp_path / "m.jsonl")], url, "x:").exit_code == 1
