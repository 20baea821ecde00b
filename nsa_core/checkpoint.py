"""Checkpoints: save and load an NSALM as safetensors, strictly, and never through pickle.

A checkpoint is either a directory

    config.json         NSAConfig as JSON (model_type, format_version, every hyperparameter)
    model.safetensors   the weights; its metadata carries the config too, so it also loads alone
    README.md           the model card
    metrics.json        evaluation numbers ({} when there are none)

or a single `.safetensors` file whose metadata holds the config (what a browser upload carries).

Loading treats every file as hostile. The safetensors layout (an 8-byte little-endian header length
N, N bytes of JSON `{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`, then the raw
little-endian tensor bytes) is parsed here, not by a library, so that every size is bounded before
anything is allocated:
- N is capped and must fit in the file; the header is UTF-8 JSON with no duplicate keys;
- dtypes are on an allow-list; each tensor's byte range has exactly the size its shape needs, and the
  ranges tile the data section with no overlap, gap or trailing byte (a truncated file fails here);
- the config is validated, the model it describes is built on the meta device (no memory), and
  every tensor is checked against it (names, shapes, one common dtype) before a weight is read;
- weights are read straight into their tensors, then NaN and inf values are reported.
Pickle is never involved: torch.load is not called, and a pickle or a zip archive (torch.save's
format) is recognised by its magic bytes and named in the error. Every problem is a CheckpointError
that names the file and, for a tensor, its name and the expected and found shape or dtype.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch

from .config import ConfigError, NSAConfig
from .model import NSALM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
SUFFIX = ".safetensors"
# The key of the safetensors metadata (a str -> str map) that holds the config JSON.
CONFIG_METADATA_KEY = "nsa_config"

# Headers of real checkpoints are a few KB (about 100 bytes per tensor); 8 MiB leaves room for
# tens of thousands of tensors while bounding what a lying length field can make us read.
MAX_HEADER_BYTES = 8 << 20
# config.json, metrics.json and README.md are small text files.
MAX_TEXT_BYTES = 1 << 20
MAX_NDIM = 8
# Safetensors dtype names the model can hold, with their torch dtype and size in bytes.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
_LOAD_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# Suffixes of pickle-based PyTorch checkpoints, refused by name before the file is opened.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar", ".zip")
# Problems listed in one error message before the rest are only counted.
_MAX_LISTED = 12
# Paper symbols of the config fields, for model cards (the table in config.py's docstring).
_PAPER_SYMBOLS = {"cmp_block": "l", "cmp_stride": "d", "slc_block": "l'", "top_n": "n", "window": "w",
                  "cmp_fn": "phi", "n_head": "h", "n_kv_head": "g"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded; the message says what, in which file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; start and end are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]  # in header order
    metadata: dict[str, str]


# Saving ---------------------------------------------------------------------------------------


def save_single_file(model: NSALM, path: str | os.PathLike) -> Path:
    """Write model's weights to one .safetensors file with the config JSON in its metadata."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path}: a single-file checkpoint must end with {SUFFIX}")
    state = _state_to_save(model, path)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: model.config.to_json()}
    data = safetensors.torch.save(state, metadata=metadata)
    _write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def save_pretrained(model: NSALM, path: str | os.PathLike, *, metrics: dict[str, Any] | None = None,
                    card: str | None = None) -> Path:
    """Write a checkpoint directory (config.json, model.safetensors, README.md, metrics.json).

    card is the model card's Markdown; None writes a minimal one from the config and metrics.
    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{directory}: metrics must be a dict, got {type(metrics).__name__}")
    try:
        metrics_json = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / METRICS_FILE}: metrics are not plain JSON: {err}") from None
    if card is None:
        card = model_card(model, title=directory.resolve().name, metrics=metrics)
    directory.mkdir(parents=True, exist_ok=True)
    save_single_file(model, directory / WEIGHTS_FILE)
    _write_text(directory / CONFIG_FILE, model.config.to_json())
    _write_text(directory / METRICS_FILE, metrics_json)
    _write_text(directory / CARD_FILE, card)
    return directory


def model_card(model: NSALM, *, title: str, description: str | None = None,
               metrics: dict[str, Any] | None = None) -> str:
    """A Markdown model card: description, size, the config with paper symbols, the metrics."""
    config = model.config
    lines = [f"# {title}", ""]
    lines += [description or "An NSALM checkpoint: a byte-level language model with "
              f"{'Native Sparse Attention' if config.attention == 'nsa' else 'dense attention'} in every layer.", ""]
    lines += [f"- parameters: {model.num_parameters():,}", f"- weights: {str(model.dtype).removeprefix('torch.')}",
              f"- files: {CONFIG_FILE}, {WEIGHTS_FILE}, {METRICS_FILE}, {CARD_FILE}", ""]
    lines += ["## Configuration", "", "| field | paper | value |", "|---|---|---|"]
    for key, value in config.to_dict().items():
        lines.append(f"| `{key}` | {_PAPER_SYMBOLS.get(key, '')} | {value} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def _state_to_save(model: NSALM, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(model, NSALM):
        raise CheckpointError(f"{path}: only an NSALM can be saved, got {type(model).__name__}")
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, "
                                  f"not one of {sorted(_LOAD_DTYPES)}")
        state[name] = tensor.detach().to("cpu").contiguous()
    # A checkpoint that load_pretrained would refuse is not written in the first place.
    problems = _non_finite(state)
    if problems:
        raise CheckpointError(f"{path}: refusing to save non-finite weights: {_join(problems)}")
    return state


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Run write(temporary path) next to path, then rename it over path."""
    # A fresh hidden name in the same directory (so the rename is atomic), created with the usual
    # permissions (tempfile.mkstemp would make it private to its owner).
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# Loading --------------------------------------------------------------------------------------


