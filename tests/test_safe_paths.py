"""Server-side paths: only files under the configured roots are resolved or listed; `..` and symlinks
never lead out."""

import os
from pathlib import Path

import pytest

from nsa_core import sample_models
from nsa_core.safe_paths import (
    ROOTS_ENV,
    UnsafePathError,
    configured_roots,
    list_checkpoints,
    resolve_checkpoint,
    resolve_under,
)


def make_checkpoint_dir(directory: Path) -> Path:
    """A folder that looks like a checkpoint (the listing only looks at file names)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"\0" * 8)
    return directory


@pytest.fixture
def tree(tmp_path):
    """root/ (trusted) next to secret/ (not): root/a/ckpt, root/single.safetensors, secret/stolen.safetensors."""
    root, secret = tmp_path / "root", tmp_path / "secret"
    make_checkpoint_dir(root / "a" / "ckpt")
    (root / "single.safetensors").write_bytes(b"\0" * 8)
    secret.mkdir()
    (secret / "stolen.safetensors").write_bytes(b"\0" * 8)
    make_checkpoint_dir(secret / "ckpt")
    return root, secret


def test_paths_inside_a_root_resolve(tree):
    root, _ = tree
    assert resolve_under("single.safetensors", [root]) == (root / "single.safetensors").resolve()
    assert resolve_under(root / "a" / "ckpt", [root]) == (root / "a" / "ckpt").resolve()
    # `..` that stays inside the root is fine.
    assert resolve_under("a/../single.safetensors", [root]) == (root / "single.safetensors").resolve()
    assert resolve_checkpoint("a/ckpt", [root]) == (root / "a" / "ckpt").resolve()


def test_relative_paths_try_each_root(tree, tmp_path):
    root, _ = tree
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "m.safetensors").write_bytes(b"")
    assert resolve_under("x/m.safetensors", [root, other]) == (other / "x" / "m.safetensors").resolve()


@pytest.mark.parametrize("user_path", ["../secret/stolen.safetensors", "a/../../secret/ckpt", "a/ckpt/../../.."])
def test_dotdot_escape_is_refused(tree, user_path):
    root, _ = tree
    with pytest.raises(UnsafePathError, match="leads outside the checkpoint folders"):
        resolve_under(user_path, [root])
    with pytest.raises(UnsafePathError):
        resolve_checkpoint(user_path, [root])


def test_absolute_path_outside_is_refused(tree):
    root, secret = tree
    with pytest.raises(UnsafePathError, match="leads outside"):
        resolve_under(secret / "stolen.safetensors", [root])
    with pytest.raises(UnsafePathError, match="leads outside"):
        resolve_under("/etc/passwd", [root])


def test_symlink_escapes_are_refused(tree):
    root, secret = tree
    (root / "link.safetensors").symlink_to(secret / "stolen.safetensors")
    (root / "linkdir").symlink_to(secret)
    for user_path in ["link.safetensors", "linkdir/stolen.safetensors", "linkdir/ckpt", root / "linkdir"]:
        with pytest.raises(UnsafePathError, match="leads outside"):
            resolve_under(user_path, [root])


def test_symlinked_checkpoint_member_is_refused(tree):
    root, secret = tree
    ckpt = root / "a" / "ckpt"
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(secret / "ckpt" / "config.json")
    # The directory itself is inside, but loading it would open a file outside.
    assert resolve_under("a/ckpt", [root]) == ckpt.resolve()
    with pytest.raises(UnsafePathError, match="config.json: a symlink that leads outside"):
        resolve_checkpoint("a/ckpt", [root])
    assert ckpt.resolve() not in list_checkpoints([root])


def test_symlink_inside_the_root_is_allowed(tree):
    root, _ = tree
    (root / "alias.safetensors").symlink_to(root / "single.safetensors")
    assert resolve_under("alias.safetensors", [root]) == (root / "single.safetensors").resolve()


def test_malformed_and_missing_paths_are_refused(tree, tmp_path):
    root, _ = tree
    for user_path, message in [("", "empty path"), ("a\x00b", "NUL byte"), ("nope.safetensors", "does not exist"),
                               ("a/ckpt/notes.txt", "does not exist")]:
        with pytest.raises(UnsafePathError, match=message):
            resolve_under(user_path, [root])
    with pytest.raises(UnsafePathError, match="no checkpoint root"):
        resolve_under("single.safetensors", [tmp_path / "missing-root"])
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(UnsafePathError):
        resolve_under("loop", [root])
    (root / "notes.txt").write_text("x")
    with pytest.raises(UnsafePathError, match="a directory or a .safetensors file"):
        resolve_checkpoint("notes.txt", [root])


def test_listing_stays_inside_the_roots(tree):
    root, secret = tree
    (root / "link.safetensors").symlink_to(secret / "stolen.safetensors")
    (root / "linkdir").symlink_to(secret)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.safetensors").write_bytes(b"")
    (root / "a" / "ckpt" / "inner.safetensors").write_bytes(b"")  # part of a checkpoint, not listed on its own
    make_checkpoint_dir(root / "d1" / "d2" / "d3" / "deep")
    listed = list_checkpoints([root, root])
    assert listed == [(root / "a" / "ckpt").resolve(), (root / "single.safetensors").resolve()]
    assert (root / "d1" / "d2" / "d3" / "deep").resolve() in list_checkpoints([root], max_depth=4)


def test_configured_roots(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    roots = configured_roots({ROOTS_ENV: os.pathsep.join([str(extra), str(tmp_path / "missing"), ""])})
    assert roots == [sample_models.sample_models_dir().resolve(), extra.resolve()]
    assert configured_roots({}) == [sample_models.sample_models_dir().resolve()]
    nsa_random = (sample_models.sample_models_dir() / "nsa-random").resolve()
    assert nsa_random in list_checkpoints(configured_roots({}))
    assert resolve_checkpoint("nsa-random", configured_roots({})) == nsa_random
