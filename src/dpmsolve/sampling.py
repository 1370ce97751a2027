"""The sampling loop, written once: ``sample`` (noise -> data) and ``invert`` (data -> noise).

It owns what every solver needs around it: the progress bar, per-step callbacks, NFE accounting, saving
intermediates, the NaN/Inf guard, and the precision policy (the solver works in at least float32; the sample
keeps the caller's dtype).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ._checks import check_count, check_denoiser, check_mapping, check_tensor
from .grids import check_grid, make_grid
from .model import Denoiser, Prediction
from .schedules import DiscreteVP
from .solvers import DPMSolverMultistep, DPMSolverSinglestep, Solver, get_solver
from .tuning.plan import Plan

__all__ = ["sample", "invert", "Solution", "StepInfo", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """The model returned NaN or Inf; sampling stopped (pass ``check_finite=False`` to go on regardless)."""


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each completed step.

    ``x`` and ``x0`` are copies made for the callback (in the caller's dtype): the solver never reads them, so
    editing them in place changes neither the sample nor the intermediates kept in the Solution.

    Attributes:
        step: 1-based index of the completed step.
        t: the time the solution has reached.
        x: the solution at ``t``.
        x0: the data prediction of the step's first evaluation (a preview of the sample).
        nfe: model evaluations so far.
    """

    step: int
    t: float
    x: torch.Tensor
    x0: torch.Tensor
    nfe: int


