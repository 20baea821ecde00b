"""Training and evaluation data that exists offline on every machine, and the passkey task format.

Text: the Python standard library's own `.py` files (found through `sysconfig`), listed by relative
path in sorted order and split into train and held-out files by a hash of that path, so the split
does not depend on which other files a Python version ships. What a folder holds still differs between
installations: Debian and Ubuntu ship the standard library's tests, about two thirds of its source,
in a separate package. `corpus_summary` says which text a run read, so runs on other corpora are
not mistaken for the same experiment.

Task: passkey retrieval. A needle sentence holding a 5-digit key is hidden in real text; a question
at the end asks for it, then <sep>, and the answer is the key followed by <eos>. Multi-key variants
hide several named keys and ask for each. The same templates drive the NIAH harness (`niah.py`), so
the shipped models are evaluated on exactly the format they were trained on.

Training rows are fixed-length token windows packed with tasks of varying length: a curriculum
raises the longest task length in stages, so retrieval is learned at short range first.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tokenizer

# The single-key format the NIAH harness uses by default.
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# Multi-key variant: each needle names its key.
NAMED_NEEDLE = "The pass key of {name} is {key}. Remember it."
NAMED_QUESTION = "What is the pass key of {name}? The pass key of {name} is"
KEY_NAMES = ("red", "blue", "green", "amber", "violet", "silver", "orange", "indigo")

# Loss weight marker: targets that are answer tokens (key digits and the closing <eos>).
IGNORE = -100


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """Every `.py` file of the standard library, outside site-packages, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str, heldout_fraction: float) -> bool:
    """Held-out files are chosen by a CRC32 of their relative path: stable across machines and versions."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    return zlib.crc32(relative_path.encode("utf-8")) % 10_000 < heldout_fraction * 10_000


def split_sources(files: list[Path], root: str | Path, heldout_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files, each in the input order."""
    root = Path(root)
    train, heldout = [], []
    for f in files:
        (heldout if is_heldout(f.relative_to(root).as_posix(), heldout_fraction) else train).append(f)
    return train, heldout


FILE_SEPARATOR = b"\n\n"  # after each file of a corpus: a blank line between files


def read_corpus(files: list[Path], *, max_bytes: int | None = None) -> np.ndarray:
    """The files' bytes joined by blank lines -> uint8 token array (byte tokens are the bytes themselves)."""
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes() + FILE_SEPARATOR
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return corpus[:max_bytes] if max_bytes is not None else corpus


def stdlib_corpus(split: str, *, heldout_fraction: float = 0.05, max_bytes: int | None = None,
                  root: str | Path | None = None) -> np.ndarray:
    """Byte tokens of the train or held-out standard-library files."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    train, heldout = split_sources(stdlib_sources(root), root, heldout_fraction)
    files = train if split == "train" else heldout
    if not files:
        raise ValueError(f"the {split} split of {root} is empty (heldout_fraction={heldout_fraction})")
    return read_corpus(files, max_bytes=max_bytes)


def has_test_suite(root: str | Path) -> bool:
    """Whether the standard library at root holds its own tests (`test/test_*.py`, hundreds in a full
    installation; Debian and Ubuntu keep only a handful there and ship the rest as libpython3.X-testsuite)."""
    return sum(1 for _ in (Path(root) / "test").glob("test_*.py")) >= 50


def corpus_summary(root: str | Path | None = None, *, heldout_fraction: float = 0.05) -> dict[str, Any]:
    """Which text a run reads: the folder, each split's files and tokens, whether the tests are there, and a
    SHA-256 of every file's relative path and bytes in order (equal digests, equal data)."""
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_sources(root)
    train, heldout = split_sources(files, root, heldout_fraction)
    digest = hashlib.sha256()
    tokens = {}
    for split, members in (("train", train), ("heldout", heldout)):
        total = 0
        for f in members:
            content = f.read_bytes()
            digest.update(f.relative_to(root).as_posix().encode("utf-8") + b"\0" + content + b"\0")
            total += len(content) + len(FILE_SEPARATOR)
        tokens[split] = total
    return {"root": str(root), "train_files": len(train), "train_tokens": tokens["train"],
            "heldout_files": len(heldout), "heldout_tokens": tokens["heldout"],
            "test_suite": has_test_suite(root), "sha256": digest.hexdigest()}


def describe_corpus(summary: dict[str, Any]) -> str:
    """One sentence on a corpus_summary, for logs and model cards."""
    said = (f"{summary['train_files']:,} training files ({summary['train_tokens'] / 1e6:.1f} MB) and "
            f"{summary['heldout_files']:,} held-out files ({summary['heldout_tokens'] / 1e6:.1f} MB) of the standard "
            f"library at `{summary['root']}` (SHA-256 {summary['sha256'][:12]})")
    if not summary["test_suite"]:
        said += (", without the library's own tests (Debian and Ubuntu ship them as libpython3.X-testsuite), so "
                 "about a third of the text a full installation holds")
    return said + "."


