"""TreeSearch: step-level tree search over chains of thought, the whole frontier decoded in one batch per step.

A search tree over one model whose KV lives in a ``treeattn.TreeKVCache`` (through a
:class:`~treeattn.hf.TreeCache` and the same model adapter as :func:`treeattn.hf.generate`): a node's tokens
continue its parent's, every node shares its ancestors' pages, and ``expand`` grows many children from many
nodes together — one append, one plan and one forward of the model per step for the whole frontier.

A node's KV covers its tokens once they have been fed to the model: a freshly sampled node's last token is
fed when the node is expanded (one batched step for all the nodes of the call that need it), so its children
fork from KV that holds all of it and start from the logits that step computed.
"""

from __future__ import annotations

import inspect

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..prefix_index import canonical_key
from .adapter import attached, unwrap_compiled
from .cache import TreeCache
from .prefix import PrefixCache


class _Node:
    __slots__ = ("id", "parent", "tokens", "raw", "processed", "cache_node", "fed", "next_logits", "children",
                 "released", "locks")

    def __init__(self, node_id, parent, tokens, cache_node):
        self.id = node_id
        self.parent = parent
        self.tokens: list[int] = tokens  # the node's own tokens (a prompt node: the prompt)
        self.raw: list[float] = []  # per sampled token: the model's log-probability
        self.processed: list[float] = []  # ... and under the sampling distribution that drew it
        self.cache_node = cache_node  # TreeKVCache node whose path is this node's fed tokens
        self.fed = 0  # own tokens whose KV is in the cache
        self.next_logits: torch.Tensor | None = None  # after every token is fed: the next token's logits
        self.children: set[int] = set()
        self.released = False
        self.locks: list = []  # a prompt node over a prefix cache: the locks on its cached prefix and prompt


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _token_ids(name: str, value, vocab: int) -> list[int]:
    """A 1-D sequence of token ids (list of ints, 1-D integer tensor, or ``[1, n]`` tensor) as a list."""
    if isinstance(value, torch.Tensor):
        not_ids = value.dtype.is_floating_point or value.dtype == torch.bool
        if not_ids or value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1):
            raise ValueError(
                f"{name}: expected a 1-D tensor of token ids, got {value.dtype} of shape {list(value.shape)}")
        value = value.reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        value = list(value)
    else:
        raise ValueError(
            f"{name}: expected token ids (a list of ints or a 1-D integer tensor), got {type(value).__name__}")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in value):
        raise ValueError(f"{name}: expected token ids in [0, {vocab}), got {value!r}")
    return value


