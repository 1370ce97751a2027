"""The tuner: search a plan (time grid and per-step settings) for a model and a step budget.

``tune(denoiser, noise, nfe)`` computes high-accuracy reference solutions of the start noises once, splits
the noises into a tuning and a held-out part, and minimises the tuning objective over plans:

* **Objective**: the mean over tuning noises of ``log(e_i)``, ``e_i`` the per-sample RMS error against the
  reference (the log of the geometric mean error). It is scale free, rewards improving every sample by the same
  factor equally, and a sample that ends in another mode costs a bounded ``log(distance)`` instead of
  dominating the sum as it does in an RMSE (at 6-10 NFE a few such samples make 90% of a batch's RMSE).
* **Search**: (1) every solver family of :data:`FAMILIES` on the standard grids, (2) for the best families, a
  pattern search over the time grid that moves one time at a time inside the gap to its neighbours (in
  lambda; the last evaluated time before a jump to sigma = 0 is free too), with a prefix cache (a move of time
  k leaves the evaluations before k unchanged, so they are reused), (3) per step, the order, the prediction,
  the corrector and the compensation of the best plan, then (4) the grid once more, and (5) the solver coefficients
  themselves: multipliers of every step's (and corrector's) update coefficients fitted by gradient descent through
  the model (as S4S fits solver coefficients: Frankel et al. 2025), kept only when they also lower the objective on
  a quarter of the tuning noises that the fit does not see. Deterministic: no randomness anywhere but the splits,
  which ``seed`` fixes.
* **Held out**: a part of the noises that the search never sees measures the chosen plan (``plan.info``,
  ``plan.report()``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .._checks import check_count, check_mapping, check_tensor
from ..grids import make_grid
from ..ems.statistics import EMSError
from ..model import ClassifierFreeGuidance, Denoiser, Prediction
from ..schedules import Schedule
from .plan import Plan, PlanError, PlanStep

__all__ = ["tune", "FAMILIES", "plan_errors"]

# Solver families the search starts from: (label, predict, order, rule, corrector, method).
FAMILIES = (
    ("DPM-Solver++ 2M", "data", 2, "dpmsolver", None, "multistep"),
    ("DPM-Solver++ 3M", "data", 3, "taylor", None, "multistep"),
    ("DPM-Solver 2M (noise)", "noise", 2, "dpmsolver", None, "multistep"),
    ("DPM-Solver 3M (noise)", "noise", 3, "taylor", None, "multistep"),
    ("UniPC-2 bh2", "data", 2, "bh2", "unic-bh2", "multistep"),
    ("UniPC-3 bh1", "data", 3, "bh1", "unic-bh1", "multistep"),
    ("DPM-Solver++ 2S", "data", 2, "dpmsolver", None, "singlestep"),
    ("DPM-Solver++ 3S", "data", 3, "dpmsolver", None, "singlestep"),
    ("DPM-Solver 3S (noise)", "noise", 3, "dpmsolver", None, "singlestep"),
    ("DDIM", "data", 1, "taylor", None, "multistep"),
)
# With the model's EMS (``tune(ems=...)``): DPM-Solver-v3 as the reference recommends it, guided and unguided.
EMS_FAMILIES = (
    ("DPM-Solver-v3 2", "ems", 2, "taylor", "v3", "multistep"),
    ("DPM-Solver-v3 3 (pseudo)", "ems", 3, "pseudo", "v3", "multistep"),
)
START_GRIDS = (("logSNR", {}), ("time_uniform", {}), ("time_quadratic", {}), ("time_power", {"power": 1.5}),
               ("karras", {}))
MOVES = (0.5, 0.25, 0.12, 0.06)        # a time moves by this fraction of the gap to its neighbour


def _family_steps(n: int, predict: str, order: int, rule: str, corrector: str | None, method: str
                  ) -> tuple[PlanStep, ...]:
    return tuple(PlanStep(predict, order, rule, corrector if i < n - 1 else None, method=method) for i in range(n))


# ------------------------------------------------------------------------------------------------ running plans
class _Runner:
    """Runs plans on a fixed batch of start noises against its references, caching evaluations by prefix."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, ref: torch.Tensor, cache_size: int = 256,
                 shard: _Shard | None = None, ems=None):
        self.denoiser, self.x, self.ref, self.ems = denoiser, x, ref.to(torch.float64), ems
        self.shard = shard or _Shard()
        self.work = torch.promote_types(x.dtype, torch.float32)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.evaluations = 0      # batched model calls made (cache hits excluded)
        self.runs = 0

    def run(self, plan: Plan) -> torch.Tensor:
        solver = plan.solver(self.ems)
        ts = np.asarray(plan.ts)
        state = solver.init(self.denoiser.schedule, ts, self.x.to(self.work))
        specs = solver._stages(len(plan.steps))   # the evaluation at j depends on times, settings, stages before j
        j = 0
        with torch.no_grad():
            while not solver.done(state):
                x_eval, t = solver.ask(state)
                key = (tuple(ts[: j + 1]), plan.steps[:j], tuple(specs[:j]))
                pred = self.cache.get(key)
                if pred is None:
                    pred = self.denoiser(x_eval, t)
                    pred = Prediction(pred.x0.to(self.work), pred.eps.to(self.work))
                    self.evaluations += 1
                    self.cache[key] = pred
                    if len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
                else:
                    self.cache.move_to_end(key)
                state = solver.tell(state, pred)
                j += 1
            x_out, t_out = solver.current(state)
            if plan.denoise_to_zero:
                x_out = self.denoiser(x_out, t_out).x0.to(self.work)
                self.evaluations += 1
        self.runs += 1
        return x_out

    def errors(self, plan: Plan) -> torch.Tensor:
        """Per-sample errors of every noise of the shard's group (gathered in rank order); all inf for a plan whose
        EMS steps fall outside the statistics' log-SNR range."""
        try:
            x = self.run(plan)
        except EMSError:
            return self.shard.gather(torch.full((self.x.shape[0],), math.inf, dtype=torch.float64))
        return self.shard.gather(plan_errors(x, self.ref))


