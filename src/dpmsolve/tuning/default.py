"""The model-free default plan: steps and solver settings chosen from the noise schedule alone.

``default_plan(schedule, nfe, guidance)`` chooses the solver family and the step grid by scoring them on a
synthetic stand-in for the data whose exact denoiser and exact ODE solution are known, under the user's own
schedule and guidance scale, so it costs no model evaluation (a second or two on a CPU, cached per schedule,
NFE, guidance and endpoint). Like DMN's model-free step optimisation (Xue et al. 2024) it only assumes data of
unit scale; unlike a surrogate of the truncation error it also sees a posterior mean that switches between
modes at mid noise, narrow structure that needs steps at low noise, and the stiffer trajectories of
classifier-free guidance (the stand-in is guided at the same scale).

The rule: every solver family of :data:`~dpmsolve.tuning.search.FAMILIES` on the standard grids (logSNR, time
uniform / quadratic / power 1.5, Karras), the best on the stand-in wins; under guidance only data-prediction
families of order <= 2 (DPM-Solver++ 2M / 2S, UniPC-2, DDIM), the regime where DPM-Solver++ (Lu et al. 2022b)
showed noise prediction and higher orders to be unstable. The times are not optimised further: a grid
optimised for the stand-in fits the stand-in (on the shipped digits network such grids were 1.5-3x worse than
the standard grid of the same solver, and a noise-prediction plan 30x worse), while the choice among standard
configurations carries over.

The stand-in (fixed, seeded): 16-dimensional data, a mixture of 32 Gaussian components in 4 classes, means of
standard deviation 0.5 per coordinate (data scaled to about [-1, 1]) and component widths log-uniform in
[0.02, 0.5]. It was chosen before measuring and is not fitted to the lab's problems.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch

from ..model import ClassifierFreeGuidance, Denoiser
from ..schedules import Schedule
from .plan import Plan, PlanError

__all__ = ["default_plan", "proxy_problem", "guidance_of"]

PROXY_DIM, PROXY_COMPONENTS, PROXY_CLASSES, PROXY_SAMPLES = 16, 32, 4, 160
VERSION = 2     # bump with any change of what the default computes (the cache key)


def proxy_problem():
    """The fixed synthetic data of the default plan (a labelled Gaussian mixture, see the module docstring)."""
    from ..lab.problems import GaussianMixture

    g = np.random.default_rng(20240611)
    means = 0.5 * g.normal(size=(PROXY_COMPONENTS, PROXY_DIM))
    widths = np.exp(g.uniform(np.log(0.02), np.log(0.5), size=(PROXY_COMPONENTS, 1))) * np.ones((1, PROXY_DIM))
    labels = np.arange(PROXY_COMPONENTS) % PROXY_CLASSES
    return GaussianMixture(means, widths**2, None, labels)


def guidance_of(denoiser: Denoiser) -> float | None:
    """The classifier-free guidance scale of a denoiser's outermost guidance wrapper (None: unguided)."""
    inner = denoiser
    while inner is not None:
        if isinstance(inner, ClassifierFreeGuidance):
            return inner.scale
        inner = getattr(inner, "inner", None)
    return None


def default_plan(schedule: Schedule, nfe: int, guidance: float | None = None, endpoint: str = "t_min") -> Plan:
    """The model-free plan for ``nfe`` evaluations on ``schedule`` (``guidance``: the CFG scale, None or 1 for
    unguided), ending at the schedule's t_min (``endpoint="t_min"``) or at sigma = 0 (``"zero"``)."""
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"steps must be an integer >= 1, got {nfe!r}.")
    if endpoint not in ("t_min", "zero"):
        raise ValueError(f"endpoint must be 't_min' or 'zero', got {endpoint!r}.")
    guidance = None if guidance is None or float(guidance) == 1.0 else float(guidance)
    return _cached(schedule, int(nfe), guidance, endpoint)


@lru_cache(maxsize=64)
def _cached(schedule: Schedule, nfe: int, guidance: float | None, endpoint: str) -> Plan:
    from ..lab.reference import cache_dir

    key = json.dumps([VERSION, schedule.fingerprint(), nfe, guidance, endpoint])
    path = cache_dir() / "plans" / f"default-{hashlib.sha256(key.encode()).hexdigest()[:20]}.plan.json"
    if path.is_file():
        try:
            return Plan.load(path, schedule)
        except PlanError:
            pass                                   # damaged or stale: compute it again
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # batches of 160 x 16: threads only add contention (10x slower on a busy CPU)
    try:
        plan = _compute(schedule, nfe, guidance, endpoint)
    finally:
        torch.set_num_threads(threads)
    try:
        plan.save(path)
    except OSError:
        pass                                       # a read-only cache only costs the recomputation
    return plan


def _compute(schedule: Schedule, nfe: int, guidance: float | None, endpoint: str) -> Plan:
    from ..lab.reference import reference_between
    from .plan import PlanStep
    from .search import FAMILIES, tune

    if nfe == 1:   # one evaluation: the jump to its x0 prediction, or one DDIM step
        ts = (schedule.t_max, 0.0 if endpoint == "zero" else schedule.t_min)
        return Plan(ts, (PlanStep("data", 1, "taylor"),), schedule=schedule.fingerprint(), info={"default": True})
    problem = proxy_problem()
    labels = torch.arange(PROXY_SAMPLES) % PROXY_CLASSES
    x_T = torch.randn((PROXY_SAMPLES, PROXY_DIM), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = problem.denoiser(schedule)
    if guidance is None:
        denoiser, x0_fn = base, problem.posterior_mean
    else:
        uncond = torch.full_like(labels, -1)
        denoiser = ClassifierFreeGuidance(base, guidance, cond={"y": labels}, uncond={"y": uncond})

        def x0_fn(y, rho):
            u = problem.posterior_mean(y, rho, uncond)
            return u + guidance * (problem.posterior_mean(y, rho, labels) - u)

    t_end = None if endpoint == "zero" else schedule.t_min
    reference = reference_between(x0_fn, schedule, x_T, schedule.t_max, t_end, rtol=1e-8, atol=1e-10)
    families = FAMILIES if guidance is None else [f for f in FAMILIES if f[1] == "data" and f[2] <= 2]
    plan = tune(denoiser, x_T, nfe, reference=reference, held_out=0.0, endpoint=endpoint, model="",
                families=families, moves=(), per_step=False, progress=False)
    info = {"default": True, "guidance": guidance, "proxy": f"mixture v{VERSION}", "candidate": plan.info["candidate"]}
    return Plan(plan.ts, plan.steps, plan.denoise_to_zero, schedule.fingerprint(), None, "", info)
