"""The one place that picks a backend per op and device: CUDA extension, then Triton, then the fp32 reference.

Each op module registers its backend implementations next to the op with :func:`register`; the op calls
:func:`run`. On CPU, Triton runs only under ``TRITON_INTERPRET=1`` (set before triton is imported);
otherwise the reference serves.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

BACKEND_ORDER = ("cuda", "triton", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {}
_forced: str | None = os.environ.get("TREEATTN_BACKEND") or None

try:
    from treeattn import triton_kernels
except ImportError:  # triton missing or broken: the reference serves instead
    triton_kernels = None


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in BACKEND_ORDER:
        raise ValueError(f"backend: expected one of {BACKEND_ORDER}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def _available(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cuda":
        from . import _ext

        return device.type == "cuda" and _ext.HAS_CUDA_EXT
    if backend == "triton":
        if triton_kernels is None:
            return False
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return False


def select(op: str, device: torch.device) -> str:
    """Backend that serves ``op`` on ``device``; ``TREEATTN_BACKEND`` (or :func:`force`) overrides the order."""
    impls = _IMPLS.get(op, {})
    if _forced is not None:
        if _forced not in impls or not _available(_forced, device):
            raise ValueError(
                f"TREEATTN_BACKEND: expected a backend available for {op} on {device} "
                f"(one of {[b for b in BACKEND_ORDER if b in impls and _available(b, device)]}), got {_forced!r}"
            )
        return _forced
    for backend in BACKEND_ORDER:
        if backend in impls and _available(backend, device):
            return backend
    raise RuntimeError(f"no backend implements {op} on {device}")


def run(op: str, device: torch.device, *args, **kwargs):
    return _IMPLS[op][select(op, device)](*args, **kwargs)


class force:
    """Context manager pinning every op to one backend (tests and benchmarks compare backends with it)."""

    def __init__(self, backend: str | None):
        self.backend = backend

    def __enter__(self):
        global _forced
        self._saved, _forced = _forced, self.backend
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self._saved
