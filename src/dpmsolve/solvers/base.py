"""The solver protocol: settings objects with explicit state, driven one model evaluation at a time.

A solver never calls the model. ``init`` returns a :class:`State`; ``ask(state)`` says where the model must be
evaluated next; ``tell(state, prediction)`` consumes that one evaluation and returns a new state. ``sample()``
owns the loop, and an adapter that owns its own loop (a diffusers pipeline) drives the same two calls.

How to add a solver:
  1. Subclass :class:`FixedGridSolver` (one evaluation at each grid time but the last) and write
     ``_stages(steps)``: for each grid index, which earlier evaluations the update uses and whether it lands on
     the solution (a completed step) or on an intermediate stage point. The coefficients come from
     ``_exponential``; do not write update formulas by hand. Or subclass :class:`Solver` for anything else.
     Optionally write ``_correctors(stages, nodes)`` (default: none) to correct the solution at a grid index when its
     evaluation arrives, before the step from it (a predict-evaluate-correct corrector such as UniC; see
     :class:`Correction` and :func:`pec_correctors`).
  2. Declare ``order`` (the convergence order the configuration really has), ``stochastic`` and
     ``integrates`` (``"x0"`` or ``"eps"``).
  3. Register it in ``solvers/__init__.py``; the registry-driven tests then check its order, NFE and protocol.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..grids import make_grid
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

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int | None:
        """Model evaluations for a grid of ``steps`` intervals (None when it depends on the model);
        ``ends_at_zero``: the grid ends at sigma = 0 (t = 0), where some methods take a cheaper last step."""
        return steps

    def step_completed(self, before, after) -> bool:
        """Whether ``tell`` reached a new grid time (for callbacks and intermediates)."""
        return after.i != before.i

    def current(self, state) -> tuple[torch.Tensor, float]:
        """(x, t): the latest estimate of the solution and its time."""
        return state.x, state.t

    def grid(self, schedule: Schedule, steps: int, kind: str = "logSNR", t_start: float | None = None,
             t_end: float | None = None, **options) -> np.ndarray:
        """The times of the named grid ``kind`` for this solver: :func:`~dpmsolve.make_grid`, unless the solver
        places its steps on that grid in its own way (singlestep blocks)."""
        return make_grid(schedule, steps, kind, t_start, t_end, **options)



class SolverWrapper(Solver):
    """A solver that runs another (``self.base``) and changes some of its steps; its states hold the base solver's
    state as ``.base``, so completion, step bookkeeping and the current estimate are the base's."""

    base: Solver

    def done(self, state) -> bool:
        return self.base.done(state.base)

    def step_completed(self, before, after) -> bool:
        return self.base.step_completed(before.base, after.base)

    def current(self, state):
        return self.base.current(state.base)

class Correction(NamedTuple):
    """A corrector applied when the evaluation at grid index ``i`` arrives, before that index's step.

    ``x_i^c = a * x_anchor + sum_j coeffs[j] * m[points[j]]``: the completed step that landed on ``x_i`` (same
    anchor; ``x_anchor`` is the solution it started from) taken again with the new prediction ``m_i`` among its
    points. ``m_i`` was evaluated at the uncorrected ``x_i`` and is kept as it is (predict-evaluate-correct:
    no extra evaluation, as in UniPC), and the step from ``i`` starts at ``x_i^c``.
    """

    anchor: int
    points: tuple[int, ...]
    a: float
    coeffs: tuple[float, ...]
    offset: torch.Tensor | None = None


class Stage(NamedTuple):
    """One evaluation of a fixed-grid solver, with the update that follows it (host float64 coefficients).

    The model is evaluated at grid index ``i`` (at the solution, or at an intermediate point of a singlestep
    method); the optional ``corrector`` then replaces the solution at ``i``, and
    ``x_{i+1} = a * x_anchor + sum_j coeffs[j] * m[points[j]] (+ offset) + noise_std * z``. The coefficients
    are host floats, or tensors broadcastable to x (per-element statistics, DPM-Solver-v3); ``aux`` is what the
    solver needs to turn the evaluation at ``i`` into its integrand (see ``FixedGridSolver._integrand``).
    """

    anchor: int
    points: tuple[int, ...]
    a: float
    coeffs: tuple[float, ...]
    noise_std: float
    completes: bool
    keep_from: int  # the oldest grid index any later stage reads: older predictions can be dropped
    corrector: Correction | None = None
    offset: torch.Tensor | None = None
    aux: torch.Tensor | None = None


