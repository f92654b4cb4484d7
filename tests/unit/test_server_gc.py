"""`fleetbridge serve`'s garbage-collector set-up (app.server.tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.server import GC_OLDER_RATIOS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_start_up_is_frozen_and_young_collections_are_rarer(restore_gc):
    tune_gc(Settings(gc_threshold=12_345, gc_freeze=True, _env_file=None))
    assert gc.get_threshold() == (12_345, *GC_OLDER_RATIOS)
    assert gc.get_freeze_count() > 0


def test_both_can_be_switched_off(restore_gc):
    before = gc.get_threshold()
    tune_gc(Settings(gc_threshold=0, gc_freeze=False, _env_file=None))
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
