"""`cjs dashboard` in a real headless Chromium (Debian's, driven by Playwright), against a real
redis-server with a running batch (`cjs worker all`) and the dashboard as its own process.

The batch is held mid-wave on purpose: two of its requests were read by a consumer that then
"died" (`ghost`), so the figures stand still while pages are compared with the CLI's `--json`.
Then one of them is reclaimed from the stuck page, the other dead-lettered there and redriven
from the dead-letters page, and the batch runs to its end. One browser for the module; the
screenshots go under the module's temp dir and are checked not to be blank.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from cj.continuation import advance
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonRequested
from streams.keys import Keys
from streams.reader import Fields, ensure_group
from tests.helpers import registration
from tests.redis_server import RedisServer, skip_or_fail_without_redis

pytestmark = pytest.mark.redis

CJS = [sys.executable, "-c", "from tools.cli import main; main()"]
TOKEN = "t0ken-for-the-test"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_or_skip() -> str:
    """The system Chromium; a failure (not a skip) when CJS_REQUIRE_CHROMIUM is set."""
    required = os.environ.get("CJS_REQUIRE_CHROMIUM", "") in ("1", "true", "yes")
    binary = shutil.which("chromium")
    missing = None
    if binary is None:
        missing = "chromium is not installed"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright (pip) is not installed"
    if missing:
        if required:
            pytest.fail(f"CJS_REQUIRE_CHROMIUM is set but {missing}")
        pytest.skip(missing)
    assert binary is not None
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_spread(data: bytes) -> tuple[int, int, float]:
    """(width, height, variance of the decompressed scanline bytes): 0 for a blank image."""
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
    raw = zlib.decompress(idat)
    mean = sum(raw) / len(raw)
    return width, height, sum((b - mean) ** 2 for b in raw[::7]) / len(raw[::7])


@dataclass
class Stack:
    """redis-server, `cjs worker all` and `cjs dashboard` processes, and one held batch."""

    tmp: Path
    server: RedisServer
    prefix: str = field(default_factory=lambda: f"dash{uuid.uuid4().hex[:6]}:")
    port: int = field(default_factory=_free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    batch_id: str = ""
    ghost_ids: list[str] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.server.url,
            "CJS_PREFIX": self.prefix,
            # Long enough that no worker takes the ghost's entries by itself during the test.
            "CJS_PROCESSING_TIMEOUT_S": "300",
            "CJS_REAPER_INTERVAL_S": "0.25",
            "CJS_BLOCK_MS": "200",
            "CJS_MOCK_PROFILE": "ideal",
            "PYTHONUNBUFFERED": "1",
        }

    def spawn(self, name: str, *args: str, **env: str) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(
                [*CJS, *args], env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        )

    def cli(self, *args: str) -> Any:
        """`cjs ARGS` (in this process: the same command as a subprocess, without the start-up)."""
        from click.testing import CliRunner

        from tools.cli import main

        def run() -> Any:
            return CliRunner().invoke(main, list(args), env=self.env, catch_exceptions=False)

        # Its own thread: Playwright's sync API keeps an event loop running in this one.
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(run).result(timeout=60)
        assert result.exit_code == 0, result.output[-2000:]
        return json.loads(result.stdout)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def _text(reply: object) -> str:
    """A reply of a client without decode_responses, as text (redis-py types them str)."""
    assert isinstance(reply, bytes), reply
    return reply.decode()


async def _submit_with_a_ghost(url: str, keys: Keys) -> tuple[str, list[str]]:
    """Register a batch and its first wave; a consumer `ghost` takes two requests and dies."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        await ensure_group(r, keys.requests, LPS_GROUP)
        reg = registration(8, seed=3)
        await append_registration(r, keys, reg)
        await advance(r, keys, reg.batch_id)
        # RESP2 (the client's default): a list of [stream, entries], not the RESP3 dict.
        reply = cast(
            "list[list[Any]]",
            await r.xreadgroup(LPS_GROUP, "ghost", {keys.requests: ">"}, count=2),
        )
        ids = [i.decode() for i, _ in reply[0][1]]
        return reg.batch_id, ids
    finally:
        await r.aclose()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    skip_or_fail_without_redis()
    _chromium_or_skip()
    tmp = tmp_path_factory.mktemp("dashboard")
    server = RedisServer(tmp)
    server.start(aof=False)
    st = Stack(tmp, server)
    try:
        st.batch_id, st.ghost_ids = asyncio.run(_submit_with_a_ghost(server.url, st.keys))
        st.spawn("worker", "worker", "all")
        st.spawn("dashboard", "dashboard", "--port", str(st.port), CJS_DASHBOARD_TOKEN=TOKEN)
        r = st.client()

        def held() -> bool:
            in_flight = r.hget(f"{st.prefix}proj:batch:{st.batch_id}", "in_flight")
            lps = r.xpending(st.keys.requests, LPS_GROUP)["pending"]
            cj = (
                r.xpending(st.keys.callbacks, CJ_GROUP)["pending"]
                if r.exists(st.keys.callbacks)
                else 0
            )
            return in_flight == b"2" and lps == 2 and cj == 0

        until(held, 60, "the batch to wait for the ghost's two requests only")

        def answers() -> bool:
            try:
                with urllib.request.urlopen(st.base + "/api/overview", timeout=2) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        until(answers, 30, "the dashboard to answer")
        yield st
    finally:
        st.close()
        server.stop(kill=True)


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=_chromium_or_skip(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Tab:
    page: Any
    errors: list[str]
    shots: Path

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        width, height, spread = png_spread(path.read_bytes())
        assert width >= 1200 and height >= 600
        assert spread > 100, f"{name}.png looks blank"

    def figures(self) -> dict[str, str]:
        """Every figure the page marks (`data-key`), as its raw value."""
        found: dict[str, str] = self.page.eval_on_selector_all(
            "[data-key]",
            "els => Object.fromEntries(els.map(e => [e.dataset.key, e.dataset.value]))",
        )
        return found


@pytest.fixture
def tab(browser: Any, stack: Stack) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=stack.base)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())
    yield Tab(page, errors, stack.tmp)
    context.close()
    assert errors == [], errors


