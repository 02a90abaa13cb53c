"""The static check's second step and its verdicts: a recorded launch specialised as Triton's JIT would for
``cuda:90`` (:func:`specialize`), compiled to an sm_90a cubin (:func:`compile_one`, cached on disk by launch
key), its registers, spill stack and shared memory read with ``cuobjdump --dump-resource-usage``
(:func:`parse_resource_usage`) and judged against the sm_90 limits (:func:`judge`, :func:`blocks_per_sm`);
the CUDA extension's cubins are read the same way (:func:`cuda_extension_kernels`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
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
CACHE_DIR = Path(os.environ.get("TREEATTN_STATIC_CACHE", Path.home() / ".cache" / "treeattn" / "static_sm90"))


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
        last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        result.update(error=f"{type(exc).__name__}: {last_line}"[:300])
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
    names = demangle([r["function"] for r in rows])
    for row in rows:
        row["name"] = readable_name(names[row["function"]])
    return libs[0], rows


def _demangler() -> str | None:
    """The CUDA toolkit's ``cu++filt`` (it knows CUDA's own manglings), else the system's ``c++filt``."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        tool = Path(home) / "bin" / "cu++filt"
        if tool.exists():
            return str(tool)
    return shutil.which("cu++filt") or shutil.which("c++filt")


def demangle(symbols: list[str]) -> dict[str, str]:
    """``{symbol: demangled}`` for C++ symbols, in one run of the demangler; a symbol stays as it is when
    there is no demangler or it does not demangle."""
    tool = _demangler()
    if not symbols or tool is None:
        return {s: s for s in symbols}
    out = subprocess.run([tool], input="\n".join(symbols) + "\n", capture_output=True, text=True, check=False)
    lines = out.stdout.splitlines() if out.returncode == 0 else []
    if len(lines) != len(symbols):
        return {s: s for s in symbols}
    return dict(zip(symbols, lines))


def readable_name(demangled: str) -> str:
    """A kernel's name as a reader wants it in a table: ``void ns::(anonymous namespace)::k<T, 2>(Args)`` ->
    ``ns::k<T, 2>`` (no return type, no anonymous namespace, no parameter list)."""
    name = demangled.replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # drop the parameter list: the last balanced (...) at the end
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.removeprefix("void ").strip()
