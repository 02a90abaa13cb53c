"""The static check's first step: every Triton launch a block of code makes, recorded (kernel, arguments,
constexprs, launch options) without running it — or run on a GPU, with what the driver reports of the
compiled kernel (:func:`device_check`)."""

from __future__ import annotations

import contextlib

from static_matrix import Case, run_case
from static_resources import SM90, judge


def _encode_arg(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"launch argument: expected a tensor or a scalar, got {type(value).__name__}")


@contextlib.contextmanager
def recording(execute: bool = False):
    """Records every Triton launch made inside the block into the yielded list (one dict per launch:
    ``kernel`` as ``module:qualname``, ``args``, ``kwargs`` with constexprs and launch options).
    ``execute=False`` skips running the kernels. Works with the interpreter's and the JIT's kernel objects;
    a launch compiled for a GPU also gets ``device``: what the driver reports of the kernel (registers,
    spills) and its shared memory."""
    from triton.runtime import interpreter, jit

    launches: list[dict] = []
    patched = []
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        original = cls.run

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            launches.append({
                "kernel": f"{self.fn.__module__}:{self.fn.__qualname__}",
                "args": [_encode_arg(a) for a in args],
                "kwargs": {k: _encode_arg(v) for k, v in kwargs.items()},
            })
            if not execute:
                return None
            kernel = _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            if hasattr(kernel, "n_regs") or hasattr(kernel, "_init_handles"):  # a compiled GPU kernel
                if getattr(kernel, "n_regs", None) is None:
                    kernel._init_handles()
                launches[-1]["device"] = {
                    "name": kernel.name, "hash": kernel.hash, "registers": kernel.n_regs, "spill": kernel.n_spills,
                    "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                    "num_stages": kernel.metadata.num_stages,
                }
            return kernel

        cls.run = run
        patched.append((cls, "run", original))
    if not execute:
        # Nothing runs, so the interpreter's lack of bf16 does not matter: record bf16 launches as they are.
        from treeattn import _dispatch

        patched.append((_dispatch, "check_backend_dtype", _dispatch.check_backend_dtype))
        _dispatch.check_backend_dtype = lambda *args: None
    try:
        yield launches
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def record(cases: list[Case]) -> list[dict]:
    """Runs every case with launches recorded (not executed); each record gets its case's label."""
    records = []
    for case in cases:
        with recording() as launches:
            run_case(case)
        for launch in launches:
            launch["case"] = case.label
        records.extend(launches)
    return records


def device_check(cases: list[Case], device: str = "cuda") -> list[dict]:
    """Runs ``cases`` on the GPU and returns each distinct compiled kernel with what the driver reports
    (registers, spills) and its shared memory, blocks per SM and violations, like the static step."""
    import torch

    kernels: dict[str, dict] = {}
    for case in cases:
        with recording(execute=True) as launches:
            run_case(case, device)
        torch.cuda.synchronize()
        for launch in launches:
            info = launch.get("device")
            if info is None:
                continue
            entry = kernels.setdefault(info["hash"], {**info, "kernel": launch["kernel"], "cases": []})
            if case.label not in entry["cases"]:
                entry["cases"].append(case.label)
    rows = list(kernels.values())
    for row in rows:
        row["blocks_per_sm"], row["violations"] = judge(
            row["registers"], row["spill"], row["shared"] + SM90["reserved_shared_per_block"], row["num_warps"]
        )
    return sorted(rows, key=lambda r: (r["kernel"], r["num_warps"], r["registers"]))
