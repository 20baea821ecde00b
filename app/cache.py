"""Everything the app computes, cached: models once per process, traces and analyses per plain key.

Models live in `st.cache_resource`: one object per (source, device, dtype), shared by every browser
session, put in eval mode with gradients off and never mutated afterwards, so concurrent sessions
can run it safely. Traces and analyses live in `st.cache_data`, keyed on plain values (source string,
text, layer, head, query, zoom) and returned as numpy, so a rerun or a second session with the same
question never runs the model again.

A model source is a string: "sample:NAME" (a shipped checkpoint), "path:/abs/dir-or-file" (a
server-side checkpoint under the configured roots) or "upload:SHA256" (a file uploaded in the browser
and kept in a private temporary folder), optionally followed by "@scores=RULE": the checkpoint's weights
ranking blocks by the other selection rule (`NSAConfig.slc_scores`), so one checkpoint can be compared
under both. Being part of the source, the rule is part of every cache key and of the permalink.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from nsa_core import analysis, checkpoint, limits, niah, safe_paths, sample_models, tokenizer
from nsa_core.config import SLC_SCORES
from nsa_core.model import NSALM, AttentionInputs
from nsa_core.trace import ModelTrace

SAMPLE, PATH, UPLOAD = "sample:", "path:", "upload:"
SCORES = "@scores="  # source suffix: the selection rule to serve the checkpoint with, when not its own
UPLOAD_DIR = Path(tempfile.gettempdir()) / "nsa-explorer-uploads"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SourceError(ValueError):
    """A model source string that names nothing the app may open."""


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda" or "cpu"
    dtype: str  # a key of DTYPES
    reason: str  # one sentence for the user


def choose_device(requested: str, *, cuda_available: bool | None = None) -> DeviceChoice:
    """Where models run: the GPU (bfloat16, Triton kernels) when there is one, the CPU (float32) otherwise."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return DeviceChoice("cpu", "float32", "the CPU was requested (--device cpu)")
    if cuda:
        name = torch.cuda.get_device_name(0) if cuda_available is None else "CUDA GPU"
        return DeviceChoice("cuda", "bfloat16", f"a CUDA GPU is available ({name})")
    if requested == "cuda":
        return DeviceChoice(
            "cpu", "float32", "the GPU was requested but PyTorch sees no CUDA device; running on the CPU"
        )
    return DeviceChoice("cpu", "float32", "PyTorch sees no CUDA GPU on this machine, so the app runs on the CPU")


@dataclass(frozen=True)
class LoadedModel:
    model: NSALM
    source: str
    label: str  # a short name for the UI
    backend_reason: str  # which attention implementation runs and why
    load_seconds: float


def split_scores(source: str) -> tuple[str, str | None]:
    """(the checkpoint's source, the selection rule it is served with or None for its own)."""
    checkpoint_source, marker, rule = source.rpartition(SCORES)
    if not marker:
        return source, None
    if rule not in SLC_SCORES:
        raise SourceError(f"a selection rule is one of {', '.join(SLC_SCORES)}, got {rule!r}")
    return checkpoint_source, rule


def with_scores(source: str, rule: str) -> str:
    """The source of source's checkpoint served with selection rule `rule` (no suffix for its own rule)."""
    checkpoint_source, _ = split_scores(source)
    own = checkpoint.read_config(source_path(checkpoint_source)).slc_scores
    return checkpoint_source if rule == own else checkpoint_source + SCORES + rule


def source_label(source: str) -> str:
    """A short name for the UI; never raises (it names sources that failed to open, too)."""
    checkpoint_source, marker, rule = source.rpartition(SCORES)
    if not marker:
        return _checkpoint_label(source)
    return f"{_checkpoint_label(checkpoint_source)} · {rule} scores"


def _checkpoint_label(source: str) -> str:
    if source.startswith(SAMPLE):
        return source[len(SAMPLE) :]
    if source.startswith(PATH):
        return Path(source[len(PATH) :]).name
    if source.startswith(UPLOAD):
        return f"upload {source[len(UPLOAD) :][:10]}"
    return source


