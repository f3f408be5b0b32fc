"""HostStager: staged inputs reach the device intact however far the host runs ahead of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accordion.workers.input_batch import HostStager


def test_stage_on_cpu_returns_int64_views():
    a, b = HostStager(torch.device("cpu")).stage([np.arange(6, dtype=np.int32).reshape(2, 3), np.array([7])])
    assert a.dtype == torch.int64 and a.shape == (2, 3) and a[1, 2] == 5 and b.tolist() == [7]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_running_steps_ahead_of_a_busy_device_does_not_overwrite_pending_copies():
    """Five steps staged while the device is still busy (as consecutive prefill-only steps are, since they sample
    nothing and never wait): each step's device tensors hold that step's values, not a later step's."""
    stager = HostStager(torch.device("cuda"))
    torch.cuda._sleep(200_000_000)  # keeps the stream busy for ~0.1 s, so the copies queue behind it
    staged = [stager.stage([np.full(4096, i, dtype=np.int64), np.full(7, -i, dtype=np.int32)]) for i in range(5)]
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(staged):
        assert bool((a == i).all()) and bool((b == -i).all()), f"step {i} reads another step's inputs"
