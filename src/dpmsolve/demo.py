"""``dpmsolve demo``: several solvers on one model, from the same noise, against the exact ODE solution.

Until trained models ship with the package, the model is an analytic 2-D Gaussian mixture (a ring of eight
modes) under the DDPM linear schedule, whose exact denoiser is known; the reference is a DOP853 solve of the
probability-flow ODE at rtol 1e-10.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .lab import GaussianMixture
from .sampling import sample
from .schedules import DiscreteVP

# (label, solver name, options): the solvers the demo compares.
DEMO_SOLVERS = [
    ("DDIM", "ddim", {}),
    ("DPM-Solver++ 2M", "dpmsolver++", {"order": 2}),
    ("DPM-Solver++ 3M", "dpmsolver++", {"order": 3, "solver_type": "taylor"}),
    ("DPM-Solver 3S", "dpmsolver", {"order": 3, "method": "singlestep"}),
    ("UniPC-2 bh2", "unipc", {"order": 2}),
]
DEMO_NFES = (5, 10, 20)


def ring_mixture(modes: int = 8, radius: float = 0.8, std: float = 0.05) -> GaussianMixture:
    angles = 2 * math.pi * np.arange(modes) / modes
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(means, np.full_like(means, std**2))


@dataclass
class DemoResult:
    table: list[tuple[str, int, int, float]]   # (solver, NFE requested, NFE used, RMSE vs exact)
    samples: dict[tuple[str, int], np.ndarray]
    reference: np.ndarray
    seconds: float


def run_demo(n: int = 1000, nfes=DEMO_NFES, seed: int = 0, grid: str = "logSNR") -> DemoResult:
    start = time.perf_counter()
    problem, schedule = ring_mixture(), DiscreteVP.linear()
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 2), generator=generator, dtype=torch.float64)
    reference = problem.exact_solution(schedule, x_T, schedule.t_max, schedule.t_min)
    denoiser = problem.denoiser(schedule)
    table, samples = [], {}
    for label, name, options in DEMO_SOLVERS:
        for nfe in nfes:
            result = sample(denoiser, x_T, name, steps=nfe, grid=grid, progress=False, **options)
            rmse = float(torch.sqrt(((result.x - reference) ** 2).mean()))
            table.append((label, nfe, result.nfe, rmse))
            samples[(label, nfe)] = result.x.numpy()
    return DemoResult(table, samples, reference.numpy(), time.perf_counter() - start)


def format_table(result: DemoResult, nfes=DEMO_NFES) -> str:
    errors = {(label, nfe): err for label, nfe, _, err in result.table}
    labels = list(dict.fromkeys(label for label, *_ in result.table))
    lines = ["| solver | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{errors[(label, k)]:.2e}" for k in nfes) + " |")
    return "\n".join(lines)


def plot_demo(result: DemoResult, path: Path, nfes=DEMO_NFES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, *_ in result.table))
    fig, axes = plt.subplots(len(labels), len(nfes) + 1, figsize=(2.6 * (len(nfes) + 1), 2.6 * len(labels)),
                             sharex=True, sharey=True)
    errors = {(label, nfe): err for label, nfe, _, err in result.table}
    for row, label in enumerate(labels):
        for col, nfe in enumerate(nfes):
            ax = axes[row, col]
            pts = result.samples[(label, nfe)]
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue")
            ax.set_title(f"{label}\nNFE {nfe}: RMSE {errors[(label, nfe)]:.1e}", fontsize=8)
        ax = axes[row, -1]
        ax.scatter(result.reference[:, 0], result.reference[:, 1], s=1.5, alpha=0.5, color="black")
        ax.set_title("exact ODE solution", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    fig.suptitle("dpmsolve demo: 8-mode Gaussian mixture, DDPM linear schedule, same noise for every solver",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(out: str = "dpmsolve-demo", n: int = 1000, plot: bool = True) -> DemoResult:
    result = run_demo(n=n)
    print(f"Error (RMSE per coordinate) against the exact ODE solution, {n} samples, logSNR grid:\n")
    print(format_table(result))
    print(f"\n(computed in {result.seconds:.1f} s)")
    if plot:
        try:
            path = plot_demo(result, Path(out) / "demo.png")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'dpmsolve[plot]').")
        else:
            print(f"Wrote {path.resolve()}")
    return result
