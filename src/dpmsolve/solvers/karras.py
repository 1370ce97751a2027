"""Euler, Heun and DPM-2 in sigma-space (Karras et al. 2022; k-diffusion), on the shared fixed-grid engine.

All three integrate the probability-flow ODE in the scaled coordinates ``y = x / alpha`` with the VE noise
level ``sigma~ = sigma / alpha = e^{-lambda}``, where it reads ``dy/dsigma~ = (y - x0) / sigma~`` for every
schedule (VP, EDM/VE, rectified flow). Each update is linear in the solution at the step start and in the x0
predictions, so it is a :class:`~dpmsolve.solvers.base.Stage` like any other solver's: the coefficients are
host float64, computed once per grid, and the engine's ask/tell loop drives them. The two-evaluation methods
insert their second evaluation point as an extra (non-completing) node after each grid time, as a singlestep
block does; a step to sigma = 0 is an Euler step (one evaluation: it returns the x0 prediction), as in EDM
Alg. 2 and k-diffusion.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedules import Schedule
from ._exponential import Node
from .base import FixedGridSolver, grid_nodes, stages_from


def _euler(s: Node, t: Node) -> tuple[float, float]:
    """(a, c) of ``x_t = a x_s + c x0_s``: ``y_t = y_s + (sigma~_t - sigma~_s) (y_s - x0_s) / sigma~_s``."""
    return math.exp(t.log_sigma - s.log_sigma), t.alpha * -math.expm1(s.lam - t.lam)


class _SigmaSpaceSolver(FixedGridSolver):
    """Shared planning of the sigma-space methods: one step per grid interval, ``nfe`` evaluations each."""

    integrates = "x0"
    _evaluations: int = 1  # per step (a step to sigma = 0 always takes one)

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return self._evaluations * steps - (self._evaluations - 1) * bool(ends_at_zero and steps >= 1)

    def _stages(self, steps):  # the layout without a step to sigma = 0 (``plan`` builds the coefficients)
        k = self._evaluations
        return [(i - i % k, tuple(range(i - i % k, i + 1)), None, i % k == k - 1) for i in range(k * steps)]

    def _second(self, schedule: Schedule, s: Node, t: Node):
        """(middle node, (a, c) to it, (a, c0, c1) of the step s -> t): the hook of the two-evaluation methods
        (Heun, DPM-2 override it); ``plan`` calls it only when ``_evaluations == 2``, so Euler never does."""
        raise TypeError(f"{type(self).__name__} takes one evaluation per step and has no second point.")

    def plan(self, schedule: Schedule, ts):
        grid = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(grid))
        nodes, specs = [grid[0]], []  # specs as in ``stages_from``
        for s, t in zip(grid[:-1], grid[1:]):
            i = len(nodes) - 1
            if t.log_sigma == -math.inf:  # Euler to sigma = 0: the x0 prediction itself
                specs.append((i, (i,), 0.0, (1.0,), 0.0, True))
            elif self._evaluations == 1:
                a, c = _euler(s, t)
                specs.append((i, (i,), a, (c,), 0.0, True))
            else:
                mid, (a1, c1), (a2, c20, c21) = self._second(schedule, s, t)
                specs.append((i, (i,), a1, (c1,), 0.0, False))
                specs.append((i, (i, i + 1), a2, (c20, c21), 0.0, True))
                nodes.append(mid)
            nodes.append(t)
        return tuple(nodes), stages_from(specs)

    def step_completed(self, before, after) -> bool:
        return after.anchor_index != before.anchor_index

    def current(self, state):
        return state.x, state.t


class Euler(_SigmaSpaceSolver):
    """Euler's method in sigma-space (Karras et al. 2022, Alg. 1 without churn; k-diffusion ``sample_euler``).

    Order 1, one evaluation per step; integrates the x0 prediction. In the scaled coordinates y = x / alpha,
    sigma~ = sigma / alpha: ``d = (y - x0) / sigma~``, ``y' = y + (sigma~' - sigma~) d``. This is DDIM
    (eta = 0), i.e. DPM-Solver-1 / DPM-Solver++-1, for every schedule (Karras et al. 2022, Sec. 3).
    """

    @property
    def order(self) -> int:
        return 1

    def __repr__(self):
        return "Euler()"


class Heun(_SigmaSpaceSolver):
    """Heun's second-order method in sigma-space (Karras et al. 2022, Alg. 2 without churn; k-diffusion
    ``sample_heun``).

    Order 2, two evaluations per step (an Euler predictor to sigma~', then the trapezoid of the two slopes);
    the step to sigma = 0 is a plain Euler step (one evaluation), so a grid of n steps ending at 0 costs
    2n - 1. Integrates the x0 prediction, in y = x / alpha, sigma~ = sigma / alpha for every schedule.
    """

    _evaluations = 2

    @property
    def order(self) -> int:
        return 2

    def _second(self, schedule, s, t):
        # y* = r y + (1 - r) D0 (Euler), r = sigma~'/sigma~ = e^{-h}; y' = y + (sigma~' - sigma~)(d + d*)/2 with
        # d* = (y* - D1)/sigma~' gives y' = r y + (1 - r)(1 - (e^h - 1)) D0 / 2 + (e^h - 1) D1 / 2.
        h = t.lam - s.lam
        em, ep = math.expm1(-h), math.expm1(h)
        return t, _euler(s, t), (math.exp(t.log_sigma - s.log_sigma), t.alpha * -em * (1.0 - ep) / 2.0,
                                 t.alpha * ep / 2.0)

    def __repr__(self):
        return "Heun()"


class DPM2(_SigmaSpaceSolver):
    """k-diffusion's DPM-2 (``sample_dpm_2`` without churn): the midpoint method in sigma-space.

    Order 2, two evaluations per step: an Euler step to sigma~_mid = sqrt(sigma~ sigma~') (the midpoint in
    lambda), then ``y' = y + (sigma~' - sigma~) d_mid``; the step to sigma = 0 is an Euler step (one
    evaluation). Integrates the x0 prediction, in y = x / alpha, sigma~ = sigma / alpha. Related to, but not the
    same as, DPM-Solver-2 (Lu et al. 2022), which integrates the linear part exactly.
    """

    _evaluations = 2

    @property
    def order(self) -> int:
        return 2

    def _second(self, schedule, s, t):
        mid = Node.at_log_snr(schedule, 0.5 * (s.lam + t.lam))
        # y_mid = rm y + (1 - rm) D0, rm = sigma~_mid / sigma~; y' = y + q (y_mid - D1), q = (sigma~' - sigma~) /
        # sigma~_mid, whose y coefficient 1 + q rm is sigma~'/sigma~.
        q = math.exp(mid.lam - t.lam) - math.exp(mid.lam - s.lam)
        return mid, _euler(s, mid), (math.exp(t.log_sigma - s.log_sigma),
                                     t.alpha * q * -math.expm1(s.lam - mid.lam), -t.alpha * q)

    def __repr__(self):
        return "DPM2()"
