"""The page allocator behind :class:`treeattn.TreeKVCache`: which pages are in use, how many nodes hold each,
how far each is filled, and when a branch that grows out of a shared, partially filled page must copy it.

Pure host bookkeeping (numpy and lists, no tensors): the cache turns the copies decided here into one device
launch. A page's **reference count** is the number of nodes whose page list holds it; a page is free at zero.
A page's **fill** is how many of its slots (from slot 0) some node has claimed. A branch whose path ends at
offset ``off`` inside a page continues there **in place** when nobody has claimed slot ``off`` yet
(``fill == off``); otherwise it gets a fresh page whose first ``off`` slots are a copy of that page (**copy
on write**).

Every method either does all it says or raises leaving the allocator unchanged.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PageAllocator", "Growth", "OutOfPages"]


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a call needs; the cache is unchanged.

    Attributes: ``pages_needed`` (what the call needed), ``pages_free`` (what was free).
    """

    def __init__(self, pages_needed: int, pages_free: int, what: str = ""):
        self.pages_needed = int(pages_needed)
        self.pages_free = int(pages_free)
        super().__init__(
            f"TreeKVCache{'.' + what if what else ''}: out of pages: needs {self.pages_needed} pages, "
            f"{self.pages_free} free (release nodes or create the cache with more num_pages); the cache is unchanged"
        )


@dataclass
class Growth:
    """What :meth:`PageAllocator.grow` decided for one call, before anything changed.

    ``new_pages[b]``: pages branch ``b`` adds to the end of its page list (the shared tail page it continues in
    place, when it did not hold it yet, then its copy or fresh pages). ``copy_src``/``copy_dst``/``copy_slots``:
    page copies to run on the device before the new tokens are written: page ``copy_dst[i]``'s first
    ``copy_slots[i]`` slots = page ``copy_src[i]``'s (the destinations are free pages until
    :meth:`PageAllocator.commit`).
    """

    new_pages: list[list[int]]
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)
    copy_slots: list[int] = field(default_factory=list)
    # The bookkeeping commit() applies, as parallel lists (commit updates the counts in one numpy call each):
    # fresh pages and their fills, in the order they leave the free list; and each page continued in place,
    # its fill after the call; and the continued pages that gain a holder (a branch continuing an ancestor's
    # page), once per new holder (a page may be continued by more than one branch of a call).
    taken: list[int] = field(default_factory=list, repr=False)
    taken_fills: list[int] = field(default_factory=list, repr=False)
    continued: list[int] = field(default_factory=list, repr=False)
    continued_fills: list[int] = field(default_factory=list, repr=False)
    new_holders: list[int] = field(default_factory=list, repr=False)


