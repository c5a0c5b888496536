"""`streams.metrics.observe_counted` (a page's queue waits in one go, issue 11) uses a histogram's
internals: it must leave what `observe`, one amount at a time, leaves."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from streams.metrics import QUEUE_WAIT, observe_counted, observe_queue_wait


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for m in histogram.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def pair(labels: tuple[str, ...] = ()) -> tuple[Histogram, Histogram]:
    def one() -> Histogram:
        return Histogram(
            "w",
            "waits",
            list(labels),
            registry=CollectorRegistry(),
            buckets=QUEUE_WAIT._upper_bounds[:-1],
        )

    return one(), one()


@pytest.mark.parametrize("labels", [(), ("stream",)])
def test_the_same_buckets_count_and_sum_as_observing_each(labels: tuple[str, ...]) -> None:
    rng = random.Random(7)
    each, once = pair(labels)
    child_each = each.labels("s") if labels else each
    child_once = once.labels("s") if labels else once
    bounds = list(QUEUE_WAIT._upper_bounds[:-1])
    for _ in range(50):
        # Amounts on the bounds, just past them, zero, far beyond the last bound.
        page = [rng.choice([0.0, *bounds, 1e6]) for _ in range(rng.randrange(1, 6))]
        page += [b + 1e-9 for b in rng.sample(bounds, 3)]
        page += [rng.expovariate(1.0) for _ in range(rng.randrange(0, 20))]
        for amount in page:
            child_each.observe(amount)
        observe_counted(child_once, [(amount, 1) for amount in page])
    got, want = samples(once), samples(each)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):  # the additions in another order
            assert got[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert got[key] == value, key


def test_exact_sums_are_the_same() -> None:
    each, once = pair()
    page = [0.25, 0.5, 0.125, 7.0, 0.0]  # binary fractions: any order adds them exactly
    for amount in page:
        each.observe(amount)
    observe_counted(once, [(amount, 1) for amount in page])
    assert samples(once) == samples(each)


def test_an_amount_counted_n_times_is_observed_n_times() -> None:
    each, once = pair()
    for amount, n in [(0.003, 5), (0.0, 2), (42.0, 1), (1e9, 3), (0.003, 1)]:
        for _ in range(n):
            each.observe(amount)
        observe_counted(once, [(amount, n)])
    got, want = samples(once), samples(each)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
        if not key[0].endswith("_sum"):
            assert got[key] == value, key


def test_queue_wait_skips_ids_without_a_time() -> None:
    count = ("stream_queue_wait_seconds_count", "")
    observe_queue_wait("observe-all-test", "g", ["1-0", "x-1", "2-5"])
    observe_queue_wait("observe-all-test", "g", ["junk"])
    after = {
        (s.name, s.labels.get("le", "")): s.value
        for m in QUEUE_WAIT.collect()
        for s in m.samples
        if s.labels.get("stream") == "observe-all-test" and not s.name.endswith("_created")
    }
    assert after[count] == 2
    assert after[("stream_queue_wait_seconds_bucket", "+Inf")] == 2
    assert after[("stream_queue_wait_seconds_bucket", "3600.0")] == 0  # ids of 1970: old


class _Plain:
    """A histogram without prometheus_client's internals: only `observe`."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, amount: float) -> None:
        self.seen.append(amount)


def test_a_histogram_without_the_internals_is_observed_one_amount_at_a_time() -> None:
    plain = _Plain()
    observe_counted(plain, [(0.5, 2), (3.0, 1), (0.0, 0)])
    assert plain.seen == [0.5, 0.5, 3.0]
