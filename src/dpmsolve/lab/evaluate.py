"""Error against the exact ODE solution for a given number of model evaluations, for any model.

``evaluate`` runs solver configurations (ours, and peers from diffusers / k-diffusion) on one denoiser from
the same start noise to the same endpoint and reports, per cell (configuration x NFE) with the NFE really used,
the per-sample statistics of :mod:`dpmsolve.lab.metrics`: the median per-sample error, the fraction of samples
far from the reference (another mode; one threshold per problem, from the reference) and the RMSE, each with a
bootstrap interval, plus the MSE in data space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..model import ClassifierFreeGuidance, Denoiser
from ..sampling import sample
from ..schedules import DiscreteVP, Schedule
from .metrics import cell_stats, far_threshold, per_sample_errors
from .problems import AnalyticProblem, GaussianData, GaussianMixture, digits_kde
from .reference import X0Fn, cached, reference_between

__all__ = ["SolverConfig", "LabProblem", "Row", "Report", "evaluate", "standard_problems", "high_accuracy_reference",
           "DEFAULT_CONFIGS", "RECOMMENDED", "LAB_NFES"]

LAB_NFES = (5, 6, 8, 10, 12, 15, 20)
ENDPOINTS = ("zero", "t_min")


@dataclass(frozen=True)
class SolverConfig:
    """One of our solver configurations: a registry name, its options and a grid.

    At endpoint ``'zero'`` (sigma = 0) the grid ends at t = 0 (``make_grid(..., t_end=0)``): the last of the
    ``nfe`` steps is the x0 prediction at the previous grid time; at ``'t_min'`` it runs ``nfe`` steps to t_min.
    """

    label: str
    solver: str
    options: dict = field(default_factory=dict)
    grid: str = "logSNR"
    grid_options: dict = field(default_factory=dict)

    def run(self, denoiser: Denoiser, x_T: torch.Tensor, nfe: int, endpoint: str):
        return sample(denoiser, x_T, self.solver, steps=nfe, grid=self.grid, grid_options=self.grid_options or None,
                      t_end=0.0 if endpoint == "zero" else None, progress=False, **self.options)


# The one configuration the README recommended before tuned plans (kept as a lab baseline; "How accurate is it?"
# has its measurement): 2M on
# the time_power grid (uniform in t^(2/3)) to sigma = 0. On a grid ending at 0 the last step is the first-order
# jump to the x0 prediction, so lower_order_final changes nothing for 2M; it is kept for grids that do not.
RECOMMENDED = SolverConfig("dpmsolve recommended: DPM-Solver++ 2M time_power(1.5)", "dpmsolver++",
                           {"order": 2, "lower_order_final": True}, grid="time_power", grid_options={"power": 1.5})

# What the lab compares by default: the recommendation first, then the solvers users pick on common grids.
DEFAULT_CONFIGS = (
    RECOMMENDED,
    SolverConfig("dpmsolve DDIM", "ddim", grid="time_uniform"),
    SolverConfig("dpmsolve DPM-Solver++ 2M", "dpmsolver++", {"order": 2}),
    SolverConfig("dpmsolve DPM-Solver++ 2M karras", "dpmsolver++", {"order": 2}, grid="karras"),
    SolverConfig("dpmsolve DPM-Solver++ 2M time_uniform lof", "dpmsolver++", {"order": 2, "lower_order_final": True},
                 grid="time_uniform"),
    SolverConfig("dpmsolve DPM-Solver++ 2M time_quadratic lof", "dpmsolver++",
                 {"order": 2, "lower_order_final": True}, grid="time_quadratic"),
    SolverConfig("dpmsolve DPM-Solver++ 3M", "dpmsolver++", {"order": 3, "solver_type": "taylor"}),
    SolverConfig("dpmsolve DPM-Solver++ 3M time_uniform lof", "dpmsolver++",
                 {"order": 3, "solver_type": "taylor", "lower_order_final": True}, grid="time_uniform"),
    SolverConfig("dpmsolve DPM-Solver++ 3M time_quadratic lof", "dpmsolver++",
                 {"order": 3, "solver_type": "taylor", "lower_order_final": True}, grid="time_quadratic"),
    SolverConfig("dpmsolve DPM-Solver++ 3S", "dpmsolver++", {"order": 3, "method": "singlestep"}),
    SolverConfig("dpmsolve DPM-Solver 3S", "dpmsolver", {"order": 3, "method": "singlestep"}),
    SolverConfig("dpmsolve UniPC bh2 (order 2)", "unipc", {"order": 2, "variant": "bh2"}),
    SolverConfig("dpmsolve UniPC bh2 (order 3)", "unipc", {"order": 3, "variant": "bh2"}),
    SolverConfig("dpmsolve UniPC bh2 (order 2) time_quadratic lof", "unipc",
                 {"order": 2, "variant": "bh2", "lower_order_final": True}, grid="time_quadratic"),
)


@dataclass
class LabProblem:
    """A model to measure: denoiser (with any guidance), start noise, and a way to get the exact solution.

    ``x0_fn`` is the exact VE denoiser ``(y, rho) -> x0`` of the (guided) model for every rho, when known: the
    reference is then a DOP853 solve to the data end. Without it the reference is a high-accuracy solve by
    our adaptive DPM-Solver-23 (see ``high_accuracy_reference``) at ``reference_rtol`` (trained networks in
    float32 cannot be resolved below ~1e-4, see :mod:`dpmsolve.lab.neural`).
    """

    name: str
    denoiser: Denoiser
    x_T: torch.Tensor
    key: str
    x0_fn: X0Fn | None = None
    reference_rtol: float = 1e-6

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    def reference(self, endpoint: str = "zero") -> torch.Tensor:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}.")
        s = self.schedule
        t_end = None if endpoint == "zero" else s.t_min
        if self.x0_fn is None:
            compute = lambda: high_accuracy_reference(self.denoiser, self.x_T, endpoint,  # noqa: E731
                                                      rtol=self.reference_rtol)[0]
        else:
            compute = lambda: reference_between(self.x0_fn, s, self.x_T, s.t_max, t_end)  # noqa: E731
        # The key holds a digest of the start noises themselves: standard_problems draws them from one generator
        # in turn, so the same name, seed and n gave other noises when other problems were built before.
        noise = hashlib.sha256(self.x_T.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return cached(f"v2|{self.key}|{s.fingerprint()}|{endpoint}|{tuple(self.x_T.shape)}|{noise}", compute)


def high_accuracy_reference(denoiser: Denoiser, x_T: torch.Tensor, endpoint: str = "zero",
                            rtol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Adaptive DPM-Solver-23 at ``rtol`` (atol = rtol / 10), checked against a run at rtol / 10: returns the
    finer solution and the RMS difference of the two (an estimate of the reference's own error)."""
    runs = [sample(denoiser, x_T, "dpmsolver++", method="adaptive", order=3, rtol=tol, atol=tol / 10,
                   denoise_to_zero=endpoint == "zero", progress=False).x.to(torch.float64) for tol in (rtol, rtol / 10)]
    return runs[1], float(torch.sqrt(((runs[0] - runs[1]) ** 2).mean()))


