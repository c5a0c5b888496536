"""The archive on S3: fsspec/s3fs against a local S3-compatible server (moto's server mode on a
loopback port, started here), not a mock of our code."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from app.archive import store_for
from app.batches import load_batch
from app.errors import BadFile
from app.retention import run_pass
from app.settings import Settings
from app.views import results_view, status_view
from events.streams import STREAMS
from projections.store import load_state
from streams.keys import Keys
from tests.archive_helpers import assert_replays_to, finished_batch, record

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "cjs-archive"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()


async def test_archive_round_trip_on_s3(
    fake_redis: Any, keys: Keys, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = fake_redis
    monkeypatch.setenv("CJS_ARCHIVE_URL", f"s3://{BUCKET}/cj")
    monkeypatch.setenv("CJS_ARCHIVE_OPTIONS", json.dumps({"endpoint_url": s3}))
    settings = Settings()
    store = store_for(settings)
    batches = [
        await finished_batch(r, keys, seed=1),
        await finished_batch(r, keys, seed=2, mode="serial_bundle", profile="flaky"),
    ]
    views = {}
    for b in batches:
        state = await load_state(r, keys, b)
        assert state is not None
        views[b] = (status_view(state), results_view(state))
    before = await record(r, keys)

    report = await run_pass(r, keys, store, older_than_s=0, dlq_retention_s=86400)
    assert [row["batch_id"] for row in report.archived] == batches and not report.problems
    assert all(
        row["url"].startswith(f"s3://{BUCKET}/cj/ns-t%3A/batches/") for row in report.archived
    )
    assert sum([await r.xlen(keys.stream(n)) for n in STREAMS]) <= 2

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="cj/ns-t%3A/batches/")
    objects = sorted(o["Key"] for o in listed.get("Contents", []))
    assert objects == sorted(f"cj/ns-t%3A/batches/{b}.jsonl.gz" for b in batches)

    # Each object, fetched with boto3 (not our reader), replays to the live projection.
    for b in batches:
        body = client.get_object(Bucket=BUCKET, Key=f"cj/ns-t%3A/batches/{b}.jsonl.gz")["Body"]
        assert_replays_to(gzip.decompress(body.read()), b, keys, before)


async def test_views_read_from_s3_and_a_changed_object_is_refused(
    fake_redis: Any, keys: Keys, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = fake_redis
    monkeypatch.setenv("CJS_ARCHIVE_URL", f"s3://{BUCKET}/cj")
    monkeypatch.setenv("CJS_ARCHIVE_OPTIONS", json.dumps({"endpoint_url": s3}))
    settings = Settings()
    b = await finished_batch(r, keys, seed=3)
    state = await load_state(r, keys, b)
    assert state is not None
    before = (status_view(state), results_view(state))
    await run_pass(r, keys, store_for(settings), older_than_s=0, dlq_retention_s=86400)
    assert await load_state(r, keys, b) is None
    archived, manifest = await load_batch(r, keys, b, settings.archive_options)
    assert manifest is not None and (status_view(archived), results_view(archived)) == before

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    key = f"cj/ns-t%3A/batches/{b}.jsonl.gz"
    lines = gzip.decompress(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    client.put_object(
        Bucket=BUCKET, Key=key, Body=gzip.compress(lines.replace(b"essay_a", b"essay_b"))
    )
    with pytest.raises(BadFile, match="sha256"):
        await load_batch(r, keys, b, settings.archive_options)
