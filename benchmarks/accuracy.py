"""Regenerate the accuracy tables and plot shown in the README ("How accurate is it?").

    python benchmarks/accuracy.py            # all lab problems, NFE 5..20, ours and the peers (~5 min on 2 CPU cores)
    python benchmarks/accuracy.py --zoo      # also the shipped zoo models (digits, digits-flow, patches)
    python benchmarks/accuracy.py --zoo patches --out /tmp/zoo-results
    python benchmarks/accuracy.py --draws 8     # only: how the guided-mixture cells move with the start noise

Writes benchmarks/results/accuracy.md (full tables), accuracy.json, accuracy.png and summary.md (the README's
recommended configuration and the best of ours vs the best peer per NFE); ``--draws`` writes accuracy_draws.md.
References are cached in $DPMSOLVE_CACHE (default ~/.cache/dpmsolve).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from dpmsolve.lab.bench import run_bench
from dpmsolve.lab.evaluate import LAB_NFES, RECOMMENDED, LabProblem, standard_problems
from dpmsolve.lab.peers import run_peer

DRAW_PEERS = ("diffusers:ddim", "diffusers:dpm++2m", "diffusers:dpm++3m", "diffusers:unipc-bh2")


def summary(report) -> str:
    """Per problem and NFE: the README's recommended configuration and our best configuration against the best
    peer (the README table), then the recommendation's worst and geometric-mean ratio, then the winners."""
    lines = ["| problem | | " + " | ".join(f"NFE {k}" for k in LAB_NFES) + " |", "|---|---|" + "---:|" * len(LAB_NFES)]
    winners, rec_ratios = [], []
    for problem in report.problems():
        ours = [report.best(problem, k, source="dpmsolve") for k in LAB_NFES]
        peers = [report.best(problem, k, exclude="dpmsolve") for k in LAB_NFES]
        rec = {r.nfe: r for r in report.rows if r.problem == problem and r.label == RECOMMENDED.label}
        if all(b is not None for b in peers) and all(rec.get(k) is not None and rec[k].rmse is not None
                                                     for k in LAB_NFES):
            ratios = [rec[k].rmse / b.rmse for k, b in zip(LAB_NFES, peers)]
            rec_ratios += ratios
            lines.append(f"| {problem} | recommended / best peer | "
                         + " | ".join(f"{rec[k].rmse:.3f} / {b.rmse:.3f}" for k, b in zip(LAB_NFES, peers)) + " |")
            lines.append("| | ratio (recommended) | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        if any(a is None for a in ours):
            continue
        if any(b is None for b in peers):   # e.g. no peer runs on the problem's schedule
            lines.append(f"| {problem} | best dpmsolve (no peer ran) | "
                         + " | ".join(f"{a.rmse:.3f}" for a in ours) + " |")
            peers = []
        else:
            lines.append(f"| {problem} | best dpmsolve / best peer | "
                         + " | ".join(f"{a.rmse:.3f} / {b.rmse:.3f}" for a, b in zip(ours, peers)) + " |")
            lines.append("| | ratio (best dpmsolve) | " + " | ".join(f"{a.rmse / b.rmse:.2f}" for a, b in zip(ours, peers))
                         + " |")
        for name, rows in (("dpmsolve", ours), ("peer", peers)):
            if rows:
                winners.append(f"- best {name} per NFE ({problem}): "
                               + ", ".join(f"{k}: {r.label}" for k, r in zip(LAB_NFES, rows)))
    if rec_ratios:
        gm = math.exp(sum(map(math.log, rec_ratios)) / len(rec_ratios))
        lines += ["", f"Recommended ({RECOMMENDED.label}): worst ratio {max(rec_ratios):.2f}, geometric mean "
                  f"{gm:.3f}, {sum(r <= 1 for r in rec_ratios)} of {len(rec_ratios)} cells <= 1 "
                  "(ratio = its RMSE / the best of the peer configurations in that cell)."]
    return "\n".join(lines + [""] + winners)


def draws_study(draws: int, samples: int = 64, nfes=(5, 6, 8, 10)) -> str:
    """The guided mixture (CFG 7.5) with ``draws`` other sets of ``samples`` start noises: the recommended
    configuration against the diffusers peers that win its cells, per draw (to sigma = 0, exact references)."""
    (base,) = standard_problems(n=samples, seed=0, names=["mixture-cfg7.5"])
    lines = [f"# mixture-cfg7.5: the recommended configuration vs diffusers peers over {draws} draws of {samples} "
             "start noises (RMSE to sigma = 0)", "",
             "| NFE | draw | recommended | " + " | ".join(p.split(":")[1] for p in DRAW_PEERS) + " | ratio to best |",
             "|---:|---:|---:|" + "---:|" * (len(DRAW_PEERS) + 1)]
    summary = []
    for nfe in nfes:
        ratios = []
        for draw in range(draws):
            x_T = torch.randn((samples, 8), generator=torch.Generator().manual_seed(1000 + draw), dtype=torch.float64)
            problem = LabProblem(base.name, base.denoiser, x_T, f"mixture-cfg7.5|draw{1000 + draw}|{samples}",
                                 base.x0_fn)
            ref = problem.reference("zero")

            def err(x):
                return float(((x.double() - ref) ** 2).mean().sqrt()) if x is not None else math.nan

            rec = err(RECOMMENDED.run(base.denoiser, x_T, nfe, "zero").x)
            peers = [err(run_peer(name, base.denoiser, x_T, nfe, "zero").x) for name in DRAW_PEERS]
            ratios.append(rec / np.nanmin(peers))
            lines.append(f"| {nfe} | {draw} | {rec:.3f} | " + " | ".join(f"{v:.3f}" for v in peers)
                         + f" | {ratios[-1]:.2f} |")
        summary.append(f"- NFE {nfe}: ratio recommended / best peer from {min(ratios):.2f} to {max(ratios):.2f} "
                       f"(median {np.median(ratios):.2f}); <= 1 in {sum(r <= 1 for r in ratios)} of {draws} draws")
    return "\n".join(lines + [""] + summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--zoo", nargs="*", default=None, metavar="MODEL",
                        help="also the shipped zoo models (no names: digits, digits-flow and patches)")
    parser.add_argument("--zoo-samples", type=int, default=16)
    parser.add_argument("--draws", type=int, default=0, help="only the study over start-noise draws (guided mixture)")
    args = parser.parse_args()
    if args.draws:
        text = draws_study(args.draws, args.samples)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "accuracy_draws.md").write_text(text + "\n")
        print(text)
        return
    zoo = () if args.zoo is None else (args.zoo or ["digits", "digits-flow", "patches"])
    report = run_bench(samples=args.samples, out=args.out, zoo=zoo, zoo_samples=args.zoo_samples)
    text = summary(report)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)
    print(f"Wrote {args.out}/accuracy.md, accuracy.json, accuracy.png and summary.md")


if __name__ == "__main__":
    main()