class PageAllocator:
    """Reference counts, fills and the free list of a pool of ``num_pages`` pages of ``page_size`` slots.

    Pages are handed out lowest id first. ``pages_copied`` counts the copies on write decided so far.
    """

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcount = np.zeros(num_pages, dtype=np.int64)
        self._fill = np.zeros(num_pages, dtype=np.int64)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.pages_copied = 0

    # ---- inspection ----

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        """Nodes holding ``page`` (0: free)."""
        return int(self._refcount[page])

    def fill(self, page: int) -> int:
        """Slots of ``page`` some node has claimed (0 for a free page)."""
        return int(self._fill[page])

    def free_pages(self) -> list[int]:
        """The free pages, in the order they will be handed out."""
        return self._free[::-1]

    # ---- changes ----

    def _take(self, fill: int) -> int:
        page = self._free.pop()
        self._refcount[page] = 1
        self._fill[page] = fill
        return page

    def _check_fits(self, need: int, what: str) -> None:
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), what)

    def allocate(self, num_tokens: int, what: str = "allocate") -> array:
        """Fresh pages for a run of ``num_tokens`` tokens starting at a page start, each held once and filled
        as far as the run reaches. Returns their ids (int32 ``array``); raises :class:`OutOfPages`."""
        s = self.page_size
        need = -(-num_tokens // s)
        self._check_fits(need, what)
        return array("i", [self._take(min(s, num_tokens - i * s)) for i in range(need)])

    def extend(self, branches: Sequence[tuple[int, int, bool]], num_tokens: int, what: str = "extend") -> Growth:
        """:meth:`grow`, then :meth:`commit`: grow every branch by ``num_tokens`` slots in one step."""
        growth = self.grow(branches, num_tokens, what)
        self.commit(growth)
        return growth

    def grow(self, branches: Sequence[tuple[int, int, bool]], num_tokens: int, what: str = "extend") -> Growth:
        """Decide how every branch grows by ``num_tokens`` slots, changing nothing (:meth:`commit` applies it,
        so the caller can run the copies first and drop the decision if they fail).

        ``branches[b] = (end, tail_page, holds_tail)``: the branch's path holds ``end`` tokens; when ``end``
        is not a multiple of ``page_size``, ``tail_page`` is the page holding its last token and ``holds_tail``
        says the growing node already holds that page (else it continues an ancestor's page and, in place,
        starts holding it too). Branches that leave the same page are decided in order: the first continues
        in place if the page allows it, the others copy. Raises :class:`OutOfPages` when the free pages do not
        cover the call's fresh pages and copies.
        """
        s, k = self.page_size, num_tokens
        claimed: dict[int, int] = {}  # tail page -> fill once this call's earlier branches have claimed slots
        decided = []
        need = 0
        for end, tail, holds_tail in branches:
            off = end % s
            in_place = False
            if off:
                in_place = claimed.get(tail, int(self._fill[tail])) == off
                if in_place:
                    claimed[tail] = min(s, off + k)
                else:
                    need += 1
            fresh = -(-(end + k) // s) - -(-end // s)
            need += fresh
            decided.append((off, tail, holds_tail, in_place, fresh))
        self._check_fits(need, what)

        growth = Growth(new_pages=[])
        upcoming = iter(self._free[::-1])  # the pages commit() will take, in order

        def take(fill: int) -> int:
            page = next(upcoming)
            growth.taken.append(page)
            growth.taken_fills.append(fill)
            return page

        for off, tail, holds_tail, in_place, fresh in decided:
            pages = []
            if off and in_place:
                if not holds_tail:
                    pages.append(tail)
                growth.continued.append(tail)
                growth.continued_fills.append(min(s, off + k))
                if not holds_tail:
                    growth.new_holders.append(tail)
            elif off:
                page = take(min(s, off + k))
                pages.append(page)
                growth.copy_src.append(tail)
                growth.copy_dst.append(page)
                growth.copy_slots.append(off)
            first_fresh = k - (min(s - off, k) if off else 0)  # tokens left for fresh pages
            pages.extend(take(min(s, first_fresh - i * s)) for i in range(fresh))
            growth.new_pages.append(pages)
        return growth

    def commit(self, growth: Growth) -> None:
        """Apply what :meth:`grow` decided; nothing may have changed the allocator in between."""
        taken = growth.taken
        if taken != self._free[: -len(taken) - 1 : -1]:
            raise RuntimeError("growth: expected the allocator unchanged since grow() decided it")
        if taken:
            del self._free[-len(taken):]
            self._refcount[taken] = 1
            self._fill[taken] = growth.taken_fills
        if growth.continued:
            # (a page continued twice in one call: the fill assigned last, a later branch's and the larger, is
            # the one sequential updates leave; add.at counts each of its new holders)
            self._fill[growth.continued] = growth.continued_fills
        if growth.new_holders:
            np.add.at(self._refcount, growth.new_holders, 1)
        self.pages_copied += len(growth.copy_src)

    def share(self, pages: Iterable[int]) -> None:
        """Each of ``pages`` (in use) gets one more holder."""
        for page in pages:
            self._refcount[page] += 1

    def take(self, fills: Sequence[int], what: str = "take") -> list[int]:
        """Fresh pages, ``fills[i]`` slots of the i-th claimed: the first ``len(fills)`` of :meth:`free_pages`.
        Raises :class:`OutOfPages` (nothing taken) when fewer are free."""
        self._check_fits(len(fills), what)
        return [self._take(f) for f in fills]

    def release(self, pages: Iterable[int], start: int) -> None:
        """A node that held ``pages`` (its page list) and started at path position ``start`` is gone: each page
        loses a holder and is freed at zero. A node that continued an ancestor's page in place gives back the
        slots it claimed there (from ``start % page_size`` on)."""
        off = start % self.page_size
        for i, page in enumerate(pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                self._fill[page] = 0
                self._free.append(page)
            elif i == 0 and off:
                self._fill[page] = off
