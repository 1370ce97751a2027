"""The quality bar of tuned plans: a plan tuned on one set of start noises, measured on another, against the best
diffusers / k-diffusion configuration of every cell, and the untuned default beside it.

    python benchmarks/tuning.py                                   # the lab's analytic problems, NFE 5..20,
                                                                  # both endpoints (tuning.md, tuning_t_min.md):
                                                                  # 20.5 min on a busy 2-core CPU, 1 thread
    python benchmarks/tuning.py --problems digits digits-flow patches --nfes 5 6 8 10 --endpoint zero
    python benchmarks/tuning.py --problems gaussian --nfes 5 --samples 64 --out /tmp/tuning   # a quick look
    python benchmarks/tuning.py --report-only                     # rebuild the tables and plots from the JSON
    python benchmarks/tuning.py --problems ... --resume           # only the cells not yet in the JSON

Per problem, endpoint and NFE:

1. **Tuned plan.** Analytic problems (``gaussian``, ``mixture-cfg7.5``, ``digits-kde``): :func:`dpmsolve.tune` on
   ``--tune-samples`` (128) start noises drawn from seed ``TUNE_SEED`` (not the evaluation seed), with
   ``reference=`` their exact solution (a DOP853 solve of the exact guided denoiser), a quarter held out (the
   tuner's default), all NFEs of a problem and endpoint in one call (as ``dpmsolve tune --nfe ...`` does). Zoo models (``digits``, ``digits-flow`` at CFG 3, ``patches``): the shipped plan
   (``dpmsolve.zoo.plan``) where one exists for the endpoint ``"zero"`` and that NFE, else
   ``dpmsolve.zoo.plans.tune_model`` (its noise seed 12345 and default number of tuning noises).
2. **Evaluation** on other start noises: the analytic problems' lab noises (``standard_problems(n, seed=0)``,
   ``--samples``, default 512; references by DOP853 of the exact denoiser); the zoo problems' lab noises
   (``zoo_problem(name, n, seed=0)``, ``--zoo-samples``, default 512 for digits / digits-flow and 128 for
   patches; cached references by DPM-Solver++ 3M with 400 uniform-lambda steps, within ~1e-4 of the lab's adaptive
   references, see ``zoo_reference`` and ``--zoo-reference``: the lab's own cost ~5000 evaluations, about 2.4 hours
   for digits at 512 noises on one busy core). Measured: the tuned plan,
   the model-free default (``dp.sample`` without solver or grid) and every available peer (``available_peers()``),
   each with ``cell_stats`` (median per-sample error, far fraction, RMSE, 95% bootstrap intervals) and paired
   ``ratio_ci`` of tuned / best peer and default / best peer (the best peer BY MEDIAN in the cell).
3. **The bar**, per cell: median ratio tuned / best peer <= 0.5, far fraction <= the peer's + 0.5 percentage
   points, RMSE <= the peer's; and for the default: geometric mean over the cells of default / best peer <= 1.0.

Results of separate runs merge: every cell is written into ``tuning.json`` (endpoint sigma = 0) or
``tuning_t_min.json`` (under a file lock, replacing the same problem and NFE), and ``tuning.md``,
``tuning_t_min.md``, ``tuning.png``, ``tuning_t_min.png`` are rebuilt from all the JSON present after every cell.
Progress lines (problem, endpoint, NFE, elapsed) go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import warnings

import numpy as np
import torch

import dpmsolve as dp
from dpmsolve.lab.evaluate import LAB_NFES, LabProblem, standard_problems
from dpmsolve.lab.metrics import cell_stats, far_threshold, per_sample_errors, ratio_ci

ANALYTIC = ("gaussian", "mixture-cfg7.5", "digits-kde")
ZOO = {"digits": 3.0, "digits-flow": 3.0, "patches": None}
ORDER = ANALYTIC + tuple(ZOO)
EVAL_SEED = 0             # the lab's evaluation noises (standard_problems / zoo_problem seed)
TUNE_SEED = 20250611      # analytic tuning noises (the zoo's tuning noises use dpmsolve.zoo.plans.NOISE_SEED)
ZOO_SAMPLES = {"digits": 512, "digits-flow": 512, "patches": 128}
N_BOOT = 1000
MEDIAN_BAR, FAR_SLACK = 0.5, 0.005
STEM = {"zero": "tuning", "t_min": "tuning_t_min"}

_T0 = time.perf_counter()
warnings.filterwarnings("ignore", message=r".*algorithm_type", category=FutureWarning)   # diffusers' dpmsolver notices


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:8.1f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ problems
def _x_hash(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().to(torch.float64).numpy().tobytes()).hexdigest()[:12]


def _keyed(problem: LabProblem, x_T: torch.Tensor, tag: str) -> LabProblem:
    """The same model with start noises x_T, its reference cached under a key that includes the noises' hash
    (the lab's own keys name only seed and n, and standard_problems draws a problem's noises after those of the
    problems built before it)."""
    return LabProblem(problem.name, problem.denoiser, x_T, f"{problem.key}|{tag}|x_T={_x_hash(x_T)}",
                      problem.x0_fn, problem.reference_rtol)


def analytic_problems(name: str, samples: int, tune_samples: int) -> tuple[LabProblem, LabProblem]:
    """(evaluation problem, tuning problem): the same analytic model (parameters from seed 0), the lab's
    evaluation noises (as ``dpmsolve bench`` draws them) and ``tune_samples`` noises from TUNE_SEED."""
    evaluation = {p.name: p for p in standard_problems(n=samples, seed=EVAL_SEED)}[name]
    evaluation = _keyed(evaluation, evaluation.x_T, "bench-noise")
    (base,) = standard_problems(n=tune_samples, seed=EVAL_SEED, names=[name])   # labels arange(K) % 4 for CFG
    x_tune = torch.randn(base.x_T.shape, generator=torch.Generator().manual_seed(TUNE_SEED), dtype=torch.float64)
    return evaluation, _keyed(base, x_tune, f"tune-seed={TUNE_SEED}")


# ------------------------------------------------------------------------------------------------ measuring
def _stats(x: torch.Tensor, ref: torch.Tensor, threshold: float) -> tuple[dict, np.ndarray]:
    s = cell_stats(x, ref, threshold=threshold, n_boot=N_BOOT, seed=0)
    d = s.to_dict()
    d.pop("threshold")
    return d, per_sample_errors(x, ref).numpy()


def _ratio(a: np.ndarray, b: np.ndarray, stat: str) -> list[float]:
    return list(ratio_ci(a, b, stat=stat, n_boot=N_BOOT, seed=0))


def measure_cell(denoiser, x_T: torch.Tensor, ref: torch.Tensor, threshold: float, plan_of, nfe: int,
                 endpoint: str, peers: list[str]) -> tuple[dict, dp.Plan]:
    """Every peer, the default and the tuned plan at one NFE: statistics, the best peer by median, ratios and the
    bar. ``plan_of()`` gives the tuned plan; it is called last (a shipped plan that appears meanwhile is used)."""
    from dpmsolve.lab.peers import run_peer

    errors, cell = {}, {"nfe": nfe, "n": int(x_T.shape[0]), "threshold": threshold}
    cell["peers"] = {}
    for name in peers:
        t0 = time.perf_counter()
        res = run_peer(name, denoiser, x_T, nfe, endpoint)
        if res.x is None:
            cell["peers"][name] = {"error": (res.error or "")[:300], "nfe_used": res.nfe}
            continue
        stats, errors[name] = _stats(res.x, ref, threshold)
        stats.update(nfe_used=res.nfe, seconds=time.perf_counter() - t0)
        cell["peers"][name] = stats
    t0 = time.perf_counter()
    with torch.no_grad():
        out = dp.sample(denoiser, x_T, steps=nfe, t_end=0.0 if endpoint == "zero" else None, progress=False)
    cell["default"], errors["default"] = _stats(out.x, ref, threshold)
    cell["default"].update(nfe_used=out.nfe, seconds=time.perf_counter() - t0)
    plan = plan_of()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = dp.sample(denoiser, x_T, plan, progress=False)
    cell["tuned"], errors["tuned"] = _stats(out.x, ref, threshold)
    cell["tuned"].update(nfe_used=out.nfe, seconds=time.perf_counter() - t0)
    ok = {k: v for k, v in cell["peers"].items() if "error" not in v}
    if not ok:
        cell["best_peer"] = None
        return cell, plan
    best = min(ok, key=lambda k: (ok[k]["median"], ok[k]["rmse"]))
    cell["best_peer"] = best
    peer = ok[best]
    for who in ("tuned", "default"):
        cell[f"ratio_{who}"] = {"median": _ratio(errors[who], errors[best], "median"),
                                "rmse": _ratio(errors[who], errors[best], "rmse")}
    t = cell["tuned"]
    cell["bar"] = {"median": cell["ratio_tuned"]["median"][0] <= MEDIAN_BAR,
                   "far": t["far"] <= peer["far"] + FAR_SLACK + 1e-12,
                   "rmse": t["rmse"] <= peer["rmse"]}
    cell["bar"]["all"] = all(cell["bar"].values())
    return cell, plan


def _plan_record(plan: dp.Plan, source: str, wall_s: float | None = None) -> dict:
    info = plan.info or {}
    cost = info.get("cost", {})
    return {"source": source, "wall_s": wall_s, "code": CODE, "plan": plan.to_dict(),
            "steps": " ".join(s.short() for s in plan.steps),
            "cost": cost, "held_out": info.get("held_out"), "tune": info.get("tune"),
            "candidate": info.get("candidate")}


# ------------------------------------------------------------------------------------------------ storage
@contextlib.contextmanager
def _locked(path: Path):
    import tempfile

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"dpmsolve-tuning-{digest}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store(out: Path, endpoint: str, problem: str, meta: dict, nfe: int | None = None, cell: dict | None = None,
          plan: dict | None = None) -> None:
    """Merge one problem's meta (and one cell with its plan) into the endpoint's JSON."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{STEM[endpoint]}.json"
    with _locked(path):
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault("endpoint", endpoint)
        entry = data.setdefault("problems", {}).setdefault(problem, {"cells": {}, "plans": {}})
        entry.update(meta)
        if cell is not None:
            entry["cells"][str(nfe)] = cell
            entry["plans"][str(nfe)] = plan
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
        tmp.replace(path)


