"""Loader for the optional CUDA extension ``treeattn._C``.

Importing this module never fails. After import:

- ``HAS_CUDA_EXT``: True when ``treeattn._C`` loaded and its ops are registered under
  ``torch.ops.treeattn`` (the schemas register on a CPU-only machine too; the CUDA kernels of
  course need CUDA tensors, so callers still pick the implementation per device).
- ``load_error``: why the extension is unavailable (a string), or None.
- ``OPS``: the names of the C++ ops this module expects (each has a fake impl registered here).

The C++ side (csrc/registration.cpp) names this module in ``m.set_python_module``: torch checks
that ``register_fake`` for those ops is called from here, and imports this module on demand.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["HAS_CUDA_EXT", "load_error", "OPS"]

# Every op that csrc/registration.cpp defines.
OPS = ("merge_state_cuda", "kv_write_cuda")

HAS_CUDA_EXT: bool = False
load_error: str | None = None


def _load() -> str | None:
    """Import treeattn._C; return None on success, else the reason it is unavailable."""
    try:
        from treeattn import _C  # noqa: F401  (loading the library runs TORCH_LIBRARY)
    except ImportError as e:  # not built, or built against another torch / CUDA
        return f"treeattn._C could not be imported: {e}"
    except OSError as e:  # e.g. a missing shared library dependency
        return f"treeattn._C could not be loaded: {e}"
    missing = [name for name in OPS if not hasattr(torch.ops.treeattn, name)]
    if missing:
        return f"treeattn._C loaded but does not define torch.ops.treeattn.{', '.join(missing)}"
    return None


def _register_fakes() -> str | None:
    """Register the fake (meta) impls so the ops trace under torch.compile / FakeTensorMode."""

    def merge_state_cuda_fake(o_a, lse_a, o_b, lse_b, o_out, lse_out):
        # Mutates o_out and lse_out in place; returns nothing.
        return None

    def kv_write_cuda_fake(slots, k, v, pool, layer):
        # Mutates pool in place; returns nothing.
        return None

    fakes = {"treeattn::merge_state_cuda": merge_state_cuda_fake, "treeattn::kv_write_cuda": kv_write_cuda_fake}
    errors = []
    for qualname, fn in fakes.items():
        try:
            torch.library.register_fake(qualname, fn)
        except RuntimeError as e:
            # Already registered (e.g. this module was reloaded): the existing impl stays.
            if "already" not in str(e):
                errors.append(f"register_fake({qualname}) failed: {e}")
    return "; ".join(errors) or None


load_error = _load()
HAS_CUDA_EXT = load_error is None
if HAS_CUDA_EXT:
    _fake_error = _register_fakes()
    if _fake_error is not None:  # eager calls still work; tracing these ops will not
        warnings.warn(f"treeattn: {_fake_error}", RuntimeWarning, stacklevel=2)