def random_key(rng: np.random.Generator) -> str:
    """A 5-digit passkey, never starting with 0."""
    return str(int(rng.integers(10_000, 100_000)))


# Task construction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One passkey task as tokens: ids[i] is the input; answer_mask[i] marks ids that are answer tokens."""

    ids: list[int]
    answer_mask: list[bool]


def haystack_slice(corpus: np.ndarray, length: int, rng: np.random.Generator) -> list[int]:
    """length tokens of corpus from a random offset, wrapping around when the corpus is shorter."""
    if len(corpus) == 0:
        raise ValueError("the haystack corpus is empty")
    start = int(rng.integers(0, len(corpus)))
    idx = (start + np.arange(length)) % len(corpus)
    return corpus[idx].astype(np.int64).tolist()


def insert_needles(haystack: list[int], needles: list[list[int]], depths: list[float]) -> list[int]:
    """Insert each needle (token list) at its depth in [0, 1] of the haystack, each on its own line."""
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths")
    newline = tokenizer.encode("\n")
    out, prev = [], 0
    for depth, needle in sorted(zip(depths, needles, strict=True), key=lambda pair: pair[0]):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        at = max(prev, round(depth * len(haystack)))
        out += haystack[prev:at] + newline + needle + newline
        prev = at
    return out + haystack[prev:]


def single_key_task(haystack: list[int], key: str, depth: float) -> Task:
    """Haystack with one needle at depth, the question, <sep>, then the answer key and <eos>."""
    needle = tokenizer.encode(NEEDLE.format(key=key))
    prompt = insert_needles(haystack, [needle], [depth]) + tokenizer.encode("\n" + QUESTION) + [tokenizer.SEP]
    answer = tokenizer.encode(key) + [tokenizer.EOS]
    return Task(prompt + answer, [False] * len(prompt) + [True] * len(answer))


def multi_key_task(haystack: list[int], keys: dict[str, str], depths: list[float], order: list[str]) -> Task:
    """Several named needles; then one question per name in `order`, each answered and closed by <eos>."""
    needles = [tokenizer.encode(NAMED_NEEDLE.format(name=name, key=key)) for name, key in keys.items()]
    ids = insert_needles(haystack, needles, depths)
    mask = [False] * len(ids)
    for name in order:
        question = tokenizer.encode("\n" + NAMED_QUESTION.format(name=name)) + [tokenizer.SEP]
        answer = tokenizer.encode(keys[name]) + [tokenizer.EOS]
        ids += question + answer
        mask += [False] * len(question) + [True] * len(answer)
    return Task(ids, mask)


def task_overhead(n_keys: int) -> int:
    """Tokens a task adds to its haystack (an upper bound), so a task can be sized to a target length."""
    if n_keys == 1:
        return len(NEEDLE) + 2 * 5 + 2 + len(QUESTION) + 2 + 6 + 1
    per_key = len(NAMED_NEEDLE) + 5 + 2 + len(NAMED_QUESTION) + 2 * max(map(len, KEY_NAMES)) + 2 + 6 + 5
    return n_keys * per_key + 1


def sample_task(corpus: np.ndarray, length: int, rng: np.random.Generator, *, multi_key_prob: float,
                start_needle_prob: float = 0.0) -> Task:
    """A task of exactly `length` tokens (<bos> first): single-key, or with probability multi_key_prob 2-4 keys.

    With probability start_needle_prob a single-key task puts its needle right after <bos> (depth 0
    with no filler before it), where a NIAH prompt of depth 0 has it.
    """
    n_keys = int(rng.integers(2, 5)) if rng.random() < multi_key_prob else 1
    # Short tasks hold fewer keys: leave at least half of the task to the haystack.
    while n_keys > 1 and task_overhead(n_keys) > length // 2:
        n_keys -= 1
    hay_len = length - 1 - task_overhead(n_keys)
    if hay_len < 16:
        raise ValueError(f"task length {length} leaves no room for a haystack")
    haystack = haystack_slice(corpus, hay_len, rng)
    depths = rng.random(n_keys).tolist()
    # Drawn only when enabled, so recipes without it keep their rows.
    at_start = n_keys == 1 and start_needle_prob > 0 and rng.random() < start_needle_prob
    if n_keys == 1:
        key = random_key(rng)
        if at_start:  # the filler goes after the haystack instead of before the task, keeping the needle first
            fixed = len(single_key_task([], key, 0.0).ids)
            haystack += haystack_slice(corpus, length - 1 - fixed - len(haystack), rng)
        task = single_key_task(haystack, key, 0.0 if at_start else depths[0])
    else:
        names = rng.choice(len(KEY_NAMES), n_keys, replace=False)
        keys = {KEY_NAMES[i]: random_key(rng) for i in names}
        order = [KEY_NAMES[i] for i in rng.permutation(names)]
        task = multi_key_task(haystack, keys, depths, order)
    # Pad the front with more text so every task is exactly `length` tokens (overhead is an upper bound).
    pad = length - 1 - len(task.ids)  # 0 for a needle at the start
    head = haystack_slice(corpus, pad, rng) if pad > 0 else []
    return Task([tokenizer.BOS] + head + task.ids, [False] * (1 + len(head)) + task.answer_mask)


