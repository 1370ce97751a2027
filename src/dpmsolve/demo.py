"""``dpmsolve demo``: several solvers on the same models, from the same noise, against a reference solution.

Two models: the shipped class-conditional ``digits`` network (guided, scale 3; reference: DPM-Solver++ 3M with
200 steps, ending at sigma = 0 like every solver here), and an analytic 2-D Gaussian
mixture (a ring of eight modes) under the DDPM linear schedule, whose exact ODE solution is a DOP853 solve at
rtol 1e-10.
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
REFERENCE_STEPS = 200


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


def run_digits_demo(nfes=DEMO_NFES, seed: int = 0, scale: float = 3.0) -> DemoResult:
    """The shipped digits model, guided, two of each digit, every solver from the same noise to sigma = 0."""
    from . import zoo

    start = time.perf_counter()
    model = zoo.load("digits")
    labels = torch.arange(20) % model.num_classes
    denoiser = zoo.guided(model, labels, scale)
    x_T = torch.randn((len(labels), *model.shape), generator=torch.Generator().manual_seed(seed))
    # Reference: third-order DPM-Solver++ with 200 steps (it differs from a 400-step solve by 6e-4 RMSE, far below
    # the errors the demo shows); the adaptive solver needs ~1500 evaluations for rtol 1e-4 on this network.
    reference = sample(denoiser, x_T, "dpmsolver++", order=3, solver_type="taylor", steps=REFERENCE_STEPS,
                       t_end=0.0, progress=False).x
    table, samples = [], {}
    for label, name, options in DEMO_SOLVERS:
        for nfe in nfes:
            result = sample(denoiser, x_T, name, steps=nfe, t_end=0.0, progress=False, **options)
            rmse = float(torch.sqrt(((result.x - reference) ** 2).mean()))
            table.append((label, nfe, result.nfe, rmse))
            samples[(label, nfe)] = result.x.numpy()
    return DemoResult(table, samples, reference.numpy(), time.perf_counter() - start)


def _tile(images: np.ndarray, cols: int = 10) -> np.ndarray:
    """(n, 1, h, w) images in [-1, 1] -> one (rows*h, cols*w) array with 1-pixel gaps."""
    n, _, h, w = images.shape
    rows = -(-n // cols)
    out = -np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1))  # white gaps (gray_r: -1 is white)
    for i, img in enumerate(np.clip(images, -1, 1)):
        r, c = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = img[0]
    return out


def plot_digits(result: DemoResult, path: Path, nfes=DEMO_NFES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, *_ in result.table))
    errors = {(label, nfe): err for label, nfe, _, err in result.table}
    fig, axes = plt.subplots(len(labels), len(nfes) + 1, figsize=(3.2 * (len(nfes) + 1), 1.0 + 1.05 * len(labels)))
    for row, label in enumerate(labels):
        for col, nfe in enumerate(list(nfes) + [None]):
            ax = axes[row, col]
            images = result.reference if nfe is None else result.samples[(label, nfe)]
            ax.imshow(_tile(images), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            title = f"reference (3M, {REFERENCE_STEPS} steps)" if nfe is None else \
                f"{label}, NFE {nfe}: RMSE {errors[(label, nfe)]:.3f}"
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("dpmsolve demo: shipped digits model, classifier-free guidance 3, same noise for every solver",
                 fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return _save(fig, path)


def main(out: str = "dpmsolve-demo", n: int = 1000, plot: bool = True) -> DemoResult:
    digits = run_digits_demo()
    print("Shipped digits model (guidance 3, 20 images): RMSE against the reference solution, sigma = 0:\n")
    print(format_table(digits))
    result = run_demo(n=n)
    print(f"\nAnalytic 8-mode Gaussian mixture ({n} samples, logSNR grid): RMSE against the exact ODE solution:\n")
    print(format_table(result))
    print(f"\n(computed in {digits.seconds + result.seconds:.1f} s)")
    if plot:
        try:
            paths = [plot_digits(digits, Path(out) / "demo.png"), plot_demo(result, Path(out) / "demo_mixture.png")]
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'dpmsolve[plot]').")
        else:
            print("Wrote " + " and ".join(str(p.resolve()) for p in paths))
    return result
