"""Which implementation of the NSA functional API a call runs on: the PyTorch reference or the kernels.

`resolve(name, config, device=..., dtype=...)` returns the module with the five functions and a
sentence saying why it was chosen, so that the app can tell a user why it fell back to the reference.
The kernels package is imported only here and only on demand: nsa_core imports without Triton.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference
from .config import NSAConfig

BACKENDS = ("reference", "triton", "auto")


class BackendError(RuntimeError):
    """The requested backend cannot run this model here."""


def resolve(name: str, config: NSAConfig, *, device: torch.device | str, dtype: torch.dtype) -> tuple[ModuleType, str]:
    """(module implementing the functional API, reason) for backend name on device and dtype."""
    if name not in BACKENDS:
        raise BackendError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if name == "reference":
        return reference, "reference PyTorch (requested)"
    ok, reason, kernels = _kernels_support(config, device=torch.device(device), dtype=dtype)
    if ok:
        return kernels, f"Triton kernels ({reason})"
    if name == "triton":
        raise BackendError(f"the Triton backend cannot run here: {reason}")
    return reference, f"reference PyTorch: {reason}"


def _kernels_support(config: NSAConfig, *, device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        return False, f"the kernels need a CUDA device, this runs on {device.type}", None
    try:
        import kernels
    except ImportError as err:  # Triton missing or broken on this machine
        return False, f"the kernels cannot be imported ({err})", None
    ok, reason = kernels.supports(config, device=device, dtype=dtype)
    return ok, reason, kernels
