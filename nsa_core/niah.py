"""Needle in a haystack: hide a passkey in any text, ask for it, and score the model's greedy answer.

    from nsa_core import niah
    prompt = niah.build_prompt(haystack_text, length=4096, depth=0.5, key="31415")
    results = niah.sweep(model, haystack_text, lengths=[1024, 4096], depths=niah.even_depths(10), trials=20)
    niah.write_results(results, "niah.json")

    nsa-explorer niah CHECKPOINT [--haystack heldout|FILE] --lengths 1024,2048 --depths 10 --trials 20 --out R.json
        [--depths 0.05,0.1,0.15]    # the depths themselves instead of a count
        [--backend reference|triton|auto]    # the Triton kernels answer faster on a GPU
        [--record-choice]    # NSA: per trial, which layers and KV groups chose the needle's block
        [--corpus-root DIR]    # the 'heldout' haystack from another standard-library folder

A prompt is <bos>, then haystack tokens with the needle sentence (`data.NEEDLE`) on its own line at a
depth in [0, 1] of the haystack, then the question (`data.QUESTION`) and <sep>: exactly `length`
tokens. The model answers with `NSALM.generate()` (greedy, KV cache, stopping at <eos>), and a trial
counts when the tokens before the first <eos> are exactly the key's digits. Each trial draws its own
key and haystack offset from a seed, so a sweep is reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import backend as backends
from . import data, tokenizer
from .model import NSALM
from .trace import ModelTrace

HELDOUT = "heldout"


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]  # exactly `length` tokens, ending with <sep>
    key: str  # the expected answer
    depth: float
    needle_at: int  # token index where the needle sentence starts

    @property
    def needle_span(self) -> tuple[int, int]:
        """First and last token index of the needle sentence."""
        return self.needle_at, self.needle_at + len(tokenizer.encode(data.NEEDLE.format(key=self.key))) - 1


@dataclass(frozen=True)
class CellResult:
    length: int
    depth: float
    trials: int
    correct: int
    answers: list[str]  # decoded answer per trial (up to <eos>)
    keys: list[str]
    # Per trial [L][H] (NSA, when the sweep records it): whether layer l's KV group h chose a block holding
    # the needle at the answer token (the prompt's last), as needle_chosen computes it.
    needle_chosen: list[list[list[bool]]] | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials


def even_depths(count: int) -> list[float]:
    """count depths evenly spaced from 0 (start of the haystack) to 1 (just before the question)."""
    if count < 1:
        raise ValueError(f"need at least one depth, got {count}")
    return [0.0] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def parse_depths(spec: str) -> list[float]:
    """'10' -> 10 evenly spaced depths; '0.05,0.1,0.15' -> those depths, each in [0, 1]."""
    spec = spec.strip()
    if spec.isdigit():
        return even_depths(int(spec))
    try:
        depths = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"depths must be a count (10) or comma-separated depths in [0, 1] (0.05,0.1), "
                         f"got {spec!r}") from None
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"every depth must be in [0, 1], got {spec!r}")
    return depths


def haystack_tokens(haystack: str | bytes | Sequence[int] | np.ndarray) -> np.ndarray:
    """Text (str or UTF-8 bytes) or byte tokens -> int64 token array."""
    if isinstance(haystack, str):
        haystack = haystack.encode("utf-8")
    if isinstance(haystack, bytes):
        tokens = np.frombuffer(haystack, dtype=np.uint8).astype(np.int64)
    else:
        tokens = np.asarray(haystack, dtype=np.int64)
    if tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError("the haystack must be non-empty text or a 1-D sequence of byte tokens")
    if tokens.min() < 0 or tokens.max() > 255:
        raise ValueError("haystack tokens must be bytes (0..255): special tokens are reserved for the prompt")
    return tokens


def prompt_overhead() -> int:
    """Tokens every prompt spends outside the haystack: <bos>, the needle line, the question and <sep>."""
    return 1 + len(tokenizer.encode("\n" + data.NEEDLE.format(key="00000") + "\n")) + \
        len(tokenizer.encode("\n" + data.QUESTION)) + 1


def build_prompt(haystack, *, length: int, depth: float, key: str, offset: int = 0) -> NeedlePrompt:
    """The prompt of `length` tokens hiding `key` at `depth`; the haystack is read from `offset`, wrapping."""
    tokens = haystack_tokens(haystack)
    if not (key.isascii() and key.isdigit()) or len(key) != 5:
        raise ValueError(f"the key must be 5 ASCII digits, got {key!r}")
    hay_len = length - prompt_overhead()
    if hay_len < 0:
        raise ValueError(f"length {length} is shorter than the needle and question ({prompt_overhead()} tokens)")
    hay = tokens[(offset + np.arange(hay_len)) % len(tokens)].tolist()
    needle = tokenizer.encode(data.NEEDLE.format(key=key))
    body = data.insert_needles(hay, [needle], [depth])
    ids = [tokenizer.BOS] + body + tokenizer.encode("\n" + data.QUESTION) + [tokenizer.SEP]
    needle_at = 1 + round(depth * hay_len) + 1  # after <bos>, the haystack before it, and the newline
    return NeedlePrompt(ids, key, depth, needle_at)


def answer_text(tokens: Sequence[int]) -> str:
    """The generated answer: the tokens before the first <eos> (all of them when there is none)."""
    tokens = list(tokens)
    if tokenizer.EOS in tokens:
        tokens = tokens[:tokens.index(tokenizer.EOS)]
    return "".join(tokenizer.token_label(t) if t >= 256 else chr(t) for t in tokens)


def is_correct(tokens: Sequence[int], key: str) -> bool:
    """Exact match: the tokens before the first <eos> are the key's digits and an <eos> ends them."""
    tokens = list(tokens)
    return tokenizer.EOS in tokens and tokens[:tokens.index(tokenizer.EOS)] == tokenizer.encode(key)


