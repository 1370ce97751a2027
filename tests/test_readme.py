"""The README's Python examples run exactly as written (in order, in one namespace)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user would run them
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        torch.set_default_dtype(old)
    assert namespace["result"].nfe == 12
    assert namespace["back"].x.shape == namespace["x_T"].shape


def test_readme_setup_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_command in README.read_text() and test_command in ci
