"""Convergence order of every deterministic fixed-grid solver configuration against the exact ODE flow.

For each configuration the global error at the end of the grid is measured at four step counts; the
least-squares slope of log(error) against log(step size) (step size ~ 1/steps) must match the order the
solver object declares (``dp.get_solver(name, **options).order``) within 0.3. The truth is independent of
the solvers: the closed-form Gaussian flow (``GaussianData.exact_solution``) or scipy's DOP853 at rtol 1e-10
(``lab.reference_solution``) for a Gaussian mixture.

Choices, and why:

* lambda window [-1, 2] (t_start = t(lambda=-1), t_end = t(lambda=2)) for every schedule. The data variances
  (0.02 ... 1.3 for the Gaussian, component stds 0.05 ... 0.35 and unit-scale means for the mixture) make the
  x0 prediction change over roughly this window (rho^2 = e^{-2 lambda} goes from 7.4 to 0.018). Outside it the
  prediction saturates, and the low-order steps that cap some configurations at order 2 (the first step of
  warmup='lower_order', the last steps of lower_order_final, the final blocks of split='fast') then land where
  the prediction hardly moves: on the full [t_min, t_max] range those configurations measure slopes of ~4
  instead of their true order 2. The window puts the asymptotic regime within reach of 24-384 steps.
* Step counts are multiples of 6, so every singlestep split has the same block pattern at every resolution
  (split='fixed': whole blocks only; split='fast' of order 3: always ends with blocks of order 2 and 1) and the
  error is a smooth function of the step size.
* Gaussian: steps 24..192 (h = 0.125 ... 0.016 in lambda), errors 1e-2 ... 1e-7, far above the float64 floor.
  Mixture: steps 48..384, because its trajectories need smaller steps before the leading error term
  dominates; errors stay >= 1e-8, well above the DOP853 reference error (~1e-10).
* The reference multistep 3M update (order 3, solver_type='dpmsolver', declared order 2) weights the second
  difference by half the Taylor value; its O(h^2) error term is h^3 phi_3 m''/2 ~ h^3 m''/12 per step, which
  outweighs its own O(h^3) terms only for h below ~0.03. It is measured at steps 96..768 (the same rule,
  four or two times the base counts); at 24..192 it reads ~1.7 (a mix of 2 and 3), at 96..768 ~1.95.
* With a logSNR grid the analytic denoisers depend on lambda only, so the schedules differ only through
  alpha and the t <-> lambda round trip; a time-uniform grid (non-uniform in lambda) is also run on
  RectifiedFlow, where it gives a smoothly varying lambda grid on this window.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import dpmsolve as dp
from conftest import deterministic_configs
from dpmsolve.lab import GaussianData, GaussianMixture, reference_solution

LAMBDA_WINDOW = (-1.0, 2.0)
GAUSS_STEPS = (24, 48, 96, 192)
MIXTURE_STEPS = (48, 96, 192, 384)
SLOW_3M_STEPS = (96, 192, 384, 768)
TOLERANCE = 0.3
BATCH = 8

SCHEDULES = {
    "discrete": dp.DiscreteVP.linear,
    "linear": dp.LinearVP,
    "edm": dp.EDM,
    "flow": dp.RectifiedFlow,
}


def _configs():
    """(id, registry name, options) for every deterministic fixed-grid configuration."""
    return deterministic_configs()


CONFIGS = _configs()
CONFIG_PARAMS = [pytest.param(name, opts, id=cid) for cid, name, opts in CONFIGS]


def _is_reference_3m(opts) -> bool:
    return (opts.get("method", "multistep") == "multistep" and opts.get("order") == 3
            and opts.get("solver_type") == "dpmsolver" and opts.get("warmup", "singlestep") == "singlestep"
            and not opts.get("lower_order_final", False))


def _gaussian() -> GaussianData:
    # Same data as the conftest fixture: mean != 0, unequal variances != 1 (no solver is accidentally exact).
    return GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])


def _mixture() -> GaussianMixture:
    return GaussianMixture.random(k=3, dim=2, seed=0)


def _window(schedule):
    lam0, lam1 = LAMBDA_WINDOW
    return float(schedule.t_from_log_snr(lam0)), float(schedule.t_from_log_snr(lam1))


@functools.lru_cache(maxsize=None)
def _problem_setup(kind: str, schedule_name: str):
    """Schedule, problem, start x (exact samples of x_{t_start}) and the independent truth at t_end."""
    schedule = SCHEDULES[schedule_name]()
    problem = _gaussian() if kind == "gaussian" else _mixture()
    t0, t1 = _window(schedule)
    x = problem.prior_sample(schedule, BATCH, t=t0, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    if kind == "gaussian":
        truth = problem.exact_solution(schedule, x, t0, t1)
    else:
        truth = reference_solution(problem, schedule, x, t0, t1)  # scipy DOP853, rtol 1e-10
    return schedule, problem, x, truth, t0, t1


def measure_slope(kind: str, schedule_name: str, name: str, opts: dict, grid: str = "logSNR", steps=None):
    """(declared order, fitted slope, step counts, errors) of one configuration."""
    schedule, problem, x, truth, t0, t1 = _problem_setup(kind, schedule_name)
    solver = dp.get_solver(name, **opts)
    if steps is None:
        steps = SLOW_3M_STEPS if _is_reference_3m(opts) else (GAUSS_STEPS if kind == "gaussian" else MIXTURE_STEPS)
    slope, errors = fitted_slope(problem.denoiser(schedule), x, solver, steps, grid, t0, t1, truth)
    return solver.order, slope, steps, errors


def fitted_slope(denoiser, x, solver, steps, grid, t0, t1, truth):
    """(least-squares slope of log max-error against log step size, the errors) over ``steps``."""
    errors = []
    for n in steps:
        sol = dp.sample(denoiser, x, solver, steps=n, grid=grid, t_start=t0, t_end=t1, progress=False)
        assert sol.nfe == n
        errors.append((sol.x - truth).abs().max().item())
    errors = np.array(errors)
    slope = np.polyfit(np.log(1.0 / np.array(steps, dtype=np.float64)), np.log(errors), 1)[0]
    return float(slope), errors


def _check(order, slope, steps, errors):
    assert np.all(np.isfinite(errors)) and np.all(errors > 1e-12), f"errors hit the float floor: {errors}"
    assert np.all(np.diff(errors) < 0), f"error does not shrink with steps {steps}: {errors}"
    assert abs(slope - order) < TOLERANCE, (
        f"measured order {slope:.2f} != declared {order} (steps {steps}, errors {errors})")


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("name,opts", CONFIG_PARAMS)
def test_order_gaussian_logsnr(schedule_name, name, opts):
    _check(*measure_slope("gaussian", schedule_name, name, opts))


@pytest.mark.parametrize("name,opts", CONFIG_PARAMS)
def test_order_gaussian_time_uniform_flow(name, opts):
    _check(*measure_slope("gaussian", "flow", name, opts, grid="time_uniform"))


@pytest.mark.parametrize("name,opts", CONFIG_PARAMS)
def test_order_mixture_logsnr(name, opts):
    _check(*measure_slope("mixture", "discrete", name, opts))


@pytest.mark.parametrize("remainder", [1, 2])
@pytest.mark.parametrize("name,solver_type", [("dpmsolver", "taylor"), ("dpmsolver++", "taylor"),
                                               ("dpmsolver", "dpmsolver"), ("dpmsolver++", "dpmsolver")])
def test_singlestep_fixed_order3_keeps_order_when_steps_leave_a_remainder(name, solver_type, remainder):
    """split='fixed' declares order 3 for any step count: steps = 3k + 1 or 3k + 2 must converge with order 3
    too (a trailing order-1 block, one DDIM step, would cap the global order at 2)."""
    steps = tuple(3 * k + remainder for k in (8, 16, 32, 64))
    opts = dict(method="singlestep", order=3, solver_type=solver_type, split="fixed")
    _check(*measure_slope("gaussian", "discrete", name, opts, steps=steps))


def test_configuration_list_is_complete():
    """Every deterministic fixed-grid family in the registry is covered, with the declared orders we expect."""
    declared = {cid: dp.get_solver(name, **opts).order for cid, name, opts in CONFIGS}
    assert len(declared) == len(CONFIGS) == 37
    assert declared["ddim"] == 1
    for name in ("dpmsolver", "dpmsolver++"):
        assert declared[f"{name}-ms3-taylor"] == 3
        assert declared[f"{name}-ms3-dpmsolver"] == 2           # reference 3M: half the 2nd-difference weight
        assert declared[f"{name}-ss3-dpmsolver-fixed"] == 3     # DPM-Solver-3
        assert declared[f"{name}-ss3-taylor-fast"] == 2         # fast split ends with lower-order blocks
        for st in ("dpmsolver", "taylor"):
            assert declared[f"{name}-ms3-{st}-warmup_lower"] == 2
            assert declared[f"{name}-ms3-{st}-lof"] == 2