def source_path(source: str) -> Path:
    """The checkpoint path a source names; SourceError when it names nothing the app may open."""
    source, _ = split_scores(source)
    if source.startswith(SAMPLE):
        try:
            return sample_models.sample_model(source[len(SAMPLE) :])
        except FileNotFoundError as err:
            raise SourceError(str(err)) from None
    if source.startswith(PATH):
        return checked_path(source[len(PATH) :])
    if source.startswith(UPLOAD):
        digest = source[len(UPLOAD) :]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise SourceError(f"not an upload id: {digest!r}")
        return UPLOAD_DIR / f"{digest}.safetensors"
    raise SourceError(f"a model source starts with sample:, path: or upload:, got {source!r}")


def allowed_roots() -> list[Path]:
    """Folders the server-side picker may open checkpoints from."""
    return safe_paths.configured_roots()


def server_checkpoints() -> list[Path]:
    """Checkpoints found under the allowed folders."""
    return safe_paths.list_checkpoints(allowed_roots())


def checked_path(user_path: str) -> Path:
    """The resolved checkpoint path user_path names under the allowed folders; SourceError otherwise.

    Every path source goes through here, the ones in a shared URL included.
    """
    try:
        return safe_paths.resolve_checkpoint(user_path, allowed_roots())
    except safe_paths.UnsafePathError as err:
        raise SourceError(str(err)) from None


def sample_names() -> list[str]:
    """Names of the shipped checkpoints."""
    return [d.name for d in sample_models.list_sample_models()]


def default_sample() -> str:
    """The shipped checkpoint to open when nobody picked one (the best trained NSA model)."""
    return sample_models.default_sample_model().name


def describe_sample(name: str) -> str:
    """One line about a shipped checkpoint: its attention and size."""
    c = checkpoint.read_config(sample_models.sample_model(name))
    kind = "NSA" if c.attention == "nsa" else "dense attention"
    return f"{kind} · {c.n_layer} layers · d_model {c.d_model} · {c.n_head} query / {c.n_kv_head} KV heads"


def dense_twin(config) -> str | None:
    """The shipped dense-attention checkpoint of the same size as an NSA config, or None."""
    for name in sample_names():
        c = checkpoint.read_config(sample_models.sample_model(name))
        if c.attention == "dense" and (c.d_model, c.n_layer, c.n_head, c.n_kv_head) == (
            config.d_model,
            config.n_layer,
            config.n_head,
            config.n_kv_head,
        ):
            return name
    return None


NIAH_FILE = "niah.json"  # a sweep recorded next to a shipped checkpoint (nsa_core.niah.write_results)


def recorded_niah(source: str) -> dict | None:
    """The needle sweep shipped with a checkpoint directory, or None when there is none, it is unreadable, or
    the source serves the checkpoint with another selection rule than the sweep's."""
    try:
        if split_scores(source)[1] is not None:
            return None
        path = source_path(source) / NIAH_FILE
    except SourceError:
        return None
    if not path.is_file() or path.stat().st_size > 8 << 20:
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        grid = np.asarray(results["accuracy"], dtype=np.float32)
    except (ValueError, KeyError, TypeError):
        return None
    if grid.shape != (len(results.get("lengths", ())), len(results.get("depths", ()))):
        return None
    return results


def store_upload(data: bytes) -> str:
    """Keep an uploaded checkpoint in the private upload folder; returns its source string."""
    digest = hashlib.sha256(data).hexdigest()
    UPLOAD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = UPLOAD_DIR / f"{digest}.safetensors"
    if not target.exists():
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return UPLOAD + digest


def _release(loaded: LoadedModel) -> None:
    # Called when a model leaves the cache: give its GPU memory back to other users at once.
    if loaded.model.device.type == "cuda":
        torch.cuda.empty_cache()


