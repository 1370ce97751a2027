"""DPM-Solver-v3 against our DPM-Solver++ and UniPC: the issue's quality bar, the EMS cost, the half corrector.

    python benchmarks/v3.py                        # analytic problems + the zoo models (~5 min on 2 CPU cores)
    python benchmarks/v3.py --problems mixture     # one problem
    python benchmarks/v3.py --k-curve              # only: v3 error against K (EMS data points) and EMS time
    python benchmarks/v3.py --sharing              # only: statistics shared across positions vs per element
    python benchmarks/v3.py --lab-metrics          # only: v3 against the best peer in the lab's per-sample metrics

For each analytic problem the EMS are computed here (wall time reported); the zoo models use the statistics
shipped with dpmsolve (``dpmsolve.zoo.statistics``, their recorded wall time). Then every configuration samples the same
start noise on the same grid (uniform logSNR to t_min, the v3 paper's setting) at NFE 5, 6, 8, 10, and the RMSE
against the reference (exact DOP853 for the analytic problems, the lab's cached high-accuracy solve for the
zoo model) is tabulated. "ratio" = v3 with the settings recommended for the problem's guidance
(``DPMSolverV3.recommended``) / best of our DPM-Solver++ and UniPC configurations at that NFE; the issue's bar
is <= 0.8. Writes benchmarks/results/v3.md, v3.json, v3.png
(the studies: v3_k_curve.*, v3_sharing.* and v3_lab.*: the same v3 against our configurations and the lab's 32
diffusers / k-diffusion peers by median per-sample error, far share and RMSE, with bootstrap intervals, over 512
start noises, 128 for patches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianMixture
from dpmsolve.lab.evaluate import LabProblem, standard_problems
from dpmsolve.lab.problems import digits_kde

NFES = (5, 6, 8, 10)
V3 = {
    "v3 (order 2)": dict(order=2),
    "v3 (order 2, half=clean)": dict(order=2, half="clean"),
    "v3 (order 2, half=noisy)": dict(order=2, half="noisy"),
    "v3 (order 2, no corrector)": dict(order=2, corrector=False),
    "v3 (order 3)": dict(order=3),
    "v3 (order 3, pseudo predictor)": dict(order=3, predictor_pseudo=True),
}
DEFAULT_V3 = "v3 (order 2)"          # the K-curve and sharing studies
RECOMMENDED_V3 = "v3 recommended"     # DPMSolverV3.recommended(guidance of the problem): the headline ratio
GUIDANCE = {"mixture": None, "mixture-cfg7.5": 7.5, "digits-kde": None, "digits": 3.0, "digits-flow": 3.0,
            "patches": None}
BASELINES = {
    "DPM-Solver++ 2M": ("dpmsolver++", dict(order=2)),
    "DPM-Solver++ 3M taylor": ("dpmsolver++", dict(order=3, solver_type="taylor")),
    "UniPC bh1 (order 2)": ("unipc", dict(order=2, variant="bh1")),
    "UniPC bh2 (order 2)": ("unipc", dict(order=2, variant="bh2")),
    "UniPC bh2 (order 3)": ("unipc", dict(order=3, variant="bh2")),
}


# ------------------------------------------------------------------------------------------------ problems
def _mixture_problem(n: int, seed: int):
    schedule = dp.DiscreteVP.linear()
    mix = GaussianMixture.random(k=12, dim=8, seed=seed, classes=4)
    uncond = GaussianMixture(mix.means, mix.vars, mix.weights)
    x_T = torch.randn((n, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (LabProblem("mixture", uncond.denoiser(schedule), x_T, f"mixture|{seed}|{n}", uncond.posterior_mean),
            lambda k: dict(data=uncond.data_sample(k, torch.Generator().manual_seed(seed + 1))))


def _cfg_problem(n: int, seed: int):
    (problem,) = standard_problems(n=n, seed=seed, names=["mixture-cfg7.5"])
    mix = GaussianMixture.random(k=12, dim=8, seed=seed, classes=4)
    base = mix.denoiser(problem.schedule)

    def guided(conditions):
        y = conditions["y"]
        return dp.ClassifierFreeGuidance(base, 7.5, cond={"y": y}, uncond={"y": torch.full_like(y, -1)})

    # The guided ODE's marginals are not the data's: the EMS come from the guided model's own trajectories.
    return problem, lambda k: dict(denoiser=guided, n_data=k, shape=(8,), conditions={"y": torch.arange(k) % 4},
                                   schedule=problem.schedule)


def _digits_kde_problem(n: int, seed: int):
    (problem,) = standard_problems(n=n, seed=seed, names=["digits-kde"])
    kde = digits_kde(0.1, classes=False)
    return problem, lambda k: dict(data=kde.data_sample(k, torch.Generator().manual_seed(seed + 1)))


def _zoo_problem(name: str):
    def build(n: int, seed: int):
        from dpmsolve import zoo
        from dpmsolve.lab.neural import zoo_problem

        model = zoo.load(name)
        guidance = 3.0 if model.num_classes else None
        problem = zoo_problem(name, n=n, seed=seed, guidance=guidance)
        if guidance is None:
            return problem, lambda k: dict(n_data=k, shape=model.shape, schedule=model.schedule, shared=True,
                                           denoiser=model.denoiser, dtype=torch.float32)

        def guided(conditions):
            return zoo.guided(model, conditions["y"], guidance)

        return problem, lambda k: dict(denoiser=guided, n_data=k, shape=model.shape, schedule=model.schedule,
                                       conditions={"y": torch.arange(k) % model.num_classes}, shared=True,
                                       dtype=torch.float32)

    return build


PROBLEMS = {"mixture": _mixture_problem, "mixture-cfg7.5": _cfg_problem, "digits-kde": _digits_kde_problem,
            "digits": _zoo_problem("digits"), "digits-flow": _zoo_problem("digits-flow"),
            "patches": _zoo_problem("patches")}
ANALYTIC = ("mixture", "mixture-cfg7.5", "digits-kde")
EMS_SIZE = dict(k=2048, n_lambdas=100)   # analytic problems; the zoo models use their shipped statistics


def compute_ems(problem: LabProblem, spec, k: int, n_lambdas: int) -> tuple[dp.ems.EMS, float]:
    options = spec(k)
    denoiser = options.pop("denoiser", problem.denoiser)
    start = time.perf_counter()
    ems = dp.ems.compute(denoiser, n_lambdas=n_lambdas, batch_size=256, progress=False, model_id=problem.name,
                         **options)
    return ems, time.perf_counter() - start


def rmse(problem: LabProblem, ref: torch.Tensor, solver: str, nfe: int, **options) -> float:
    x_T = problem.x_T if problem.x0_fn is not None else problem.x_T.float()
    out = dp.sample(problem.denoiser, x_T, solver, steps=nfe, grid="logSNR", progress=False, **options).x
    return float(((out.double() - ref.double()) ** 2).mean().sqrt())


def measure(name: str, n: int, seed: int) -> dict:
    problem, spec = PROBLEMS[name](n, seed)
    if name in ANALYTIC:
        ems, wall = compute_ems(problem, spec, EMS_SIZE["k"], EMS_SIZE["n_lambdas"])
    else:  # the zoo models: the statistics that ship with dpmsolve (dpmsolve.zoo.ems), as a user gets them
        from dpmsolve import zoo

        model = zoo.load(name)
        ems = zoo.statistics(name, 3.0 if model.num_classes else None)
        wall = ems.info["wall_seconds"]
    ref = problem.reference("t_min")
    table = {RECOMMENDED_V3: [rmse(problem, ref, "dpmsolver-v3", k, ems=ems,
                                   **dp.DPMSolverV3.recommended(GUIDANCE[name])) for k in NFES]}
    for label, options in V3.items():
        table[label] = [rmse(problem, ref, "dpmsolver-v3", k, ems=ems, **options) for k in NFES]
    for label, (solver, options) in BASELINES.items():
        table[label] = [rmse(problem, ref, solver, k, **options) for k in NFES]
    best = [min(table[b][i] for b in BASELINES) for i in range(len(NFES))]
    return {"problem": name, "ems": {"K": ems.n_data, "n_lambdas": ems.lambdas.size - 1, "stat_shape": ems.stat_shape,
                                     "wall_seconds": round(wall, 1), "source": ems.info["source"]},
            "recommended": dp.DPMSolverV3.recommended(GUIDANCE[name]), "rmse": table, "best_baseline": best,
            "ratio": [table[RECOMMENDED_V3][i] / best[i] for i in range(len(NFES))]}


def k_curve(name: str, n: int, seed: int, ks, n_lambdas: int, nfes=(6, 10)) -> dict:
    problem, spec = PROBLEMS[name](n, seed)
    ref = problem.reference("t_min")
    out = {"problem": name, "K": list(ks), "wall_seconds": [], "rmse": {k: [] for k in nfes}}
    for k in ks:
        ems, wall = compute_ems(problem, spec, k, n_lambdas)
        out["wall_seconds"].append(round(wall, 1))
        for nfe in nfes:
            out["rmse"][nfe].append(rmse(problem, ref, "dpmsolver-v3", nfe, ems=ems, **V3[DEFAULT_V3]))
    out["best_baseline"] = {nfe: min(rmse(problem, ref, s, nfe, **o) for s, o in BASELINES.values()) for nfe in nfes}
    return out


def sharing_study(name: str, ks, n: int = 32, seed: int = 0, n_lambdas: int = 50) -> dict:
    """v3 on a zoo model with statistics shared across positions (what ships) and per element, from the same
    points (same seed) for each K: what sharing costs in accuracy."""
    problem, spec = PROBLEMS[name](n, seed)
    ref = problem.reference("t_min")
    rows = []
    for k in ks:
        for shared in (True, False):
            options = spec(k)
            options["shared"] = shared
            denoiser = options.pop("denoiser", problem.denoiser)
            start = time.perf_counter()
            ems = dp.ems.compute(denoiser, n_lambdas=n_lambdas, batch_size=256, progress=False, **options)
            wall = time.perf_counter() - start
            errs = [rmse(problem, ref, "dpmsolver-v3", nfe, ems=ems, **V3[DEFAULT_V3]) for nfe in NFES]
            rows.append({"K": k, "shared": shared, "stat_shape": ems.stat_shape, "wall_seconds": round(wall, 1),
                         "rmse": errs})
            print(name, rows[-1], flush=True)
    return {"problem": name, "n_lambdas": n_lambdas, "rows": rows}


def sharing_markdown(studies) -> str:
    lines = ["# DPM-Solver-v3: statistics shared across positions vs per element (RMSE, uniform logSNR to t_min)", "",
             "Same points (seed) for both at each K; v3 = order 2 with the full corrector; 32 start noises.", ""]
    for st in studies:
        lines += [f"## {st['problem']} (N = {st['n_lambdas']})", "",
                  "| K | statistics | EMS wall s | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                  "|---:|---|---:|" + "---:|" * len(NFES)]
        for r in st["rows"]:
            kind = f"shared {tuple(r['stat_shape'])}" if r["shared"] else f"per element {tuple(r['stat_shape'])}"
            lines.append(f"| {r['K']} | {kind} | {r['wall_seconds']} | " + " | ".join(f"{v:.4f}" for v in r["rmse"])
                         + " |")
        lines.append("")
    return "\n".join(lines)


def markdown(results, curves) -> str:
    lines = ["# DPM-Solver-v3 vs our DPM-Solver++ and UniPC (uniform logSNR grid to t_min, RMSE)", ""]
    for r in results:
        e = r["ems"]
        lines += [f"## {r['problem']}  (EMS: K={e['K']}, N={e['n_lambdas']}, statistics {tuple(e['stat_shape'])}, "
                  f"source {e['source']}, {e['wall_seconds']} s)", "",
                  "| configuration | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---:|" * len(NFES)]
        for label, errs in r["rmse"].items():
            shown = f"{label} {r['recommended']}" if label == RECOMMENDED_V3 else label
            lines.append(f"| {shown} | " + " | ".join(f"{v:.4f}" for v in errs) + " |")
        lines.append("| **ratio v3 recommended / best ++ or UniPC** | "
                     + " | ".join(f"**{v:.2f}**" for v in r["ratio"]) + " |")
        lines.append("")
    for c in curves:
        lines += [f"## v3 error against K ({c['problem']})", "", "| K | EMS wall s | " +
                  " | ".join(f"NFE {k}" for k in c["rmse"]) + " |", "|---:|---:|" + "---:|" * len(c["rmse"])]
        for i, k in enumerate(c["K"]):
            errs = " | ".join(f"{c['rmse'][n][i]:.4f}" for n in c["rmse"])
            lines.append(f"| {k} | {c['wall_seconds'][i]} | {errs} |")
        lines.append("| best ++ / UniPC | | " + " | ".join(f"{c['best_baseline'][n]:.4f}" for n in c["rmse"]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results) + len(curves)
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        for label in (RECOMMENDED_V3, *BASELINES):
            ax.plot(NFES, r["rmse"][label], marker="o", lw=2.2 if label == RECOMMENDED_V3 else 1, label=label)
        ax.set(xscale="log", yscale="log", title=r["problem"], xlabel="NFE", ylabel="RMSE")
        ax.set_xticks(NFES, [str(k) for k in NFES])
    for ax, c in zip(axes[0][len(results):], curves):
        for nfe, errs in c["rmse"].items():
            line, = ax.plot(c["K"], errs, marker="o", label=f"v3, NFE {nfe}")
            ax.axhline(c["best_baseline"][nfe], color=line.get_color(), ls="--", lw=1,
                       label=f"best ++/UniPC, NFE {nfe}")
        ax.set(xscale="log", yscale="log", title=f"v3 vs K ({c['problem']})", xlabel="K (EMS data points)")
    axes[0][0].legend(fontsize=6)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def lab_metrics(name: str, n: int, seed: int = 0) -> dict:
    """v3 (recommended settings, uniform logSNR to t_min) against the best of our DPM-Solver++ / UniPC
    configurations and the best lab peer, each by median per-sample error, with paired bootstrap ratios."""
    from dpmsolve.lab.metrics import cell_stats, far_threshold, per_sample_errors, ratio_ci
    from dpmsolve.lab.peers import available_peers, run_peer

    problem, spec = PROBLEMS[name](n, seed)
    if name in ANALYTIC:
        ems, _ = compute_ems(problem, spec, EMS_SIZE["k"], EMS_SIZE["n_lambdas"])
        ref = problem.reference("t_min")
    else:
        from dpmsolve import zoo
        from tuning import zoo_reference   # the tuning benchmark's cached 400-step DPM-Solver++ 3M reference

        model = zoo.load(name)
        ems = zoo.statistics(name, 3.0 if model.num_classes else None)
        ref = zoo_reference(problem, "t_min", "3m400")
    threshold = far_threshold(ref)
    x_T = problem.x_T if problem.x0_fn is not None else problem.x_T.float()
    peers = available_peers()
    cells = []
    for nfe in NFES:
        errors, stats = {}, {}

        def record(label, x):
            errors[label] = per_sample_errors(x, ref).numpy()
            stats[label] = cell_stats(x, ref, threshold=threshold, seed=0).to_dict()

        with torch.no_grad():
            record("v3", dp.sample(problem.denoiser, x_T, "dpmsolver-v3", steps=nfe, grid="logSNR", ems=ems,
                                   progress=False, **dp.DPMSolverV3.recommended(GUIDANCE[name])).x)
            for label, (solver, options) in BASELINES.items():
                record(label, dp.sample(problem.denoiser, x_T, solver, steps=nfe, grid="logSNR", progress=False,
                                        **options).x)
        for peer in peers:
            res = run_peer(peer, problem.denoiser, x_T, nfe, "t_min")
            if res.x is not None:
                record(peer, res.x)
        ours = min(BASELINES, key=lambda k: stats[k]["median"])
        best_peer = min((p for p in peers if p in stats), key=lambda k: stats[k]["median"])
        cells.append({"nfe": nfe, "stats": stats, "best_ours": ours, "best_peer": best_peer,
                      **{f"v3_over_{who}_{stat}": list(ratio_ci(errors["v3"], errors[other], stat=stat, seed=0))
                         for who, other in (("ours", ours), ("peer", best_peer)) for stat in ("median", "rmse")}})
    return {"problem": name, "n": n, "threshold": threshold, "recommended": dp.DPMSolverV3.recommended(GUIDANCE[name]),
            "cells": cells}


def lab_markdown(results) -> str:
    def stat(s):
        return f"{s['median']:.3g} [{s['median_ci'][0]:.3g}, {s['median_ci'][1]:.3g}] / {100 * s['far']:.1f}% / {s['rmse']:.3g}"

    def ratio(r):
        return f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"

    lines = ["# DPM-Solver-v3 in the lab's per-sample metrics (uniform logSNR grid to t_min)", "",
             "Per cell: median per-sample error [95% bootstrap interval] / % of samples far from the reference / RMSE. "
             "v3: `DPMSolverV3.recommended(guidance)`. Ours: the best (by median) of DPM-Solver++ 2M / 3M and UniPC "
             "bh1 / bh2 on the same grid. Peer: the best (by median) of the lab's diffusers / k-diffusion "
             "configurations, each on its own grid to t_min. Ratios: paired bootstrap (an interval containing 1 is a "
             "tie). References: exact (analytic), 400-step DPM-Solver++ 3M (networks).", "",
             "| problem | NFE | n | v3 | best ours | | best peer | | v3 / ours (median) | v3 / peer (median) | "
             "v3 / peer (RMSE) |", "|---|---:|---:|---|---|---|---|---|---:|---:|---:|"]
    for r in results:
        for c in r["cells"]:
            st = c["stats"]
            lines.append(f"| {r['problem']} | {c['nfe']} | {r['n']} | {stat(st['v3'])} | {c['best_ours']} | "
                         f"{stat(st[c['best_ours']])} | `{c['best_peer']}` | {stat(st[c['best_peer']])} | "
                         f"{ratio(c['v3_over_ours_median'])} | {ratio(c['v3_over_peer_median'])} | "
                         f"{ratio(c['v3_over_peer_rmse'])} |")
    return "\n".join(lines)


def lab_plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, ax, title in (("ours", axes[0], "v3 / best of ours"), ("peer", axes[1], "v3 / best peer")):
        for r in results:
            ratios = np.array([c[f"v3_over_{key}_median"] for c in r["cells"]])
            ax.errorbar(NFES, ratios[:, 0], yerr=[ratios[:, 0] - ratios[:, 1], ratios[:, 2] - ratios[:, 0]],
                        marker="o", capsize=2, label=r["problem"])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(yscale="log", title=f"median error, {title}", xlabel="NFE")
        ax.set_xticks(NFES, [str(k) for k in NFES])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="*", choices=sorted(PROBLEMS),
                        default=["mixture", "mixture-cfg7.5", "digits-kde", "digits", "digits-flow", "patches"])
    parser.add_argument("--samples", type=int, default=256, help="start noises per analytic problem (zoo: 32)")
    parser.add_argument("--k-curve", action="store_true", help="only the study of v3's error against K")
    parser.add_argument("--sharing", nargs="*", choices=sorted(set(PROBLEMS) - set(ANALYTIC)), default=None,
                        help="only the study of shared vs per-element statistics (default models: all zoo models)")
    parser.add_argument("--lab-metrics", action="store_true",
                        help="only v3 against the best of ours and the best peer in the lab's metrics (512 noises, "
                             "patches 128)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sharing is not None:
        ks = {"digits": (256, 1024), "digits-flow": (256, 1024), "patches": (64, 256)}
        studies = [sharing_study(name, ks[name]) for name in (args.sharing or ("digits", "digits-flow", "patches"))]
        text = sharing_markdown(studies)
        (out / "v3_sharing.md").write_text(text + "\n")
        (out / "v3_sharing.json").write_text(json.dumps(studies, indent=1, default=str))
        print(text)
        return
    if args.lab_metrics:
        results = []
        for name in args.problems:
            results.append(lab_metrics(name, 128 if name == "patches" else 512))
            print(name, [round(c["v3_over_peer_median"][0], 2) for c in results[-1]["cells"]], flush=True)
        text = lab_markdown(results)
        (out / "v3_lab.md").write_text(text + "\n")
        (out / "v3_lab.json").write_text(json.dumps({"results": results}, indent=1, default=str))
        lab_plot(results, out / "v3_lab.png")
        print(text)
        return
    if args.k_curve:
        curves = [k_curve("mixture-cfg7.5", args.samples, 0, (64, 256, 1024, 4096), 100),
                  k_curve("digits", 32, 0, (64, 256, 1024), 50)]
        text = markdown([], curves)
        (out / "v3_k_curve.md").write_text(text + "\n")
        (out / "v3_k_curve.json").write_text(json.dumps({"k_curves": curves}, indent=1, default=str))
        plot([], curves, out / "v3_k_curve.png")
        print(text)
        return
    results = []
    for name in args.problems:
        n = args.samples if name in ANALYTIC else min(args.samples, 32)
        results.append(measure(name, n, seed=0))
        r = results[-1]
        print(name, "EMS", r["ems"], "ratio", " ".join(f"{v:.2f}" for v in r["ratio"]), flush=True)
    text = markdown(results, [])
    (out / "v3.md").write_text(text + "\n")
    (out / "v3.json").write_text(json.dumps({"results": results}, indent=1, default=str))
    plot(results, [], out / "v3.png")
    print(text)
    print(f"wrote {out / 'v3.md'}, v3.json, v3.png")


if __name__ == "__main__":
    main()
