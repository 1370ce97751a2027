"""The patches model's sample quality, with the numbers that give it meaning (README "Shipped models").

    python benchmarks/patches_quality.py [--n 200] [--threads 1]

Prints the patches distance (:func:`dpmsolve.zoo.metrics.patches_distance`: multi-scale sliced Wasserstein to
2000 real training crops) of ``n`` images each: the held-out patches, other training crops, samples of the
shipped model (DPM-Solver++ 2M at 10 and 20 NFE, and 3M with 200 steps, the demo's reference solver), and
blurred noise with the data's colour statistics (~2 minutes on one thread).
"""

from __future__ import annotations

import argparse
import time

import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.zoo.metrics import blurred_noise, patches_distance
from dpmsolve.zoo.train import patches_data, random_patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    n, model = args.n, zoo.load("patches")
    heldout = patches_data("test")
    heldout = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:n]]
    x_T = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(0))

    def solve(solver, steps, **options):
        return dp.sample(model.denoiser, x_T, solver, steps=steps, t_end=0.0, progress=False, **options).x

    rows = [
        (f"held-out patches ({len(heldout)})", heldout),
        ("training crops (other seed)", random_patches(n, generator=torch.Generator().manual_seed(1), flip=False)),
        ("samples, DPM-Solver++ 2M, 10 NFE", solve("dpmsolver++", 10, order=2)),
        ("samples, DPM-Solver++ 2M, 20 NFE", solve("dpmsolver++", 20, order=2)),
        ("samples, DPM-Solver++ 3M, 200 steps (reference)", solve("dpmsolver++", 200, order=3, solver_type="taylor")),
        ("blurred noise (data colour statistics)", blurred_noise(n)),
    ]
    print(f"| {n} images each | patches distance |\n|---|---:|")
    for label, x in rows:
        print(f"| {label} | {patches_distance(x):.3f} |")
    print(f"(computed in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
