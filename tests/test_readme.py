"""Every ```python block of README.md runs as written (on CPU: Triton interpreter, small sizes).

Blocks run in order in one namespace, as a reader pasting them one after another would run them; a block that
is not meant to run is fenced as something other than python.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 3, f"README.md: expected at least 3 ```python blocks, got {len(BLOCKS)}"


def test_readme_snippets_run_in_order():
    namespace = {"__name__": "readme"}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # name the block that broke, with its first line
            pytest.fail(f"README.md python block {i} ({block.splitlines()[0]!r}) raised {type(exc).__name__}: {exc}")
