"""Checkpoints: bit-exact round trips, strict loading with a clear error for every bad file, no pickle ever,
and the shipped sample models."""

import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nsa_core import sample_models, tokenizer
from nsa_core.checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    load_pretrained,
    read_card,
    read_config,
    read_header,
    read_metrics,
    save_pretrained,
    save_single_file,
)
from nsa_core.config import NSAConfig
from nsa_core.model import NSALM

TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "head_dim": 16, "v_head_dim": 16,
        "mlp_hidden": 64, "cmp_mlp_hidden": 16}


def tiny_model(**changes) -> NSALM:
    """A one-layer model whose every tensor holds distinct random values (so bit-exactness means something)."""
    model = NSALM(NSAConfig(**{**TINY, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def assert_same_weights(a: NSALM, b: NSALM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def split(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes, *, length: int | None = None) -> Path:
    """A safetensors file with the given header and data; length overrides the header-length field."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def save_state(path: Path, state: dict[str, torch.Tensor], config: NSAConfig) -> Path:
    """A single-file checkpoint of an arbitrary state dict, written by the safetensors library itself."""
    safetensors.torch.save_file(state, path, metadata={CONFIG_METADATA_KEY: config.to_json()})
    return path


def refused(path: Path, *fragments: str) -> str:
    """Load path, expect CheckpointError naming the file and every fragment; return the message."""
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# Round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("changes", [{}, {"kv_mode": "independent", "cmp_fn": "mean"}, {"attention": "dense"}],
                         ids=["nsa", "nsa-independent-mean", "dense"])
def test_directory_round_trip_is_bit_exact(tmp_path, changes, dtype):
    model = tiny_model(**changes).to(dtype)
    directory = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "metrics.json",
                                                           "model.safetensors"]
    loaded = load_pretrained(directory)
    assert not loaded.training
    assert loaded.config == model.config == read_config(directory)
    assert_same_weights(model, loaded)
    ids = torch.randint(0, 256, (1, 70))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_single_file_round_trip_is_bit_exact(tmp_path):
    model = tiny_model()
    path = save_single_file(model, tmp_path / "model.safetensors")
    loaded = load_pretrained(path)
    assert read_config(path) == model.config
    assert_same_weights(model, loaded)
    assert read_metrics(path) == {} and read_card(path) == ""
    header = read_header(path)
    assert set(header.entries) == set(model.state_dict())
    assert header.entries["embed.weight"].shape == (260, 32)


def test_weights_file_of_a_directory_loads_alone(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt")
    assert_same_weights(model, load_pretrained(tmp_path / "ckpt" / "model.safetensors"))


def test_load_converts_dtype(tmp_path):
    model = tiny_model()
    path = save_single_file(model, tmp_path / "m.safetensors")
    for dtype in ("bfloat16", torch.float16):
        loaded = load_pretrained(path, device="cpu", dtype=dtype)
        assert loaded.dtype == (torch.bfloat16 if dtype == "bfloat16" else dtype)
        assert torch.equal(loaded.embed.weight, model.embed.weight.to(loaded.dtype))
    with pytest.raises(ValueError, match="dtype must be"):
        load_pretrained(path, dtype="int8")


def test_weights_beyond_the_target_dtype_range_are_reported(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e5
    path = save_single_file(model, tmp_path / "m.safetensors")
    assert load_pretrained(path, dtype=torch.bfloat16).lm_head.weight[0, 0] > 9e4  # bfloat16 has the range
    with pytest.raises(CheckpointError, match="weights overflow float16: tensor lm_head.weight holds 0 NaN and 1 inf"):
        load_pretrained(path, dtype=torch.float16)


def test_metrics_and_model_card(tmp_path):
    model = tiny_model()
    metrics = {"loss": 1.25, "steps": 100}
    save_pretrained(model, tmp_path / "a", metrics=metrics, card="# my card\n")
    assert read_metrics(tmp_path / "a") == metrics
    assert read_card(tmp_path / "a") == "# my card\n"
    save_pretrained(model, tmp_path / "b")
    assert read_metrics(tmp_path / "b") == {}
    card = read_card(tmp_path / "b")
    assert card.startswith("# b\n") and f"{model.num_parameters():,}" in card and "| `slc_block` | l' | 64 |" in card
    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_pretrained(model, tmp_path / "c", metrics={"loss": float("nan")})
    assert not (tmp_path / "c").exists()


def test_saving_refuses_what_loading_would_refuse(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[3] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to save non-finite weights: tensor norm.weight holds 0 NaN"):
        save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="must end with .safetensors"):
        save_single_file(tiny_model(), tmp_path / "model.pt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_pretrained(tiny_model(), tmp_path / "file")
    with pytest.raises(CheckpointError, match="only an NSALM"):
        save_single_file(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


# Strict loading: every problem named --------------------------------------------------------


def test_non_finite_weights_are_reported_at_load(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state["layers.0.mlp.up.weight"][0, :2] = float("nan")
    state["layers.0.mlp.up.weight"][1, 0] = float("-inf")
    path = save_state(tmp_path / "m.safetensors", state, model.config)
    refused(path, "non-finite", "tensor layers.0.mlp.up.weight holds 2 NaN and 1 inf values")


@pytest.mark.parametrize("where", ["empty", "mid-length", "length-only", "mid-header", "header-only", "mid-data",
                                   "last-byte"])
def test_truncated_file_is_refused(tmp_path, where):
    good = save_single_file(tiny_model(), tmp_path / "good.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    cut = {"empty": 0, "mid-length": 4, "length-only": 8, "mid-header": 8 + n // 2, "header-only": 8 + n,
           "mid-data": (8 + n + len(good)) // 2, "last-byte": len(good) - 1}[where]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good[:cut])
    message = refused(path)
    assert "truncated" in message or "header length field" in message


def lying(header: dict, data: bytes, case: str) -> tuple[dict, bytes, int | None, str]:
    """(header, data, header-length override, expected message fragment) of one lying-header case."""
    # The first two tensors in file order: entry's bytes end where the next tensor's begin.
    first, second = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])[:2]
    entry = header[first]
    if case == "length-beyond-file":
        return header, data, 10**6, "header length field says 1000000 bytes"
    if case == "length-huge":
        return header, data, 2**64 - 1, "a header may have at most"
    if case == "shape-bigger-than-range":
        entry["shape"] = [2**40]
        return header, data, None, "needs 4398046511104 bytes"
    if case == "range-beyond-file":
        entry["shape"], entry["data_offsets"] = [2**40], [0, 2**42]
        return header, data, None, "beyond the"
    if case == "overlap":
        # One element longer, so that it runs 4 bytes into the next tensor.
        begin, end = entry["data_offsets"]
        entry["shape"], entry["data_offsets"] = [(end - begin) // 4 + 1], [begin, end + 4]
        return header, data, None, f"tensors {first!r} and {second!r} overlap"
    if case == "trailing-bytes":
        return header, data + b"\0" * 16, None, "16 bytes follow the last tensor"
    if case == "negative-offset":
        entry["data_offsets"] = [-4, entry["data_offsets"][1]]
        return header, data, None, "data_offsets must be"
    if case == "float-shape":
        entry["shape"] = [float(s) for s in entry["shape"]]
        return header, data, None, "shape must be a list"
    if case == "dtype-not-allowed":
        entry["dtype"] = "I32"
        return header, data, None, "dtype 'I32' is not allowed"
    if case == "extra-key":
        entry["offsets"] = [0, 0]
        return header, data, None, "needs exactly dtype, shape and data_offsets"
    if case == "metadata-not-strings":
        header["__metadata__"]["format"] = 1
        return header, data, None, "__metadata__ must map strings to strings"
    raise AssertionError(case)


LYING_CASES = ["length-beyond-file", "length-huge", "shape-bigger-than-range", "range-beyond-file", "overlap",
               "trailing-bytes", "negative-offset", "float-shape", "dtype-not-allowed", "extra-key",
               "metadata-not-strings"]


@pytest.mark.parametrize("case", LYING_CASES)
def test_header_lying_about_sizes_is_refused(tmp_path, case):
    header, data = split(save_single_file(tiny_model(), tmp_path / "good.safetensors"))
    header, data, length, fragment = lying(header, data, case)
    refused(write_raw(tmp_path / "bad.safetensors", header, data, length=length), fragment)


def test_malformed_header_json_is_refused(tmp_path):
    header, data = split(save_single_file(tiny_model(), tmp_path / "good.safetensors"))
    body = json.dumps(header).encode()
    name = next(iter(header))
    duplicated = body[:-1] + b", " + json.dumps(name).encode() + b": " + json.dumps(header[name]).encode() + b"}"
    refused(write_raw(tmp_path / "dup.safetensors", duplicated, data), "duplicate key")
    refused(write_raw(tmp_path / "list.safetensors", b"[1, 2]", b""), "not a JSON object")
    refused(write_raw(tmp_path / "utf.safetensors", b'{"\xff": 1}', b""), "not UTF-8")
    refused(write_raw(tmp_path / "json.safetensors", b"{" * 10 + b"}", b""), "not valid JSON")
    refused(write_raw(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
            "not valid JSON")


def test_missing_and_extra_tensors_are_named(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    del state["layers.0.mlp.up.weight"]
    state["layers.0.attn.extra"] = torch.zeros(3)
    path = save_state(tmp_path / "m.safetensors", state, model.config)
    refused(path, "missing tensor layers.0.mlp.up.weight (shape [64, 32])", "unexpected tensor layers.0.attn.extra")


def test_wrong_shape_names_tensor_expected_and_found(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state["layers.0.mlp.gate.weight"] = state["layers.0.mlp.gate.weight"].T.contiguous()
    path = save_state(tmp_path / "m.safetensors", state, model.config)
    refused(path, "tensor layers.0.mlp.gate.weight: expected shape [64, 32], found [32, 64]")


def test_config_that_does_not_match_the_weights(tmp_path):
    model = tiny_model()
    path = save_state(tmp_path / "m.safetensors", model.state_dict(), model.config.replace(mlp_hidden=48))
    refused(path, "does not match the model its config describes",
            "tensor layers.0.mlp.up.weight: expected shape [48, 32], found [64, 32]")


@pytest.mark.timeout(10)
def test_config_promising_a_million_layers_is_refused_before_building(tmp_path):
    # Building a million layers, even on the meta device, would take minutes: the file's tensor count bounds it.
    model = tiny_model()
    path = save_state(tmp_path / "deep.safetensors", model.state_dict(), model.config.replace(n_layer=10**6))
    refused(path, "n_layer=1000000", "holds only")


def test_mixed_dtypes_are_refused(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    state["norm.weight"] = state["norm.weight"].half()
    refused(save_state(tmp_path / "m.safetensors", state, model.config),
            "tensor norm.weight: expected dtype F32 like the other tensors, found F16")


def test_unknown_or_invalid_config_is_refused(tmp_path):
    model = tiny_model()
    directory = save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "rope_scaling": 2.0}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown config key\(s\) \['rope_scaling'\]"):
        load_pretrained(directory)
    with pytest.raises(CheckpointError, match="rope_scaling"):
        read_config(directory)
    (directory / "config.json").write_text(json.dumps({**config, "slc_block": 40}))
    with pytest.raises(CheckpointError, match=r"config\.json: slc_block l' \(40\) must be a multiple of cmp_stride"):
        load_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: config is not valid JSON"):
        load_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({**config, "norm_eps": 1e-6}))
    with pytest.raises(CheckpointError, match=r"differs from .*config\.json in norm_eps \(1e-06 vs 1e-05\)"):
        load_pretrained(directory)

    bad = {**config, "rope_scaling": 2.0}
    path = tmp_path / "single.safetensors"
    safetensors.torch.save_file(model.state_dict(), path, metadata={CONFIG_METADATA_KEY: json.dumps(bad)})
    refused(path, "the config in its metadata is invalid", "rope_scaling")
    safetensors.torch.save_file(model.state_dict(), path, metadata={"format": "pt"})
    refused(path, "holds no NSA config")


def test_missing_files_and_odd_paths_are_refused(tmp_path):
    refused(tmp_path / "nothing.safetensors", "no such file")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "config.json is missing")
    save_pretrained(tiny_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    refused(tmp_path / "ckpt", "model.safetensors is missing")
    (tmp_path / "weights.npz").write_bytes(b"\0" * 64)
    refused(tmp_path / "weights.npz", "a directory or a .safetensors file")


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


# Pickle is never read -------------------------------------------------------------------------


class CreatesFileWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): the marker file proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_zip_and_pt_files_are_refused_and_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    payload = {"embed.weight": CreatesFileWhenUnpickled(marker)}
    torch.save(payload, tmp_path / "zip.bin")
    zipped = (tmp_path / "zip.bin").read_bytes()
    assert zipped.startswith(b"PK\x03\x04")
    pickled = pickle.dumps(payload, protocol=4)
    files = {
        "model.pt": zipped, "model.pth": pickled, "model.pkl": pickled,
        "zip.safetensors": zipped, "pickle.safetensors": pickled,
        "pickle0.safetensors": pickle.dumps(payload, protocol=0),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    directory = save_pretrained(tiny_model(), tmp_path / "ckpt")
    (directory / "model.safetensors").write_bytes(zipped)

    def never(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, never)
    refused(tmp_path / "model.pt", "pickle-based PyTorch checkpoints")
    refused(tmp_path / "model.pth", "pickle-based")
    refused(tmp_path / "model.pkl", "pickle-based")
    refused(tmp_path / "zip.safetensors", "zip archive, the format torch.save writes")
    refused(tmp_path / "pickle.safetensors", "Python pickle")
    refused(tmp_path / "pickle0.safetensors", "not a valid safetensors file")
    refused(directory / "model.safetensors", "zip archive")
    with pytest.raises(CheckpointError, match="zip archive"):
        load_pretrained(directory)
    with pytest.raises(CheckpointError, match="pickle-based"):
        read_config(tmp_path / "model.pt")
    monkeypatch.undo()
    assert not marker.exists()

    # The payloads are live: unpickling them does create the marker.
    pickle.loads(pickled)
    assert marker.exists()
    marker.unlink()
    torch.load(tmp_path / "model.pt", weights_only=False)
    assert marker.exists()


# Shipped sample models ------------------------------------------------------------------------


def test_shipped_checkpoints_load_strictly():
    shipped = sample_models.list_sample_models()
    assert "nsa-random" in [d.name for d in shipped]
    ids = torch.tensor([tokenizer.encode("Native sparse attention, shipped.", bos=True)])
    for directory in shipped:
        model = load_pretrained(directory)
        assert model.config == read_config(directory)
        assert read_card(directory).startswith(f"# {directory.name}")
        assert isinstance(read_metrics(directory), dict)
        with torch.no_grad():
            assert torch.isfinite(model(ids)).all()


def test_nsa_random_is_what_its_documented_command_writes(tmp_path):
    shipped = sample_models.sample_model("nsa-random")
    assert "python -m nsa_core.sample_models --make-random" in read_card(shipped)
    rebuilt = sample_models.make_random(tmp_path / "nsa-random")
    model = load_pretrained(shipped)
    assert_same_weights(model, load_pretrained(rebuilt))
    metrics = read_metrics(shipped)
    # A golden number: the shipped weights under today's model code give the loss recorded when they were made.
    loss = sample_models.eval_loss(model)
    assert abs(loss - metrics["eval_loss_nats_per_byte"]) < 1e-5, (
        f"the model code now gives loss {loss:.6f} on the shipped nsa-random weights, not the recorded "
        f"{metrics['eval_loss_nats_per_byte']}; if the change is intended, rerun the --make-random command")
    assert metrics["trained"] is False and metrics["parameters"] == 988_568
    assert metrics["uniform_loss_nats_per_byte"] == round(math.log(260), 4)
    assert abs(metrics["eval_loss_nats_per_byte"] - math.log(260)) < 0.2  # untrained: near a uniform guess
    config = read_config(shipped)
    assert (config.cmp_block, config.cmp_stride, config.slc_block, config.top_n, config.window) == (32, 16, 64, 16, 512)


def test_sample_model_discovery(tmp_path, monkeypatch):
    assert sample_models.default_sample_model().name in sample_models.DEFAULT_ORDER
    with pytest.raises(FileNotFoundError, match="available: .*nsa-random"):
        sample_models.sample_model("no-such-model")
    monkeypatch.setenv(sample_models.SAMPLE_MODELS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--make-random"):
        sample_models.default_sample_model()
    save_pretrained(tiny_model(), tmp_path / "zeta")
    save_pretrained(tiny_model(), tmp_path / "alpha")
    (tmp_path / "not-a-checkpoint").mkdir()
    assert [d.name for d in sample_models.list_sample_models()] == ["alpha", "zeta"]
    assert sample_models.default_sample_model().name == "alpha"
    save_pretrained(tiny_model(), tmp_path / "nsa-random")
    assert sample_models.default_sample_model().name == "nsa-random"
    save_pretrained(tiny_model(), tmp_path / "nsa-tiny")
    assert sample_models.default_sample_model().name == "nsa-tiny"
