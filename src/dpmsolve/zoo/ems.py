"""DPM-Solver-v3 statistics (EMS) of the shipped zoo models, and the command that makes them.

```python
from dpmsolve import zoo
m = zoo.load("digits")
stats = zoo.statistics("digits")                 # the EMS of digits under classifier-free guidance 3
dp.sample(zoo.guided(m, labels, 3.0), x, "dpmsolver-v3", ems=stats, steps=8)
```

EMS belong to one model AND one guidance scale (the guided ODE is another ODE). They are estimated from the
model's own guided trajectories (``source='trajectory'``: no data is needed, and for a guided model the data is
not what its ODE transports), with labels ``arange(K) % num_classes``, statistics shared across pixel positions
(per element was no better, ``benchmarks/results/v3_sharing.md``). The total lambda-derivative of digits and
patches is taken over a wider step than ``compute``'s default (``fd_step``): these networks are rough in t at the
scale of a few train steps, and an instantaneous derivative makes s jump from node to node (see ``SHIPPED``).
Regenerate with ``python -m dpmsolve.zoo.ems NAME [--k K] [--n-lambdas N]``; the file records the
weights' hash, and loading refuses statistics of other weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ..ems import EMS, EMSError, compute
from . import WEIGHTS_DIR, guided, load, weights_hash

__all__ = ["SHIPPED", "Shipped", "statistics", "statistics_path", "compute_statistics"]


class Shipped(NamedTuple):
    """How the shipped statistics of one model were computed."""

    guidance: float | None     # classifier-free guidance scale (None: unconditional)
    k: int                     # data points (own trajectories)
    n_lambdas: int             # lambda intervals
    fd_step: float | None      # lambda step of the total derivative (None: compute's default, 3e-3 in float32)


# What ships in weights/. fd_step: on digits (trained on integer train steps) the default 3e-3 gave s that jumps
# between nodes and v3 RMSE 0.170 / 0.106 at 6 / 8 NFE; 0.02 (a tenth of the node spacing) gives 0.152 / 0.091.
# On patches 0.03 gives 0.065 instead of 0.083 at 10 NFE (K = 64). On digits-flow a wider step was worse at
# 6-10 NFE (0.160 -> 0.171 at 6), so it keeps the default. Measured with 32 start noises, uniform logSNR grids.
SHIPPED = {"digits": Shipped(3.0, 1024, 50, 0.02), "digits-flow": Shipped(3.0, 256, 50, None),
           "patches": Shipped(None, 256, 50, 0.03)}


def _model_id(name: str, guidance: float | None) -> str:
    """What the statistics file records as its model: the weights' hash and the guidance scale."""
    return f"{name}@{weights_hash(name)}" + ("" if guidance is None else f"|cfg={guidance:g}")


def statistics_path(name: str, guidance: float | None) -> Path:
    suffix = "" if guidance is None else f"-cfg{guidance:g}"
    return WEIGHTS_DIR / f"{name}{suffix}.ems.safetensors"


def compute_statistics(name: str, guidance: float | None = 3.0, k: int = 1024, n_lambdas: int = 50, seed: int = 0,
                       batch_size: int = 256, progress: bool | None = None, checkpoint=None,
                       fd_step: float | None = None) -> EMS:
    """Estimate the EMS of zoo model ``name`` (guided at ``guidance`` if it is class-conditional)."""
    model = load(name)
    options = dict(n_data=k, shape=model.shape, schedule=model.schedule, n_lambdas=n_lambdas, shared=True,
                   seed=seed, batch_size=batch_size, progress=progress, checkpoint=checkpoint, dtype=torch.float32,
                   fd_step=fd_step)
    model_id = _model_id(name, guidance)
    if model.num_classes and guidance is not None:
        return compute(lambda c: guided(model, c["y"], guidance), conditions={"y": torch.arange(k) % model.num_classes},
                       model_id=model_id, **options)
    return compute(model.denoiser, model_id=model_id, **options)


def statistics(name: str, guidance: float | None = 3.0) -> EMS:
    """The shipped EMS of zoo model ``name`` at ``guidance`` (validated against the model's schedule, shape and
    weights)."""
    path = statistics_path(name, guidance)
    if not path.is_file():
        shipped = ", ".join(f"{n} (guidance {s.guidance})" for n, s in SHIPPED.items())
        raise EMSError(f"No shipped statistics for {name!r} at guidance {guidance}; shipped: {shipped}. Compute them "
                       f"with `python -m dpmsolve.zoo.ems {name} --guidance {guidance}`.")
    model = load(name)
    ems = EMS.load(path, model.schedule, model.shape)
    expected = _model_id(name, guidance)
    if ems.model != expected:
        raise EMSError(f"{path} holds statistics of {ems.model!r}, not of the current {expected!r}; recompute them "
                       f"with `python -m dpmsolve.zoo.ems {name}`.")
    return ems


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--guidance", type=float, default=None, help="default: the shipped setting")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--n-lambdas", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fd-step", type=float, default=None, help="default: the shipped setting")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SHIPPED.get(args.name, Shipped(None, 1024, 50, None))
    guidance = args.guidance if args.guidance is not None else spec.guidance
    start = time.perf_counter()
    ems = compute_statistics(args.name, guidance, args.k or spec.k, args.n_lambdas or spec.n_lambdas, args.seed,
                             progress=True, fd_step=args.fd_step if args.fd_step is not None else spec.fd_step)
    path = ems.save(args.out or statistics_path(args.name, guidance))
    print(f"{ems} in {time.perf_counter() - start:.0f} s -> {path}")


if __name__ == "__main__":
    main()
