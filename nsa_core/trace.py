"""The trace: what every NSA layer did on one input, stored in memory linear in the context length.

Per layer (T tokens, HQ query heads, H KV heads, n selected blocks):
- gates [T, HQ, 3]: sigmoid gates in (cmp, slc, win) order;
- block_idx [T, H, n]: selected blocks, ascending, -1 padding;
- block_scores [T, H, n]: importance p_slc' of each chosen block, as config.slc_scores computes it (NaN
  in -1 slots; forced blocks keep their real score, since forcing does not change it);
- lse_cmp [T, HQ]: log-sum-exp of the compressed branch (-inf where no compressed token is visible);
- branch_norms [T, HQ, 3]: L2 norm of each branch's output before gating.
The window of query t is [max(0, t - w + 1), t]; it is derived from the config, not stored.
Nothing quadratic in T is kept: maps and single-query details are computed on demand (`analysis.py`).

A trace records batch row 0 only: the analyses explore one input at a time.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import masks
from .config import ConfigError, NSAConfig

TRACE_FORMAT = "nsa_trace"
TRACE_VERSION = 1

# Queries per chunk when recomputing the chosen blocks' scores: bounds the [C, HQ, n, R, Dk] gather.
_SCORE_CHUNK = 2048


class TraceFileError(ValueError):
    """A trace file that cannot be read: wrong format, missing array, or shapes that disagree."""


@dataclass
class LayerTrace:
    gates: np.ndarray  # [T, HQ, 3] float32
    block_idx: np.ndarray  # [T, H, n] int32
    block_scores: np.ndarray  # [T, H, n] float32
    lse_cmp: np.ndarray  # [T, HQ] float32
    branch_norms: np.ndarray  # [T, HQ, 3] float32

    @classmethod
    def from_parts(cls, config: NSAConfig, inputs, parts) -> LayerTrace:
        """Record batch row 0 of one layer's AttentionInputs and NSAParts."""
        with torch.no_grad():
            block_scores = chosen_block_scores(config, inputs.q[0], inputs.k_cmp[0], parts.lse_slc[0],
                                               parts.block_idx[0])  # [T, H, n]
            norms = torch.stack([parts.o_cmp[0].float().norm(dim=-1), parts.o_slc[0].float().norm(dim=-1),
                                 parts.o_win[0].float().norm(dim=-1)], -1)  # [T, HQ, 3]
            return cls(
                gates=inputs.gates[0].float().cpu().numpy(),
                block_idx=parts.block_idx[0].to(torch.int32).cpu().numpy(),
                block_scores=block_scores.cpu().numpy(),
                lse_cmp=parts.lse_cmp[0].float().cpu().numpy(),
                branch_norms=norms.cpu().numpy(),
            )

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


@dataclass
class ModelTrace:
    config: NSAConfig
    token_ids: np.ndarray  # [T] int64
    layers: list[LayerTrace]

    @classmethod
    def from_parts(cls, config: NSAConfig, ids: torch.Tensor, records: list) -> ModelTrace:
        """records: per layer (AttentionInputs, NSAParts) from NSALM.forward(trace=True)."""
        if config.attention != "nsa" or any(r is None for r in records):
            raise ValueError(f"only an NSA model can be traced; this one has attention={config.attention!r}")
        layers = [LayerTrace.from_parts(config, inputs, parts) for inputs, parts in records]
        return cls(config=config, token_ids=ids[0].cpu().numpy().astype(np.int64), layers=layers)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes held by the trace's arrays (linear in T)."""
        return self.token_ids.nbytes + sum(layer.nbytes for layer in self.layers)

    def layer(self, index: int) -> LayerTrace:
        """The trace of layer `index`, with a clear error when it does not exist."""
        if not 0 <= index < len(self.layers):
            raise IndexError(f"layer must be in 0..{len(self.layers) - 1}, got {index}")
        return self.layers[index]

    def window_bounds(self) -> np.ndarray:
        """[T, 2] inclusive first and last key position of each query's window."""
        t = np.arange(self.num_tokens)
        return np.stack([np.maximum(t - self.config.window + 1, 0), t], -1)

    # .npz round trip ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the trace, its config and token ids as one compressed .npz (no pickle)."""
        arrays = {
            "format": np.array(TRACE_FORMAT),
            "version": np.array(TRACE_VERSION),
            "config": np.array(self.config.to_json()),
            "token_ids": self.token_ids,
        }
        for i, layer in enumerate(self.layers):
            for f in fields(LayerTrace):
                arrays[f"layer{i}.{f.name}"] = getattr(layer, f.name)
        # savez appends ".npz" to a bare path; writing through a file object keeps the exact name.
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path | io.IOBase) -> ModelTrace:
        """Read a trace written by `save`; every problem is a TraceFileError naming the array.

        Never unpickles: object arrays are refused.
        """
        unreadable = (OSError, EOFError, zipfile.BadZipFile, ValueError)
        try:
            data = np.load(path, allow_pickle=False)
        except unreadable as err:
            raise TraceFileError(f"not a readable trace file (.npz): {err}") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise TraceFileError("not a trace file: expected an .npz archive, found a single .npy array")
        with data:
            try:
                return cls._from_arrays(data)
            except TraceFileError:
                raise
            except unreadable as err:  # a damaged member, or an object array that would need pickle
                raise TraceFileError(f"not a readable trace file (.npz): {err}") from None

    @classmethod
    def _from_arrays(cls, data: np.lib.npyio.NpzFile) -> ModelTrace:
        names = set(data.files)
        for key in ("format", "version", "config", "token_ids"):
            if key not in names:
                raise TraceFileError(f"not a trace file: the array {key!r} is missing")
        if str(data["format"]) != TRACE_FORMAT:
            raise TraceFileError(f"not a trace file: format is {str(data['format'])!r}, expected {TRACE_FORMAT!r}")
        if int(data["version"]) != TRACE_VERSION:
            raise TraceFileError(f"trace version {int(data['version'])} is not supported (this reads {TRACE_VERSION})")
        try:
            config = NSAConfig.from_json(str(data["config"]))
        except ConfigError as err:
            raise TraceFileError(f"the trace's config is invalid: {err}") from None
        token_ids = data["token_ids"]
        if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
            raise TraceFileError(f"token_ids must be a 1-D integer array, found {token_ids.dtype} {token_ids.shape}")
        expected = _layer_shapes(config, len(token_ids))
        layers = []
        for i in range(config.n_layer):
            arrays = {}
            for name, (shape, dtype) in expected.items():
                key = f"layer{i}.{name}"
                if key not in names:
                    raise TraceFileError(f"the array {key!r} is missing")
                arr = data[key]
                if arr.shape != shape or arr.dtype != dtype:
                    raise TraceFileError(f"{key}: expected {dtype} {shape}, found {arr.dtype} {arr.shape}")
                arrays[name] = arr
            layers.append(LayerTrace(**arrays))
        return cls(config=config, token_ids=token_ids.astype(np.int64), layers=layers)