def login(tab: Tab) -> None:
    tab.page.goto("/login")
    tab.page.fill("input[name=token]", TOKEN)
    tab.page.click("button[type=submit]")
    tab.page.wait_for_url("**/")


# --- pages show what the CLI shows -------------------------------------------------------------


def test_overview_shows_the_figures_of_cjs_stuck_and_status(tab: Tab, stack: Stack) -> None:
    tab.page.goto("/")
    shown = tab.figures()
    stuck = stack.cli("stuck", "--json")
    status = stack.cli("status", stack.batch_id, "--json")
    text = tab.page.inner_text("main")
    for g in stuck["groups"]:
        assert g["stream"] in text
        assert shown[f"group:{g['stream']}:pending"] == str(g["pending"])
        assert shown[f"group:{g['stream']}:lag"] == str(g["lag"])
        assert shown[f"group:{g['stream']}:entries_read"] == str(g["entries_read"])
        for c in g["consumers"]:
            key = f"consumer:{g['stream']}:{c['consumer']}"
            assert (shown[f"{key}:pending"], shown[f"{key}:verdict"]) == (
                str(c["pending"]),
                c["verdict"],
            )
    for s in stuck["streams"]:
        if s["exists"] and not s["stream"].startswith("dlq:"):
            assert shown[f"stream:{s['stream']}:length"] == str(s["length"])
            assert shown[f"stream:{s['stream']}:entries_added"] == str(s["entries_added"])
    ghost = next(c for g in stuck["groups"] for c in g["consumers"] if c["consumer"] == "ghost")
    assert ghost["pending"] == 2 and ghost["verdict"] == "busy"
    b = f"batch:{stack.batch_id}"
    for name in ("completed", "failed", "submitted", "denominator", "completion_pct", "status"):
        assert shown[f"{b}:{name}"] == str(status[name]), name
    assert "lps:requests" in text and "2" in tab.page.inner_text(
        "[data-key='group:lps:requests:pending']"
    )
    tab.shot("overview")


def test_json_endpoints_keep_the_cli_contracts(stack: Stack) -> None:
    def get(path: str) -> Any:
        with urllib.request.urlopen(stack.base + path, timeout=10) as reply:
            return json.loads(reply.read())

    cli_stuck, web_stuck = stack.cli("stuck", "--json"), get("/api/stuck")
    assert set(web_stuck) == set(cli_stuck)
    for a, b in zip(web_stuck["groups"], cli_stuck["groups"], strict=True):
        assert (a["stream"], a["pending"], a["lag"]) == (b["stream"], b["pending"], b["lag"])
    assert [e["entry_id"] for e in web_stuck["stuck"]] == [
        e["entry_id"] for e in cli_stuck["stuck"]
    ]
    for view in ("status", "results", "positions"):
        assert get(f"/api/batches/{stack.batch_id}/{view}") == stack.cli(
            view, stack.batch_id, "--json"
        ), view
    assert set(get("/api/dlq")) >= set(stack.cli("dlq", "--json"))
    assert get("/api/batches") == stack.cli("batches", "--json")
    assert get("/api/batches?status=open&limit=1") == stack.cli(
        "batches", "--status", "open", "--limit", "1", "--json"
    )


