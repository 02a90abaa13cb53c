"""The static sm_90a check's pieces: launch recording (without running kernels, bf16 included), the cuobjdump
parser, the occupancy arithmetic and the verdicts, one real sm_90a compile, the matrix's coverage and the
report's readable kernel names. The full matrix runs as a CI step (``python bench/static_check.py``), not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import treeattn
from treeattn.testing import WORKLOADS, assert_close

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import static_matrix  # noqa: E402
import static_record  # noqa: E402
import static_report  # noqa: E402
import static_resources  # noqa: E402

# cuobjdump --dump-resource-usage of a two-arch library (sm_80 and sm_90a ELFs of the same kernels).
FATBIN_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPfi:
  REG:48 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:364 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPfi:
  REG:255 STACK:40 SHARED:1280 LOCAL:0 CONSTANT[0]:540 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5mergePfi:
  REG:26 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:540 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage_keeps_each_arch():
    usage = static_resources.parse_resource_usage(FATBIN_USAGE)
    assert usage["_Z6kernelPfi"] == {"REG": 48, "STACK": 0, "SHARED": 0, "LOCAL": 0, "arch": "sm_80"}
    assert usage["_Z6kernelPfi@sm_90a"] == {"REG": 255, "STACK": 40, "SHARED": 1280, "LOCAL": 0, "arch": "sm_90a"}
    assert usage["_Z5mergePfi"]["arch"] == "sm_90a" and usage["_Z5mergePfi"]["REG"] == 26


@pytest.mark.parametrize(
    "registers, shared, warps, blocks",
    [
        (182, 81920 + 1024, 4, 2),  # registers: 5888 per warp -> 11 warps; shared: 233472 // 82944 = 2
        (121, 41984 + 1024, 4, 4),  # registers: 4096 per warp -> 16 warps -> 4 blocks; shared: 5
        (255, 148480 + 1024, 8, 1),  # 8192 per warp -> 8 warps: one block
        (24, 1024, 4, 16),  # warps: 64 // 4
        (16, 1024, 1, 32),  # the block limit
    ],
)
def test_blocks_per_sm(registers, shared, warps, blocks):
    assert static_resources.blocks_per_sm(registers, shared, warps) == blocks


def test_judge_flags_spills_and_shared_memory():
    assert static_resources.judge(182, 0, 82944, 4) == (2, [])
    blocks, problems = static_resources.judge(255, 744, 82944, 4)
    assert problems == ["spills 744 B/thread"]
    limit = static_resources.SM90["shared_per_block"]
    _, problems = static_resources.judge(100, 0, limit + 1024, 4)  # exactly the limit (plus the runtime's 1 KB)
    assert problems == []
    _, problems = static_resources.judge(100, 0, limit + 1024 + 16, 4)
    assert problems == [f"shared memory {limit + 16} B > {limit} B"]


def _merge_inputs(dtype, n=3, heads=5, dim=64):
    o_a, o_b = torch.randn(n, heads, dim).to(dtype), torch.randn(n, heads, dim).to(dtype)
    lse_a, lse_b = torch.randn(n, heads), torch.randn(n, heads)
    return o_a, lse_a, o_b, lse_b


def test_recording_does_not_run_kernels_unless_asked():
    inputs = _merge_inputs(torch.float16)
    out = torch.zeros(3, 5, 64, dtype=torch.float16)
    with static_record.recording() as launches:
        treeattn.merge_state(*inputs, out=out)
    assert len(launches) == 1
    launch = launches[0]
    assert launch["kernel"].endswith(":_merge_state_kernel")
    assert launch["kwargs"]["HEAD_DIM"] == 64
    assert launch["args"][0] == {"tensor": "float16", "aligned": True}
    assert bool((out == 0).all()), "a recorded launch must not execute"

    with static_record.recording(execute=True) as launches:
        o, lse = treeattn.merge_state(*inputs)
    assert len(launches) == 1
    ref_o, ref_lse = treeattn.reference.merge_state(*inputs)
    assert_close(o, ref_o)
    assert_close(lse, ref_lse, torch.float32)


def test_recording_bf16_without_the_interpreter_running_it():
    case = static_matrix.Case("tree_decode", "bfloat16", "one_query", 16, 8, 2, 128)
    (first, *rest), = [static_record.record([case])]
    kernels = {r["kernel"].split(":")[1] for r in [first, *rest]}
    assert any("stage1" in k for k in kernels), kernels
    assert first["case"] == case.label
    tensors = [a for a in first["args"] if isinstance(a, dict)]
    assert {"tensor": "bfloat16", "aligned": True} in tensors


def test_matrix_covers_the_targets_and_model_shapes():
    cases = static_matrix.matrix()
    gqa = [c for c in cases if c.op == "tree_decode"]
    mla = [c for c in cases if c.op == "mla_tree_decode"]
    assert set(WORKLOADS) <= {c.tree for c in gqa} and set(WORKLOADS) <= {c.tree for c in mla}
    assert {c.num_qo_heads // c.num_kv_heads for c in gqa} == set(range(1, 17))
    assert {c.head_dim for c in gqa} == {64, 96, 128, 256}
    assert {c.page_size for c in gqa} == {c.page_size for c in mla} == {1, 16, 64}
    assert {c.dtype for c in cases} == {"float16", "bfloat16"}
    assert {c.num_qo_heads for c in mla} == {16, 32, 64, 128}
    assert {c.op for c in cases} >= {"merge_state", "cache", "mla_cache"}


def test_compile_step_reads_sm90a_resources(tmp_path):
    """Step 2 in its own process (no interpreter): one recorded merge_state launch, compiled for sm_90a."""
    with static_record.recording() as launches:
        treeattn.merge_state(*_merge_inputs(torch.float16))
    launches[0]["case"] = "merge_state test"
    records, result = tmp_path / "records.json", tmp_path / "result.json"
    records.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TREEATTN_STATIC_CACHE"] = str(tmp_path / "cache")
    subprocess.run([sys.executable, str(BENCH / "static_check.py"), "--compile", str(records), str(result),
                    "--jobs", "1"], env=env, check=True, timeout=300)
    (entry,) = json.loads(result.read_text())
    assert entry["error"] is None, entry["error"]
    assert entry["spec"]["signature"]["o_a_ptr"] == "*fp16"
    assert entry["spec"]["constexprs"]["HEAD_DIM"] == 64
    assert 0 < entry["registers"] <= 255 and entry["spill"] == 0
    assert 0 <= entry["shared"] <= 2048  # an elementwise kernel: at most the runtime's reserve
    assert entry["blocks_per_sm"] >= 1 and entry["violations"] == []
    assert entry["cases"] == ["merge_state test"]


def test_tile_table_most_specific_row_wins_and_rows_print_as_source():
    from treeattn.triton_kernels import configs

    assert configs.device_arch(torch.device("cpu")) == configs.DEFAULT_ARCH
    wide = configs.tile_config("gqa_decode", 90, 256, 4, torch.bfloat16, 64)
    usual = configs.tile_config("gqa_decode", 90, 128, 4, "bf16", 64)
    assert wide.num_warps == 8 and usual.num_warps == 4  # the head-dim row beats the catch-all
    assert configs.tile_config("mla_decode", 90, 512, 16, "bf16", 64).v_split == 2
    assert configs.tile_config("mla_decode", 90, 512, 128, "bf16", 64).v_split == 1
    with pytest.raises(KeyError, match="kernel: expected one of"):
        configs.tile_config("no_such_kernel", 90, 128, 4, "bf16", 64)
    # What the tile sweeps print is a TABLE row as source: it reads back as the same key and config.
    config = configs.TileConfig(block_n=32, num_warps=8, num_stages=3, v_split=2)
    text = configs.format_row("mla_decode", 90, 512, 16, "bf16", 64, config)
    assert eval(text.strip().rstrip(","), {"TileConfig": configs.TileConfig}) == (
        ("mla_decode", 90, 512, 16, "bf16", 64), config)
    assert set(configs.KEY_FIELDS) == {"kernel", "arch", "head_dim", "group", "dtype", "rows"}


SPILLING_CU = r"""
__global__ void busy(float* x, int n) {  // 64 live values under a 24-register cap: spills
  float a[64];
#pragma unroll
  for (int j = 0; j < 64; ++j) a[j] = x[j * n + threadIdx.x];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 64; ++j) s += a[j] * a[(j * 13 + 5) % 64];
  x[threadIdx.x] = s;
}
__global__ void tiny(float* x) { x[threadIdx.x] += 1.f; }
"""


@pytest.mark.nvcc
def test_cuda_library_check_reads_sm90a_kernels_and_flags_spills(tmp_path):
    """The CUDA extension's check, on a small two-arch library: only the sm_90a ELF counts, spills fail."""
    (tmp_path / "k.cu").write_text(SPILLING_CU)
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-maxrregcount=24", "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90a,code=sm_90a", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.so")],
                   check=True, capture_output=True, timeout=300)
    library, rows = static_resources.cuda_extension_kernels(str(tmp_path / "k.so"))
    assert library == str(tmp_path / "k.so")
    by_name = {r["function"]: r for r in rows}
    assert set(by_name) == {"_Z4busyPfi", "_Z4tinyPf"} and {r["arch"] for r in rows} == {"sm_90a"}
    assert by_name["_Z4busyPfi"]["spill"] > 0 and by_name["_Z4busyPfi"]["violations"][0].startswith("spills")
    assert by_name["_Z4tinyPf"]["violations"] == [] and by_name["_Z4tinyPf"]["registers"] <= 24
    if static_resources._demangler() is not None:
        assert by_name["_Z4busyPfi"]["name"] == "busy" and by_name["_Z4tinyPf"]["name"] == "tiny"


