"""``dpmsolve bench``: the lab's standard problems, our solvers and the peers, as markdown, JSON and a plot.

Per cell (problem x configuration x NFE) the report has the median per-sample error, the fraction of samples far
from the reference and the RMSE, each with a bootstrap interval (:mod:`dpmsolve.lab.metrics`), over ``samples``
start noises per analytic problem (default 512: at 6-10 NFE a mixture's RMSE over 64 samples is decided by the
two or three that end in another mode).

With ``zoo=("digits", "patches", ...)`` (``dpmsolve bench --zoo [NAME ...]``) the shipped trained models are
measured too, against their cached high-accuracy references (:mod:`dpmsolve.lab.neural`); the default run is
the analytic problems only.

Progress: one line per problem stage and per configuration on stderr (also when stderr is not a terminal).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from .evaluate import DEFAULT_CONFIGS, LAB_NFES, Report, evaluate, standard_problems

BENCH_SAMPLES = 512


def run_bench(problems: Sequence[str] | None = None, nfes: Sequence[int] = LAB_NFES, samples: int = BENCH_SAMPLES,
              endpoint: str = "zero", peers: bool = True, out: str | Path = "dpmsolve-bench",
              progress: bool | None = None, zoo: Sequence[str] = (), zoo_samples: int = 16, n_boot: int = 1000,
              stem: str = "accuracy", written: list[Path] | None = None) -> Report:
    """Run the lab and write ``{stem}.md`` (one table per problem), ``{stem}.json`` (every row with its
    statistics and intervals) and ``{stem}.png`` (median and RMSE against NFE; only where matplotlib is
    installed) into ``out``; the paths of the files actually written are appended to ``written``.

    ``progress`` (None or True: on; False: off): progress lines on stderr."""
    from .peers import available_peers

    started = time.perf_counter()

    def log(message: str) -> None:
        if progress is not False:
            print(f"bench [{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    selected = [] if problems is not None and not problems else standard_problems(n=samples, names=problems)
    if zoo:
        from .neural import zoo_problems

        selected += zoo_problems(n=zoo_samples, names=list(zoo))
    if peers:
        log("looking for the peers (diffusers, k-diffusion)")
    peer_names = available_peers() if peers else []
    rows, meta = [], {"samples": samples, "nfes": list(nfes), "peers": peer_names, "n_boot": n_boot,
                      "far_thresholds": {}, "interval": "95% percentile bootstrap over samples"}
    if zoo:
        meta["zoo_samples"] = zoo_samples
    if peers and not peer_names:
        log("no peers: neither diffusers nor k-diffusion is installed (pip install \"dpmsolve[lab]\")")
    for i, problem in enumerate(selected, 1):
        log(f"{problem.name} ({i}/{len(selected)}): reference solution")
        reference = problem.reference(endpoint)
        jobs = [([config], []) for config in DEFAULT_CONFIGS] + [([], [peer]) for peer in peer_names]
        for j, (configs, peer) in enumerate(jobs, 1):   # one configuration at a time, for the progress lines
            report = evaluate(problem.denoiser, problem.x_T, configs, nfes, reference=reference, endpoint=endpoint,
                              peers=peer, problem=problem.name, progress=False, n_boot=n_boot)
            rows += report.rows
            log(f"{problem.name}: {(configs[0].label if configs else peer[0])} ({j}/{len(jobs)})")
        meta["far_thresholds"][problem.name] = report.meta["far_threshold"]
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = Report(rows, endpoint, meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [] if written is None else written
    (out / f"{stem}.md").write_text("\n\n".join(report.to_markdown(p) for p in report.problems()) + "\n")
    (out / f"{stem}.json").write_text(report.to_json())
    written += [out / f"{stem}.md", out / f"{stem}.json"]
    try:
        written.append(report.plot(out / f"{stem}.png"))
    except ImportError:
        log(f"no {stem}.png: matplotlib is not installed")
    return report
