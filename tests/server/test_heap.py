"""The garbage collector's policy: the start-up heap frozen, thresholds set, unfrozen at shutdown."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from server import heap


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_settle_freezes_and_sets_thresholds() -> None:
    gc.unfreeze()
    kept = [[i] for i in range(1000)]  # live containers: frozen with the rest of the heap
    heap.settle(freeze=True, thresholds=(12_345, 7, 9))
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (12_345, 7, 9)
    heap.release()
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("restore_gc")
def test_settle_without_freezing_only_sets_thresholds() -> None:
    gc.unfreeze()
    heap.settle(freeze=False, thresholds=(700, 10, 10))
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)
