"""Choosing between a Triton kernel and its torch reference."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton is absent on some platforms, or broken beside a CPU-only torch
        return False
    return True


def interpreter_on() -> bool:
    # Triton reads this once, at import time; we read it the same way.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """True when Triton can execute on the device holding `tensors`."""
    if not triton_importable():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_on() and all(t.device.type == "cpu" for t in tensors)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve `backend` ("auto" | "triton" | "torch") for these inputs; clear error if impossible."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = triton_can_run(*tensors)
    if backend == "triton" and not runnable:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            "before triton is imported; use backend='auto' to fall back to the torch reference"
        )
    return runnable