def needle_chosen(model: NSALM, prompt: NeedlePrompt) -> np.ndarray:
    """[L, H] bool: at the answer token (the prompt's last), did layer l's KV group h choose a block holding
    any of the needle sentence? From one traced forward pass of the prompt; NSA models only."""
    if model.config.attention != "nsa":
        raise ValueError("only an NSA model chooses blocks")
    with torch.no_grad():
        _, trace = model(torch.tensor([prompt.ids], device=model.device), trace=True)
    return chosen_at_answer(trace, prompt.needle_span)


def chosen_at_answer(trace: ModelTrace, span: tuple[int, int]) -> np.ndarray:
    """[L, H] bool from a trace of a prompt: at its last query, did layer l's KV group h choose a block
    holding any token of span (first, last)?"""
    slc_block = trace.config.slc_block
    blocks = np.arange(span[0] // slc_block, span[1] // slc_block + 1)
    return np.stack([np.isin(layer.block_idx[-1], blocks).any(-1) for layer in trace.layers])


def run_cell(model: NSALM, haystack, *, length: int, depth: float, trials: int, seed: int = 0,
             batch_size: int | None = None, record_choice: bool = False) -> CellResult:
    """`trials` prompts at (length, depth), answered greedily in batches; keys and offsets drawn from seed.

    record_choice (NSA): also record per trial which layers and KV groups chose the needle's block
    (`needle_chosen`), at the cost of one more forward pass per prompt."""
    tokens = haystack_tokens(haystack)
    rng = np.random.default_rng([seed, length, round(depth * 10_000)])
    keys = [data.random_key(rng) for _ in range(trials)]
    offsets = rng.integers(0, len(tokens), trials).tolist()
    prompts = [build_prompt(tokens, length=length, depth=depth, key=k, offset=o) for k, o in zip(keys, offsets,
                                                                                                    strict=True)]
    batch_size = batch_size or trials
    answers, correct = [], 0
    for lo in range(0, trials, batch_size):
        batch = prompts[lo:lo + batch_size]
        ids = torch.tensor([p.ids for p in batch], dtype=torch.long, device=model.device)
        out = model.generate(ids, max_new_tokens=len(batch[0].key) + 1, stop_token=tokenizer.EOS)
        for p, row in zip(batch, out.tolist(), strict=True):
            answers.append(answer_text(row))
            correct += is_correct(row, p.key)
    chosen = [needle_chosen(model, p).tolist() for p in prompts] if record_choice else None
    return CellResult(length, depth, trials, correct, answers, keys, chosen)


def sweep(model: NSALM, haystack, *, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0,
          batch_size: int | None = None, progress: bool = True, record_choice: bool = False,
          callback: Callable[[int, int, CellResult], None] | None = None) -> dict[str, Any]:
    """Every (length, depth) cell; callback(done, total, cell) after each (for a UI progress bar).

    Returns JSON-ready results: accuracy[i][j] for lengths[i] x depths[j], and every cell's answers (and,
    with record_choice, each trial's needle_chosen [L][H]; see run_cell).
    """
    if record_choice and model.config.attention != "nsa":
        raise ValueError("record_choice needs an NSA model: a dense model chooses no blocks")
    tokens = haystack_tokens(haystack)
    cells = [(length, depth) for length in lengths for depth in depths]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="niah", unit="cell", dynamic_ncols=True)
    results: list[CellResult] = []
    t0 = time.perf_counter()
    for done, (length, depth) in enumerate(cells, 1):
        cell = run_cell(model, tokens, length=length, depth=depth, trials=trials, seed=seed, batch_size=batch_size,
                        record_choice=record_choice)
        results.append(cell)
        if bar is not None:
            bar.set_postfix(length=length, depth=depth, acc=f"{cell.accuracy:.2f}")
            bar.update(1)
        if callback is not None:
            callback(done, len(cells), cell)
    if bar is not None:
        bar.close()
    grid = [[next(c.accuracy for c in results if c.length == length and c.depth == depth) for depth in depths]
            for length in lengths]
    return {
        "attention": model.config.attention,
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "haystack_tokens": len(tokens),
        "accuracy": grid,
        "min_accuracy_per_length": {str(length): min(row) for length, row in zip(lengths, grid, strict=True)},
        "seconds": round(time.perf_counter() - t0, 1),
        "cells": [{k: v for k, v in asdict(c).items() if v is not None} | {"accuracy": c.accuracy} for c in results],
    }