@dataclass
class Solution:
    """The result of ``sample`` / ``invert``.

    Attributes:
        x: the sample (``invert``: the noise), in the caller's dtype.
        nfe: model evaluations used.
        ts: the times the solution passed through (accepted steps).
        solver: the solver that ran.
        trajectory: x at each time in ``ts`` (with ``return_intermediates=True``; copies), else None.
        x0_previews: the x0 prediction of each step's first evaluation (with ``return_intermediates=True``;
            copies), else None.
        stats: counts of the run: ``steps``, and ``accepted`` / ``rejected`` for the adaptive solver.
    """

    x: torch.Tensor
    nfe: int
    ts: np.ndarray
    solver: Solver
    trajectory: list[torch.Tensor] | None = None
    x0_previews: list[torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def _resolve_solver(solver, options: Mapping[str, Any]) -> Solver:
    if isinstance(solver, Solver):
        if options:
            raise ValueError(f"Solver options {sorted(options)} were given with a solver object; set them on the "
                             "object instead (or pass the solver by name).")
        return solver
    if isinstance(solver, str):
        return get_solver(solver, **options)
    raise TypeError(f"solver must be a registry name or a Solver object, got {type(solver).__name__} ({solver!r}); "
                    "pass e.g. solver='dpmsolver++' (names in dpmsolve.SOLVERS), a Solver, or a dpmsolve.Plan.")


def _resolve_grid(denoiser: Denoiser, solver: Solver, grid, steps, t_start, t_end, grid_options) -> np.ndarray:
    if isinstance(grid, numbers.Number) or (isinstance(grid, (np.ndarray, torch.Tensor)) and grid.ndim == 0):
        raise TypeError(f"grid must be a grid name (e.g. 'logSNR', 'karras') or an array of times, got {grid!r} "
                        f"({type(grid).__name__}); a number is not a grid: pass steps={grid!r} for a number of "
                        "steps, or a grid name / array of times.")
    if solver.adaptive and steps is not None:
        if isinstance(grid, str):
            make_grid(denoiser.schedule, steps, grid)  # a bad steps value is reported as such first
        raise ValueError(f"steps={steps!r} was given with the adaptive solver (method='adaptive'), which chooses "
                         "its own steps from rtol/atol and uses only the grid's end points; drop steps, or use a "
                         "fixed-grid method (method='multistep' or 'singlestep') for a fixed number of steps.")
    if isinstance(grid, str):
        return solver.grid(denoiser.schedule, 20 if steps is None else steps, grid, t_start, t_end,
                           **(grid_options or {}))
    ts = np.asarray(grid, dtype=np.float64)
    if steps is not None and steps != ts.size - 1:
        raise ValueError(f"steps={steps} disagrees with the explicit grid of {ts.size} times ({ts.size - 1} "
                         "steps); pass one of them.")
    if t_start is not None or t_end is not None or grid_options:
        raise ValueError("t_start, t_end and grid_options apply to named grids only; an explicit grid holds "
                         "its own times.")
    return ts


def _resolve_plan(plan: Plan, denoiser: Denoiser, x, solver_options, **given):
    """(solver, times, denoise_to_zero) of a plan, refusing options that would change it."""
    defaults = {"steps": None, "grid": None, "t_start": None, "t_end": None, "grid_options": None,
                "denoise_to_zero": False}
    changed = sorted(k for k, v in given.items() if v is not defaults[k] and v != defaults[k]) + sorted(solver_options)
    if changed:
        raise ValueError(f"A plan holds its own times and step settings; {', '.join(changed)} cannot be given with "
                         "it. Tune a plan for other settings (dpmsolve.tune), or pass a solver name instead.")
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        plan.check(denoiser.schedule, tuple(x.shape[1:]))
    return plan.solver(), np.asarray(plan.ts, dtype=np.float64), plan.denoise_to_zero


def _check_entry(denoiser, x, x_name: str, steps, grid_options, model_kwargs) -> None:
    """The checks ``sample`` and ``invert`` make once, before any planning: argument types and counts."""
    check_denoiser(denoiser)
    check_tensor(x_name, x)
    if steps is not None:
        check_count("steps", steps)
    check_mapping("grid_options", grid_options)
    check_mapping("model_kwargs", model_kwargs)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _generator(seed, device) -> torch.Generator:
    """A generator seeded with ``seed``: an integer in torch's seed range, never truncated or parsed."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Real):
        raise TypeError(f"seed must be an integer (e.g. seed=0), got {seed!r} ({type(seed).__name__}).")
    if not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}.")
    return torch.Generator(device=device).manual_seed(int(seed))


def _warn_if_unstable(solver: Solver, grid, schedule, steps: int) -> None:
    """One UserWarning for a combination known to give wrong samples: order-3 multistep DPM-Solver(++) / UniPC,
    or noise-prediction singlestep order 3, on a 'karras' grid of <= 10 steps of a DiscreteVP (DDPM) schedule.
    There the first steps are very long in lambda and the order-3 extrapolation overshoots (zoo ``digits``:
    several times the error of DPM-Solver++ 2M on the same grid)."""
    if not (isinstance(grid, str) and grid == "karras" and isinstance(schedule, DiscreteVP) and steps <= 10):
        return
    multistep = isinstance(solver, DPMSolverMultistep) and solver._order == 3
    singlestep = (isinstance(solver, DPMSolverSinglestep) and solver.predict == "noise"
                  and 3 in solver.block_orders(steps))
    if multistep or singlestep:
        warnings.warn(f"{solver!r} on a {steps}-step 'karras' grid of a discrete (DDPM) schedule is unstable: "
                      "its samples can be far off. Use order=2 (DPM-Solver++ 2M) on this grid, or grid='logSNR'.",
                      UserWarning, stacklevel=3)


def _check_finite(pred: Prediction, step: int, t: float) -> None:
    # min/max propagate NaN and keep +-Inf: one pass per tensor and one read-back (isfinite(x).all() is slower).
    if pred.x0.numel() == 0:
        return
    extremes = torch.stack([*pred.x0.aminmax(), *pred.eps.aminmax()])
    if not torch.isfinite(extremes).all():
        raise NonFiniteError(f"The model returned NaN or Inf at step {step} (t={t:.6g}). Check the model and its "
                             "time input, or use a lower guidance scale; pass check_finite=False to continue.")


def _solve(denoiser: Denoiser, x: torch.Tensor, solver: Solver, ts: np.ndarray, *, generator, callback,
           progress, return_intermediates, check_finite, model_kwargs, denoise_to_zero, x_name="x") -> Solution:
    # denoiser, x, steps and the mappings were checked by the entry point (_check_entry).
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it is called with a StepInfo after each step), got "
                        f"{callback!r} ({type(callback).__name__}).")
    in_dtype, work = x.dtype, _work_dtype(x.dtype)
    if check_finite and x.numel() and not torch.isfinite(torch.stack(x.aminmax())).all():
        raise ValueError(f"The input {x_name} contains NaN or Inf (before any model call): check how it was made; "
                         "pass check_finite=False to sample anyway.")
    model_kwargs = dict(model_kwargs or {})
    nfe = 0

    def evaluate(x_eval: torch.Tensor, t: float, step: int) -> Prediction:
        nonlocal nfe
        pred = denoiser(x_eval, t, **model_kwargs)  # wrap_model casts to the network's own dtype
        nfe += 1
        if pred.x0.shape != x_eval.shape or pred.eps.shape != x_eval.shape:
            raise ValueError(f"The denoiser returned predictions of shape {tuple(pred.x0.shape)} / "
                             f"{tuple(pred.eps.shape)} for x of shape {tuple(x_eval.shape)}; they must have x's shape.")
        pred = Prediction(pred.x0.to(work), pred.eps.to(work))
        if check_finite:
            _check_finite(pred, step, t)
        return pred

    state = solver.init(denoiser.schedule, ts, x.to(work), generator)
    times, trajectory, previews = [float(ts[0])], [x.clone()] if return_intermediates else None, []
    total = solver.expected_nfe(len(ts) - 1, ends_at_zero=bool(ts[-1] == 0.0))
    total = None if total is None else total + int(denoise_to_zero)
    bar = _progress_bar(progress, total, solver)
    watched = return_intermediates or callback is not None
    step_x0 = None
    try:
        with torch.no_grad():
            while not solver.done(state):
                x_eval, t = solver.ask(state)
                pred = evaluate(x_eval, t, len(times))
                if watched and step_x0 is None:  # a copy: the network may overwrite pred at its next call
                    step_x0 = pred.x0.to(in_dtype, copy=True)
                before, state = state, solver.tell(state, pred)
                if bar is not None:
                    bar.update(1)
                if solver.step_completed(before, state):
                    x_now, t_now = solver.current(state)
                    times.append(t_now)
                    # Hand out copies: the solver goes on from x_now, and a callback may edit what it gets.
                    if return_intermediates:
                        trajectory.append(x_now.to(in_dtype, copy=True))
                        previews.append(step_x0)
                    if callback is not None:
                        callback(StepInfo(len(times) - 1, t_now, x_now.to(in_dtype, copy=True),
                                          step_x0.clone() if return_intermediates else step_x0, nfe))
                    step_x0 = None
            x_out, t_out = solver.current(state)
            if denoise_to_zero:  # a copy: the prediction may be the network's reused output buffer
                x_out = evaluate(x_out, t_out, len(times)).x0.clone()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    stats = {"steps": len(times) - 1}
    if solver.adaptive:
        stats.update(accepted=state.accepted, rejected=state.rejected)
    return Solution(x=x_out.to(in_dtype), nfe=nfe, ts=np.array(times), solver=solver, trajectory=trajectory,
                    x0_previews=previews if return_intermediates else None, stats=stats)


def _progress_bar(progress, total, solver):
    if progress is False:
        return None
    from tqdm.auto import tqdm

    # progress=None: tqdm decides (on for a terminal, off when output is redirected).
    return tqdm(total=total, desc=f"dpmsolve {type(solver).__name__}", unit="nfe",
                disable=None if progress is None else not progress, leave=False)


def sample(denoiser: Denoiser, x: torch.Tensor, solver: str | Solver | Plan | None = None, *,
           steps: int | None = None, grid: str | Sequence[float] | None = None, t_start: float | None = None,
           t_end: float | None = None, grid_options: Mapping[str, Any] | None = None,
           denoise_to_zero: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
           callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
           return_intermediates: bool = False, check_finite: bool = True,
           model_kwargs: Mapping[str, Any] | None = None, **solver_options) -> Solution:
    """Solve from noise ``x`` at ``t_start`` (default ``t_max``) to data at ``t_end`` (default ``t_min``).

    With neither ``solver`` nor ``grid`` (nor ``t_start``) given, the sample follows the model-free default plan
    for ``steps`` evaluations (:func:`dpmsolve.tuning.default_plan`): the steps and per-step solver settings that the
    tuner finds on a synthetic stand-in for unit-scale data under this schedule, guided at the denoiser's own
    classifier-free guidance scale (the rule that picks solver, order and grid by NFE and guidance is that search;
    computed once in a second or two, then cached). A solver without a grid runs on the ``"logSNR"`` grid; a
    grid without a solver runs DPM-Solver++ 2M.

    Args:
        denoiser: from :func:`dpmsolve.wrap_model`, possibly inside guidance / thresholding wrappers.
        x: the starting noise, shape ``(batch, ...)``; fp16/bf16 stay fp16/bf16 (the solver works in float32).
            NaN/Inf in it are refused before any model call (unless ``check_finite=False``); an empty batch
            returns an empty sample.
        solver: None (the default plan, above), a registry name (``"ddim"``, ``"dpmsolver"``, ``"dpmsolver++"``,
            ``"sde-dpmsolver++"``) with its
            options as keyword arguments (``order=3``, ``method="singlestep"``, ``solver_type="taylor"``, ...), or
            a Solver object, or a :class:`~dpmsolve.Plan` (from :func:`dpmsolve.tune` or ``Plan.load``), which holds
            its own times and step settings (then give no grid, steps or solver options).
        steps: grid intervals (default 20). For every fixed-grid solver NFE = steps (+1 with denoise_to_zero).
            Not with the adaptive solver, which chooses its own steps.
        grid: a grid name (``"logSNR"``, ``"time_uniform"``, ``"time_quadratic"``, ``"time_power"``, ``"karras"``,
            ``"exponential"``, ``"flow_shift"``) or an explicit strictly decreasing array of times inside the schedule's
            range. A grid may end at t = 0 (``t_end=0`` for a named grid): the last step then goes to sigma = 0 by the x0
            prediction at the previous time, as diffusers' and k-diffusion's grids do; NFE stays ``steps``.
            Singlestep solvers place their blocks on ``"logSNR"`` / ``"exponential"`` as the reference DPM-Solver
            (equal lambda blocks; ``DPMSolverSinglestep(spacing=...)``).
        grid_options: options of a named grid, e.g. ``{"rho": 7}`` for karras, ``{"power": 1.5}`` for time_power,
            ``{"shift": 3}`` for flow_shift.
        denoise_to_zero: one more evaluation at the end, returning its x0 prediction.
        generator: randomness of stochastic solvers (give this or ``seed``, not both).
        seed: an integer seed for stochastic solvers: creates a generator on x's device (give this or
            ``generator``, not both).
        callback: called with a :class:`StepInfo` after every completed step (its tensors are copies).
        progress: tqdm progress bar; None shows it only on a terminal.
        return_intermediates: keep x and the x0 preview at every step in the Solution (copies, which the
            solver never reads).
        check_finite: stop with :class:`NonFiniteError` (naming the step and t) when the model returns NaN/Inf.
        model_kwargs: keyword arguments for every model call (class labels, text embeddings).
    """
    _check_entry(denoiser, x, "x", steps, grid_options, model_kwargs)
    if (solver is None and grid is None and t_start is None and not solver_options and t_end in (None, 0)
            and not (t_end == 0 and denoise_to_zero)):   # (that combination is refused below)
        from .tuning.default import default_plan, guidance_of

        solver = default_plan(denoiser.schedule, 20 if steps is None else steps, guidance_of(denoiser),
                              "zero" if t_end == 0 else "t_min")
        steps = t_end = None
        if denoise_to_zero:
            solver, denoise_to_zero = replace(solver, denoise_to_zero=True), False
    if isinstance(solver, Plan):
        solver, ts, denoise_to_zero = _resolve_plan(solver, denoiser, x, solver_options, steps=steps, grid=grid,
                                                    t_start=t_start, t_end=t_end, grid_options=grid_options,
                                                    denoise_to_zero=denoise_to_zero)
    else:
        solver = _resolve_solver("dpmsolver++" if solver is None else solver, solver_options)
        grid = "logSNR" if grid is None else grid
        ts = _resolve_grid(denoiser, solver, grid, steps, t_start, t_end, grid_options)
        _warn_if_unstable(solver, grid, denoiser.schedule, len(ts) - 1)
    ts = check_grid(denoiser.schedule, ts)
    # A grid ending at t = 0: the last step is the jump to sigma = 0 (the x0 prediction at ts[-2]). Fixed-grid
    # solvers plan it themselves; the adaptive solver stops at ts[-2] and the jump is the final evaluation.
    to_zero = ts[-1] == 0.0 and solver.adaptive
    if ts[-1] == 0.0 and denoise_to_zero:
        raise ValueError("The grid already ends at sigma = 0 (t = 0); denoise_to_zero would add a second "
                         "final evaluation. Use one of them.")
    if to_zero:
        ts = ts[:-1]
    if solver.adaptive:
        ts = ts[[0, -1]]
    if seed is not None:
        if generator is not None:
            raise ValueError(f"Both seed={seed!r} and a generator were given; pass one of them.")
        generator = _generator(seed, x.device)
    if solver.stochastic and generator is None:
        generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, ()).item()))
    solution = _solve(denoiser, x, solver, ts, generator=generator, callback=callback, progress=progress,
                      return_intermediates=return_intermediates, check_finite=check_finite,
                      model_kwargs=model_kwargs, denoise_to_zero=denoise_to_zero or to_zero)
    if to_zero:
        solution.ts = np.append(solution.ts, 0.0)
    return solution


def invert(denoiser: Denoiser, x0: torch.Tensor, solver: str | Solver = "dpmsolver++", *,
           steps: int | None = None, grid: str | Sequence[float] = "logSNR", t_start: float | None = None,
           t_end: float | None = None, grid_options: Mapping[str, Any] | None = None,
           callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
           return_intermediates: bool = False, check_finite: bool = True,
           model_kwargs: Mapping[str, Any] | None = None, **solver_options) -> Solution:
    """Run the probability-flow ODE backwards, from data ``x0`` at ``t_end`` (default ``t_min``) to noise at
    ``t_start`` (default ``t_max``), with the same deterministic solvers and grids as :func:`sample` (the grid
    is the sampling grid reversed). Sampling from the result with the same settings reconstructs ``x0`` up to
    the solvers' discretisation error."""
    _check_entry(denoiser, x0, "x0", steps, grid_options, model_kwargs)
    if isinstance(solver, Plan):
        raise ValueError(f"invert() cannot run a plan ({solver!r}): a plan is tuned for sampling (noise -> data). "
                         "Pass a deterministic solver by name (e.g. solver='dpmsolver++') or as a Solver object.")
    solver = _resolve_solver(solver, solver_options)
    if solver.stochastic:
        raise ValueError("invert() needs a deterministic solver (eta = 0); SDE solvers cannot be inverted.")
    ts = _resolve_grid(denoiser, solver, grid, steps, t_start, t_end, grid_options)
    if not isinstance(grid, str) and ts.ndim == 1 and ts.size >= 2 and np.all(np.diff(ts) > 0):
        raise ValueError(f"grid must be the decreasing sampling grid (noise -> data, as sample() takes it); invert() "
                         f"reverses it itself. Got an increasing grid {ts.tolist()}; pass it in decreasing order "
                         "(e.g. grid[::-1]).")
    ts = check_grid(denoiser.schedule, ts[::-1].copy(), increasing=True, name="the inversion grid")
    if solver.adaptive:
        ts = ts[[0, -1]]
    return _solve(denoiser, x0, solver, ts, generator=None, callback=callback, progress=progress,
                  return_intermediates=return_intermediates, check_finite=check_finite, model_kwargs=model_kwargs,
                  denoise_to_zero=False, x_name="x0")
