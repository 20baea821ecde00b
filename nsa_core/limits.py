"""How long a context fits on a device, refusing longer requests up front, and surviving out-of-memory.

`estimate_memory(config, T, ...)` writes down the bytes a forward pass (optionally traced, optionally
followed by on-demand analyses) allocates for T tokens, term by term; `max_context` inverts it against
the memory a device has free; `check_context` raises `ContextTooLong` with the numbers before anything
is allocated; `oom_guard` turns an out-of-memory error raised anyway into `DeviceOutOfMemory` after
giving the memory back, so that a server keeps serving.

The arithmetic (B = 1, a = bytes per activation element of the model dtype, 4 = float32):

  T tokens, dm = d_model, L layers, HQ query heads, H KV heads, Dk/Dv head dims, F = mlp_hidden,
  V = vocab, Tc = compressed tokens, Ns = ceil(T / l') selection blocks, n = top_n, w = window.

The forward runs layer after layer, and each layer runs its stages one after the other, freeing
each stage's temporaries before the next, so the peak is

  persistent(T) + max over stages (what the stage holds at once)

- persistent: the residual stream (3 x T dm a: embedding, x + attention, x + MLP) and, when tracing,
  the records of the L - 1 finished layers (q, k, v, gates, compressed k/v, the four branch outputs,
  lse, block_idx and, under slc_scores "free", the selection's lse of each: linear in T).
- stages of one layer, each holding the layer's inputs (q, k, v, k_cmp, v_cmp, gates) and the
  outputs computed so far:
  proj: RMSNorm in float32, q/k/v and the un-rotated copies phi reads, RoPE's float32 temporaries
    (about 4 copies of q), phi's flattened windows (Tc x H x l x Dk, about 2 T H Dk).
  cmp (reference): one chunk of C queries x HQ x Tc float32 scores, about 6 live copies
    (scores, masked, exp, probabilities, the einsum's operand), C = min(T, 2^24 / (HQ Tc)).
  importance (reference): the scores T x H x Ns float32 (the only T^2 term: Ns grows with T), built
    chunk by chunk (C queries x HQ x max(Tc, Ns), 5 live copies) and concatenated (2 copies).
  select (reference): the stable sort of top-n over those scores: about 30 bytes per (t, h, block)
    element (scores, two ranked copies, sorted values 4 + indices 8, masks).
  slc (reference): one chunk of gathered keys/values (about 2^21 elements), their scores and ids.
  win (reference): one chunk of w queries x HQ x (2w) keys float32, about 6 live copies.
  The Triton kernels hold no chunk and no T x Ns matrix: only their outputs.
  free share (slc_scores "free", either backend): the K compressed tokens overlapping each query's
    forced blocks, their int64 ids and overlaps (T x K), and one chunk of their gathered keys and
    scores (`reference.forced_share`); traced layers keep that lse in their records.
  mlp: gate, up, silu(gate) and their product, 4 x T F a.
  head: the final RMSNorm and the logits T x V in the model dtype and in float32.
- trace assembly (after the last layer): all L records, the logits, the numpy trace arrays
  (gates, block_idx, block scores, lse, branch norms) and, for a chunk of 2048 queries, the indices
  and overlap weights of the R = ceil((l' + l - 1) / d) compressed tokens overlapping each chosen
  block, then one chosen block at a time, their keys and scores.
- analyses (after the forward, from one layer's recomputed inputs): the trace arrays, the layer
  inputs and each analysis's working chunk and output (`_analysis_phase`); recomputing the inputs
  runs the forward up to that layer, which the forward's own phases already bound.

Index tensors, masks and other small temporaries add `SMALL_TENSOR_SHARE` to every phase. The
allocator's own overhead (glibc arenas on the CPU, the caching allocator's rounding on CUDA) is
a measured factor on top (`ALLOCATOR_OVERHEAD`); docs/reliability.md compares the estimate with
measured peaks.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import masks, reference
from .config import NSAConfig

# Chunk budgets of nsa_core.reference and nsa_core.analysis (elements per temporary); kept equal here
# by tests/test_limits.py so that a change there cannot silently break the estimate.
REFERENCE_CHUNK_ELEMENTS = 1 << 24
REFERENCE_GATHER_ELEMENTS = 1 << 21
TRACE_SCORE_CHUNK = 2048
ANALYSIS_CHUNK_ELEMENTS = 1 << 22
ANALYSIS_ROWS_ELEMENTS = 1 << 26

# Bytes per (query, KV head, selection block) element while top-n sorts the importance scores.
_TOPN_BYTES_PER_ELEMENT = 30
# Live float32 copies of one chunk of attention scores inside the reference's masked softmax.
_SOFTMAX_COPIES = 6

# The terms name the large tensors; index tensors, masks, norms and PyTorch's own scratch add about
# this share on top (measured with the profiler against the itemised terms, docs/reliability.md).
SMALL_TENSOR_SHARE = 0.1
# What the process really takes over what its tensors allocate: on the CPU the largest ratio of RSS
# growth to the itemised estimate measured (docs/reliability.md); on CUDA an allowance for the caching
# allocator's block rounding: reserved over allocated peak was 1.23 (reference) and 1.27 (triton) for a
# traced 8k forward on an H200 (docs/reliability.md); a gpu test checks torch.cuda.max_memory_reserved.
ALLOCATOR_OVERHEAD = {"cpu": 1.75, "cuda": 1.3}
# Bytes kept free for everything else the process does (the server, the UI, other requests).
RESERVE_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}

BACKENDS = ("reference", "triton")

# The on-demand analyses of nsa_core.analysis whose working memory `estimate_memory` can add.
ANALYSES = ("query_detail", "dense_map", "recall", "oracle")


class ContextTooLong(ValueError):
    """A request longer than the device can hold, refused before anything was allocated."""

    def __init__(self, *, tokens: int, max_tokens: int, estimated_bytes: int, free_bytes: int, device: str):
        self.tokens, self.max_tokens = tokens, max_tokens
        self.estimated_bytes, self.free_bytes, self.device = estimated_bytes, free_bytes, device
        super().__init__(
            f"{tokens:,} tokens need about {_mib(estimated_bytes)} on {device}, but {_mib(free_bytes)} are free; "
            f"the longest context that fits now is {max_tokens:,} tokens"
        )


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory while doing `what`; memory was released and the caller may go on."""

    def __init__(self, *, what: str, device: str, detail: str, free_bytes: int | None):
        self.what, self.device, self.detail, self.free_bytes = what, device, detail, free_bytes
        free = f"; {_mib(free_bytes)} free after releasing memory" if free_bytes is not None else ""
        super().__init__(f"out of memory on {device} while {what}{free}. Try a shorter input. ({detail})")


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    formula: str
    bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for one request: the terms of its peak phase, scaled by the allocator overhead."""

    tokens: int
    phase: str  # which phase or stage peaks, e.g. "forward/select"
    terms: tuple[MemoryTerm, ...]
    overhead: float

    @property
    def tensor_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def total_bytes(self) -> int:
        return math.ceil(self.tensor_bytes * self.overhead)

    def describe(self) -> str:
        """A small table: one line per term, then the total."""
        lines = [f"peak at {self.phase} for T = {self.tokens:,}:"]
        lines += [f"  {t.name:<28} {_mib(t.bytes):>12}   {t.formula}" for t in self.terms]
        lines.append(f"  {'total x ' + str(self.overhead) + ' allocator':<28} {_mib(self.total_bytes):>12}")
        return "\n".join(lines)


def estimate_memory(config: NSAConfig, tokens: int, *, dtype: torch.dtype = torch.float32,
                    backend: str = "reference", trace: bool = False, analyses: Iterable[str] = (),
                    device: str = "cpu") -> MemoryEstimate:
    """Peak bytes of one batch-1 forward over `tokens` tokens (then its trace and analyses) on `device`."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    analyses = tuple(analyses)
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; known: {list(ANALYSES)}")
    dev = torch.device(device).type
    if dev not in ALLOCATOR_OVERHEAD:
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    s = _Sizes(config, tokens, torch.empty((), dtype=dtype).element_size())
    phases = _forward_phases(s, backend=backend, trace=trace)
    if trace:
        phases["trace"] = _trace_assembly(s)
    for name in analyses:
        phases[f"analysis/{name}"] = _analysis_phase(s, name, backend=backend)
    for terms in phases.values():
        terms.append(_term("small temporaries", f"{SMALL_TENSOR_SHARE:.0%} of the above",
                           SMALL_TENSOR_SHARE * sum(t.bytes for t in terms)))
    phase, terms = max(phases.items(), key=lambda item: sum(t.bytes for t in item[1]))
    return MemoryEstimate(tokens=tokens, phase=phase, terms=tuple(terms), overhead=ALLOCATOR_OVERHEAD[dev])


