"""Fixtures shared by the checkpoint tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def pg():
    """A single-process gloo group, as the trainer always has one."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()
