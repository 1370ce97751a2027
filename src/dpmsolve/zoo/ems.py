"""DPM-Solver-v3 statistics (EMS) of the shipped zoo models, and the command that makes them.

>>> from dpmsolve import zoo
>>> m = zoo.load("digits")
>>> stats = zoo.statistics("digits")                 # the EMS of digits under classifier-free guidance 3
>>> dp.sample(zoo.guided(m, labels, 3.0), x, "dpmsolver-v3", ems=stats, steps=8)

EMS belong to one model AND one guidance scale (the guided ODE is another ODE). They are estimated from the
model's own guided trajectories (``source='trajectory'``: no data is needed, and for a guided model the data is
not what its ODE transports), with labels ``arange(K) % num_classes``, statistics shared across pixel positions.
Regenerate with ``python -m dpmsolve.zoo.ems NAME [--k K] [--n-lambdas N]``; the file records the
weights' hash, and loading refuses statistics of other weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..ems import EMS, EMSError, compute
from . import WEIGHTS_DIR, guided, load, weights_hash

__all__ = ["SHIPPED", "statistics", "statistics_path", "compute_statistics"]

# name -> (guidance scale or None, K, N): what ships in weights/.
SHIPPED = {"digits": (3.0, 1024, 50), "digits-flow": (3.0, 256, 50), "patches": (None, 256, 50)}


def _model_id(name: str, guidance: float | None) -> str:
    """What the statistics file records as its model: the weights' hash and the guidance scale."""
    return f"{name}@{weights_hash(name)}" + ("" if guidance is None else f"|cfg={guidance:g}")


def statistics_path(name: str, guidance: float | None) -> Path:
    suffix = "" if guidance is None else f"-cfg{guidance:g}"
    return WEIGHTS_DIR / f"{name}{suffix}.ems.safetensors"


def compute_statistics(name: str, guidance: float | None = 3.0, k: int = 1024, n_lambdas: int = 50, seed: int = 0,
                       batch_size: int = 256, progress: bool | None = None, checkpoint=None) -> EMS:
    """Estimate the EMS of zoo model ``name`` (guided at ``guidance`` if it is class-conditional)."""
    model = load(name)
    options = dict(n_data=k, shape=model.shape, schedule=model.schedule, n_lambdas=n_lambdas, shared=True,
                   seed=seed, batch_size=batch_size, progress=progress, checkpoint=checkpoint, dtype=torch.float32)
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
        shipped = ", ".join(f"{n} (guidance {g})" for n, (g, _, _) in SHIPPED.items())
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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    guidance, k, n = SHIPPED.get(args.name, (None, 1024, 50))
    guidance = args.guidance if args.guidance is not None else guidance
    start = time.perf_counter()
    ems = compute_statistics(args.name, guidance, args.k or k, args.n_lambdas or n, args.seed, progress=True)
    path = ems.save(args.out or statistics_path(args.name, guidance))
    print(f"{ems} in {time.perf_counter() - start:.0f} s -> {path}")


if __name__ == "__main__":
    main()
