"""Property-based fuzzing of the checkpoint loader: truncated and corrupted files and lying headers.

Every invalid file must end in CheckpointError with a message naming the file, within a second
(hypothesis' deadline), without a large allocation (peak memory is checked after each test).
Corruption that may leave a valid file (a flipped weight byte) must end in CheckpointError or a model.
"""

import json
import os
import resource
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nsa_core.checkpoint import CONFIG_METADATA_KEY, CheckpointError, load_pretrained, save_single_file
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

# CI runs a fixed, deterministic sample; NSA_FUZZ_EXAMPLES=5000 (with NSA_FUZZ_RANDOM=1 for fresh draws)
# runs a longer campaign.
FUZZ = settings(max_examples=int(os.environ.get("NSA_FUZZ_EXAMPLES", "60")), deadline=1000,
                derandomize=not os.environ.get("NSA_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow])
# Peak resident memory may grow this much during one test (the model and file are well under 1 MB).
MAX_PEAK_GROWTH_MB = 200

# Integers around every boundary the parser checks: negatives, zero, int32/int64/uint64 limits, huge.
SIZES = st.one_of(st.integers(-3, 70_000), st.sampled_from([2**31, 2**32, 2**40, 2**53, 2**63 - 1, 2**63, 2**64,
                                                            10**30]))
JSON = st.recursive(
    st.none() | st.booleans() | SIZES | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
DTYPE_NAMES = st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "f32"]) | st.text(
    max_size=5)
ENTRY_LIES = st.one_of(
    st.tuples(st.just("dtype"), DTYPE_NAMES | JSON),
    st.tuples(st.just("shape"), st.lists(SIZES, max_size=9) | JSON),
    st.tuples(st.just("data_offsets"), st.lists(SIZES, max_size=3) | JSON),
    st.tuples(st.just("whole entry"), JSON),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("add"), st.fixed_dictionaries(
        {"dtype": DTYPE_NAMES, "shape": st.lists(SIZES, max_size=3), "data_offsets": st.lists(SIZES, max_size=2)})),
)
# Config fields that change no parameter shape: a checkpoint with other values there still loads.
SHAPELESS_FIELDS = {"rope_theta", "norm_eps", "cmp_stride", "slc_block", "top_n", "init_blocks", "local_blocks",
                    "window"}
CONFIG_VALUES = SIZES | st.floats() | st.booleans() | st.none() | st.text(max_size=6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(work dir, valid file bytes, header length n, header dict) of a tiny single-file checkpoint."""
    directory = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = NSALM(NSAConfig(d_model=16, n_layer=1, n_head=2, n_kv_head=1, head_dim=8, v_head_dim=8, mlp_hidden=32,
                            cmp_mlp_hidden=8, vocab_size=260))
    raw = save_single_file(model, directory / "valid.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return directory, raw, n, json.loads(raw[8:8 + n])


@pytest.fixture(autouse=True)
def bounded_memory():
    """No test may raise the process's peak memory by more than MAX_PEAK_GROWTH_MB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KB
    assert growth_mb < MAX_PEAK_GROWTH_MB, f"peak memory grew by {growth_mb:.0f} MB"


def load_bytes(directory, content: bytes):
    """Write content as a .safetensors file and load it: the model, or the CheckpointError raised."""
    path = directory / "case.safetensors"
    path.write_bytes(content)
    try:
        return load_pretrained(path)
    except CheckpointError as err:
        assert str(err).startswith(str(path)) and len(str(err)) > len(str(path)) + 10, str(err)
        return err


def with_header(header: dict) -> bytes:
    return json.dumps(header).encode()


def test_the_fuzzed_file_is_valid(checkpoint):
    directory, raw, _, _ = checkpoint
    assert isinstance(load_bytes(directory, raw), NSALM)


@FUZZ
@given(cut=st.integers(0, 10**9))
def test_truncated_files_are_refused(checkpoint, cut):
    directory, raw, _, _ = checkpoint
    assert isinstance(load_bytes(directory, raw[:cut % len(raw)]), CheckpointError)


@FUZZ
@given(junk=st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_refused(checkpoint, junk):
    directory, raw, _, _ = checkpoint
    assert isinstance(load_bytes(directory, raw + junk), CheckpointError)


@FUZZ
@given(length=st.integers(0, 2**64 - 1))
def test_lying_header_length_is_refused(checkpoint, length):
    directory, raw, n, _ = checkpoint
    assume(length != n)
    assert isinstance(load_bytes(directory, struct.pack("<Q", length) + raw[8:]), CheckpointError)


@FUZZ
@given(pick=st.integers(0, 10**6), lie=ENTRY_LIES)
def test_lying_tensor_entries_are_refused(checkpoint, pick, lie):
    directory, raw, n, header = checkpoint
    names = sorted(name for name in header if name != "__metadata__")
    name = names[pick % len(names)]
    field, value = lie
    lied = json.loads(json.dumps(header))
    if field == "drop":
        del lied[name]
    elif field == "add":
        lied[f"{name}.extra"] = value
    elif field == "whole entry":
        lied[name] = value
    else:
        lied[name][field] = value
    assume(lied != header)
    assert isinstance(load_bytes(directory, struct.pack("<Q", len(with_header(lied))) + with_header(lied)
                                 + raw[8 + n:]), CheckpointError)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(NSAConfig().to_dict())) | st.text(max_size=8), CONFIG_VALUES,
                               min_size=1, max_size=3))
def test_lying_configs_are_refused(checkpoint, changes):
    """A config that changes any parameter shape is refused; one that only changes NSA's
    hyperparameters (top_n, window, ...) is valid and must then be loaded exactly as written."""
    directory, raw, n, header = checkpoint
    config = json.loads(header["__metadata__"][CONFIG_METADATA_KEY])
    lied_config = {**config, **changes}
    assume(lied_config != config)
    lied = {**header, "__metadata__": {CONFIG_METADATA_KEY: json.dumps(lied_config)}}
    outcome = load_bytes(directory, struct.pack("<Q", len(with_header(lied))) + with_header(lied) + raw[8 + n:])
    if isinstance(outcome, NSALM):
        changed = {key for key in changes if changes[key] != config.get(key)}
        assert changed <= SHAPELESS_FIELDS and outcome.config == NSAConfig.from_dict(lied_config)
    else:
        assert isinstance(outcome, CheckpointError)


@FUZZ
@given(content=st.binary(max_size=512))
def test_random_bytes_are_refused(checkpoint, content):
    directory, _, _, _ = checkpoint
    assert isinstance(load_bytes(directory, content), CheckpointError)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_any_corruption_ends_in_a_checkpoint_error_or_a_model(checkpoint, edits):
    """Anywhere in the file: header length, header JSON (config included) or weights."""
    directory, raw, _, _ = checkpoint
    content = bytearray(raw)
    for position, byte in edits:
        content[position % len(content)] = byte
    outcome = load_bytes(directory, bytes(content))
    assert isinstance(outcome, (CheckpointError, NSALM))
    if isinstance(outcome, NSALM):
        assert all(torch.isfinite(p).all() for p in outcome.parameters())


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_header_bytes_end_in_a_checkpoint_error_or_a_model(checkpoint, edits):
    """The same, aimed at the 8 + n header bytes where a parser can go wrong."""
    directory, raw, n, _ = checkpoint
    content = bytearray(raw)
    for position, byte in edits:
        content[position % (8 + n)] = byte
    assert isinstance(load_bytes(directory, bytes(content)), (CheckpointError, NSALM))
