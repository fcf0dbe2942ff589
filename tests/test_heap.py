"""The garbage collector's policy (gateway/heap.py): start-up frozen, collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_collections_made_rarer() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    built_at_start_up = [{"a": [1]} for _ in range(1000)]
    heap.settle_after_start_up()
    assert gc.get_freeze_count() >= len(built_at_start_up)
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, heap.MIDDLE_THRESHOLD,
                                  heap.OLD_THRESHOLD)
    young, _, _ = gc.get_threshold()
    assert young > 700  # CPython's default, which the policy exists to change
    assert gc.isenabled()  # rarer, never off: cycles of closed connections are still freed