def plan_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS error over all non-batch coordinates (float64, shape (N,)); NaN/Inf samples give inf."""
    e = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1).pow(2).mean(1).sqrt()
    return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))


class _Shard:
    """This process's share of the noises under ``torch.distributed`` (``group``; None: one process has all).

    Every index list the tuner evaluates is split into contiguous chunks in rank order, and per-sample results are
    gathered back in that order, so every rank sees the single-process vectors and takes the same decisions."""

    def __init__(self, group=None):
        self.group, self.rank, self.world = group, 0, 1
        if group is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("group= was given but torch.distributed is not initialised; launch with torchrun and "
                                 "call torch.distributed.init_process_group() first, or pass group=None.")
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def part(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.numel()
        return idx[n * self.rank // self.world: n * (self.rank + 1) // self.world]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The concatenation over ranks (in rank order) of each rank's ``t`` (first dimensions may differ)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else "cpu"
        sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor(t.shape[0], device=device), group=self.group)
        longest = int(max(sizes))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: t.shape[0]] = t
        chunks = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(chunks, padded, group=self.group)
        return torch.cat([c[: int(k)] for c, k in zip(chunks, sizes)]).to(t.device)

    def sum_gradients(self, tensors) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for tensor in tensors:
                dist.all_reduce(tensor.grad, group=self.group)


def _objective(errors: torch.Tensor, floor: float) -> float:
    if not torch.isfinite(errors).all():
        return math.inf
    return float(torch.log(errors + floor).mean())


def _summary(errors: torch.Tensor, threshold: float) -> dict[str, float]:
    finite = torch.isfinite(errors).all()
    return {"n": int(errors.numel()), "median": float(errors.median()),
            "rmse": float(errors.pow(2).mean().sqrt()) if finite else math.inf,
            "far": float((errors > threshold).double().mean())}


# ----------------------------------------------------------------------------------------------------- grids
class _Grid:
    """Free times of a plan in lambda: ``lams[1:]`` move, ``lams[0]`` (t_start) is fixed; with ``to_zero`` the
    grid's last time is 0 (sigma = 0) and ``lams[-1]`` (the last evaluated time) may move up to lambda(t_min);
    otherwise ``lams[-1]`` is fixed at lambda(t_end)."""

    def __init__(self, schedule: Schedule, to_zero: bool, t_start: float, t_end: float):
        self.schedule, self.to_zero = schedule, to_zero
        self.lam_start, self.lam_end = float(schedule.log_snr(t_start)), float(schedule.log_snr(t_end))
        self.t_start, self.t_end = t_start, t_end

    def lams_of(self, ts) -> np.ndarray:
        ts = np.asarray(ts, dtype=np.float64)
        return np.asarray(self.schedule.log_snr(ts[:-1] if self.to_zero else ts), dtype=np.float64)

    def times(self, lams: np.ndarray) -> tuple[float, ...]:
        ts = np.asarray(self.schedule.t_from_log_snr(lams), dtype=np.float64)
        ts[0] = self.t_start
        if not self.to_zero:
            ts[-1] = self.t_end
        ts = np.clip(ts, self.schedule.t_min, self.schedule.t_max)
        return tuple(float(t) for t in (np.append(ts, 0.0) if self.to_zero else ts))

    def movable(self, n_points: int) -> range:
        return range(1, n_points if self.to_zero else n_points - 1)

    def moved(self, lams: np.ndarray, k: int, fraction: float) -> np.ndarray | None:
        """lams with point k moved by ``fraction`` of the gap to its right (> 0) or left (< 0) neighbour."""
        right = lams[k + 1] if k + 1 < lams.size else self.lam_end
        gap = (right - lams[k]) if fraction > 0 else (lams[k] - lams[k - 1])
        if gap <= 1e-9:
            return None
        out = lams.copy()
        out[k] = lams[k] + fraction * gap
        if not (out[k - 1] < out[k] and (k + 1 >= out.size or out[k] < out[k + 1]) and out[k] <= self.lam_end):
            return None
        return out


@dataclass
class _Best:
    plan: Plan
    value: float
    label: str


def _pattern_search(runner: _Runner, grid: _Grid, plan: Plan, value: float, floor: float, budget: int,
                    moves=MOVES) -> tuple[Plan, float]:
    """Move one time at a time (fractions of the gap to a neighbour, largest first), keeping improvements."""
    lams = grid.lams_of(plan.ts)
    for fraction in moves:
        improved = True
        while improved and runner.evaluations < budget:
            improved = False
            for k in reversed(grid.movable(lams.size)):
                for sign in (1.0, -1.0):
                    if runner.evaluations >= budget:
                        break
                    trial = grid.moved(lams, k, sign * fraction)
                    if trial is None:
                        continue
                    candidate = plan.with_times(grid.times(trial))
                    v = _objective(runner.errors(candidate), floor)
                    if v < value - 1e-4:
                        plan, value, lams, improved = candidate, v, trial, True
                        break
    return plan, value


def _step_search(runner: _Runner, plan: Plan, value: float, floor: float, budget: int) -> tuple[Plan, float]:
    """Per step, other orders, the other predictions (the EMS one when the runner has statistics), corrector on/off
    and a compensation of -/+0.25 (kept where the objective drops)."""
    with_ems = runner.ems is not None
    steps = list(plan.steps)
    last = len(steps) - 1
    for i in range(len(steps)):
        if plan.ts[-1] == 0.0 and i == last:
            break                             # the jump to sigma = 0 has no settings that matter
        s = steps[i]
        if s.method == "singlestep":
            continue                          # a block's steps change together (its order is its length)
        options = [PlanStep(s.predict, p, s.rule, s.corrector) for p in (1, 2, 3) if p != s.order]
        ems_rule = s.rule if s.rule in ("taylor", "pseudo") else "taylor"
        options += [PlanStep(p, s.order, ems_rule if p == "ems" else ("bh2" if s.predict == "ems" else s.rule))
                    for p in ("data", "noise") + ("ems",) * with_ems if p != s.predict]
        if i < last and (i + 1 > last or steps[i + 1].predict == s.predict):
            unic = "unic-bh2" if s.rule != "bh1" else "unic-bh1"
            other = None if s.corrector else ("v3" if s.predict == "ems" else unic)
            options.append(PlanStep(s.predict, s.order, s.rule, other))
        if s.order >= 2 and s.rule == "taylor" and s.predict != "ems":
            options += [PlanStep(s.predict, s.order, s.rule, s.corrector, c) for c in (-0.25, 0.25)]
        for option in options:
            if runner.evaluations >= budget:
                return plan, value
            try:
                candidate = Plan(plan.ts, tuple(steps[:i] + [option] + steps[i + 1:]), plan.denoise_to_zero)
            except PlanError:
                continue
            v = _objective(runner.errors(candidate), floor)
            if v < value - 1e-4:
                plan, value, steps = candidate, v, list(candidate.steps)
    return plan, value


# ------------------------------------------------------------------------------------------ fitted coefficients
def _scalable(plan: Plan, i: int) -> bool:
    """Whether step i's coefficients may be scaled: every step but the jump to sigma = 0."""
    return not (plan.ts[-1] == 0.0 and i == len(plan.steps) - 1)


