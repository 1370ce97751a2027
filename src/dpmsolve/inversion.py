"""Exact inversion and noise maps: samplers that run backwards to round-off.

Plain inversion (:func:`dpmsolve.invert` with a deterministic solver) runs the probability-flow ODE from data to
noise; sampling back reconstructs the data up to two discretisation errors. The samplers here make the round trip
exact to float round-off instead:

- :class:`BDIA` (Zhang, Lewis & Kleijn 2023, "Exact Diffusion Inversion via Bi-directional Integration
  Approximation"): a two-step DDIM update. From ``x_i`` it takes the DDIM step forward to ``x_{i+1}`` and the DDIM
  step back to ``x_{i-1}`` with the same prediction, and keeps ``gamma`` of the real last increment in place of
  the backward estimate::

      x_{i+1} = gamma x_{i-1} + (a+ - gamma a-) x_i + (c+ - gamma c-) x0(x_i)

  where ``(a+, c+)`` / ``(a-, c-)`` are DDIM's coefficients from ``t_i`` to ``t_{i+1}`` / ``t_{i-1}``. Solving for
  ``x_{i-1}`` gives the exact inverse (for ``gamma > 0``); ``gamma = 0`` is DDIM, ``gamma = 1`` (default) the
  symmetric, time-reversible update. One evaluation per step; the first step (no ``x_{i-1}`` yet) is DDIM.
- :class:`EDICT` (Wallace, Gokul & Naik 2023): two coupled sequences ``x``, ``y``, each advanced by a DDIM step
  (noise form) with the other's noise prediction, then mixed with weight ``p`` (0.93); every operation is
  invertible. Two evaluations per step.

Both are :class:`~dpmsolve.Solver` objects that ``sample`` and ``invert`` run like any other (their direction
follows the grid: decreasing samples, increasing inverts). ``invert(..., exact=...)`` returns an
:class:`Inversion`, which carries the extra state the method needs (BDIA: the solution at the second grid time;
EDICT: the second sequence); ``sample(den, inv, "ddim", exact=...)`` starts from it.

Noise maps (:class:`NoiseSequence`): for a stochastic sampler (SDE-DPM-Solver++, DDIM with ``eta > 0``) the
per-step noises that make a given image the sampler's output from a given start, in the manner of the
"edit-friendly" DDPM inversion (Huberman-Spiegelglas et al. 2024) that LEDITS++ uses with SDE-DPM-Solver++:
intermediate points are drawn independently around the image, and each step's noise is what takes the sampler
from where it is to the next point; the last step lands on the image itself. ``sample(..., noise_sequence=seq)``
replays them (and with changed conditioning, edits while keeping the image's structure).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from ._checks import check_number
from .model import Prediction
from .schedules import Schedule
from .solvers.base import FixedGridSolver, Solver, State
from .solvers._exponential import Form, Node, Rule, step_coefficients

__all__ = ["BDIA", "EDICT", "Inversion", "NoiseSequence", "exact_method"]


def _ddim(form: Form, s: Node, t: Node) -> tuple[float, float]:
    """(a, c) of the first-order exponential-integrator step ``x_t = a x_s + c m(x_s)`` (DDIM) in ``form``."""
    a, coeffs = step_coefficients(form, s, t, [0.0], Rule.TAYLOR)
    return float(a), float(coeffs[0])


def _nodes(schedule: Schedule, ts, name: str) -> tuple[Node, ...]:
    ts = np.asarray(ts, dtype=np.float64)
    if ts.size and ts[-1] == 0.0:
        raise ValueError(f"{name} needs a grid that ends inside the schedule (t_end = t_min, not 0): its steps are "
                         "inverted, and a step from sigma = 0 cannot be; drop t_end=0 (or use a grid ending at "
                         "t_min).")
    return tuple(Node.at(schedule, float(t)) for t in ts)


def _check_precision(precision, owner: str) -> torch.dtype | None:
    if precision is not None and not (isinstance(precision, torch.dtype) and precision.is_floating_point):
        raise TypeError(f"{owner} precision must be a floating-point torch.dtype (default torch.float64) or None, got "
                        f"{type(precision).__name__} {precision!r}.")
    return precision


# ----------------------------------------------------------------------------------------------------------- BDIA
@dataclass(frozen=True)
class BDIAState:
    """BDIA's state: ``x`` at ``nodes[i]`` and ``x_prev`` at ``nodes[i - 1]`` (None before the first step)."""

    x: torch.Tensor
    x_prev: torch.Tensor | None
    i: int
    nodes: tuple[Node, ...]
    coeffs: tuple[tuple[float, float, float], ...]   # per step: x_next = P x_prev + A x + C m

    @property
    def t(self) -> float:
        return self.nodes[self.i].t