@pytest.mark.parametrize(
    "demangled, readable",
    [
        ("void treeattn::(anonymous namespace)::kv_write_kernel<unsigned long, 1>"
         "(treeattn::(anonymous namespace)::Args)",
         "treeattn::kv_write_kernel<unsigned long, 1>"),
        ("void treeattn::merge_state_kernel<__half>(const __half*, float*, int (*)(int))",
         "treeattn::merge_state_kernel<__half>"),
        ("busy(float*, int)", "busy"),
        ("_Z_not_a_symbol", "_Z_not_a_symbol"),
    ],
)
def test_readable_kernel_names(demangled, readable):
    assert static_resources.readable_name(demangled) == readable


@pytest.mark.skipif(static_resources._demangler() is None, reason="needs cu++filt or c++filt")
def test_demangle_reads_cuda_kernel_symbols():
    symbols = ["_ZN8treeattn12_GLOBAL__N_115kv_write_kernelImLi1EEEvNS0_4ArgsE", "_Z4busyPfi", "not_mangled"]
    names = static_resources.demangle(symbols)
    assert static_resources.readable_name(names[symbols[0]]) == "treeattn::kv_write_kernel<unsigned long, 1>"
    assert static_resources.readable_name(names[symbols[1]]) == "busy"
    assert names["not_mangled"] == "not_mangled"


def test_report_table_shows_whole_kernel_names():
    """No cut names: the kernel column is as wide as the longest name, the CUDA rows by their readable names."""
    long_name = "treeattn::kv_write_kernel<unsigned long, 4>"
    cuda_rows = [{"function": "_ZN8treeattn_mangled", "name": long_name, "arch": "sm_90a", "registers": 40,
                  "spill": 0, "shared": 0, "violations": []}]
    entry = {"spec": {"kernel": "treeattn.triton_kernels.merge_state:_merge_state_kernel",
                      "constexprs": {"HEAD_DIM": 64}, "signature": {"o_a_ptr": "*fp16"}, "options": {"num_warps": 4}},
             "error": None, "registers": 30, "spill": 0, "shared": 1024, "blocks_per_sm": 16, "cases": ["c"],
             "violations": []}
    lines = static_report.format_table([entry], cuda_rows).splitlines()
    assert lines[1].startswith("_merge_state_kernel ") and lines[1].endswith("D=64")
    assert lines[2].startswith(f"_C {long_name} ")
    assert lines[0].index("dtype") == len(f"_C {long_name} ")  # the column fits the longest name
    assert "_ZN8" not in "\n".join(lines)
