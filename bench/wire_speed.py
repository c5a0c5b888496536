"""Encode and decode time per event, this tree's codec against a reference codec file.

    git show main:events/codec.py > /tmp/codec_ref.py
    python bench/wire_speed.py [--reference /tmp/codec_ref.py] [--n 20000]

For a request and a callback as the mock pipeline writes them: `codec.encode` (what a producer
calls before XADD) and `codec.decode` of the fields as Redis returns them (bytes names and
values, with the entry id), the best of 20 rounds, in µs per event. The reference runs in the
same process on the same events, interleaved, so the ratio is what to read (absolute times vary
with the machine and its load).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from events import codec
from events.types import ComparisonCompleted, ComparisonRequested, Essay, Event, TokenUsage

ENTRY_ID = "1764666876000-0"


def events() -> list[Event]:
    return [
        ComparisonRequested(
            batch_id="nwqs2isorbcjez5e",
            correlation_id="mjp357rwv4crzut3",
            wave=1,
            essay_a=Essay(essay_id="S047"),
            essay_b=Essay(essay_id="S038"),
            seed=1,
            content_key="4d03179e087e59b6",
        ),
        ComparisonCompleted(
            batch_id="nwqs2isorbcjez5e",
            correlation_id="mjp357rwv4crzut3",
            essay_a_id="S047",
            essay_b_id="S038",
            winner="essay_a",
            confidence=2.0,
            justification="mock judgement from latent qualities",
            provider="mock",
            model="mock-judge-1",
            usage=TokenUsage(input_tokens=900, output_tokens=60),
        ),
    ]


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("codec_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def measure(modules: list[tuple[str, Any]], event: Event, n: int, rounds: int) -> dict[str, Any]:
    """Per module: the best encode and decode µs over `rounds`, the modules' runs interleaved
    (a loaded machine slows them alike)."""
    runs = []
    for label, module in modules:
        stored = {k.encode(): v for k, v in module.encode(event).items()}
        assert module.decode(stored, ENTRY_ID) == codec.decode(stored, ENTRY_ID)
        runs.append((label, module, stored))
    best: dict[str, list[float]] = {label: [float("inf")] * 2 for label, _, _ in runs}
    for _ in range(rounds):
        for label, module, stored in runs:
            enc = timed(lambda m=module: m.encode(event), n)
            dec = timed(lambda m=module, s=stored: m.decode(s, ENTRY_ID), n)
            best[label] = [min(best[label][0], enc), min(best[label][1], dec)]
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", help="a codec.py to compare with (e.g. main's)")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    modules: list[tuple[str, Any]] = [("this tree", codec)]
    if args.reference:
        modules.insert(0, ("reference", load(args.reference)))
    for event in events():
        for label, (enc, dec) in measure(modules, event, args.n, args.rounds).items():
            print(
                f"{type(event).__name__:22} {label:10} encode {enc:5.2f} µs  decode {dec:5.2f} µs"
                f"  sum {enc + dec:5.2f} µs"
            )


if __name__ == "__main__":
    main()
