"""Exact inversion on the shipped digits model: reconstruction error (plain vs BDIA / EDICT) and sample quality.

Run: ``python examples/exact_inversion.py`` (about a minute on a laptop CPU). Prints two markdown tables:

1. Round trip ``sample(invert(x0))`` on 100 held-out digits (conditional on their labels, guidance scale 1), float32
   images and network: the RMSE and the largest error per pixel (pixels in [-1, 1]) after plain inversion (DDIM and
   DPM-Solver++ 2M: two discretisation errors) and exact inversion (BDIA, EDICT: round-off; their states in float64
   by default, and in float32 for comparison).
2. Sampling from fresh noise (100 samples, ten per class, guidance scale 3, grid ending at t_min): digits-FD
   (Frechet distance of the shipped classifier's features to the training digits) and class accuracy for DDIM and
   the exact samplers at the same step counts.
"""

from __future__ import annotations

import time

import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.inversion import BDIA, EDICT
from dpmsolve.zoo.metrics import class_accuracy, digits_fd
from dpmsolve.zoo.train import digits_data

STEPS = (10, 20, 50)


def round_trip(den, x0, solver, n, exact=None, **options):
    if exact is None:
        inv = dp.invert(den, x0, solver, steps=n, progress=False, **options)
        out = dp.sample(den, inv.x, solver, steps=n, progress=False, **options)
    else:
        inv = dp.invert(den, x0, "ddim", steps=n, exact=exact, progress=False)
        out = dp.sample(den, inv, "ddim", exact=True, progress=False)
    err = out.x.double() - x0.double()
    return float(err.square().mean().sqrt()), float(err.abs().max()), inv.nfe + out.nfe


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = zoo.load("digits")
    x_test, y_test = digits_data("test")
    x0, y = x_test[:100], y_test[:100]
    den = zoo.guided(model, y, 1.0)
    methods = [("DDIM, plain", "ddim", None, {}), ("DPM-Solver++ 2M, plain", "dpmsolver++", None, {"order": 2}),
               ("BDIA (gamma = 1)", None, BDIA(1.0), {}), ("BDIA (gamma = 0.5)", None, BDIA(0.5), {}),
               ("EDICT (p = 0.93)", None, EDICT(0.93), {}),
               ("BDIA (gamma = 1), float32 states", None, BDIA(1.0, precision=None), {}),
               ("EDICT (p = 0.93), float32 states", None, EDICT(0.93, precision=None), {})]
    print("| inversion | steps | RMSE | max abs error | NFE (invert + sample) |")
    print("|---|---:|---:|---:|---:|")
    for label, solver, exact, options in methods:
        for n in STEPS:
            rmse, worst, nfe = round_trip(den, x0, solver, n, exact, **options)
            print(f"| {label} | {n} | {rmse:.2e} | {worst:.2e} | {nfe} |")

    labels = torch.arange(100) % 10
    guided = zoo.guided(model, labels, 3.0)
    noise = torch.randn(100, *model.shape, generator=torch.Generator().manual_seed(0))
    print()
    print("| sampler | steps | NFE | digits-FD | accuracy |")
    print("|---|---:|---:|---:|---:|")
    real = torch.stack([x_test[y_test == k][i // 10 % int((y_test == k).sum())] for i, k in enumerate(labels.tolist())])
    print(f"| held-out real digits | - | - | {digits_fd(real):.2f} | {class_accuracy(real, labels):.2f} |")
    for label, exact in [("DDIM", None), ("BDIA (gamma = 1)", BDIA(1.0)), ("BDIA (gamma = 0.5)", BDIA(0.5)),
                         ("EDICT (p = 0.93)", EDICT(0.93))]:
        for n in STEPS:
            sol = dp.sample(guided, noise, "ddim", steps=n, exact=exact, progress=False)
            print(f"| {label} | {n} | {sol.nfe} | {digits_fd(sol.x):.2f} | {class_accuracy(sol.x, labels):.2f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
