"""Triton kernels of treeattn, installed as ``treeattn.triton_kernels``.

One module per attention family, each holding its stage-1 kernel and the launcher that runs a decode step
(stage 1, then the stage-2 merge of partial states): ``gqa_decode`` (which also holds the merge, shared with
MLA) and ``mla_decode``. ``merge_state`` is the pairwise merge op's kernel; ``kv_write`` the cache writes.
Naming: ``_x_kernel`` (the ``@triton.jit`` function) → ``x`` (host launcher taking tensors).
"""

from .gqa_decode import merge_partials, tree_decode, tree_decode_stage1
from .kv_write import copy_pages, kv_write
from .merge_state import merge_state
from .mla_decode import mla_tree_decode, mla_tree_decode_stage1

__all__ = [
    "copy_pages", "kv_write", "merge_partials", "merge_state",
    "mla_tree_decode", "mla_tree_decode_stage1", "tree_decode", "tree_decode_stage1",
]
