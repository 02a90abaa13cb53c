"""HF's continuation idiom on a :class:`~treeattn.hf.TreeCache`: ``treeattn.hf.generate(model, torch.cat([
out.sequences, new_ids], -1), past_key_values=out.cache, ...)`` continues an earlier call's rows, computing only
the new tokens (as ``model.generate(..., past_key_values=out.past_key_values)`` does).

The earlier cache is left as it was (its rows are released when it is garbage collected): the continuation
runs in a new :class:`TreeCache` whose rows start as forks of the earlier rows (no copy) when the earlier pool
has room for the continuation, else as copies in a new, larger pool (rows that shared KV still share it
there). So one cache can be continued several times (branching), and a failing call changes nothing.

Only caches :func:`treeattn.hf.generate` returned are continued (it records which rows they hold: the model,
each row's tokens, whether beam search reordered them), and an empty :class:`TreeCache` is used as it is, as
``model.generate`` uses a cache it is given.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .adapter import inspect_model
from .cache import TreeCache

__all__ = ["Continuation", "continue_cache", "record"]


@dataclass(frozen=True)
class _Record:
    """What a returned TreeCache's rows hold: ``tokens [rows, positions + 1]`` (the returned sequences; None
    when the call started from ``inputs_embeds``), and why its rows cannot be continued (None if they can)."""

    model: weakref.ref
    tokens: torch.Tensor | None
    refused: str | None


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record(cache: TreeCache, model, sequences: torch.Tensor, *, from_ids: bool, refused: str | None = None) -> None:
    """Remember that ``cache`` (returned by a ``treeattn.hf.generate`` call of ``model``) holds ``sequences``'
    rows (but their last token): a later call may continue it. ``refused``: why it may not (beam search)."""
    tokens = sequences.detach().cpu() if from_ids else None
    _RECORDS[cache] = _Record(weakref.ref(model), tokens, refused)
    # Its rows may share a pool with later calls that continued it: give their pages back once it is gone.
    weakref.finalize(cache, _release_live, cache.tree, cache.rows)


def _release_live(tree, nodes) -> None:
    live = set(tree.tree.live_ids())
    for node in nodes:
        if node in live:  # (node ids are never reused: a live one is still this cache's)
            tree.release(node)


@dataclass
class Continuation:
    """A prepared continuation: ``cache`` (a new TreeCache, or the given empty one) and the live leaves of its
    pool that the call's prompt rows continue (``leaves[i]`` for the earlier row ``i``; empty for none)."""

    cache: TreeCache
    leaves: list[int]

    def expand(self, times: int) -> list[int]:
        """The leaf of each batch row once ``model.generate`` repeats every row ``times`` times."""
        return [leaf for leaf in self.leaves for _ in range(times)]

    def release_unused(self) -> None:
        """Release the leaves no prompt step took (a call that failed before its prompt ran)."""
        _release_live(self.cache.tree, self.leaves)
        self.leaves = []


