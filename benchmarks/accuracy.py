"""Regenerate the accuracy tables and plot shown in the README ("How accurate is it?").

    python benchmarks/accuracy.py            # all lab problems, NFE 5..20, ours and the peers (~5 min on 2 CPU cores)
    python benchmarks/accuracy.py --zoo      # also the shipped zoo models (digits, digits-flow, patches)
    python benchmarks/accuracy.py --zoo patches --out /tmp/zoo-results

Writes benchmarks/results/accuracy.md (full tables), accuracy.json, accuracy.png and summary.md (the README's
recommended configuration and the best of ours vs the best peer per NFE). References are cached in $DPMSOLVE_CACHE (default ~/.cache/dpmsolve).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dpmsolve.lab.bench import run_bench
from dpmsolve.lab.evaluate import LAB_NFES, RECOMMENDED


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--zoo", nargs="*", default=None, metavar="MODEL",
                        help="also the shipped zoo models (no names: digits, digits-flow and patches)")
    parser.add_argument("--zoo-samples", type=int, default=16)
    args = parser.parse_args()
    zoo = () if args.zoo is None else (args.zoo or ["digits", "digits-flow", "patches"])
    report = run_bench(samples=args.samples, out=args.out, zoo=zoo, zoo_samples=args.zoo_samples)
    text = summary(report)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)
    print(f"Wrote {args.out}/accuracy.md, accuracy.json, accuracy.png and summary.md")


if __name__ == "__main__":
    main()