@dataclass(frozen=True, kw_only=True)
class TaskMix:
    """How training rows are filled. Lengths are in tokens; the longest task grows over training.

    The curriculum moves through stages whose longest task doubles from min_task_len up to
    seq_len + 1. A stage is reached either when training asks for it (the trainer advances once the
    answers at the current stage are right often enough, `Recipe.curriculum_gate`) or when its share of
    the first curriculum_frac of training has passed, whichever comes first, so a run that never
    learns to retrieve still ends at full length.
    """

    seq_len: int
    min_task_len: int = 512
    multi_key_prob: float = 0.3
    start_needle_prob: float = 0.0  # share of single-key tasks with the needle right after <bos>
    curriculum_frac: float = 0.4  # fraction of training by which the last stage is reached at the latest

    def __post_init__(self) -> None:
        if self.min_task_len < 256 or self.min_task_len > self.seq_len:
            raise ValueError(f"min_task_len must be in [256, seq_len={self.seq_len}], got {self.min_task_len}")
        for name in ("multi_key_prob", "start_needle_prob", "curriculum_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def stage_lengths(self) -> list[int]:
        """Longest task of each stage: min_task_len, doubling, then seq_len + 1 (a whole row)."""
        top = self.seq_len + 1
        lengths = [self.min_task_len]
        while lengths[-1] * 2 < self.seq_len:
            lengths.append(lengths[-1] * 2)
        return lengths + [top] if lengths[-1] < top else lengths

    def scheduled_stage(self, progress: float) -> int:
        """The stage training must have reached by `progress` in [0, 1]: evenly spread over curriculum_frac."""
        last = len(self.stage_lengths) - 1
        if self.curriculum_frac == 0 or progress >= self.curriculum_frac:
            return last
        return min(last, int(progress / self.curriculum_frac * (last + 1)))

    def stage_at(self, progress: float, earned: int = 0) -> int:
        """The stage in force: the one earned by accuracy, or the scheduled one if that is further."""
        return max(min(earned, len(self.stage_lengths) - 1), self.scheduled_stage(progress))

    def max_task_len(self, stage: int) -> int:
        return self.stage_lengths[stage]


def training_row(corpus: np.ndarray, mix: TaskMix, stage: int, rng: np.random.Generator) -> Task:
    """seq_len + 1 tokens packed with tasks of log-uniform length in [min_task_len, max_task_len(stage)]."""
    total = mix.seq_len + 1
    hi = mix.max_task_len(stage)
    ids: list[int] = []
    mask: list[bool] = []
    while total - len(ids) >= mix.min_task_len:
        room = total - len(ids)
        length = int(round(math.exp(rng.uniform(math.log(mix.min_task_len), math.log(max(hi, mix.min_task_len))))))
        # Never leave a remainder too short to hold another task: stretch this one to the end instead.
        length = room if room - length < mix.min_task_len else length
        task = sample_task(corpus, length, rng, multi_key_prob=mix.multi_key_prob,
                           start_needle_prob=mix.start_needle_prob)
        ids += task.ids
        mask += task.answer_mask
    tail = total - len(ids)
    if tail:
        ids += [tokenizer.BOS] + haystack_slice(corpus, tail - 1, rng)
        mask += [False] * tail
    return Task(ids, mask)


def training_batch(corpus: np.ndarray, mix: TaskMix, *, batch_size: int, stage: int, seed: int, rank: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, T], targets [B, T], answer [B, T] bool) for this rank's share of a step's global batch.

    Each row is deterministic in (stage, seed, global row index, step), so a step sees the same rows
    however its global batch is split: 4 processes of 1 row train on what 1 process of 4 rows does.
    """
    rows = [training_row(corpus, mix, stage, np.random.default_rng([seed, rank * batch_size + i, step]))
            for i in range(batch_size)]
    ids = torch.tensor([r.ids for r in rows], dtype=torch.long)  # [B, T + 1]
    answer = torch.tensor([r.answer_mask for r in rows], dtype=torch.bool)  # [B, T + 1]
    return ids[:, :-1], ids[:, 1:], answer[:, 1:]


def heldout_rows(corpus: np.ndarray, *, seq_len: int, rows: int) -> torch.Tensor:
    """rows evenly spaced windows of seq_len + 1 held-out tokens (<bos> first) -> [rows, seq_len + 1]."""
    if len(corpus) < seq_len + 1:
        raise ValueError(f"held-out corpus ({len(corpus)} tokens) is shorter than one row ({seq_len} tokens)")
    starts = np.linspace(0, len(corpus) - seq_len, rows).astype(np.int64)
    out = np.stack([corpus[s:s + seq_len] for s in starts]).astype(np.int64)
    bos = np.full((rows, 1), tokenizer.BOS, dtype=np.int64)
    return torch.from_numpy(np.concatenate([bos, out], 1))
