"""Linear multistep peers on the shared fixed-grid engine: DEIS, LMS, iPNDM, iPNDM-v, gradient estimation (on
eps) and RES multistep (on x0); PNDM and PLMS (``pndm.py``) build on the same eps steps.

The eps methods work in the scaled coordinates ``y = x / alpha`` with the VE noise level ``rho = sigma / alpha
= e^{-lambda}``, where the probability-flow ODE reads ``dy/drho = eps`` for every schedule (VP, EDM/VE, rectified
flow); k-diffusion's derivative ``d = (x - D) / sigma`` is this eps. Every step s -> t is

    y_t = y_s + (rho_t - rho_s) sum_j b_j eps_j,   i.e.   x_t = (alpha_t / alpha_s) x_s + c sum_j b_j eps_j,

``c = alpha_t (rho_t - rho_s) = -sigma_t (e^h - 1)``: the DDIM transfer of a combined prediction (PNDM's
"pseudo" step, Liu et al. 2022), exact for constant eps. The methods differ only in the weights b_j
(sum 1): Adams-Bashforth weights of the Lagrange polynomial through the last predictions, integrated in rho
(LMS, iPNDM-v, DEIS rhoAB), in the schedule's t (DEIS tAB), in lambda (DEIS logrho: DPM-Solver's Taylor step),
or fixed equal-step weights (iPNDM, PLMS, gradient estimation). A step to sigma = 0 returns the x0 prediction
(the DDIM transfer of the newest eps), except where the reference integrates its polynomial down to rho = 0
(LMS, PNDM, PLMS).
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from typing import ClassVar

import numpy as np

from .._checks import check_number
from .._checks import check_order as _check_order
from ..schedules import Schedule
from ._exponential import Form, Node, Rule, interpolation_coefficients, step_coefficients
from .base import FixedGridSolver, Stage, grid_nodes, stages_from, warmup_orders

_NOISE = Form(data=False)


def _transfer(s: Node, t: Node) -> tuple[float, float]:
    """(a, c) of the DDIM transfer ``x_t = a x_s + c eps``; t may be sigma = 0."""
    if _is_zero(t):
        a, (c,) = _NOISE.to_zero(s)
        return a, c
    a, w = _NOISE.linear_and_weights(s, t, 1)
    return a, float(w[0])


@functools.lru_cache(maxsize=None)
def _adams_moments(p: int) -> np.ndarray:
    """int_0^1 u^k / k! du = 1 / (k+1)!, k < p: the Taylor weights of a step of unit length."""
    return np.array([1.0 / math.factorial(k + 1) for k in range(p)])


@functools.lru_cache(maxsize=None)
def adams_bashforth(p: int) -> tuple[float, ...]:
    """The equal-step Adams-Bashforth weights of order p, newest first (p = 4: (55, -59, 37, -9) / 24)."""
    return tuple(float(b) for b in interpolation_coefficients(-np.arange(p, dtype=np.float64), _adams_moments(p)))


def adams_weights(positions) -> np.ndarray:
    """b with ``sum_j b_j m_j = int_0^1 P(u) du``, P the polynomial through (positions[j], m_j), positions[0] = 0:
    the variable-step Adams-Bashforth weights in a variable scaled so that the step is [0, 1]."""
    return interpolation_coefficients(positions, _adams_moments(len(positions)))


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    u, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (u + 1.0), 0.5 * w


def _rho(node: Node) -> float:
    return math.exp(node.log_sigma - node.log_alpha)


def rho_adams(schedule: Schedule, grid, i: int, points) -> tuple[float, tuple[float, ...]]:
    """(a, coeffs) of the Adams step i -> i+1 through eps at ``points``, polynomial in rho (LMS, DEIS rhoAB)."""
    s, t = grid[i], grid[i + 1]
    r0, dr = _rho(s), _rho(t) - _rho(s)
    a, c = _transfer(s, t)
    return a, tuple(c * b for b in adams_weights([(_rho(grid[j]) - r0) / dr for j in points]))


def t_adams(schedule: Schedule, grid, i: int, points) -> tuple[float, tuple[float, ...]]:
    """(a, coeffs) of the Adams step polynomial in the schedule's time t, integrated against d rho (DEIS tAB,
    Zhang & Chen 2022). With z = (t - t_s) / (t_t - t_s) and u the step's rho fraction, the weights take
    the moments int_0^1 z(u)^k / k! du (Gauss-Legendre; the k = 0 moment is 1 exactly, so constant eps is exact
    on every schedule, and for EDM, where t = rho, z(u) = u and tAB is rhoAB)."""
    s, t = grid[i], grid[i + 1]
    p = len(points)
    a, c = _transfer(s, t)
    if p == 1:
        return a, (c,)
    u, w = _gauss_legendre()
    r0, r1 = _rho(s), _rho(t)
    z = (np.asarray(schedule.t_from_log_snr(-np.log(r0 + u * (r1 - r0)))) - s.t) / (t.t - s.t)
    moments = np.array([1.0] + [w @ z**k / math.factorial(k) for k in range(1, p)])
    b = interpolation_coefficients([(grid[j].t - s.t) / (t.t - s.t) for j in points], moments)
    return a, tuple(c * float(v) for v in b)


def logrho_adams(schedule: Schedule, grid, i: int, points) -> tuple[float, tuple[float, ...]]:
    """(a, coeffs) of the Adams step polynomial in lambda = -log rho (DEIS's diffusers form 'logrho'): the exact
    integral of the interpolating polynomial, which is DPM-Solver's multistep Taylor step in noise form."""
    s, t = grid[i], grid[i + 1]
    h = t.lam - s.lam
    a, c = step_coefficients(_NOISE, s, t, [(grid[j].lam - s.lam) / h for j in points], Rule.TAYLOR)
    return a, tuple(float(v) for v in c)


def fixed_adams(schedule: Schedule, grid, i: int, points) -> tuple[float, tuple[float, ...]]:
    """(a, coeffs) of the DDIM transfer of the equal-step Adams-Bashforth combination (iPNDM, PLMS)."""
    a, c = _transfer(grid[i], grid[i + 1])
    return a, tuple(c * b for b in adams_bashforth(len(points)))


def _is_zero(node: Node) -> bool:
    return node.log_sigma == -math.inf


class _EpsMultistep(FixedGridSolver):
    """One evaluation per grid time; step i combines the eps of the last ``points`` grid times (see module)."""

    integrates = "eps"
    _multistep_to_zero: ClassVar[bool] = False  # a step to sigma = 0 keeps its multistep weights (else: x0 jump)
    _p: int = 1
    lower_order_final: bool = False

    @abstractmethod
    def _coefficients(self, schedule: Schedule, grid, i: int, points) -> tuple[float, tuple[float, ...]]:
        """(a, coeffs) of step i through the eps at ``points`` (newest first): the method's weights."""

    def _counts(self, steps: int) -> list[int]:
        """How many predictions each step combines: the lower-order warm-up while history builds up."""
        return warmup_orders(self._p, steps, self.lower_order_final)

    def _stages(self, steps):
        return [(i, tuple(range(i, i - p, -1)), Rule.TAYLOR, True) for i, p in enumerate(self._counts(steps))]

    def plan(self, schedule: Schedule, ts):
        grid = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(grid))
        specs = []
        for i, (_, points, _, _) in enumerate(self._stages(len(grid) - 1)):
            if _is_zero(grid[i + 1]) and not self._multistep_to_zero:
                points, (a, c) = (i,), _transfer(grid[i], grid[i + 1])
                specs.append((i, points, a, (c,), 0.0, True))
            else:
                specs.append((i, points, *self._coefficients(schedule, grid, i, points), 0.0, True))
        return tuple(grid), stages_from(specs)

    def step_completed(self, before, after) -> bool:
        return after.anchor_index != before.anchor_index

    def current(self, state):
        return state.x, state.t


