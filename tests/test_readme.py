"""The README's Python examples each run on their own, exactly as written; the guide continues the quick start."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
GUIDE = README.parent / "docs" / "guide.md"     # continues the README's first example in the same namespace


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _run(blocks: list[str], path: Path, namespace: dict) -> dict:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user would run them
    try:
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)
    finally:
        torch.set_default_dtype(old)
    return namespace


@pytest.mark.parametrize("index", range(len(_blocks(README))))
def test_each_readme_example_runs_on_its_own(index):
    namespace = _run([_blocks(README)[index]], README, {})
    if index == 0:
        assert namespace["result"].nfe == 10 and namespace["result"].x.shape == (16, 2)


def test_readme_has_the_promised_examples():
    text = "\n".join(_blocks(README))
    for needle in ("dp.sample(", "DPMSolveScheduler.from_config", "kd.sample_dpmpp_2m", "dp.tune("):
        assert needle in text


def test_guide_examples_continue_the_quick_start():
    namespace = _run(_blocks(README)[:1], README, {})
    namespace = _run(_blocks(GUIDE), GUIDE, namespace)
    assert namespace["result"].nfe == 12
    assert namespace["back"].x.shape == namespace["x_T"].shape


def test_readme_setup_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_command in README.read_text() and test_command in ci