def _scaled_run(plan: Plan, denoiser: Denoiser, x: torch.Tensor, thetas: dict, ems=None) -> torch.Tensor:
    """The plan's sample with step coefficients multiplied by ``1 + theta`` (differentiable in the thetas):
    ``thetas[(i, "scale")]`` scales stage i's update, ``thetas[(i, "corrector_scale")]`` step i's corrector (which
    the engine applies at stage i + 1)."""
    solver = plan.solver(ems)
    state = solver.init(denoiser.schedule, np.asarray(plan.ts), x)
    stages = list(state.stages)
    for (i, kind), theta in thetas.items():
        j = i if kind == "scale" else i + 1
        target = stages[j] if kind == "scale" else stages[j].corrector
        f = 1.0 + theta
        target = target._replace(a=target.a * f[0], coeffs=tuple(c * f[q + 1] for q, c in enumerate(target.coeffs)))
        stages[j] = target if kind == "scale" else stages[j]._replace(corrector=target)
    state = dataclasses.replace(state, stages=tuple(stages))
    while not solver.done(state):
        x_eval, t = solver.ask(state)
        pred = denoiser(x_eval, t)
        if x_eval.requires_grad and not pred.x0.requires_grad:
            raise _NotDifferentiable
        state = solver.tell(state, pred)
    x_out, t_out = solver.current(state)
    return denoiser(x_out, t_out).x0 if plan.denoise_to_zero else x_out


