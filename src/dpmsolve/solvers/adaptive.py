"""Adaptive step size DPM-Solver-12 and DPM-Solver-23 (Lu et al. 2022, Sec. 4.2 and Alg. 4-5).

Each trial step from s with size h in lambda computes a lower-order and a higher-order singlestep solution that
share their model evaluations: DPM-Solver-1 and -2 (r1 = 1/2) for -12, DPM-Solver-2 (r1 = 1/3) and -3 (r1 = 1/3,
r2 = 2/3) for -23, both with ``solver_type``'s weighting. As the reference (``dpm_solver_adaptive`` of
LuChengTHU/dpm-solver), the trial is accepted when ``E = max_batch RMS((x_hi - x_lo) / delta)`` is at most 1, with
``delta = max(atol, rtol * max(|x_lo|, |x_prev|))`` and x_prev the lower-order solution of the last accepted step
(the start x before the first); the solution moves to x_hi, and after every trial
``h <- min(theta h E^{-1/order}, lambda_end - lambda_s)``. Unlike the reference, the evaluation at s is kept after
a rejected trial, so a rejection costs ``order - 1`` evaluations instead of ``order`` (same steps and sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .._checks import check_count, check_number, check_real
from ..model import Prediction
from ..schedules import Schedule
from ._exponential import Form, Node, Rule, combine, step_coefficients
from .base import Solver
from .dpm_solver import configure

# Intermediate points (in units of h) of the lower/higher pair: -12 uses r1 = 1/2, -23 uses 1/3 and 2/3.
_STAGE_RHOS = {2: (0.0, 0.5), 3: (0.0, 1.0 / 3.0, 2.0 / 3.0)}


@dataclass(frozen=True)
class AdaptiveState:
    x: torch.Tensor
    x_prev: torch.Tensor        # the lower-order solution of the last accepted step (x at the start): error scale
    schedule: Schedule
    node: Node                  # where x is
    end: Node
    h: float                    # next trial step in lambda (signed: > 0 towards data)
    evals: tuple[torch.Tensor, ...] = ()   # predictions of the current trial, at node + rho_j h
    x_eval: torch.Tensor | None = None
    accepted: int = 0
    rejected: int = 0

    @property
    def t(self) -> float:
        return self.node.t

    @property
    def i(self) -> int:
        return self.accepted


class AdaptiveDPMSolver(Solver):
    """Adaptive DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``), data or noise prediction.

    Only the first and last grid times are used. ``rtol``/``atol`` are the reference defaults (0.05, 0.0078,
    tuned for images in [-1, 1]); ``h_init`` is the first trial step in lambda, ``theta`` the safety factor.
    The NFE it used is reported by ``sample`` (``Solution.nfe``).
    """

    adaptive = True

    def __init__(self, order: int = 3, predict: str = "data", solver_type: str = "dpmsolver",
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, theta: float = 0.9,
                 max_trials: int = 10_000):
        configure(self, order, (2, 3), predict, solver_type)
        owner = type(self).__name__
        self.rtol, self.atol = check_real("rtol", rtol, owner), check_real("atol", atol, owner)
        if not (0 < self.rtol < math.inf and 0 < self.atol < math.inf):
            raise ValueError(f"Adaptive tolerances must be > 0; got rtol={rtol!r}, atol={atol!r}; pass finite "
                             "positive numbers, e.g. rtol=0.05, atol=0.0078.")
        self.h_init = check_number("h_init", h_init, 0.0, low_open=True, owner=owner)
        self.theta = check_number("theta", theta, 0.0, 1.0, low_open=True, owner=owner)
        self.max_trials = check_count("max_trials", max_trials)
        self.form = Form(data=self.integrates == "x0")

    @property
    def order(self) -> int:
        return self._order

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> None:
        return None

    def init(self, schedule, ts, x, generator=None) -> AdaptiveState:
        ts = np.asarray(ts, dtype=np.float64)
        start, end = Node.at(schedule, ts[0]), Node.at(schedule, ts[-1])
        h = float(np.sign(end.lam - start.lam)) * min(self.h_init, abs(end.lam - start.lam))
        return AdaptiveState(x=x, x_prev=x, schedule=schedule, node=start, end=end, h=h, x_eval=x)

    def _node(self, state: AdaptiveState, rho: float) -> Node:
        if rho == 1.0 and abs(state.node.lam + state.h - state.end.lam) <= 1e-12 * max(1.0, abs(state.end.lam)):
            return state.end
        return Node.at_log_snr(state.schedule, state.node.lam + rho * state.h)

    def ask(self, state: AdaptiveState):
        rho = _STAGE_RHOS[self._order][len(state.evals)]
        return state.x_eval, self._node(state, rho).t

    def _update(self, state: AdaptiveState, rhos, target: Node, rule: Rule) -> torch.Tensor:
        a, c = step_coefficients(self.form, state.node, target, [r * state.h / (target.lam - state.node.lam)
                                                               for r in rhos], rule)
        return combine(a, state.x, c, state.evals[: len(rhos)])

    def tell(self, state: AdaptiveState, pred: Prediction) -> AdaptiveState:
        rhos = _STAGE_RHOS[self._order]
        m = self.form.pick(pred)
        n = len(state.evals) + 1
        if n < len(rhos):  # kept for the rest of the trial: own a copy (the network may reuse its output buffer)
            state = replace(state, evals=state.evals + (m.clone(),))
            # next intermediate point: Taylor step of order n from the anchor
            return replace(state, x_eval=self._update(state, rhos[:n], self._node(state, rhos[n]), Rule.TAYLOR))
        state = replace(state, evals=state.evals + (m,))
        target = self._node(state, 1.0)
        x_lo = self._update(state, rhos[:-1], target, self.rule)
        x_hi = self._update(state, rhos, target, self.rule)
        err = 0.0  # an empty batch: nothing to control
        if x_lo.numel():
            scale = torch.maximum(x_lo.abs(), state.x_prev.abs()).mul_(self.rtol).clamp_(min=self.atol)
            err = ((x_hi - x_lo) / scale).pow(2).reshape(x_lo.shape[0], -1).mean(1).sqrt().max().item()
        trials = state.accepted + state.rejected + 1
        if trials > self.max_trials or not np.isfinite(err):
            raise RuntimeError(f"Adaptive DPM-Solver failed at t={state.node.t:.6g} after {trials} trials "
                               f"(error estimate {err}); loosen rtol/atol or check the model.")
        remaining = state.end.lam - target.lam if err <= 1.0 else state.end.lam - state.node.lam
        h_new = self.theta * abs(state.h) * max(err, 1e-10) ** (-1.0 / self._order)
        h_new = float(np.sign(remaining)) * min(h_new, abs(remaining)) if remaining != 0 else 0.0
        if err <= 1.0:
            return replace(state, x=x_hi, x_prev=x_lo, node=target, h=h_new, evals=(), x_eval=x_hi,
                           accepted=state.accepted + 1)
        # Rejected: keep the evaluation at the anchor, retry with a smaller step.
        return replace(state, h=h_new, evals=state.evals[:1], x_eval=self._update(
            replace(state, h=h_new), rhos[:1], Node.at_log_snr(state.schedule, state.node.lam + rhos[1] * h_new),
            Rule.TAYLOR), rejected=state.rejected + 1)

    def done(self, state: AdaptiveState) -> bool:
        return state.node is state.end or state.node.t == state.end.t

    def step_completed(self, before, after) -> bool:
        return after.accepted != before.accepted

    def __repr__(self):
        return (f"AdaptiveDPMSolver(order={self._order}, predict={self.predict!r}, rtol={self.rtol}, "
                f"atol={self.atol})")
