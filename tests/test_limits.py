"""Context limits and out-of-memory handling: the estimate against measured peaks, refusals with the
numbers before any allocation, and a guard that really gives the memory back."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest
from torch.profiler import ProfilerActivity, profile

from nsa_core import analysis, launch, limits, reference, trace
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

# Small enough for CI, with selection blocks small enough that the T x Ns term shows by T = 2048.
TINY = NSAConfig(d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, v_head_dim=16, mlp_hidden=128,
                 cmp_block=16, cmp_stride=8, slc_block=16, top_n=4, window=64, cmp_mlp_hidden=16)


def allocated_peak(fn) -> int:
    """Peak of live CPU tensor bytes while fn runs, from the profiler's allocation events (exact)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunk_budgets_match_the_code_they_describe():
    assert limits.REFERENCE_CHUNK_ELEMENTS == reference._CHUNK_ELEMENTS
    assert limits.REFERENCE_GATHER_ELEMENTS == reference._GATHER_ELEMENTS
    assert limits.TRACE_SCORE_CHUNK == trace._SCORE_CHUNK
    assert limits.ANALYSIS_CHUNK_ELEMENTS == analysis._CHUNK_ELEMENTS
    assert limits.ANALYSIS_ROWS_ELEMENTS == analysis._KERNEL_ROWS_ELEMENTS


@pytest.mark.parametrize("slc_scores", ["paper", "free"])
@pytest.mark.parametrize("tokens, traced", [(512, True), (2048, False)])
def test_estimate_bounds_the_measured_peak_tightly(tokens, traced, slc_scores):
    config = TINY.replace(slc_scores=slc_scores)
    model = NSALM(config).eval().requires_grad_(False)
    ids = torch.randint(0, 256, (1, tokens))

    def run():
        with torch.inference_mode():
            out = model(ids, trace=traced)
        del out

    measured = allocated_peak(run)
    estimate = limits.estimate_memory(config, tokens, trace=traced)
    assert measured <= estimate.tensor_bytes, estimate.describe()
    # An upper bound that is also useful: never more than 1.8x what really gets allocated.
    assert estimate.tensor_bytes <= 1.8 * measured, (measured, estimate.describe())


def test_selection_term_is_quadratic_and_dominates_long_contexts():
    short = limits.estimate_memory(NSAConfig(), 65536)
    long = limits.estimate_memory(NSAConfig(), 131072)
    assert short.phase == long.phase == "forward/select"
    # T x Ns grows with T^2: twice the tokens, nearly four times the bytes.
    assert long.tensor_bytes > 3.5 * short.tensor_bytes
    # The kernels hold no T x Ns matrix: the same request is linear there.
    k_short = limits.estimate_memory(NSAConfig(), 8192, backend="triton", device="cuda", dtype=torch.bfloat16)
    k_long = limits.estimate_memory(NSAConfig(), 65536, backend="triton", device="cuda", dtype=torch.bfloat16)
    assert 7 * k_short.tensor_bytes <= k_long.tensor_bytes <= 9 * k_short.tensor_bytes


def test_trace_and_analyses_only_add_memory():
    plain = limits.estimate_memory(NSAConfig(), 4096).total_bytes
    traced = limits.estimate_memory(NSAConfig(), 4096, trace=True).total_bytes
    analysed = limits.estimate_memory(NSAConfig(), 4096, trace=True, analyses=limits.ANALYSES).total_bytes
    assert plain < traced <= analysed


def test_max_context_is_the_last_length_that_fits():
    free = 3 << 30
    budget = free - limits.RESERVE_BYTES["cpu"]
    longest = limits.max_context(NSAConfig(), device="cpu", trace=True, free_bytes=free)
    assert limits.estimate_memory(NSAConfig(), longest, trace=True).total_bytes <= budget
    assert limits.estimate_memory(NSAConfig(), longest + 1, trace=True).total_bytes > budget
    assert limits.max_context(NSAConfig(), device="cpu", free_bytes=limits.RESERVE_BYTES["cpu"]) == 0


def test_a_long_request_is_refused_with_the_numbers_before_any_allocation():
    free = 1 << 30
    caught = []

    def check():
        try:
            limits.check_context(NSAConfig(), 200_000, device="cpu", trace=True, free_bytes=free)
        except limits.ContextTooLong as err:
            caught.append(err)

    # The refusal itself allocates next to nothing, although the request would need gigabytes.
    assert allocated_peak(check) < 1 << 20
    (err,) = caught
    assert isinstance(err, ValueError)
    assert err.tokens == 200_000 and err.free_bytes == free
    assert err.estimated_bytes > free
    assert 0 < err.max_tokens < 200_000
    assert limits.estimate_memory(NSAConfig(), err.max_tokens, trace=True).total_bytes <= free
    for number in ("200,000", f"{err.max_tokens:,}", "1,024.0 MiB"):
        assert number in str(err)
    fits = limits.check_context(NSAConfig(), err.max_tokens, device="cpu", trace=True, free_bytes=free)
    assert fits.total_bytes <= free


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="backend"):
        limits.estimate_memory(NSAConfig(), 10, backend="cuda")
    with pytest.raises(ValueError, match="unknown analyses"):
        limits.estimate_memory(NSAConfig(), 10, analyses=["attention_rollout"])
    with pytest.raises(ValueError, match="tokens"):
        limits.estimate_memory(NSAConfig(), -1)