class BDIA(Solver):
    """BDIA-DDIM (Zhang, Lewis & Kleijn 2023): DDIM made time-reversible by a bi-directional two-step update.

    One evaluation per step, integrates x0 (DDIM's data form). ``gamma = 0`` is DDIM; ``gamma = 1`` (default) is
    the symmetric, time-reversible update (a leapfrog scheme, order 2), whose inverse needs no division; other
    ``gamma`` give order 1. Any ``0 < gamma <= 1`` inverts exactly (the inverse divides by ``gamma``, so round-off
    grows like ``gamma^-steps``). On a decreasing grid it samples, on an increasing grid it runs the exact inverse
    (whose first step, from the data, is one DDIM step).

    ``precision`` (default float64, as EDICT's reference): the dtype the solution is kept in during the run (the
    network still runs in its own dtype). The inverse amplifies round-off step by step, so float32 states
    reconstruct to ~1e-5 (BDIA) or ~1e-3 (EDICT) where float64 states reach the network's own float32 round-off;
    ``None`` keeps the sampler's usual float32-or-wider. The sample comes back in the caller's dtype.
    """

    integrates = "x0"

    def __init__(self, gamma: float = 1.0, precision: torch.dtype | None = torch.float64):
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, owner="BDIA")
        self.precision = _check_precision(precision, "BDIA")

    @property
    def order(self) -> int:
        return 2 if self.gamma == 1.0 else 1

    def _coefficients(self, nodes: tuple[Node, ...], inverse: bool):
        form, g, out = Form(data=True), self.gamma, []
        for i in range(len(nodes) - 1):
            if i == 0:                                    # no earlier point yet: one DDIM step
                a, c = _ddim(form, nodes[0], nodes[1])
                out.append((0.0, a, c))
                continue
            if not inverse:   # x_{i+1} = g x_{i-1} + (a+ - g a-) x_i + (c+ - g c-) m_i
                ap, cp = _ddim(form, nodes[i], nodes[i + 1])
                am, cm = _ddim(form, nodes[i], nodes[i - 1])
                out.append((g, ap - g * am, cp - g * cm))
            else:             # the sampling step at nodes[i] (towards nodes[i - 1]) solved for its x_{i+1}
                ap, cp = _ddim(form, nodes[i], nodes[i - 1])
                am, cm = _ddim(form, nodes[i], nodes[i + 1])
                out.append((1.0 / g, (g * am - ap) / g, (g * cm - cp) / g))
        return tuple(out)

    def init(self, schedule, ts, x, generator=None) -> BDIAState:
        nodes = _nodes(schedule, ts, "BDIA")
        inverse = nodes[-1].t > nodes[0].t
        if inverse and self.gamma == 0:
            raise ValueError("BDIA with gamma=0 is plain DDIM, which cannot be inverted exactly; use 0 < gamma <= 1 "
                             "(1: the symmetric update).")
        return BDIAState(x=x, x_prev=None, i=0, nodes=nodes, coeffs=self._coefficients(nodes, inverse))

    def resume(self, schedule, ts, x0: torch.Tensor, x1: torch.Tensor) -> BDIAState:
        """The sampling state at the grid's second time, from the solutions at its first two (an inversion's
        result): the next step is a BDIA step, with no evaluation at ``ts[0]``."""
        state = self.init(schedule, ts, x0)
        return replace(state, x=x1, x_prev=x0, i=1)

    def ask(self, state: BDIAState):
        return state.x, state.nodes[state.i].t

    def tell(self, state: BDIAState, pred: Prediction) -> BDIAState:
        p, a, c = state.coeffs[state.i]
        x_new = state.x * a
        x_new.add_(pred.x0, alpha=c)
        if state.x_prev is not None:
            x_new.add_(state.x_prev, alpha=p)
        return BDIAState(x_new, state.x, state.i + 1, state.nodes, state.coeffs)

    def done(self, state: BDIAState) -> bool:
        return state.i >= len(state.nodes) - 1

    def __repr__(self):
        return f"BDIA(gamma={self.gamma}, precision={self.precision})"