def load_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None) -> NSALM:
    """The NSALM of a checkpoint directory or single .safetensors file, in eval mode.

    dtype None keeps the stored dtype; otherwise one of float32, float16, bfloat16, float64.
    Raises CheckpointError for every problem with the files (see the module docstring).
    """
    target_dtype = _as_dtype(dtype)
    path = Path(path)
    weights, config_file = _checkpoint_files(path)
    with _open_regular(weights) as f:
        header = _read_header(f, weights)
        config = _config_from_metadata(weights, header.metadata, required=config_file is None)
        if config_file is not None:
            dir_config = _read_config_file(config_file)
            if config is not None and config != dir_config:
                raise CheckpointError(f"{weights}: the config in its metadata differs from {config_file} in "
                                      f"{_config_diff(dir_config, config)}")
            config = dir_config
        model = _meta_model(weights, config, header)
        _check_tensors(weights, header, model.state_dict())
        state = _read_tensors(f, weights, header)
    problems = _non_finite(state)
    if problems:
        raise CheckpointError(f"{weights}: non-finite weights: {_join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    if target_dtype is None:
        return model.to(device=device).eval()
    model = model.to(device=device, dtype=target_dtype)
    # Values beyond float16's range (65504) become inf in the conversion.
    problems = _non_finite(model.state_dict())
    if problems:
        raise CheckpointError(f"{weights}: weights overflow {str(target_dtype).removeprefix('torch.')}: "
                              f"{_join(problems)}")
    return model.eval()


def read_config(path: str | os.PathLike) -> NSAConfig:
    """The NSAConfig of a checkpoint directory (config.json) or single file (its metadata); no weights read."""
    path = Path(path)
    weights, config_file = _checkpoint_files(path)
    if config_file is not None:
        return _read_config_file(config_file)
    with _open_regular(weights) as f:
        return _config_from_metadata(weights, _read_header(f, weights).metadata, required=True)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The validated header of a .safetensors file (names, dtypes, shapes, metadata); no weights read."""
    path = Path(path)
    _refuse_pickle_suffix(path)
    with _open_regular(path) as f:
        return _read_header(f, path)


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a checkpoint directory; {} for a single file or a directory without one."""
    file = Path(path) / METRICS_FILE
    if not Path(path).is_dir() or not file.exists():
        return {}
    text = _read_small_text(file)
    try:
        metrics = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, got {type(metrics).__name__}")
    return metrics


def read_card(path: str | os.PathLike) -> str:
    """The model card (README.md) of a checkpoint directory; "" for a single file or when absent."""
    file = Path(path) / CARD_FILE
    if not Path(path).is_dir() or not file.exists():
        return ""
    return _read_small_text(file)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES):
        return dtype
    if isinstance(dtype, str) and dtype in _LOAD_DTYPES:
        return _LOAD_DTYPES[dtype]
    raise ValueError(f"dtype must be None or one of {sorted(_LOAD_DTYPES)}, got {dtype!r}")