def free_memory(device: torch.device | str) -> int:
    """Bytes a new request can still allocate on device.

    CUDA: what the driver reports free plus what PyTorch's caching allocator holds but does not use.
    CPU: MemAvailable from /proc/meminfo, capped by this process's cgroup limit when there is one.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + cached)
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    available = _meminfo_available()
    cgroup = _cgroup_headroom()
    return min(available, cgroup) if cgroup is not None else available


def max_context(config: NSAConfig, *, device: torch.device | str, dtype: torch.dtype = torch.float32,
                backend: str = "reference", trace: bool = False, analyses: Iterable[str] = (),
                free_bytes: int | None = None, upper: int = 1 << 22) -> int:
    """The most tokens whose estimate fits in free_bytes (default: `free_memory(device)`) minus the reserve."""
    dev = torch.device(device)
    budget = (free_memory(dev) if free_bytes is None else free_bytes) - RESERVE_BYTES[dev.type]
    analyses = tuple(analyses)

    def fits(t: int) -> bool:
        return estimate_memory(config, t, dtype=dtype, backend=backend, trace=trace, analyses=analyses,
                               device=dev.type).total_bytes <= budget

    if not fits(1):
        return 0
    lo, hi = 1, upper  # the estimate grows with T, so bisect for the last T that fits
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_context(config: NSAConfig, tokens: int, *, device: torch.device | str, dtype: torch.dtype = torch.float32,
                  backend: str = "reference", trace: bool = False, analyses: Iterable[str] = (),
                  free_bytes: int | None = None) -> MemoryEstimate:
    """The estimate for `tokens`, or ContextTooLong with the numbers when it does not fit."""
    dev = torch.device(device)
    analyses = tuple(analyses)
    free = free_memory(dev) if free_bytes is None else free_bytes
    estimate = estimate_memory(config, tokens, dtype=dtype, backend=backend, trace=trace, analyses=analyses,
                               device=dev.type)
    if estimate.total_bytes > free - RESERVE_BYTES[dev.type]:
        longest = max_context(config, device=dev, dtype=dtype, backend=backend, trace=trace, analyses=analyses,
                              free_bytes=free, upper=max(tokens, 1))
        raise ContextTooLong(tokens=tokens, max_tokens=longest, estimated_bytes=estimate.total_bytes,
                             free_bytes=free, device=str(dev))
    return estimate


def is_out_of_memory(err: BaseException) -> bool:
    """True for PyTorch's OutOfMemoryError, a CPU allocator failure, or Python's MemoryError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory").
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


