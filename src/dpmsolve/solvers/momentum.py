"""Heavy-ball momentum on a deterministic fixed-grid solver (Wizadwongsa et al. 2023, "Diffusion sampling with
momentum for mitigating divergence artifacts", ICLR 2024: the HB variants of PLMS and DPM-Solver++).

Every completed step of a fixed-grid solver is ``x_{i+1} = a x_i + C d_i``: the exact transfer ``a x_i`` of the
linear part plus the step's weight ``C = sum_j c_j`` times its *direction* ``d_i = sum_j c_j m_j / C``, the
weighted mean of the predictions the step combines (DPM-Solver++ 2M: ``D0 + D1 / 2`` in the paper's notation;
PLMS: the Adams-Bashforth mix of eps; DDIM: the prediction itself). Heavy ball replaces the direction by its
exponential moving average:

    v_i = (1 - beta) v_{i-1} + beta d_i     (v = d at the first completed step),      x_{i+1} = a x_i + C v_i.

``beta = 1`` is the base solver; ``beta < 1`` enlarges the stability region (the paper traces divergence artifacts
at few steps and high guidance to the small stability regions of high-order multistep methods) at the price of
order 1 (the paper proves first-order convergence for HB methods; the lab measures it, ``tests/test_wrappers.py``).

No update formula is written here: the wrapper lets the base solver take its step, reads the direction off the
result, ``d = (x_new - a x) / C``, and moves the solution to ``x_new + (1 - beta) C (v_{i-1} - d)`` (= ``a x + C
v_i``). Intermediate stages of singlestep and pseudo Runge-Kutta blocks are left as they are; the momentum acts on
each completed step. The paper's second method, GHVB (momentum inside the multistep combination, with
coefficients rederived for each order), changes the coefficients themselves and is not a wrapper; it is not here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .._checks import check_number
from ..model import Prediction
from ..schedules import Schedule
from .base import FixedGridSolver, Solver, SolverWrapper, State

__all__ = ["HeavyBall", "MomentumState", "momentum"]


@dataclass(frozen=True)
class MomentumState:
    """The base solver's state and the velocity (direction units; None before the first completed step)."""

    base: State
    velocity: torch.Tensor | None = None


class HeavyBall(SolverWrapper):
    """Polyak heavy-ball momentum on the update direction of a deterministic fixed-grid solver (HB of
    Wizadwongsa et al. 2023).

    Order 1 for ``beta < 1`` (the base's order at ``beta = 1``, where the samples equal the base's bit for bit);
    evaluations per step, what it integrates and the grid placement are the base's. The paper's settings are
    PLMS (``base="plms"``) and DPM-Solver++ 2M (``base="dpmsolver++"``) with beta 0.8-0.9 at high guidance.

    Args:
        base: a registry name (then ``options`` are its options) or a deterministic fixed-grid solver object.
            Not with a predict-evaluate-correct corrector (UniPC, ``corrector="unic"``; the corrector would take
            the step again without the momentum) or a stochastic / adaptive solver.
        beta: momentum weight of the newest direction, ``0 < beta <= 1`` (1: no momentum).
    """

    def __init__(self, base="dpmsolver++", beta: float = 0.8, **options):   # base: Solver | str
        if isinstance(base, str):
            from . import get_solver

            base = get_solver(base, **options)
        elif options:
            raise ValueError(f"HeavyBall options {sorted(options)} go with a base solver given by name; set them on "
                             f"the solver object instead.")
        if not isinstance(base, Solver):
            raise TypeError(f"HeavyBall base must be a registry name or a dpmsolve solver, got {type(base).__name__} "
                            f"{base!r:.80}.")
        if not isinstance(base, FixedGridSolver) or base.adaptive:
            raise ValueError(f"HeavyBall needs a fixed-grid solver (one update per grid step), got {base!r:.120}; "
                             "use e.g. 'dpmsolver++', 'plms', 'deis' or 'ddim'.")
        if base.stochastic:
            raise ValueError(f"HeavyBall needs a deterministic solver: the momentum would average the added noise "
                             f"too; got the stochastic {base!r:.120}.")
        self.base = base
        self.beta = check_number("beta", beta, 0.0, 1.0, low_open=True, owner="HeavyBall")
        self.integrates = base.integrates

    @property
    def order(self) -> int:
        return self.base.order if self.beta == 1.0 else 1

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int | None:
        return self.base.expected_nfe(steps, ends_at_zero)

    def grid(self, schedule: Schedule, steps: int, kind: str = "logSNR", t_start=None, t_end=None, **options):
        return self.base.grid(schedule, steps, kind, t_start, t_end, **options)

    def init(self, schedule, ts, x, generator=None) -> MomentumState:
        state = self.base.init(schedule, ts, x, generator)
        if any(stage.corrector is not None for stage in state.stages):
            raise ValueError(f"HeavyBall cannot wrap a solver with a predict-evaluate-correct corrector "
                             f"({self.base!r:.120}): the corrector takes each step again without the momentum. Use "
                             "the predictor alone (UniPC: corrector=False; DPM-Solver++: corrector=None).")
        return MomentumState(state)

    def ask(self, state: MomentumState):
        return self.base.ask(state.base)

    def tell(self, state: MomentumState, pred: Prediction) -> MomentumState:
        before = state.base
        after = self.base.tell(before, pred)
        stage = before.stages[before.i]
        if self.beta == 1.0 or not stage.completes:
            return MomentumState(after, state.velocity)
        x = before.x if stage.anchor == before.anchor_index else before.x_eval   # where the update started
        weight = sum(stage.coeffs)
        if not isinstance(weight, torch.Tensor) and weight == 0.0:            # no step (a zero-length interval)
            return MomentumState(after, state.velocity)
        direction = (after.x - stage.a * x) / weight
        if state.velocity is None:
            return MomentumState(after, direction)
        velocity = torch.lerp(state.velocity, direction, self.beta)            # (1 - beta) v + beta d
        x_new = after.x + weight * (velocity - direction)                     # = a x + C v
        return MomentumState(replace(after, x=x_new, x_eval=x_new), velocity)

    def __repr__(self) -> str:
        return f"HeavyBall({self.base!r}, beta={self.beta:g})"


def momentum(base: Solver | str = "dpmsolver++", beta: float = 0.8, **options) -> HeavyBall:
    """The registry's ``"momentum"``: :class:`HeavyBall` around ``base`` (a name with its ``options``, or a solver),
    e.g. ``dp.sample(den, x, "momentum", base="plms", beta=0.8, steps=10)``."""
    return HeavyBall(base, beta, **options)