def _checkpoint_files(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a checkpoint directory or single file."""
    if path.is_dir():
        weights, config_file = path / WEIGHTS_FILE, path / CONFIG_FILE
        for file in (config_file, weights):
            if not file.exists():
                raise CheckpointError(f"{path}: a checkpoint directory needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                                      f"{file.name} is missing")
        return weights, config_file
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    _refuse_pickle_suffix(path)
    if path.suffix.lower() != SUFFIX:
        raise CheckpointError(f"{path}: a checkpoint is a directory or a {SUFFIX} file, got {path.suffix or 'no'} "
                              "suffix")
    return path, None


def _refuse_pickle_suffix(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: {path.suffix} files are pickle-based PyTorch checkpoints, which can run "
                              f"code when loaded; only {SUFFIX} files are read (convert it with "
                              "safetensors.torch.save_file where you trust its origin)")


def _open_regular(path: Path) -> BinaryIO:
    """path opened for reading, refusing devices, FIFOs and sockets (which could block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is not a regular file")
    try:
        return open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror}") from None


def _read_small_text(path: Path) -> str:
    with _open_regular(path) as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise CheckpointError(f"{path}: larger than the {MAX_TEXT_BYTES} bytes allowed for this file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_config_file(path: Path) -> NSAConfig:
    try:
        return NSAConfig.from_json(_read_small_text(path))
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _config_from_metadata(weights: Path, metadata: dict[str, str], *, required: bool) -> NSAConfig | None:
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        if required:
            raise CheckpointError(f"{weights}: its metadata holds no NSA config (key {CONFIG_METADATA_KEY!r}); "
                                  "a single-file checkpoint is written by save_single_file")
        return None
    try:
        return NSAConfig.from_json(text)
    except ConfigError as err:
        raise CheckpointError(f"{weights}: the config in its metadata is invalid: {err}") from None


def _config_diff(a: NSAConfig, b: NSAConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{key} ({da[key]!r} vs {db[key]!r})" for key in da if da[key] != db[key])


# The safetensors header ---------------------------------------------------------------------


def _read_header(f: BinaryIO, path: Path) -> SafetensorsHeader:
    """Parse and validate the header of the open file f, reading at most MAX_HEADER_BYTES."""
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated: {file_size} bytes, but a safetensors file starts with an "
                              f"8-byte header length{_foreign_format(prefix)}")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES or n + 8 > file_size:
        raise CheckpointError(f"{path}: not a valid safetensors file: its header length field says {n} bytes, but "
                              f"the file has {file_size} bytes and a header may have at most {MAX_HEADER_BYTES}"
                              f"{_foreign_format(prefix)}")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated while reading its {n}-byte header")
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: not a valid safetensors file: the header is not a JSON object"
                              f"{_foreign_format(prefix)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: the header is not UTF-8 ({err.reason} at byte {8 + err.start})") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: the header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    entries = {name: _entry(path, name, info, data_start, data_size) for name, info in header.items()}
    _check_tiling(path, entries, data_start, data_size)
    return SafetensorsHeader(entries=entries, metadata=metadata)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
        raise ValueError(f"duplicate key(s) {duplicates[:_MAX_LISTED]}")
    return dict(pairs)


def _foreign_format(prefix: bytes) -> str:
    """A hint naming the format of a file that failed to parse as safetensors, from its first bytes."""
    if prefix.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return " (it is a zip archive, the format torch.save writes: refused, only safetensors are read)"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return " (it is a Python pickle, which can run code when loaded: refused, only safetensors are read)"
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    """One header entry, checked on its own: keys, dtype, shape, and a byte range that fits its shape."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        found = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{where}: a header entry needs exactly dtype, shape and data_offsets, got {found}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not allowed (allowed: {sorted(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers, "
                              f"got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"got {offsets!r:.200}")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(f"{where}: its bytes {begin}..{end} lie beyond the {data_size} bytes of data the "
                              "file holds (truncated, or a header that lies about sizes)")
    needed = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != needed:
        raise CheckpointError(f"{where}: shape {shape} of dtype {dtype} needs {needed} bytes, but its "
                              f"data_offsets span {end - begin}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end)


def _check_tiling(path: Path, entries: dict[str, TensorEntry], data_start: int, data_size: int) -> None:
    """The tensors' byte ranges must cover the data section exactly: no overlap, no gap, no trailing byte."""
    position, previous = data_start, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise CheckpointError(f"{path}: tensors {previous!r} and {entry.name!r} overlap in the file")
        if entry.start > position:
            raise CheckpointError(f"{path}: bytes {position - data_start}..{entry.start - data_start} of the data "
                                  "belong to no tensor")
        position, previous = entry.end, entry.name
    if position != data_start + data_size:
        raise CheckpointError(f"{path}: {data_start + data_size - position} bytes follow the last tensor's data")


# Checking against the model and reading weights -----------------------------------------------


def _meta_model(path: Path, config: NSAConfig, header: SafetensorsHeader) -> NSALM:
    """The model config describes, built on the meta device: shapes without memory."""
    # Building costs time per layer even on the meta device; a config that promises more layers than
    # the file has tensors cannot match, so it is refused before it is built.
    if config.n_layer > len(header.entries):
        raise CheckpointError(f"{path}: the config has n_layer={config.n_layer}, but the file holds only "
                              f"{len(header.entries)} tensors")
    try:
        with torch.device("meta"):
            return NSALM(config)
    except (RuntimeError, ValueError, OverflowError, TypeError) as err:  # sizes beyond int64, for instance
        raise CheckpointError(f"{path}: the config describes a model that cannot be built: {err}") from None


def _check_tensors(path: Path, header: SafetensorsHeader, expected: dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes of the header against the model's state dict; one message lists all problems."""
    entries = header.entries
    problems = [f"missing tensor {name} (shape {list(t.shape)})" for name, t in expected.items() if name not in entries]
    problems += [f"unexpected tensor {name}" for name in entries if name not in expected]
    for name, t in expected.items():
        if name in entries and entries[name].shape != tuple(t.shape):
            problems.append(f"tensor {name}: expected shape {list(t.shape)}, found {list(entries[name].shape)}")
    # Any allowed float dtype may be stored, but one for the whole model (the model has one dtype).
    common = Counter(e.dtype for e in entries.values()).most_common(1)
    if common:
        problems += [f"tensor {e.name}: expected dtype {common[0][0]} like the other tensors, found {e.dtype}"
                     for e in entries.values() if e.dtype != common[0][0]]
    if problems:
        raise CheckpointError(f"{path}: does not match the model its config describes: {_join(problems)}")


def _read_tensors(f: BinaryIO, path: Path, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Read each tensor's bytes straight into a tensor of its (already validated) dtype and shape."""
    state = {}
    for entry in header.entries.values():
        tensor = torch.empty(entry.shape, dtype=DTYPES[entry.dtype][0])
        if tensor.numel():
            f.seek(entry.start)
            # Safetensors bytes are little-endian, as on every platform PyTorch supports here.
            received = f.readinto(tensor.view(-1).view(torch.uint8).numpy())
            if received != entry.end - entry.start:
                raise CheckpointError(f"{path}: truncated while reading tensor {entry.name} (the file changed?)")
        state[entry.name] = tensor
    return state


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for name, tensor in state.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            inf = tensor.numel() - int(finite.sum()) - nan
            problems.append(f"tensor {name} holds {nan} NaN and {inf} inf values")
    return problems


def _join(problems: list[str]) -> str:
    listed = "; ".join(problems[:_MAX_LISTED])
    rest = len(problems) - _MAX_LISTED
    return listed + (f"; and {rest} more" if rest > 0 else "")
