"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion models",
NeurIPS 2023, arXiv:2309.05019): stochastic Adams predictor-corrector on the fixed-grid engine.

With stochasticity tau, the SDE family of the paper integrates exactly (data prediction, their Eq. 12) to

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + alpha_t Int (1 + tau^2) e^{-(1 + tau^2)(lambda_t - l)} x0(l) dl
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,

which is SDE-DPM-Solver++'s step with ``eta = tau^2`` (``_exponential.Form``). The SA-Predictor integrates the
Lagrange polynomial through the last ``predictor_order`` predictions exactly (``Rule.TAYLOR``); the
SA-Corrector, when the evaluation at the predicted point arrives, takes the same step again through the last
``corrector_order`` predictions including the new one, with the SAME noise (so the corrected point is the
predicted one plus the difference of the two deterministic parts). The correction of x_k is folded into the
coefficients of the step from x_k (x_{k+1} = A x_k^c + ... = A x_k^p + A dC + ...): no extra state, and the
stages stay linear combinations of stored predictions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

from .._checks import check_number, check_order
from ._exponential import Form, Rule, step_coefficients
from .base import grid_nodes, stages_from
from .stochastic import StochasticSolver


class SASolver(StochasticSolver):
    """SA-Solver (Xue et al. 2023; diffusers ``SASolverScheduler``, ComfyUI ``sa_solver`` / ``sa_solver_pece``).

    Stochastic Adams predictor (``predictor_order`` 1-4 points) with a predict-evaluate-correct corrector
    (``corrector_order`` 0-4 points, the new one included; 0: none), in data prediction. One evaluation per step;
    ``pece=True`` evaluates the model again at each corrected point (PECE, ComfyUI's ``sa_solver_pece``: 2 per
    step but the first). ``tau``: the stochasticity (a float >= 0, or ``tau(t_start, t_end) -> float`` per step, in
    the schedule's times; tau = 0 is the ODE: predictor-only it equals ``dpmsolver++`` multistep with
    ``solver_type='taylor'``, ``warmup='lower_order'``). ``simple_order_2``: two-point steps weight the difference
    by ``alpha_t (1 + tau^2) h / 2`` (the UniPC-like B(h) = h variant; diffusers always does, ComfyUI on request)
    instead of the exact Lagrange integral. ``lower_order_final``: diffusers' orders for the last steps (predictor
    ``min(p, M - k)``, corrector ``min(c, M - k + 2)`` at step k of M). Declared order: that of tau = 0 (e.g. 3
    for predictor 3 / corrector 4; 2 with ``lower_order_final``).
    """

    def __init__(self, predictor_order: int = 3, corrector_order: int = 4, tau: float | Callable = 1.0,
                 pece: bool = False, simple_order_2: bool = False, lower_order_final: bool = False,
                 s_noise: float = 1.0, noise="gaussian"):
        self.predictor_order = check_order("SASolver predictor_order", predictor_order, (1, 2, 3, 4))
        self.corrector_order = check_order("SASolver corrector_order", corrector_order, (0, 1, 2, 3, 4))
        if callable(tau):
            self.tau = tau
            self._configure_noise(1.0, s_noise, noise, eta_name="tau")
        else:
            self._configure_noise(tau, s_noise, noise, eta_name="tau")
            self.tau = self.eta
        self.pece, self.simple_order_2 = bool(pece), bool(simple_order_2)
        self.lower_order_final = bool(lower_order_final)

    def _orders(self, real_steps: int, evaluated: int) -> tuple[list[int], dict[int, int]]:
        """Predictor points per real step k, corrector points per corrected grid index k (1 <= k < evaluated)."""
        m, p, c = real_steps, self.predictor_order, self.corrector_order
        final = self.lower_order_final
        preds = [min(p, k + 1, m - k if final else p) for k in range(m)]
        corrs = {k: min(c, k + 1, m - k + 2 if final else c) for k in range(1, evaluated)} if c else {}
        return preds, corrs

    @property
    def order(self) -> int:
        # Local error of the step landing on x_{k+1}: O(h^(p_k + 1)) uncorrected; corrected (PEC) O(h^min(c + 1, p_k
        # + 2)). The bulk of the steps loses one power globally, the boundedly many warm-up / final steps do not.
        m = 64
        preds, corrs = self._orders(m, m)
        local = [min(corrs[k + 1] + 1, p + 2) if k + 1 in corrs else p + 1 for k, p in enumerate(preds)]
        edge = max(self.predictor_order, self.corrector_order) + 2
        return min(min(e - 1 for e in local[edge:m - edge]), min(local[:edge] + local[m - edge:]))

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return 2 * steps - 1 if self.pece and self.corrector_order and steps >= 1 else steps

    def _tau(self, s, t) -> float:
        if not callable(self.tau):
            return self.tau
        return check_number("tau(t_start, t_end)", self.tau(s.t, t.t), 0.0, owner="SASolver")

    def plan(self, schedule, ts):
        grid = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(grid))
        to_zero = grid[-1].log_sigma == -math.inf
        m = len(grid) - 1 - to_zero  # real steps (a final jump to sigma = 0 excluded)
        preds, corrs = self._orders(m, len(grid) - 1)
        forms = [Form(data=True, eta=self._tau(grid[k], grid[k + 1]) ** 2) for k in range(m)]

        def weights(form, s, t, points, rule):
            h = grid[t].lam - grid[s].lam
            a, c = step_coefficients(form, grid[s], grid[t], [(grid[j].lam - grid[s].lam) / h for j in points], rule)
            return a, dict(zip(points, map(float, c)))

        def rule(points):
            return Rule.BH1 if len(points) == 2 and self.simple_order_2 else Rule.TAYLOR

        nodes, specs, fin, pred = [], [], {}, {}
        for k in range(len(grid) - 1):  # the evaluated grid times
            ev = len(nodes)
            nodes.append(grid[k])
            delta = {}  # the correction x_k^c - x_k^p, per grid index of the prediction (k: the one at x_k^p)
            if k in corrs and (k < m or self.pece):
                ck = corrs[k]
                points = (k,) if ck == 1 else (k - 1, k) + tuple(range(k - 2, k - ck, -1))
                _, cc = weights(forms[k - 1], k - 1, k, points, rule(points))
                delta = defaultdict(float, cc)
                for j, c in pred[k - 1].items():
                    delta[j] -= c
            at = {j: fin[j] for j in delta if j < k}
            at[k] = ev
            if delta and self.pece:  # the corrected point, evaluated again at the same time
                specs.append(_spec(ev, 1.0, {at[j]: c for j, c in delta.items()}, 0.0, False))
                fin[k] = len(nodes)
                nodes.append(grid[k])
            else:
                fin[k] = ev
            if k == m:  # the jump to sigma = 0: the (last) x0 prediction
                specs.append((ev, (fin[k],), 0.0, (1.0,), 0.0, True))
                continue
            points = tuple(range(k, k - preds[k], -1))
            a, pred[k] = weights(forms[k], k, k + 1, points, rule(points))
            total = defaultdict(float)
            for j, c in delta.items():
                total[at[j]] += a * c
            for j, c in pred[k].items():
                total[fin[j]] += c
            noise = forms[k].noise_std(grid[k], grid[k + 1]) * self.s_noise
            specs.append(_spec(ev, a, total, noise, True))
        nodes.append(grid[-1])
        return tuple(nodes), stages_from(specs)

    def __repr__(self):
        return (f"SASolver(predictor_order={self.predictor_order}, corrector_order={self.corrector_order}, "
                f"tau={self.tau!r}, pece={self.pece}, simple_order_2={self.simple_order_2}, "
                f"lower_order_final={self.lower_order_final}, s_noise={self.s_noise}, noise={self.noise!r})")


def _spec(anchor: int, a: float, by_node: dict, noise_std: float, completes: bool):
    points = tuple(sorted(by_node, reverse=True))
    return anchor, points, a, tuple(by_node[j] for j in points), noise_std, completes