# ---------------------------------------------------------------------------------------------------------- EDICT
@dataclass(frozen=True)
class EDICTState:
    """EDICT's state: the two sequences ``x``, ``y`` at ``nodes[i]``; ``x_eval`` is where the model is evaluated
    next, ``aux`` the intermediate the second half-step needs (``phase`` 0 or 1)."""

    x: torch.Tensor
    y: torch.Tensor
    x_eval: torch.Tensor
    aux: torch.Tensor | None
    i: int
    phase: int
    nodes: tuple[Node, ...]
    coeffs: tuple[tuple[float, float], ...]     # per step: DDIM (noise form) x_t = a x_s + b eps, sampling direction
    p: float
    inverse: bool

    @property
    def t(self) -> float:
        return self.nodes[self.i].t


class EDICT(Solver):
    """EDICT (Wallace, Gokul & Naik 2023): exactly invertible DDIM by two coupled sequences.

    Order 1, two evaluations per step, integrates eps (DDIM's noise form, as the paper). Sampling step ``s -> t``
    with DDIM coefficients ``x_t = a x_s + b eps``::

        x' = a x + b eps(y);   y' = a y + b eps(x');   x = p x' + (1 - p) y';   y = p y' + (1 - p) x

    Every line inverts exactly (the inverse evaluates at ``s``), so the round trip reconstructs to round-off.
    ``p`` (0.93, the paper's) keeps the two sequences close; the sample is ``x``. ``precision``: as for
    :class:`BDIA`.
    """

    integrates = "eps"

    def __init__(self, p: float = 0.93, precision: torch.dtype | None = torch.float64):
        self.p = check_number("p", p, 0.0, 1.0, low_open=True, owner="EDICT")
        self.precision = _check_precision(precision, "EDICT")

    @property
    def order(self) -> int:
        return 1

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return 2 * steps

    def init(self, schedule, ts, x, generator=None, y: torch.Tensor | None = None) -> EDICTState:
        nodes = _nodes(schedule, ts, "EDICT")
        inverse = nodes[-1].t > nodes[0].t
        form = Form(data=False)
        if inverse:
            coeffs = tuple(_ddim(form, nodes[i + 1], nodes[i]) for i in range(len(nodes) - 1))
        else:
            coeffs = tuple(_ddim(form, nodes[i], nodes[i + 1]) for i in range(len(nodes) - 1))
        y = x if y is None else y
        state = EDICTState(x, y, y, None, 0, 0, nodes, coeffs, self.p, inverse)
        return self._begin(state) if inverse else state

    def resume(self, schedule, ts, x: torch.Tensor, y: torch.Tensor) -> EDICTState:
        """The sampling state from both sequences at ``ts[0]`` (an inversion's result)."""
        return self.init(schedule, ts, x, y=y)

    @staticmethod
    def _begin(state: EDICTState) -> EDICTState:
        # Inverse step: undo the mixing first; the model is then evaluated at x' (at the step's far end).
        p, q = state.p, 1.0 - state.p
        y_inter = (state.y - q * state.x) / p
        x_inter = (state.x - q * y_inter) / p
        return replace(state, x_eval=x_inter, aux=y_inter)

    def ask(self, state: EDICTState):
        return state.x_eval, state.nodes[state.i + 1 if state.inverse else state.i].t

    def tell(self, state: EDICTState, pred: Prediction) -> EDICTState:
        a, b = state.coeffs[state.i]
        p, q = state.p, 1.0 - state.p
        eps = pred.eps
        if not state.inverse:
            if state.phase == 0:                      # x' = a x + b eps(y); evaluate at x' next
                x_inter = state.x * a
                x_inter.add_(eps, alpha=b)
                return replace(state, x_eval=x_inter, aux=x_inter, phase=1)
            y_inter = state.y * a                     # y' = a y + b eps(x'); then mix
            y_inter.add_(eps, alpha=b)
            x_new = state.aux * p
            x_new.add_(y_inter, alpha=q)
            y_new = y_inter * p
            y_new.add_(x_new, alpha=q)
            return replace(state, x=x_new, y=y_new, x_eval=y_new, aux=None, i=state.i + 1, phase=0)
        if state.phase == 0:                          # y = (y' - b eps(x')) / a; evaluate at y next
            y_new = (state.aux - b * eps) / a
            return replace(state, y=y_new, x_eval=y_new, aux=state.x_eval, phase=1)
        x_new = (state.aux - b * eps) / a             # x = (x' - b eps(y)) / a
        new = replace(state, x=x_new, aux=None, i=state.i + 1, phase=0)
        return self._begin(new) if new.i < len(new.nodes) - 1 else replace(new, x_eval=x_new)

    def done(self, state: EDICTState) -> bool:
        return state.i >= len(state.nodes) - 1

    def step_completed(self, before, after) -> bool:
        return after.i != before.i

    def current(self, state: EDICTState):
        return state.x, state.nodes[state.i].t

    def __repr__(self):
        return f"EDICT(p={self.p}, precision={self.precision})"