def _guided(problem: GaussianMixture, labels: torch.Tensor, scale: float):
    """CFG denoiser and the exact guided x0 function of a labelled mixture."""
    uncond = torch.full_like(labels, -1)

    def x0_fn(y, rho):
        u, c = problem.posterior_mean(y, rho, uncond), problem.posterior_mean(y, rho, labels)
        return u + scale * (c - u)

    return x0_fn, uncond


def standard_problems(n: int = 64, seed: int = 0, schedule: Schedule | None = None,
                      names: Sequence[str] | None = None) -> list[LabProblem]:
    """The lab's analytic problems under the DDPM linear schedule (diffusers' peers need a DiscreteVP):

    - ``gaussian``: 16-dim Gaussian with unequal variances;
    - ``mixture-cfg7.5``: class-labelled 8-dim mixture of 12 components (4 classes) with classifier-free
      guidance at scale 7.5;
    - ``digits-kde``: kernel-density model of scikit-learn's digits (64 dims, bandwidth 0.1).
    """
    schedule = schedule or DiscreteVP.linear()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    builders: dict[str, Callable[[], LabProblem]] = {}

    def gaussian():
        problem = GaussianData(rng.normal(size=16) * 0.5, (0.1 + rng.random(16)) ** 2)
        x_T = torch.randn((n, 16), generator=g, dtype=torch.float64)
        return LabProblem("gaussian", problem.denoiser(schedule), x_T, f"gaussian|{seed}|{n}", problem.posterior_mean)

    def mixture_cfg():
        problem = GaussianMixture.random(k=12, dim=8, seed=seed, classes=4)
        labels = torch.arange(n) % 4
        x0_fn, uncond = _guided(problem, labels, 7.5)
        den = ClassifierFreeGuidance(problem.denoiser(schedule), 7.5, cond={"y": labels}, uncond={"y": uncond})
        x_T = torch.randn((n, 8), generator=g, dtype=torch.float64)
        return LabProblem("mixture-cfg7.5", den, x_T, f"mixture-cfg7.5|{seed}|{n}", x0_fn)

    def digits():
        problem = digits_kde(0.1, classes=False)
        x_T = torch.randn((n, 64), generator=g, dtype=torch.float64)
        return LabProblem("digits-kde", problem.denoiser(schedule), x_T, f"digits-kde|0.1|{seed}|{n}",
                          problem.posterior_mean)

    builders = {"gaussian": gaussian, "mixture-cfg7.5": mixture_cfg, "digits-kde": digits}
    names = list(builders) if names is None else list(names)
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"Unknown lab problem(s) {unknown}; valid: {', '.join(builders)}.")
    return [builders[name]() for name in names]