class _NotDifferentiable(Exception):
    """The model's prediction does not depend differentiably on its input (detached, or computed without grad)."""


def _with_scales(plan: Plan, thetas: dict) -> Plan:
    steps = list(plan.steps)
    for (i, kind), theta in thetas.items():
        values = tuple(round(1.0 + float(v), 6) for v in theta.detach())
        steps[i] = dataclasses.replace(steps[i], **{kind: values})
    return dataclasses.replace(plan, steps=tuple(steps))


def fit_scales(plan: Plan, denoiser: Denoiser, x: torch.Tensor, ref: torch.Tensor, floor: float,
               x_check: torch.Tensor, ref_check: torch.Tensor, denoiser_check: Denoiser, iterations: int = 40,
               lr: float = 0.02, shard: _Shard | None = None, ems=None) -> tuple[Plan, dict]:
    """Fit multipliers of the plan's update coefficients (Adam on the mean log per-sample error, through the
    model; the best iterate), kept only if the check noises' objective drops too. Returns (plan, what happened)."""
    base = dataclasses.replace(plan, steps=tuple(dataclasses.replace(s, scale=(), corrector_scale=())
                                                  for s in plan.steps))
    _, stages = base.solver(ems).plan(denoiser.schedule, np.asarray(base.ts))
    thetas = {}
    for i in range(len(base.steps)):
        if _scalable(base, i):
            thetas[(i, "scale")] = torch.zeros(len(stages[i].points) + 1, dtype=torch.float64, requires_grad=True)
            if base.steps[i].corrector is not None:
                n = len(stages[i + 1].corrector.points) + 1
                thetas[(i, "corrector_scale")] = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    shard = shard or _Shard()
    check = _Runner(denoiser_check, x_check, ref_check, shard=shard, ems=ems)
    n_fit = int(shard.gather(torch.tensor([x.shape[0]])).sum())
    before = _objective(check.errors(base), floor)
    info = {"parameters": sum(t.numel() for t in thetas.values()), "iterations": 0, "check_before": before,
            "evaluations": 0, "backward_passes": 0}
    if not thetas or iterations <= 0:
        return base, {**info, "evaluations": check.evaluations, "kept": False, "why": "nothing to fit"}
    work = torch.promote_types(x.dtype, torch.float32)
    x, ref = x.to(work), ref.to(torch.float64)
    optimiser = torch.optim.Adam(list(thetas.values()), lr=lr)
    best = (math.inf, [t.detach().clone() for t in thetas.values()])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations)
    for _ in range(iterations):
        optimiser.zero_grad()
        with torch.enable_grad():
            try:
                out = _scaled_run(base, denoiser, x, thetas, ems)
            except _NotDifferentiable:
                info["evaluations"] += check.evaluations + 2
                return base, {**info, "kept": False, "why": "the model's output is not differentiable in its input"}
            info["evaluations"] += base.nfe
            loss = torch.log(plan_errors(out, ref) + floor).sum() / n_fit     # this rank's part of the mean
            total = float(shard.gather(loss.detach().reshape(1)).sum())
            if not math.isfinite(total):
                break
            if total < best[0]:              # the best iterate, not the last: a diverging fit keeps its best point
                best = (total, [t.detach().clone() for t in thetas.values()])
            loss.backward()
        shard.sum_gradients(thetas.values())
        info["backward_passes"] += 1
        info["iterations"] += 1
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        for theta, value in zip(thetas.values(), best[1]):
            theta.copy_(value)
    fitted = _with_scales(base, thetas)
    after = _objective(check.errors(fitted), floor)
    info.update(check_after=after, evaluations=info["evaluations"] + check.evaluations)
    kept = after < before - 1e-3
    return (fitted if kept else base), {**info, "kept": kept, "why": "" if kept else "no gain on the check noises"}


