"""The sampling loop, written once: ``sample`` (noise -> data) and ``invert`` (data -> noise).

It owns what every solver needs around it: the progress bar, per-step callbacks, NFE accounting, saving
intermediates, the NaN/Inf guard, and the precision policy (the solver works in at least float32; the sample
keeps the caller's dtype).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ._checks import check_count, check_denoiser, check_mapping, check_tensor
from .grids import check_grid, make_grid
from .inversion import (BDIA, EDICT, Inversion, NoiseDriver, NoiseSequence, StepDriver, check_noise, describe_grid,
                        exact_method, noise_targets)
from .model import Denoiser, Prediction
from .schedules import DiscreteVP
from .solvers import DDIM, DPMSolverMultistep, DPMSolverSinglestep, Solver, get_solver
from .tuning.plan import Plan

__all__ = ["sample", "invert", "Solution", "StepInfo", "NonFiniteError", "Inversion", "NoiseSequence"]


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
        stats: counts of the run: ``steps``, ``accepted`` / ``rejected`` for the adaptive solver, and with
            ``grad=True`` ``backward_nfe`` (the model evaluations the backward pass will make, each followed by
            one vector-Jacobian product) and ``grad`` (``"adjoint"`` or ``"checkpoint"``).
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
    solver_options = dict(solver_options)
    ems = solver_options.pop("ems", None)        # the statistics of a plan's DPM-Solver-v3 steps
    changed = sorted(k for k, v in given.items() if v is not defaults[k] and v != defaults[k]) + sorted(solver_options)
    if changed:
        raise ValueError(f"A plan holds its own times and step settings; {', '.join(changed)} cannot be given with "
                         "it. Tune a plan for other settings (dpmsolve.tune), or pass a solver name instead.")
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        plan.check(denoiser.schedule, tuple(x.shape[1:]))
    return plan.solver(ems), np.asarray(plan.ts, dtype=np.float64), plan.denoise_to_zero


def _check_entry(denoiser, x, x_name: str, steps, grid_options, model_kwargs) -> None:
    """The checks ``sample`` and ``invert`` make once, before any planning: argument types and counts."""
    check_denoiser(denoiser)
    check_tensor(x_name, x)
    if steps is not None:
        check_count("steps", steps)
    check_mapping("grid_options", grid_options)
    check_mapping("model_kwargs", model_kwargs)


def _work_dtype(dtype: torch.dtype, solver: Solver | None = None) -> torch.dtype:
    """The dtype the solver works in: at least float32, and at least the solver's own ``precision`` (the exact
    inversion samplers keep float64 states)."""
    work = torch.promote_types(dtype, torch.float32)
    precision = getattr(solver, "precision", None)
    return work if precision is None else torch.promote_types(work, precision)


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
    extremes = torch.stack([*pred.x0.detach().aminmax(), *pred.eps.detach().aminmax()])
    if not torch.isfinite(extremes).all():
        where = f"t={t:.6g}" if isinstance(t, (int, float)) else "per-sample times"  # a tensor: TimeShift's times
        raise NonFiniteError(f"The model returned NaN or Inf at step {step} ({where}). Check the model and its "
                             "time input, or use a lower guidance scale; pass check_finite=False to continue.")


def _solve(denoiser: Denoiser, x: torch.Tensor, solver: Solver, ts: np.ndarray, *, generator, callback,
           progress, return_intermediates, check_finite, model_kwargs, denoise_to_zero, x_name="x",
           driver: StepDriver | None = None, state=None, start: int = 0) -> Solution:
    # denoiser, x, steps and the mappings were checked by the entry point (_check_entry).
    # driver: how each step is taken (None: ask, evaluate, tell; see inversion.StepDriver); state: an initial state
    # made by the caller (an inversion's), already ``start`` steps into the grid.
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it is called with a StepInfo after each step), got "
                        f"{callback!r} ({type(callback).__name__}).")
    in_dtype, work = x.dtype, _work_dtype(x.dtype, solver)
    if check_finite and x.numel() and not torch.isfinite(torch.stack(x.detach().aminmax())).all():
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

    if state is None:
        state = solver.init(denoiser.schedule, ts, x.to(work), generator)
    if driver is not None:
        state = driver.start(solver, state)
    times = [float(t) for t in ts[:start + 1]]
    trajectory = None
    if return_intermediates:
        trajectory = [x.detach().clone()] + ([solver.current(state)[0].detach().to(in_dtype, copy=True)] if start
                                             else [])
    previews = []
    total = solver.expected_nfe(len(ts) - 1 - start, ends_at_zero=bool(ts[-1] == 0.0))
    total = None if total is None else total + int(denoise_to_zero)
    bar = _progress_bar(progress, total, solver)
    watched = return_intermediates or callback is not None
    step_x0 = None
    grad_mode = contextlib.nullcontext() if driver is not None and driver.differentiable else torch.no_grad()
    try:
        with grad_mode:
            while not solver.done(state):
                if driver is None:
                    x_eval, t = solver.ask(state)
                    pred = evaluate(x_eval, t, len(times))
                    if watched and step_x0 is None:  # a copy: the network may overwrite pred at its next call
                        step_x0 = pred.x0.to(in_dtype, copy=True)
                    before, state = state, solver.tell(state, pred)
                else:
                    step = len(times)
                    before = state
                    state, pred = driver.advance(solver, state, lambda xe, te: evaluate(xe, te, step))
                    if watched and step_x0 is None:
                        step_x0 = pred.x0.detach().to(in_dtype, copy=True)
                if bar is not None:
                    bar.update(1)
                if solver.step_completed(before, state):
                    x_now, t_now = solver.current(state)
                    times.append(t_now)
                    # Hand out copies: the solver goes on from x_now, and a callback may edit what it gets.
                    if return_intermediates:
                        trajectory.append(x_now.detach().to(in_dtype, copy=True))
                        previews.append(step_x0)
                    if callback is not None:
                        callback(StepInfo(len(times) - 1, t_now, x_now.detach().to(in_dtype, copy=True),
                                          step_x0.clone() if return_intermediates else step_x0, nfe))
                    step_x0 = None
            x_out, t_out = solver.current(state)
            if denoise_to_zero:  # a copy: the prediction may be the network's reused output buffer
                if driver is None:
                    x_out = evaluate(x_out, t_out, len(times)).x0.clone()
                else:
                    step = len(times)
                    x_out = driver.final(x_out, t_out, lambda xe, te: evaluate(xe, te, step))
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


def sample(denoiser: Denoiser, x: torch.Tensor | Inversion, solver: str | Solver | Plan | None = None, *,
           steps: int | None = None, grid: str | Sequence[float] | None = None, t_start: float | None = None,
           t_end: float | None = None, grid_options: Mapping[str, Any] | None = None,
           denoise_to_zero: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
           callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
           return_intermediates: bool = False, check_finite: bool = True,
           model_kwargs: Mapping[str, Any] | None = None, exact: bool | str | BDIA | EDICT | None = None,
           noise_sequence: NoiseSequence | None = None, grad: bool = False, checkpoint: bool = False,
           **solver_options) -> Solution:
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
        exact: sample with an exactly invertible DDIM-type sampler: ``True`` or ``"bdia"`` (:class:`BDIA`, one
            evaluation per step), ``"edict"`` (:class:`EDICT`, two), or a ``BDIA(gamma=...)`` / ``EDICT(p=...)``
            object; ``solver`` must then be ``"ddim"`` (or None). Starting from an :class:`Inversion` made with
            ``invert(..., exact=...)`` (pass it as ``x``), the sample reconstructs the inverted data to round-off
            on the same grid (the grid defaults to the inversion's). See ``docs/inversion.md``.
        noise_sequence: a :class:`NoiseSequence` (from ``invert(..., noise_map=True)``) whose noises a stochastic
            solver adds in place of fresh draws (an :class:`Inversion` of a noise map passed as ``x`` brings its
            own). (``noise=`` is a solver option of some stochastic solvers: the kind of noise they draw.)
        grad: return a sample that autograd can differentiate with respect to ``x``, tensors in ``model_kwargs``
            and the tensors the denoiser holds (its networks' parameters, guidance conditioning), by the discrete
            adjoint: a reverse pass over the same steps that re-evaluates the model once per forward evaluation
            (``Solution.stats["backward_nfe"]``) and holds one step's activations at a time. Gradients equal
            autograd through the unrolled sampler. Fixed-grid solvers only (not ``method="adaptive"``);
            stochastic solvers differentiate with their noise held fixed. Intermediates and callback values carry
            no gradient.
        checkpoint: with ``grad=True``, compute the gradients by ``torch.utils.checkpoint`` around every step
            instead (the same gradients and backward NFE; covers any tensor autograd can see, also ones the
            denoiser hides from the adjoint's search).
    """
    inversion = None
    if isinstance(x, Inversion):
        inversion, x = x, x.x
    _check_entry(denoiser, x, "x", steps, grid_options, model_kwargs)
    if not isinstance(grad, bool) or not isinstance(checkpoint, bool):
        bad, value = ("grad", grad) if not isinstance(grad, bool) else ("checkpoint", checkpoint)
        raise TypeError(f"{bad} must be True or False, got {type(value).__name__} {value!r}.")
    if checkpoint and not grad:
        raise ValueError("checkpoint=True is a way of computing gradients through the sampler; pass grad=True too "
                         "(grad=True alone uses the discrete adjoint, with the same gradients).")
    method = exact_method(exact)
    state, start = None, 0
    if inversion is not None:
        solver, method, noise_sequence, ts = _from_inversion(inversion, denoiser, solver, exact, method,
                                                             noise_sequence, solver_options, steps, grid, t_start,
                                                             t_end, grid_options)
        steps = grid = t_start = t_end = grid_options = None
        solver_options = {}
        if method is not None:
            if grad:
                raise ValueError("grad=True from an exact Inversion is not supported: differentiate a sample that "
                                 "starts from a noise tensor (e.g. sample(den, inv.x, 'ddim', exact=..., grad=True)).")
            work = _work_dtype(x.dtype, method)
            ts = check_grid(denoiser.schedule, ts)
            state = method.resume(denoiser.schedule, ts, *(v.to(work) for v in inversion.state))
            start = 1 if isinstance(method, BDIA) else 0
    if method is not None:
        solver = _exact_solver(method, solver, solver_options, "sample")
        solver_options = {}
        if grid is None and inversion is None:
            grid = "logSNR"
    if (solver is None and grid is None and t_start is None and not solver_options and t_end in (None, 0)
            and not (t_end == 0 and denoise_to_zero) and inversion is None):   # (that combination is refused below)
        from .tuning.default import default_plan, guidance_of

        solver = default_plan(denoiser.schedule, 20 if steps is None else steps, guidance_of(denoiser),
                              "zero" if t_end == 0 else "t_min")
        steps = t_end = None
        if denoise_to_zero:
            solver, denoise_to_zero = replace(solver, denoise_to_zero=True), False
    if inversion is not None:
        pass                                       # solver and ts come from the inversion
    elif isinstance(solver, Plan):
        solver, ts, denoise_to_zero = _resolve_plan(solver, denoiser, x, solver_options, steps=steps, grid=grid,
                                                    t_start=t_start, t_end=t_end, grid_options=grid_options,
                                                    denoise_to_zero=denoise_to_zero)
    else:
        from .presets import resolve_preset   # a ComfyUI name (dpmsolve.presets): solver + grid; None otherwise

        preset = resolve_preset(solver, denoiser.schedule, solver_options, steps=steps, grid=grid, t_start=t_start,
                                t_end=t_end, grid_options=grid_options)
        if preset is not None:
            solver, ts = preset
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
    if grad and solver.adaptive:
        raise ValueError(f"grad=True needs a fixed-grid solver, whose steps do not depend on the sample; the adaptive "
                         f"solver ({solver!r}) chooses its steps from error estimates, so its sample is not a "
                         "differentiable function of the inputs. Use a fixed-grid method: 'dpmsolver++' (multistep or "
                         "singlestep), 'dpmsolver', 'unipc', 'ddim', 'dpmsolver-v3', 'euler', 'heun', 'dpm2', "
                         "'sde-dpmsolver++', exact=..., or a Plan.")
    if to_zero:
        ts = ts[:-1]
    if solver.adaptive:
        ts = ts[[0, -1]]
    if seed is not None:
        if generator is not None:
            raise ValueError(f"Both seed={seed!r} and a generator were given; pass one of them.")
        generator = _generator(seed, x.device)
    if noise_sequence is not None:
        check_noise(noise_sequence, len(ts) - 1, x.shape, solver)
    if solver.stochastic and generator is None and noise_sequence is None:
        generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, ()).item()))
    driver = None
    if noise_sequence is not None:
        driver = NoiseDriver("replay", noise_sequence.noises)
    elif grad and solver.stochastic:
        driver = NoiseDriver("draw")

    def solve(x_start, drv):
        return _solve(denoiser, x_start, solver, ts, generator=generator, callback=callback, progress=progress,
                      return_intermediates=return_intermediates, check_finite=check_finite,
                      model_kwargs=model_kwargs, denoise_to_zero=denoise_to_zero or to_zero, driver=drv,
                      state=state, start=start)

    if grad:
        solution = _solve_with_grad(solve, denoiser, x, solver, driver, model_kwargs, checkpoint)
    else:
        solution = solve(x, driver)
    if to_zero:
        solution.ts = np.append(solution.ts, 0.0)
    return solution


