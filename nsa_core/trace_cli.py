"""`nsa-explorer trace`: run a text through a checkpoint with the trace on, save it, print a summary.

    nsa-explorer trace --checkpoint sample_models/nsa-tiny --text-file notes.txt --out trace.npz [--recall]

The text is read as UTF-8 bytes after a <bos> token (the byte-level tokenizer), cut to --max-tokens.
The summary has one row per layer: mean gates per branch, mean branch output norms, how many
distinct blocks were chosen and the share of chosen slots that were forced; with --recall also the
mean dense-mass recall and oracle overlap (quadratic in T: fine on a GPU, slow for long CPU inputs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import analysis, tokenizer
from .trace import ModelTrace


def summary_rows(trace: ModelTrace) -> list[dict[str, float]]:
    """One dict per layer with the numbers of the summary table (means over tokens and heads)."""
    c = trace.config
    t = np.arange(trace.num_tokens)[:, None, None]
    rows = []
    for lt in trace.layers:
        idx = lt.block_idx.astype(np.int64)
        valid = idx >= 0
        current = t // c.slc_block
        forced = valid & ((idx < c.init_blocks) | (idx > current - c.local_blocks)) & (idx <= current)
        gates, norms = lt.gates.mean((0, 1)), lt.branch_norms.mean((0, 1))
        rows.append({
            "g_cmp": float(gates[0]), "g_slc": float(gates[1]), "g_win": float(gates[2]),
            "|o_cmp|": float(norms[0]), "|o_slc|": float(norms[1]), "|o_win|": float(norms[2]),
            "blocks": float(len(np.unique(idx[valid]))),
            "forced": float(forced.sum() / max(1, valid.sum())),
        })
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """A plain-text table: one line per layer, columns in the rows' key order."""
    keys = list(rows[0]) if rows else []
    lines = ["layer " + " ".join(f"{k:>9}" for k in keys)]
    for i, row in enumerate(rows):
        cells = [f"{row[k]:9.0f}" if k == "blocks" else f"{row[k]:9.4f}" for k in keys]
        lines.append(f"{i:>5} " + " ".join(cells))
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsa-explorer trace", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or .safetensors file")
    parser.add_argument("--text-file", required=True, type=Path, help="UTF-8 text to run through the model")
    parser.add_argument("--out", required=True, type=Path, help="where to write the trace (.npz)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="keep at most this many tokens (default 8192)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    parser.add_argument("--recall", action="store_true", help="add dense-mass recall and oracle overlap per layer")
    args = parser.parse_args(argv)
    from .backend import BackendError
    from .checkpoint import CheckpointError, load_pretrained

    try:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        text = args.text_file.read_text(encoding="utf-8", errors="replace")
        model = load_pretrained(args.checkpoint, device=args.device, dtype=torch.float32)
        if model.config.attention != "nsa":
            raise ValueError(f"{args.checkpoint} is a dense model (attention={model.config.attention!r}): "
                             "only an NSA model has a trace")
        ids = torch.tensor([tokenizer.encode(text, bos=True)[: args.max_tokens]], device=model.device)
        start = time.perf_counter()
        with torch.no_grad():
            _, trace = model(ids, backend=args.backend, trace=True)
        seconds = time.perf_counter() - start
    except (ValueError, OSError, CheckpointError, BackendError) as err:
        print(f"nsa-explorer trace: {err}", file=sys.stderr)
        return 2
    rows = summary_rows(trace)
    if args.recall:
        for layer, row in enumerate(rows):
            row["recall"] = float(analysis.dense_recall(model, ids, trace, layer=layer).mean())
            row["oracle"] = float(analysis.oracle_overlap(model, ids, trace, layer=layer).mean())
    trace.save(args.out)
    _, reason = model.ops(args.backend)
    print(f"{trace.num_tokens} tokens, {len(trace.layers)} layers traced in {seconds:.2f} s on {model.device} "
          f"({reason}); trace {trace.nbytes / 1e6:.1f} MB in memory")
    print(format_table(rows))
    print(f"wrote {args.out}")
    return 0
