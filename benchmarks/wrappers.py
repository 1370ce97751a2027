"""Do the sampling wrappers help? Guidance in a limited interval, heavy-ball momentum and time-shifted DDIM, each
on and off, on the lab's guided mixture (exact denoiser) and the shipped digits model.

    python benchmarks/wrappers.py            # writes benchmarks/results/wrappers.{md,json,png}

- **Heavy-ball momentum** (``HeavyBall``, Wizadwongsa et al. 2023) still solves the probability-flow ODE (order 1),
  so it is measured by the lab's per-sample error against the exact / high-accuracy ODE solution (median with its
  95% bootstrap interval, the fraction of samples far from the reference, and the paired ratio of medians), and on
  digits also by the distribution metrics.
- **Interval guidance** (``ClassifierFreeGuidance(interval=...)``, Kynkaenniemi et al. 2024) and **TS-DDIM**
  (``TimeShift``, Li et al. 2024) change what is sampled, so they are measured against the data: on the mixture
  the class accuracy of the Bayes classifier of the true mixture and the sliced Wasserstein distance (SWD) to
  exact samples of each class's data; on digits the shipped classifier's accuracy and the digits Frechet distance
  (FD) of :mod:`dpmsolve.zoo.metrics`. The exact ODE solution of each guided denoiser (NFE "ODE") shows what the
  sampler converges to.

All runs end at sigma = 0 (grids with ``t_end=0``). References are cached under the lab's cache
(:func:`dpmsolve.lab.reference.cache_dir`). Runtime: about 3-4 minutes on two CPU cores (``--digits-n`` and
``--nfes`` trade samples and cells for time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianMixture, cell_stats, far_threshold, per_sample_errors, ratio_ci
from dpmsolve.lab.reference import cached, reference_between
from dpmsolve.solvers.momentum import HeavyBall
from dpmsolve.wrappers import PerSampleTime, TimeShift

OUT = Path(__file__).resolve().parent / "results"
PAPER_INTERVAL = (0.28, 5.42)       # Kynkaenniemi et al. 2024's interval for EDM2-XXL, in EDM's sigma (= sigma/alpha)
BETA = 0.8                          # the momentum of the paper's HB figures
TS = {"window": 0.02, "cutoff": 0.3}  # TimeShift defaults: 20 of 1000 train steps, shift above train step ~300
STARTED = time.perf_counter()
VERDICTS: list[tuple[str, str, int, str]] = []   # (wrapper, where, NFE, 'helps' / 'hurts' / 'tie')


def log(message: str) -> None:
    print(f"wrappers [{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


def steps_for(solver: dp.Solver, nfe: int) -> int:
    """The step count whose NFE (grid ending at sigma = 0) is ``nfe`` (PLMS spends one more on its warm-up)."""
    for steps in range(nfe, 0, -1):
        if solver.expected_nfe(steps, ends_at_zero=True) <= nfe:
            return steps
    raise ValueError(nfe)


def run(den, x, solver, nfe, grid):
    solver = dp.get_solver(solver) if isinstance(solver, str) else solver
    sol = dp.sample(den, x, solver, steps=steps_for(solver, nfe), grid=grid, t_end=0.0, progress=False)
    return sol.x, sol.nfe


class Rows(dp.Denoiser):
    """Counts the sample rows that reach the network (compute, relative to a full guided batch)."""

    def __init__(self, inner):
        self.inner, self.schedule, self.rows = inner, inner.schedule, 0

    @property
    def per_sample_time(self):
        return self.inner.per_sample_time

    def __call__(self, x, t, **kw):
        self.rows += x.shape[0]
        return self.inner(x, t, **kw)


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}g}"


def fmt_ci(stats):
    return f"{stats.median:.3g} [{stats.median_ci[0]:.3g}, {stats.median_ci[1]:.3g}]"


# ------------------------------------------------------------------------------------------------- the mixture
class Mixture:
    """The lab's guided problem (12-component class-labelled 8-dim mixture, 4 classes, DDPM linear schedule)."""

    def __init__(self, n: int, seed: int = 0):
        self.problem = GaussianMixture.random(k=12, dim=8, seed=seed, classes=4)
        self.schedule = dp.DiscreteVP.linear()
        self.labels = torch.arange(n) % 4
        self.uncond = torch.full_like(self.labels, -1)
        self.x_T = torch.randn((n, 8), generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
        g = torch.Generator().manual_seed(2000 + seed)
        self.data = [self.problem.data_sample(n // 4, g, label=c) for c in range(4)]
        self.data2 = [self.problem.data_sample(n // 4, g, label=c) for c in range(4)]
        self.n, self.seed = n, seed

    def denoiser(self, scale, interval=None):
        inner = Rows(PerSampleTime(self.problem.denoiser(self.schedule)))
        return dp.ClassifierFreeGuidance(inner, scale, {"y": self.labels}, {"y": self.uncond}, interval=interval)

    def reference(self, scale, interval=None):
        pm, labels, uncond = self.problem.posterior_mean, self.labels, self.uncond
        lo, hi = interval or (0.0, math.inf)

        def x0_fn(y, rho):
            u, c = pm(y, rho, uncond), pm(y, rho, labels)
            return u + (scale if lo < rho <= hi else 1.0) * (c - u)

        key = f"wrappers|mixture|seed={self.seed}|n={self.n}|scale={scale}|interval={interval}"
        s = self.schedule
        return cached(key, lambda: reference_between(x0_fn, s, self.x_T, s.t_max, None, rtol=1e-9, atol=1e-11))

    def accuracy(self, x) -> float:
        """Accuracy of the Bayes classifier of the true mixture (class of the most probable component set)."""
        post = self.problem.component_posteriors(x.to(torch.float64), 1e-4)
        by_class = torch.stack([post[:, self.problem.labels == c].sum(1) for c in range(4)], 1)
        return float((by_class.argmax(1) == self.labels).double().mean())

    def swd(self, x, data=None) -> float:
        """Mean over classes of the sliced Wasserstein distance to exact samples of the class's data."""
        from dpmsolve.zoo.metrics import sliced_wasserstein

        data = self.data if data is None else data
        return float(np.mean([sliced_wasserstein(x[self.labels == c], data[c]) for c in range(4)]))


def _tie(lo, hi) -> str:
    """'helps' / 'hurts' / 'tie' from a paired interval of the ratio on / off (lower is better)."""
    return "helps" if hi < 1.0 else "hurts" if lo > 1.0 else "tie"


def _compare(on, off, tol=0.05) -> str:
    """'helps' / 'hurts' / 'tie' for a lower-is-better distance: a tie within ``tol`` relative difference."""
    return "helps" if on < (1 - tol) * off else "hurts" if on > (1 + tol) * off else "tie"


def mixture_momentum(mix: Mixture, scales, nfes, rows, md):
    bases = [("DPM-Solver++ 2M", "dpmsolver++", {"order": 2}, "logSNR"),
             ("DPM-Solver++ 3M", "dpmsolver++", {"order": 3, "solver_type": "taylor"}, "logSNR"),
             ("PLMS", "plms", {}, "time_uniform")]
    md += ["## Heavy-ball momentum on the guided mixture", "",
           f"Per-sample error against the exact guided ODE solution ({mix.n} samples): median [95% bootstrap "
           f"interval], the fraction of samples far from it (another mode), and the paired ratio of medians "
           f"HB/base (< 1: momentum is more accurate; an interval containing 1 is a tie). HB: beta = {BETA}.", ""]
    for scale in scales:
        ref = mix.reference(scale)
        thr = far_threshold(ref)
        md += [f"### guidance {scale:g}", "", "| solver | NFE | base median | HB median | base far | HB far | "
               "HB / base (median) |", "|---|---:|---|---|---:|---:|---|"]
        for label, name, options, grid in bases:
            base = dp.get_solver(name, **options)
            hb = HeavyBall(base, beta=BETA)
            for nfe in nfes:
                out = {}
                for tag, solver in (("base", base), ("HB", hb)):
                    x, used = run(mix.denoiser(scale), mix.x_T, solver, nfe, grid)
                    out[tag] = (per_sample_errors(x, ref), cell_stats(x, ref, threshold=thr, n_boot=300))
                    rows.append({"problem": f"mixture-cfg{scale:g}", "wrapper": "momentum", "solver": label,
                                 "variant": tag, "nfe": used, **out[tag][1].to_dict()})
                r, lo, hi = ratio_ci(out["HB"][0], out["base"][0], n_boot=300)
                VERDICTS.append(("momentum", f"mixture, CFG {scale:g}, {label}", nfe, _tie(lo, hi)))
                md.append(f"| {label} | {nfe} | {fmt_ci(out['base'][1])} | {fmt_ci(out['HB'][1])} | "
                          f"{out['base'][1].far:.3f} | {out['HB'][1].far:.3f} | {r:.2f} [{lo:.2f}, {hi:.2f}] |")
        md.append("")
        log(f"mixture momentum, guidance {scale:g}")


def mixture_distribution(mix: Mixture, scales, nfes, rows, md):
    intervals = [PAPER_INTERVAL, (0.28, 2.0)]
    from dpmsolve.zoo.metrics import sliced_wasserstein

    floor = float(np.mean([sliced_wasserstein(a, b) for a, b in zip(mix.data2, mix.data)]))
    md += ["## Interval guidance and TS-DDIM on the guided mixture", "",
           "They change the sampled distribution, so the columns measure it against the data: **acc** = accuracy of "
           "the Bayes classifier of the true mixture on the intended labels, **SWD** = sliced Wasserstein distance "
           f"to exact samples of each class (mean over the 4 classes; two exact data sets of this size differ by "
           f"{floor:.3f}), **err vs CFG ODE** = median per-sample error against the exact ODE solution of the "
           "*plain CFG* denoiser, **err vs own ODE** = the same against the exact solution of the sampler's own "
           "guided ODE (the solver's error), **compute** = network rows relative to full CFG. NFE \"ODE\": the "
           "exact ODE solution of each guided denoiser (what the solver converges to). Interval guidance runs "
           f"DPM-Solver++ 2M (logSNR), TS-DDIM runs DDIM (time_uniform), window {TS['window']}, cutoff "
           f"{TS['cutoff']}.", ""]
    for scale in scales:
        ref = mix.reference(scale)
        md += [f"### guidance {scale:g}", "", "| sampler | NFE | acc | SWD | err vs CFG ODE | err vs own ODE | "
               "compute |", "|---|---:|---:|---:|---:|---:|---:|"]
        variants = [("CFG", None)] + [(f"interval ({lo:g}, {hi:g}]", (lo, hi)) for lo, hi in intervals]
        swd_cfg = {}
        for label, interval in variants:
            x = own = mix.reference(scale, interval)
            md.append(f"| {label} | ODE | {mix.accuracy(x):.3f} | {mix.swd(x):.3f} | "
                      f"{np.median(per_sample_errors(x, ref).numpy()):.3g} | 0 | |")
            rows.append({"problem": f"mixture-cfg{scale:g}", "wrapper": "interval", "variant": label, "nfe": "ODE",
                         "acc": mix.accuracy(x), "swd": mix.swd(x)})
            for nfe in nfes:
                den = mix.denoiser(scale, interval)
                x, used = run(den, mix.x_T, "dpmsolver++", nfe, "logSNR")
                compute = den.inner.rows / (2 * mix.n * used)
                err = float(np.median(per_sample_errors(x, ref).numpy()))
                err_own = float(np.median(per_sample_errors(x, own).numpy()))
                md.append(f"| {label} | {used} | {mix.accuracy(x):.3f} | {mix.swd(x):.3f} | {err:.3g} | "
                          f"{err_own:.3g} | {compute:.2f} |")
                if interval is None:
                    swd_cfg[nfe] = mix.swd(x)
                else:
                    VERDICTS.append((f"interval {interval}", f"mixture, CFG {scale:g}, SWD", nfe,
                                     _compare(mix.swd(x), swd_cfg[nfe])))
                rows.append({"problem": f"mixture-cfg{scale:g}", "wrapper": "interval", "variant": label,
                             "nfe": used, "acc": mix.accuracy(x), "swd": mix.swd(x), "err": err, "compute": compute})
        swd_ddim = {}
        for label, solver in (("DDIM", dp.get_solver("ddim")), ("TS-DDIM", TimeShift(**TS))):
            for nfe in nfes:
                x, used = run(mix.denoiser(scale), mix.x_T, solver, nfe, "time_uniform")
                err = float(np.median(per_sample_errors(x, ref).numpy()))
                if label == "DDIM":
                    swd_ddim[nfe] = mix.swd(x)
                else:
                    VERDICTS.append(("TS-DDIM", f"mixture, CFG {scale:g}, SWD", nfe, _compare(mix.swd(x),
                                                                                            swd_ddim[nfe])))
                md.append(f"| {label} | {used} | {mix.accuracy(x):.3f} | {mix.swd(x):.3f} | {err:.3g} | | 1.00 |")
                rows.append({"problem": f"mixture-cfg{scale:g}", "wrapper": "time-shift", "variant": label,
                             "nfe": used, "acc": mix.accuracy(x), "swd": mix.swd(x), "err": err})
        md.append("")
        log(f"mixture interval / TS, guidance {scale:g}")


# -------------------------------------------------------------------------------------------------- digits
class Digits:
    def __init__(self, n: int, seed: int = 0):
        from dpmsolve import zoo

        self.zoo = zoo
        self.model = zoo.load("digits")
        self.labels = torch.arange(n) % self.model.num_classes
        self.x_T = torch.randn((n, *self.model.shape), generator=torch.Generator().manual_seed(seed))
        self.n, self.seed = n, seed

    def denoiser(self, scale, interval=None):
        den = self.zoo.guided(self.model, self.labels, scale, interval)
        den.inner = Rows(den.inner)
        return den

    def reference(self, scale, steps=30):
        """DPM-Solver++ 3M (taylor) with ``steps`` steps on the logSNR grid to sigma = 0; its own error is
        estimated against ``steps * 2 / 3`` steps in the report."""
        key = f"wrappers|digits|{self.zoo.weights_hash('digits')}|seed={self.seed}|n={self.n}|scale={scale}|3M{steps}"
        compute = lambda: dp.sample(self.denoiser(scale), self.x_T, "dpmsolver++", order=3,  # noqa: E731
                                    solver_type="taylor", steps=steps, t_end=0.0, progress=False).x
        return cached(key, compute)

    def metrics(self, x) -> dict:
        from dpmsolve.zoo.metrics import class_accuracy, digits_fd

        return {"acc": class_accuracy(x, self.labels), "fd": digits_fd(x)}


def digits_section(dig: Digits, nfes, ts_nfes, rows, md):
    from dpmsolve.zoo.metrics import digits_fd
    from dpmsolve.zoo.train import digits_data

    real = digits_fd(digits_data("test")[0])
    md += ["## The digits model", "",
           f"{dig.n} samples (labels 0-9 in turn). **acc**: the shipped classifier's accuracy on the intended labels; "
           f"**FD**: digits Frechet distance to the real training digits (the {len(digits_data('test')[1])} "
           f"held-out real digits score {real:.2f}; FD is biased upward for small sets); **err vs CFG ODE**: "
           "median per-sample error [95% interval] against a 30-step DPM-Solver++ 3M solution of the plain-CFG ODE "
           "(for momentum, which solves that ODE); **compute**: network rows relative to full CFG.", ""]
    for scale in (7.5,):
        ref = dig.reference(scale)
        check = dig.reference(scale, steps=20)
        ref_err = float(np.median(per_sample_errors(check, ref).numpy()))
        thr = far_threshold(ref)
        md += [f"### guidance {scale:g}: momentum and interval guidance (DPM-Solver++ 2M, logSNR)", "",
               f"Reference: 3M with 30 steps; 3M with 20 steps differs from it by a median {ref_err:.2g}.", "",
               "| sampler | NFE | acc | FD | err vs CFG ODE | far | compute |", "|---|---:|---:|---:|---|---:|---:|"]
        m = dig.metrics(ref)
        md.append(f"| CFG (3M, 30 steps) | 30 | {m['acc']:.3f} | {m['fd']:.2f} | | | |")
        errors, fds = {}, {}
        variants = [("CFG", "dpmsolver++", None), (f"CFG + HB {BETA}", HeavyBall("dpmsolver++", beta=BETA), None),
                    (f"interval ({PAPER_INTERVAL[0]:g}, {PAPER_INTERVAL[1]:g}]", "dpmsolver++", PAPER_INTERVAL)]
        for label, solver, interval in variants:
            for nfe in nfes:
                den = dig.denoiser(scale, interval)
                x, used = run(den, dig.x_T, solver, nfe, "logSNR")
                stats = cell_stats(x, ref, threshold=thr, n_boot=300)
                errors[label, nfe] = per_sample_errors(x, ref)
                compute = den.inner.rows / (2 * dig.n * used)
                m = dig.metrics(x)
                fds[label, nfe] = m["fd"]
                if label != "CFG":
                    VERDICTS.append(("momentum" if "HB" in label else "interval (0.28, 5.42)",
                                     f"digits, CFG {scale:g}, FD", nfe, _compare(m["fd"], fds["CFG", nfe])))
                md.append(f"| {label} | {used} | {m['acc']:.3f} | {m['fd']:.2f} | {fmt_ci(stats)} | "
                          f"{stats.far:.3f} | {compute:.2f} |")
                rows.append({"problem": f"digits-cfg{scale:g}", "wrapper": label, "nfe": used, **m,
                             "compute": compute, **stats.to_dict()})
                log(f"digits {label} NFE {nfe}")
        md.append("")
        hb = f"CFG + HB {BETA}"
        ratios = {nfe: ratio_ci(errors[hb, nfe], errors["CFG", nfe], n_boot=300) for nfe in nfes}
        md.append("HB / base median error (paired bootstrap): " + ", ".join(
            "NFE {}: {:.2f} [{:.2f}, {:.2f}]".format(nfe, *ratios[nfe]) for nfe in nfes) + ".")
        VERDICTS.extend(("momentum", f"digits, CFG {scale:g}, DPM-Solver++ 2M error", nfe, _tie(*ratios[nfe][1:]))
                        for nfe in nfes)
        md.append("")
    scale = 3.0
    md += [f"### guidance {scale:g}: TS-DDIM (time_uniform, window {TS['window']}, cutoff {TS['cutoff']})", "",
           "| sampler | NFE | acc | FD |", "|---|---:|---:|---:|"]
    fd_ddim = {}
    for label, solver in (("DDIM", dp.get_solver("ddim")), ("TS-DDIM", TimeShift(**TS))):
        for nfe in ts_nfes:
            x, used = run(dig.denoiser(scale), dig.x_T, solver, nfe, "time_uniform")
            m = dig.metrics(x)
            if label == "DDIM":
                fd_ddim[nfe] = m["fd"]
            else:
                VERDICTS.append(("TS-DDIM", f"digits, CFG {scale:g}, FD", nfe, _compare(m["fd"], fd_ddim[nfe])))
            md.append(f"| {label} | {used} | {m['acc']:.3f} | {m['fd']:.2f} |")
            rows.append({"problem": f"digits-cfg{scale:g}", "wrapper": label, "nfe": used, **m})
            log(f"digits {label} NFE {nfe}")
    md.append("")


def summary() -> list[str]:
    """Where each wrapper helps, hurts or makes no difference, per problem, from VERDICTS."""
    out = ["## Summary", "",
           "Per problem, the NFEs where the wrapper is better than the same sampler without it (**helps**), worse "
           "(**hurts**) or neither (**tie**). Momentum: the paired 95% interval of the ratio of median errors "
           "excludes 1 (or the digits FD moves by more than 5%); interval guidance and TS-DDIM: the distance to the "
           "data (SWD / FD) moves by more than 5%.", ""]
    groups: dict[tuple[str, str], dict[str, list[int]]] = {}
    for wrapper, where, nfe, verdict in VERDICTS:
        groups.setdefault((wrapper, where), {}).setdefault(verdict, []).append(nfe)
    out += ["| wrapper | measured on | helps at NFE | hurts at NFE | tie at NFE |", "|---|---|---|---|---|"]
    for (wrapper, where), by in sorted(groups.items()):
        cell = lambda k: ", ".join(map(str, by.get(k, []))) or "–"  # noqa: E731
        out.append(f"| {wrapper} | {where} | {cell('helps')} | {cell('hurts')} | {cell('tie')} |")
    return out + [""]


# ---------------------------------------------------------------------------------------------------- figure
def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for solver in ("DPM-Solver++ 2M", "PLMS"):
        for variant, style in (("base", "-"), ("HB", "--")):
            pts = [(r["nfe"], r["median"]) for r in rows if r.get("wrapper") == "momentum"
                   and r["problem"] == "mixture-cfg7.5" and r["solver"] == solver and r["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{solver} {variant}")
    ax.set(xlabel="NFE", ylabel="median error vs exact ODE", yscale="log", title="mixture, CFG 7.5: momentum")
    ax.legend(fontsize=8)
    ax = axes[1]
    for wrapper in ("interval", "time-shift"):
        variants = sorted({r["variant"] for r in rows if r.get("wrapper") == wrapper})
        for variant in variants:
            pts = [(r["nfe"], r["swd"]) for r in rows if r.get("wrapper") == wrapper and r["variant"] == variant
                   and r["problem"] == "mixture-cfg7.5" and r["nfe"] != "ODE"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
    ax.set(xlabel="NFE", ylabel="SWD to the class data", yscale="log", title="mixture, CFG 7.5: distribution")
    ax.legend(fontsize=8)
    ax = axes[2]
    labels = sorted({r["wrapper"] for r in rows if r["problem"].startswith("digits")})
    for label in labels:
        pts = [(r["nfe"], r["fd"]) for r in rows if r["problem"].startswith("digits") and r["wrapper"] == label]
        scale = next(r["problem"] for r in rows if r["problem"].startswith("digits") and r["wrapper"] == label)
        ax.plot(*zip(*pts), marker="o", label=f"{label} ({scale[7:]})")
    ax.set(xlabel="NFE", ylabel="digits FD", yscale="log", title="digits model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="mixture samples (default 512)")
    parser.add_argument("--digits-n", type=int, default=512, help="digits samples (default 512; 0 skips digits)")
    parser.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20], help="NFE budgets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows, md = [], ["# Sampling wrappers: interval guidance, heavy-ball momentum, TS-DDIM", "",
                    "Written by `benchmarks/wrappers.py`; what the wrappers are and when to use them: "
                    "`docs/wrappers.md` (the site's \"Sampling wrappers\" page).", ""]
    with torch.no_grad():
        mix = Mixture(args.n)
        mixture_momentum(mix, (3.0, 7.5), args.nfes, rows, md)
        mixture_distribution(mix, (3.0, 7.5), args.nfes, rows, md)
        if args.digits_n:
            digits_section(Digits(args.digits_n), args.nfes, [n for n in args.nfes if n <= 10] or args.nfes,
                           rows, md)
    wall = time.perf_counter() - STARTED
    md += [f"Wall time: {wall:.0f} s ({torch.get_num_threads()} CPU threads; a first run also computes and caches "
           "the references)."]
    md[4:4] = summary()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wrappers.md").write_text("\n".join(md) + "\n")
    (args.out / "wrappers.json").write_text(json.dumps({"rows": rows, "wall_s": round(wall, 1)}, indent=1,
                                                       default=float))
    try:
        plot(rows, args.out / "wrappers.png")
    except ImportError:
        log("no wrappers.png: matplotlib is not installed")
    log(f"wrote {args.out / 'wrappers.md'}")


if __name__ == "__main__":
    main()
