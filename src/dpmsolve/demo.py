"""``dpmsolve demo``: several solvers on the same models, from the same noise, against a reference solution.

Three models: the shipped class-conditional ``digits`` network (guided, scale 3; reference: DPM-Solver++ 3M with
200 steps, ending at sigma = 0 like every solver here), the shipped unconditional ``patches`` network (32x32 RGB
photo patches, cosine schedule, v-prediction; reference: 3M with 200 steps too), and an analytic 2-D Gaussian
mixture (a ring of eight modes) under the DDPM linear schedule, whose exact ODE solution is a DOP853 solve at
rtol 1e-10. Besides the error, the trained models' samples are scored: digits by the shipped classifier's class
accuracy and digits-FD, patches by the multi-scale sliced Wasserstein distance to real patches
(:mod:`dpmsolve.zoo.metrics`), with real data, the reference and blurred noise scored the same way for scale.
The demo runs with one CPU thread (its batches are tiny; more threads only add overhead and contention); it
prints a progress line per model and solver on stderr and takes about 1.5-2 minutes on a laptop CPU.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
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
    ("default plan (no solver given)", None, {}),
]
DEMO_NFES = (5, 10, 20)
REFERENCE_STEPS = 200
PATCHES_REFERENCE_STEPS = 200


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
    # sample-quality metrics of the trained models: {(solver, NFE): {metric: value}}, and the same metrics of
    # comparison sets of the same size ({"reference": ..., "held-out data": ..., "blurred noise": ...})
    quality: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    reference_steps: int = REFERENCE_STEPS


def _quiet(message: str) -> None:
    pass


def run_demo(n: int = 1000, nfes=DEMO_NFES, seed: int = 0, grid: str = "logSNR", log=_quiet) -> DemoResult:
    """The analytic 8-mode mixture, ``n`` samples, every solver against the exact solution (``log``: a
    callable taking one progress line per stage)."""
    start = time.perf_counter()
    log("mixture: exact ODE solution (DOP853)")
    problem, schedule = ring_mixture(), DiscreteVP.linear()
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, 2), generator=generator, dtype=torch.float64)
    reference = problem.exact_solution(schedule, x_T, schedule.t_max, schedule.t_min)
    denoiser = problem.denoiser(schedule)
    table, samples = [], {}
    for label, name, options in DEMO_SOLVERS:
        for nfe in nfes:
            on_grid = {} if name is None else {"grid": grid}    # the default plan holds its own times
            result = sample(denoiser, x_T, name, steps=nfe, progress=False, **on_grid, **options)
            rmse = float(torch.sqrt(((result.x - reference) ** 2).mean()))
            table.append((label, nfe, result.nfe, rmse))
            samples[(label, nfe)] = result.x.numpy()
        log(f"mixture: {label}")
    return DemoResult(table, samples, reference.numpy(), time.perf_counter() - start)


def _solve_all(denoiser, x_T, nfes, reference_steps: int, metrics=None, solvers=DEMO_SOLVERS,
               log=_quiet) -> DemoResult:
    """Every demo solver at every NFE from ``x_T`` to sigma = 0, against a 3M reference of ``reference_steps``."""
    start = time.perf_counter()
    log(f"reference solution (3M, {reference_steps} steps)")
    reference = sample(denoiser, x_T, "dpmsolver++", order=3, solver_type="taylor", steps=reference_steps,
                       t_end=0.0, progress=False).x
    table, samples, quality = [], {}, {}
    for label, name, options in solvers:
        for nfe in nfes:
            if callable(name):      # a tuned plan per NFE (None where none ships)
                plan = name(nfe)
                if plan is None:
                    continue
                result = sample(denoiser, x_T, plan, progress=False)
            else:                   # name None: dp.sample's model-free default plan
                result = sample(denoiser, x_T, name, steps=nfe, t_end=0.0, progress=False, **options)
            rmse = float(torch.sqrt(((result.x - reference) ** 2).mean()))
            table.append((label, nfe, result.nfe, rmse))
            samples[(label, nfe)] = result.x.numpy()
            if metrics is not None:
                quality[(label, nfe)] = metrics(result.x)
        log(label)
    baselines = {} if metrics is None else {"reference": metrics(reference)}
    return DemoResult(table, samples, reference.numpy(), time.perf_counter() - start, quality, baselines,
                      reference_steps)


def _zoo_solvers(name: str, guidance: float | None) -> list:
    """The demo solvers, plus DPM-Solver-v3 (its recommended settings) when statistics ship for this zoo model
    and guidance scale, and the tuned plans shipped for it (:func:`dpmsolve.zoo.plan`, NFE 5, 6, 8, 10)."""
    from . import zoo
    from .solvers import DPMSolverV3
    from .zoo.plans import plan_path

    solvers = list(DEMO_SOLVERS)
    if zoo.statistics_path(name, guidance).is_file():
        options = {"ems": zoo.statistics(name, guidance), **DPMSolverV3.recommended(guidance)}
        solvers.append(("DPM-Solver-v3", "dpmsolver-v3", options))

    def tuned(nfe: int):
        return zoo.plan(name, nfe, guidance) if plan_path(name, nfe, guidance).is_file() else None

    return solvers + [("tuned plan (zoo.plan)", tuned, {})]


def run_digits_demo(nfes=DEMO_NFES, seed: int = 0, scale: float = 3.0, quality: bool = True,
                    log=_quiet) -> DemoResult:
    """The shipped digits model, guided, two of each digit, every solver from the same noise to sigma = 0;
    with ``quality``, the class accuracy and digits-FD of each solver's 20 samples."""
    from . import zoo

    start = time.perf_counter()
    model = zoo.load("digits")
    labels = torch.arange(20) % model.num_classes
    denoiser = zoo.guided(model, labels, scale)
    x_T = torch.randn((len(labels), *model.shape), generator=torch.Generator().manual_seed(seed))
    metrics = None
    if quality:
        from .zoo.metrics import class_accuracy, digits_fd

        def metrics(x):
            return {"accuracy": class_accuracy(x, labels), "digits-FD": digits_fd(x)}

    # Reference: third-order DPM-Solver++ with 200 steps (it differs from a 400-step solve by 6e-4 RMSE, far below
    # the errors the demo shows); the adaptive solver needs ~1500 evaluations for rtol 1e-4 on this network.
    result = _solve_all(denoiser, x_T, nfes, REFERENCE_STEPS, metrics, _zoo_solvers("digits", scale),
                        lambda message: log(f"digits: {message}"))
    if quality:
        from .zoo.metrics import blurred_digits
        from .zoo.train import digits_data

        x_test, y_test = digits_data("test")
        # held-out real digits with the same labels as the samples (the i-th held-out image of each class)
        real = torch.stack([x_test[y_test == k][i // model.num_classes] for i, k in enumerate(labels.tolist())])
        result.baselines["held-out data"] = metrics(real)
        result.baselines["blurred noise"] = metrics(blurred_digits(len(labels)))
    result.seconds = time.perf_counter() - start
    return result


def run_patches_demo(nfes=DEMO_NFES, seed: int = 0, n: int = 20, quality: bool = True, log=_quiet) -> DemoResult:
    """The shipped patches model, ``n`` samples, every solver from the same noise to sigma = 0; with ``quality``,
    the patches distance (multi-scale sliced Wasserstein to real training patches) of each solver's samples."""
    from . import zoo

    start = time.perf_counter()
    model = zoo.load("patches")
    x_T = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(seed))
    metrics = None
    if quality:
        from .zoo.metrics import blurred_noise, patches_distance
        from .zoo.train import patches_data

        def metrics(x):
            return {"distance": patches_distance(x)}

    # Reference: 3M with 200 steps (8e-4 RMSE from an 800-step solve: the jump to sigma = 0 makes the
    # convergence first order in the step count; still far below the errors shown at 20 NFE).
    result = _solve_all(model.denoiser, x_T, nfes, PATCHES_REFERENCE_STEPS, metrics, _zoo_solvers("patches", None),
                        lambda message: log(f"patches: {message}"))
    if quality:
        real = patches_data("test")
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]]
        result.baselines["held-out data"] = metrics(real)
        result.baselines["blurred noise"] = metrics(blurred_noise(n, seed=seed))
    result.seconds = time.perf_counter() - start
    return result