@dataclass
class Row:
    """One cell: a configuration at one NFE on one problem. The statistics are None when the run failed.

    ``median``/``far``/``rmse`` and their ``*_ci`` (95% percentile-bootstrap intervals over the samples) are those
    of :func:`dpmsolve.lab.metrics.cell_stats`; ``far`` is a fraction in [0, 1] of samples whose per-sample error
    exceeds ``threshold`` (the problem's :func:`~dpmsolve.lab.metrics.far_threshold`). ``errors`` keeps the
    per-sample errors in memory (for paired comparisons such as :func:`~dpmsolve.lab.metrics.ratio_ci`); it is
    not written by :meth:`Report.to_json`.
    """

    problem: str
    label: str
    source: str            # 'dpmsolve', 'diffusers' or 'k-diffusion'
    nfe: int               # the budget asked for
    nfe_used: int          # model evaluations really made
    rmse: float | None     # root mean square error per coordinate, data space
    mse: float | None
    error: str | None = None   # why the run failed, if it did
    median: float | None = None                      # median per-sample error (RMS over a sample's coordinates)
    median_ci: tuple[float, float] | None = None
    far: float | None = None                         # fraction of samples with error > threshold
    far_ci: tuple[float, float] | None = None
    rmse_ci: tuple[float, float] | None = None
    n: int | None = None                             # samples
    threshold: float | None = None                   # the problem's far threshold
    errors: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "errors"}
        for key in ("median_ci", "far_ci", "rmse_ci"):
            if d[key] is not None:
                d[key] = [float(v) for v in d[key]]
        return d


_BY = ("rmse", "median", "far")


@dataclass
class Report:
    rows: list[Row]
    endpoint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        return list(dict.fromkeys(r.problem for r in self.rows))

    def best(self, problem: str, nfe: int, source: str | None = None, exclude: str | None = None,
             by: str = "rmse") -> Row | None:
        """The row with the smallest ``by`` ('rmse', 'median' or 'far'; ties broken by median, then RMSE) among the
        successful rows of a cell, optionally only from ``source`` or excluding ``exclude``."""
        if by not in _BY:
            raise ValueError(f"by must be one of {_BY}, got {by!r}.")
        rows = [r for r in self.rows if r.problem == problem and r.nfe == nfe and r.rmse is not None
                and getattr(r, by) is not None
                and (source is None or r.source == source) and (exclude is None or r.source != exclude)]
        return min(rows, key=lambda r: (getattr(r, by), r.median if r.median is not None else r.rmse, r.rmse),
                   default=None)

    def to_markdown(self, problem: str) -> str:
        """One table per problem: per cell ``median / far% / RMSE`` (median per-sample error, percentage of
        samples far from the reference, RMSE); bold marks the smallest median at that NFE. Cells whose NFE used
        differs from the budget show it in parentheses."""
        rows = [r for r in self.rows if r.problem == problem]
        nfes = sorted({r.nfe for r in rows})
        labels = list(dict.fromkeys(r.label for r in rows))
        cell = {(r.label, r.nfe): r for r in rows}
        thresholds = sorted({r.threshold for r in rows if r.threshold is not None})
        n = sorted({r.n for r in rows if r.n is not None})
        out = [f"| {problem} (median / far% / RMSE) | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
               "|---|" + "---:|" * len(nfes)]
        key = {k: min(((r.median, r.rmse) for r in rows if r.nfe == k and r.rmse is not None and r.median is not None),
                      default=None) for k in nfes}
        for label in labels:
            cells = []
            for k in nfes:
                r = cell.get((label, k))
                if r is None:
                    cells.append("")
                elif r.rmse is None:
                    cells.append("failed")
                else:
                    if r.median is None:   # rows made without per-sample statistics
                        text = f"{r.rmse:.2e}"
                    else:
                        text = f"{r.median:.2e} / {100 * r.far:.1f}% / {r.rmse:.2e}"
                    text += "" if r.nfe_used == r.nfe else f" ({r.nfe_used})"
                    best = r.median is not None and key[k] == (r.median, r.rmse)
                    cells.append(f"**{text}**" if best else text)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        if thresholds:
            out.append(f"\n{', '.join(map(str, n))} samples; far = per-sample error > "
                       + ", ".join(f"{t:.3g}" for t in thresholds)
                       + " (half the reference's RMS spread); bold: smallest median at that NFE.")
        failures = sorted({(r.label, r.error) for r in rows if r.error})
        out += [f"\n- {label} failed: `{err}`" for label, err in failures]
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps({"endpoint": self.endpoint, "meta": self.meta, "rows": [r.to_dict() for r in self.rows]},
                          indent=1)

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        problems = self.problems()
        stats = [("median", "median per-sample error"), ("rmse", "RMSE vs exact ODE solution")]
        if not any(r.median is not None for r in self.rows):
            stats = stats[1:]
        fig, axes = plt.subplots(len(stats), len(problems), figsize=(5.2 * len(problems), 4.6 * len(stats)),
                                 squeeze=False)
        for row_axes, (stat, ylabel) in zip(axes, stats):
            for ax, problem in zip(row_axes, problems):
                rows = [r for r in self.rows if r.problem == problem and getattr(r, stat) is not None]
                labels = list(dict.fromkeys(r.label for r in rows))
                ours = [lb for lb in labels if lb.startswith("dpmsolve")]
                colors = {lb: plt.cm.tab10(i % 10) for i, lb in enumerate(ours)}
                colors.update({lb: plt.cm.tab20b(i % 20)
                               for i, lb in enumerate(lb for lb in labels if lb not in ours)})
                for label in labels:
                    pts = sorted((r.nfe_used, getattr(r, stat)) for r in rows if r.label == label)
                    mine = label in ours
                    ax.loglog(*zip(*pts), "-o" if mine else "--x", ms=3, lw=1.4 if mine else 0.7,
                              color=colors[label], alpha=1.0 if mine else 0.6, label=label)
                ax.set_title(f"{problem} (endpoint {self.endpoint})", fontsize=9)
                ax.set_xlabel("NFE")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


