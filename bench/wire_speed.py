"""Encode and decode time per event, this tree's codec against a reference codec file.

    git show main:events/codec.py > /tmp/codec_ref.py
    python bench/wire_speed.py [--reference /tmp/codec_ref.py] [--n 20000]

For a request and a callback as the mock pipeline writes them: `codec.encode` (what a producer
calls before XADD) and `codec.decode` of the fields as Redis returns them (bytes names and
values, with the entry id), best of 5 rounds, in µs per event. The reference runs in the same
process on the same events, so the ratio is what to read (absolute times vary with the machine).
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


def best(fn: Any, n: int) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e6


def measure(module: Any, event: Event, n: int) -> tuple[float, float]:
    stored = {k.encode(): v for k, v in module.encode(event).items()}
    assert module.decode(stored, ENTRY_ID) == codec.decode(stored, ENTRY_ID)
    return best(lambda: module.encode(event), n), best(lambda: module.decode(stored, ENTRY_ID), n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", help="a codec.py to compare with (e.g. main's)")
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    modules: list[tuple[str, Any]] = [("this tree", codec)]
    if args.reference:
        modules.insert(0, ("reference", load(args.reference)))
    for event in events():
        for label, module in modules:
            enc, dec = measure(module, event, args.n)
            print(
                f"{type(event).__name__:22} {label:10} encode {enc:5.2f} µs  decode {dec:5.2f} µs"
                f"  sum {enc + dec:5.2f} µs"
            )


if __name__ == "__main__":
    main()
