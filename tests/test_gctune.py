import gc
from collections.abc import Iterator

import pytest

from inferoxy import gctune


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_the_startup_heap_and_keeps_every_generation_collected(restore_gc: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    older = gc.get_threshold()[1:]
    gctune.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (gctune.GEN0_THRESHOLD, *older)
    assert gc.isenabled()
