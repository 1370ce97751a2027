"""The model-free default plan: steps and solver settings chosen from the noise schedule alone.

``default_plan(schedule, nfe, guidance)`` chooses the solver family and the step grid by scoring them on a
synthetic stand-ins for the data whose exact denoiser and exact ODE solution are known, under the user's own
schedule and guidance scale, so it costs no model evaluation (a second or two on a CPU, cached per schedule,
NFE, guidance and endpoint). Like DMN's model-free step optimisation (Xue et al. 2024) it only assumes data of
unit scale; unlike a surrogate of the truncation error it also sees a posterior mean that switches between
modes at mid noise, narrow structure that needs steps at low noise, and the stiffer trajectories of
classifier-free guidance (the stand-ins are guided at the same scale).

The rule: every solver family of :data:`~dpmsolve.tuning.search.FAMILIES` on the standard grids (logSNR, time
uniform / quadratic / power 1.5, Karras), scored on two stand-ins (below); under guidance only data-prediction
families of order <= 2 (DPM-Solver++ 2M / 2S, UniPC-2, DDIM), the regime where DPM-Solver++ (Lu et al. 2022b)
showed noise prediction and higher orders to be unstable. The times are not optimised further: a grid
optimised for the stand-in fits the stand-in (on the shipped digits network such grids were 1.5-3x worse than
the standard grid of the same solver, and a noise-prediction plan 30x worse), while the choice among standard
configurations carries over.

The stand-ins (fixed, seeded; the first chosen before any measurement, the second added after the first alone
failed on the shipped patches network): 16-dimensional mixtures of 32
Gaussian components in 4 classes, ``"local"`` with means of standard deviation 0.5 per coordinate and component
widths log-uniform in [0.02, 0.5], ``"spectral"`` with coordinate scales from 8 down to 0.05 (the spread of
principal-component scales of high-dimensional images, whose coarse structure is decided at high noise).
Every candidate (solver family x standard grid) is scored on both, and the one with the smallest worst-case
regret (its log geometric-mean error minus the best candidate's, on each stand-in) is the default: a choice
that is near the best for data of either kind. Measured on the shipped networks: one stand-in alone chose
time-spaced grids that are 10x worse on the cosine-schedule ``patches`` model (a first step across 3.6 in
lambda), the two together choose logSNR there from 8 NFE on.
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

__all__ = ["default_plan", "proxy_problems", "guidance_of"]

PROXY_DIM, PROXY_COMPONENTS, PROXY_CLASSES, PROXY_SAMPLES = 16, 32, 4, 160
VERSION = 3     # bump with any change of what the default computes (the cache key)


def proxy_problems():
    """The two fixed synthetic data sets of the default plan (labelled Gaussian mixtures, module docstring):
    ``"local"`` (unit-scale means, all structure below noise level 0.5) and ``"spectral"`` (coordinate scales
    from 8 down to 0.05, as the principal components of high-dimensional images span: coarse structure is
    resolved at high noise)."""
    from ..lab.problems import GaussianMixture

    g = np.random.default_rng(20240611)
    labels = np.arange(PROXY_COMPONENTS) % PROXY_CLASSES
    means = 0.5 * g.normal(size=(PROXY_COMPONENTS, PROXY_DIM))
    widths = np.exp(g.uniform(np.log(0.02), np.log(0.5), size=(PROXY_COMPONENTS, 1))) * np.ones((1, PROXY_DIM))
    local = GaussianMixture(means, widths**2, None, labels)
    scale = np.geomspace(8.0, 0.05, PROXY_DIM)
    means = scale * g.normal(size=(PROXY_COMPONENTS, PROXY_DIM))
    widths = np.exp(g.uniform(np.log(0.05), np.log(0.5), size=(PROXY_COMPONENTS, 1))) * scale
    return {"local": local, "spectral": GaussianMixture(means, widths**2, None, labels)}


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
    from ..sampling import sample
    from .plan import PlanStep
    from .search import FAMILIES, _objective, plan_errors, standard_candidates

    if nfe == 1:   # one evaluation: the jump to its x0 prediction, or one DDIM step
        ts = (schedule.t_max, 0.0 if endpoint == "zero" else schedule.t_min)
        return Plan(ts, (PlanStep("data", 1, "taylor"),), schedule=schedule.fingerprint(), info={"default": True})
    families = FAMILIES if guidance is None else [f for f in FAMILIES if f[1] == "data" and f[2] <= 2]
    candidates = list(standard_candidates(schedule, nfe, families, endpoint == "zero"))
    labels = torch.arange(PROXY_SAMPLES) % PROXY_CLASSES
    x_T = torch.randn((PROXY_SAMPLES, PROXY_DIM), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_end = None if endpoint == "zero" else schedule.t_min
    regrets = np.zeros(len(candidates))
    for problem in proxy_problems().values():
        base = problem.denoiser(schedule)
        if guidance is None:
            denoiser, x0_fn = base, problem.posterior_mean
        else:
            uncond = torch.full_like(labels, -1)
            denoiser = ClassifierFreeGuidance(base, guidance, cond={"y": labels}, uncond={"y": uncond})

            def x0_fn(y, rho, problem=problem, uncond=uncond):
                u = problem.posterior_mean(y, rho, uncond)
                return u + guidance * (problem.posterior_mean(y, rho, labels) - u)

        reference = reference_between(x0_fn, schedule, x_T, schedule.t_max, t_end, rtol=1e-8, atol=1e-10)
        spread = float((reference - reference.mean(0)).pow(2).mean().sqrt())
        scores = np.array([_objective(plan_errors(sample(denoiser, x_T, plan, progress=False).x, reference),
                                      1e-9 * spread) for _, plan in candidates])
        regrets = np.maximum(regrets, scores - scores.min())
    best = int(np.argmin(regrets))
    label, plan = candidates[best]
    info = {"default": True, "guidance": guidance, "proxy": f"two mixtures v{VERSION}", "candidate": label,
            "regret": float(regrets[best])}
    return Plan(plan.ts, plan.steps, plan.denoise_to_zero, schedule.fingerprint(), None, "", info)
