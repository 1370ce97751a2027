"""Exactness of the exponential integrators, against closed-form ODE solutions.

* Point mass data: x0 and eps are constant along every exact trajectory, so every exponential integrator
  (DDIM, DPM-Solver(++) single/multistep of any order and rule, SDE-DPM-Solver++ at eta = 0, adaptive) must
  land on ``PointMass.exact_solution`` even with ONE step over the schedule's whole range.
* Polynomial predictions: a synthetic denoiser whose integrated prediction (x0 for the data form, eps for the
  noise form) is a polynomial of degree d in lambda, independent of x. The probability-flow ODE is then linear
  with a closed-form solution (derived below), and an order-p update with solver_type='taylor' integrates the
  interpolating polynomial exactly, so it is exact for d <= p - 1. The reference 'dpmsolver' rule is not:
  DPM-Solver-2's ``W0/2`` weight on the first difference differs from the Taylor weight ``h phi_2``.

Closed forms (y = x / alpha, u = x / sigma, lambda = log(alpha / sigma)):
  data form   dy/dlambda = x0(lambda) - y    ->  y = y_p + e^{-(lambda - lambda0)} (y0 - y_p(lambda0)),
                                                 y_p = sum_j (-1)^j P^(j)   (since (1 + D) y_p = P)
  noise form  du/dlambda = u - eps(lambda)   ->  u = u_p + e^{+(lambda - lambda0)} (u0 - u_p(lambda0)),
                                                 u_p = sum_j Q^(j)          (since (D - 1) u_p = -Q)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from numpy.polynomial import polynomial as npoly

import dpmsolve as dp
from dpmsolve.lab import PointMass

from conftest import SCHEDULES, deterministic_configs
SCHEDULE_NAMES = sorted(SCHEDULES)
EXACT = 1e-10


def _rel_err(x, truth) -> float:
    return (x - truth).abs().max().item() / max(1.0, truth.abs().max().item())


# --------------------------------------------------------------------------------------------------------------
# Point mass: every exponential integrator, one step
# --------------------------------------------------------------------------------------------------------------

def _exponential_integrators():
    out = deterministic_configs()
    for name in ("dpmsolver", "dpmsolver++"):
        for st in ("dpmsolver", "taylor"):
            for order in (2, 3):
                out.append((f"{name}-adaptive{order}-{st}", name, dict(method="adaptive", order=order, solver_type=st)))
    for order in (1, 2):
        out.append((f"sde-dpmsolver++{order}-eta0", "sde-dpmsolver++", dict(order=order, eta=0.0)))
    return out


INTEGRATORS = [pytest.param(name, opts, id=cid) for cid, name, opts in _exponential_integrators()]


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,opts", INTEGRATORS)
def test_point_mass_is_solved_exactly(name, opts, schedule_name, steps):
    schedule = SCHEDULES[schedule_name]()
    problem = PointMass([0.7, -1.2, 0.3])
    t0, t1 = schedule.t_max, schedule.t_min
    if opts.get("method") == "adaptive" and name == "dpmsolver" and schedule_name == "flow":
        # Exact in exact arithmetic, but in float64 the noise form amplifies the round-off of its stage points
        # by ~e^h, and the adaptive solver takes RectifiedFlow's whole lambda span (13.8) as ONE step after
        # its first trial: 2e-10 (order 2) and 2e-8 (order 3) there, ~1e-11 at span 10 (see
        # test_noise_form_round_off_grows_with_the_step). Clip to |lambda| <= 5, the span of the other schedules.
        t0, t1 = schedule.t_from_log_snr(-5.0), schedule.t_from_log_snr(5.0)
    x = problem.prior_sample(schedule, 4, t=t0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = None if opts.get("method") == "adaptive" else steps  # the adaptive solver refuses steps
    sol = dp.sample(problem.denoiser(schedule), x, name, steps=steps, t_start=t0, t_end=t1, progress=False, **opts)
    truth = problem.exact_solution(schedule, x, t0, t1)
    assert _rel_err(sol.x, truth) < EXACT


@pytest.mark.parametrize("order", [2, 3])
def test_noise_form_round_off_grows_with_the_step(order):
    """Documents the float64 limit behind the clipped window above: on RectifiedFlow's full range the adaptive
    noise-form solver is exact only to ~1e-15 e^h (h = 13.8), while the data form stays at round-off."""
    schedule = dp.RectifiedFlow()
    problem = PointMass([0.7, -1.2, 0.3])
    x = problem.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = problem.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    span = schedule.log_snr_range[1] - schedule.log_snr_range[0]
    errors = {}
    for name in ("dpmsolver", "dpmsolver++"):
        sol = dp.sample(problem.denoiser(schedule), x, name, method="adaptive", order=order, progress=False)
        errors[name] = _rel_err(sol.x, truth)
    assert errors["dpmsolver++"] < 1e-14
    assert errors["dpmsolver"] < 1e-15 * math.exp(span) * 100


def test_point_mass_truth_is_not_trivial():
    """The closed form moves x a lot over the range, so exactness is not an accident of x barely changing."""
    schedule = dp.DiscreteVP.linear()
    problem = PointMass([0.7, -1.2, 0.3])
    x = problem.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = problem.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    assert (truth - x).abs().max() > 0.5
    assert torch.allclose(truth, problem.point.expand_as(truth), atol=0.05)


# --------------------------------------------------------------------------------------------------------------
# Polynomial predictions
# --------------------------------------------------------------------------------------------------------------

class PolynomialDenoiser(dp.Denoiser):
    """The integrated prediction is a fixed vector polynomial in lambda (independent of x).

    ``data=True``: x0(lambda) = P(lambda), eps = (x - alpha x0) / sigma. ``data=False``: eps(lambda) = Q(lambda),
    x0 = (x - sigma eps) / alpha. ``coeffs[k]`` multiplies (lambda / SCALE)^k, which keeps values O(1).
    """

    SCALE = 4.0

    def __init__(self, schedule, coeffs, data: bool):
        self.schedule = schedule
        self.data = data
        scale = self.SCALE ** -np.arange(len(coeffs), dtype=np.float64)
        self.coeffs = np.asarray(coeffs, dtype=np.float64) * scale[:, None]  # standard basis, (degree + 1, dim)

    def poly(self, lam: float, derivative: int = 0) -> np.ndarray:
        c = npoly.polyder(self.coeffs, derivative, axis=0) if derivative else self.coeffs
        return npoly.polyval(lam, c) if c.size else np.zeros(self.coeffs.shape[1])

    def __call__(self, x, t, **model_kwargs):
        a, s = self.schedule.alpha_sigma(t)
        m = torch.as_tensor(self.poly(self.schedule.log_snr(t)), dtype=x.dtype).expand_as(x)
        if self.data:
            return dp.Prediction(m, (x - a * m) / s)
        return dp.Prediction((x - s * m) / a, m)

    def particular(self, lam: float) -> np.ndarray:
        degree = self.coeffs.shape[0] - 1
        sign = -1.0 if self.data else 1.0
        return sum(sign**j * self.poly(lam, j) for j in range(degree + 1))

    def exact_solution(self, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        """Closed-form flow from (x, t0) to t1 (see the module docstring)."""
        sch = self.schedule
        lam0, lam1 = sch.log_snr(t0), sch.log_snr(t1)
        a0, s0 = sch.alpha_sigma(t0)
        a1, s1 = sch.alpha_sigma(t1)
        p0 = torch.as_tensor(self.particular(lam0), dtype=x.dtype)
        p1 = torch.as_tensor(self.particular(lam1), dtype=x.dtype)
        if self.data:
            return a1 * (p1 + math.exp(-(lam1 - lam0)) * (x / a0 - p0))
        return s1 * (p1 + math.exp(lam1 - lam0) * (x / s0 - p0))


def _poly_coeffs(degree: int, dim: int = 3) -> np.ndarray:
    return np.random.default_rng(degree + 10).normal(size=(degree + 1, dim))


def _start(schedule, n: int = 4) -> torch.Tensor:
    return torch.randn((n, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * \
        math.hypot(*schedule.alpha_sigma(schedule.t_max))


def _predict_name(data: bool) -> str:
    return "dpmsolver++" if data else "dpmsolver"


def test_polynomial_closed_form_matches_scipy():
    """The closed form used as truth below agrees with a tight DOP853 solve of the lambda-ODE."""
    from scipy.integrate import solve_ivp

    schedule = dp.LinearVP()
    for data in (True, False):
        den = PolynomialDenoiser(schedule, _poly_coeffs(2), data=data)
        x = _start(schedule)
        lam0, lam1 = schedule.log_snr_range
        y0 = (x / schedule.alpha(schedule.t_max) if data else x / schedule.sigma(schedule.t_max)).numpy()

        def rhs(lam, y, den=den):
            m = den.poly(lam)
            return (m - y.reshape(-1, 3) if den.data else y.reshape(-1, 3) - m).reshape(-1)

        sol = solve_ivp(rhs, (lam0, lam1), y0.reshape(-1), method="DOP853", rtol=1e-12, atol=1e-12)
        scale = schedule.alpha(schedule.t_min) if data else schedule.sigma(schedule.t_min)
        ref = torch.from_numpy(sol.y[:, -1].reshape(-1, 3) * scale)
        closed = den.exact_solution(x, schedule.t_max, schedule.t_min)
        assert _rel_err(closed, ref) < 1e-9


@pytest.mark.parametrize("grid", ["logSNR", "time_uniform"])
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_taylor_exact_for_degree_order_minus_one(order, data, schedule_name, grid):
    """Singlestep order p (split='fixed', whole blocks of p grid intervals) is exact for degree <= p - 1,
    on the whole schedule range, on a logSNR grid and on a time-uniform grid (non-uniform in lambda)."""
    schedule = SCHEDULES[schedule_name]()
    x = _start(schedule)
    for degree in range(order):
        den = PolynomialDenoiser(schedule, _poly_coeffs(degree), data=data)
        truth = den.exact_solution(x, schedule.t_max, schedule.t_min)
        for steps in (order, 2 * order):
            sol = dp.sample(den, x, _predict_name(data), method="singlestep", order=order, solver_type="taylor",
                            split="fixed", steps=steps, grid=grid, progress=False)
            assert _rel_err(sol.x, truth) < EXACT, (degree, steps)


def _one_step_errors(den, solver, ts) -> list[float]:
    """Drive the solver one evaluation at a time; after every completed step put the exact solution into the
    state, so each reported error is the error of one step taken from the exact solution (with exact history,
    since the prediction does not depend on x)."""
    schedule = den.schedule
    x0 = _start(schedule)
    state = solver.init(schedule, ts, x0)
    errors = []
    while not solver.done(state):
        x_eval, t = solver.ask(state)
        before, state = state, solver.tell(state, den(x_eval, t))
        if state.anchor_index != before.anchor_index:  # the solution moved (not a singlestep stage point)
            truth = den.exact_solution(x0, float(ts[0]), state.t)
            errors.append(_rel_err(state.x, truth))
            state = dataclasses.replace(state, x=truth, x_eval=truth)
    return errors


@pytest.mark.parametrize("schedule_name", ["discrete", "edm", "flow"])
@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_taylor_step_exact_for_degree_order_minus_one(order, data, schedule_name):
    """A multistep order-p step that uses p predictions is exact for degree p - 1 (the first order - 1 steps
    have fewer predictions and are exact only for lower degrees, which is checked too)."""
    schedule = SCHEDULES[schedule_name]()
    ts = dp.make_grid(schedule, 8, "logSNR")
    den = PolynomialDenoiser(schedule, _poly_coeffs(order - 1), data=data)
    for warmup in ("singlestep", "lower_order"):
        solver = dp.get_solver(_predict_name(data), order=order, solver_type="taylor", warmup=warmup)
        errors = _one_step_errors(den, solver, ts)
        full = errors[order - 1:] if warmup == "lower_order" else errors[-(8 - (order - 1)):]
        assert max(full) < EXACT, (warmup, errors)
        if order > 1:
            assert errors[0] > 1e-6, "a warmup step with fewer predictions cannot be exact for degree p - 1"
    # And every step, warmup included, is exact for degree p - 2.
    if order > 1:
        low = PolynomialDenoiser(schedule, _poly_coeffs(order - 2), data=data)
        solver = dp.get_solver(_predict_name(data), order=order, solver_type="taylor")
        assert max(_one_step_errors(low, solver, ts)) < EXACT


@pytest.mark.parametrize("schedule_name", ["discrete", "flow"])
@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_taylor_exact_for_degree_order_minus_one(order, data, schedule_name):
    schedule = SCHEDULES[schedule_name]()
    x = _start(schedule)
    den = PolynomialDenoiser(schedule, _poly_coeffs(order - 1), data=data)
    truth = den.exact_solution(x, schedule.t_max, schedule.t_min)
    sol = dp.sample(den, x, _predict_name(data), method="adaptive", order=order, solver_type="taylor",
                    progress=False)
    assert sol.stats["accepted"] >= 1
    assert _rel_err(sol.x, truth) < EXACT


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
def test_dpmsolver_rule_order2_is_not_exact_for_degree_one(data, schedule_name):
    """DPM-Solver-2 / DPM-Solver++(2S) and (2M) with solver_type='dpmsolver' weight the first difference by
    W0/2 instead of the Taylor weight h phi_2: exact for constants, not for degree 1 (unlike 'taylor')."""
    schedule = SCHEDULES[schedule_name]()
    x = _start(schedule)
    name = _predict_name(data)
    linear = PolynomialDenoiser(schedule, _poly_coeffs(1), data=data)
    const = PolynomialDenoiser(schedule, _poly_coeffs(0), data=data)
    for den, exact in ((linear, False), (const, True)):
        truth = den.exact_solution(x, schedule.t_max, schedule.t_min)
        single = dp.sample(den, x, name, method="singlestep", order=2, solver_type="dpmsolver", split="fixed",
                           steps=4, progress=False)
        taylor = dp.sample(den, x, name, method="singlestep", order=2, solver_type="taylor", split="fixed",
                           steps=4, progress=False)
        assert _rel_err(taylor.x, truth) < EXACT
        if exact:
            assert _rel_err(single.x, truth) < EXACT
        else:
            assert _rel_err(single.x, truth) > 1e-4
    ts = dp.make_grid(schedule, 6, "logSNR")
    solver = dp.get_solver(name, order=2, solver_type="dpmsolver")
    assert min(_one_step_errors(linear, solver, ts)[1:]) > 100 * EXACT  # 2M steps with two predictions
    assert max(_one_step_errors(const, solver, ts)) < EXACT


@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
def test_dpmsolver_rule_order3_exact_for_degree_one_only(data):
    """DPM-Solver-3 (singlestep) and the reference 3M (multistep) under 'dpmsolver' are exact for degree 1
    but not for degree 2 (3M: half the second-difference weight; DPM-Solver-3: only the far point)."""
    schedule = dp.DiscreteVP.linear()
    x = _start(schedule)
    name = _predict_name(data)
    ts = dp.make_grid(schedule, 6, "logSNR")
    for degree, exact in ((1, True), (2, False)):
        den = PolynomialDenoiser(schedule, _poly_coeffs(degree), data=data)
        truth = den.exact_solution(x, schedule.t_max, schedule.t_min)
        single = dp.sample(den, x, name, method="singlestep", order=3, solver_type="dpmsolver", split="fixed",
                           steps=6, progress=False)
        steps_3m = _one_step_errors(den, dp.get_solver(name, order=3, solver_type="dpmsolver"), ts)[2:]
        if exact:
            assert _rel_err(single.x, truth) < EXACT
            assert max(steps_3m) < EXACT
        else:
            assert _rel_err(single.x, truth) > 1e-6
            assert min(steps_3m) > 1e-8
