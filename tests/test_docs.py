"""The documentation site builds in strict mode, and its API reference renders the public names.

``mkdocs build --strict`` (mkdocs.yml at the repository root) fails on any warning: a link to a missing page or
anchor, a figure that is not found, a docstring mkdocstrings cannot render, an object that no longer exists. The
site is built into a temporary folder, so the repository is left as it was (about 10 s on two CPU cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    try:
        import mkdocs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mkdocs is not installed ({exc}); pip install -e '.[docs]' installs MkDocs, Material and "
                    "mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}   # Material's banner about its successor, not a warning
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG),
                             "--site-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def _page(site: Path, path: str) -> str:
    page = site / path / "index.html"
    assert page.is_file(), f"{page} was not built"
    return page.read_text(encoding="utf-8")


def test_api_reference_renders_the_public_names(site):
    public = _page(site, "api")
    for name in ("sample", "invert", "tune", "Plan", "wrap_model", "make_grid", "DPMSolverMultistep", "UniPC",
                 "DPMSolverV3", "ClassifierFreeGuidance"):
        assert f'id="dpmsolve.{name}"' in public, f"dpmsolve.{name} is not rendered in the API reference"
        assert re.search(rf"<code>{name}</code>|>{name}<", public), f"no heading for {name}"
    diffusers = _page(site, "api/integrations-diffusers")
    assert 'id="dpmsolve.integrations.diffusers.DPMSolveScheduler"' in diffusers
    kdiffusion = _page(site, "api/integrations-kdiffusion")
    assert 'id="dpmsolve.integrations.kdiffusion.sample_plan"' in kdiffusion
    # Sphinx roles in the docstrings become code or links (docs/_hooks/site_hooks.py), never ":class:" text.
    for path in ("api", "api/tuning", "api/zoo", "api/integrations-diffusers"):
        assert not re.search(r":(class|func|meth|mod|data):<", _page(site, path)), path


def test_kdiffusion_page_lists_every_sampler(site):
    """The sample_<name> functions are made by a factory (no entries of their own): the page's table lists them."""
    from dpmsolve.integrations.kdiffusion import SAMPLERS

    page = _page(site, "api/integrations-kdiffusion")
    page = page.replace("&quot;", '"')
    for name, (solver, _) in SAMPLERS.items():
        row = rf'id="sample_{name}"></span><code>sample_{name}</code></td>\s*<td><code>"{re.escape(solver)}"</code>'
        assert re.search(row, page), f"sample_{name} ({solver!r}) is missing from docs/api/integrations-kdiffusion.md"


def test_every_nav_section_and_the_lab_results_are_built(site):
    for path in ("getting-started", "choosing", "solvers/dpm-solver", "solvers/adaptive", "solvers/unipc",
                 "solvers/v3", "solvers/ddim", "solvers/sde", "schedules-grids", "guidance", "tuning", "integrations",
                 "lab", "models", "safety", "api/lab"):
        _page(site, path)
    # benchmarks/results/*.md and *.png are served under results/ as they are on disk (no copies in docs/)
    for md in (ROOT / "benchmarks" / "results").glob("*.md"):
        _page(site, f"results/{md.stem}")
    for png in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (site / "results" / png.name).is_file(), png.name
    assert 'src="../results/tuning.png"' in _page(site, "choosing")