def _solve_with_grad(solve, denoiser, x, solver, driver, model_kwargs, checkpoint: bool) -> Solution:
    """``solve`` run so that its sample is differentiable: the discrete adjoint, or per-step checkpoints."""
    from .adjoint import AdjointRun, CheckpointDriver, adjoint_solve, grad_inputs

    work = _work_dtype(x.dtype, solver)
    model_kwargs = dict(model_kwargs or {})
    inner = driver if driver is not None else StepDriver()
    if checkpoint:
        solution = solve(x, CheckpointDriver(inner, denoiser, model_kwargs, work))
        solution.stats["backward_nfe"] = solution.nfe
        solution.stats["grad"] = "checkpoint"
        return solution
    run = AdjointRun(solve, denoiser, solver, model_kwargs, work, inner)
    out = adjoint_solve(run, x.to(work), grad_inputs(denoiser, model_kwargs))
    solution = run.solution
    solution.x = out.to(x.dtype)
    solution.stats["backward_nfe"] = solution.nfe
    solution.stats["grad"] = "adjoint"
    return solution


def _exact_solver(method, solver, solver_options, where: str) -> Solver:
    """The exact sampler ``method`` after checking that ``solver`` asks for DDIM updates (None or 'ddim')."""
    is_ddim = solver is None or solver == "ddim" or (isinstance(solver, DDIM) and solver.eta == 0)
    if isinstance(solver, (BDIA, EDICT)):
        if type(solver) is not type(method) or repr(solver) != repr(method):
            raise ValueError(f"{where}(): solver={solver!r} and exact={method!r} disagree; pass one of them.")
        is_ddim = True
    if not is_ddim:
        raise ValueError(f"exact={method!r} makes DDIM exactly invertible, so the solver must be 'ddim' (or None), got "
                         f"{solver!r}. Exact inversion of higher-order solvers (BELM-style DPM-Solver++ 2M) is not "
                         "implemented; for other solvers use exact=None (plain inversion, reconstruction up to the "
                         "discretisation error).")
    if solver_options:
        eta = solver_options.get("eta")
        hint = " (eta > 0 is stochastic: use noise_map=True for stochastic samplers)" if eta else ""
        raise ValueError(f"exact inversion runs deterministic DDIM updates; solver options {sorted(solver_options)} "
                         f"cannot be given with it{hint}. Set the method's own options on dpmsolve.BDIA(gamma=...) or "
                         "dpmsolve.EDICT(p=...) and pass that as exact=.")
    return method


