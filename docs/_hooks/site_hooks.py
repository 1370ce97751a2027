"""MkDocs hooks of the dpmsolve site (``hooks:`` in mkdocs.yml).

* ``on_files``: serve the lab's results (``benchmarks/results/*.md`` and ``*.png``) under ``results/``. The
  benchmark scripts write their tables and figures there; the site shows them without copies in ``docs/``
  that would go stale when a benchmark is re-run (the JSON files stay out).
* ``on_page_markdown``: pages link to those files by their repository path (``../benchmarks/results/x.md``
  from ``docs/``), which works when the Markdown is read on GitHub; in the site the link is pointed at
  ``results/x.md`` before MkDocs validates it.
* ``on_env``: the docstrings use Sphinx roles (``:class:`~dpmsolve.Plan```), which the Google-style Markdown
  renderer shows literally (":class:" before the code). Each becomes a link to the object where the site
  documents it (``~`` shows the last name only), or plain code where it does not.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

SOURCE = ("benchmarks", "results")
SUFFIXES = (".md", ".png")
# What the Markdown renderer makes of :role:`target`: the role name, then the target as inline code.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)</code>")


def on_files(files, config):
    root = Path(config["config_file_path"]).resolve().parent
    folder = root.joinpath(*SOURCE)
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        if path.suffix in SUFFIXES and path.is_file():
            uri = f"results/{path.name}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


# A Markdown link or image to benchmarks/results/, relative to the page's folder in docs/.
RESULTS_LINK = re.compile(r"(\]\()((?:\.\./)+)benchmarks/results/")


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")                 # folders between docs/ and the page

    def local(match: re.Match) -> str:
        if len(match.group(2)) != 3 * (depth + 1):     # not a path from docs/ up to the repository root
            return match.group(0)
        return f"{match.group(1)}{'../' * depth}results/"

    return RESULTS_LINK.sub(local, markdown)


ANCHOR = re.compile(r'id="(dpmsolve(?:\.\w+)+)"')


def on_env(env, config, files):
    """Turn the Sphinx roles of every page into cross-references (before mkdocs-autorefs resolves them, which
    it does in its own, later ``on_env``): an exact ``dpmsolve.`` name, else the one documented object whose
    full name ends with the target (``EMS.load``), else plain code."""
    pages = [f.page for f in files if f.page is not None and f.page.content]
    known = set()
    for page in pages:
        known.update(ANCHOR.findall(page.content))

    def resolve(target: str) -> str | None:
        for name in (target, f"dpmsolve.{target}"):
            if name in known:
                return name
        matches = [name for name in known if name.endswith(f".{target}")]
        return matches[0] if len(matches) == 1 else None

    def replace(match: re.Match) -> str:
        short, target = match.groups()
        title = f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"
        identifier = resolve(target)
        return title if identifier is None else f'<autoref identifier="{identifier}" optional>{title}</autoref>'

    for page in pages:
        page.content = SPHINX_ROLE.sub(replace, page.content)
    return env
