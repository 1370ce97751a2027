"""The shipped zoo models as lab problems: trained networks next to the analytic ones.

```python
from dpmsolve.lab.neural import zoo_problem
problem = zoo_problem("digits", n=16, seed=0, guidance=3.0)
problem.denoiser, problem.x_T, problem.schedule     # guided denoiser, float64 start noise, its schedule
x_ref = problem.reference("zero")                    # cached high-accuracy end point (sigma = 0)
```

A network has no closed-form ODE solution, so the reference is the lab's :func:`high_accuracy_reference`
(adaptive DPM-Solver-23 at ``rtol``, keeping the run at ``rtol / 10``). The default ``rtol = 1e-4`` is what a
float32 network can resolve: on ``digits`` the rtol 1e-4 and 1e-5 solutions, and a 400-step DPM-Solver++ 3M
solve, agree to ~2e-4 RMSE, the size of the network's own float32 round-off; tighter tolerances only cost more
evaluations (thousands). References are cached on disk under the lab's cache
(:func:`dpmsolve.lab.reference.cache_dir`, ``$DPMSOLVE_CACHE``), keyed by model name, a hash of the weight
file, seed, n, guidance, rtol, schedule and endpoint, so retrained weights get fresh references and a cache hit
returns the stored tensor bit for bit. Delete the cache folder to regenerate.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..zoo import weights_hash
from .evaluate import LabProblem

__all__ = ["ZOO_PROBLEMS", "weights_hash", "zoo_problem", "zoo_problems"]

# The problems `dpmsolve bench --zoo` adds by default: (model name, guidance scale or None).
ZOO_PROBLEMS = (("digits", 3.0), ("digits-flow", 3.0), ("patches", None))
REFERENCE_RTOL = 1e-4


def zoo_problem(name: str, n: int = 16, seed: int = 0, guidance: float | None = None,
                rtol: float | None = None) -> LabProblem:
    """A shipped zoo model as a :class:`~dpmsolve.lab.evaluate.LabProblem`: its denoiser (class-conditional
    models guided with classifier-free ``guidance``, labels ``arange(n) % num_classes``; default 3.0), ``n``
    float64 start noises from ``seed``, and ``problem.reference(endpoint)``, the cached high-accuracy end point
    (adaptive DPM-Solver-23 at ``rtol``, default :data:`REFERENCE_RTOL`).
    """
    from .. import zoo

    rtol = REFERENCE_RTOL if rtol is None else float(rtol)
    model = zoo.load(name)
    if model.num_classes:
        guidance = 3.0 if guidance is None else float(guidance)
        labels = torch.arange(n) % model.num_classes
        denoiser = zoo.guided(model, labels, guidance)
    else:
        if guidance is not None:
            raise ValueError(f"Zoo model {name!r} is unconditional: guidance must be None.")
        denoiser = model.denoiser
    x_T = torch.randn((n, *model.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    label = name if guidance is None else f"{name}-cfg{guidance:g}"
    key = f"zoo|{name}|{weights_hash(name)}|seed={seed}|n={n}|guidance={guidance}|rtol={rtol:g}"
    return LabProblem(label, denoiser, x_T, key, reference_rtol=rtol)


def zoo_problems(n: int = 16, seed: int = 0, names: Sequence[str] | None = None) -> list[LabProblem]:
    """The zoo problems of :data:`ZOO_PROBLEMS` (or only the models in ``names``), ``n`` start noises each."""
    known = dict(ZOO_PROBLEMS)
    names = list(known) if names is None else list(names)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"Unknown zoo problem(s) {unknown}; valid: {', '.join(known)}.")
    return [zoo_problem(name, n=n, seed=seed, guidance=known[name]) for name in names]
