"""The worker's kernels: Triton on CUDA, plain PyTorch (reference.py) elsewhere.

`load_kernels("auto" | "triton" | "torch", device)` returns the module whose functions the
engine calls; both modules have the same functions with the same signatures.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from meshserve.worker.kernels import reference

BACKENDS = ("auto", "triton", "torch")


def load_kernels(backend: str, device: torch.device) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernels run on CUDA, or on CPU only under TRITON_INTERPRET=1 (slow; for tests)")
    try:
        from meshserve.worker.kernels import triton_ops
    except ImportError as exc:
        raise ValueError(
            f"the Triton kernels need the triton package ({exc}); install it or use kernels=torch"
        ) from exc
    return triton_ops