@st.cache_resource(max_entries=4, on_release=_release, show_spinner="Loading the checkpoint…")
def load_model(source: str, device: str, dtype: str) -> LoadedModel:
    """The model a source names, on device, shared read-only by every session."""
    start = time.perf_counter()
    model = checkpoint.load_pretrained(source_path(source), device=device, dtype=DTYPES[dtype])
    rule = split_scores(source)[1]
    if rule is not None:
        model = model.with_selection_scores(rule)
    model.eval().requires_grad_(False)
    backend = "auto" if device == "cuda" else "reference"
    model.backend = backend
    _, reason = model.ops()
    return LoadedModel(
        model=model,
        source=source,
        label=source_label(source),
        backend_reason=reason,
        load_seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class TraceRun:
    trace: ModelTrace
    seconds: float


def encode_text(text: str, max_tokens: int) -> tuple[tuple[int, ...], bool]:
    """Token ids of text after <bos>, cut to max_tokens; and whether it was cut."""
    ids = tokenizer.encode(text, bos=True)
    return tuple(ids[:max_tokens]), len(ids) > max_tokens


@st.cache_data(max_entries=8, show_spinner=False)
def trace_ids(source: str, device: str, dtype: str, ids: tuple[int, ...]) -> TraceRun:
    """Run the model over the token ids with the trace on (cached per model and input)."""
    loaded = load_model(source, device, dtype)
    start = time.perf_counter()
    # Refused up front when this length (with the analyses the pages run on it) cannot fit in free memory.
    with (
        limits.model_run(loaded.model, len(ids), f"tracing {len(ids):,} tokens", trace=True, analyses=limits.ANALYSES),
        torch.inference_mode(),
    ):
        _, trace = loaded.model(torch.tensor([ids], device=loaded.model.device), trace=True)
    return TraceRun(trace=trace, seconds=time.perf_counter() - start)


@st.cache_resource(show_spinner="Reading the held-out haystack…")
def heldout_haystack() -> np.ndarray:
    """Byte tokens of the held-out standard-library files (text the shipped models never trained on)."""
    return niah.load_haystack(niah.HELDOUT)


def _ids_tensor(loaded: LoadedModel, ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([ids], device=loaded.model.device)


def trace_npz(source: str, device: str, dtype: str, ids: tuple[int, ...]) -> bytes:
    """The cached trace of ids as .npz bytes (for the download button)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.npz"
        trace_ids(source, device, dtype, ids).trace.save(path)
        return path.read_bytes()


@st.cache_resource(max_entries=4, show_spinner=False)
def layer_inputs(source: str, device: str, dtype: str, ids: tuple[int, ...], layer: int) -> AttentionInputs:
    """One layer's projections of ids, shared read-only by the analyses of that layer (on the model's device)."""
    loaded = load_model(source, device, dtype)
    with limits.oom_guard(f"projecting layer {layer}", device=loaded.model.device), torch.inference_mode():
        return analysis.layer_inputs(loaded.model, _ids_tensor(loaded, ids), layer)


@st.cache_data(max_entries=64, show_spinner=False)
def selection_map(
    source: str,
    device: str,
    dtype: str,
    ids: tuple[int, ...],
    layer: int,
    kv_head: int,
    region: tuple[int, int, int, int] | None,
    grid: int,
) -> analysis.PooledMap:
    """How often each key block was chosen per query bin (layer, KV head), in at most grid x grid cells."""
    trace = trace_ids(source, device, dtype, ids).trace
    return analysis.pooled_selection_map(trace, layer=layer, kv_head=kv_head, grid=grid, region=region)


@st.cache_data(max_entries=64, show_spinner=False)
def dense_map(
    source: str,
    device: str,
    dtype: str,
    ids: tuple[int, ...],
    layer: int,
    head: int,
    region: tuple[int, int, int, int] | None,
    grid: int,
) -> analysis.PooledMap:
    """Dense attention mass of one query head in at most grid x grid cells, with the part NSA covered."""
    loaded = load_model(source, device, dtype)
    trace = trace_ids(source, device, dtype, ids).trace
    inputs = layer_inputs(source, device, dtype, ids, layer)
    with (
        limits.oom_guard(f"pooling the dense map of layer {layer}", device=loaded.model.device),
        torch.inference_mode(),
    ):
        return analysis.pooled_dense_map(
            loaded.model,
            _ids_tensor(loaded, ids),
            layer=layer,
            head=head,
            grid=grid,
            region=region,
            trace=trace,
            inputs=inputs,
        )


@st.cache_data(max_entries=16, show_spinner=False)
def layer_recall(
    source: str, device: str, dtype: str, ids: tuple[int, ...], layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """(dense-mass recall [T, HQ], overlap with the oracle top-n [T, H]) of one layer."""
    loaded = load_model(source, device, dtype)
    trace = trace_ids(source, device, dtype, ids).trace
    inputs = layer_inputs(source, device, dtype, ids, layer)
    ids_t = _ids_tensor(loaded, ids)
    with limits.oom_guard(f"computing the recall of layer {layer}", device=loaded.model.device), torch.inference_mode():
        recall = analysis.dense_recall(loaded.model, ids_t, trace, layer=layer, inputs=inputs)
        oracle = analysis.oracle_overlap(loaded.model, ids_t, trace, layer=layer, inputs=inputs)
    return recall, oracle


@st.cache_data(max_entries=64, show_spinner=False)
def query_detail(
    source: str, device: str, dtype: str, ids: tuple[int, ...], layer: int, query: int
) -> analysis.QueryDetail:
    """Everything one query of one layer saw, for every head."""
    loaded = load_model(source, device, dtype)
    inputs = layer_inputs(source, device, dtype, ids, layer)
    with limits.oom_guard(f"inspecting query {query}", device=loaded.model.device), torch.inference_mode():
        return analysis.query_detail(loaded.model, _ids_tensor(loaded, ids), layer=layer, query=query, inputs=inputs)


def find_phrase(ids: tuple[int, ...], phrase: str) -> tuple[int, int] | None:
    """Inclusive token range of the first occurrence of phrase in ids (byte tokens), or None."""
    needle = tokenizer.encode(phrase)
    if not needle:
        return None
    at = bytes(i if i < 256 else 0 for i in ids).find(bytes(needle))
    return None if at < 0 else (at, at + len(needle) - 1)


@st.cache_data(max_entries=32, show_spinner=False)
def gate_stats(
    source: str, device: str, dtype: str, ids: tuple[int, ...], layer: int, token_range: tuple[int, int] | None
) -> analysis.GateStats:
    trace = trace_ids(source, device, dtype, ids).trace
    return analysis.gate_stats(trace, layer=layer, token_range=token_range)


@st.cache_data(max_entries=64, show_spinner=False)
def generate_answer(source: str, device: str, dtype: str, ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ids (stops at <eos>), cached per model and prompt."""
    loaded = load_model(source, device, dtype)
    with (
        limits.model_run(loaded.model, len(ids) + max_new_tokens, f"generating after {len(ids):,} tokens"),
        torch.inference_mode(),
    ):
        out = loaded.model.generate(_ids_tensor(loaded, ids), max_new_tokens=max_new_tokens, stop_token=tokenizer.EOS)
    return out[0].tolist()


@st.cache_data(max_entries=32, show_spinner=False)
def needle_selection(
    source: str, device: str, dtype: str, ids: tuple[int, ...], needle_span: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """At the last query (where the answer starts), per layer and KV head: was a block holding the needle
    chosen (hit [L, H] bool), and the best rank of such a block by importance (rank [L, H], 0 = first,
    -1 where the group cast no vote: QueryDetail.voted)."""
    trace = trace_ids(source, device, dtype, ids).trace
    c = trace.config
    query = len(ids) - 1
    needle_blocks = np.arange(needle_span[0] // c.slc_block, needle_span[1] // c.slc_block + 1)
    rank = np.zeros((c.n_layer, c.n_kv_head), dtype=np.int64)
    for layer in range(c.n_layer):
        detail = query_detail(source, device, dtype, ids, layer, query)
        for h in range(c.n_kv_head):
            rank[layer, h] = detail.importance_rank(h, needle_blocks)
    return niah.chosen_at_answer(trace, needle_span), rank
