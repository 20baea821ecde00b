"""NSA in readable PyTorch: config, reference attention, the NSALM model, tokenizer, checkpoints, trace."""

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
    "ConfigError",
    "NSAConfig",
    "NSALM",
    "compressed_attention",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
]