@dataclass(frozen=True)
class State:
    """Fixed-grid solver state: replaced at every evaluation, never mutated.

    ``x`` is the solution at grid index ``anchor_index`` (the last completed step); ``x_eval`` is where the
    model is evaluated next, at ``nodes[i]``; ``history`` holds earlier predictions as (grid index, tensor),
    newest first. ``x_prev`` is the solution the last completed step started from, kept only while the next
    stage has a corrector (which takes that step again); otherwise None.
    """

    x: torch.Tensor
    x_eval: torch.Tensor
    i: int
    anchor_index: int
    nodes: tuple[Node, ...]
    stages: tuple[Stage, ...]
    history: tuple[tuple[int, torch.Tensor], ...] = ()
    generator: torch.Generator | None = None
    x_prev: torch.Tensor | None = None

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

    def _correctors(self, stages, nodes) -> list[tuple[int, tuple[int, ...], Rule] | None]:
        """Per grid index i < steps, given ``_stages`` and the grid's nodes: None, or the corrector (anchor, points with the anchor
        first, rule) of the solution at i, applied when its evaluation arrives (see :func:`pec_correctors`)."""
        return [None] * len(stages)

    def _update(self, nodes: tuple[Node, ...], anchor: int, points: tuple[int, ...], end: int, rule: Rule):
        """(a, coeffs, noise_std, offset) of the update from ``nodes[anchor]`` to ``nodes[end]`` through the
        predictions at ``points`` (the shared exponential-integrator coefficients of ``_exponential``)."""
        s, t = nodes[anchor], nodes[end]
        form = self._step_form(s, t)
        h = t.lam - s.lam
        a, coeffs = step_coefficients(form, s, t, [(nodes[j].lam - s.lam) / h for j in points], rule)
        return a, tuple(float(c) for c in coeffs), form.noise_std(s, t), None

    def _to_zero(self, nodes: tuple[Node, ...], i: int):
        """(a, coeffs, offset) of the jump from ``nodes[i]`` to sigma = 0 through the prediction at i."""
        a, coeffs = self._form().to_zero(nodes[i])
        return a, coeffs, None

    def _aux(self, nodes: tuple[Node, ...], i: int):
        """Per grid index data for ``_integrand`` (None: the integrand is the prediction itself)."""
        return None

    # Whether ``_integrand`` returns a tensor of its own (computed from the prediction) rather than one of the
    # prediction's tensors, which the network may overwrite at its next call (see ``tell``).
    _fresh_integrand: ClassVar[bool] = False

    def _integrand(self, stage: Stage, x_eval: torch.Tensor, pred: Prediction) -> torch.Tensor:
        """What the updates combine, from the evaluation ``pred`` at ``x_eval``: x0 or eps by default."""
        return self._form().pick(pred)

    def plan(self, schedule: Schedule, ts) -> tuple[tuple[Node, ...], tuple[Stage, ...]]:
        """Nodes and stages for the grid ``ts``. A grid ending at t = 0 (sigma = 0) ends with the jump to the x0
        prediction at the last evaluated point; it counts as the final step (e.g. for ``lower_order_final``)."""
        nodes = tuple(grid_nodes(schedule, ts))
        to_zero = nodes[-1].log_sigma == -math.inf
        self._check_nodes(schedule, nodes)

        specs = self._stages(len(nodes) - 1)
        stages = []
        for i, (anchor, points, rule, completes) in enumerate(specs):
            if to_zero and i == len(specs) - 1:  # the jump to sigma = 0, from the point just evaluated
                a, coeffs, offset = self._to_zero(nodes, i)
                stages.append([i, (i,), a, coeffs, 0.0, True, offset])
                continue
            a, coeffs, noise_std, offset = self._update(nodes, anchor, tuple(points), i + 1, rule)
            stages.append([anchor, tuple(points), a, coeffs, noise_std if completes else 0.0, completes, offset])
        corrections = []
        for i, spec in enumerate(self._correctors(specs, nodes)):
            if spec is not None:
                anchor, points, rule = spec
                if not (i >= 1 and specs[i - 1][3] and specs[i - 1][0] == anchor == points[0] and max(points) == i):
                    raise ValueError(f"{type(self).__name__}: the corrector at grid index {i} must take the completed "
                                     f"step that landed there again (got anchor {anchor}, points {points}).")
                a, coeffs, noise_std, offset = self._update(nodes, anchor, tuple(points), i, rule)
                if noise_std:
                    raise ValueError(f"{type(self).__name__}: a corrector needs a deterministic step (eta = 0).")
                spec = Correction(anchor, tuple(points), a, coeffs, offset)
            corrections.append(spec)
        keep_from = len(stages)
        for i in reversed(range(len(stages))):
            reads = stages[i][1] + (corrections[i].points if corrections[i] is not None else ())
            anchor, points, a, coeffs, noise_std, completes, offset = stages[i]
            stages[i] = Stage(anchor, points, a, coeffs, noise_std, completes, keep_from, corrections[i], offset,
                              self._aux(nodes, i))
            keep_from = min(keep_from, min(reads))
        return nodes, tuple(stages)

    def _check_nodes(self, schedule: Schedule, nodes: tuple[Node, ...]) -> None:
        """Raise a ValueError for a grid this solver cannot run (every grid by default is fine)."""

    def _placed(self, stages: tuple[Stage, ...], x: torch.Tensor) -> tuple[Stage, ...]:
        """The stages with array coefficients as tensors on x's device and dtype (see ``_place``)."""
        return tuple(_place(stage, x) for stage in stages)

    def init(self, schedule, ts, x, generator=None) -> State:
        nodes, stages = self.plan(schedule, ts)
        stages = self._placed(stages, x)
        return State(x=x, x_eval=x, i=0, anchor_index=0, nodes=nodes, stages=stages, generator=generator)

    def ask(self, state: State):
        return state.x_eval, state.nodes[state.i].t

    def tell(self, state: State, pred: Prediction) -> State:
        # The per-step hot path of every fixed-grid solver: no host-device sync, one allocation for the update
        # (``combine`` works in place on its fresh output) and as little Python as the bookkeeping allows.
        i = state.i
        stages = state.stages
        stage = stages[i]
        m = self._integrand(stage, state.x_eval, pred)
        if i >= stage.keep_from and not self._fresh_integrand:
            # Kept for later steps: own a copy. Compiled / CUDA-graph networks return the same output buffer at
            # every call, which would otherwise turn the history into one tensor many times.
            m = m.clone()
        history = ((i, m),) + state.history
        by_index = dict(history)
        # An update starts from the last completed solution, or (the jump to sigma = 0 after a singlestep block's
        # intermediate point) from the point just evaluated.
        x = state.x if stage.anchor == state.anchor_index else state.x_eval
        corrector = stage.corrector
        if corrector is not None:  # x_i^c: the step that landed on x_i again, with m_i (evaluated at x_i) added
            x = combine(corrector.a, state.x_prev, corrector.coeffs, [by_index[j] for j in corrector.points],
                        corrector.offset)
        x_new = combine(stage.a, x, stage.coeffs, [by_index[j] for j in stage.points], stage.offset)
        if stage.noise_std:
            z = self._noise(state, i, x_new)
            x_new.add_(z.mul_(stage.noise_std))  # = x_new + noise_std * z (same kernels), both tensors fresh
        keep_from = stage.keep_from
        if history[-1][0] < keep_from:  # newest first: what is kept is a prefix
            history = tuple(item for item in history if item[0] >= keep_from)
        x_prev = None
        if stage.completes:
            if i + 1 < len(stages) and stages[i + 1].corrector is not None:
                x_prev = x  # the next evaluation's corrector takes this step again, from the same start
            x, anchor = x_new, i + 1
        else:
            anchor = state.anchor_index
        if type(state) is State:  # direct construction: ~1 us per step cheaper than dataclasses.replace
            return State(x, x_new, i + 1, anchor, state.nodes, stages, history, state.generator, x_prev)
        return replace(state, x=x, x_eval=x_new, i=i + 1, anchor_index=anchor, history=history, x_prev=x_prev)

    def _noise(self, state: State, i: int, like: torch.Tensor) -> torch.Tensor:
        """The standard normal z of stage ``i``'s noise ``noise_std * z``, shaped like ``like``: a fresh tensor the
        engine scales in place. Default: ``torch.randn`` with the state's generator. A solver overrides this to
        draw from another source (a Brownian tree, a k-diffusion noise sampler; see ``solvers.stochastic``)."""
        return torch.randn(like.shape, generator=state.generator, device=like.device, dtype=like.dtype)

    def current(self, state: State):
        # The latest estimate at a grid time: the solution, or a singlestep block's intermediate point.
        return state.x_eval, state.nodes[state.i].t

    def done(self, state: State) -> bool:
        return state.i >= state.steps


