"""``dpmsolve bench``: the lab's standard problems, our solvers and the peers, as markdown, JSON and a plot.

With ``zoo=("digits", "patches", ...)`` (``dpmsolve bench --zoo [NAME ...]``) the shipped trained models are
measured too, against their cached high-accuracy references (:mod:`dpmsolve.lab.neural`); the default run is
the analytic problems only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .evaluate import DEFAULT_CONFIGS, LAB_NFES, Report, evaluate, standard_problems


def run_bench(problems: Sequence[str] | None = None, nfes: Sequence[int] = LAB_NFES, samples: int = 64,
              endpoint: str = "zero", peers: bool = True, out: str | Path = "dpmsolve-bench",
              progress: bool | None = None, zoo: Sequence[str] = (), zoo_samples: int = 16) -> Report:
    from .peers import available_peers

    peer_names = available_peers() if peers else []
    rows, meta = [], {"samples": samples, "nfes": list(nfes), "peers": peer_names}
    selected = [] if problems is not None and not problems else standard_problems(n=samples, names=problems)
    if zoo:
        from .neural import zoo_problems

        selected += zoo_problems(n=zoo_samples, names=list(zoo))
        meta["zoo_samples"] = zoo_samples
    for problem in selected:
        reference = problem.reference(endpoint)
        report = evaluate(problem.denoiser, problem.x_T, DEFAULT_CONFIGS, nfes, reference=reference,
                          endpoint=endpoint, peers=peer_names, problem=problem.name, progress=progress)
        rows += report.rows
    report = Report(rows, endpoint, meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text("\n\n".join(report.to_markdown(p) for p in report.problems()) + "\n")
    (out / "accuracy.json").write_text(report.to_json())
    try:
        report.plot(out / "accuracy.png")
    except ImportError:
        pass
    return report
