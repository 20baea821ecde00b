"""Inputs the Explorer offers without typing: real source files, and a passkey prompt with a needle.

The source files are Python standard-library modules (present on every machine that runs the app);
the passkey prompt uses the training task's own format (nsa_core.data), so a trained model answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nsa_core import data, tokenizer

# Well-known standard-library modules of a few thousand to tens of thousands of bytes.
SOURCE_FILES = ("textwrap.py", "heapq.py", "bisect.py", "json/decoder.py", "functools.py", "argparse.py",
                "difflib.py", "collections/__init__.py")
MAX_FILE_BYTES = 4 << 20


def source_files() -> dict[str, str]:
    """label -> absolute path of the listed standard-library files that exist here."""
    root = data.stdlib_root()
    return {name: str(root / name) for name in SOURCE_FILES if (root / name).is_file()}


def read_source(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: tuple[int, ...]  # <bos>, haystack with the needle, question, <sep>
    key: str
    needle_span: tuple[int, int]  # inclusive token range of the needle sentence in ids


def passkey_prompt(length: int, depth: float, *, seed: int = 0) -> PasskeyPrompt:
    """A passkey retrieval prompt of about `length` tokens from real text, the needle at `depth` in [0, 1]."""
    if length < 256:
        raise ValueError(f"a passkey prompt needs at least 256 tokens, got {length}")
    rng = np.random.default_rng(seed)
    corpus = data.read_corpus([data.stdlib_root() / name for name in SOURCE_FILES
                               if (data.stdlib_root() / name).is_file()], max_bytes=1 << 20)
    key = data.random_key(rng)
    haystack = data.haystack_slice(corpus, length - data.task_overhead(1), rng)
    task = data.single_key_task(haystack, key, depth)
    prompt = [tokenizer.BOS, *task.ids[: len(task.ids) - len(key) - 1]]  # drop the answer and its <eos>
    needle = tokenizer.encode(data.NEEDLE.format(key=key))
    start = _find(prompt, needle)
    return PasskeyPrompt(ids=tuple(prompt), key=key, needle_span=(start, start + len(needle) - 1))


def _find(haystack: list[int], needle: list[int]) -> int:
    first = needle[0]
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i] == first and haystack[i:i + len(needle)] == needle:
            return i
    raise ValueError("needle not found in the prompt")