def _as_tensor_like(value, x: torch.Tensor):
    return torch.as_tensor(value, dtype=x.dtype, device=x.device) if isinstance(value, np.ndarray) else value


def _place(stage: Stage, x: torch.Tensor) -> Stage:
    """The stage with its array coefficients (numpy float64 from planning) as tensors on x's device and dtype,
    converted once per grid; host-float stages are returned as they are."""
    arrays = [stage.a, *stage.coeffs, stage.offset, stage.aux]
    if stage.corrector is not None:
        arrays += [stage.corrector.a, *stage.corrector.coeffs, stage.corrector.offset]
    if not any(isinstance(v, np.ndarray) for v in arrays):
        return stage
    corrector = stage.corrector
    if corrector is not None:
        corrector = corrector._replace(a=_as_tensor_like(corrector.a, x),
                                       coeffs=tuple(_as_tensor_like(c, x) for c in corrector.coeffs),
                                       offset=_as_tensor_like(corrector.offset, x))
    return stage._replace(a=_as_tensor_like(stage.a, x), coeffs=tuple(_as_tensor_like(c, x) for c in stage.coeffs),
                          offset=_as_tensor_like(stage.offset, x), aux=_as_tensor_like(stage.aux, x),
                          corrector=corrector)


def grid_nodes(schedule: Schedule, ts) -> list[Node]:
    """The nodes of the grid ``ts`` (a final t = 0 as ``Node.zero()``: the jump to sigma = 0)."""
    ts = np.asarray(ts, dtype=np.float64)
    to_zero = ts.size >= 2 and ts[-1] == 0.0
    return [Node.at(schedule, float(t)) for t in (ts[:-1] if to_zero else ts)] + ([Node.zero()] if to_zero else [])