# ------------------------------------------------------------------------------------------------- interface
def _subset(value, idx: torch.Tensor, n: int):
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return value[idx]
    return value


def _bind(denoiser, model_kwargs: Mapping[str, Any], idx: torch.Tensor, n: int) -> Denoiser:
    """A denoiser for the samples ``idx``: a factory is called with their conditions; a plain denoiser gets
    them as model keyword arguments."""
    kwargs = {k: _subset(v, idx, n) for k, v in model_kwargs.items()}
    if not isinstance(denoiser, Denoiser):
        return denoiser(kwargs)
    denoiser = _restricted(denoiser, idx, n)
    return _Bound(denoiser, kwargs) if kwargs else denoiser


def _restricted(denoiser: Denoiser, idx: torch.Tensor, n: int) -> Denoiser:
    """The denoiser for the samples ``idx`` of a batch of n: per-sample conditioning held by wrappers
    (classifier-free guidance's cond / uncond tensors with n rows) is sliced along with the noise."""
    inner = getattr(denoiser, "inner", None)
    if not isinstance(inner, Denoiser):
        return denoiser
    out = copy.copy(denoiser)
    out.inner = _restricted(inner, idx, n)
    if isinstance(denoiser, ClassifierFreeGuidance):
        cond = {k: _subset(v, idx, n) for k, v in denoiser.cond.items()}
        uncond = {k: _subset(v, idx, n) for k, v in denoiser.uncond.items()}
        out = ClassifierFreeGuidance(out.inner, denoiser.scale, cond, uncond, denoiser.interval)
    return out


class _Bound(Denoiser):
    def __init__(self, inner: Denoiser, kwargs: dict):
        self.inner, self.kwargs, self.schedule = inner, kwargs, inner.schedule

    def __call__(self, x, t, **model_kwargs):
        return self.inner(x, t, **{**self.kwargs, **model_kwargs})


def _reference(denoiser: Denoiser, x: torch.Tensor, to_zero: bool, steps: int, rtol: float | None
               ) -> tuple[torch.Tensor, int]:
    """High-accuracy end points: DPM-Solver++ 3M (Taylor) with ``steps`` uniform-lambda steps, or adaptive
    DPM-Solver-23 at ``rtol`` when given."""
    from ..sampling import sample

    if rtol is not None:
        out = sample(denoiser, x, "dpmsolver++", method="adaptive", order=3, rtol=rtol, atol=rtol / 10,
                     denoise_to_zero=to_zero, progress=False)
    else:
        out = sample(denoiser, x, "dpmsolver++", order=3, solver_type="taylor", steps=steps, grid="logSNR",
                     t_end=0.0 if to_zero else None, progress=False)
    return out.x.to(torch.float64), out.nfe


def model_identity(denoiser) -> str:
    """An identifier of the network under a denoiser: the SHA-256 (16 hex digits) of its parameters, with the
    guidance scale of classifier-free guidance; empty when there is no torch network to hash."""
    import hashlib

    guidance, inner = None, denoiser
    while inner is not None and not hasattr(inner, "net"):
        if isinstance(inner, ClassifierFreeGuidance):
            guidance = inner.scale
        inner = getattr(inner, "inner", None)
    net = getattr(inner, "net", None)
    if not isinstance(net, torch.nn.Module):
        return ""
    h = hashlib.sha256()
    for name, p in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return f"net@{h.hexdigest()[:16]}" + ("" if guidance is None else f"|cfg={guidance:g}")


