"""A worker process's start-up objects kept out of the cyclic garbage collector's passes."""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """Collect once, then move every object alive now to the collector's permanent
    generation; returns how many were moved.

    What a worker has made by the time it starts consuming (the modules, classes and
    functions of numpy, scipy, redis-py, pydantic and the provider SDK, the settings, the
    clients) lives as long as the process, yet every full collection walked all of it: at
    zero latency one such pass per process and run, ≈ 0.1–0.2 s each, and the collector
    took ≈ 9 % of a worker's CPU (bench/latency.py, issue 11); ≈ 1.5 % after the freeze.
    Objects made later are collected as before. Frozen objects that become cyclic garbage
    are never freed: start-up leaves none worth counting (the collection here goes first).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