def test_stuck_page_pages_and_filters_on_the_server(tab: Tab, stack: Stack) -> None:
    first, second = stack.ghost_ids
    tab.page.goto("/stuck?stream=lps:requests&idle=0&size=1")
    rows = tab.page.locator("tr[data-entry]")
    assert rows.count() == 1 and rows.first.get_attribute("data-entry") == first
    assert tab.page.inner_text("[data-key='pending:ghost']") == "2"
    assert tab.page.locator("button.act").count() == 0  # not logged in: no actions offered
    tab.page.click("a.next")
    assert tab.page.locator("tr[data-entry]").first.get_attribute("data-entry") == second
    tab.page.goto(f"/stuck?stream=lps:requests&idle=0&batch={stack.batch_id}")
    assert tab.page.locator("tr[data-entry]").count() == 2
    tab.page.goto("/stuck?stream=lps:requests&idle=0&batch=nope")
    assert tab.page.locator("tr[data-entry]").count() == 0
    tab.page.goto("/stuck?stream=lps:requests&idle=0")
    assert stack.batch_id[:16] in tab.page.inner_text("main")
    tab.shot("stuck")


def test_batch_page_draws_its_charts_and_shows_the_status(tab: Tab, stack: Stack) -> None:
    tab.page.goto(f"/batches/{stack.batch_id}")
    for name in ("waves", "reliability", "caterpillar", "grades", "balance", "failures"):
        tab.page.wait_for_selector(f"[data-figure='{name}'] .main-svg", timeout=15_000)
    tab.shot("batch")
    status = stack.cli("status", stack.batch_id, "--json")
    shown = tab.figures()
    for name in ("completed", "failed", "in_flight", "submitted", "denominator", "waves"):
        assert shown[f"batch:{name}"] == str(status[name]), name
    # Axes with titles, essays named on them.
    balance = tab.page.inner_text("[data-figure='balance']")
    assert "essay" in balance and "e3" in balance
    assert "comparisons" in tab.page.inner_text("[data-figure='waves']")
    assert "essay number" not in tab.page.inner_text("main")  # essay text only when asked ...
    tab.page.locator("tr[data-essay='e2'] button.show-text").click()
    tab.page.wait_for_selector("tr.essay-text pre")
    assert "logging in" in tab.page.inner_text("tr.essay-text")  # ... and with the token
    assert len(tab.errors) == 1 and "401" in tab.errors[0]
    tab.errors.clear()
    login(tab)
    tab.page.goto(f"/batches/{stack.batch_id}")
    tab.page.locator("tr[data-essay='e2'] button.show-text").click()
    tab.page.wait_for_selector("tr.essay-text pre")
    assert "essay number 2" in tab.page.inner_text("tr.essay-text")
    tab.page.goto("/batches")
    assert tab.page.inner_text(f"[data-key='batch:{stack.batch_id}:completed']") == str(
        status["completed"]
    )


# --- actions -----------------------------------------------------------------------------------


def test_an_action_without_the_token_is_refused(tab: Tab, stack: Stack) -> None:
    from starlette.testclient import TestClient

    from app.settings import Settings
    from web.server import create_app

    first = stack.ghost_ids[0]
    body = {"stream": "lps:requests", "entry_id": first, "action": "dead_letter"}
    tab.page.goto("/stuck?idle=0")
    post = """async ([url, body, headers]) => {
        const r = await fetch(url, {method: "POST", body: JSON.stringify(body),
            headers: {"Content-Type": "application/json", ...headers}});
        return [r.status, (await r.json()).error];
    }"""
    status, why = tab.page.evaluate(post, ["/actions/stuck", body, {}])
    assert status == 401 and "log" in why
    status, _ = tab.page.evaluate(post, ["/actions/stuck", body, {"Authorization": "Bearer no"}])
    assert status == 401
    login(tab)  # a session, but a forged request carries no CSRF token
    status, why = tab.page.evaluate(post, ["/actions/stuck", body, {}])
    assert status == 403 and "CSRF" in why
    # The browser reports each refused request on its console: expected here, and only those.
    assert len(tab.errors) == 3 and all("401" in e or "403" in e for e in tab.errors), tab.errors
    tab.errors.clear()
    # Without CJS_DASHBOARD_TOKEN the dashboard is read-only, whatever a request carries.
    settings = Settings.model_validate({"REDIS_URL": stack.server.url, "prefix": stack.prefix})
    with TestClient(create_app(settings, token=None), base_url="http://127.0.0.1") as client:
        reply = client.post("/actions/stuck", json=body, headers={"Authorization": "Bearer x"})
        assert reply.status_code == 403 and "read-only" in reply.json()["error"]
        assert "button" not in client.get("/stuck?idle=0").text.split("<tbody>")[1]
    r = stack.client()
    pending = r.xpending_range(stack.keys.requests, LPS_GROUP, min="-", max="+", count=10)
    assert [_text(p["message_id"]) for p in pending] == stack.ghost_ids


