"""Triton kernels of treeattn, installed as ``treeattn.triton_kernels``.

Naming: ``_x_kernel`` (the ``@triton.jit`` function) → ``x`` (host launcher taking tensors). The public ops
live in ``treeattn.ops`` and reach these launchers only through ``treeattn._dispatch``.
"""

from .kv_write import copy_pages, kv_write
from .merge import merge_partials, merge_state
from .mla_decode import mla_tree_decode_stage1
from .tree_decode import tree_decode_stage1

__all__ = ["copy_pages", "kv_write", "merge_partials", "merge_state", "mla_tree_decode_stage1", "tree_decode_stage1"]