EXACT_METHODS = {"bdia": BDIA, "edict": EDICT}


def exact_method(exact) -> BDIA | EDICT | None:
    """The exact-inversion sampler that ``exact`` names: False / None -> None, True / 'bdia' -> BDIA(),
    'edict' -> EDICT(), or a BDIA / EDICT object (its own settings)."""
    if exact is None or exact is False:
        return None
    if exact is True:
        return BDIA()
    if isinstance(exact, (BDIA, EDICT)):
        return exact
    if isinstance(exact, str):
        if exact not in EXACT_METHODS:
            raise ValueError(f"Unknown exact inversion method {exact!r}; valid: True (= 'bdia'), "
                             f"{', '.join(map(repr, EXACT_METHODS))}, or a dpmsolve.BDIA(gamma=...) / "
                             "dpmsolve.EDICT(p=...) object.")
        return EXACT_METHODS[exact]()
    raise TypeError(f"exact must be True, 'bdia', 'edict' or a dpmsolve.BDIA / dpmsolve.EDICT object, got "
                    f"{type(exact).__name__} {exact!r}.")


# ------------------------------------------------------------------------------------------------- noise sequences
@dataclass(frozen=True)
class NoiseSequence:
    """The standard-normal noise of every step of a stochastic sampler (None for a step that adds none).

    Made by ``invert(..., noise_map=True)`` (the noises that make a given image the sampler's output);
    ``sample(..., noise_sequence=seq)`` replays them in place of fresh draws. Step ``k`` adds
    ``noise_std_k * noises[k]`` after its deterministic update, exactly as the solver would with drawn noise.

    Attributes:
        noises: one tensor of the sample's shape per step (or None).
        ts: the sampling grid the steps ran on.
    """

    noises: tuple[torch.Tensor | None, ...]
    ts: np.ndarray

    def __len__(self) -> int:
        return len(self.noises)


