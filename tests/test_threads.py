"""Threads: what the API promises (docs/validation.md, "Threads") — decode ops on different plans may run in
different threads at once; on CPU, Triton's interpreter keeps per-launch state process-wide, so treeattn's
interpreted launches take turns instead of reading each other's program ids."""

from __future__ import annotations

import threading

import torch

from treeattn.testing import check_decode, random_table


def test_decodes_in_two_threads_at_once_each_match_the_reference():
    generator = torch.Generator().manual_seed(0)
    tables = [random_table(5, 16, generator=generator), random_table(7, 16, generator=generator)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(tables))

    def worker(table, mla: bool):
        try:
            start.wait()
            for _ in range(3):
                if mla:
                    check_decode(table, 4, 48, torch.float32, "cpu", v_head_dim=32)
                else:
                    check_decode(table, 6, 32, torch.float32, "cpu", num_kv_heads=2)
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t, i == 1)) for i, t in enumerate(tables)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a decode thread did not finish"
    if errors:
        raise errors[0]
