#!/usr/bin/env bash
# Release check: the sdist builds a wheel in a fresh venv, the wheel installs there, and a smoke test passes
# outside the source tree. Run in an environment with treeattn's dependencies and `build` (scripts/setup_env.sh).
#   bash scripts/check_sdist.sh
#
# - The sdist comes from the source tree (`python -m build --sdist`, MANIFEST.in says what it carries).
# - The wheel is built from the unpacked sdist alone, with pip's build isolation: a fresh build environment
#   with only pyproject.toml's build requirements (so a missing build file or requirement fails here), which
#   has no torch, hence TREEATTN_BUILD_CUDA=0: the wheel holds the C++ planner and the Python packages; the
#   CUDA extension's build is checked by the main install (setup_env.sh, TREEATTN_BUILD_CUDA=1 in CI).
# - The fresh venv (no pip, no setuptools of its own: this environment's pip installs into it) sees this
#   environment's packages through a .pth file (torch, triton: several GB not installed twice), after its own
#   site-packages, so its treeattn is the wheel's; `pip check` then holds treeattn's declared dependency
#   ranges against the installed torch and triton.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

TREEATTN_BUILD_CUDA=0 python -m build --sdist --no-isolation --outdir "$work/dist" "$ROOT" >"$work/sdist.log" 2>&1 ||
  { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/treeattn-*.tar.gz)
echo "sdist: $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB, $(tar tzf "$sdist" | wc -l) entries)"

deps_site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python -m venv --without-pip "$work/venv"
venv_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps_site" >"$venv_site/_treeattn_deps.pth"

TREEATTN_BUILD_CUDA=0 python -m pip wheel -q --no-deps --wheel-dir "$work/wheels" "$sdist"
wheel=$(ls "$work"/wheels/treeattn-*.whl)
echo "wheel: $(basename "$wheel")"
# --no-index: every dependency must already be installed (nothing downloads); --force-reinstall: a treeattn
# visible through the .pth file is not taken for this one (pip leaves that one alone: outside this venv).
python -m pip --python "$work/venv/bin/python" install -q --no-index --no-deps --force-reinstall "$wheel"
python -m pip --python "$work/venv/bin/python" check

cd "$work"  # not the source tree: the installed package must stand alone
TRITON_INTERPRET=1 "$work/venv/bin/python" - "$venv_site" <<'EOF'
import importlib.metadata
import sys

import torch

import treeattn
from treeattn import _planner, reference

site = sys.argv[1]
assert treeattn.__file__.startswith(site), f"treeattn imported from {treeattn.__file__}, not the wheel in {site}"
assert treeattn.__version__ == importlib.metadata.version("treeattn"), treeattn.__version__
assert _planner.__file__.startswith(site), _planner.__file__

# Two branches that share two full pages (32 tokens), then read 3 and 7 tokens of their own pages: the plan
# reads the shared pages once; the Triton kernels (in the CPU interpreter) match the fp32 reference.
page_size, heads, kv_heads, dim = 16, 4, 2, 64
kv_indptr = torch.tensor([0, 3, 6], dtype=torch.int32)
kv_indices = torch.tensor([0, 1, 2, 0, 1, 3], dtype=torch.int32)
kv_last_page_len = torch.tensor([3, 7], dtype=torch.int32)
g = torch.Generator().manual_seed(0)
q = torch.randn(2, heads, dim, generator=g)
k_cache = torch.randn(4, page_size, kv_heads, dim, generator=g)
v_cache = torch.randn(4, page_size, kv_heads, dim, generator=g)
plan = treeattn.plan(kv_indptr, kv_indices, kv_last_page_len, page_size=page_size, num_qo_heads=heads,
                     num_kv_heads=kv_heads)
assert plan.stats["unique_tokens"] == 2 * page_size + 3 + 7, plan.stats
out = treeattn.tree_decode(q, k_cache, v_cache, plan)
ref, _ = reference.tree_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len)
err = ((out.float() - ref).norm() / ref.norm()).item()
assert err < 1e-4, f"tree_decode: relative error {err:.2e} against the reference"
print(f"smoke test OK: treeattn {treeattn.__version__} from {treeattn.__file__}; backends {treeattn.backends()}; "
      f"tree_decode relative error {err:.1e}")
EOF
echo "sdist -> wheel -> install -> smoke test took $((SECONDS - start)) s"