def tune(denoiser: Denoiser | Callable[[dict], Denoiser], noise: torch.Tensor, nfe: int | Sequence[int], *,
         model_kwargs: Mapping[str, Any] | None = None, held_out: float = 0.25, endpoint: str = "zero",
         reference: torch.Tensor | None = None, reference_steps: int = 200, reference_rtol: float | None = None,
         families: Sequence = FAMILIES,
         budget: int | None = None, budget_per_nfe: int = 150, moves: Sequence[float] = MOVES,
         per_step: bool = True, fit_iterations: int = 40, seed: int = 0, schedule: Schedule | None = None,
         model: str | None = None, ems=None, group=None, progress: bool | None = None) -> Plan | dict[int, Plan]:
    """Search a plan (time grid and per-step solver settings) for ``denoiser`` at ``nfe`` model evaluations.

    Args:
        denoiser: a dpmsolve denoiser with its guidance in place, or a function ``model_kwargs_of_a_subset ->
            Denoiser`` (e.g. building classifier-free guidance for a batch of labels; then pass ``schedule``).
        noise: start noises ``(K, ...)`` at the schedule's t_max (64-256 is typical; more is slower and steadier).
        nfe: the step budget, or several (one plan each, sharing the references): returns a dict by NFE then.
        model_kwargs: per-sample conditioning (tensors with K rows are sliced along with the noise).
        held_out: the share of the noises the search never sees; the plan's report measures it on them.
        endpoint: ``"zero"`` (the sample at sigma = 0: the plan ends with the jump to the x0 prediction) or
            ``"t_min"`` (the sample at the schedule's t_min).
        reference: the exact end points of ``noise`` if known (analytic models); default: DPM-Solver++ 3M with
            ``reference_steps`` uniform-lambda steps (200: on the shipped networks within ~2e-4 RMS of adaptive
            solves at rtol 1e-4, the float32 limit, for a tenth of their evaluations), or adaptive DPM-Solver-23
            at ``reference_rtol`` when that is given.
        families: solver families to start from (see :data:`FAMILIES`).
        budget: batched model calls the search may spend per NFE (default ``budget_per_nfe * nfe``), references
            apart.
        moves: the fractions of the gap to a neighbour by which the grid search moves a time (largest first).
        per_step: also search the per-step settings (order, prediction, corrector, compensation).
        fit_iterations: Adam iterations of the coefficient fit (each runs the plan on three quarters of the tuning
            noises with gradients through the model: about 3 evaluations' cost per model call); 0: no fit.
        seed: fixes the tuning / held-out split and the fit's check quarter (the search has no randomness).
        model: the model identifier stored in the plan (default: a hash of the network's parameters).
        ems: the model's empirical statistics (:func:`dpmsolve.ems.compute`, ``EMS.load`` or a file path): the
            search then also tries DPM-Solver-v3 (:data:`EMS_FAMILIES`) and, per step, the EMS prediction with the v3
            corrector; a plan with such steps carries them (``plan.ems``, not saved: ``Plan.load(path, ems=...)``).
        group: a ``torch.distributed`` process group (under ``torchrun``: ``torch.distributed.group.WORLD``): every
            rank passes the same arguments and evaluates its contiguous share of each set of noises (references
            included); per-sample errors are gathered and the fit's gradients summed, so every rank returns the
            single-process plan (to round-off). Model evaluations are counted per rank.
    """
    started = time.perf_counter()
    if endpoint not in ("zero", "t_min"):
        raise ValueError(f"endpoint must be 'zero' (sigma = 0) or 't_min', got {endpoint!r}.")
    single = isinstance(nfe, numbers.Real)
    if not single and (isinstance(nfe, (str, bytes)) or not hasattr(nfe, "__iter__")):
        raise TypeError(f"nfe must be an integer >= 2 or a list of them, got {nfe!r} ({type(nfe).__name__}); pass "
                        "e.g. nfe=6 or nfe=[4, 6, 8].")
    nfes = [nfe] if single else list(nfe)
    if not nfes:
        raise ValueError("nfe is an empty list; pass an integer >= 2 or a list of them, e.g. nfe=[4, 6, 8].")
    for k in nfes:
        check_count("nfe", k, minimum=2)
    check_tensor("noise", noise, floating=False)
    if noise.dim() < 2 or noise.shape[0] < 8:
        raise ValueError(f"noise must be a batch of at least 8 start noises, shape (K, ...); got shape "
                         f"{tuple(noise.shape)}, i.e. {noise.shape[0] if noise.dim() else 0} noise(s). Pass more, "
                         "e.g. torch.randn(64, *data_shape).")
    check_count("fit_iterations", fit_iterations, minimum=0)
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held_out must be a share in [0, 1), got {held_out!r}.")
    model_kwargs = check_mapping("model_kwargs", model_kwargs)
    if isinstance(denoiser, Denoiser):
        schedule = denoiser.schedule
    elif not callable(denoiser):
        raise TypeError(f"denoiser must be a dpmsolve Denoiser (dpmsolve.wrap_model(...)), or a function of a "
                        f"subset's model_kwargs returning one (then pass schedule= as well); got {denoiser!r} "
                        f"({type(denoiser).__name__}).")
    elif schedule is None:
        raise ValueError("denoiser is a function (of a subset's model_kwargs, returning a Denoiser): pass schedule= "
                         "as well, or pass a Denoiser made by dpmsolve.wrap_model.")
    if ems is not None:
        from ..solvers.v3 import DPMSolverV3

        ems = DPMSolverV3(ems).statistics         # loads a path, refuses anything else
        ems.check(schedule, tuple(noise.shape[1:]))
        families = tuple(families) + EMS_FAMILIES
    n = noise.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(held_out * n))
    idx_hold, idx_tune = perm[:n_hold].sort().values, perm[n_hold:].sort().values
    to_zero = endpoint == "zero"
    t_end = schedule.t_min
    ref_evals = 0
    shard = _Shard(group)
    full_refs = {}                                  # every noise's reference, on every rank (gathered)
    for name, idx in (("tune", idx_tune), ("held_out", idx_hold)):
        if idx.numel() == 0:
            continue
        if reference is None:
            local = shard.part(idx)
            ref, used = _reference(_bind(denoiser, model_kwargs, local, n), noise[local], to_zero, reference_steps,
                                   reference_rtol)
            full_refs[name] = shard.gather(ref)
            ref_evals += used
        else:
            full_refs[name] = reference[idx].to(torch.float64)

    def shared(name: str, idx: torch.Tensor, pos: torch.Tensor | None = None):
        """(denoiser, noise, reference) of this rank's share of ``idx[pos]`` (pos: positions in ``idx``)."""
        pos = shard.part(torch.arange(idx.numel()) if pos is None else pos)
        return _bind(denoiser, model_kwargs, idx[pos], n), noise[idx[pos]], full_refs[name][pos]

    parts = {name: shared(name, idx) for name, idx in (("tune", idx_tune), ("held_out", idx_hold)) if idx.numel()}
    den_t, ref_t = parts["tune"][0], full_refs["tune"]
    spread = float((ref_t - ref_t.mean(0)).pow(2).mean().sqrt())
    threshold, floor = 0.5 * spread, 1e-9 * spread + 1e-30
    identity = model if model is not None else model_identity(den_t)
    fields = dict(schedule=schedule.fingerprint(), data_shape=tuple(noise.shape[1:]), model=identity)
    grid = _Grid(schedule, to_zero, schedule.t_max, t_end)
    # The coefficient fit's own split of the tuning noises: it fits on three quarters, keeps what the rest confirms.
    order = torch.randperm(idx_tune.numel(), generator=torch.Generator().manual_seed(seed + 1))
    n_check = idx_tune.numel() // 4
    fit_parts = []
    for pos in (order[n_check:].sort().values, order[:n_check].sort().values):
        fit_parts += shared("tune", idx_tune, pos)
    plans = {}
    from tqdm.auto import tqdm

    quiet = shard.rank != 0 or progress is False
    bar = tqdm(total=len(nfes), desc="dpmsolve tune", unit="nfe", disable=True if quiet else (None if progress is None else False),
               leave=False)
    for k in sorted(set(int(k) for k in nfes)):
        t0 = time.perf_counter()
        runner = _Runner(*parts["tune"], shard=shard, ems=ems)
        limit = budget_per_nfe * k if budget is None else int(budget)
        seeds = []
        if plans:                                   # the plan tuned for the next smaller NFE, carried to k steps
            below = max(plans)
            carried = refined(plans[below], grid, k)
            seeds = [] if carried is None else [(f"the NFE {below} plan refined", carried)]
        plan, start_plan, info = _search(runner, grid, k, families, floor, limit, to_zero, tuple(moves),
                                         per_step, seeds)
        fit_evals = 0
        if fit_iterations > 0 and n_check >= 2:
            den_f, x_f, ref_f, den_c, x_c, ref_c = fit_parts
            plan, info["fit"] = fit_scales(plan, den_f, x_f, ref_f, floor, x_c, ref_c, den_c, int(fit_iterations),
                                           shard=shard, ems=ems)
            fit_evals = info["fit"]["evaluations"]
        plan_final = Plan(plan.ts, plan.steps, plan.denoise_to_zero, **fields)
        info.update(objective="mean log per-sample RMS error (tuning noises)", endpoint=endpoint,
                    far_threshold=threshold, seed=seed)
        checked = 0
        for name, (den, x, ref) in parts.items():
            check = _Runner(den, x, ref, shard=shard, ems=ems)
            summary = _summary(check.errors(plan_final), threshold)
            start = _summary(check.errors(start_plan), threshold)
            summary.update(start_median=start["median"], start_rmse=start["rmse"], start_far=start["far"])
            info[name] = summary
            checked += check.evaluations
        info["cost"] = {"search_evaluations": runner.evaluations, "reference_evaluations": ref_evals,
                        "check_evaluations": checked, "fit_evaluations": fit_evals, "batch": int(idx_tune.numel()),
                        "model_evaluations": runner.evaluations + ref_evals + checked + fit_evals,
                        "runs": runner.runs, "seconds": time.perf_counter() - t0,
                        "seconds_with_references": time.perf_counter() - started}
        plans[k] = Plan(plan.ts, plan.steps, plan.denoise_to_zero, info=info, **fields,
                        ems=ems if plan.uses_ems else None)
        bar.update(1)
    bar.close()
    return plans[int(nfes[0])] if single else {int(k): plans[int(k)] for k in nfes}