def stages_from(specs) -> tuple[Stage, ...]:
    """Stages from ``(anchor, points, a, coeffs, noise_std, completes)`` per evaluation, with the history each
    must keep (``keep_from``) filled in: for solvers that plan their own nodes (extra evaluation points)."""
    stages, keep_from = [], len(specs)
    for anchor, points, a, coeffs, noise_std, completes in reversed(specs):
        stages.append(Stage(anchor, tuple(points), float(a), tuple(float(c) for c in coeffs), float(noise_std),
                            completes, keep_from))
        keep_from = min(keep_from, min(points))
    return tuple(reversed(stages))


def warmup_orders(order: int, steps: int, lower_order_final: bool) -> list[int]:
    """Multistep order per step: ramp-up by available history, capped by steps left if lower_order_final."""
    orders = []
    for i in range(steps):
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, steps - i)
        orders.append(p)
    return orders


def pec_correctors(stages, rule: Rule, skip=()) -> list[tuple[int, tuple[int, ...], Rule] | None]:
    """A predict-evaluate-correct corrector at every grid index that a completed step lands on.

    For ``stages`` as returned by ``_stages``: when the evaluation at ``i`` arrives, the step ``i - 1`` that
    landed on ``x_i`` is taken again from the same anchor with the same points plus ``i``, weighted by ``rule``
    (UniC: ``Rule.BH1`` / ``Rule.BH2``; Zhao et al. 2023, Sec. 3.1). The extra point raises the local order by
    one at no extra evaluation. ``skip``: grid indices left uncorrected. Index 0 (the start) is never
    corrected, nor is the final time (never evaluated).
    """
    out: list[tuple[int, tuple[int, ...], Rule] | None] = [None] * min(1, len(stages))
    for i in range(1, len(stages)):
        anchor, points, _, completes = stages[i - 1]
        out.append((anchor, tuple(points) + (i,), rule) if completes and i not in skip else None)
    return out
