"""Tuned sampling plans of the shipped zoo models, and the command that makes them.

```python
from dpmsolve import zoo
m = zoo.load("digits")
plan = zoo.plan("digits", 8)                       # tuned for digits under guidance 3, 8 evaluations
dp.sample(zoo.guided(m, labels, 3.0), x, plan)
```

A plan belongs to one model, one guidance scale and one NFE. The shipped ones were tuned by
``python -m dpmsolve.zoo.plans NAME`` (:func:`dpmsolve.tune` on ``SAMPLES`` seeded start noises, a quarter held
out, to sigma = 0, labels ``arange(K) % num_classes`` for class-conditional models, all NFEs in one call, with the
model's shipped DPM-Solver-v3 statistics); the file records the network's hash and loading refuses a plan of other
weights or another guidance scale. A plan with v3 steps comes with the statistics attached.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..tuning import Plan, PlanError, model_identity, tune
from . import MODELS, WEIGHTS_DIR, guided, load, statistics
from .ems import statistics_path

__all__ = ["SHIPPED_NFES", "GUIDANCE", "SAMPLES", "plan", "plan_path", "tune_model"]

SHIPPED_NFES = (5, 6, 8, 10)
GUIDANCE = {"digits": 3.0, "digits-flow": 3.0, "patches": None}       # the scale each model's plans are for
SAMPLES = {"digits": 128, "digits-flow": 128, "patches": 128}        # tuning noises (a quarter held out)
NOISE_SEED = 12345                                                    # not the lab's seeds


def plan_path(name: str, nfe: int, guidance: float | None = None) -> Path:
    suffix = "" if guidance is None else f"-cfg{guidance:g}"
    return WEIGHTS_DIR / f"{name}{suffix}-nfe{int(nfe)}.plan.json"


def _denoiser_for(model, guidance: float | None, n: int):
    if model.num_classes:
        return guided(model, torch.arange(n) % model.num_classes, 3.0 if guidance is None else guidance)
    if guidance is not None:
        raise PlanError(f"Zoo model {model.name!r} is unconditional: guidance must be None.")
    return model.denoiser


def plan(name: str, nfe: int, guidance: float | None = 3.0) -> Plan:
    """The shipped plan of zoo model ``name`` for ``nfe`` evaluations (``guidance``: the classifier-free scale
    of class-conditional models; None for unconditional ones), validated against the model; a plan with
    DPM-Solver-v3 steps comes with the model's shipped statistics attached."""
    if name not in MODELS:
        raise ValueError(f"Unknown zoo model {name!r}; valid names are: {', '.join(MODELS)}.")
    model = load(name)
    guidance = guidance if model.num_classes else None
    path = plan_path(name, nfe, guidance)
    if not path.is_file():
        shipped = ", ".join(str(k) for k in SHIPPED_NFES)
        raise PlanError(f"No shipped plan for {name!r} at {nfe} NFE and guidance {guidance}; shipped: NFE {shipped} "
                        f"at guidance {GUIDANCE[name]}. Tune one with `dpmsolve tune --model {name} --nfe {nfe}`.")
    found = Plan.load(path, model.schedule, model.shape, model_identity(_denoiser_for(model, guidance, 1)))
    return found.with_ems(statistics(name, guidance)) if found.uses_ems else found


def tune_model(name: str, nfes=SHIPPED_NFES, guidance: float | None = None, samples: int | None = None,
               seed: int = NOISE_SEED, progress: bool | None = None, **options) -> dict[int, Plan]:
    """Tune plans for zoo model ``name`` (default: its shipped guidance and number of tuning noises; with the
    DPM-Solver-v3 statistics shipped for that guidance, when there are, so the search also tries v3 steps)."""
    model = load(name)
    guidance = (GUIDANCE[name] if guidance is None else guidance) if model.num_classes else None
    n = SAMPLES[name] if samples is None else int(samples)
    noise = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(seed))
    if "ems" not in options and statistics_path(name, guidance).is_file():
        options["ems"] = statistics(name, guidance)
    return tune(_denoiser_for(model, guidance, n), noise, list(nfes), progress=progress, **options)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=MODELS)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(SHIPPED_NFES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder (default: the package's weights folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    plans = tune_model(args.name, args.nfe, progress=True)
    guidance = GUIDANCE[args.name]
    for k, p in plans.items():
        path = plan_path(args.name, k, guidance)
        path = Path(args.out) / path.name if args.out else path
        p.save(path)
        print(p.report(), f"\n-> {path}\n")
    print(f"{args.name}: {len(plans)} plans in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