def _stats(x: torch.Tensor, reference: torch.Tensor, threshold: float, n_boot: int, seed: int) -> dict:
    """The Row fields of one successful run: RMSE, MSE and the per-sample statistics with intervals."""
    stats = cell_stats(x, reference, threshold=threshold, n_boot=n_boot, seed=seed)
    errors = per_sample_errors(x, reference).numpy()
    return dict(rmse=stats.rmse, mse=stats.rmse ** 2, median=stats.median, median_ci=stats.median_ci, far=stats.far,
                far_ci=stats.far_ci, rmse_ci=stats.rmse_ci, n=stats.n, threshold=stats.threshold, errors=errors)


def evaluate(denoiser: Denoiser, x_T: torch.Tensor, configs: Sequence[SolverConfig] = DEFAULT_CONFIGS,
             nfes: Sequence[int] = LAB_NFES, *, reference: torch.Tensor | None = None, endpoint: str = "zero",
             peers: Sequence[str] = (), problem: str = "model", progress: bool | None = None,
             n_boot: int = 1000, seed: int = 0) -> Report:
    """Run each configuration (and each named peer) at each NFE from ``x_T`` and measure it against the
    reference (default: ``high_accuracy_reference``). Failures are recorded as rows with their error.

    Per cell: median per-sample error, far fraction and RMSE with ``n_boot`` percentile-bootstrap resamples
    (``seed``: the same resampled indices for every cell, so cells of one problem are paired). The far threshold
    is computed once, from the reference (:func:`~dpmsolve.lab.metrics.far_threshold`).
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}.")
    meta: dict[str, Any] = {}
    if reference is None:
        reference, meta["reference_rmse_estimate"] = high_accuracy_reference(denoiser, x_T, endpoint)
    reference = reference.detach().to(torch.float64).cpu()
    threshold = far_threshold(reference)
    meta.update(far_threshold=threshold, samples=int(reference.shape[0]), n_boot=n_boot, bootstrap_seed=seed)
    jobs = [(c, k) for c in configs for k in nfes] + [(p, k) for p in peers for k in nfes]
    from tqdm.auto import tqdm

    rows = []
    for job, nfe in tqdm(jobs, desc=f"lab {problem}", disable=None if progress is None else not progress,
                         leave=False):
        if isinstance(job, SolverConfig):
            try:
                result = job.run(denoiser, x_T, nfe, endpoint)
            except Exception as exc:  # a failing configuration is a finding, not a crash
                rows.append(Row(problem, job.label, "dpmsolve", nfe, 0, None, None, f"{type(exc).__name__}: {exc}",
                                threshold=threshold))
                continue
            rows.append(Row(problem, job.label, "dpmsolve", nfe, result.nfe,
                            **_stats(result.x, reference, threshold, n_boot, seed)))
        else:
            from .peers import run_peer

            res = run_peer(job, denoiser, x_T, nfe, endpoint=endpoint)
            if res.x is None:
                rows.append(Row(problem, job, job.split(":")[0], nfe, res.nfe, None, None, res.error,
                                threshold=threshold))
            else:
                rows.append(Row(problem, job, job.split(":")[0], nfe, res.nfe,
                                **_stats(res.x, reference, threshold, n_boot, seed), error=res.error))
    return Report(rows, endpoint, meta)
