"""PageAllocator alone (no tensors, no tree): reference counts, fills, the free list, and the copy-on-write
decisions, through its public methods."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeattn.pages import OutOfPages, PageAllocator


def books(alloc: PageAllocator):
    return (
        [alloc.refcount(p) for p in range(alloc.num_pages)],
        [alloc.fill(p) for p in range(alloc.num_pages)],
        alloc.free_pages(),
        alloc.pages_copied,
    )


def test_allocate_hands_out_low_ids_filled_as_far_as_the_run_reaches():
    alloc = PageAllocator(num_pages=5, page_size=4)
    assert list(alloc.allocate(9)) == [0, 1, 2]
    assert books(alloc) == ([1, 1, 1, 0, 0], [4, 4, 1, 0, 0], [3, 4], 0)
    assert list(alloc.allocate(0)) == []
    assert (alloc.num_used, alloc.num_free) == (3, 2)


def test_allocate_out_of_pages_changes_nothing():
    alloc = PageAllocator(num_pages=3, page_size=4)
    alloc.allocate(5)
    before = books(alloc)
    with pytest.raises(OutOfPages, match=r"TreeKVCache.add: out of pages: needs 2 pages, 1 free") as info:
        alloc.allocate(8, "add")
    assert (info.value.pages_needed, info.value.pages_free) == (2, 1)
    assert books(alloc) == before


def test_extend_continues_in_place_then_copies_on_write():
    """Three branches leave the same half-filled page: the first continues in place (and starts holding the
    page), the others copy its first slots into fresh pages; a branch at a page end gets fresh pages only."""
    alloc = PageAllocator(num_pages=8, page_size=4)
    (tail,) = alloc.allocate(2)  # a parent's path of 2 tokens: page 0, 2 slots claimed
    growth = alloc.extend([(2, tail, False), (2, tail, False), (2, tail, False), (4, -1, False)], 3)
    assert growth.new_pages == [[0, 1], [2, 3], [4, 5], [6]]
    assert (growth.copy_src, growth.copy_dst, growth.copy_slots) == ([0, 0], [2, 4], [2, 2])
    assert alloc.refcount(0) == 2 and alloc.fill(0) == 4  # the parent and the first branch
    assert [alloc.fill(p) for p in (1, 2, 3, 6)] == [1, 4, 1, 3]
    assert alloc.pages_copied == 2


def test_extend_of_a_page_the_branch_holds_claims_more_slots():
    alloc = PageAllocator(num_pages=4, page_size=4)
    (page,) = alloc.allocate(1)
    growth = alloc.extend([(1, page, True)], 2)
    assert growth.new_pages == [[]] and alloc.refcount(page) == 1 and alloc.fill(page) == 3


def test_extend_continuing_one_page_twice_in_a_call_counts_each_new_holder():
    """Two branches continue the same page in place in one call (the second where the first's slots end): the
    page gains both holders and keeps the later, larger fill, as one extend per branch would leave it."""
    together, one_by_one = PageAllocator(num_pages=4, page_size=8), PageAllocator(num_pages=4, page_size=8)
    for alloc in (together, one_by_one):
        (page,) = alloc.allocate(2)
    together.extend([(2, page, False), (4, page, False), (8, -1, True)], 2)
    for branch in ([(2, page, False)], [(4, page, False)], [(8, -1, True)]):
        one_by_one.extend(branch, 2)
    assert books(together) == books(one_by_one)
    assert together.refcount(page) == 3 and together.fill(page) == 6


def test_extend_out_of_pages_counts_copies_and_changes_nothing():
    alloc = PageAllocator(num_pages=3, page_size=4)
    (tail,) = alloc.allocate(2)
    alloc.extend([(2, tail, False)], 1)  # someone continued in place: the next branch must copy
    before = books(alloc)
    with pytest.raises(OutOfPages) as info:
        alloc.extend([(2, tail, False), (4, -1, False)], 3, "append")  # 1 copy + 1 fresh + 1 fresh
    assert (info.value.pages_needed, info.value.pages_free) == (3, 2)
    assert books(alloc) == before


def test_grow_decides_without_changing_anything_and_commit_applies_it():
    """grow() names the pages a call will take (the free pages, lowest first) and changes nothing, so the cache
    can run the copies first; commit() applies exactly that, and refuses a decision the allocator outgrew."""
    alloc = PageAllocator(num_pages=6, page_size=4)
    (tail,) = alloc.allocate(2)
    alloc.extend([(2, tail, False)], 1)  # someone continued in place: the next branches copy
    before = books(alloc)
    growth = alloc.grow([(2, tail, False), (4, -1, True)], 2)
    assert books(alloc) == before
    assert growth.new_pages == [[1], [2]] and (growth.copy_src, growth.copy_dst, growth.copy_slots) == ([0], [1], [2])
    alloc.commit(growth)
    assert books(alloc) == ([2, 1, 1, 0, 0, 0], [3, 4, 2, 0, 0, 0], [3, 4, 5], 1)
    stale = alloc.grow([(4, -1, True)], 1)
    alloc.allocate(1)
    with pytest.raises(RuntimeError, match="growth: expected the allocator unchanged"):
        alloc.commit(stale)


def test_release_frees_at_zero_and_reopens_slots_claimed_in_place():
    alloc = PageAllocator(num_pages=4, page_size=4)
    parent = list(alloc.allocate(2))
    child = alloc.extend([(2, parent[0], False)], 3).new_pages[0]  # in place on page 0, then page 1
    alloc.release(child, start=2)
    assert books(alloc) == ([1, 0, 0, 0], [2, 0, 0, 0], [1, 2, 3], 0)  # page 0 back to the parent's 2 slots
    alloc.release(parent, start=0)
    assert books(alloc) == ([0] * 4, [0] * 4, [0, 1, 2, 3], 0)  # the last freed is handed out first


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.integers(0, 30), st.integers(1, 6)), max_size=20))
def test_used_and_free_pages_always_partition_the_pool(page_size, calls):
    """Allocate runs and extend them; every page is either held or free, and releasing everything frees all."""
    alloc = PageAllocator(num_pages=24, page_size=page_size)
    runs = []  # (pages, end) of each run
    for n, k in calls:
        try:
            runs.append([list(alloc.allocate(n)), n])
        except OutOfPages:
            pass
        run = runs[n % len(runs)] if runs else None
        if run is not None:
            end = run[1]
            tail = run[0][-1] if end % page_size else -1
            try:
                run[0] += alloc.extend([(end, tail, True)], k).new_pages[0]
                run[1] += k
            except OutOfPages:
                pass
        held = {p for pages, _ in runs for p in pages}
        assert sorted(held | set(alloc.free_pages())) == list(range(24)) and not held & set(alloc.free_pages())
        assert all(alloc.refcount(p) == 1 for p in held)
    for pages, _ in runs:
        alloc.release(pages, 0)
    assert sorted(alloc.free_pages()) == list(range(24)) and alloc.pages_copied == 0
