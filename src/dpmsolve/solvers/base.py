"""The solver protocol: settings objects with explicit state, driven one model evaluation at a time.

A solver never calls the model. ``init`` returns a :class:`State`; ``ask(state)`` says where the model must be
evaluated next; ``tell(state, prediction)`` consumes that one evaluation and returns a new state. ``sample()``
owns the loop, and an adapter that owns its own loop (a diffusers pipeline) drives the same two calls.

How to add a solver:
  1. Subclass :class:`FixedGridSolver` (one evaluation at each grid time but the last) and write
     ``_stages(steps)``: for each grid index, which earlier evaluations the update uses and whether it lands on
     the solution (a completed step) or on an intermediate stage point. The coefficients come from
     ``_exponential``; do not write update formulas by hand. Or subclass :class:`Solver` for anything else.
  2. Declare ``order`` (the convergence order the configuration really has), ``stochastic`` and
     ``integrates`` (``"x0"`` or ``"eps"``).
  3. Register it in ``solvers/__init__.py``; the registry-driven tests then check its order, NFE and protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..model import Prediction
from ..schedules import Schedule
from ._exponential import Form, Node, Rule, combine, step_coefficients


class Solver(ABC):
    """Base of all solvers (frozen settings; all memory lives in the state)."""

    stochastic: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    integrates: str = "x0"

    @property
    @abstractmethod
    def order(self) -> int:
        """The global convergence order of this configuration."""

    @abstractmethod
    def init(self, schedule: Schedule, ts, x: torch.Tensor, generator: torch.Generator | None = None):
        """The state at ``ts[0]`` with solution ``x``; ``ts`` is a validated float64 grid."""

    @abstractmethod
    def ask(self, state) -> tuple[torch.Tensor, float]:
        """(x, t) at which the model must be evaluated next."""

    @abstractmethod
    def tell(self, state, pred: Prediction):
        """The state after consuming the evaluation requested by ``ask``."""

    @abstractmethod
    def done(self, state) -> bool:
        """True once the state holds the solution at the end of the grid."""

    def expected_nfe(self, steps: int) -> int | None:
        """Model evaluations for a grid of ``steps`` intervals (None when it depends on the model)."""
        return steps

    def step_completed(self, before, after) -> bool:
        """Whether ``tell`` reached a new grid time (for callbacks and intermediates)."""
        return after.i != before.i

    def current(self, state) -> tuple[torch.Tensor, float]:
        """(x, t): the latest estimate of the solution and its time."""
        return state.x, state.t


class Stage(NamedTuple):
    """One evaluation of a fixed-grid solver, with the update that follows it (host float64 coefficients).

    The model is evaluated at grid index ``i`` (at the solution, or at an intermediate point of a singlestep
    method); then ``x_{i+1} = a * x_anchor + sum_j coeffs[j] * m[points[j]] + noise_std * z``.
    """

    anchor: int
    points: tuple[int, ...]
    a: float
    coeffs: tuple[float, ...]
    noise_std: float
    completes: bool
    keep_from: int  # the oldest grid index any later stage reads: older predictions can be dropped


@dataclass(frozen=True)
class State:
    """Fixed-grid solver state: replaced at every evaluation, never mutated.

    ``x`` is the solution at grid index ``anchor_index`` (the last completed step); ``x_eval`` is where the
    model is evaluated next, at ``nodes[i]``; ``history`` holds earlier predictions as (grid index, tensor),
    newest first.
    """

    x: torch.Tensor
    x_eval: torch.Tensor
    i: int
    anchor_index: int
    nodes: tuple[Node, ...]
    stages: tuple[Stage, ...]
    history: tuple[tuple[int, torch.Tensor], ...] = ()
    generator: torch.Generator | None = None

    @property
    def t(self) -> float:
        return self.nodes[self.anchor_index].t

    @property
    def steps(self) -> int:
        return len(self.nodes) - 1


class FixedGridSolver(Solver):
    """A lambda-space exponential integrator on a fixed grid: one evaluation per grid time but the last.

    Subclasses give ``_stages(steps)`` (anchor, points, rule, completes) per grid index and ``_form(i)``; the
    coefficients are computed here once per grid, on the host, in float64.
    """

    def _form(self) -> Form:
        return Form(data=self.integrates == "x0")

    @abstractmethod
    def _stages(self, steps: int) -> list[tuple[int, tuple[int, ...], Rule, bool]]:
        """Per grid index i < steps: (anchor, points with the anchor first, rule, lands on the solution)."""

    def _step_form(self, s: Node, t: Node) -> Form:
        return self._form()

    def plan(self, schedule: Schedule, ts) -> tuple[tuple[Node, ...], tuple[Stage, ...]]:
        nodes = tuple(Node.at(schedule, float(t)) for t in np.asarray(ts, dtype=np.float64))
        stages = []
        for i, (anchor, points, rule, completes) in enumerate(self._stages(len(nodes) - 1)):
            s, t = nodes[anchor], nodes[i + 1]
            form = self._step_form(s, t)
            h = t.lam - s.lam
            rhos = [(nodes[j].lam - s.lam) / h for j in points]
            a, coeffs = step_coefficients(form, s, t, rhos, rule)
            stages.append([anchor, tuple(points), a, tuple(float(c) for c in coeffs),
                           form.noise_std(s, t) if completes else 0.0, completes])
        keep_from = len(stages)
        for i in reversed(range(len(stages))):
            stages[i].append(keep_from)
            keep_from = min(keep_from, min(stages[i][1]))
        return nodes, tuple(Stage(*st) for st in stages)

    def init(self, schedule, ts, x, generator=None) -> State:
        nodes, stages = self.plan(schedule, ts)
        return State(x=x, x_eval=x, i=0, anchor_index=0, nodes=nodes, stages=stages, generator=generator)

    def ask(self, state: State):
        return state.x_eval, state.nodes[state.i].t

    def tell(self, state: State, pred: Prediction) -> State:
        # The per-step hot path of every fixed-grid solver: no host-device sync, one allocation for the update
        # (``combine`` works in place on its fresh output) and as little Python as the bookkeeping allows.
        i = state.i
        stage = state.stages[i]
        history = ((i, self._form().pick(pred)),) + state.history
        by_index = dict(history)
        x_new = combine(stage.a, state.x, stage.coeffs, [by_index[j] for j in stage.points])
        if stage.noise_std:
            z = torch.randn(x_new.shape, generator=state.generator, device=x_new.device, dtype=x_new.dtype)
            x_new.add_(z.mul_(stage.noise_std))  # = x_new + noise_std * z (same kernels), both tensors fresh
        keep_from = stage.keep_from
        if history[-1][0] < keep_from:  # newest first: what is kept is a prefix
            history = tuple(item for item in history if item[0] >= keep_from)
        if stage.completes:
            x, anchor = x_new, i + 1
        else:
            x, anchor = state.x, state.anchor_index
        if type(state) is State:  # direct construction: ~1 us per step cheaper than dataclasses.replace
            return State(x, x_new, i + 1, anchor, state.nodes, state.stages, history, state.generator)
        return replace(state, x=x, x_eval=x_new, i=i + 1, anchor_index=anchor, history=history)

    def current(self, state: State):
        # The latest estimate at a grid time: the solution, or a singlestep block's intermediate point.
        return state.x_eval, state.nodes[state.i].t

    def done(self, state: State) -> bool:
        return state.i >= state.steps


def warmup_orders(order: int, steps: int, lower_order_final: bool) -> list[int]:
    """Multistep order per step: ramp-up by available history, capped by steps left if lower_order_final."""
    orders = []
    for i in range(steps):
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, steps - i)
        orders.append(p)
    return orders
