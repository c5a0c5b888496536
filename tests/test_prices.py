"""The price table: shipped prices, the override file, the cost of a usage, estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events.types import TokenUsage
from lps.prices import (
    ANTHROPIC_PRICES,
    PriceError,
    PriceTable,
    estimate,
    parse_prices,
    price_table,
)
from lps.providers.registry import cache_warnings, cost_estimate

SONNET = "claude-sonnet-4-6"
USAGE = TokenUsage(
    input_tokens=1_000_000,
    output_tokens=1_000_000,
    cache_read_input_tokens=1_000_000,
    cache_creation_input_tokens=1_000_000,
)


def test_every_kind_has_its_own_price() -> None:
    table = price_table({})
    by_kind = table.cost_by_kind("anthropic", SONNET, USAGE)
    # 1 MTok of each kind: $3 input, $15 output, $0.30 cache read, $3.75 cache write (5 min)
    assert by_kind == {
        "input_tokens": 3_000_000_000,
        "output_tokens": 15_000_000_000,
        "cache_read_input_tokens": 300_000_000,
        "cache_creation_input_tokens": 3_750_000_000,
    }
    assert table.cost_usd("anthropic", SONNET, USAGE) == pytest.approx(22.05)


def test_cache_writes_are_priced_by_their_ttl_and_batches_at_half() -> None:
    table = price_table({})
    writes = TokenUsage(cache_creation_input_tokens=1_000_000)
    assert table.cost_usd("anthropic", SONNET, writes, cache_ttl="1h") == pytest.approx(6.0)
    # the response's breakdown wins over the TTL asked for
    split = table.cost_usd("anthropic", SONNET, writes, cache_write_1h_tokens=250_000)
    assert split == pytest.approx(0.75 * 3.75 + 0.25 * 6.0)
    assert table.cost_usd("anthropic", SONNET, USAGE, batch=True) == pytest.approx(22.05 / 2)


def test_free_unknown_and_dated_models() -> None:
    table = price_table({})
    assert table.cost_nano("mock", "mock-judge-1", USAGE) == 0 and table.known("mock", "x")
    assert table.cost_nano("anthropic", "claude-unknown-9", USAGE) == 0
    assert not table.known("anthropic", "claude-unknown-9")
    dated = table.price("anthropic", "claude-haiku-4-5-20251001")
    assert dated == ANTHROPIC_PRICES["claude-haiku-4-5"]
    # small prices stay exact in nano-dollars: 7 cache-read tokens of Haiku 5.5 ($0.01/MTok)
    tiny = TokenUsage(cache_read_input_tokens=7)
    assert table.cost_nano("anthropic", "claude-haiku-5-5", tiny) == 70


def test_the_price_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "anthropic": {
                    SONNET: {"input": 2.5},
                    "claude-proxy-x": {"input": 1, "output": 2, "min_cacheable_tokens": 100},
                },
                "openai": {"gpt-x": {"input": 1, "output": 4, "cache_read": 0.5}},
            }
        )
    )
    table = price_table({"CJS_PRICES_FILE": str(path)})
    sonnet = table.price("anthropic", SONNET)
    assert sonnet is not None and (sonnet.input, sonnet.output) == (2.5, 15)  # only input changed
    proxy = table.price("anthropic", "claude-proxy-x")
    assert proxy is not None
    assert (proxy.cache_write_5m, proxy.cache_write_1h, proxy.cache_read) == (1.25, 2.0, 0.1)
    assert proxy.min_cacheable_tokens == 100 and proxy.batch_discount == 0.5
    other = table.price("openai", "gpt-x")
    assert other is not None and other.cache_read == 0.5


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([], "JSON object"),
        ({"anthropic": {"m": {"input": 1}}}, "at least 'input' and 'output'"),
        ({"anthropic": {SONNET: {"input": -1}}}, "must be a number >= 0"),
        ({"anthropic": {SONNET: {"inptu": 1}}}, "unknown price fields"),
        ({"anthropic": {SONNET: {"input": True}}}, "must be a number"),
    ],
)
def test_a_bad_price_file_is_refused(doc: object, says: str) -> None:
    with pytest.raises(PriceError, match=says):
        parse_prices(doc, {"anthropic": ANTHROPIC_PRICES})


def test_an_unreadable_price_file_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    path.write_text("{not json")
    with pytest.raises(PriceError, match="CJS_PRICES_FILE"):
        price_table({"CJS_PRICES_FILE": str(path)})


def test_estimate_prefix_cached_or_not() -> None:
    table = PriceTable({"anthropic": ANTHROPIC_PRICES})
    kw = {"prefix_tokens": 2000, "pair_tokens": 500, "comparisons": 100}
    cached = estimate(table, "anthropic", SONNET, **kw)  # type: ignore[arg-type]
    plain = estimate(table, "anthropic", "claude-haiku-4-5", **kw)  # type: ignore[arg-type]
    assert cached.cached and not plain.cached and cached.priced
    # Sonnet: pair and answer at full price, the prefix written once and read 99 times
    per = (500 * 3 + 150 * 15 + (2000 * 3.75 + 99 * 2000 * 0.3) / 100) / 1e6
    assert cached.per_comparison_usd == pytest.approx(per)
    assert plain.per_comparison_usd == pytest.approx((2500 * 1 + 150 * 5) / 1e6)
    batch = estimate(table, "anthropic", SONNET, batch=True, **kw)  # type: ignore[arg-type]
    assert batch.per_comparison_usd == pytest.approx(per / 2)
    unknown = estimate(table, "anthropic", "claude-x", **kw)  # type: ignore[arg-type]
    assert unknown.per_comparison_usd == 0 and not unknown.priced


def test_submit_time_helpers() -> None:
    assert cache_warnings("anthropic", SONNET) == []
    [warning] = cache_warnings("anthropic", "claude-haiku-4-5")
    assert "minimum cacheable length of 4096" in warning
    assert cache_warnings("mock", "mock-judge-1") == []
    est = cost_estimate("anthropic", SONNET, ["word " * 300] * 4, comparisons=20, batch=False)
    assert 0.001 < est.per_comparison_usd < 0.05 and est.prefix_tokens > 1500


async def test_mock_tokens_keep_their_own_series_and_cost_nothing() -> None:
    from prometheus_client import REGISTRY

    from events.types import ComparisonRequested, Essay
    from lps.providers.mock import PROFILES, MockProvider

    def tokens(provider: str, model: str) -> float:
        labels = {"provider": provider, "model": model, "kind": "input_tokens"}
        return REGISTRY.get_sample_value("lps_tokens_total", labels) or 0.0

    before = tokens("mock", "mock-judge-1")
    request = ComparisonRequested(
        batch_id="b", correlation_id="c", wave=1, essay_a=Essay("a", "x"), essay_b=Essay("b", "y")
    )
    judgement = await MockProvider(PROFILES["ideal"], seed=1).judge(request)
    assert judgement.cost_usd == 0.0
    assert tokens("mock", "mock-judge-1") - before == judgement.usage.input_tokens > 0


def test_unknown_models_and_bad_price_files_are_said_at_submit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cj.registration import InputError, submission_warnings
    from tests.helpers import registration

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    reg = registration(4, provider="anthropic", model="claude-unknown-9")
    assert any("no price for anthropic/claude-unknown-9" in w for w in submission_warnings(reg))
    assert reg.config.cost_per_comparison_usd == 0
    assert submission_warnings(registration(4, provider="anthropic", model=SONNET)) == []
    bad = tmp_path / "prices.json"
    bad.write_text('{"anthropic": {"x": {"input": "free"}}}')
    monkeypatch.setenv("CJS_PRICES_FILE", str(bad))
    with pytest.raises(InputError, match="price table"):
        registration(4, provider="anthropic", model=SONNET)
