"""What a batch costs, end to end: the cost `cjs status --json` reports equals the test
server's own bill priced independently; a money cap ends the batch; submit estimates the cost,
refuses to run without credentials and warns when the prompt cannot be cached."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.settings import Settings
from app.views import results_view
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import append_registration
from events import codec
from events.types import ComparisonCompleted, ComparisonFailed, Mode, ProviderAttemptFailed
from lps.prices import price_table
from lps.providers.anthropic import AnthropicProvider
from lps.providers.registry import make_provider
from projections.batch import BatchState
from projections.store import load_state
from streams.keys import Keys
from streams.paging import read_stream
from tests.anthropic_server import (
    AnthropicTestServer,
    Billed,
    batch_errored,
    batch_expired,
    client_env,
    http_client,
    max_tokens_reply,
    overloaded,
    rate_limited,
    refusal_reply,
    running_server,
    server_error,
    text_reply,
    tool_reply,
)
from tests.helpers import registration
from tools.cli import main

pytestmark = pytest.mark.redis

MODEL = "claude-sonnet-4-6"
CJS = [sys.executable, "-c", "from tools.cli import main; main()"]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        client_env(monkeypatch, s, tmp_path)
        yield s


def _providers(name: str) -> Any:
    if name == "anthropic":
        return AnthropicProvider.from_env(http_client=http_client())
    return make_provider(name)


def independent_cost(bill: list[Billed]) -> float:
    """The server's bill priced from the price table, without the code under test: tokens of
    each kind times its price per MTok, cache writes by their TTL, batch items at half."""
    total = 0.0
    for line in bill:
        price = price_table({}).price("anthropic", line.model)
        assert price is not None
        u = line.usage
        written = u.get("cache_creation") or {}
        cost = (
            u.get("input_tokens", 0) * price.input
            + u.get("output_tokens", 0) * price.output
            + u.get("cache_read_input_tokens", 0) * price.cache_read
            + written.get("ephemeral_5m_input_tokens", 0) * price.cache_write_5m
            + written.get("ephemeral_1h_input_tokens", 0) * price.cache_write_1h
        ) / 1e6
        total += cost * (price.batch_discount if line.batch_id else 1.0)
    return total


async def run_batch(
    r: Any, keys: Keys, settings: Settings, n: int, budget: int, mode: Mode, **kw: Any
) -> BatchState:
    reg = registration(n, budget=budget, mode=mode, provider="anthropic", model=MODEL, **kw)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    runner = InProcess(r, keys, settings, _providers, cj_consumers=1, lps_workers=1, concurrency=4)
    runner.start()
    try:
        for _ in range(6000):
            runner.check()
            state = await load_state(r, keys, reg.batch_id)
            if state is not None and state.terminal:
                return state
            await asyncio.sleep(0.01)
        raise AssertionError("batch did not end")
    finally:
        await runner.close()


def settings_for(redis_server: Any, keys: Keys) -> Settings:
    return Settings(
        prefix=keys.prefix,
        retry_max_attempts=3,
        retry_base_delay_s=0.001,
        retry_max_delay_s=0.002,
        cooldown_rate_limit_s=0.01,
        cooldown_overloaded_s=0.01,
        batch_poll_s=0.01,
        block_ms=20,
    )


def cli_status(redis_server: Any, keys: Keys, batch_id: str) -> dict[str, Any]:
    env = {**os.environ, "REDIS_URL": redis_server.url, "CJS_PREFIX": keys.prefix}
    done = subprocess.run(
        [*CJS, "status", batch_id, "--json"], env=env, capture_output=True, check=True
    )
    status: dict[str, Any] = json.loads(done.stdout)
    return status


async def events(r: Any, stream: str) -> list[Any]:
    return [codec.decode(f) async for _, f in read_stream(r, stream)]


async def test_status_cost_equals_the_servers_bill_priced_independently(
    server: AnthropicTestServer, real_redis: Any, redis_server: Any
) -> None:
    r = real_redis
    figures = []
    modes: tuple[Mode, ...] = ("per_request", "batch_api")
    for mode in modes:
        keys = Keys(f"cost{uuid.uuid4().hex[:6]}:")
        start = len(server.billed())
        if mode == "per_request":
            # Faults that are billed (answers that are no judgement) and faults that are not.
            server.script(
                rate_limited(retry_after_ms=5),
                max_tokens_reply(),
                overloaded(),
                refusal_reply(),
                tool_reply({"winner": "essay_c", "justification": "j", "confidence": 3}),
                server_error(502),
                text_reply(),
                tool_reply({"winner": "essay_a", "justification": "j", "confidence": 9}),
            )
        else:
            seen: Counter[str] = Counter()

            def item(custom_id: str, seen: Counter[str] = seen) -> Any:
                seen[custom_id] += 1
                if seen[custom_id] > 1:
                    return None  # a resubmitted item succeeds
                pick = int(hashlib.sha256(custom_id.encode()).hexdigest(), 16) % 7
                return [
                    None,
                    None,
                    max_tokens_reply(),
                    refusal_reply(),
                    tool_reply({"winner": "x", "justification": "j", "confidence": 3}),
                    batch_errored("overloaded_error", "busy"),
                    batch_expired(),
                ][pick]

            server.batch_default = item
        state = await run_batch(r, keys, settings_for(redis_server, keys), 6, 15, mode)
        bill = server.billed()[start:]
        expected = independent_cost(bill)
        status = cli_status(redis_server, keys, state.batch_id)
        assert status["cost_usd"] > 0
        assert abs(status["cost_usd"] - expected) < 0.005, "to the cent"
        assert status["cost_usd"] == pytest.approx(expected, abs=2e-6)  # and in fact exactly
        assert status["cost_per_comparison_usd"] == pytest.approx(
            status["cost_usd"] / status["completed"], abs=1e-6
        )
        # Every billed response is in an event with its usage: completed comparisons and the
        # failed attempts that were answers all the same (max_tokens, refusal, parse error).
        dispatches = await events(r, keys.dispatches)
        callbacks = await events(r, keys.callbacks)
        billed_failures = [
            e for e in dispatches if isinstance(e, ProviderAttemptFailed) and e.cost_usd > 0
        ]
        completed = [c for c in callbacks if isinstance(c, ComparisonCompleted)]
        assert len(bill) == len(completed) + len(billed_failures)
        assert all(a.usage.output_tokens > 0 for a in billed_failures)
        assert {a.error.error_type for a in billed_failures} <= {
            "max_tokens",
            "refusal",
            "parse_error",
        }
        failed = [c for c in callbacks if isinstance(c, ComparisonFailed)]
        for c in failed:
            # A failed comparison's cost is that of all its attempts; its usage is its last
            # attempt's (billed when that attempt was an answer, as max_tokens or refusal; none
            # when it was a 502 after a billed parse error, which the order of the concurrent
            # requests sometimes makes of one).
            tries = [
                a
                for a in dispatches
                if isinstance(a, ProviderAttemptFailed) and a.correlation_id == c.correlation_id
            ]
            assert tries, c
            assert c.cost_usd == pytest.approx(sum(a.cost_usd for a in tries), abs=1e-9)
            assert c.usage == tries[-1].usage
            assert (c.usage.output_tokens > 0) == (tries[-1].cost_usd > 0)
        assert results_view(state)["cost_usd"] == status["cost_usd"]
        figures.append((mode, status["cost_usd"], expected, len(bill), status["completed"]))
        server.batch_default = None
    print(
        "\n[cost] "
        + "; ".join(
            f"{mode}: status ${got:.6f}, server bill priced independently ${want:.6f} "
            f"({lines} billed responses, {done} comparisons)"
            for mode, got, want, lines, done in figures
        )
    )


async def test_the_money_cap_ends_the_batch_before_a_wave_would_pass_it(
    server: AnthropicTestServer, real_redis: Any, redis_server: Any
) -> None:
    keys = Keys(f"cap{uuid.uuid4().hex[:6]}:")
    probe = registration(12, budget=66, provider="anthropic", model=MODEL)
    # Room for the first wave as estimated at submit (24 comparisons), not for all 66.
    cap = probe.config.cost_per_comparison_usd * 24 * 1.05
    state = await run_batch(
        real_redis,
        keys,
        settings_for(redis_server, keys),
        12,
        66,
        "per_request",
        max_cost_usd=cap,
    )
    assert state.status == "finalized" and state.finalize_reason == "cost_limit"
    assert state.cost_usd <= cap
    assert 24 <= state.submitted < 66
    print(
        f"\n[money cap] cap ${cap:.4f}: ended {state.finalize_reason} after {state.waves} wave(s), "
        f"{state.submitted} of 66 comparisons, ${state.cost_usd:.4f} spent"
    )


def _run(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def _batch_file(tmp_path: Path) -> Path:
    path = tmp_path / "b.json"
    essays = [{"essay_id": f"e{i}", "text": "A short essay. " * (20 + i)} for i in range(8)]
    path.write_text(json.dumps({"essays": essays}))
    return path


def test_submit_estimates_refuses_without_credentials_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: Any
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "none"))
    prefix = f"sub{uuid.uuid4().hex[:6]}:"
    env = {"REDIS_URL": redis_server.url, "CJS_PREFIX": prefix}
    path = _batch_file(tmp_path)
    # No credentials: exit 2 with the reason, nothing appended.
    refused = _run(["submit", str(path), "--provider", "anthropic", "--json"], env)
    assert refused.exit_code == 2 and "ANTHROPIC_API_KEY" in refused.stderr
    import redis

    with redis.Redis.from_url(redis_server.url) as r:
        assert not r.keys(f"{prefix}*")
    # A dry run estimates the cost (and says what is missing without failing).
    plan = json.loads(
        _run(["submit", str(path), "--provider", "anthropic", "--dry-run", "--json"], env).stdout
    )
    assert plan["estimated_cost_usd"] > 0 and plan["estimated_cost_per_comparison_usd"] > 0
    assert plan["estimated_cost_usd"] == pytest.approx(
        plan["estimated_cost_per_comparison_usd"] * plan["denominator"], rel=1e-3
    )
    assert any("ANTHROPIC_API_KEY" in w for w in plan["warnings"])
    batch_plan = json.loads(
        _run(
            [
                "submit",
                str(path),
                "--provider",
                "anthropic",
                "--mode",
                "batch_api",
                "--dry-run",
                "--json",
            ],
            env,
        ).stdout
    )
    assert batch_plan["estimated_cost_usd"] < plan["estimated_cost_usd"]  # half price
    # A model whose minimum cacheable length the prompt does not reach: a warning.
    haiku = _run(
        [
            "submit",
            str(path),
            "--provider",
            "anthropic",
            "--model",
            "claude-haiku-4-5",
            "--dry-run",
        ],
        env,
    )
    assert haiku.exit_code == 0 and "prompt caching will not engage" in haiku.stderr
    # A cap below the first wave's estimate, or on a model without a price: refused.
    low = _run(
        ["submit", str(path), "--provider", "anthropic", "--max-cost-usd", "0.0001", "--dry-run"],
        env,
    )
    assert low.exit_code == 2 and "first wave" in low.stderr
    unpriced = _run(
        [
            "submit",
            str(path),
            "--provider",
            "anthropic",
            "--model",
            "claude-unknown-9",
            "--max-cost-usd",
            "5",
            "--dry-run",
        ],
        env,
    )
    assert unpriced.exit_code == 2 and "no price" in unpriced.stderr
    with redis.Redis.from_url(redis_server.url) as r:
        assert not r.keys(f"{prefix}*")
