"""The garbage collector's policy (gateway/heap.py): start-up frozen, full
collections held back for an interval after each one, never switched off;
what a fruitless one found alive frozen until garbage shows up again (or for
``frozen_max_s`` at most)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from gateway.heap import HELD, HeapPolicy


@pytest.fixture
def policy() -> Iterator[HeapPolicy]:
    thresholds = gc.get_threshold()
    # Every full collection counts as fruitful here (the back-off has its own tests).
    policy = HeapPolicy(min_interval_s=0.2, fruitless_below=0)
    yield policy
    policy.uninstall()
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_install_freezes_what_start_up_built(policy: HeapPolicy) -> None:
    gc.unfreeze()
    built_at_start_up = [{"a": [1]} for _ in range(1000)]
    policy.install()
    assert gc.get_freeze_count() >= len(built_at_start_up)
    assert gc.isenabled()


def test_a_full_collection_holds_the_next_one_back_for_the_interval(
    policy: HeapPolicy,
) -> None:
    young, middle, old = gc.get_threshold()
    policy.install()
    assert not policy.held
    gc.collect()  # a full collection, as CPython's rule would start one
    assert policy.held and policy.full_collections >= 1
    assert gc.get_threshold() == (young, middle, HELD)
    gc.collect()  # another while held: the threshold to restore is still the original
    policy.release_due()
    assert policy.held  # the interval has not passed
    time.sleep(0.25)
    policy.release_due()
    assert not policy.held
    assert gc.get_threshold() == (young, middle, old)


def test_young_collections_do_not_hold_anything(policy: HeapPolicy) -> None:
    policy.install()
    policy.release_due()
    gc.collect(0)
    gc.collect(1)
    assert not policy.held and policy.full_collections == 0


async def test_the_release_loop_lets_cpythons_rule_decide_again(policy: HeapPolicy) -> None:
    policy.install()
    gc.collect()
    assert policy.held
    loop = asyncio.ensure_future(policy.release_loop())
    try:
        for _ in range(40):
            if not policy.held:
                break
            await asyncio.sleep(0.1)
        assert not policy.held
    finally:
        loop.cancel()


def test_uninstall_restores_the_threshold_and_stops_listening(policy: HeapPolicy) -> None:
    thresholds = gc.get_threshold()
    policy.install()
    gc.collect()
    policy.uninstall()
    assert gc.get_threshold() == thresholds
    gc.collect()
    assert not policy.held


def _collect_freeing(count: int) -> None:
    """A full collection that frees ``count`` cycles at least."""
    for _ in range(count):
        cycle: list[object] = []
        cycle.append(cycle)
    del cycle
    gc.collect()


def test_fruitless_full_collections_double_the_hold_up_to_the_maximum(
    policy: HeapPolicy,  # for its clean-up: thresholds restored, nothing left frozen
) -> None:
    backing_off = HeapPolicy(min_interval_s=0.2, max_interval_s=0.7, fruitless_below=500)
    backing_off.install()
    try:
        gc.collect()  # frees nothing of note
        assert backing_off.interval_s == 0.4
        gc.collect()
        gc.collect()
        assert backing_off.interval_s == 0.7
        time.sleep(0.45)
        backing_off.release_due()
        assert backing_off.held  # a fruitless one still waits for the longer hold
        _collect_freeing(2000)
        assert backing_off.interval_s == 0.2  # garbage found: back to the minimum
        time.sleep(0.25)
        backing_off.release_due()
        assert not backing_off.held
    finally:
        backing_off.uninstall()


@pytest.fixture
def freezing(policy: HeapPolicy) -> Iterator[HeapPolicy]:
    """A policy that freezes after fruitless full collections (``policy`` for its
    clean-up: thresholds restored, nothing left frozen)."""
    gc.unfreeze()
    freezing = HeapPolicy(min_interval_s=0.2, fruitless_below=500, frozen_max_s=60)
    freezing.install()
    gc.unfreeze()  # what install froze: the tests count what the policy freezes
    try:
        yield freezing
    finally:
        freezing.uninstall()


class Node:
    """A weakly referable object that can sit in a cycle."""

    def __init__(self) -> None:
        self.me = self


def test_a_fruitless_full_collection_freezes_what_it_found_alive(freezing: HeapPolicy) -> None:
    kept = [Node() for _ in range(1000)]
    gc.collect()  # finds nothing to free
    assert freezing.frozen and freezing.freezes == 1
    assert gc.get_freeze_count() >= len(kept)
    gc.collect()  # fruitless again: its survivors join the frozen; still one freeze
    assert freezing.frozen and freezing.freezes == 1


def test_a_frozen_cycle_of_garbage_is_freed_once_garbage_elsewhere_thaws_the_heap(
    freezing: HeapPolicy,
) -> None:
    leaving = Node()
    gone = weakref.ref(leaving)
    gc.collect()
    assert freezing.frozen
    del leaving  # now a cycle of garbage, but frozen: no collection sees it
    gc.collect()
    assert gone() is not None
    _collect_freeing(2000)  # garbage again: thawed (that collection ran frozen)
    assert not freezing.frozen and freezing.thaws == 1
    gc.collect()
    assert gone() is None


def test_garbage_found_by_a_young_collection_thaws_the_heap(freezing: HeapPolicy) -> None:
    gc.collect()
    assert freezing.frozen
    for _ in range(2000):
        Node()
    gc.collect(0)
    assert not freezing.frozen
    assert gc.get_freeze_count() == 0


def test_nothing_stays_frozen_longer_than_frozen_max_s(policy: HeapPolicy) -> None:
    brief = HeapPolicy(min_interval_s=0.2, fruitless_below=500, frozen_max_s=0.2)
    brief.install()
    try:
        gc.collect()
        assert brief.frozen
        brief.release_due()
        assert brief.frozen
        time.sleep(0.25)
        brief.release_due()
        assert not brief.frozen and brief.thaws == 1
        assert gc.get_freeze_count() == 0
    finally:
        brief.uninstall()
