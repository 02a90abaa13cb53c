"""Small host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import os
import threading

import torch

# exp(x) = exp2(x * LOG2E): the stage-1 kernels run the softmax in the exp2 domain; LN2 takes its lse back.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# Triton's CPU interpreter keeps a launch's grid position and its patched triton.language in process-wide
# state, so two threads interpreting kernels at once read each other's program ids and write wrong rows. Our
# interpreted launches therefore take turns; compiled GPU launches are thread-safe and take no lock.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETER_LOCK = threading.Lock()


def run_kernel(kernel, grid: tuple, *args, **options) -> None:
    """``kernel[grid](*args, **options)``, one interpreted launch at a time (see ``_INTERPRETER_LOCK``)."""
    bind(kernel, grid, options)(*args)


def bind(kernel, grid: tuple, options: dict):
    """``launch(*args)``: ``kernel[grid](*args, **options)`` bound once (taking the interpreter's turn when
    interpreted): indexing a kernel by its grid makes a new callable each time, and a call's keyword constexprs
    cost more unpacked from a dict in Python than bound in a ``functools.partial``."""
    launcher = functools.partial(kernel[grid], **options)
    if not _INTERPRETED:
        return launcher

    def interpreted(*args) -> None:
        with _INTERPRETER_LOCK:
            launcher(*args)

    return interpreted


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must stay fp32 through tl.dot (the fp32 oracle tolerance is 1e-5; TF32 is ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


class Launch:
    """One kernel launch prepared for tensors of given shapes and strides: grid, arguments and constexprs are
    computed once; ``launch(*values)`` puts ``values`` at the argument positions ``slots`` (what changes from
    call to call: the tensors of one layer) and runs ``kernel[grid](*args, **options)``."""

    __slots__ = ("kernel", "grid", "args", "slots", "options", "rest", "launch")

    def __init__(self, kernel, grid: tuple, args: list, slots: tuple[int, ...], options: dict):
        self.kernel, self.grid, self.args, self.slots, self.options = kernel, grid, list(args), tuple(slots), options
        self.launch = bind(kernel, grid, options)
        # The usual case, per-call values first: no per-call copy of the argument list.
        self.rest = tuple(args[len(slots):]) if self.slots == tuple(range(len(slots))) else None

    def __call__(self, *values) -> None:
        if self.rest is not None:
            self.launch(*values, *self.rest)
            return
        args = self.args.copy()
        for slot, value in zip(self.slots, values):
            args[slot] = value
        self.launch(*args)