def _layer_shapes(config: NSAConfig, T: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    HQ, H, n = config.n_head, config.n_kv_head, config.top_n
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    return {
        "gates": ((T, HQ, 3), f32),
        "block_idx": ((T, H, n), i32),
        "block_scores": ((T, H, n), f32),
        "lse_cmp": ((T, HQ), f32),
        "branch_norms": ((T, HQ, 3), f32),
    }


def chosen_block_scores(config: NSAConfig, q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor,
                        block_idx: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Importance p_slc' (Eq. 8-10) of each chosen block only: [T, H, n] float32, NaN where block_idx is -1.

    q [T, HQ, Dk] (queries at positions 0..T-1), k_cmp [Tc, H, Dk], lse [T, HQ] of the compressed
    branch, block_idx [T, H, n]. Same numbers as gathering `reference.importance_scores`, but it reads
    only the R = (l' + l) / d - 1 compressed tokens that overlap each chosen block (5 in the paper
    configuration) instead of all Tc, so its cost is O(T n R) rather than O(T Tc).
    """
    T, HQ, Dk = q.shape
    Tc, H = k_cmp.shape[0], k_cmp.shape[1]
    G = HQ // H
    l, d, ls = config.cmp_block, config.cmp_stride, config.slc_block
    scale = Dk ** -0.5 if scale is None else scale
    # Compressed token i overlaps block j iff i*d < (j+1)l' and i*d + l > j*l'; the first such i is
    # floor((j*l' - l) / d) + 1 and at most R = ceil((l' + l - 1) / d) of them follow.
    R = -(-(ls + l - 1) // d)
    r = torch.arange(R, device=q.device)
    kc = k_cmp.float()
    kv_head = torch.arange(H, device=q.device)[None, :, None]
    out = []
    for lo in range(0, T, _SCORE_CHUNK):
        hi = min(lo + _SCORE_CHUNK, T)
        idx = block_idx[lo:hi].long()  # [C, H, n]
        j = idx.clamp_min(0)
        first = torch.div(j * ls - l, d, rounding_mode="floor") + 1  # [C, H, n]
        i = first[..., None] + r  # [C, H, n, R]
        start = i * d
        overlap = masks.span_overlap(start, start + l, j[..., None] * ls, (j[..., None] + 1) * ls)
        visible = masks.visible_compressed(torch.arange(lo, hi, device=q.device), l, d)  # [C]
        ok = (overlap > 0) & (i >= 0) & (i < visible[:, None, None, None]) & (idx[..., None] >= 0)
        weight = torch.where(ok, overlap.float() / d, 0.0)  # [C, H, n, R]
        qc = q[lo:hi].float().unflatten(1, (H, G))  # [C, H, G, Dk]
        row_lse = lse[lo:hi].float().unflatten(1, (H, G))[..., None]  # [C, H, G, 1]
        has_cmp = torch.isfinite(row_lse)  # rows with no visible compressed token score 0
        score = torch.empty(idx.shape, dtype=torch.float32, device=q.device)  # [C, H, n]
        # One chosen block at a time: gathering the keys of all n at once held several copies of a
        # [C, H, n, R, Dk] tensor on CUDA, the largest allocation of a traced forward.
        for slot in range(idx.shape[-1]):
            rows = i[:, :, slot].clamp(0, max(Tc - 1, 0))  # [C, H, R]
            keys = kc[rows, kv_head] if Tc else kc.new_zeros(*rows.shape, Dk)  # [C, H, R, Dk]
            s = torch.einsum("chgd,chrd->chgr", qc, keys) * scale  # [C, H, G, R]
            p = torch.where(has_cmp, torch.exp(s - row_lse), 0.0)
            score[:, :, slot] = (p * weight[:, :, None, slot]).sum((-1, 2))
        out.append(torch.where(idx >= 0, score, torch.nan))
    if not out:
        return q.new_zeros(0, H, block_idx.shape[-1], dtype=torch.float32)
    return torch.cat(out, 0)
