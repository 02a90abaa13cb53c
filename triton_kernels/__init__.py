"""Triton kernels of treeattn, installed as ``treeattn.triton_kernels``.

One module per attention family, each holding its stage-1 kernel and the launcher that runs a decode step
(stage 1, then the stage-2 merge of partial states): ``gqa_decode`` and ``mla_decode``. What they share:
``stage1`` (the walk of a work item and the epilogue), ``softmax`` (the online softmax and the state fold,
also used by the merges), ``merge_partials`` (stage 2), ``configs`` (the tile table). ``merge_state`` is the
pairwise merge op's kernel; ``kv_write`` the cache writes; ``fp8`` the FP8 encode and scales.
Naming: ``_x_kernel`` (the ``@triton.jit`` function) → ``x`` (host launcher taking tensors).
"""

from .gqa_decode import tree_decode
from .kv_write import copy_pages, kv_write, pool_rows, prepare_kv_write
from .merge_partials import merge_partials
from .merge_state import merge_state
from .mla_decode import mla_tree_decode

__all__ = [
    "copy_pages", "kv_write", "merge_partials", "merge_state",
    "mla_tree_decode", "pool_rows", "prepare_kv_write", "tree_decode",
]
