"""ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs for diffusion
models", arXiv:2309.06169), as ComfyUI's ``er_sde`` sampler, on the fixed-grid engine for every schedule.

In ``y = x / alpha`` and ``s = sigma~ = sigma / alpha`` the extended reverse-time SDE family with noise scaler
phi integrates exactly to (Cui et al. 2023, Eq. 12-13 in VE form)

    y_t = r y_s + phi(s_t) Int_{s_t}^{s_s} x0(s) phi'(s) / phi(s)^2 ds + sqrt(s_t^2 - s_s^2 r^2) z,
    r = phi(s_t) / phi(s_s).

Expanding x0 in a Taylor series in s around s_s and integrating by parts gives the stage-k terms
``(1 - r) x0``, ``(ds + phi_t S_1) x0'`` and ``(ds^2 / 2 + phi_t S_2) x0''`` with ``ds = s_t - s_s``,
``S_1 = Int ds / phi`` and ``S_2 = Int (s - s_s) / phi ds`` over [s_t, s_s]; the derivatives are divided
differences of the last predictions in s (ER-SDE-Solver-1/2/3). phi(s) = s gives the probability-flow ODE (no
noise: s_t^2 - s_s^2 r^2 = 0).
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_count, check_order
from ._exponential import Node
from .base import grid_nodes, stages_from
from .stochastic import StochasticSolver

SOLVER_TYPES = ("er-sde", "reverse-sde", "ode")
_GAUSS = np.polynomial.legendre.leggauss(32)


def _log_phi(solver_type: str, eta: float, s):
    """log of the noise scaler phi(s) (ComfyUI's SamplerER_SDE): 'er-sde' ``s (e^{s^0.3} + 10)^eta`` (Cui et al.
    2023's choice at eta = 1), 'reverse-sde' ``s^(eta + 1)`` (the reverse-time SDE), 'ode' ``s``."""
    s = np.asarray(s, dtype=np.float64)
    if solver_type == "ode" or eta == 0.0:
        return np.log(s)
    if solver_type == "reverse-sde":
        return (eta + 1.0) * np.log(s)
    return np.log(s) + eta * np.log(np.exp(s**0.3) + 10.0)


class ERSDE(StochasticSolver):
    """ER-SDE-Solver-1/2/3 (Cui et al. 2023; ComfyUI ``er_sde``), in sigma-space for every schedule.

    One evaluation per step; integrates x0. ``max_stage`` (1-3) is the number of Taylor terms in sigma~ (the
    first steps use fewer, as history builds up): with exact integrals a step is exact when x0 is a polynomial of
    degree ``max_stage - 1`` in sigma~. Order ``min(max_stage, 2)`` without noise (the first, Euler step caps it
    at 2). ``solver_type``: 'er-sde' (noise scaler ``s (e^{s^0.3} + 10)^eta``, the paper's), 'reverse-sde'
    (``s^(eta + 1)``) or 'ode'; ``eta = 0`` or 'ode' is the probability-flow ODE (deterministic).
    ``integration_points``: None integrates S_1, S_2 exactly (32-point Gauss-Legendre in log sigma~); an int is
    ComfyUI's left Riemann sum with that many points (200 there), whose error ~ h / points makes the method
    formally first order.
    """

    def __init__(self, solver_type: str = "er-sde", eta: float = 1.0, max_stage: int = 3, s_noise: float = 1.0,
                 integration_points: int | None = None, noise="gaussian"):
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"ERSDE: solver_type must be one of {', '.join(map(repr, SOLVER_TYPES))}, got "
                             f"{solver_type!r}.")
        self.solver_type = solver_type
        self._configure_noise(eta, s_noise, noise)
        self.max_stage = check_order("ERSDE max_stage", max_stage, (1, 2, 3))
        self.integration_points = (None if integration_points is None
                                   else check_count("integration_points", integration_points, 1))

    @property
    def stochastic(self) -> bool:
        return self.solver_type != "ode" and self.eta > 0 and self.s_noise > 0

    @property
    def order(self) -> int:
        return 1 if self.integration_points is not None else min(self.max_stage, 2)

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return steps

    def _integrals(self, s_t: float, s_s: float) -> tuple[float, float]:
        """S_1 = Int_{s_t}^{s_s} ds / phi(s), S_2 = Int_{s_t}^{s_s} (s - s_s) / phi(s) ds."""
        if self.integration_points is not None:  # ComfyUI's left Riemann sum
            step = (s_s - s_t) / self.integration_points
            pos = s_t + np.arange(self.integration_points, dtype=np.float64) * step
            inv = np.exp(-_log_phi(self.solver_type, self.eta, pos))
            return float(np.sum(inv) * step), float(np.sum((pos - s_s) * inv) * step)
        x, w = _GAUSS  # in u = log s: ds = s du, smooth integrands even for s_s / s_t >> 1
        lo, hi = math.log(s_t), math.log(s_s)
        u = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
        s = np.exp(u)
        f = s * np.exp(-_log_phi(self.solver_type, self.eta, s)) * (0.5 * (hi - lo))
        return float(np.dot(w, f)), float(np.dot(w, (s - s_s) * f))

    def plan(self, schedule, ts):
        nodes = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(nodes))
        sig = [math.exp(-n.lam) for n in nodes]
        specs = []
        for i, (s, t) in enumerate(zip(nodes[:-1], nodes[1:])):
            if t.log_sigma == -math.inf:
                specs.append((i, (i,), 0.0, (1.0,), 0.0, True))
                continue
            specs.append(self._step(s, t, sig, i, min(self.max_stage, i + 1)))
        return tuple(nodes), stages_from(specs)

    def _step(self, s: Node, t: Node, sig, i: int, stages: int):
        s_s, s_t = sig[i], sig[i + 1]
        log_phi_s, log_phi_t = _log_phi(self.solver_type, self.eta, [s_s, s_t])
        r = math.exp(log_phi_t - log_phi_s)
        phi_t, alpha = math.exp(log_phi_t), t.alpha
        coeffs = [alpha * -math.expm1(log_phi_t - log_phi_s), 0.0, 0.0]
        if stages >= 2:
            s1, s2 = self._integrals(s_t, s_s)
            ds = s_t - s_s
            d1 = 1.0 / (s_s - sig[i - 1])  # x0' ~ d1 (m_i - m_{i-1})
            c2 = alpha * (ds + s1 * phi_t)
            coeffs[0] += c2 * d1
            coeffs[1] -= c2 * d1
            if stages >= 3:  # x0'' ~ e (d1 (m_i - m_{i-1}) - d0 (m_{i-1} - m_{i-2}))
                d0, e = 1.0 / (sig[i - 1] - sig[i - 2]), 2.0 / (s_s - sig[i - 2])
                c3 = alpha * (0.5 * ds * ds + s2 * phi_t) * e
                coeffs[0] += c3 * d1
                coeffs[1] -= c3 * (d1 + d0)
                coeffs[2] += c3 * d0
        # phi(s) = s (the ODE): s_t^2 - (s_s r)^2 is 0 up to round-off, kept exactly 0 here.
        noise = alpha * math.sqrt(max(s_t * s_t - (s_s * r) ** 2, 0.0)) * self.s_noise if self.stochastic else 0.0
        a = math.exp(t.log_alpha - s.log_alpha) * r
        return i, tuple(range(i, i - stages, -1)), a, tuple(coeffs[:stages]), noise, True

    def __repr__(self):
        return (f"ERSDE(solver_type={self.solver_type!r}, eta={self.eta}, max_stage={self.max_stage}, "
                f"s_noise={self.s_noise}, integration_points={self.integration_points}, noise={self.noise!r})")
