"""The inference stage's default thread count: the CPUs the process may use, not the host's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.repository import ModelRepository
from services.common.settings import usable_cpus
from services.inference.core import Inference


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are a Linux feature")
def test_default_threads_are_the_cpus_the_process_may_use(tmp_path: Path) -> None:
    # A process pinned to one CPU (as by taskset, or a container's cpuset) runs one model thread, not one per core.
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        pinned = Inference(ModelRepository(tmp_path), home=tmp_path, watch_s=None).options.intra_op_threads
    finally:
        os.sched_setaffinity(0, mask)
    assert pinned == 1
    # Unpinned: every CPU of the mask, unless a container CPU quota allows fewer.
    assert 1 <= usable_cpus() <= len(mask) <= (os.cpu_count() or 1)
    assert Inference(ModelRepository(tmp_path), home=tmp_path, watch_s=None).options.intra_op_threads == usable_cpus()
