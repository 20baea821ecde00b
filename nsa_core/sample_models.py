"""The checkpoints shipped in sample_models/: where they live, which exist, and the placeholder's recipe.

    python -m nsa_core.sample_models --list           # the shipped checkpoints
    python -m nsa_core.sample_models --make-random    # (re)writes sample_models/nsa-random/

nsa-random is a tiny randomly initialised NSALM (paper NSA configuration, d_model 128, 2 layers,
4 query heads, 2 KV heads): real enough for loading, tests and the app until trained models ship.
Its weights are a pure function of RANDOM_SEED, so the command above reproduces them bit for bit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from . import tokenizer
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, model_card, read_config, save_pretrained
from .config import NSAConfig
from .model import NSALM

# Overrides where the shipped checkpoints are looked for (an installed package has no repository).
SAMPLE_MODELS_ENV = "NSA_SAMPLE_MODELS"
# The checkpoint the app opens by default: the trained model once it ships, else the placeholder.
DEFAULT_ORDER = ("nsa-tiny", "nsa-random")
RANDOM_NAME = "nsa-random"
RANDOM_SEED = 0
# The text metrics.json reports the placeholder's loss on (an untrained model sits near ln 260).
EVAL_TEXT = (
    "Native Sparse Attention processes each query through three branches: compressed coarse-grained "
    "tokens, selectively retained fine-grained tokens, and a sliding window for local context. "
    "Learned gates mix the three outputs, and the blocks are aligned with the hardware so that the "
    "kernels stay fast during training as well as inference."
)


def sample_models_dir() -> Path:
    """The folder holding one subfolder per shipped checkpoint."""
    override = os.environ.get(SAMPLE_MODELS_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "sample_models"


def list_sample_models() -> list[Path]:
    """Checkpoint directories (config.json + model.safetensors) in sample_models_dir(), sorted by name."""
    root = sample_models_dir()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file())


def sample_model(name: str) -> Path:
    """The directory of the shipped checkpoint called name."""
    available = {d.name: d for d in list_sample_models()}
    if name not in available:
        raise FileNotFoundError(f"no sample model {name!r} in {sample_models_dir()}; available: {sorted(available)}")
    return available[name]


def default_sample_model() -> Path:
    """The checkpoint to open when the user has picked none: the first of DEFAULT_ORDER that ships."""
    available = list_sample_models()
    if not available:
        raise FileNotFoundError(f"no checkpoint in {sample_models_dir()}; "
                                "`python -m nsa_core.sample_models --make-random` writes the placeholder")
    by_name = {d.name: d for d in available}
    return next((by_name[name] for name in DEFAULT_ORDER if name in by_name), available[0])


def random_config() -> NSAConfig:
    """The placeholder's config: the paper's NSA hyperparameters on a model small enough for CPU tests."""
    return NSAConfig(d_model=128, n_layer=2, n_head=4, n_kv_head=2, head_dim=32, v_head_dim=32, mlp_hidden=352)


def random_model() -> NSALM:
    """The placeholder model: every parameter drawn from a generator seeded with RANDOM_SEED."""
    model = NSALM(random_config())
    model.reset_parameters(seed=RANDOM_SEED)
    return model.eval()


@torch.no_grad()
def eval_loss(model: NSALM, text: str = EVAL_TEXT) -> float:
    """Mean next-byte cross-entropy (nats) of model on text."""
    ids = torch.tensor([tokenizer.encode(text, bos=True)], device=model.device)
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).item()


def make_random(out_dir: str | os.PathLike | None = None) -> Path:
    """Write the placeholder checkpoint (default: sample_models/nsa-random) and return its directory."""
    out_dir = Path(out_dir) if out_dir is not None else sample_models_dir() / RANDOM_NAME
    model = random_model()
    metrics = {
        "trained": False,
        "parameters": model.num_parameters(),
        "eval_text_bytes": len(EVAL_TEXT.encode("utf-8")),
        "eval_loss_nats_per_byte": round(eval_loss(model), 6),
        "uniform_loss_nats_per_byte": round(math.log(model.config.vocab_size), 4),
    }
    description = (
        "A randomly initialised, **untrained** NSALM that stands in until trained models ship: it loads, "
        "traces and generates like a real checkpoint, but its output is noise and its attention patterns "
        "mean nothing. It uses the paper's NSA hyperparameters (l=32, d=16, l'=64, n=16, w=512) on a "
        "model small enough for fast CPU tests.\n\n"
        "Produced by `python -m nsa_core.sample_models --make-random` (seed "
        f"{RANDOM_SEED}; every parameter is drawn by `NSALM.reset_parameters(seed={RANDOM_SEED})`), "
        "which rewrites this folder with the same weights bit for bit.\n\n"
        f"Data: none. Metrics: next-byte loss on a fixed {metrics['eval_text_bytes']}-byte paragraph "
        "(`EVAL_TEXT` in `nsa_core/sample_models.py`), next to the loss of a uniform guess."
    )
    card = model_card(model, title=RANDOM_NAME, description=description, metrics=metrics)
    return save_pretrained(model, out_dir, metrics=metrics, card=card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa_core.sample_models", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the shipped checkpoints")
    action.add_argument("--make-random", action="store_true", help=f"write the {RANDOM_NAME} placeholder")
    parser.add_argument("--out", type=Path, help=f"directory for --make-random (default: sample_models/{RANDOM_NAME})")
    args = parser.parse_args(argv)
    if args.make_random:
        print(f"wrote {make_random(args.out)}")
        return 0
    for directory in list_sample_models():
        config = read_config(directory)
        print(f"{directory.name:<16} {config.attention:<6} d_model={config.d_model} n_layer={config.n_layer}  "
              f"{directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
