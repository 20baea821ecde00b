"""Server-side paths: a path a user types or picks is opened only if it lies under a configured root.

A root is a directory the operator trusts: the shipped sample models, plus every directory named in
the NSA_CHECKPOINT_ROOTS environment variable (separated by os.pathsep). A user path is resolved
(symlinks followed, `..` collapsed) and accepted only if the result lies inside a resolved root, so
neither `..` nor a symlink leads out. A relative path is taken relative to each root in turn.
For a checkpoint directory the files inside it that loading opens are checked the same way, since a
symlinked config.json could otherwise point anywhere. Roots must not be writable by untrusted users:
a checked path could be swapped for a symlink between the check and the open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .checkpoint import CARD_FILE, CONFIG_FILE, METRICS_FILE, SUFFIX, WEIGHTS_FILE
from .sample_models import sample_models_dir

ROOTS_ENV = "NSA_CHECKPOINT_ROOTS"
# Files of a checkpoint directory that loading or the app may open.
_CHECKPOINT_MEMBERS = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, METRICS_FILE)


class UnsafePathError(ValueError):
    """A user path that is malformed, missing, or would lead outside the configured roots."""


def configured_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The sample-models folder plus the existing directories listed in NSA_CHECKPOINT_ROOTS, resolved."""
    environ = os.environ if environ is None else environ
    extra = [Path(p) for p in environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    return _resolve_roots([sample_models_dir(), *extra])


def resolve_under(user_path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """The resolved, existing path user_path names inside one of roots; UnsafePathError otherwise."""
    return _resolve(user_path, _resolve_roots(roots))[0]


def resolve_checkpoint(user_path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """Like resolve_under, for a checkpoint: a .safetensors file, or a directory whose files stay inside too."""
    path, root = _resolve(user_path, _resolve_roots(roots))
    if path.is_dir():
        for name in _CHECKPOINT_MEMBERS:
            member = path / name
            if member.exists() or member.is_symlink():
                _inside(member, root, shown=f"{user_path}/{name}")
    elif path.suffix != SUFFIX:
        raise UnsafePathError(f"{user_path}: a checkpoint is a directory or a {SUFFIX} file")
    return path


def list_checkpoints(roots: Iterable[str | os.PathLike], *, max_depth: int = 3) -> list[Path]:
    """Checkpoints under roots: directories with config.json and model.safetensors, and .safetensors files.

    Looks at most max_depth folders deep, never follows a symlinked folder, skips hidden entries and
    anything (a symlinked file, a symlinked member of a checkpoint) that resolves outside its root.
    """
    found: dict[Path, None] = {}
    for root in _resolve_roots(roots):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if CONFIG_FILE in filenames and WEIGHTS_FILE in filenames:
                # A checkpoint directory: listed as one entry, its contents not separately.
                dirnames.clear()
                if all(_is_inside(here / name, root) for name in (CONFIG_FILE, WEIGHTS_FILE)):
                    found[here] = None
                continue
            for name in sorted(filenames):
                if name.endswith(SUFFIX) and not name.startswith(".") and _is_inside(here / name, root):
                    found[(here / name).resolve()] = None
            if len(here.relative_to(root).parts) >= max_depth:
                dirnames.clear()
    return sorted(found)


def _resolve_roots(roots: Iterable[str | os.PathLike]) -> list[Path]:
    resolved: dict[Path, None] = {}
    for root in roots:
        path = Path(root).resolve()
        if path.is_dir():
            resolved[path] = None
    return list(resolved)


def _resolve(user_path: str | os.PathLike, roots: list[Path]) -> tuple[Path, Path]:
    """(resolved path, its root) for user_path, trying each root in turn for a relative path."""
    text = os.fspath(user_path)
    if not isinstance(text, str) or not text.strip():
        raise UnsafePathError(f"{user_path!r}: an empty path")
    if "\x00" in text:
        raise UnsafePathError(f"{text!r}: a path cannot contain a NUL byte")
    if not roots:
        raise UnsafePathError(f"{text}: no checkpoint root is configured (set {ROOTS_ENV})")
    candidate = Path(text)
    tries = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    outside = True
    for attempt in tries:
        try:
            resolved = attempt.resolve()
        except (OSError, RuntimeError) as err:  # a symlink loop
            raise UnsafePathError(f"{text}: cannot be resolved ({err})") from None
        root = next((r for r in roots if resolved.is_relative_to(r)), None)
        if root is None:
            continue
        outside = False
        if resolved.exists():
            return resolved, root
    shown = ", ".join(str(r) for r in roots)
    if outside:
        raise UnsafePathError(f"{text}: leads outside the checkpoint folders ({shown})")
    raise UnsafePathError(f"{text}: does not exist under the checkpoint folders ({shown})")


def _is_inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _inside(path: Path, root: Path, *, shown: str) -> None:
    if not _is_inside(path, root):
        raise UnsafePathError(f"{shown}: a symlink that leads outside the checkpoint folder {root}")