def standard_candidates(schedule: Schedule, n: int, families=FAMILIES, to_zero: bool = True):
    """(label, plan) of every solver family on every standard grid of ``n`` steps (grids that cannot be made,
    e.g. a time grid that would evaluate below t_min, are left out)."""
    for label, *settings in families:
        steps = _family_steps(n, *settings)
        for kind, options in START_GRIDS:
            try:
                ts = make_grid(schedule, n, kind, t_end=0.0 if to_zero else None, **options)
            except ValueError:
                continue
            yield f"{label}, {kind} grid", Plan(tuple(ts), steps)


def refined(plan: Plan, grid: _Grid, n: int) -> Plan | None:
    """A tuned plan carried to ``n`` steps: its lambda grid interpolated at the new number of points (keeping where
    it puts its times densely), each new step taking the settings of the step at the same place, fitted scales
    dropped. None for singlestep plans (their blocks do not stretch) and settings that make no valid plan."""
    if any(s.method == "singlestep" for s in plan.steps):
        return None
    lams = grid.lams_of(plan.ts)
    points = n if grid.to_zero else n + 1
    new = np.interp(np.linspace(0.0, lams.size - 1.0, points), np.arange(lams.size), lams)
    m = len(plan.steps)
    steps = [dataclasses.replace(plan.steps[int((j + 0.5) * m / n)], scale=(), corrector_scale=()) for j in range(n)]
    steps[-1] = dataclasses.replace(steps[-1], corrector=None)
    try:
        return Plan(grid.times(new), tuple(steps), plan.denoise_to_zero)
    except PlanError:
        return None