def _check_bool(name: str, value, owner: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner} {name} must be True or False, got {type(value).__name__} {value!r}.")
    return bool(value)


DEIS_VARIANTS = {"tab": t_adams, "rhoab": rho_adams, "logrho": logrho_adams}


class DEIS(_EpsMultistep):
    """DEIS (Zhang & Chen 2022): exponential-integrator Adams-Bashforth on eps, orders 1-3 (default 3).

    One evaluation per step, lower orders while history builds up (paper, diffusers); integrates eps, the
    Lagrange polynomial through the last ``order`` predictions integrated against the linear part.
    ``variant``: ``'tab'`` (default; polynomial in the schedule's t, the paper's tAB; 16-point Gauss-Legendre),
    ``'rhoab'`` (in rho = sigma / alpha: k-diffusion's LMS) or ``'logrho'`` (in log rho: diffusers'
    ``DEISMultistepScheduler``, its only form; = multistep DPM-Solver, ``solver_type='taylor'``). On EDM (t = rho)
    tAB is rhoAB. Order 1 is DDIM. The warm-up (and ``lower_order_final``) caps the global order at 2. A step to
    sigma = 0 returns the x0 prediction.
    """

    def __init__(self, order: int = 3, variant: str = "tab", lower_order_final: bool = False):
        self._p = _check_order("DEIS", order, (1, 2, 3))
        if variant not in DEIS_VARIANTS:
            raise ValueError(f"DEIS variant must be one of {', '.join(map(repr, DEIS_VARIANTS))}, got {variant!r}; "
                             "'logrho' reproduces diffusers' DEISMultistepScheduler.")
        self.variant, self._adams = variant, DEIS_VARIANTS[variant]
        self.lower_order_final = _check_bool("lower_order_final", lower_order_final, "DEIS")

    @property
    def order(self) -> int:
        return min(self._p, 2)

    def _coefficients(self, schedule, grid, i, points):
        return self._adams(schedule, grid, i, points)

    def __repr__(self):
        return f"DEIS(order={self._p}, variant={self.variant!r}, lower_order_final={self.lower_order_final})"


