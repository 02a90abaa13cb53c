"""Static sm_90a check: every Triton launch the public ops make compiles for Hopper without register spills
and within shared memory; the CUDA extension's kernels are read from their cubins the same way. No GPU needed.

Three steps, each in its own process:

1. **record** (``TRITON_INTERPRET=1``): drive ``tree_decode``, ``mla_tree_decode``, ``merge_state`` and the
   ``TreeKVCache`` write/copy paths over :func:`matrix` with every Triton launch recorded and *not executed*
   (kernel, arguments, constexprs, ``num_warps``, ``num_stages``). Nothing runs, so bf16 (which the
   interpreter cannot execute) is recorded like fp16, and token counts cost nothing but planning.
2. **compile** (no interpreter, so the ``@triton.jit`` objects are real): specialise each recorded launch as
   Triton's JIT would for ``cuda:90`` (argument types, divisibility, constexprs), keep the distinct ones,
   compile each to an sm_90a cubin (a process pool; results cached on disk by launch key) and read
   registers, spill stack and shared memory with ``cuobjdump --dump-resource-usage``.
3. **report**: a table on stdout, ``static_sm90.json`` in ``--out``, exit status 1 on any launch that does not
   compile, spills, or needs more shared memory than an sm_90 block may have.

    python bench/static_check.py --out bench/results/latest [--jobs N] [--quick] [--cases REGEX]
    python bench/static_check.py --device --quick --out DIR   # on a GPU: what the driver reports
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sm_90 (H100/H200) per-SM and per-block limits.
SM90 = {
    "registers_per_sm": 65536,
    "max_registers_per_thread": 255,
    "register_alloc_unit": 256,  # registers are allocated per warp in units of 256
    "shared_per_sm": 233472,  # 228 KB
    "shared_per_block": 232448,  # 227 KB usable by one block
    "reserved_shared_per_block": 1024,  # the runtime's share of every block (cuobjdump's static SHARED:1024)
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
}
DTYPES = ("float16", "bfloat16")
# The benchmark workloads are recorded at this fraction of their tokens: tile choices depend on the plan's
# shape (queries per item), which the shrunk trees keep, not on the token count.
WORKLOAD_SCALE = 1 / 8
CACHE_DIR = Path(os.environ.get("TREEATTN_STATIC_CACHE", Path.home() / ".cache" / "treeattn" / "static_sm90"))


# ---------------------------------------------------------------------------------------------------------
# The matrix of shapes
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a public op. ``tree``: a workload name of ``treeattn.testing.WORKLOADS`` (shrunk by
    :data:`WORKLOAD_SCALE`) or one of :data:`SMALL_TREES`."""

    op: str  # "tree_decode" | "mla_tree_decode" | "merge_state" | "cache" | "mla_cache"
    dtype: str
    tree: str = ""
    page_size: int = 16
    num_qo_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hinted: bool = True  # the plan knows the head counts (False: treeattn.plan's defaults, as in a quick start)
    kv_dtype: str = ""  # an FP8 KV cache ("float8_e4m3fn" / "float8_e5m2") with tensor scales; "": dtype

    @property
    def label(self) -> str:
        return self._label() + (f" kv {self.kv_dtype}" if self.kv_dtype else "")

    def _label(self) -> str:
        if self.op == "tree_decode":
            hint = "" if self.hinted else " unhinted"
            return (f"gqa {self.num_qo_heads}/{self.num_kv_heads}/{self.head_dim} p{self.page_size} {self.tree}"
                    f" {self.dtype}{hint}")
        if self.op == "mla_tree_decode":
            return f"mla h{self.num_qo_heads} p{self.page_size} {self.tree} {self.dtype}"
        if self.op == "merge_state":
            return f"merge_state h{self.num_qo_heads} d{self.head_dim} {self.dtype}"
        return f"{self.op} {self.num_kv_heads}x{self.head_dim} p{self.page_size} {self.dtype}"


FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")

# Trees beside the benchmark workloads: a few branches (small query blocks) and one query (split-KV decode).
SMALL_TREES = {"few_branches": ([300, 40], [1, 3]), "one_query": ([700], [1])}
GROUP_TREES = ("bestofN_P4k_N64_S256", "few_branches", "one_query")


def matrix(quick: bool = False) -> list[Case]:
    """The benchmark workloads (GQA 32/8/128 and MLA at 16-128 heads, pages 1/16/64) and common model shapes
    (GQA groups 1-16, head dims 64/96/128/256), fp16 and bf16, plus merge_state and the cache's write/copy."""
    from treeattn.testing import WORKLOADS

    cases: list[Case] = []
    dtypes = DTYPES[1:] if quick else DTYPES
    workloads = list(WORKLOADS)[:1] if quick else list(WORKLOADS)
    gqa_pages, mla_pages = ((16,), (64,)) if quick else ((1, 16, 64), (1, 16, 64))
    for dtype in dtypes:
        for tree in workloads:
            for page in gqa_pages:
                cases.append(Case("tree_decode", dtype, tree, page, 32, 8, 128))
            for heads in (16, 32, 64, 128):
                # The MLA benchmark rows use 64-token pages; the first workload also runs at 1 and 16.
                for page in mla_pages if tree == workloads[0] else (64,):
                    cases.append(Case("mla_tree_decode", dtype, tree, page, heads, 1, 576))
        for tree in ("one_query",) if quick else ("few_branches", "one_query"):
            for heads in (16, 32, 64, 128):
                cases.append(Case("mla_tree_decode", dtype, tree, 64, heads, 1, 576))
        # Model shapes: every group 1-16 at head dim 128, the usual groups at the other head dims.
        groups_by_dim = {128: range(1, 17), 64: (1, 2, 4, 7, 8, 16), 96: (1, 4, 7, 8), 256: (1, 2, 4, 7, 8, 16)}
        if quick:
            groups_by_dim = {128: (1, 7, 16), 64: (4,), 96: (4,), 256: (4,)}
        for head_dim, groups in groups_by_dim.items():
            for group in groups:
                for tree in GROUP_TREES[:1] if quick else GROUP_TREES:
                    cases.append(Case("tree_decode", dtype, tree, 16, 2 * group, 2, head_dim))
        for head_dim in (64, 96, 256):
            for page in () if quick else (1, 64):
                cases.append(Case("tree_decode", dtype, GROUP_TREES[0], page, 8, 2, head_dim))
        # A plan made without head counts sizes query blocks for group 4: larger groups get split tiles.
        for group in (8,) if quick else (8, 16):
            cases.append(Case("tree_decode", dtype, GROUP_TREES[0], 16, 2 * group, 2, 128, hinted=False))
        for heads, head_dim in ((32, 128), (7, 96), (16, 64), (8, 256), (128, 512)):
            cases.append(Case("merge_state", dtype, num_qo_heads=heads, head_dim=head_dim))
        for kv_heads, head_dim in ((8, 128), (1, 64), (2, 96), (4, 256)):
            for page in (16,) if quick else (1, 16, 64):
                cases.append(Case("cache", dtype, page_size=page, num_kv_heads=kv_heads, head_dim=head_dim))
        for page in (64,) if quick else (1, 16, 64):
            cases.append(Case("mla_cache", dtype, page_size=page, num_kv_heads=1, head_dim=576))
        # FP8 KV caches (16-bit q): the benchmark rows and the cache writes, e4m3fn everywhere, e5m2 once.
        for kv_dtype in FP8_DTYPES:
            for tree in workloads if kv_dtype == FP8_DTYPES[0] else workloads[:1]:
                cases.append(Case("tree_decode", dtype, tree, 16, 32, 8, 128, kv_dtype=kv_dtype))
                for heads in (16, 128):
                    cases.append(Case("mla_tree_decode", dtype, tree, 64, heads, 1, 576, kv_dtype=kv_dtype))
            cases.append(Case("cache", dtype, page_size=16, num_kv_heads=8, head_dim=128, kv_dtype=kv_dtype))
            cases.append(Case("mla_cache", dtype, page_size=64, num_kv_heads=1, head_dim=576, kv_dtype=kv_dtype))
    return cases


