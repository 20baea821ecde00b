"""Shared test setup: deterministic seeds, Triton's interpreter on machines without a GPU, gpu marker."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Kernels run under Triton's interpreter on the CPU; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture
def import_script(monkeypatch):
    """Import a script of the repository (sample_models/, benchmarks/) as a module, with its own folder on
    sys.path for the imports it makes of its neighbours, as when it runs as a script."""

    def load(path):
        monkeypatch.syspath_prepend(str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """A small stand-in standard library: repetitive code, so a few steps visibly lower the loss."""
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(12):
        (root / f"mod_{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n" * 40)
    return root