def _from_inversion(inv: Inversion, denoiser, solver, exact, method, noise, solver_options, steps, grid, t_start,
                    t_end, grid_options):
    """(solver, exact method, noise, grid) for sampling from the inversion ``inv``."""
    if inv.method == "noise_map":
        if method is not None:
            raise ValueError(f"This Inversion is a noise map of {inv.solver!r}, not an exact inversion; sample from it "
                             "without exact= (its noises are replayed).")
        if noise is not None:
            raise ValueError("This Inversion carries its own noise sequence; do not pass noise_sequence= as well.")
        noise = inv.noise
        solver = inv.solver if solver is None else _resolve_solver(solver, solver_options)
        method = None
    else:
        if exact is False:
            raise ValueError(f"This Inversion is exact ({inv.method}); sample from it with exact=True, or pass inv.x "
                             "to sample() as plain noise.")
        if exact is not True and method is not None and (type(method) is not type(inv.solver) or (
                not isinstance(exact, str) and repr(method) != repr(inv.solver))):
            raise ValueError(f"This Inversion was made by {inv.solver!r}; sample from it with the same method "
                             f"(exact=True or exact={inv.method!r}), not {method!r}.")
        method = inv.solver
        if noise is not None:
            raise ValueError("noise_sequence= replays a stochastic sampler's noise; an exact Inversion needs none.")
    ts = np.asarray(inv.ts, np.float64)
    if steps is not None or grid is not None or t_start is not None or t_end is not None or grid_options:
        given = _resolve_grid(denoiser, method if method is not None else solver, "logSNR" if grid is None else grid,
                              steps, t_start, t_end, grid_options)
        if not (given.shape == ts.shape and np.allclose(given, ts, rtol=1e-12, atol=0.0)):
            raise ValueError(f"The Inversion was made on a grid of {describe_grid(ts)}, but the sampling grid given "
                             f"here has {describe_grid(given)}; sample on the inversion's grid (give no steps / grid, "
                             "or the same ones).")
    return solver, method, noise, ts


