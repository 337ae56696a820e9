"""Every Python block of README.md and USAGE.md runs; blocks that open with "# needs a CUDA GPU" run
where there is one and are skipped, with that reason, elsewhere."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [p for p in (ROOT / "README.md", ROOT / "USAGE.md") if p.exists()]


def python_blocks():
    for doc in DOCS:
        for n, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)):
            yield pytest.param(block, id=f"{doc.name}-{n}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_python_block_runs(code):
    if code.startswith("# needs a CUDA GPU") and not torch.cuda.is_available():
        pytest.skip("this block needs a CUDA GPU (none found)")
    module = types.ModuleType("doc_block")  # a real module: torch.compile looks its globals up by name
    sys.modules["doc_block"] = module
    try:
        exec(compile(code, "<doc>", "exec"), module.__dict__)
    finally:
        del sys.modules["doc_block"]


def test_bash_blocks_name_only_existing_scripts():
    """The commands themselves run in CI (.ci/run) and in tests/test_training.py (torchrun too)."""
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.strip().splitlines():
                words = line.split()
                if words[0] == "torchrun":
                    script = next(w for w in words if w.endswith(".py"))
                else:
                    script = words[1] if words[0] == "python" else words[0]
                assert (ROOT / script.removeprefix("./")).exists(), f"{doc.name}: {script} does not exist"
