"""GPU memory limits: a real CUDA out-of-memory is caught and its memory returned, and the estimate
bounds what a forward at 8k really allocates. Kept apart from test_limits.py, which needs streamlit,
so that these collect on a GPU machine without the app's dependencies (`make test-gpu`)."""

from __future__ import annotations

import weakref

import pytest
import torch

from nsa_core import limits
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM


@pytest.mark.gpu
def test_gpu_out_of_memory_is_caught_and_memory_returns():
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    refs = []

    def exhaust():
        held = [torch.empty(free // 2, dtype=torch.uint8, device="cuda")]
        refs.append(weakref.ref(held[0]))
        held.append(torch.empty(free, dtype=torch.uint8, device="cuda"))  # more than is left

    with pytest.raises(limits.DeviceOutOfMemory, match="filling the GPU"), limits.oom_guard("filling the GPU",
                                                                                          device="cuda"):
        exhaust()
    assert refs[0]() is None
    assert torch.cuda.memory_allocated() == baseline
    assert limits.free_memory("cuda") >= free * 0.9
    assert torch.ones(1 << 20, device="cuda").sum().item() == 1 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpu_estimate_bounds_the_measured_peak(backend):
    model = NSALM(NSAConfig()).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, 256, (1, 8192), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start, start_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    with torch.inference_mode():
        out = model(ids, backend=backend, trace=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - start
    reserved = torch.cuda.max_memory_reserved() - start_reserved
    del out
    estimate = limits.estimate_memory(NSAConfig(), 8192, dtype=torch.bfloat16, backend=backend, trace=True,
                                      device="cuda")
    assert measured <= estimate.tensor_bytes, (measured, estimate.describe())
    assert reserved <= estimate.total_bytes, (reserved, estimate.describe())