class LMS(_EpsMultistep):
    """Linear multistep in sigma-space (k-diffusion ``sample_lms``; diffusers ``LMSDiscreteScheduler``).

    Orders 1-4 (default 4), one evaluation per step, lower orders while history builds up. Integrates eps
    (k-diffusion's d) in y = x / alpha over rho = sigma / alpha: variable-step Adams-Bashforth, the Lagrange
    polynomial in rho integrated exactly, also on the step to sigma = 0. It is DEIS rhoAB, and iPNDM-v but for
    the step to sigma = 0. The warm-up caps the global order at 2.
    """

    _multistep_to_zero = True

    def __init__(self, order: int = 4):
        self._p = _check_order("LMS", order, (1, 2, 3, 4))

    @property
    def order(self) -> int:
        return min(self._p, 2)

    def _coefficients(self, schedule, grid, i, points):
        return rho_adams(schedule, grid, i, points)

    def __repr__(self):
        return f"LMS(order={self._p})"


class IPNDM(_EpsMultistep):
    """iPNDM (Zhang & Chen 2022, the DEIS paper): equal-step Adams-Bashforth on eps with the DDIM transfer.

    Orders 1-4 (default 4: weights (55, -59, 37, -9) / 24), one evaluation per step, lower orders while
    history builds up; integrates eps. In y = x / alpha it is Adams-Bashforth in rho = sigma / alpha with weights
    that assume equal rho steps (ComfyUI ``ipndm``, diffusers ``IPNDMScheduler``). Order 2: the weights are off
    by O(h) on steps not uniform in rho, and the Euler first step caps it at 2 on any grid. A step to sigma = 0
    returns the x0 prediction (ComfyUI). Order 1 is DDIM.
    """

    def __init__(self, order: int = 4):
        self._p = _check_order("IPNDM", order, (1, 2, 3, 4))

    @property
    def order(self) -> int:
        return min(self._p, 2)

    def _coefficients(self, schedule, grid, i, points):
        return fixed_adams(schedule, grid, i, points)

    def __repr__(self):
        return f"IPNDM(order={self._p})"


class IPNDMV(_EpsMultistep):
    """iPNDM-v: iPNDM with variable-step Adams-Bashforth weights (ComfyUI ``ipndm_v``).

    Orders 1-4 (default 4), one evaluation per step, lower orders while history builds up; integrates eps.
    The weights integrate the Lagrange polynomial in rho = sigma / alpha exactly, so it equals LMS except on
    the step to sigma = 0, which returns the x0 prediction. (ComfyUI's closed-form weights differ from exact
    Adams-Bashforth at order 3 on non-uniform steps and at order 4 everywhere.) The warm-up caps the global
    order at 2.
    """

    def __init__(self, order: int = 4):
        self._p = _check_order("IPNDMV", order, (1, 2, 3, 4))

    @property
    def order(self) -> int:
        return min(self._p, 2)

    def _coefficients(self, schedule, grid, i, points):
        return rho_adams(schedule, grid, i, points)

    def __repr__(self):
        return f"IPNDMV(order={self._p})"


class GradientEstimation(_EpsMultistep):
    """Gradient estimation (Permenter & Yuan 2024; ComfyUI ``gradient_estimation``).

    One evaluation per step; integrates eps. Euler (DDIM) steps in y = x / alpha over rho = sigma / alpha with
    the direction ``gamma eps_i + (1 - gamma) eps_{i-1}`` after the first step; the step to sigma = 0 returns
    the x0 prediction. Order 1 (gamma = 1 is DDIM); gamma = 1.5 is equal-step Adams-Bashforth 2, order 2.
    """

    def __init__(self, gamma: float = 2.0):
        self.gamma = check_number("gamma", gamma, owner="GradientEstimation")
        self._p = 2

    @property
    def order(self) -> int:
        return 2 if self.gamma == 1.5 else 1

    def _coefficients(self, schedule, grid, i, points):
        a, c = _transfer(grid[i], grid[i + 1])
        return a, (c,) if len(points) == 1 else (c * self.gamma, c * (1.0 - self.gamma))

    def __repr__(self):
        return f"GradientEstimation(gamma={self.gamma})"


class RESMultistep(FixedGridSolver):
    """RES second-order multistep (Zhang, Song & Chen 2023, "Improved order analysis and design of exponential
    integrator"; ComfyUI ``res_multistep`` without noise).

    Order 2, one evaluation per step (the first is DDIM); integrates x0. Its weights ``b1 = phi_1 - phi_2 / c2``,
    ``b2 = phi_2 / c2`` meet the order conditions exactly: this is multistep DPM-Solver++ 2M with
    ``solver_type='taylor'`` (diffusers' 2M ``heun``) and the lower-order warm-up. A step to sigma = 0 returns
    the x0 prediction.
    """

    integrates = "x0"

    @property
    def order(self) -> int:
        return 2

    def _stages(self, steps):
        return [(i, tuple(range(i, i - p, -1)), Rule.TAYLOR, True)
                for i, p in enumerate(warmup_orders(2, steps, False))]

    def __repr__(self):
        return "RESMultistep()"
