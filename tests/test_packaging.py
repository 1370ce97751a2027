"""Packaging: ``import dpmsolve`` stays light with lazy subpackages, and the built wheel installs and works on its
own (entry point, ``python -m dpmsolve``, shipped weights and plans, ``py.typed``, ``LICENSE``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(args, cwd, timeout=180) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_import_is_light_and_subpackages_are_lazy(tmp_path):
    code = textwrap.dedent("""
        import sys
        import dpmsolve
        heavy = [m for m in ("matplotlib", "sklearn", "diffusers", "PIL", "transformers") if m in sys.modules]
        assert not heavy, heavy
        assert not [m for m in ("dpmsolve.zoo", "dpmsolve.lab", "dpmsolve.integrations") if m in sys.modules]
        assert {"zoo", "lab", "integrations"} <= set(dir(dpmsolve))
        m = dpmsolve.zoo.load("digits")
        assert m.name == "digits" and dpmsolve.lab.GaussianData is not None
        assert dpmsolve.integrations.__name__ == "dpmsolve.integrations"
        assert "diffusers" not in sys.modules    # the integrations import diffusers only when used
        try:
            dpmsolve.nope
        except AttributeError as exc:
            assert "has no attribute 'nope'" in str(exc)
        else:
            raise AssertionError("dpmsolve.nope did not raise")
        print("ok")
    """)
    assert _run([sys.executable, "-c", code], tmp_path).strip() == "ok"


@pytest.mark.slow
def test_wheel_installs_and_runs_on_its_own(tmp_path):
    pytest.importorskip("build")
    # Build from a copy of the sources, so the checkout gets no build/ folder.
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", src], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("dpmsolve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpmsolve/py.typed" in names and "dpmsolve/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "dpmsolve/zoo/weights/digits.safetensors" in names
    assert "dpmsolve/zoo/weights/digits-cfg3-nfe8.plan.json" in names

    # A fresh venv with only the wheel's dpmsolve; torch, numpy, ... come from this venv through a .pth file
    # (its own .pth files, among them the editable install's, are not processed from there).
    env = tmp_path / "tmpenv"
    _run([sys.executable, "-m", "venv", "--without-pip", env], tmp_path)
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    check = textwrap.dedent(f"""
        import dpmsolve
        assert dpmsolve.__file__.startswith({str(env)!r}), dpmsolve.__file__
        m = dpmsolve.zoo.load("digits")
        plan = dpmsolve.zoo.plan("digits", 8, 3.0)
        assert m.shape == (1, 8, 8) and plan.nfe == 8
        print("ok")
    """)
    assert _run([python, "-c", check], tmp_path).strip() == "ok"
    assert _run([python, "-m", "dpmsolve", "--version"], tmp_path).strip() == "dpmsolve 0.1.0"
    demo_help = _run([env / "bin" / "dpmsolve", "demo", "--help"], tmp_path)
    assert demo_help.startswith("usage: dpmsolve demo") and "--mixture-samples" in demo_help
