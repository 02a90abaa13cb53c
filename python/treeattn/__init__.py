"""treeattn: decode attention for tree-structured generation that reads shared KV once per step.

    plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=16)   # once per step
    o = treeattn.tree_decode(q, k_cache, v_cache, plan)                            # every layer
    o = treeattn.mla_tree_decode(q, kv_cache, plan, sm_scale=s)                    # MLA, every layer
    cache = treeattn.TreeKVCache(...); plan = cache.plan(leaves)                   # paged tree cache
    o = treeattn.tree_decode(q, **cache.layer(i), plan=plan)                       # any pool, every layer
"""

from importlib import metadata as _metadata

from . import reference
from ._dispatch import backend_for, backends
from .cache import KVLayer, OutOfPages, TreeKVCache
from .decode import mla_tree_decode, tree_decode
from .merge import merge_state
from .plan import PlanCapacity, TreePlan, plan

__all__ = [
    "PlanCapacity", "TreePlan", "plan", "tree_decode", "mla_tree_decode", "merge_state", "reference", "TreeKVCache",
    "KVLayer", "OutOfPages", "backends", "backend_for",
]
try:  # the one version is pyproject.toml's, read from the installed distribution
    __version__ = _metadata.version("treeattn")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