class TreeSearch:
    """A search tree over one HF causal LM: prompts, sampled children, their tokens and log-probabilities.

    Args:
        model: a HF causal LM (what :func:`treeattn.hf.generate` serves: GQA/MHA families and DeepSeek-V3).
        page_size: tokens per KV page.
        num_pages: the page pool (default: room for 16384 tokens).
        device, dtype: of the KV pool (default: the model's).
        prefix_cache: a :class:`~treeattn.hf.PrefixCache` whose pool the search uses: ``add_prompt`` continues
            the longest cached prefix of the prompt (only the rest is computed), and prompts and released
            nodes stay cached for later searches and ``generate`` calls (``page_size``, ``num_pages``,
            ``device`` and ``dtype`` are the prefix cache's then).
        cache_key: the prefix cache's isolation key for this search's prompts.

    Nodes are ints. ``stats()`` has ``TreeKVCache.stats()``'s keys (``pages_used``, ``tokens_stored``,
    ``tokens_if_unshared``, ``memory_saved``, ...) and ``decode_steps`` (batched decode steps so far)::

        search = treeattn.hf.TreeSearch(model)
        root = search.add_prompt(prompt_ids)
        children = search.expand([root], 4, max_new_tokens=64, stop=[delimiter_ids])[0]
        best = max(children, key=lambda c: search.logprobs(c).mean())
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, device=None, dtype=None,
                 prefix_cache=None, cache_key=None):
        model = unwrap_compiled(model)
        self.model = model
        self._prefixes, self._key = None, cache_key
        if prefix_cache is not None:
            if not isinstance(prefix_cache, PrefixCache):
                raise ValueError(f"prefix_cache: expected a treeattn.hf.PrefixCache, got {type(prefix_cache).__name__}")
            canonical_key(cache_key, "cache_key")
            self.cache = prefix_cache.tree_cache(model, "treeattn.hf.PrefixCache(...)")
            self._prefixes = prefix_cache.prefixes
        else:
            self.cache = TreeCache(model, page_size=page_size, num_pages=num_pages, device=device, dtype=dtype,
                                   sized_by="treeattn.hf.TreeSearch")
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        self.device = next(model.parameters()).device
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._nodes: dict[int, _Node] = {}
        self._next_id = 0
        self._decode_steps = 0

    # ---- reading the tree ----

    def _node(self, node, action: str) -> _Node:
        if isinstance(node, bool) or not isinstance(node, int):
            raise ValueError(f"{action}: expected a node (an int from add_prompt/expand), got {node!r}")
        n = self._nodes.get(node)
        if n is None or n.released:
            if 0 <= node < self._next_id:
                raise ValueError(f"{action}: node {node} was released")
            raise ValueError(f"{action}: unknown node {node} (not made by this search)")
        return n

    def tokens(self, node: int) -> torch.Tensor:
        """1-D LongTensor: every token on the root→node path, the prompt included."""
        n, chain = self._node(node, "tokens"), []
        while n is not None:
            chain.append(n.tokens)
            n = n.parent
        return torch.tensor([t for part in reversed(chain) for t in part], dtype=torch.long)

    def new_tokens(self, node: int) -> torch.Tensor:
        """1-D LongTensor: the node's own tokens (a prompt node's: the prompt)."""
        return torch.tensor(self._node(node, "new_tokens").tokens, dtype=torch.long)

    def logprobs(self, node: int, processed: bool = False) -> torch.Tensor:
        """1-D float32, one per new token: the raw model's log-probability of each (``processed=True``: under
        the sampling distribution that drew it, after temperature / top-k / top-p). Empty for a prompt node."""
        n = self._node(node, "logprobs")
        return torch.tensor(n.processed if processed else n.raw, dtype=torch.float32)

    def parent(self, node: int) -> int | None:
        """The node's parent (None for a prompt node), also after the parent was released."""
        p = self._node(node, "parent").parent
        return None if p is None else p.id

    def children(self, node: int) -> list[int]:
        """The node's live children, oldest first."""
        n = self._node(node, "children")
        return sorted(c for c in n.children if not self._nodes[c].released)

    def nodes(self) -> list[int]:
        """Every live node, oldest first."""
        return sorted(i for i, n in self._nodes.items() if not n.released)

    def stats(self) -> dict:
        """``TreeKVCache.stats()`` of the search's KV, and ``decode_steps`` (batched decode steps so far)."""
        return {**self.cache.tree.stats(), "decode_steps": self._decode_steps}

    # ---- changing the tree ----

    def release(self, node: int) -> None:
        """Release the node: it can no longer be used; the KV only it needed returns to the pool (its live
        descendants keep theirs, and their tokens)."""
        n = self._node(node, "release")
        if self._prefixes is not None:  # the node's fed tokens stay cached for later prompts
            tokens = self.tokens(node)
            self._prefixes.insert(self._key, tokens[: self.cache.tree.length(n.cache_node)], n.cache_node)
        n.released = True
        self.cache.tree.release(n.cache_node)
        for lock in n.locks:
            self._prefixes.unlock(lock)
        n.locks = []
        while n is not None and n.released and not n.children:  # forget what nothing live refers to
            del self._nodes[n.id]
            if n.parent is not None:
                n.parent.children.discard(n.id)
            n = n.parent

    def _new_node(self, parent: _Node | None, tokens: list[int], cache_node: int) -> _Node:
        return self._adopt(_Node(None, parent, tokens, cache_node))

    def _adopt(self, n: _Node) -> _Node:
        """Give a drafted node its id and make it part of the tree."""
        n.id = self._next_id
        self._next_id += 1
        self._nodes[n.id] = n
        if n.parent is not None:
            n.parent.children.add(n.id)
        return n

    def _forward(self, **inputs) -> torch.Tensor:
        if self._keeps_last_logits:
            inputs["logits_to_keep"] = 1
        return self.model(**inputs, cache=self.cache, use_cache=True).logits[:, -1].float()

    @torch.no_grad()
    def add_prompt(self, input_ids) -> int:
        """A new root node holding the prompt (``input_ids``: 1-D token ids), prefilled once."""
        prompt = _token_ids("input_ids", input_ids, self.vocab_size)
        if not prompt:
            raise ValueError("input_ids: expected at least one token, got none")
        cache = self.cache
        rows = cache.rows
        locks, hit, leaf = [], 0, None
        try:
            if self._prefixes is not None:
                hit, leaf = self._match_prompt(prompt, locks)
            else:
                cache.expect_prompt()
            with attached(self.model, cache):
                logits = self._forward(input_ids=torch.tensor([prompt[hit:]], device=self.device))
        except BaseException:
            if not cache.expects_prompt:  # the prefill was stored before the failure: take it back
                cache.tree.release(cache.rows[0])
            elif leaf is not None and leaf in cache.tree.tree.live_ids():  # (the prompt step never took it)
                cache.tree.release(leaf)
            cache.set_rows(rows)
            for lock in locks:
                self._prefixes.unlock(lock)
            raise
        finally:
            cache.on_prompt = None
        if self._prefixes is not None:
            self._prefixes.count_prefill(len(prompt) - hit)
        node = self._new_node(None, prompt, cache.rows[0])
        node.locks = locks
        node.fed, node.next_logits = len(prompt), logits[0]
        return node.id

    def _match_prompt(self, prompt: list[int], locks: list) -> tuple[int, int | None]:
        """Continue the prompt's longest cached prefix in the next prompt step (and cache the prompt once it is
        stored); returns the tokens matched and the leaf holding them. The locks taken go to ``locks``."""
        prefixes, cache = self._prefixes, self.cache
        hit = prefixes.match(self._key, prompt)
        locks.append(hit.lock)
        if hit.leaf is None:
            cache.expect_prompt()
        else:
            cache.continue_from([hit.leaf], hit.length)

        def record(nodes, row_of):
            locks.append(prefixes.insert(self._key, prompt, nodes[0], lock=True)[1])

        cache.on_prompt = record
        return hit.length, hit.leaf

    def _step(self, cache_nodes: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to cache leaf ``cache_nodes[i]``, all in one batched step; returns the logits
        ``[len(cache_nodes), vocab]``."""
        self.cache.set_rows(cache_nodes)
        positions = [[self.cache.tree.length(c)] for c in cache_nodes]
        return self._forward(input_ids=torch.tensor([[t] for t in tokens], device=self.device),
                             position_ids=torch.tensor(positions, device=self.device))

    @torch.no_grad()
    def expand(self, nodes, num_samples: int, *, max_new_tokens: int, stop=None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, generator=None) -> list[list[int]]:
        """Grow ``num_samples`` children from each node, decoding all of them together one batched step at a time.

        Each child samples tokens (through transformers' temperature / top-k / top-p logits processors) until
        its own tokens end with a ``stop`` sequence (kept in its tokens) or it has ``max_new_tokens``; finished
        children drop out of the batch while the others go on.

        Args:
            nodes: live nodes (a node may appear more than once).
            stop: None or a list of stop sequences, each a list of token ids (or one int, or a 1-D tensor);
                they may span several steps.
            generator: None (torch's global generator), one ``torch.Generator`` for the call, or a list with one
                (or None) per node: a node's children draw only from its own generator, so a node expanded with
                the same generator gets the same children whatever else is in the batch.

        Returns:
            For each node, its new children (in order).

        Raises:
            ValueError: bad arguments. treeattn.OutOfPages: the pool cannot hold the expansion at its longest (the
            message says which ``num_pages`` to pass). Whatever the call raises — these, or an exception from the
            model, a logits processor or sampling, or a ``KeyboardInterrupt`` — the tree, its tokens and
            log-probabilities and the pool's pages are as they were before the call (the generators have drawn).
        """
        if isinstance(nodes, (int, torch.Tensor)) and not isinstance(nodes, bool):
            nodes = [int(nodes)] if isinstance(nodes, int) else nodes.tolist()
        if not isinstance(nodes, (list, tuple)) or not nodes:
            raise ValueError(f"nodes: expected a non-empty list of nodes, got {nodes!r}")
        parents = [self._node(n, "expand") for n in nodes]
        _check_int("num_samples", num_samples, 1)
        _check_int("max_new_tokens", max_new_tokens, 1)
        stops = self._stop_sequences(stop)
        generators = self._generators(generator, len(parents))
        processors = self._processors(temperature, top_k, top_p)
        self._reserve(parents, num_samples, max_new_tokens)

        # All or nothing: the call grows scratch cache nodes and draft children; only when every step has
        # succeeded do they join the tree. On any exception (the model, a logits processor, sampling,
        # OutOfPages, KeyboardInterrupt) the cache nodes it made are released, newest first, and the tree, its
        # tokens, log-probabilities and the pool's pages are as they were.
        made: list[int] = []
        rows = self.cache.rows
        try:
            with attached(self.model, self.cache):
                families, fed, steps = self._grow(parents, num_samples, max_new_tokens, stops, processors,
                                                  generators, made)
        except BaseException:
            for node in reversed(made):
                self.cache.tree.release(node)
            raise
        finally:
            self.cache.set_rows(rows)
        for n, (cache_node, logits) in fed.items():  # commit: nothing below raises
            old, n.cache_node, n.next_logits = n.cache_node, cache_node, logits
            n.fed += 1
            self.cache.tree.release(old)  # (its child, the scratch node that holds the fed token, keeps it)
        for group in families:
            for c in group:
                self._adopt(c)
        self._decode_steps += steps
        return [[c.id for c in group] for group in families]

    def _grow(self, parents: list[_Node], num_samples: int, max_new_tokens: int, stops, processors, generators,
              made: list[int]) -> tuple[list[list[_Node]], dict, int]:
        """The work of :meth:`expand`, done on new cache nodes only (each appended to ``made`` as it is made):
        returns the draft children of each parent, for each unfed parent ``(the scratch cache node that holds
        its fed last token, the next token's logits)``, and the number of batched decode steps."""
        tree, steps = self.cache.tree, 0
        fed: dict[_Node, tuple[int, torch.Tensor]] = {}
        unfed = [n for n in dict.fromkeys(parents) if n.next_logits is None]
        if unfed:  # their last sampled token: fed once into a scratch child, shared by all their children
            scratch = []
            for n in unfed:
                scratch.append(tree.fork(n.cache_node, 1)[0])
                made.append(scratch[-1])
            logits = self._step(scratch, [n.tokens[-1] for n in unfed])
            steps += 1
            fed = {n: (c, row) for n, c, row in zip(unfed, scratch, logits)}
        families, logits = [], {}
        for p in parents:
            base, first = fed.get(p, (p.cache_node, p.next_logits))
            forks = tree.fork(base, num_samples)
            made.extend(forks)
            families.append([_Node(None, p, [], c) for c in forks])
            logits.update((id(c), first) for c in families[-1])
        active = [list(f) for f in families]
        while any(active):
            for i, group in enumerate(active):
                if not group:
                    continue
                raw = torch.stack([logits[id(c)] for c in group])
                self._sample(group, raw, processors, generators[i])
                active[i] = [c for c in group if not self._finished(c, max_new_tokens, stops)]
            running = [c for group in active for c in group]
            if not running:
                break
            for c, row in zip(running, self._step([c.cache_node for c in running], [c.tokens[-1] for c in running])):
                c.fed += 1
                logits[id(c)] = row
            steps += 1
        return families, fed, steps

    # ---- expand's parts ----

    def _sample(self, group: list[_Node], raw: torch.Tensor, processors, generator) -> None:
        last = torch.tensor([[c.tokens[-1] if c.tokens else c.parent.tokens[-1]] for c in group], device=raw.device)
        scores = processors(last, raw)
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError(
                "temperature: expected a temperature (with top_k, top_p) that keeps the sampling distribution "
                "finite, got NaN or inf probabilities (a temperature too small for the logits overflows them)"
            )
        picks = torch.multinomial(probs, 1, generator=generator)[:, 0]
        raw_lp = torch.log_softmax(raw, dim=-1).gather(1, picks[:, None])[:, 0].tolist()
        processed_lp = torch.log_softmax(scores, dim=-1).gather(1, picks[:, None])[:, 0].tolist()
        for c, token, a, b in zip(group, picks.tolist(), raw_lp, processed_lp):
            c.tokens.append(token)
            c.raw.append(a)
            c.processed.append(b)

    @staticmethod
    def _finished(c: _Node, max_new_tokens: int, stops: list[list[int]]) -> bool:
        n = len(c.tokens)
        return n >= max_new_tokens or any(n >= len(s) and c.tokens[n - len(s):] == s for s in stops)

    def _stop_sequences(self, stop) -> list[list[int]]:
        if stop is None:
            return []
        if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop: expected a list of stop sequences of token ids, got {stop!r}")
        sequences = []
        for s in stop:
            seq = [s] if isinstance(s, int) and not isinstance(s, bool) else _token_ids("stop", s, self.vocab_size)
            if not seq or not 0 <= seq[0] < self.vocab_size:
                raise ValueError(
                    f"stop: expected non-empty sequences of token ids in [0, {self.vocab_size}), got {s!r}")
            sequences.append(seq)
        return sequences

    def _generators(self, generator, count: int) -> list:
        if generator is None or isinstance(generator, torch.Generator):
            return [generator] * count
        if isinstance(generator, (list, tuple)) and len(generator) == count and all(
                g is None or isinstance(g, torch.Generator) for g in generator):
            return list(generator)
        raise ValueError(
            f"generator: expected None, a torch.Generator or a list of {count} (one per node), got {generator!r}")

    @staticmethod
    def _processors(temperature, top_k, top_p) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k is not None:
            processors.append(TopKLogitsWarper(_check_int("top_k", top_k, 1)))
        if top_p is not None:
            if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
                raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
            if top_p < 1:
                processors.append(TopPLogitsWarper(float(top_p)))
        return processors

    def _reserve(self, parents: list[_Node], num_samples: int, max_new_tokens: int) -> None:
        """Raise OutOfPages (nothing changed) unless the pool holds the expansion at its longest: each unfed
        parent's last token, and every child's first ``max_new_tokens - 1`` tokens (a page copied on write
        included)."""
        page = self.cache.page_size
        unfed = sum(1 for n in dict.fromkeys(parents) if n.next_logits is None)
        self.cache.reserve(unfed + len(parents) * num_samples * (-(-(max_new_tokens - 1) // page) + 1), "expand")

    def format_tree(self, root: int | None = None, *, max_tokens: int = 8) -> str:
        """The tree under ``root`` (default: every prompt) as text, one node a line: id, its new tokens (the
        first ``max_tokens``), their count and mean log-probability; released nodes that live nodes still
        hang from are marked."""
        lines: list[str] = []

        def show(n: _Node, lead: str, tail: str) -> None:
            shown = " ".join(map(str, n.tokens[:max_tokens])) + (" ..." if len(n.tokens) > max_tokens else "")
            what = (f"prompt, {len(n.tokens)} tokens" if n.parent is None else
                    f"{len(n.tokens)} tokens, mean logprob {sum(n.raw) / len(n.raw):.3f}")
            lines.append(f"{lead}node {n.id}{' (released)' if n.released else ''}: [{shown}] ({what})")
            kids = sorted(n.children)
            for i, c in enumerate(kids):
                last = i == len(kids) - 1
                show(self._nodes[c], tail + ("└─ " if last else "├─ "), tail + ("   " if last else "│  "))

        roots = [self._node(root, "format_tree")] if root is not None else [
            n for _, n in sorted(self._nodes.items()) if n.parent is None]
        for r in roots:
            show(r, "", "")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TreeSearch(nodes={len(self.nodes())}, {self.cache.tree!r})"