@contextlib.contextmanager
def oom_guard(what: str, *, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block; on out-of-memory, free what it held and raise DeviceOutOfMemory(what=...).

    The failing frames still reference every tensor the block had allocated, through the exception's
    traceback: they are cleared and the original exception is not chained (chaining would keep it, and
    them, alive), then gc runs and the CUDA cache is emptied, so the memory really is back.
    """
    try:
        yield
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
        del err
        gc.collect()
        dev = torch.device(device) if device is not None else None
        free = None
        if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
            torch.cuda.empty_cache()
            free = free_memory(dev if dev is not None else torch.device("cuda"))
        elif dev is not None and dev.type == "cpu":
            free = free_memory(dev)
        label = str(dev) if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        raise DeviceOutOfMemory(what=what, device=label, detail=detail, free_bytes=free) from None


@contextlib.contextmanager
def model_run(model, tokens: int, what: str, *, trace: bool = False, analyses: Iterable[str] = ()) -> Iterator[None]:
    """`check_context` for this NSALM's config, device, dtype and backend, then `oom_guard(what)`.

    Raises ContextTooLong before the block runs when the request cannot fit, DeviceOutOfMemory when
    it runs out of memory anyway.
    """
    check_context(model.config, tokens, device=model.device, dtype=model.dtype, backend=_backend_of(model),
                  trace=trace, analyses=analyses)
    with oom_guard(what, device=model.device):
        yield


def model_max_context(model, *, trace: bool = False, analyses: Iterable[str] = ()) -> int:
    """`max_context` for this NSALM where it runs now (its device's free memory)."""
    return max_context(model.config, device=model.device, dtype=model.dtype, backend=_backend_of(model),
                       trace=trace, analyses=analyses)


def _backend_of(model) -> str:
    ops, _ = model.ops()
    return "triton" if ops.__name__.startswith("kernels") else "reference"


# The arithmetic -----------------------------------------------------------------------------------


class _Sizes:
    """Sizes that recur in the terms, for one config, T and activation width `a` bytes."""

    def __init__(self, c: NSAConfig, T: int, a: int) -> None:
        self.c, self.T, self.a = c, T, a
        self.nsa = c.attention == "nsa"
        self.Tc = masks.num_compressed(T, c.cmp_block, c.cmp_stride) if self.nsa else 0
        self.Ns = masks.num_selection_blocks(T, c.slc_block) if T else 0
        self.kv_sets = 3 if self.nsa and c.kv_mode == "independent" else 1
        q = T * c.n_head * c.head_dim
        kv = T * c.n_kv_head * (c.head_dim + c.v_head_dim)
        kv_cmp = self.Tc * c.n_kv_head * (c.head_dim + c.v_head_dim)
        out = T * c.n_head * c.v_head_dim
        gates = T * c.n_head * 3 if self.nsa else 0
        # What a layer feeds its attention (AttentionInputs): window k/v are separate only when independent.
        self.inputs = (q + kv * (2 if self.kv_sets == 3 else 1) + kv_cmp + gates) * a
        self.out = out * a  # one branch output [T, HQ, Dv]
        self.lse = T * c.n_head * 4
        self.block_idx = T * c.n_kv_head * c.top_n * 4
        # One traced layer keeps its inputs and NSAParts (o, o_cmp, o_slc, o_win, lse, block_idx, and the
        # selection's lse, a tensor of its own only under slc_scores "free").
        lse_slc = self.lse if self.nsa and c.slc_scores == "free" else 0
        self.record = self.inputs + 4 * self.out + self.lse + lse_slc + self.block_idx if self.nsa else 0
        self.residual = 3 * T * c.d_model * a


def _term(name: str, formula: str, nbytes: float) -> MemoryTerm:
    return MemoryTerm(name, formula, int(nbytes))


def _persistent(s: _Sizes, *, trace: bool, finished_layers: int) -> list[MemoryTerm]:
    terms = [_term("residual stream", "3 T dm a", s.residual), _term("token ids", "8 T", 8 * s.T)]
    if trace and finished_layers:
        terms.append(_term(f"trace records x{finished_layers}", "layers x (inputs + 4 outputs + lse + idx)",
                           finished_layers * s.record))
    return terms


def _forward_phases(s: _Sizes, *, backend: str, trace: bool) -> dict[str, list[MemoryTerm]]:
    """Per stage of the last layer (the most records alive), what is held at its peak."""
    c, T, a = s.c, s.T, s.a
    base = _persistent(s, trace=trace, finished_layers=c.n_layer - 1)
    inputs = _term("layer inputs", "T (HQ Dk + H (Dk+Dv) + HQ 3) a + Tc H (Dk+Dv) a", s.inputs)
    q_f32 = T * c.n_head * c.head_dim * 4
    proj = [
        _term("rmsnorm float32", "2 T dm 4", 2 * T * c.d_model * 4),
        inputs,
        _term("rope temporaries", "4 T HQ Dk 4", 4 * q_f32),
    ]
    if s.nsa:
        raw_kv = T * c.n_kv_head * (c.head_dim + c.v_head_dim) * a
        windows = s.Tc * c.n_kv_head * c.cmp_block * max(c.head_dim, c.v_head_dim) * a
        proj += [_term("un-rotated k/v for phi", "T H (Dk+Dv) a", raw_kv),
                 _term("phi windows", "2 Tc H l Dk a", 2 * windows)]
    phases: dict[str, list[MemoryTerm]] = {"forward/proj": base + proj}
    if s.nsa:
        phases.update(_attention_stages(s, base, inputs, backend=backend))
    else:
        phases["forward/dense"] = base + [inputs, _term("sdpa output", "2 T HQ Dv a", 2 * s.out)]
    phases["forward/mlp"] = base + [_term("mlp activations", "4 T F a", 4 * T * c.mlp_hidden * a)]
    head = [_term("final norm", "2 T dm 4", 2 * T * c.d_model * 4),
            _term("logits", "T V (a + 4)", T * c.vocab_size * (a + 4))]
    phases["forward/head"] = _persistent(s, trace=trace, finished_layers=c.n_layer) + head
    return phases


def _attention_stages(s: _Sizes, base: list[MemoryTerm], inputs: MemoryTerm, *, backend: str):
    c, T = s.c, s.T
    HQ, H = c.n_head, c.n_kv_head
    o_f32 = T * HQ * c.v_head_dim * 4
    # Reference branches build float32 chunk outputs, concatenate them (2 copies) and cast to a.
    out_built = _term("branch output being built", "2 T HQ Dv 4 + T HQ Dv a", 2 * o_f32 + s.out)
    cmp_done = [_term("o_cmp + lse", "T HQ Dv a + T HQ 4", s.out + s.lse)]
    sel_done = cmp_done + [_term("block_idx", "T H n 4", s.block_idx)]
    slc_done = sel_done + [_term("o_slc", "T HQ Dv a", s.out)]
    gated = base + [inputs, _term("o, o_cmp, o_slc, o_win + lse + idx", "4 T HQ Dv a + ...",
                                  4 * s.out + s.lse + s.block_idx)]
    per_q_cmp = HQ * max(s.Tc, 1)
    chunk_cmp = min(T, max(1, REFERENCE_CHUNK_ELEMENTS // per_q_cmp)) * per_q_cmp * 4
    per_q_sel = HQ * max(s.Tc, s.Ns, 1)
    chunk_sel = min(T, max(1, REFERENCE_CHUNK_ELEMENTS // per_q_sel)) * per_q_sel * 4
    slots = H * c.top_n * c.slc_block  # gathered key slots per query
    chunk_q = min(T, max(1, REFERENCE_GATHER_ELEMENTS // (slots * (c.head_dim + c.v_head_dim + c.group_size))))
    # Per slot: gathered k and v (float32), 6 float32 copies of the G heads' scores, int64 token ids, masks.
    chunk_slc = chunk_q * slots * (4 * (c.head_dim + c.v_head_dim) + 24 * c.group_size + 24)
    blocked_kv = T * H * (c.head_dim + c.v_head_dim) * 4  # k and v regrouped into whole blocks
    win_q = min(T, c.window, max(1, REFERENCE_CHUNK_ELEMENTS // (HQ * 2 * c.window)))
    chunk_win = win_q * HQ * min(T, win_q + c.window - 1) * 4
    scores = T * H * s.Ns
    free = {}
    if c.slc_scores == "free":
        free["forward/free share"] = base + [inputs] + cmp_done + _free_share_terms(s)
    if backend == "triton":
        # The kernels write their outputs and nothing else: no chunk, no T x Ns matrix.
        return {**free, "forward/attention": gated}
    return {
        **free,
        "forward/cmp": base + [inputs, out_built,
                               _term("cmp score chunk", "6 C HQ Tc 4", _SOFTMAX_COPIES * chunk_cmp)],
        "forward/importance": base + [inputs] + cmp_done + [
            _term("importance chunk", "5 C HQ max(Tc, Ns) 4", 5 * chunk_sel),
            _term("T x Ns scores being built", "2 T H Ns 4", 2 * 4 * scores)],
        "forward/select": base + [inputs] + cmp_done + [
            _term("top-n over T x Ns scores", "30 T H Ns", _TOPN_BYTES_PER_ELEMENT * scores)],
        "forward/slc": base + [inputs] + sel_done + [out_built,
                                                     _term("k/v as blocks", "T H (Dk+Dv) 4", blocked_kv),
                                                     _term("gathered blocks chunk",
                                                           "C H n l' (4 (Dk+Dv) + 24 G + 24)", chunk_slc)],
        "forward/win": base + [inputs] + slc_done + [out_built,
                                                     _term("window score chunk", "6 C HQ (C+w) 4",
                                                           _SOFTMAX_COPIES * chunk_win)],
        "forward/gate": gated,
    }


def _free_share_terms(s: _Sizes) -> list[MemoryTerm]:
    """slc_scores "free": `reference.forced_share` over the K compressed tokens that overlap forced blocks."""
    c, T = s.c, s.T
    K = sum(reference.forced_token_counts(cmp_block=c.cmp_block, cmp_stride=c.cmp_stride, slc_block=c.slc_block,
                                          init_blocks=c.init_blocks, local_blocks=c.local_blocks))
    per_q = K * c.n_head * c.head_dim
    C = min(T, max(1, REFERENCE_CHUNK_ELEMENTS // per_q))
    # Per (query, token): ids, bounds and overlaps as int64 (about 8 live), the float32 weight.
    index = T * K * (8 * 8 + 4)
    # Per chunk: the gathered keys (advanced indexing, up to 4 copies), q in float32, scores and
    # probabilities; the float32 copy of k_cmp and the [T, HQ] share.
    chunk = C * K * c.n_kv_head * c.head_dim * 4 * 4 + C * c.n_head * (c.head_dim + 3 * K) * 4
    whole = s.Tc * c.n_kv_head * c.head_dim * 4 + 2 * T * c.n_head * 4
    return [_term("forced-share indices", "T K (8 8 + 4)", index),
            _term("forced-share chunk", "C K H Dk 16 + C HQ (Dk + 3 K) 4", chunk),
            _term("k_cmp float32 + share", "Tc H Dk 4 + 2 T HQ 4", whole)]


def _trace_assembly(s: _Sizes) -> list[MemoryTerm]:
    c, T = s.c, s.T
    arrays = T * (c.n_head * 3 * 4 + c.n_kv_head * c.top_n * 4 * 2 + c.n_head * 4 + c.n_head * 3 * 4)
    R = -(-(c.slc_block + c.cmp_block - 1) // c.cmp_stride)
    C, H, n, G = min(T, TRACE_SCORE_CHUNK), c.n_kv_head, c.top_n, c.group_size
    # chosen_block_scores, per chunk of C queries: five int64 index tensors and the float32 overlap
    # weights of every (query, head, chosen block, overlapping compressed token); then, one chosen block
    # at a time, its gathered keys (CUDA's advanced indexing held up to 4 copies, measured on an H200)
    # and four float32 score tensors per query head.
    index = C * H * n * R * (5 * 8 + 4)
    gather = C * H * R * (4 * c.head_dim * 4 + 4 * G * 4)
    scores = 2 * T * H * n * 4 + C * c.n_head * c.head_dim * 4  # the scores so far, their concatenation, q
    return _persistent(s, trace=True, finished_layers=c.n_layer) + [
        _term("logits", "T V 4", T * c.vocab_size * 4),
        _term("trace arrays", "L T (HQ 3 + 2 H n + HQ + HQ 3) 4", c.n_layer * arrays),
        _term("chosen-block index chunk", "C H n R (5 8 + 4)", index),
        _term("one block's keys, scores", "C H R (16 Dk + 16 G)", gather),
        _term("chosen-block scores", "2 T H n 4 + C HQ Dk 4", scores),
    ]


def _analysis_phase(s: _Sizes, name: str, *, backend: str) -> list[MemoryTerm]:
    """One analysis of one layer after the trace: the trace arrays stay, the layer's inputs are rebuilt."""
    c, T = s.c, s.T
    trace_arrays = c.n_layer * T * (c.n_head * 28 + c.n_kv_head * c.top_n * 8)
    terms = [_term("trace arrays", "L T (7 HQ + 2 H n) 4", trace_arrays),
             _term("residual stream", "3 T dm a", s.residual),
             _term("layer inputs", "T (HQ Dk + H (Dk+Dv) + HQ 3) a + ...", s.inputs)]
    fused = backend == "triton"  # the dense-map kernels hold one row block, not a chunk of scores
    chunk = 0 if fused else min(ANALYSIS_CHUNK_ELEMENTS, c.n_head * T * T) * 4  # one float32 score chunk
    if name == "query_detail":
        terms.append(_term("one query row", "HQ (Tc + T) 4 x 4", 4 * c.n_head * (s.Tc + T) * 4))
    elif name == "dense_map":
        # [rows, C] mass buffer per call (rows x C <= 2^26 elements) and the 512 x 512 result.
        buffer = min(T * min(T, 512), ANALYSIS_ROWS_ELEMENTS) * 4
        terms += [_term("mass buffer", "min(T C, 2^26) 4", 2 * buffer),
                  _term("score chunk", "4 x 2^22 4", 4 * chunk)]
    elif name == "recall":
        terms += [_term("lse + covered", "2 T HQ 4", 2 * T * c.n_head * 4),
                  _term("score chunk", "5 x 2^22 4", 5 * chunk)]
    else:  # oracle
        rows = min(T, max(1, ANALYSIS_ROWS_ELEMENTS // max(1, c.n_head * s.Ns)))
        terms += [_term("block mass rows", "2 rows HQ Ns 4", 2 * rows * c.n_head * s.Ns * 4),
                  _term("score chunk", "4 x 2^22 4", 4 * chunk)]
    return terms


# Free memory ----------------------------------------------------------------------------------------


def _meminfo_available(path: str = "/proc/meminfo") -> int:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no MemAvailable line")


def _cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", sysfs: str = "/sys/fs/cgroup") -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), or None when unlimited or unknown."""
    candidates = []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":  # cgroup v2 (unified), mounted alone or under /unified next to v1
            roots, names = (sysfs, os.path.join(sysfs, "unified")), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            roots, names = (os.path.join(sysfs, "memory"),), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # Inside a container the group's path may be hidden by a namespace: the mount root is the group.
        for root in roots:
            for folder in (os.path.join(root, path.lstrip("/")), root):
                candidates.append((os.path.join(folder, names[0]), os.path.join(folder, names[1])))
    for limit_path, usage_path in candidates:
        try:
            limit = Path(limit_path).read_text().strip()
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            continue
        # "max" (v2) or a number near 2^63 (v1) means no limit.
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 10 * 2**30 else f"{n / 2**30:,.2f} GiB"