@dataclass
class Inversion:
    """The result of an exact or noise-map inversion (``invert(..., exact=...)`` / ``invert(..., noise_map=True)``).

    ``sample(denoiser, inv, ...)`` starts from it and reconstructs the inverted data (to round-off) on the same
    grid; with other model keyword arguments it edits.

    Attributes:
        x: the noise at ``ts[0]`` (the start of sampling), in the caller's dtype.
        nfe: model evaluations used.
        ts: the sampling grid (decreasing) the inversion belongs to.
        solver: the sampler to run from it: :class:`BDIA`, :class:`EDICT`, or the stochastic solver of a noise map.
        method: ``"bdia"``, ``"edict"`` or ``"noise_map"``.
        state: the method's state to resume from, in its precision (float64 by default): BDIA the solutions at
            ``ts[0]`` and ``ts[1]``; EDICT both sequences at ``ts[0]``; empty for a noise map.
        noise: the per-step noises of a noise map (None for exact inversion).
        trajectory: with ``return_intermediates=True``, the inversion's solutions (data -> noise); else None.
    """

    x: torch.Tensor
    nfe: int
    ts: np.ndarray
    solver: BDIA | EDICT | FixedGridSolver
    method: str
    state: tuple[torch.Tensor, ...] = ()
    noise: NoiseSequence | None = None
    trajectory: list[torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- drivers
class StepDriver:
    """How ``sample``'s loop takes one evaluation and its update (the default: ``ask``, evaluate, ``tell``).

    Drivers change what happens around the solver's own maths without copying it: replaying or choosing the noise
    of stochastic steps, recording states for the adjoint, checkpointing each step.
    """

    differentiable = False

    def start(self, solver: Solver, state):
        return state

    def advance(self, solver: Solver, state, evaluate: Callable) -> tuple[Any, Prediction]:
        x_eval, t = solver.ask(state)
        pred = evaluate(x_eval, t)
        return solver.tell(state, pred), pred

    def final(self, x: torch.Tensor, t: float, evaluate: Callable) -> torch.Tensor:
        """The final jump to the x0 prediction (``denoise_to_zero``)."""
        return evaluate(x, t).x0.clone()


class NoiseDriver(StepDriver):
    """Runs a stochastic fixed-grid solver with its noise handled here: the solver's stages are made noise-free and
    each step adds ``noise_std * z`` itself (the engine's own arithmetic, so a drawn ``z`` gives the same sample
    bit for bit). ``z`` is drawn from the state's generator (``mode='draw'``, recorded), replayed
    (``'replay'``, from ``noises``), or chosen so that the step lands on ``targets[k + 1]`` (``'target'``)."""

    def __init__(self, mode: str = "draw", noises=None, targets=None):
        self.mode, self.targets = mode, targets
        self.noises: dict[int, torch.Tensor] = {} if noises is None else {
            k: z for k, z in enumerate(noises) if z is not None}
        self.stds: list[float] = []

    def start(self, solver, state):
        if not isinstance(state, State):
            raise ValueError(f"{solver!r} does not add noise through the fixed-grid engine; noise replay, noise maps "
                             "and gradients of stochastic samplers need a fixed-grid solver (sde-dpmsolver++, ddim "
                             "with eta > 0).")
        self.stds = [float(stage.noise_std) for stage in state.stages]
        if not any(self.stds):
            return state
        return replace(state, stages=tuple(s._replace(noise_std=0.0) if s.noise_std else s for s in state.stages))

    def _noise(self, k: int, mean: torch.Tensor, solver, state) -> torch.Tensor:
        z = self.noises.get(k)
        if z is not None:
            return z.to(device=mean.device, dtype=mean.dtype)
        if self.mode == "replay":
            raise ValueError(f"The noise sequence has no noise for step {k}, where the solver adds noise.")
        if self.mode == "target":
            z = (self.targets[k + 1].to(mean.dtype) - mean.detach()) / self.stds[k]
        else:   # the solver's own draw (torch.randn with the state's generator, or its noise source)
            noise = getattr(solver, "_noise", None)
            z = (noise(state, k, mean) if noise is not None else
                 torch.randn(mean.shape, generator=state.generator, device=mean.device, dtype=mean.dtype))
        self.noises[k] = z
        return z

    def advance(self, solver, state, evaluate):
        k = state.i
        x_eval, t = solver.ask(state)
        pred = evaluate(x_eval, t)
        new = solver.tell(state, pred)
        std = self.stds[k]
        if std:
            mean = new.x_eval
            x = mean + self._noise(k, mean.detach(), solver, state) * std   # = the engine's x_new.add_(z.mul_(std))
            new = replace(new, x=x if new.x is mean else new.x, x_eval=x)
        return new, pred

    def sequence(self, ts) -> NoiseSequence:
        return NoiseSequence(tuple(self.noises.get(k) for k in range(len(self.stds))), np.asarray(ts, np.float64))


def noise_targets(schedule: Schedule, x0: torch.Tensor, ts: np.ndarray, generator) -> list[torch.Tensor]:
    """The points a noise map steers through: ``alpha_k x0 + sigma_k eps_k`` with independent ``eps_k`` at every
    grid time but the last, and ``x0`` itself at the last (the "edit-friendly" DDPM inversion)."""
    out = []
    for t in ts[:-1]:
        a, s = schedule.alpha_sigma(float(t))
        out.append(a * x0 + s * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
    out.append(x0)
    return out


def check_noise(noise, steps: int, shape, solver) -> NoiseSequence:
    """``noise`` if it is a NoiseSequence for ``steps`` steps of samples of ``shape``, else a clear error."""
    if not isinstance(noise, NoiseSequence):
        raise TypeError(f"noise_sequence must be a dpmsolve.NoiseSequence (from invert(..., noise_map=True)), got "
                        f"{type(noise).__name__}.")
    if not solver.stochastic:
        raise ValueError(f"noise_sequence= replays the noise of a stochastic solver, but {solver!r} adds none; pass the "
                         "solver the sequence was made for (e.g. 'sde-dpmsolver++', or 'ddim' with eta > 0).")
    if len(noise) != steps:
        raise ValueError(f"The noise sequence holds {len(noise)} steps but the grid has {steps}; sample on the grid "
                         f"it was made for (noise.ts, {len(noise.ts) - 1} steps).")
    for k, z in enumerate(noise.noises):
        if z is not None and tuple(z.shape) != tuple(shape):
            raise ValueError(f"The noise of step {k} has shape {tuple(z.shape)} but the sample has {tuple(shape)}.")
    return noise


def describe_grid(ts) -> str:
    ts = np.asarray(ts, np.float64)
    return f"{ts.size - 1} steps from t={ts[0]:.6g} to t={ts[-1]:.6g}"

