"""The one configuration of an NSA language model: architecture and NSA hyperparameters.

Paper symbols (arXiv 2502.11089) map to fields once, here:

| paper | field        | meaning                                                           |
|-------|--------------|-------------------------------------------------------------------|
| l     | cmp_block    | tokens per compression window (Eq. 7)                             |
| d     | cmp_stride   | stride between compression windows (d | l)                        |
| l'    | slc_block    | tokens per selection block (Eq. 12, d | l')                       |
| n     | top_n        | selected blocks per query, forced blocks included (Eq. 11)        |
| -     | init_blocks  | leading blocks always selected (paper: 1)                         |
| -     | local_blocks | blocks ending at the query always selected (paper: 2: c and c-1)  |
| w     | window       | sliding-window size in tokens, the query itself included          |
| phi   | cmp_fn       | "mlp" (learned intra-block position encoding + MLP) or "mean"     |
| -     | slc_scores   | "paper" (Eq. 10) or "free": each head's importance renormalised   |
|       |              | over the blocks not forced before the group sum (reference.py)    |
| h, g  | n_head, n_kv_head | query heads HQ and KV heads H; G = HQ // H heads share a group |
| d_k, d_v | head_dim, v_head_dim | query/key and value head dims                        |

Defaults are the paper's NSA configuration on a tiny byte-level model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tokenizer import VOCAB_SIZE

MODEL_TYPE = "nsa_lm"
FORMAT_VERSION = 1

ATTENTION_KINDS = ("nsa", "dense")
CMP_FNS = ("mlp", "mean")
KV_MODES = ("shared", "independent")
SLC_SCORES = ("paper", "free")


class ConfigError(ValueError):
    """A configuration that breaks one of NSA's rules; the message names the rule and the values."""


@dataclass(frozen=True, kw_only=True)
class NSAConfig:
    # Language model.
    vocab_size: int = 260
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 2
    head_dim: int = 32
    v_head_dim: int = 32
    mlp_hidden: int = 704
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "nsa"

    # NSA (paper section 3.3 and 4.1).
    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    top_n: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    cmp_fn: str = "mlp"
    cmp_mlp_hidden: int = 64
    kv_mode: str = "shared"
    slc_scores: str = "paper"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.n_head // self.n_kv_head

    def validate(self) -> None:
        """Raise ConfigError naming the first broken rule and the values that break it."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = float if f.type == "float" else int if f.type == "int" else str
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"{f.name} must be a {expected.__name__}, got {value!r}")
        positive = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "v_head_dim",
                    "mlp_hidden", "cmp_block", "cmp_stride", "slc_block", "top_n", "window", "cmp_mlp_hidden")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < VOCAB_SIZE:
            raise ConfigError(f"vocab_size ({self.vocab_size}) must be >= {VOCAB_SIZE}: the byte tokenizer uses ids "
                              f"0..{VOCAB_SIZE - 1} (256 bytes and the special tokens)")
        for name in ("init_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        # Written so that NaN fails too (a config JSON may hold NaN or Infinity).
        if not (0 < self.rope_theta < float("inf") and 0 < self.norm_eps < float("inf")):
            raise ConfigError(f"rope_theta ({self.rope_theta}) and norm_eps ({self.norm_eps}) must be finite and > 0")
        _one_of("attention", self.attention, ATTENTION_KINDS)
        _one_of("cmp_fn", self.cmp_fn, CMP_FNS)
        _one_of("kv_mode", self.kv_mode, KV_MODES)
        _one_of("slc_scores", self.slc_scores, SLC_SCORES)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dims")
        if self.cmp_block % self.cmp_stride:
            raise ConfigError(f"cmp_block l ({self.cmp_block}) must be a multiple of cmp_stride d ({self.cmp_stride})")
        if self.slc_block % self.cmp_stride:
            raise ConfigError(f"slc_block l' ({self.slc_block}) must be a multiple of cmp_stride d ({self.cmp_stride})")
        if self.top_n < self.init_blocks + self.local_blocks:
            raise ConfigError(
                f"top_n ({self.top_n}) must be >= init_blocks + local_blocks "
                f"({self.init_blocks} + {self.local_blocks}): forced blocks count towards n"
            )

    # JSON round trip --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NSAConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"model_type must be {MODEL_TYPE!r}, got {model_type!r}")
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"format_version {version!r} is not supported (this version reads {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> NSAConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> NSAConfig:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def replace(self, **changes: Any) -> NSAConfig:
        return dataclasses.replace(self, **changes)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