def test_a_stuck_entry_is_reclaimed_from_its_page_and_disappears(tab: Tab, stack: Stack) -> None:
    first = stack.ghost_ids[0]
    login(tab)
    tab.page.goto("/stuck?stream=lps:requests&idle=0")
    row = tab.page.locator(f"tr[data-entry='{first}']")
    row.locator("button[data-action='reclaim']").click()
    from playwright.sync_api import expect

    expect(tab.page.locator("#flash")).to_contain_text("handed to the live workers")
    expect(row).to_have_count(0, timeout=20_000)  # the page refreshes itself
    r = stack.client()
    pending = r.xpending_range(stack.keys.requests, LPS_GROUP, min="-", max="+", count=10)
    assert [_text(p["message_id"]) for p in pending] == stack.ghost_ids[1:]
    until(
        lambda: r.hget(f"{stack.prefix}proj:batch:{stack.batch_id}", "in_flight") == b"1",
        20,
        "the reclaimed request's callback to be applied",
    )
    tab.shot("stuck-after-reclaim")


def test_a_dead_letter_is_redriven_and_applied(tab: Tab, stack: Stack) -> None:
    from playwright.sync_api import expect

    second = stack.ghost_ids[1]
    r = stack.client()
    raw = cast("list[tuple[bytes, Fields]]", r.xrange(stack.keys.requests, min=second, max=second))
    request = codec.decode(raw[0][1])
    assert isinstance(request, ComparisonRequested)
    cid = request.correlation_id
    login(tab)
    tab.page.goto("/stuck?stream=lps:requests&idle=0")
    tab.page.locator(f"tr[data-entry='{second}'] button[data-action='dead_letter']").click()
    expect(tab.page.locator(f"tr[data-entry='{second}']")).to_have_count(0, timeout=10_000)
    assert r.xlen(stack.keys.dlq("lps:requests")) == 1

    tab.page.goto("/deadletters?stream=lps:requests")
    letter = tab.page.locator("tr[data-letter]")
    assert letter.count() == 1 and "manual" in letter.inner_text()
    assert "ComparisonRequested" in letter.inner_text()  # the type, named by a flat field
    tab.page.click("tr[data-letter] >> text=inspect")
    # Requests name their essays by id and the batch's content key (issue 13): no essay text
    # in the letter, hidden or shown (texts of older entries are hidden: test_dashboard_actions).
    assert "essay number" not in tab.page.inner_text("main")
    tab.page.click("text=show essay text")
    assert "essay number" not in tab.page.inner_text("pre.fields")
    assert "content_key" in tab.page.inner_text("pre.fields")
    tab.shot("dead-letter")
    tab.page.goto("/deadletters?stream=lps:requests")
    tab.page.locator("tr[data-letter] button[data-action='redrive']").click()
    expect(tab.page.locator("#flash")).to_contain_text("lps:requests")
    expect(tab.page.locator("tr[data-letter]")).to_have_count(0, timeout=10_000)

    def applied() -> bool:
        value = r.hget(f"{stack.prefix}proj:batch:{stack.batch_id}:corr", cid)
        if value is None:
            return False
        assert isinstance(value, bytes)  # no decode_responses (typed str by redis-py)
        return value.startswith(b"c ")

    until(applied, 30, "the redriven request's callback to be applied")
    assert r.xlen(stack.keys.dlq("lps:requests")) == 0
    until(
        lambda: r.hget(f"{stack.prefix}proj:batch:{stack.batch_id}", "status") == b"finalized",
        60,
        "the batch to run to its end",
    )
    tab.page.goto(f"/batches/{stack.batch_id}")
    expect(tab.page.locator("[data-key='batch:status']")).to_have_text("finalized")
    status = stack.cli("status", stack.batch_id, "--json")
    assert tab.figures()["batch:completed"] == str(status["completed"])
    assert status["duplicates"] == 0 and status["failed"] == 0
