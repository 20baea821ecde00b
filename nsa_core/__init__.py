"""NSA in readable PyTorch: config, reference attention, the NSALM model, tokenizer, checkpoints, trace."""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, NSAConfig
from .model import NSALM
from .reference import (
    compressed_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    window_attention,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NSAConfig",
    "NSALM",
    "compressed_attention",
    "load_pretrained",
    "nsa_attention",
    "save_pretrained",
    "select_blocks",
    "selected_attention",
    "window_attention",
]