def continue_cache(model, past, input_ids, num_prompts: int, num_rows: int, width: int, max_length: int,
                   name: str = "past_key_values") -> Continuation:
    """The cache a ``treeattn.hf.generate`` call given ``past_key_values=past`` runs in.

    ``input_ids``: the call's ``[num_prompts, width]`` prompt (None when it gives ``inputs_embeds``, of
    ``width`` positions too), which ``model.generate`` expands into ``num_rows`` rows (samples or beams);
    ``max_length``: the longest sequence the call may return (prompt and new tokens), to size the pool.
    Raises ``ValueError`` (``past_key_values: expected ...``; ``name``: the argument as the call named it) for a
    cache that cannot be continued here."""
    if not isinstance(past, TreeCache):
        raise ValueError(f"{name}: expected None or the TreeCache of an earlier treeattn.hf.generate call (its "
                         f"out.cache, with return_dict_in_generate=True), got {type(past).__name__}")
    if past.prefixes is not None:
        raise ValueError(f"{name}: expected a TreeCache of a call without prefix_cache, got one of a "
                         "prefix_cache call (pass prefix_cache= again instead: it holds the earlier sequences)")
    if past.step.mode != "idle":
        raise ValueError(f"{name}: expected a TreeCache between calls, got one running a {past.step.mode} "
                         "step")
    if inspect_model(model) != past.spec:
        raise ValueError(f"{name}: expected a TreeCache made for this model's KV layout, got one for another "
                         f"({past.spec.model_type}, {past.spec.num_layers} layers)")
    if not past.rows:
        return Continuation(past, [])
    rec = _RECORDS.get(past)
    if rec is None:
        raise ValueError(f"{name}: expected the TreeCache a treeattn.hf.generate call returned (or an empty "
                         "one), got one holding rows no such call left (a TreeSearch's, or a speculative call's)")
    if rec.refused:
        raise ValueError(f"{name}: expected the TreeCache of a call without {rec.refused}, got one with it "
                         "(its rows are not the returned sequences)")
    if rec.model() is not model:
        raise ValueError(f"{name}: expected a TreeCache made by this model, got one another model filled")
    rows, positions = len(past.rows), past.positions
    if num_prompts != rows:
        raise ValueError(f"{name}: expected a TreeCache with {num_prompts} rows (the batch), got {rows}")
    if width <= positions:
        raise ValueError(f"input_ids: expected more than the {positions} positions past_key_values holds (the "
                         f"earlier sequences and at least one new token), got {width}")
    if input_ids is not None:
        if rec.tokens is not None:
            seen = input_ids[:, :positions].detach().cpu()
            differs = (seen != rec.tokens[:, :positions]).any(dim=1).nonzero().flatten().tolist()
            if differs:
                raise ValueError(f"input_ids: expected rows that start with the earlier call's sequences (whose KV "
                                 f"past_key_values holds), got row {differs[0]} differing")
    tree, page = past.tree, past.page_size
    grow = max(max_length - 1 - positions, 1)  # tokens a row may still store (its last is never fed back)
    need = num_rows * (-(-grow // page) + 1)  # (+1: a copy on write of each row's shared last page)
    if tree.stats()["pages_free"] >= need:
        cache = TreeCache(model, tree=tree, sized_by="treeattn.hf.generate")
        return Continuation(cache, [tree.fork(r, 1)[0] for r in past.rows])
    held = tree.stats()["pages_used"]
    cache = TreeCache(model, page_size=page, num_pages=max(2 * tree.num_pages, held + need), device=tree.device,
                      dtype=tree.dtype, sized_by="treeattn.hf.generate")
    return Continuation(cache, copy_rows(past, cache))


def copy_rows(source: TreeCache, target: TreeCache) -> list[int]:
    """New live leaves of ``target``'s pool holding the KV of ``source``'s rows (one per row, in order), rows
    that read the same slots in ``source`` sharing them in ``target`` too. ``target``'s pool must have room."""
    paths = [source.tree.path_slots(r).cpu() for r in source.rows]
    leaves: list[int | None] = [None] * len(paths)
    tree = target.tree

    def build(group: list[int], depth: int, leaf: int | None) -> None:
        # ``group``'s rows read the same slots up to ``depth``; ``leaf`` (None at depth 0) holds them in ``target``.
        head = paths[group[0]]
        end = min(len(paths[i]) for i in group)
        for i in group[1:]:
            differ = (paths[i][depth:end] != head[depth:end]).nonzero()
            if len(differ):
                end = depth + int(differ[0])
        if end > depth:
            if leaf is None:
                leaf = tree.add(end)
                slots = tree.slots(leaf)
            else:
                slots = tree.append([leaf], end - depth)
            for layer in range(source.spec.num_layers):
                tree.write(layer, slots, *(t[depth:] for t in source._stored(layer, source.rows[group[0]], end)))
        ending = [i for i in group if len(paths[i]) == end]
        branches: dict[int, list[int]] = {}
        for i in group:
            if len(paths[i]) > end:
                branches.setdefault(int(paths[i][end]), []).append(i)
        count = len(ending) + len(branches)
        if leaf is None:  # (rows with nothing in common: each its own root)
            for i in ending:
                leaves[i] = tree.add(0)
            for sub in branches.values():
                build(sub, 0, None)
            return
        if count == 1:
            kids = [leaf]
        else:
            kids = tree.fork(leaf, count)
            tree.release(leaf)  # (its children hold its tokens)
        for i in ending:
            leaves[i] = kids.pop()
        for sub in branches.values():
            build(sub, end, kids.pop())

    build(list(range(len(paths))), 0, None)
    return leaves