def _tile(images: np.ndarray, cols: int = 10, gap: float = -1.0) -> np.ndarray:
    """(n, c, h, w) images in [-1, 1] -> one (rows*h, cols*w) array (c = 1) or (rows*h, cols*w, c) array, with
    1-pixel gaps of value ``gap``."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), gap)
    for i, img in enumerate(np.clip(images, -1, 1)):
        r, col = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = img.transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def _plot_samples(result: DemoResult, path: Path, nfes, show, quality_text, title: str, size) -> Path:
    """One row per solver, one column per NFE plus the reference: ``show(ax, images)`` draws a tile of samples,
    ``quality_text(q)`` captions their quality metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, *_ in result.table))
    errors = {(label, nfe): err for label, nfe, _, err in result.table}
    figsize = (size[0] * (len(nfes) + 1), 1.0 + size[1] * len(labels))
    fig, axes = plt.subplots(len(labels), len(nfes) + 1, figsize=figsize)
    for row, label in enumerate(labels):
        for col, nfe in enumerate(list(nfes) + [None]):
            ax = axes[row, col]
            ax.axis("off")
            if nfe is not None and (label, nfe) not in result.samples:
                continue            # no tuned plan ships for this NFE
            show(ax, result.reference if nfe is None else result.samples[(label, nfe)])
            q = result.quality.get((label, nfe)) if nfe is not None else result.baselines.get("reference")
            caption = (f"reference (3M, {result.reference_steps} steps)" if nfe is None else
                       f"{label}, NFE {nfe}: RMSE {errors[(label, nfe)]:.3f}") + (quality_text(q) if q else "")
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_digits(result: DemoResult, path: Path, nfes=DEMO_NFES) -> Path:
    return _plot_samples(
        result, path, nfes,
        lambda ax, images: ax.imshow(_tile(images), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest"),
        lambda q: f"\nacc {q['accuracy']:.0%}, FD {q['digits-FD']:.1f}",
        "dpmsolve demo: shipped digits model, classifier-free guidance 3, same noise for every solver", (3.2, 1.05))


def plot_patches(result: DemoResult, path: Path, nfes=DEMO_NFES) -> Path:
    return _plot_samples(
        result, path, nfes,
        lambda ax, images: ax.imshow((_tile(images, gap=1.0) + 1) / 2, interpolation="nearest"),
        lambda q: f", dist {q['distance']:.2f}",
        "dpmsolve demo: shipped patches model (32x32 photo patches, cosine schedule, v-prediction), "
        "same noise for every solver", (4.4, 1.2))


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
        lines.append(f"| {label} | " + " | ".join(f"{errors[(label, k)]:.2e}" if (label, k) in errors else "—"
                                                  for k in nfes) + " |")
    return "\n".join(lines)


def format_quality(result: DemoResult, nfes=DEMO_NFES) -> str:
    """The quality metrics per solver and NFE (cells ``a / b`` for two metrics), then the comparison sets."""
    labels = list(dict.fromkeys(label for label, *_ in result.table))
    names = list(next(iter(result.quality.values())))

    def cell(q):
        return " / ".join(f"{q[m]:.0%}" if m == "accuracy" else f"{q[m]:.2f}" if q[m] < 10 else f"{q[m]:.1f}"
                          for m in names)

    lines = [f"| {' / '.join(names)} | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(result.quality[(label, k)]) if (label, k) in result.quality
                                                  else "—" for k in nfes) + " |")
    for name, q in result.baselines.items():
        text = f"reference (3M, {result.reference_steps} steps)" if name == "reference" else name
        lines.append(f"| {text} | {cell(q)} | | |")
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