def _table(case: Case):
    from treeattn.testing import WORKLOADS, tree_table

    if case.tree in SMALL_TREES:
        levels, fanout = SMALL_TREES[case.tree]
    else:
        levels, fanout = WORKLOADS[case.tree]
        levels = [max(1, int(t * WORKLOAD_SCALE)) for t in levels]
    return tree_table(levels, fanout, case.page_size)


def run_case(case: Case, device: str = "cpu") -> None:
    """Calls the case's public op on uninitialised tensors (the values do not matter: the step records
    launches, or reads what the driver says of the kernels it ran)."""
    import torch

    import treeattn

    dtype = getattr(torch, case.dtype)
    empty = lambda *shape, dtype=dtype: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
    if case.op in ("tree_decode", "mla_tree_decode"):
        table = _table(case).to(device)
        heads = dict(num_qo_heads=case.num_qo_heads, num_kv_heads=case.num_kv_heads) if case.hinted else {}
        plan = treeattn.plan(
            table.kv_indptr, table.kv_indices, table.kv_last_page_len, page_size=case.page_size, **heads
        )
        q = empty(table.num_queries, case.num_qo_heads, case.head_dim)
        kv_dtype = getattr(torch, case.kv_dtype) if case.kv_dtype else dtype
        if case.op == "tree_decode":
            shape = (table.num_pages, case.page_size, case.num_kv_heads, case.head_dim)
            # FP8: per-KV-head scale tensors (float scales compile to the same kernel without the scale loads).
            scales = {}
            if case.kv_dtype:
                scale = torch.ones(case.num_kv_heads, device=device)
                scales = dict(k_scale=scale, v_scale=scale)
            treeattn.tree_decode(q, empty(*shape, dtype=kv_dtype), empty(*shape, dtype=kv_dtype), plan, **scales)
        else:
            scales = dict(kv_scale=torch.ones((), device=device)) if case.kv_dtype else {}
            treeattn.mla_tree_decode(q, empty(table.num_pages, case.page_size, case.head_dim, dtype=kv_dtype), plan,
                                     sm_scale=192**-0.5, **scales)
    elif case.op == "merge_state":
        o = empty(5, case.num_qo_heads, case.head_dim)
        lse = empty(5, case.num_qo_heads, dtype=torch.float32)
        treeattn.merge_state(o, lse, o, lse)
    else:
        # Prefill a prompt ending mid-page, fork, append one token per branch (copy-on-write of the shared
        # partial page), write the step's rows: every write/copy launch a decode loop makes.
        page = case.page_size
        # An FP8 cache quantizes the 16-bit rows it is given in its write launch.
        cache_dtype = getattr(torch, case.kv_dtype) if case.kv_dtype else dtype
        if case.op == "cache":
            scales = dict(k_scale=1.0, v_scale=1.0) if case.kv_dtype else {}
            cache = treeattn.TreeKVCache(1, case.num_kv_heads, case.head_dim, page_size=page, num_pages=64,
                                         dtype=cache_dtype, device=device, **scales)
            row = (case.num_kv_heads, case.head_dim)
        else:
            scales = dict(kv_scale=1.0) if case.kv_dtype else {}
            cache = treeattn.TreeKVCache.mla(1, page_size=page, num_pages=64, dtype=cache_dtype, device=device,
                                             **scales)
            row = (case.head_dim,)
        prompt = page + max(1, page // 2) if page > 1 else 3
        root = cache.add(prompt)
        leaves = cache.fork(root, 3)
        for slots in (cache.slots(root), cache.append(leaves)):
            rows = [empty(slots.shape[0], *row)] * (1 if case.op == "mla_cache" else 2)
            cache.write(0, slots, *rows)


# ---------------------------------------------------------------------------------------------------------
# Step 1: record launches
# ---------------------------------------------------------------------------------------------------------

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
        from treeattn import decode, merge

        for module in (decode, merge):
            patched.append((module, "check_backend_dtype", module.check_backend_dtype))
            module.check_backend_dtype = lambda *args: None
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


# ---------------------------------------------------------------------------------------------------------
# Step 2: specialise, compile, read resources
# ---------------------------------------------------------------------------------------------------------

def _kernel(name: str):
    import importlib

    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _mock_tensor(spec: dict):
    import torch
    from triton.runtime.jit import MockTensor

    class Tensor(MockTensor):
        def data_ptr(self):
            return 0 if spec["aligned"] else 8

    return Tensor(getattr(torch, spec["tensor"]))


def specialize(launch: dict, backend) -> dict:
    """The compile key Triton's JIT would derive from this launch for ``backend``'s target: argument types,
    divisibility attributes, constexprs and options. Needs the real (non-interpreter) kernel object."""
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch["kernel"])
    decode = lambda v: _mock_tensor(v) if isinstance(v, dict) else v  # noqa: E731
    args = [decode(a) for a in launch["args"]]
    kwargs = {k: decode(v) for k, v in launch["kwargs"].items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    names = [p.name for p in fn.params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    return {
        "kernel": launch["kernel"],
        "signature": {n: s[0] for n, s in zip(names, spec)},
        "constexprs": {n: bound[n] for n, s in zip(names, spec) if s[0] == "constexpr"},
        "attrs": {n: s[1] for n, s in zip(names, spec) if s[0] != "constexpr" and isinstance(s[1], str)},
        "options": dict(sorted(options.items())),
    }


def launch_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> ``{function: {"REG": .., "STACK": .., "SHARED": ..,
    "LOCAL": .., "arch": "sm_90a" or ""}}`` (the arch of the ELF the function is in, when listed)."""
    usage: dict[str, dict] = {}
    arch = ""
    function = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            function = m.group(1)
            continue
        if function is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            key = function if function not in usage else f"{function}@{arch}"
            usage[key] = {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
            usage[key]["arch"] = arch
            function = None
    return usage


def blocks_per_sm(registers: int, shared_bytes: int, num_warps: int, limits: dict = SM90) -> int:
    """Resident blocks per SM as the occupancy calculator counts them: registers (allocated per warp in
    units of 256), shared memory (``shared_bytes`` per block, the runtime's reserve included), warps, blocks."""
    unit = limits["register_alloc_unit"]
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    by_regs = (limits["registers_per_sm"] // regs_per_warp) // num_warps
    by_shared = limits["shared_per_sm"] // max(shared_bytes, 1)
    by_warps = limits["max_warps_per_sm"] // num_warps
    return min(by_regs, by_shared, by_warps, limits["max_blocks_per_sm"])


def cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def _resource_usage_of_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    (usage,) = parse_resource_usage(out.stdout).values()
    return usage


def judge(registers: int, spill: int, shared: int, num_warps: int, limits: dict = SM90) -> tuple[int, list[str]]:
    """(blocks per SM, violations) of one kernel: spills, or shared memory over an sm_90 block's limit."""
    problems = []
    if spill:
        problems.append(f"spills {spill} B/thread")
    usable = shared - limits["reserved_shared_per_block"] if shared >= limits["reserved_shared_per_block"] else shared
    if usable > limits["shared_per_block"]:
        problems.append(f"shared memory {usable} B > {limits['shared_per_block']} B")
    blocks = blocks_per_sm(registers, shared, num_warps, limits) if num_warps else 0
    if num_warps and blocks == 0 and not problems:
        problems.append("no block fits on an SM")
    return blocks, problems


def compile_one(spec: dict) -> dict:
    """Compiles one specialised launch for sm_90a and reads its resources (cached on disk by launch key)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(spec["kernel"])
    digest = hashlib.sha256(f"{triton.__version__}|{fn.cache_key}|{launch_key(spec)}".encode()).hexdigest()[:32]
    cached = CACHE_DIR / f"{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    names = [p.name for p in fn.params]
    index = {n: (i,) for i, n in enumerate(names)}
    target = GPUTarget("cuda", 90, 64)
    from triton.compiler import make_backend

    backend = make_backend(target)
    source = ASTSource(
        fn, spec["signature"], {index[n]: v for n, v in spec["constexprs"].items()},
        {index[n]: backend.parse_attr(v) for n, v in spec["attrs"].items()},
    )
    start = time.perf_counter()
    result = {"compile_s": 0.0}
    try:
        kernel = triton.compile(source, target=target, options=spec["options"])
        usage = _resource_usage_of_cubin(kernel.asm["cubin"])
        result.update(
            registers=usage["REG"], spill=usage["STACK"] + usage["LOCAL"],
            shared=kernel.metadata.shared + usage["SHARED"], shared_dynamic=kernel.metadata.shared,
            num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages, error=None,
        )
    except Exception as exc:  # a launch that does not compile is a finding, not a crash of the check
        result.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300])
    result["compile_s"] = round(time.perf_counter() - start, 2)
    if result["error"] is None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))
    return result


def compile_all(records: list[dict], jobs: int) -> list[dict]:
    """Distinct launches of ``records`` with their sm_90a resources and the cases that make them."""
    from concurrent.futures import ProcessPoolExecutor

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 64))
    launches: dict[str, dict] = {}
    for rec in records:
        spec = specialize(rec, backend)
        entry = launches.setdefault(launch_key(spec), {"spec": spec, "cases": []})
        if rec["case"] not in entry["cases"]:
            entry["cases"].append(rec["case"])
    entries = list(launches.values())
    specs = [e["spec"] for e in entries]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, specs))
    else:
        results = [compile_one(s) for s in specs]
    for entry, result in zip(entries, results):
        entry.update(result)
        if entry["error"] is not None:
            entry["blocks_per_sm"], entry["violations"] = 0, [f"does not compile: {entry['error']}"]
        else:
            entry["blocks_per_sm"], entry["violations"] = judge(
                entry["registers"], entry["spill"], entry["shared"], entry["num_warps"]
            )
    entries.sort(key=lambda e: (e["spec"]["kernel"], json.dumps(e["spec"]["constexprs"], sort_keys=True),
                                json.dumps(e["spec"]["signature"])))
    return entries


# ---------------------------------------------------------------------------------------------------------
# The CUDA extension
# ---------------------------------------------------------------------------------------------------------

def cuda_extension_kernels(library: str | None = None) -> tuple[str | None, list[dict]]:
    """(path of ``library`` — default treeattn._C — or None when there is none, the sm_90a functions in it
    with their resources and violations)."""
    import glob

    import treeattn

    libs = [library] if library else glob.glob(os.path.join(os.path.dirname(treeattn.__file__), "_C*.so"))
    if not libs:
        return None, []
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", libs[0]], capture_output=True, text=True, check=True)
    rows = []
    for name, usage in parse_resource_usage(out.stdout).items():
        if usage["arch"] not in ("sm_90a", "sm_90"):
            continue
        # Block size and dynamic shared memory are chosen at launch: blocks per SM is not known from the cubin.
        _, problems = judge(usage["REG"], usage["STACK"] + usage["LOCAL"], usage["SHARED"], 0)
        rows.append({"function": name.split("@")[0], "arch": usage["arch"], "registers": usage["REG"],
                     "spill": usage["STACK"] + usage["LOCAL"], "shared": usage["SHARED"], "violations": problems})
    return libs[0], rows


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

_SHORT = {"GROUP": "G", "GROUP_PAD": "Gp", "BLOCK_Q": "BQ", "HEAD_DIM": "D", "HEAD_DIM_PAD": "Dp", "PAGE_SIZE": "P",
          "BLOCK_N": "BN", "DOT_PRECISION": "", "HEAD_BLOCK": "HB"}


def _describe(spec: dict) -> str:
    parts = []
    for name, value in spec["constexprs"].items():
        if name == "DOT_PRECISION" or value is None:
            continue
        parts.append(f"{_SHORT.get(name, name)}={value}")
    return " ".join(parts)


def _dtype(spec: dict) -> str:
    for sig in spec["signature"].values():
        if sig.startswith("*") and sig[1:] in ("fp16", "bf16", "fp32", "fp8e4nv", "fp8e5"):
            return sig[1:]
    return "-"


def format_table(entries: list[dict], cuda_rows: list[dict]) -> str:
    lines = [f"{'kernel':<34} {'dtype':<5} {'w/s':<5} {'regs':>4} {'spill':>5} {'smemKB':>6} {'blk/SM':>6} "
             f"{'cases':>5}  constexprs / problems"]
    for e in entries:
        kernel = e["spec"]["kernel"].split(":")[1]
        ws = f"{e['spec']['options'].get('num_warps', 4)}/{e['spec']['options'].get('num_stages', 3)}"
        if e["error"] is not None:
            lines.append(f"{kernel:<34} {_dtype(e['spec']):<5} {ws:<5} {'-':>4} {'-':>5} {'-':>6} {'-':>6} "
                         f"{len(e['cases']):>5}  {_describe(e['spec'])}  FAIL {e['violations'][0]}")
            continue
        flag = ("  FAIL " + "; ".join(e["violations"])) if e["violations"] else ""
        lines.append(f"{kernel:<34} {_dtype(e['spec']):<5} {ws:<5} {e['registers']:>4} {e['spill']:>5} "
                     f"{e['shared'] / 1024:>6.1f} {e['blocks_per_sm']:>6} {len(e['cases']):>5}  {_describe(e['spec'])}{flag}")
    for r in cuda_rows:
        flag = ("  FAIL " + "; ".join(r["violations"])) if r["violations"] else ""
        lines.append(f"{'_C ' + r['function'][:31]:<34} {'':<5} {'':<5} {r['registers']:>4} {r['spill']:>5} "
                     f"{r['shared'] / 1024:>6.1f} {'-':>6} {'':>5}  {r['arch']}{flag}")
    return "\n".join(lines)


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


def _summary(case: str, rows: list[dict], violations: int) -> list[dict]:
    """Lines for the suite's summary table (bench/summary.py)."""
    regs = [r["registers"] for r in rows if r.get("registers") is not None]
    return [
        {"case": case, "measure": "distinct kernels", "value": len(rows)},
        {"case": case, "measure": "spilling, over shared memory or not compiling", "value": violations},
        {"case": case, "measure": "most registers per thread", "value": max(regs) if regs else None, "vs": "255"},
    ]


def _device_main(out: Path, cases: list[Case]) -> int:
    import torch
    import triton

    rows = device_check(cases)
    violations = sum(bool(r["violations"]) for r in rows)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "kernels": rows,
              "violations": violations, "summary": _summary(f"kernels on {torch.cuda.get_device_name()}", rows,
                                                            violations)}
    (out / "static_device.json").write_text(json.dumps(report, indent=1))
    print(f"{'kernel':<34} {'w/s':<5} {'regs':>4} {'spill':>5} {'smemKB':>6} {'blk/SM':>6} {'cases':>5}  first case")
    for r in rows:
        flag = ("  FAIL " + "; ".join(r["violations"])) if r["violations"] else ""
        print(f"{r['kernel'].split(':')[1]:<34} {r['num_warps']}/{r['num_stages']:<3} {r['registers']:>4} {r['spill']:>5} "
              f"{r['shared'] / 1024:>6.1f} {r['blocks_per_sm']:>6} {len(r['cases']):>5}  {r['cases'][0]}{flag}")
    print(f"\n{len(rows)} kernels on {report['device']} (driver's registers and spills); "
          f"{report['violations']} violation(s) -> {out / 'static_device.json'}")
    return 1 if report["violations"] else 0


def _run_step(argv: list[str], interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    subprocess.run([sys.executable, __file__, *argv], env=env, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/latest", help="folder for static_sm90.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile processes")
    parser.add_argument("--quick", action="store_true", help="a small slice of the matrix")
    parser.add_argument("--cases", metavar="REGEX", help="only the matrix cases whose label matches")
    parser.add_argument("--device", action="store_true",
                        help="on a GPU: run the cases and report registers and spills as the driver sees them")
    parser.add_argument("--record", metavar="FILE", help=argparse.SUPPRESS)  # step 1 (interpreter process)
    parser.add_argument("--compile", nargs=2, metavar=("RECORDS", "RESULT"), help=argparse.SUPPRESS)  # step 2
    args = parser.parse_args(argv)

    cases = [c for c in matrix(args.quick) if not args.cases or re.search(args.cases, c.label)]
    if args.record:
        Path(args.record).write_text(json.dumps(record(cases)))
        return 0
    if args.compile:
        records = json.loads(Path(args.compile[0]).read_text())
        Path(args.compile[1]).write_text(json.dumps(compile_all(records, args.jobs)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device:
        return _device_main(out, cases)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records_file, result_file = os.path.join(tmp, "records.json"), os.path.join(tmp, "result.json")
        _run_step(["--record", records_file] + (["--quick"] if args.quick else [])
                  + (["--cases", args.cases] if args.cases else []), interpret=True)
        recorded_s = time.perf_counter() - start
        _run_step(["--compile", records_file, result_file, "--jobs", str(args.jobs)], interpret=False)
        num_records = len(json.loads(Path(records_file).read_text()))
        entries = json.loads(Path(result_file).read_text())
    so_path, cuda_rows = cuda_extension_kernels()
    violations = [e for e in entries if e["violations"]] + [r for r in cuda_rows if r["violations"]]
    seconds = time.perf_counter() - start

    import triton

    report = {
        "target": "sm_90a (cuda:90, triton GPUTarget('cuda', 90, 64))",
        "triton": triton.__version__,
        "limits": SM90,
        "recorded_launches": num_records,
        "distinct_launches": len(entries),
        "violations": len(violations),
        "seconds": {"total": round(seconds, 1), "record": round(recorded_s, 1)},
        "summary": _summary("Triton launches, sm_90a compile", entries, len(violations)),
        "launches": [
            {
                "kernel": e["spec"]["kernel"], "constexprs": e["spec"]["constexprs"], "options": e["spec"]["options"],
                "signature": e["spec"]["signature"], "attrs": e["spec"]["attrs"],
                "registers": e.get("registers"), "spill_bytes": e.get("spill"), "shared_bytes": e.get("shared"),
                "blocks_per_sm": e["blocks_per_sm"], "compile_s": e["compile_s"], "error": e["error"],
                "violations": e["violations"], "num_cases": len(e["cases"]), "cases": e["cases"],
            }
            for e in entries
        ],
        "cuda_extension": {"library": so_path, "kernels": cuda_rows},
    }
    (out / "static_sm90.json").write_text(json.dumps(report, indent=1))
    print(format_table(entries, cuda_rows))
    if so_path is None:
        print("(treeattn._C not built: no CUDA extension kernels to check)")
    print(f"\n{len(entries)} distinct Triton launches from {num_records} recorded"
          f"{f', {len(cuda_rows)} CUDA extension kernels' if cuda_rows else ''}; "
          f"{len(violations)} violation(s); {seconds:.0f} s -> {out / 'static_sm90.json'}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