def choice_rates(results: dict[str, Any]) -> dict[str, tuple[np.ndarray, int]] | None:
    """For a sweep recorded with record_choice: per outcome ("found", "missed"), the share [L, H] of its trials
    in which layer l's KV group h chose the needle's block at the answer token (NaN with no trial), and
    its number of trials. None when the sweep did not record it.

    A trial was found when its answer is its key: answers stop at <eos>, and with key length + 1 new
    tokens a row without <eos> is one token longer than the key."""
    cells = results["cells"]
    if not cells or "needle_chosen" not in cells[0]:
        return None
    chosen = np.array([c for cell in cells for c in cell["needle_chosen"]], dtype=bool)  # [trials, L, H]
    found = np.array([a == k for cell in cells for a, k in zip(cell["answers"], cell["keys"], strict=True)])
    rates = {}
    for outcome, rows in (("found", found), ("missed", ~found)):
        n = int(rows.sum())
        rate = chosen[rows].mean(0) if n else np.full(chosen.shape[1:], np.nan)
        rates[outcome] = (rate, n)
    return rates


def format_choice(rates: dict[str, tuple[np.ndarray, int]]) -> str:
    """Markdown table of choice_rates: one row per layer, per KV group the share of found and missed trials
    in which it chose the needle's block."""
    (found, n_found), (missed, n_missed) = rates["found"], rates["missed"]
    groups = range(found.shape[1])
    head = ("| layer | " + " | ".join(f"group {h}: found ({n_found}) / missed ({n_missed})" for h in groups) + " |")
    rows = ["| " + str(layer) + " | " + " | ".join(f"{_percent(found[layer, h])} / {_percent(missed[layer, h])}"
                                                    for h in groups) + " |" for layer in range(found.shape[0])]
    return "\n".join([head, "|---|" + "---|" * len(groups), *rows])


def _percent(share: float) -> str:
    return "-" if np.isnan(share) else f"{share:.0%}"