def main(out: str = "dpmsolve-demo", n: int = 1000, plot: bool = True, patches: int = 20,
         progress: bool = True) -> DemoResult:
    """Run the three demos, print their tables (stdout), progress lines (stderr, with ``progress``) and the
    elapsed time, and with ``plot`` write ``demo.png``, ``demo_patches.png`` and ``demo_mixture.png`` to ``out``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny batches: one thread is fastest, and a busy machine does not slow it down
    try:
        return _main(out, n, plot, patches, progress)
    finally:
        torch.set_num_threads(previous)


def _main(out, n, plot, patches_n, progress=True):
    start = time.perf_counter()

    def log(message: str) -> None:
        if progress:   # one line per stage, also when stderr is not a terminal
            print(f"demo [{time.perf_counter() - start:4.0f} s] {message}", file=sys.stderr, flush=True)

    log("digits: loading the model")
    digits = run_digits_demo(log=log)
    print("Shipped digits model (guidance 3, 20 images): RMSE against the reference solution, sigma = 0:\n")
    print(format_table(digits))
    print("\nits samples: class accuracy (shipped classifier) / digits-FD to the training digits (20 images each):\n")
    print(format_quality(digits))
    log("patches: loading the model")
    patches = run_patches_demo(n=patches_n, log=log)
    print(f"\nShipped patches model ({patches_n} patches of 32x32 RGB): RMSE against the reference solution, "
          "sigma = 0:\n")
    print(format_table(patches))
    print(f"\nits samples: patches distance (multi-scale sliced Wasserstein to real training patches, {patches_n} "
          "patches each; lower is better):\n")
    print(format_quality(patches))
    result = run_demo(n=n, log=log)
    print(f"\nAnalytic 8-mode Gaussian mixture ({n} samples, logSNR grid): RMSE against the exact ODE solution:\n")
    print(format_table(result))
    if plot:
        log("plotting")
        try:
            paths = [plot_digits(digits, Path(out) / "demo.png"), plot_patches(patches, Path(out) / "demo_patches.png"),
                     plot_demo(result, Path(out) / "demo_mixture.png")]
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'dpmsolve[plot]').")
        else:
            print("\nWrote " + ", ".join(str(p.resolve()) for p in paths))
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return result
