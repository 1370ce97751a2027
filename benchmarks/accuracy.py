"""Regenerate the accuracy tables and plots shown in the README ("How accurate is it?").

    python benchmarks/accuracy.py            # all lab problems, NFE 5..20, ours and the peers, 512 samples, to
                                             # sigma = 0 and to t_min: 7.5 min on 2 CPU cores with the references
                                             # cached; the first run also computes the six references (the sigma = 0
                                             # half alone took 7.2 min from a cold cache on a busy 2-core machine)
    python benchmarks/accuracy.py --endpoint zero --samples 128     # a quicker look
    python benchmarks/accuracy.py --zoo      # also the shipped zoo models (digits, digits-flow, patches)
    python benchmarks/accuracy.py --zoo patches --out /tmp/zoo-results
    python benchmarks/accuracy.py --draws 8     # only: how the guided-mixture cells move with the start noise

Per cell (problem x configuration x NFE): the median per-sample error, the fraction of samples far from the
reference (another mode) and the RMSE, each with a 95% bootstrap interval (dpmsolve.lab.metrics). Writes
benchmarks/results/accuracy.md, accuracy.json, accuracy.png (endpoint sigma = 0), accuracy_t_min.{md,json,png}
(endpoint t_min, where diffusers' noise-prediction DPM-Solvers run) and summary.md: per problem, endpoint and NFE
the best peer BY MEDIAN with its median / far% / RMSE and intervals, and the README's recommended configuration
with its ratio to that peer (paired bootstrap over the shared start noises). ``--draws`` writes
accuracy_draws.md. References are cached in $DPMSOLVE_CACHE (default ~/.cache/dpmsolve).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from dpmsolve.lab.bench import BENCH_SAMPLES, run_bench
from dpmsolve.lab.evaluate import RECOMMENDED, LabProblem, standard_problems
from dpmsolve.lab.metrics import ratio_ci
from dpmsolve.lab.peers import run_peer

DRAW_PEERS = ("diffusers:ddim", "diffusers:dpm++2m", "diffusers:dpm++3m", "diffusers:unipc-bh2")


def _ci(value: float, ci, fmt: str = "{:.3g}") -> str:
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _pct(value: float, ci) -> str:
    return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _verdict(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "?"
    return "tie" if lo <= 1.0 <= hi else ("better" if hi < 1.0 else "worse")


def summary(report) -> str:
    """Per problem and NFE (one endpoint): the best peer by median with its median / far% / RMSE and intervals,
    and the README's recommended configuration with its own numbers and its ratio to that peer (median and RMSE;
    paired bootstrap over the shared start noises: 'tie' when the 95% interval contains 1)."""
    nfes = sorted({r.nfe for r in report.rows})
    n = sorted({r.n for r in report.rows if r.n})
    lines = [f"### endpoint {report.endpoint!r} ({', '.join(map(str, n))} samples per problem; 95% bootstrap "
             "intervals in brackets)", "",
             "| problem | NFE | best peer (by median) | median | far % | RMSE | recommended: median | far % | RMSE "
             "| ratio median (rec / peer) | ratio RMSE | verdict (median) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    tally = {"better": 0, "tie": 0, "worse": 0, "?": 0}
    ratios = []
    winners = []
    for problem in report.problems():
        rec = {r.nfe: r for r in report.rows if r.problem == problem and r.label == RECOMMENDED.label}
        names = []
        for k in nfes:
            peer = report.best(problem, k, exclude="dpmsolve", by="median")
            if peer is None:
                lines.append(f"| {problem} | {k} | (no peer ran) | | | | | | | | | |")
                continue
            names.append(f"{k}: {peer.label}")
            cells = [problem, str(k), f"`{peer.label}`", _ci(peer.median, peer.median_ci), _pct(peer.far, peer.far_ci),
                     _ci(peer.rmse, peer.rmse_ci)]
            r = rec.get(k)
            if r is None or r.median is None or r.errors is None or peer.errors is None:
                cells += ["failed" if r is not None else "", "", "", "", "", ""]
            else:
                med = ratio_ci(r.errors, peer.errors, stat="median")
                rms = ratio_ci(r.errors, peer.errors, stat="rmse")
                verdict = _verdict(med[1], med[2])
                tally[verdict] += 1
                ratios.append(med[0])
                cells += [_ci(r.median, r.median_ci), _pct(r.far, r.far_ci), _ci(r.rmse, r.rmse_ci),
                          _ci(med[0], med[1:], "{:.2f}"), _ci(rms[0], rms[1:], "{:.2f}"), verdict]
            lines.append("| " + " | ".join(cells) + " |")
        winners.append(f"- best peer by median ({problem}, {report.endpoint}): " + ", ".join(names))
    if ratios:
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        lines += ["", f"Recommended ({RECOMMENDED.label}) against the best peer by median, endpoint "
                  f"{report.endpoint!r}: better in {tally['better']}, tie in {tally['tie']}, worse in {tally['worse']}"
                  f" of {len(ratios)} cells (paired 95% interval of the median ratio below 1 / containing 1 / above "
                  f"1); median ratios from {min(ratios):.2f} to {max(ratios):.2f}, geometric mean {gm:.2f}."]
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
    parser.add_argument("--samples", type=int, default=None,
                        help=f"start noises per analytic problem (default {BENCH_SAMPLES}; --draws: 64)")
    parser.add_argument("--endpoint", choices=["zero", "t_min", "both"], default="both",
                        help="sigma = 0 (accuracy.*), t_min (accuracy_t_min.*) or both (default)")
    parser.add_argument("--zoo", nargs="*", default=None, metavar="MODEL",
                        help="also the shipped zoo models (no names: digits, digits-flow and patches)")
    parser.add_argument("--zoo-samples", type=int, default=16)
    parser.add_argument("--draws", type=int, default=0, help="only the study over start-noise draws (guided mixture)")
    args = parser.parse_args()
    if args.draws:
        text = draws_study(args.draws, args.samples or 64)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "accuracy_draws.md").write_text(text + "\n")
        print(text)
        return
    zoo = () if args.zoo is None else (args.zoo or ["digits", "digits-flow", "patches"])
    samples = args.samples or BENCH_SAMPLES
    endpoints = ("zero", "t_min") if args.endpoint == "both" else (args.endpoint,)
    parts, written = [], []
    started = time.perf_counter()
    for endpoint in endpoints:
        stem = "accuracy" if endpoint == "zero" else "accuracy_t_min"
        t0 = time.perf_counter()
        report = run_bench(samples=samples, endpoint=endpoint, out=args.out, zoo=zoo, zoo_samples=args.zoo_samples,
                           stem=stem)
        parts.append(summary(report) + f"\n\n(endpoint {endpoint!r}: {time.perf_counter() - t0:.0f} s wall)")
        written += [f"{stem}.md", f"{stem}.json", f"{stem}.png"]
    text = "\n\n".join(parts) + f"\n\nTotal wall time {time.perf_counter() - started:.0f} s."
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)
    print(f"Wrote {args.out}/{', '.join(written)} and summary.md")


if __name__ == "__main__":
    main()