def depth_labels(depths: Sequence[float], *, percent: bool = False) -> list[str]:
    """Labels for depths with as few decimals as keep each within a tenth of its gap to the nearest other
    depth: 0.11 for even_depths' 0.1111, but 0.110, 0.115, 0.120 side by side; percent: 11%, or 11.5%."""
    values = np.asarray(depths, dtype=float)
    gaps = np.array([np.delete(np.abs(values - v), i).min(initial=np.inf) for i, v in enumerate(values)])
    for digits in range(6):
        places = digits + 2  # decimals of the fraction the label shows
        if (np.abs(np.round(values, places) - values) <= gaps / 10).all():
            break
    return [f"{d:.{digits}%}" if percent else f"{d:.{digits + 2}f}" for d in depths]


def format_grid(results: dict[str, Any]) -> str:
    """Markdown table: one row per context length, one column per depth, exact-match accuracy in %."""
    depths = results["depths"]
    lines = ["| length \\ depth | " + " | ".join(depth_labels(depths)) + " | min |",
             "|---" * (len(depths) + 2) + "|"]
    for length, row in zip(results["lengths"], results["accuracy"], strict=True):
        lines.append(f"| {length} | " + " | ".join(f"{100 * a:.0f}" for a in row) + f" | {100 * min(row):.0f} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return path


def load_haystack(spec: str, *, heldout_fraction: float = 0.05, corpus_root: str | Path | None = None) -> np.ndarray:
    """'heldout' -> the held-out files of the standard library at corpus_root (default: this Python's);
    anything else is a path to a text file."""
    if spec == HELDOUT:
        return data.stdlib_corpus("heldout", heldout_fraction=heldout_fraction, root=corpus_root).astype(np.int64)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"haystack file {path} does not exist (or pass '{HELDOUT}')")
    return haystack_tokens(path.read_bytes())


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nsa-explorer niah",
                                     description="Needle-in-a-haystack sweep of a checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint directory or .safetensors file")
    parser.add_argument("--haystack", default=HELDOUT, help=f"'{HELDOUT}' (held-out stdlib files) or a text file")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="comma-separated context lengths")
    parser.add_argument("--depths", default="10",
                        help="a count of evenly spaced depths (10), or the depths themselves (0.05,0.1,0.15)")
    parser.add_argument("--corpus-root", type=Path,
                        help=f"standard-library folder whose held-out files make the '{HELDOUT}' haystack "
                             "(default: this Python's; the shipped grids used Ubuntu's 3.12.3, without its tests)")
    parser.add_argument("--trials", type=int, default=20, help="trials per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="prompts per generate() call (default: all trials)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=backends.BACKENDS, default="reference",
                        help="attention implementation: the reference (default, the ground truth), the Triton "
                             "kernels, or auto (the kernels where they run this model)")
    parser.add_argument("--record-choice", action="store_true",
                        help="NSA: also record per trial which layers and KV groups chose the needle's block at the "
                             "answer token (one more forward pass per prompt)")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError, load_pretrained

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        depths = parse_depths(args.depths)
        model = load_pretrained(args.checkpoint, device=args.device, dtype=torch.float32)
        model.backend = args.backend
        _, attention = model.ops()
        haystack = load_haystack(args.haystack, corpus_root=args.corpus_root)
        if args.record_choice and model.config.attention != "nsa":
            raise ValueError("--record-choice needs an NSA checkpoint: a dense model chooses no blocks")
    except (ValueError, OSError, CheckpointError, backends.BackendError) as err:
        print(f"nsa-explorer niah: {err}", file=sys.stderr)
        return 2
    print(f"attention: {attention}", file=sys.stderr)
    results = sweep(model, haystack, lengths=lengths, depths=depths, trials=args.trials,
                    seed=args.seed, batch_size=args.batch_size, record_choice=args.record_choice)
    results["attention_backend"] = attention
    # Which text the needles were hidden in, so that grids on other haystacks are not compared as equal.
    results["haystack"] = (data.corpus_summary(args.corpus_root) if args.haystack == HELDOUT
                           else {"file": str(Path(args.haystack).resolve())})
    print(format_grid(results))
    if (rates := choice_rates(results)) is not None:
        print("\nThe needle's block chosen at the answer token (share of trials):\n" + format_choice(rates))
    if args.out:
        print(f"wrote {write_results(results, args.out)}")
    return 0
