"""app/heap.py: a worker's start-up objects leave the collector's passes; later ones do not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.heap import freeze_startup


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as before


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_objects_alive_at_start_up_are_frozen_and_later_ones_collected(unfrozen: None) -> None:
    before = _Node()
    assert freeze_startup() > 0
    assert gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}
    assert id(before) not in tracked  # no full pass walks it any more
    after = _Node()
    assert id(after) in {id(o) for o in gc.get_objects()}
    del after
    assert gc.collect() >= 1  # cyclic garbage made later is still freed


def test_start_up_garbage_is_collected_before_the_freeze(unfrozen: None) -> None:
    gc.disable()
    try:
        garbage = weakref.ref(_Node())  # unreachable already, waiting for a collection
        assert garbage() is not None
        assert freeze_startup() > 0
        assert garbage() is None  # freed, not frozen for the life of the process
    finally:
        gc.enable()