def invert(denoiser: Denoiser, x0: torch.Tensor, solver: str | Solver | None = None, *,
           steps: int | None = None, grid: str | Sequence[float] = "logSNR", t_start: float | None = None,
           t_end: float | None = None, grid_options: Mapping[str, Any] | None = None,
           callback: Callable[[StepInfo], None] | None = None, progress: bool | None = None,
           return_intermediates: bool = False, check_finite: bool = True,
           model_kwargs: Mapping[str, Any] | None = None, exact: bool | str | BDIA | EDICT | None = None,
           noise_map: bool = False, generator: torch.Generator | None = None, seed: int | None = None,
           **solver_options) -> Solution | Inversion:
    """Run the probability-flow ODE backwards, from data ``x0`` at ``t_end`` (default ``t_min``) to noise at
    ``t_start`` (default ``t_max``), with the same deterministic solvers and grids as :func:`sample` (the grid
    is the sampling grid reversed). Sampling from the result with the same settings reconstructs ``x0`` up to
    the solvers' discretisation error.

    Args:
        solver: a deterministic solver (default ``"dpmsolver++"``; ``"ddim"`` with ``exact``; a stochastic one
            with ``noise_map=True``).
        exact: invert exactly (to round-off) with ``True`` / ``"bdia"`` (:class:`BDIA`), ``"edict"``
            (:class:`EDICT`) or a ``BDIA(gamma=...)`` / ``EDICT(p=...)`` object: returns an :class:`Inversion`
            (``inv.x`` is the noise; pass ``inv`` to :func:`sample` with ``exact=True`` to reconstruct or edit).
        noise_map: with a stochastic solver (``"sde-dpmsolver++"``, ``"ddim"`` with ``eta > 0``): return an
            :class:`Inversion` whose start noise and per-step noises (``inv.noise``) make ``x0`` that solver's
            output on this grid, to round-off (edit-friendly inversion: the intermediate points are drawn around
            ``x0`` from ``generator`` / ``seed``). ``sample(denoiser, inv, ...)`` replays them.
        generator, seed: randomness of a noise map's intermediate points.

    Other arguments as :func:`sample`.
    """
    _check_entry(denoiser, x0, "x0", steps, grid_options, model_kwargs)
    if isinstance(solver, Plan):
        raise ValueError(f"invert() cannot run a plan ({solver!r}): a plan is tuned for sampling (noise -> data). "
                         "Pass a deterministic solver by name (e.g. solver='dpmsolver++') or as a Solver object.")
    if not isinstance(noise_map, bool):
        raise TypeError(f"noise_map must be True or False, got {type(noise_map).__name__} {noise_map!r}.")
    method = exact_method(exact)
    if method is not None and noise_map:
        raise ValueError("exact= and noise_map=True are two different inversions (deterministic DDIM made invertible, "
                         "or a stochastic sampler's noises); pass one of them.")
    if method is not None:
        solver = _exact_solver(method, solver, solver_options, "invert")
    else:
        solver = _resolve_solver("dpmsolver++" if solver is None else solver, solver_options)
    if noise_map:
        if not solver.stochastic:
            raise ValueError(f"noise_map=True recovers the noises of a stochastic solver, but {solver!r} adds none; "
                             "pass one that does (e.g. 'sde-dpmsolver++', or 'ddim' with eta=0.5), or invert "
                             "without noise_map (or with exact=True) for a deterministic one.")
    elif solver.stochastic:
        raise ValueError("invert() needs a deterministic solver (eta = 0); SDE solvers cannot be inverted. For a "
                         "stochastic solver pass noise_map=True (the per-step noises that make x0 its output).")
    if (generator is not None or seed is not None) and not noise_map:
        raise ValueError("generator / seed are used by noise_map=True only (a deterministic inversion draws nothing).")
    ts = _resolve_grid(denoiser, solver, grid, steps, t_start, t_end, grid_options)
    if not isinstance(grid, str) and ts.ndim == 1 and ts.size >= 2 and np.all(np.diff(ts) > 0):
        raise ValueError(f"grid must be the decreasing sampling grid (noise -> data, as sample() takes it); invert() "
                         f"reverses it itself. Got an increasing grid {ts.tolist()}; pass it in decreasing order "
                         "(e.g. grid[::-1]).")
    if method is not None and ts[-1] == 0.0:
        raise ValueError(f"exact={method!r} needs a grid that ends inside the schedule (t_end = t_min, not 0): its "
                         "steps are inverted, and a step from sigma = 0 cannot be; drop t_end=0.")
    if noise_map:
        return _noise_map(denoiser, x0, solver, check_grid(denoiser.schedule, ts), generator, seed, callback,
                          progress, return_intermediates, check_finite, model_kwargs)
    ts = inversion_grid(denoiser.schedule, ts)
    if solver.adaptive:
        ts = ts[[0, -1]]
    if method is None:
        return _solve(denoiser, x0, solver, ts, generator=None, callback=callback, progress=progress,
                      return_intermediates=return_intermediates, check_finite=check_finite,
                      model_kwargs=model_kwargs, denoise_to_zero=False, x_name="x0")
    last = _LastState()
    sol = _solve(denoiser, x0, method, ts, generator=None, callback=callback, progress=progress,
                 return_intermediates=return_intermediates, check_finite=check_finite, model_kwargs=model_kwargs,
                 denoise_to_zero=False, x_name="x0", driver=last)
    final = last.state
    state = (final.x, final.x_prev) if isinstance(method, BDIA) else (final.x, final.y)
    name = "bdia" if isinstance(method, BDIA) else "edict"
    return Inversion(x=sol.x, nfe=sol.nfe, ts=ts[::-1].copy(), solver=method, method=name, state=state,
                     trajectory=sol.trajectory, stats=sol.stats)


