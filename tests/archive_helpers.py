"""Builders shared by the archive tests: finished batches run through the real pipeline (mock
judge, in this process), what the streams and projections held before a pass, and checks that a
pass lost nothing."""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import sample
from app.archive import decode_manifest, fold_file, parse_export
from app.runs import mock_settings, registration_for, run_to_end
from app.settings import Settings
from cj.continuation import advance
from cj.registration import append_registration
from cj.stalls import finalize_stalled
from events import codec
from events.streams import CONSUMED, LPS_GROUP, STREAMS
from events.text import as_str
from lps.providers.mock import PROFILES
from projections import keys as pkeys
from projections.batch import entry_id_key
from projections.rebuild import Flat, expected_of, read_snapshot
from projections.store import list_batches
from streams.keys import Keys
from streams.reader import ensure_group


async def finished_batch(
    r: Any, keys: Keys, *, essays: int = 6, seed: int = 1, mode: str = "per_request", **kw: Any
) -> str:
    """A batch run to its end by CJ and LPS consumers in this process, on the mock judge."""
    profile = PROFILES[kw.pop("profile", "ideal")]
    reg = registration_for(sample.load(essays), mode, budget=kw.pop("budget", None), seed=seed)
    state, _ = await run_to_end(r, keys, mock_settings(Settings()), reg, profile, timeout=60)
    assert state.terminal
    return reg.batch_id


async def abandoned_batch(r: Any, keys: Keys, *, seed: int = 9, read: int = 1) -> str:
    """A batch closed as stalled while its first wave's requests were still out: `read` of them
    delivered to a consumer that never answers (pending), the others never delivered."""
    reg = registration_for(sample.load(5), "per_request", budget=None, seed=seed)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    await ensure_group(r, keys.requests, LPS_GROUP)
    await r.xreadgroup(LPS_GROUP, "ghost", {keys.requests: ">"}, count=read)
    decision = await finalize_stalled(r, keys, reg.batch_id, 0.0)
    assert decision is not None and decision.terminal is not None
    return reg.batch_id


@dataclass
class Before:
    """The streams, the groups and the live projections just before a pass."""

    entries: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    pending: dict[str, set[str]] = field(default_factory=dict)
    undelivered: dict[str, set[str]] = field(default_factory=dict)
    projections: dict[str, Flat] = field(default_factory=dict)


async def record(r: Any, keys: Keys) -> Before:
    out = Before()
    for name in STREAMS:
        out.entries[name] = {
            as_str(i): {as_str(k): as_str(v) for k, v in fields.items()}
            for i, fields in await r.xrange(keys.stream(name))
        }
    for name, group in CONSUMED:
        stream = keys.stream(name)
        try:
            groups = {as_str(g["name"]): g for g in await r.xinfo_groups(stream)}
        except Exception:
            groups = {}
        pel = (
            await r.xpending_range(stream, group, min="-", max="+", count=100_000)
            if (group in groups)
            else []
        )
        out.pending[name] = {as_str(p["message_id"]) for p in pel}
        delivered = as_str(groups[group]["last-delivered-id"]) if group in groups else "0-0"
        out.undelivered[name] = (
            {i for i in out.entries[name] if entry_id_key(i) > entry_id_key(delivered)}
            if group in groups
            else set()
        )
    batch_ids = await list_batches(r, keys)
    snap = await read_snapshot(r, keys, batch_ids)
    out.projections = snap.live
    return out


def archive_files(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {"batches": [], "segments": [], "dead-letters": []}
    for path in sorted(root.rglob("*.jsonl.gz")):
        out[path.parent.name if path.parent.name == "batches" else path.parent.parent.name].append(
            path
        )
    return out


def as_json_data(fields: dict[str, str]) -> dict[str, str]:
    """A flat entry (events/codec.py) as a batch file holds it: its type and the event's JSON
    made from its fields, byte for byte."""
    found = codec.entry_data(fields)
    assert found is not None
    return {"type": found[0].decode(), "data": found[1].decode()}


def archived_entries(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Every entry held by the archive under `root` (batch files and segments), per stream, with
    its fields as they were stored (a batch file splices each entry's data byte for byte)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for path in root.rglob("*.jsonl.gz"):
        lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
        if path.parent.name == "batches":
            for name, rows in parse_export(lines, str(path)).items():
                for entry_id, type_name, data, _ in rows:
                    out.setdefault(name, {})[entry_id] = {"type": type_name, "data": data.decode()}
            continue
        for line in lines:
            row = json.loads(line)
            out.setdefault(row["stream"], {})[row["entry_id"]] = {
                k: as_str(base64.b64decode(v["base64"])) if isinstance(v, dict) else v
                for k, v in row["fields"].items()
            }
    return out


async def assert_nothing_lost(
    r: Any, keys: Keys, before: Before, root: Path, *, needed: Before | None = None
) -> None:
    """Every entry there was `before` is still in its stream, or in the archive (its fields the
    same); every entry a group had pending or undelivered (at `needed`, default `before`) is
    still in its stream."""
    needed = needed or before
    archived = archived_entries(root)
    for name in STREAMS:
        now = {
            as_str(i): {as_str(k): as_str(v) for k, v in f.items()}
            for i, f in await r.xrange(keys.stream(name))
        }
        for entry_id, fields in before.entries[name].items():
            if entry_id in now:
                assert now[entry_id] == fields
                continue
            held = archived.get(name, {}).get(entry_id)
            assert held is not None, f"{name} {entry_id} lost"
            if "data" in held and "data" not in fields:  # a flat entry in a batch file
                fields = as_json_data(fields)
            assert held == fields, f"{name} {entry_id} archived differently"
        for kept in (needed.pending.get(name, set()), needed.undelivered.get(name, set())):
            missing = kept - set(now)
            assert not missing, f"{name}: trimmed entries a group still needed: {missing}"


async def assert_archives_replay_to_before(r: Any, keys: Keys, before: Before, root: Path) -> int:
    """For every archived batch, its archive file (read here, independently of the code that
    wrote it) replays to the live projection recorded before the pass, byte for byte. Returns
    how many archived batches were checked."""
    manifests = {
        as_str(k): decode_manifest(v)
        for k, v in (await r.hgetall(pkeys.archived_index(keys))).items()
    }
    for batch_id, manifest in manifests.items():
        path = Path(manifest.url.removeprefix("file://"))
        assert path.is_relative_to(root)
        assert_replays_to(gzip.decompress(path.read_bytes()), batch_id, keys, before)
    return len(manifests)


def assert_replays_to(archive: bytes, batch_id: str, keys: Keys, before: Before) -> None:
    """An archive file's lines (uncompressed) replay to the projection `before` recorded."""
    state = fold_file(parse_export(archive.splitlines(keepends=True), batch_id))[batch_id]
    assert expected_of(state, keys) == before.projections[batch_id], batch_id