def load(out: Path, endpoint: str) -> dict:
    path = out / f"{STEM[endpoint]}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------ report
def _f(v: float) -> str:
    return f"{v:.3g}"


def _stat_text(s: dict) -> str:
    nfe = "" if s.get("nfe_used") in (None, s.get("_nfe")) else f" ({s['nfe_used']} NFE)"
    return (f"{_f(s['median'])} [{_f(s['median_ci'][0])}, {_f(s['median_ci'][1])}] / {100 * s['far']:.1f}% / "
            f"{_f(s['rmse'])}{nfe}")


def _ratio_text(r: list[float]) -> str:
    return f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"


def _gm(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def _problems_in(data: dict) -> list[str]:
    names = list(data.get("problems", {}))
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _failures(cell: dict) -> list[str]:
    peer = cell["peers"][cell["best_peer"]]
    t, out = cell["tuned"], []

    def band(ratio, bar):   # the paired 95% interval of a ratio, and whether it reaches the bar (a tie)
        r, lo, hi = ratio
        return f"paired 95% interval {lo:.2f}-{hi:.2f}" + (", inside the noise band" if lo <= bar else "")

    r = cell["ratio_tuned"]["median"]
    if not cell["bar"]["median"]:
        out.append(f"median ratio {r[0]:.2f} > {MEDIAN_BAR} ({r[0] / MEDIAN_BAR:.2f}x the bar; {band(r, MEDIAN_BAR)})")
    if not cell["bar"]["far"]:
        out.append(f"far {100 * t['far']:.1f}% vs peer {100 * peer['far']:.1f}% "
                   f"(+{100 * (t['far'] - peer['far']):.1f} pp > +0.5 pp)")
    if not cell["bar"]["rmse"]:
        out.append(f"RMSE {_f(t['rmse'])} vs peer {_f(peer['rmse'])} ({t['rmse'] / peer['rmse']:.2f}x; "
                   f"{band(cell['ratio_tuned']['rmse'], 1.0)})")
    return out


def markdown(data: dict) -> str:
    endpoint = data.get("endpoint", "?")
    where = "sigma = 0" if endpoint == "zero" else "the schedule's t_min"
    lines = [f"# Tuned plans against the best peer, endpoint {endpoint!r} ({where})", "",
             "Per cell: median per-sample error [95% bootstrap interval] / % of samples far from the reference / RMSE. "
             "Tuned: a plan tuned on other start noises than these (the noises and references are listed below "
             "the table; zoo: the shipped plan, or `tune_model` where none ships). Default: `dp.sample` without "
             "solver or grid. Best peer: the "
             "diffusers / k-diffusion configuration with the smallest median in the cell. Ratios: paired bootstrap "
             "over the shared start noises. Bar: median ratio <= 0.5, far <= peer + 0.5 pp, RMSE <= peer.", "",
             "| problem | NFE | n | tuned | default | best peer (by median) | peer | tuned / peer (median) | "
             "default / peer (median) | tuned / peer (RMSE) | median <= 0.5x | far <= +0.5pp | RMSE <= | bar |",
             "|---|---:|---:|---|---|---|---|---:|---:|---:|:-:|:-:|:-:|:-:|"]
    gm_t, gm_d, per_problem, fails, costs = [], [], {}, [], []
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    for name in _problems_in(data):
        entry = data["problems"][name]
        label = entry.get("label", name)
        pt, pd = [], []
        for key in sorted(entry["cells"], key=int):
            cell = entry["cells"][key]
            nfe = cell["nfe"]
            if cell.get("best_peer") is None:
                lines.append(f"| {label} | {nfe} | {cell['n']} | {_stat_text(cell['tuned'])} | "
                             f"{_stat_text(cell['default'])} | (no peer ran) | | | | | | | | |")
                continue
            peer = cell["peers"][cell["best_peer"]]
            for s in (cell["tuned"], cell["default"], peer):
                s["_nfe"] = nfe
            b = cell["bar"]
            lines.append(f"| {label} | {nfe} | {cell['n']} | {_stat_text(cell['tuned'])} | "
                         f"{_stat_text(cell['default'])}"
                         f" | `{cell['best_peer']}` | {_stat_text(peer)} | {_ratio_text(cell['ratio_tuned']['median'])}"
                         f" | {_ratio_text(cell['ratio_default']['median'])} | "
                         f"{_ratio_text(cell['ratio_tuned']['rmse'])} | {yes(b['median'])} | {yes(b['far'])} | "
                         f"{yes(b['rmse'])} | {yes(b['all'])} |")
            pt.append(cell["ratio_tuned"]["median"][0])
            pd.append(cell["ratio_default"]["median"][0])
            if not b["all"]:
                fails.append(f"- {label}, NFE {nfe}: " + "; ".join(_failures(cell)))
            plan = entry["plans"].get(key) or {}
            c = plan.get("cost") or {}
            held = plan.get("held_out") or {}
            tuned_on = plan.get("tune") or {}
            costs.append(f"| {label} | {nfe} | {plan.get('source', '?')} | {c.get('model_evaluations', '?')} | "
                         f"{c.get('reference_evaluations', '?')} | {c.get('batch', '?')} | "
                         + (f"{c['seconds']:.1f}" if "seconds" in c else "?") + " | "
                         + (f"{_f(tuned_on['median'])} / {_f(held['median'])}" if held and tuned_on else "-")
                         + f" | {plan.get('steps', '')} |")
        per_problem[label] = (pt, pd, sum(entry["cells"][k].get("bar", {}).get("all", False) for k in entry["cells"]),
                              len(entry["cells"]))
        gm_t += pt
        gm_d += pd
    lines += ["", "| problem | evaluation noises | tuning noises | reference | far threshold | code |",
              "|---|---|---|---|---:|---|"]
    for name in _problems_in(data):
        e = data["problems"][name]
        if e.get("kind") == "zoo":
            ref = {"lab": "lab high-accuracy (adaptive DPM-Solver-23, rtol 1e-4 kept after a 1e-5 run)",
                   "adaptive": "adaptive DPM-Solver-23 at rtol 1e-4",
                   "3m400": f"DPM-Solver++ 3M, {ZOO_REFERENCE_STEPS} uniform-lambda steps"}.get(e.get("reference"),
                                                                                           e.get("reference"))
            tuning = f"{e.get('tune_samples')} of seed {e.get('tune_seed')} (shipped plan or tune_model)"
        else:
            ref = "exact (DOP853 on the exact denoiser)"
            tuning = f"{e.get('tune_samples')} of seed {e.get('tune_seed')}, a quarter held out"
        plan_codes = sorted({r.get("code") for r in e.get("plans", {}).values() if r.get("code")} - {e.get("code")})
        code = e.get("code", "?") + (f" (plans re-measured at {', '.join(plan_codes)})" if plan_codes else "")
        lines.append(f"| {e.get('label', name)} | {e.get('samples')} of seed {e.get('eval_seed')} | {tuning} | {ref} | "
                     f"{_f(e['threshold'])} | {code} |")
    lines += ["", "Peer NFE in parentheses where a peer used fewer evaluations than the budget (Heun / DPM-2 at "
              "some budgets).", "", "## Tuning cost", "",
              "| problem | NFE | plan | model evaluations (batched calls) | of which references | batch | seconds | "
              "median error tuning / held-out noises | steps |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    lines += costs
    lines += ["", "Model evaluations are batched model calls over the tuning batch (search + check of the chosen "
              "plan on tuning and held-out noises + references; analytic references are exact, so 0). Seconds: "
              "the tuner's own timing on a shared 2-core CPU.", "", "## Summary", "",
              "| problem | cells | meeting the bar | geometric mean tuned / peer | geometric mean default / peer |",
              "|---|---:|---:|---:|---:|"]
    for label, (pt, pd, met, n) in per_problem.items():
        lines.append(f"| {label} | {n} | {met} | {_gm(pt):.2f} | {_gm(pd):.2f} |")
    met = sum(v[2] for v in per_problem.values())
    total = sum(v[3] for v in per_problem.values())
    lines.append(f"| **all** | {total} | {met} | {_gm(gm_t):.2f} | {_gm(gm_d):.2f} |")
    lines += ["", f"Default bar (geometric mean of default / best peer <= 1.0): {_gm(gm_d):.2f} -> "
              f"{'met' if gm_d and _gm(gm_d) <= 1.0 else 'NOT met'}.", ""]
    lines += ["Cells that fail the bar:" if fails else "Every cell meets the bar."] + fails
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _problems_in(data)
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        entry = data["problems"][name]
        cells = [entry["cells"][k] for k in sorted(entry["cells"], key=int) if entry["cells"][k].get("best_peer")]
        if not cells:
            continue
        nfe = [c["nfe"] for c in cells]
        for key, style, label in (("tuned", "-o", "tuned plan"), ("default", "-s", "default (no solver/grid)")):
            med = np.array([c[key]["median"] for c in cells])
            ci = np.array([c[key]["median_ci"] for c in cells]).T
            ax.errorbar(nfe, med, yerr=[med - ci[0], ci[1] - med], fmt=style, ms=4, capsize=2, label=label)
        peer = [c["peers"][c["best_peer"]] for c in cells]
        med = np.array([p["median"] for p in peer])
        ci = np.array([p["median_ci"] for p in peer]).T
        ax.errorbar(nfe, med, yerr=[med - ci[0], ci[1] - med], fmt="--x", ms=5, capsize=2, color="gray",
                    label="best peer (per cell)")
        ax.plot(nfe, 0.5 * med, ":", color="gray", lw=0.8, label="0.5 x best peer")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfe)
        ax.set_xticklabels([str(k) for k in nfe])
        ax.set_title(f"{entry.get('label', name)} (n={cells[0]['n']}, {data['endpoint']})", fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_ylabel("median per-sample error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def rebuild(out: Path) -> list[Path]:
    written = []
    for endpoint, stem in STEM.items():
        data = load(out, endpoint)
        if not data.get("problems"):
            continue
        (out / f"{stem}.md").write_text(markdown(data))
        written.append(out / f"{stem}.md")
        try:
            plot(data, out / f"{stem}.png")
            written.append(out / f"{stem}.png")
        except ImportError:
            pass
    return written


# ------------------------------------------------------------------------------------------------ running
def run_analytic(name: str, endpoint: str, nfes, samples: int, tune_samples: int, peers, out: Path,
                 resume: bool = False) -> None:
    if resume:
        nfes = [k for k in nfes if not _have(out, endpoint, name, k, samples)]
        if not nfes:
            return log(f"{name} [{endpoint}]: every cell already in the JSON (--resume)")
    evaluation, tuning = analytic_problems(name, samples, tune_samples)
    t0 = time.perf_counter()
    ref = evaluation.reference(endpoint)
    ref_tune = tuning.reference(endpoint)
    log(f"{name} [{endpoint}]: references ({samples} evaluation + {tune_samples} tuning noises) "
        f"{time.perf_counter() - t0:.1f} s")
    threshold = far_threshold(ref)
    meta = {"code": CODE, "label": name, "kind": "analytic", "samples": samples, "tune_samples": tune_samples,
            "eval_seed": EVAL_SEED, "tune_seed": TUNE_SEED, "threshold": threshold, "peers": peers}
    plans = _analytic_plans(tuning, ref_tune, nfes, endpoint)
    log(f"{name} [{endpoint}]: tuned NFE {', '.join(str(k) for k in plans)} in one call, "
        f"{sum(s for _, s in plans.values()):.0f} s")
    for nfe in nfes:
        plan, seconds = plans[nfe]
        t0 = time.perf_counter()
        cell, plan = measure_cell(evaluation.denoiser, evaluation.x_T, ref, threshold, lambda: plan, nfe, endpoint,
                                  peers)
        _done(name, endpoint, nfe, cell, seconds, time.perf_counter() - t0)
        record = _plan_record(plan, f"tuned ({tune_samples} noises)", seconds)
        store(out, endpoint, name, meta, nfe, cell, record)
        rebuild(out)


def _analytic_plans(tuning: LabProblem, ref_tune: torch.Tensor, nfes, endpoint: str) -> dict[int, tuple]:
    """(plan, tuning seconds) per NFE: one ``dp.tune`` call for all of them, as a user tunes several budgets (the
    plan of each NFE is a starting point of the next larger one's search); seconds are each NFE's own search."""
    plans = dp.tune(tuning.denoiser, tuning.x_T, sorted(nfes), reference=ref_tune, endpoint=endpoint, seed=0,
                    progress=False)
    return {k: (p, p.info["cost"]["seconds"]) for k, p in plans.items()}


ZOO_REFERENCE_STEPS = 400


def zoo_reference(problem: LabProblem, endpoint: str, kind: str) -> torch.Tensor:
    """The end points of a zoo problem's evaluation noises, cached under a key of the kind and the noises.

    ``"3m400"`` (default): DPM-Solver++ 3M (Taylor) with 400 uniform-lambda steps, the tuner's kind of reference
    with twice its steps (measured on 16 noises: median 6.6e-5 / max 5.7e-4 from adaptive DPM-Solver-23 at rtol
    1e-4 on digits, median 3.4e-4 / max 1.0e-3 from the lab's reference on digits-flow; the network's float32
    round-off is ~2e-4, see dpmsolve.lab.neural). ``"adaptive"``: one adaptive DPM-Solver-23 run at rtol 1e-4
    (~1400 evaluations on digits). ``"lab"``: the lab's high-accuracy reference (the rtol 1e-4 run kept after a
    second one at 1e-5: ~5000 evaluations, about 2.4 hours for digits at 512 noises on one busy core)."""
    if kind == "lab":
        return problem.reference(endpoint)
    from dpmsolve.lab.reference import cached

    rtol = problem.reference_rtol

    def compute():
        with torch.no_grad():
            if kind == "adaptive":
                out = dp.sample(problem.denoiser, problem.x_T, "dpmsolver++", method="adaptive", order=3, rtol=rtol,
                                atol=rtol / 10, denoise_to_zero=endpoint == "zero", progress=False)
            else:
                out = dp.sample(problem.denoiser, problem.x_T, "dpmsolver++", order=3, solver_type="taylor",
                                steps=ZOO_REFERENCE_STEPS, grid="logSNR", t_end=0.0 if endpoint == "zero" else None,
                                progress=False)
        log(f"{problem.name} [{endpoint}]: reference used {out.nfe} evaluations")
        return out.x.to(torch.float64)

    s = problem.schedule
    tag = f"adaptive rtol={rtol:g}" if kind == "adaptive" else f"3M taylor logSNR {ZOO_REFERENCE_STEPS}"
    return cached(f"tuning-reference|{tag}|{problem.key}|{s.fingerprint()}|{endpoint}|{tuple(problem.x_T.shape)}",
                  compute)


def run_zoo(name: str, endpoint: str, nfes, samples: int, peers, out: Path, reference: str = "lab",
            resume: bool = False) -> None:
    if resume:
        nfes = [k for k in nfes if not _have(out, endpoint, name, k, samples)]
        if not nfes:
            return log(f"{name} [{endpoint}]: every cell already in the JSON (--resume)")
    from dpmsolve import zoo
    from dpmsolve.lab.neural import zoo_problem
    from dpmsolve.tuning import PlanError
    from dpmsolve.zoo import plans as zoo_plans

    guidance = ZOO[name]
    problem = zoo_problem(name, n=samples, seed=EVAL_SEED, guidance=guidance)
    t0 = time.perf_counter()
    log(f"{problem.name} [{endpoint}]: reference of {samples} evaluation noises ({reference}) ...")
    ref = zoo_reference(problem, endpoint, reference)
    log(f"{problem.name} [{endpoint}]: reference of {samples} evaluation noises {time.perf_counter() - t0:.1f} s")
    threshold = far_threshold(ref)
    meta = {"code": CODE, "label": problem.name, "kind": "zoo", "samples": samples, "tune_samples": zoo_plans.SAMPLES[name],
            "eval_seed": EVAL_SEED, "tune_seed": zoo_plans.NOISE_SEED, "threshold": threshold, "peers": peers,
            "guidance": guidance, "reference": reference}
    tuned: dict[int, dp.Plan] = {}
    for nfe in nfes:
        found = {}

        def plan_of():
            # looked up only now, after the peers: a plan shipped meanwhile is used
            if endpoint == "zero" and zoo_plans.plan_path(name, nfe, guidance).is_file():
                try:
                    plan = zoo.plan(name, nfe, guidance)
                    found["source"] = f"shipped ({zoo_plans.plan_path(name, nfe, guidance).name})"
                    return plan
                except PlanError as err:
                    log(f"{problem.name}: shipped plan for NFE {nfe} refused ({err}); tuning one")
            if nfe not in tuned:     # every NFE of this run still without a shipped plan at once (shared references)
                todo = [k for k in nfes if k not in tuned and not (endpoint == "zero" and k >= nfe and
                                                                   zoo_plans.plan_path(name, k, guidance).is_file())]
                todo = sorted(set(todo) | {nfe})
                t = time.perf_counter()
                log(f"{problem.name} [{endpoint}] NFE {nfe}: no shipped plan: tune_model for NFE {todo} "
                    f"({zoo_plans.SAMPLES[name]} noises, seed {zoo_plans.NOISE_SEED})")
                tuned.update(zoo_plans.tune_model(name, todo, guidance, endpoint=endpoint, progress=False))
                found["tune"] = time.perf_counter() - t
                log(f"{problem.name} [{endpoint}]: tune_model {found['tune']:.1f} s")
            found["source"] = f"tune_model ({zoo_plans.SAMPLES[name]} noises, seed {zoo_plans.NOISE_SEED})"
            return tuned[nfe]

        t0 = time.perf_counter()
        cell, plan = measure_cell(problem.denoiser, problem.x_T, ref, threshold, plan_of, nfe, endpoint, peers)
        t_tune = found.get("tune", 0.0)
        _done(problem.name, endpoint, nfe, cell, t_tune, time.perf_counter() - t0 - t_tune)
        store(out, endpoint, name, meta, nfe, cell, _plan_record(plan, found["source"], found.get("tune")))
        rebuild(out)


def code_version() -> str:
    """The git commit of the working tree this run imported, with a hash of its uncommitted source changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f"+dirty@{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")


CODE = code_version()


def _have(out: Path, endpoint: str, name: str, nfe: int, samples: int) -> bool:
    """True when the endpoint's JSON already holds this problem's cell at ``nfe`` over ``samples`` noises."""
    cell = load(out, endpoint).get("problems", {}).get(name, {}).get("cells", {}).get(str(nfe))
    return bool(cell) and cell.get("n") == samples


def _done(name: str, endpoint: str, nfe: int, cell: dict, t_tune: float, t_eval: float) -> None:
    if cell.get("best_peer") is None:
        log(f"{name} [{endpoint}] NFE {nfe}: no peer ran")
        return
    log(f"{name} [{endpoint}] NFE {nfe}: tune {t_tune:.1f} s, evaluate {t_eval:.1f} s; tuned/peer "
        f"{cell['ratio_tuned']['median'][0]:.2f}, default/peer {cell['ratio_default']['median'][0]:.2f} "
        f"(peer {cell['best_peer']}); bar {'met' if cell['bar']['all'] else 'FAILED'}")


def refresh(out: Path, endpoint: str, name: str, reference: str, what: str, nfes=None) -> None:
    """Measure the default plan (``what="default"``, after a change of the default) or the tuned plan
    (``"tuned"``: tuned again for analytic problems, the shipped or ``tune_model`` plan for zoo models, after a
    change of the tuner) again in every stored cell of ``name``, against the cell's best peer run again on the
    same noises for the paired ratios; the rest of the cell (every other peer) is kept. ``nfes``: only these cells."""
    from dpmsolve.lab.peers import run_peer

    data = load(out, endpoint)
    entry = data.get("problems", {}).get(name)
    if not entry:
        return log(f"{name} [{endpoint}]: nothing stored to refresh")
    meta = {k: v for k, v in entry.items() if k not in ("cells", "plans")}
    if meta["kind"] == "analytic":
        evaluation, tuning = analytic_problems(name, meta["samples"], meta["tune_samples"])
        ref = evaluation.reference(endpoint)
        ref_tune = tuning.reference(endpoint) if what == "tuned" else None
    else:
        from dpmsolve.lab.neural import zoo_problem

        evaluation = zoo_problem(name, n=meta["samples"], seed=EVAL_SEED, guidance=ZOO[name])
        ref = zoo_reference(evaluation, endpoint, reference)
    threshold = meta["threshold"]
    cells = sorted(((k, c) for k, c in entry["cells"].items() if nfes is None or int(k) in nfes),
                   key=lambda kv: int(kv[0]))
    found = {}
    if what == "tuned" and meta["kind"] == "zoo":
        found = _zoo_plans(name, endpoint, [int(k) for k, _ in cells])
    elif what == "tuned":
        label = f"tuned ({meta['tune_samples']} noises)"
        found = {k: (p, label, t) for k, (p, t) in _analytic_plans(tuning, ref_tune, [int(k) for k, _ in cells],
                                                                       endpoint).items()}
    for key, cell in cells:
        nfe, best = int(key), cell.get("best_peer")
        record = entry["plans"].get(key)
        if what == "default":
            plan = None
        else:
            plan, source, seconds = found[nfe]
            record = _plan_record(plan, source, seconds)
        with torch.no_grad():
            if plan is None:
                out_x = dp.sample(evaluation.denoiser, evaluation.x_T, steps=nfe,
                                  t_end=0.0 if endpoint == "zero" else None, progress=False).x
            else:
                out_x = dp.sample(evaluation.denoiser, evaluation.x_T, plan, progress=False).x
        cell[what], errors = _stats(out_x, ref, threshold)
        if best:
            _, peer_errors = _stats(run_peer(best, evaluation.denoiser, evaluation.x_T, nfe, endpoint).x, ref,
                                    threshold)
            cell[f"ratio_{what}"] = {"median": _ratio(errors, peer_errors, "median"),
                                     "rmse": _ratio(errors, peer_errors, "rmse")}
            if what == "tuned":
                peer, t = cell["peers"][best], cell["tuned"]
                cell["bar"] = {"median": cell["ratio_tuned"]["median"][0] <= MEDIAN_BAR,
                               "far": t["far"] <= peer["far"] + FAR_SLACK + 1e-12, "rmse": t["rmse"] <= peer["rmse"]}
                cell["bar"]["all"] = all(cell["bar"].values())
        store(out, endpoint, name, meta, nfe, cell, record)
        log(f"{name} [{endpoint}] NFE {nfe}: {what} refreshed, {what}/peer "
            f"{cell.get(f'ratio_{what}', {}).get('median', [float('nan')])[0]:.2f}")
    rebuild(out)


def _zoo_plans(name: str, endpoint: str, nfes: list[int]) -> dict[int, tuple[dp.Plan, str, float | None]]:
    """(plan, source, tuning seconds) per NFE: the shipped plan where one loads, else tune_model (all at once)."""
    from dpmsolve import zoo
    from dpmsolve.tuning import PlanError
    from dpmsolve.zoo import plans as zoo_plans

    guidance, found, todo = ZOO[name], {}, []
    for nfe in nfes:
        try:
            if endpoint != "zero":
                raise PlanError("shipped plans end at sigma = 0")
            found[nfe] = (zoo.plan(name, nfe, guidance), f"shipped ({zoo_plans.plan_path(name, nfe, guidance).name})",
                          None)
        except PlanError:
            todo.append(nfe)
    if todo:
        t = time.perf_counter()
        plans = zoo_plans.tune_model(name, todo, guidance, endpoint=endpoint, progress=False)
        seconds = time.perf_counter() - t
        for nfe in todo:
            found[nfe] = (plans[nfe], f"tune_model ({zoo_plans.SAMPLES[name]} noises, seed {zoo_plans.NOISE_SEED})",
                          seconds)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(ANALYTIC), choices=list(ORDER), metavar="NAME",
                        help=f"analytic ({', '.join(ANALYTIC)}) and zoo ({', '.join(ZOO)}) problems; "
                             "default: the analytic ones")
    parser.add_argument("--nfes", nargs="+", type=int, default=list(LAB_NFES),
                        help="step budgets to run (with --refresh-*: the stored cells to refresh)")
    parser.add_argument("--endpoint", choices=["zero", "t_min", "both"], default=None,
                        help="default: both for analytic problems, zero for zoo models")
    parser.add_argument("--samples", type=int, default=512, help="evaluation noises per analytic problem")
    parser.add_argument("--zoo-samples", type=int, default=None,
                        help="evaluation noises per zoo model (default 512; patches 128)")
    parser.add_argument("--zoo-reference", choices=["3m400", "adaptive", "lab"], default="3m400",
                        help="zoo references: DPM-Solver++ 3M, 400 steps (default, 400 evaluations), one adaptive "
                             "run at rtol 1e-4 (~1400) or the lab's (rtol 1e-4 checked at 1e-5, ~5000); see "
                             "zoo_reference")
    parser.add_argument("--tune-samples", type=int, default=128, help="tuning noises per analytic problem")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--resume", action="store_true",
                        help="skip the cells already in the JSON with the same number of evaluation noises")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from the JSON")
    parser.add_argument("--refresh-default", action="store_true",
                        help="measure only the default plan again in the stored cells (after a change of the default)")
    parser.add_argument("--refresh-tuned", action="store_true",
                        help="tune and measure only the tuned plans again in the stored cells (after a change of the "
                             "tuner; zoo models: the shipped plans)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        for path in rebuild(out):
            print(path)
        return
    from dpmsolve.lab.peers import available_peers

    peers = available_peers()
    log(f"code {CODE}; {len(peers)} peers: {', '.join(peers)}")
    for name in args.problems:
        zoo_model = name in ZOO
        if args.endpoint is None:
            endpoints = ("zero",) if zoo_model else ("zero", "t_min")
        else:
            endpoints = ("zero", "t_min") if args.endpoint == "both" else (args.endpoint,)
        for endpoint in endpoints:
            t0 = time.perf_counter()
            if args.refresh_default or args.refresh_tuned:
                for what in ("default",) * args.refresh_default + ("tuned",) * args.refresh_tuned:
                    refresh(out, endpoint, name, args.zoo_reference, what, set(args.nfes))
            elif zoo_model:
                run_zoo(name, endpoint, args.nfes, args.zoo_samples or ZOO_SAMPLES[name], peers, out,
                        args.zoo_reference, args.resume)
            else:
                run_analytic(name, endpoint, args.nfes, args.samples, args.tune_samples, peers, out, args.resume)
            log(f"{name} [{endpoint}] done in {time.perf_counter() - t0:.1f} s")
    for path in rebuild(out):
        print(f"wrote {path}")
    log("all done")


if __name__ == "__main__":
    main()