def _search(runner: _Runner, grid: _Grid, n: int, families, floor: float, budget: int, to_zero: bool,
            moves: tuple[float, ...], per_step: bool, seeds: Sequence[tuple[str, Plan]] = ()
            ) -> tuple[Plan, Plan, dict]:
    """(the tuned plan, the best standard configuration it started from, what the search did); ``seeds``: more
    (label, plan) starting points of n steps (the plans tuned for other NFEs, :func:`refined`)."""
    # (1) every family on the standard grids, and the seeds
    scored = []
    for label, plan in standard_candidates(runner.denoiser.schedule, n, families, to_zero):
        if scored and runner.evaluations >= budget:
            break
        scored.append(_Best(plan, _objective(runner.errors(plan), floor), label))
    scored.sort(key=lambda b: b.value)
    start = scored[0]
    seeded = [_Best(plan, _objective(runner.errors(plan), floor), label) for label, plan in seeds]
    scored = sorted(scored + seeded, key=lambda b: b.value)
    # (2) the grid of the best families (distinct families only), half of the budget shared among them
    finalists, seen = [], set()
    for b in scored:
        family = b.label.split(",")[0]
        if family not in seen:
            seen.add(family)
            finalists.append(b)
        if len(finalists) == 2:
            break
    spent = runner.evaluations
    share = max(0, (budget - spent) // 2) // len(finalists)
    tuned = []
    for b in finalists:
        plan, value = _pattern_search(runner, grid, b.plan, b.value, floor, runner.evaluations + share, moves)
        tuned.append(_Best(plan, value, b.label))
    best = min(tuned, key=lambda b: b.value)
    # (3) per-step settings, (4) the grid again
    plan, value = best.plan, best.value
    if per_step:
        plan, value = _step_search(runner, plan, value, floor, spent + (budget - spent) * 3 // 4)
    plan, value = _pattern_search(runner, grid, plan, value, floor, budget, moves[1:])
    info = {"candidate": f"from {best.label}", "tuning_objective": value, "start_label": start.label,
            "start_objective": start.value, "families": [(b.label, b.value) for b in scored[:8]],
            "seeds": [(b.label, b.value) for b in seeded],
            "start_plan": {"ts": list(start.plan.ts), "steps": [vars(s) for s in start.plan.steps]}}
    return plan, start.plan, info