def test_free_cpu_memory_reads_meminfo_and_the_cgroup_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert limits._meminfo_available(str(meminfo)) == 8000000 * 1024
    # cgroup v1 with a limit: the headroom is limit minus usage.
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(4 << 30))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(str(1 << 30))
    (tmp_path / "cgroup").write_text("4:memory:/hidden/by/namespace\n")
    assert limits._cgroup_headroom(proc_cgroup=str(tmp_path / "cgroup"), sysfs=str(tmp_path)) == 3 << 30
    # cgroup v2 without a limit.
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    assert limits._cgroup_headroom(proc_cgroup=str(tmp_path / "cgroup"), sysfs=str(tmp_path)) is None
    assert limits._meminfo_available() > 0  # this machine's own /proc/meminfo parses
    # free_memory("cpu") is the smaller of the two when there is a limit (fixed values: the machine's own
    # MemAvailable changes between two reads).
    monkeypatch.setattr(limits, "_meminfo_available", lambda: 8 << 30)
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: 3 << 30)
    assert limits.free_memory("cpu") == 3 << 30
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: None)
    assert limits.free_memory("cpu") == 8 << 30


def _fails_after_allocating(nbytes: int, refs: list):
    held = torch.ones(nbytes // 4)  # what a real forward would be holding when the allocator gives up
    refs.append(weakref.ref(held))
    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes (injected)")


def test_guard_releases_what_the_failing_code_held_and_says_what_it_was_doing():
    refs = []
    with pytest.raises(limits.DeviceOutOfMemory) as info, limits.oom_guard("tracing 65,536 tokens", device="cpu"):
        _fails_after_allocating(64 << 20, refs)
    gc.collect()
    assert refs[0]() is None, "the failing frame's tensor is still alive"
    err = info.value
    assert "tracing 65,536 tokens" in str(err) and "injected" in str(err)
    assert err.what == "tracing 65,536 tokens" and err.free_bytes > 0
    assert err.__cause__ is None


def test_guard_recognises_the_cpu_allocator_failure_and_lets_other_errors_through():
    with pytest.raises(limits.DeviceOutOfMemory, match="can't allocate memory"), limits.oom_guard("allocating"):
        torch.empty(1 << 62, dtype=torch.uint8)
    with pytest.raises(KeyError), limits.oom_guard("looking up"):
        raise KeyError("not memory")
    with limits.oom_guard("nothing"):
        value = 1
    assert value == 1


def test_work_goes_on_after_a_guarded_failure():
    model = NSALM(TINY).eval().requires_grad_(False)
    ids = torch.randint(0, 256, (1, 96))
    with torch.inference_mode():
        before = model(ids)
    with pytest.raises(limits.DeviceOutOfMemory), limits.oom_guard("tracing", device="cpu"):
        _fails_after_allocating(1 << 20, [])
    with torch.inference_mode():
        assert torch.equal(model(ids), before)


# The app: every model run goes through the check and the guard, and the server keeps serving ----------


def _explorer(monkeypatch) -> AppTest:
    monkeypatch.delenv(launch.ENV_CHECKPOINT, raising=False)
    monkeypatch.setenv(launch.ENV_DEVICE, "cpu")
    st.cache_data.clear()
    app = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["max_tokens"] = 96
    return at


def _messages(at) -> tuple[list[str], list[str]]:
    return [str(e.value) for e in at.error], [str(e.value) for e in at.exception]


def test_the_app_refuses_a_context_the_device_cannot_hold_and_goes_on(monkeypatch):
    at = _explorer(monkeypatch)
    real_free_memory = limits.free_memory
    monkeypatch.setattr(limits, "free_memory", lambda device: limits.RESERVE_BYTES["cpu"] + (1 << 20))
    at.run()
    errors, exceptions = _messages(at)
    assert not exceptions
    assert any("tokens need about" in e and "free" in e for e in errors), errors
    monkeypatch.setattr(limits, "free_memory", real_free_memory)
    at.run()
    assert _messages(at) == ([], [])
    assert any(m.label == "Tokens" for m in at.metric)


def test_the_app_reports_an_out_of_memory_run_and_serves_the_next_one(monkeypatch):
    at = _explorer(monkeypatch)
    real_forward = NSALM.forward

    def failing_forward(self, ids, **kwargs):
        _scratch = torch.ones(1 << 20)  # held by the failing frame, as a real forward would
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(NSALM, "forward", failing_forward)
    at.run()
    errors, exceptions = _messages(at)
    assert not exceptions
    assert any("out of memory" in e and "tracing 96 tokens" in e for e in errors), errors
    monkeypatch.setattr(NSALM, "forward", real_forward)
    at.run()
    assert _messages(at) == ([], [])
    assert any(m.label == "Tokens" for m in at.metric)
