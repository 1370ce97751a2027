"""The README's Python examples run exactly as written (in order, in one namespace)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
GUIDE = README.parent / "docs" / "guide.md"     # continues the README's examples in the same namespace


def test_readme_examples_run():
    blocks = [(path, block) for path in (README, GUIDE)
              for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]
    assert len(blocks) >= 4
    namespace: dict = {}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user would run them
    try:
        for path, block in blocks:
            exec(compile(block, str(path), "exec"), namespace)
    finally:
        torch.set_default_dtype(old)
    assert namespace["result"].nfe == 12
    assert namespace["back"].x.shape == namespace["x_T"].shape


def test_readme_setup_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_command in README.read_text() and test_command in ci