def inversion_grid(schedule, ts) -> np.ndarray:
    """The inversion grid of the sampling grid ``ts`` (decreasing, noise -> data): ``ts`` reversed (data -> noise),
    checked as strictly increasing inside the schedule (an inversion cannot start at sigma = 0). Shared by
    :func:`invert` and the diffusers ``DPMSolveInverseScheduler``."""
    return check_grid(schedule, np.asarray(ts, dtype=np.float64)[::-1].copy(), increasing=True,
                      name="the inversion grid")


class _LastState(StepDriver):
    """Keeps the solver's final state (an exact inversion's extra tensors)."""

    state = None

    def start(self, solver, state):
        self.state = state
        return state

    def advance(self, solver, state, evaluate):
        self.state, pred = super().advance(solver, state, evaluate)
        return self.state, pred


def _noise_map(denoiser, x0, solver, ts, generator, seed, callback, progress, return_intermediates, check_finite,
               model_kwargs) -> Inversion:
    """The start noise and per-step noises that make ``x0`` the output of the stochastic ``solver`` on ``ts``."""
    if ts[-1] == 0.0:
        raise ValueError("noise_map=True needs a grid that ends at t_min (not at sigma = 0): the last step must add "
                         "noise to land on x0 exactly; drop t_end=0.")
    if seed is not None:
        if generator is not None:
            raise ValueError(f"Both seed={seed!r} and a generator were given; pass one of them.")
        generator = _generator(seed, x0.device)
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(int(torch.randint(2**62, ()).item()))
    work = _work_dtype(x0.dtype)
    targets = noise_targets(denoiser.schedule, x0.to(work), ts, generator)
    driver = NoiseDriver("target", targets=targets)
    state = solver.init(denoiser.schedule, ts, targets[0], None)
    stds = [float(stage.noise_std) for stage in getattr(state, "stages", ())]
    if len(stds) != len(ts) - 1:
        raise ValueError(f"noise_map=True needs a solver with one update per grid step (the noise of step k lands it "
                         f"on the k-th point); {solver!r} takes {len(stds)} updates for {len(ts) - 1} steps. Use "
                         "'sde-dpmsolver++' or 'ddim' with eta > 0.")
    if not stds or not stds[-1]:
        raise ValueError(f"noise_map=True needs a solver whose last step adds noise (it lands on x0 by choosing that "
                         f"noise); {solver!r} adds none there. Use 'sde-dpmsolver++' or 'ddim' with eta > 0.")
    x_T = targets[0].to(x0.dtype)
    sol = _solve(denoiser, x_T, solver, ts, generator=None, callback=callback, progress=progress,
                 return_intermediates=return_intermediates, check_finite=check_finite, model_kwargs=model_kwargs,
                 denoise_to_zero=False, x_name="x0", driver=driver, state=state)
    return Inversion(x=x_T, nfe=sol.nfe, ts=np.asarray(ts, np.float64), solver=solver, method="noise_map",
                     noise=driver.sequence(ts), trajectory=sol.trajectory, stats=sol.stats)
