"""Real text the app offers without typing: Python standard-library modules, present wherever the app runs."""

from __future__ import annotations

from nsa_core import data

# Well-known standard-library modules of a few thousand to tens of thousands of bytes.
SOURCE_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "json/decoder.py",
    "functools.py",
    "argparse.py",
    "difflib.py",
    "collections/__init__.py",
)
MAX_FILE_BYTES = 4 << 20


def source_files() -> dict[str, str]:
    """label -> absolute path of the listed standard-library files that exist here."""
    root = data.stdlib_root()
    return {name: str(root / name) for name in SOURCE_FILES if (root / name).is_file()}


def read_source(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES).decode("utf-8", errors="replace")
