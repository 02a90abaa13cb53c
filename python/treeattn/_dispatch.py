"""The one place that picks a backend per op and device: CUDA extension, then Triton, then the fp32 reference.

Each op module registers its backend implementations next to the op with :func:`register`; an op calls
:func:`run` (or takes :func:`implementation` once and keeps it). :func:`backends` says what can serve a
device and why the others cannot; :func:`backend_for` says which backend an op runs on a device. On CPU,
Triton runs only under ``TRITON_INTERPRET=1`` set before triton is imported; otherwise the reference serves,
and the first op that falls back to it says so once per process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from ._validate import check_backend_dtype

__all__ = [
    "AVAILABLE", "BACKEND_ORDER", "backend_for", "backends", "force", "implementation", "register", "run", "select",
    "select_for",
]

BACKEND_ORDER = ("cuda", "triton", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {}
_forced: str | None = os.environ.get("TREEATTN_BACKEND") or None

try:
    from treeattn import triton_kernels

    _triton_error = None
except ImportError as e:  # triton missing or broken: the reference serves instead
    triton_kernels = None
    _triton_error = f"triton: not importable ({e})"
# Triton decides at @triton.jit time (when treeattn.triton_kernels is imported) whether its kernels run in
# the CPU interpreter; setting the variable later changes nothing.
_INTERPRETED = triton_kernels is not None and os.environ.get("TRITON_INTERPRET") == "1"

_selected: dict[tuple, str] = {}
_warned_reference_fallback = False


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKEND_ORDER:
        raise ValueError(f"backend: expected one of {BACKEND_ORDER}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot serve ``device`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"cuda: the CUDA extension serves CUDA tensors, got device {device}"
        from . import _ext

        return None if _ext.HAS_CUDA_EXT else f"cuda: {_ext.load_error}"
    if backend == "triton":
        if _triton_error is not None:
            return _triton_error
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if _INTERPRETED else "triton: CPU needs TRITON_INTERPRET=1 set before triton is imported"
        return f"triton: serves CUDA tensors (and CPU ones in its interpreter), got device {device}"
    return f"{backend}: unknown backend"


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if hasattr(device, "device") and not isinstance(device, (str, torch.device)):  # a plan or a tensor
        device = device.device
    return torch.device(device)


AVAILABLE = "available"


def backends(device=None) -> dict[str, str]:
    """Every backend, in the order ops prefer them, mapped to ``"available"`` when it can serve ``device`` and
    otherwise to why it cannot. ``device``: a torch.device or string, a plan or a tensor (its device); default
    CUDA when available, else CPU.

    Example:
        >>> treeattn.backends("cpu")
        {'cuda': 'cuda: the CUDA extension serves CUDA tensors, got device cpu',
         'triton': 'triton: CPU needs TRITON_INTERPRET=1 set before triton is imported', 'reference': 'available'}
    """
    device = _as_device(device)
    return {backend: _unavailable(backend, device) or AVAILABLE for backend in BACKEND_ORDER}


def backend_for(op: str, device=None) -> str:
    """The backend that ``op`` (``"tree_decode"``, ``"mla_tree_decode"``, ``"merge_state"``, ...) runs on
    ``device`` (as in :func:`backends`), honouring ``TREEATTN_BACKEND`` and :class:`force`."""
    if op not in _IMPLS:
        raise ValueError(f"op: expected one of {sorted(_IMPLS)}, got {op!r}")
    return _choose(op, _as_device(device))


def forced() -> str | None:
    """The backend pinned by ``TREEATTN_BACKEND`` or :class:`force`, if any."""
    return _forced


def select(op: str, device: torch.device) -> str:
    """Backend that serves ``op`` on ``device``; ``TREEATTN_BACKEND`` (or :class:`force`) overrides the order.
    Decided once per (op, device, pinned backend)."""
    key = (op, device, _forced)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _choose(op, device)
        if backend == "reference" and _forced is None and "triton" in _IMPLS.get(op, {}):
            _warn_reference_fallback(op, device)
    return backend


def select_for(op: str, name: str, t: torch.Tensor) -> str:
    """:func:`select` for the device of argument ``name`` (``t``), which the backend must be able to compute
    in (the Triton interpreter on CPU has no bfloat16)."""
    backend = select(op, t.device)
    check_backend_dtype(name, t, backend)
    return backend


def _warn_reference_fallback(op: str, device: torch.device) -> None:
    global _warned_reference_fallback
    if not _warned_reference_fallback:
        _warned_reference_fallback = True
        warnings.warn(
            f"treeattn: {op} on {device} runs the slow fp32 reference ({_unavailable('triton', device)}); "
            "treeattn.backends() lists what serves each device",
            RuntimeWarning,
            stacklevel=3,
        )


def _choose(op: str, device: torch.device) -> str:
    impls = _IMPLS.get(op, {})
    if _forced is not None:
        why = f"{_forced}: does not implement {op}" if _forced not in impls else _unavailable(_forced, device)
        if why is not None:
            raise ValueError(
                f"TREEATTN_BACKEND: expected a backend available for {op} on {device} "
                f"(one of {[b for b in BACKEND_ORDER if b in impls and _unavailable(b, device) is None]}), "
                f"got {_forced!r} ({why})"
            )
        return _forced
    for backend in BACKEND_ORDER:
        if backend in impls and _unavailable(backend, device) is None:
            return backend
    raise RuntimeError(f"no backend implements {op} on {device}")


def implementation(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The registered implementation of ``op`` for ``backend`` (default: the one :func:`select` picks)."""
    return _IMPLS[op][backend or select(op, device)]


def run(op: str, device: torch.device, *args, **kwargs):
    return implementation(op, device)(*args, **kwargs)


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
