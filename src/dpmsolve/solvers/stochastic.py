"""Stochastic samplers on the fixed-grid engine: k-diffusion's ancestral samplers and the DPM-Solver++ SDE family.

Every sampler here is a plan of :class:`~dpmsolve.solvers.base.Stage` s like any deterministic solver: host float64
coefficients, and a ``noise_std`` on the stages that add noise (completed steps, or an intermediate point for
``dpmpp-sde``). The k-diffusion samplers are written in the scaled coordinates ``y = x / alpha`` with the VE noise
level ``sigma~ = sigma / alpha = e^{-lambda}`` (as in ``karras.py``), so they run on every schedule (VP, EDM/VE,
rectified flow) and equal k-diffusion's VE formulas on an EDM schedule.

An ancestral step s -> t (k-diffusion's ``get_ancestral_step``) splits sigma~_t into a deterministic part
``sigma~_down = sigma~_t sqrt(1 - u)`` and fresh noise ``sigma~_up = sigma~_t sqrt(u)``, with
``u = min(1, eta^2 (1 - e^{-2h}))``: the ODE step goes to sigma~_down (a virtual node with t's alpha) and
``alpha_t sigma~_up s_noise z`` is added.

Noise options shared by all of them (:class:`StochasticSolver`): ``eta`` (0: the ODE counterpart, exactly),
``s_noise`` (scales the added noise only) and ``noise``: ``"gaussian"`` (fresh ``torch.randn`` from the sample's
generator, the engine's default path), ``"brownian"`` (increments of one Brownian path over the VE sigmas,
:class:`~dpmsolve.noise.BrownianNoise`, seeded from the generator: a finer grid samples the same path), or a
k-diffusion-style ``noise_sampler(sigma, sigma_next) -> z`` (called with float64 0-dim tensors of the step's VE
sigmas; for ``dpmpp-sde`` also with the intermediate sigma).

Orders: ``order`` is that of the deterministic method (eta = 0), which the registry tests measure. With noise,
the noise is additive in y = x / alpha: along one Brownian path (``noise='brownian'``) the samples converge with
strong order 1 as the grid is refined, and weakly with order >= 1 (``tests/test_stochastic_solvers.py``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .._checks import check_number
from ..noise import BrownianNoise
from ..schedules import Schedule
from ._exponential import Form, Node, Rule
from .base import FixedGridSolver, Stage, State, grid_nodes, stages_from, warmup_orders
from .karras import DPM2, _euler

NOISE_KINDS = ("gaussian", "brownian")
NoiseSource = Callable[[Node, Node], torch.Tensor]


@dataclass(frozen=True)
class StochasticState(State):
    """A fixed-grid state with its noise source: ``noise_source(s, t)`` gives the standard normal z of a stage
    from node s to node t; None: the engine's ``torch.randn`` with the state's generator."""

    noise_source: NoiseSource | None = None


def ve_sigma(node: Node) -> float:
    """sigma / alpha = e^{-lambda} of a node (0 at sigma = 0)."""
    return math.exp(-node.lam)


def ancestral(s: Node, t: Node, eta: float) -> tuple[Node, float]:
    """(down, u) of k-diffusion's ancestral step s -> t: the ODE step goes to ``down`` (sigma~_t sqrt(1 - u), with
    t's alpha; t itself when u = 0) and noise of std ``sigma_t sqrt(u)`` is added."""
    if eta == 0 or t.log_sigma == -math.inf:
        return t, 0.0
    u = min(1.0, eta * eta * -math.expm1(-2.0 * (t.lam - s.lam)))
    if u == 0.0:
        return t, 0.0
    if u >= 1.0:
        return Node(math.nan, math.inf, t.log_alpha, -math.inf), 1.0
    lam = t.lam - 0.5 * math.log1p(-u)
    return Node(math.nan, lam, t.log_alpha, t.log_alpha - lam), u


def _callable_source(sampler: Callable) -> NoiseSource:
    def source(s: Node, t: Node) -> torch.Tensor:
        return sampler(torch.tensor(ve_sigma(s), dtype=torch.float64), torch.tensor(ve_sigma(t), dtype=torch.float64))

    return source


class StochasticSolver(FixedGridSolver):
    """Base of the stochastic samplers: noise options, the noise source in the state, steps per grid time.

    A step is complete when the solution (the anchor) moves to the next grid time, so samplers with extra
    evaluation points (``_stages`` is not used: subclasses plan their nodes) report one step per grid interval.
    """

    integrates = "x0"
    eta: float = 0.0
    s_noise: float = 1.0
    noise: Any = "gaussian"

    def _configure_noise(self, eta, s_noise, noise, eta_name: str = "eta") -> None:
        owner = type(self).__name__
        self.eta = check_number(eta_name, eta, 0.0, owner=owner)
        self.s_noise = check_number("s_noise", s_noise, 0.0, owner=owner)
        if isinstance(noise, str):
            if noise not in NOISE_KINDS:
                raise ValueError(f"{owner}: noise must be 'gaussian', 'brownian' or a noise_sampler(sigma, sigma_next) "
                                 f"function, got {noise!r}.")
        elif not callable(noise):
            raise TypeError(f"{owner}: noise must be 'gaussian', 'brownian' or a noise_sampler(sigma, sigma_next) "
                            f"function, got {type(noise).__name__} {noise!r}.")
        self.noise = noise

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def _stages(self, steps):
        raise TypeError(f"{type(self).__name__} plans its nodes and stages in ``plan`` (extra evaluation points); it has "
                        "no per-grid-time stage layout.")

    def _noise_source(self, nodes, stages, x: torch.Tensor, generator) -> NoiseSource | None:
        if self.noise == "gaussian" or not any(stage.noise_std for stage in stages):
            return None
        if callable(self.noise):
            return _callable_source(self.noise)
        sigmas = [ve_sigma(n) for n in nodes if n.log_sigma > -math.inf]
        return _callable_source(BrownianNoise(x, min(sigmas), max(sigmas), generator=generator))

    def init(self, schedule, ts, x, generator=None) -> StochasticState:
        nodes, stages = self.plan(schedule, ts)
        stages = self._placed(stages, x)
        return StochasticState(x=x, x_eval=x, i=0, anchor_index=0, nodes=nodes, stages=stages, generator=generator,
                               noise_source=self._noise_source(nodes, stages, x, generator))

    def _noise(self, state, i, like):
        source = getattr(state, "noise_source", None)
        if source is None:
            return super()._noise(state, i, like)
        z = source(state.nodes[state.stages[i].anchor], state.nodes[i + 1])
        return z.to(device=like.device, dtype=like.dtype, copy=True)

    def step_completed(self, before, after) -> bool:
        return after.anchor_index != before.anchor_index

    def current(self, state):
        return state.x, state.t


# --------------------------------------------------------------------------------------------- ancestral

class _SigmaSpaceStochastic(StochasticSolver):
    """One grid interval at a time, in sigma-space: ``_step`` gives the extra nodes and the stages of one step."""

    _evaluations = 1  # per step (a step to sigma = 0 always takes one)

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, noise="gaussian"):
        self._configure_noise(eta, s_noise, noise)

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int | None:
        if self._evaluations > 1 and self.eta > 1:
            return None  # a step whose sigma_down is 0 takes one evaluation (eta > 1 only): depends on the grid
        return self._evaluations * steps - (self._evaluations - 1) * bool(ends_at_zero and steps >= 1)

    @abstractmethod
    def _step(self, schedule: Schedule, s: Node, t: Node, i: int):
        """(extra nodes, specs) of the step s -> t whose first evaluation is node i (specs as in ``stages_from``)."""

    def plan(self, schedule, ts):
        grid = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(grid))
        nodes, specs = [grid[0]], []
        for s, t in zip(grid[:-1], grid[1:]):
            i = len(nodes) - 1
            if t.log_sigma == -math.inf:  # to sigma = 0: the x0 prediction (Euler), no noise
                extra, step = [], [(i, (i,), 0.0, (1.0,), 0.0, True)]
            else:
                extra, step = self._step(schedule, s, t, i)
            nodes += extra + [t]
            specs += step
        return tuple(nodes), stages_from(specs)

    def _up(self, t: Node, u: float) -> float:
        return t.sigma * math.sqrt(u) * self.s_noise

    def __repr__(self):
        return f"{type(self).__name__}(eta={self.eta}, s_noise={self.s_noise}, noise={self.noise!r})"


class EulerAncestral(_SigmaSpaceStochastic):
    """Euler ancestral sampling (k-diffusion ``sample_euler_ancestral``), in sigma-space for every schedule.

    Order 1 (eta = 0: exactly ``euler``, i.e. DDIM), one evaluation per step; integrates x0. Each step takes an
    Euler step of the probability-flow ODE to sigma~_down and adds noise of std sigma~_up (``eta = 1``: the
    ancestral/DDPM split of sigma~_t; Ho et al. 2020, Song et al. 2021; k-diffusion). No noise on a step to
    sigma = 0.
    """

    @property
    def order(self) -> int:
        return 1

    def _step(self, schedule, s, t, i):
        down, u = ancestral(s, t, self.eta)
        a, c = _euler(s, down)
        return [], [(i, (i,), a, (c,), self._up(t, u), True)]


class DPM2Ancestral(_SigmaSpaceStochastic):
    """DPM-2 ancestral sampling (k-diffusion ``sample_dpm_2_ancestral``), in sigma-space for every schedule.

    Order 2 (eta = 0: exactly ``dpm2``), two evaluations per step (one on a step to sigma = 0, or when
    sigma_down = 0, possible only for eta > 1); integrates x0. The DPM-2 midpoint step (Karras et al. 2022;
    k-diffusion) goes to sigma~_down, then noise of std sigma~_up is added.
    """

    _evaluations = 2

    @property
    def order(self) -> int:
        return 2

    def _step(self, schedule, s, t, i):
        down, u = ancestral(s, t, self.eta)
        if down.log_sigma == -math.inf:  # k-diffusion: an Euler step to sigma_down = 0, and no noise
            a, c = _euler(s, down)
            return [], [(i, (i,), a, (c,), 0.0, True)]
        mid, (a1, c1), (a2, c20, c21) = DPM2._second(self, schedule, s, down)
        return [mid], [(i, (i,), a1, (c1,), 0.0, False), (i, (i, i + 1), a2, (c20, c21), self._up(t, u), True)]


class DPMPP2SAncestral(_SigmaSpaceStochastic):
    """DPM-Solver++(2S) ancestral sampling (k-diffusion ``sample_dpmpp_2s_ancestral``), for every schedule.

    Order 2 (eta = 0: singlestep DPM-Solver++(2S) with the intermediate point at the lambda midpoint, i.e.
    ``dpmsolver++`` singlestep order 2 on the grid with the midpoints inserted), two evaluations per step (one on a
    step to sigma = 0, or when sigma_down = 0: eta > 1); integrates x0. Each step is DPM-Solver++(2S) (Lu et al.
    2022b, Alg. 1, r = 1/2) to sigma~_down, then noise of std sigma~_up.
    """

    _evaluations = 2

    @property
    def order(self) -> int:
        return 2

    def _step(self, schedule, s, t, i):
        down, u = ancestral(s, t, self.eta)
        a, c = _euler(s, down)  # DPM-Solver++ 1 (= Euler in sigma-space) from s to down
        if down.log_sigma == -math.inf:
            return [], [(i, (i,), a, (c,), self._up(t, u), True)]
        mid = Node.at_log_snr(schedule, s.lam + 0.5 * (down.lam - s.lam))
        a1, c1 = _euler(s, mid)
        return [mid], [(i, (i,), a1, (c1,), 0.0, False), (i, (i + 1,), a, (c,), self._up(t, u), True)]


class DPMPPSDE(_SigmaSpaceStochastic):
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): a stochastic singlestep 2nd-order method.

    Order 2 (eta = 0: DPM-Solver++(2S) with its intermediate point at ``lambda_s + r h``; with r = 1/2 the same
    as ``dpmpp-2s-ancestral`` at eta = 0), two evaluations per step (one on a step to sigma = 0); integrates x0.
    Step 1 is an ancestral Euler step to the intermediate point (noise over [sigma_s, sigma_r]); step 2 an
    ancestral step s -> t with ``(1 - 1/(2r)) x0_s + 1/(2r) x0_r`` (noise over [sigma_s, sigma_t]). Default
    ``noise='brownian'`` as k-diffusion: the two noises are increments of one Brownian path, correlated as the
    method assumes, and a finer grid samples the same path.
    """

    _evaluations = 2

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, noise="brownian", r: float = 0.5):
        super().__init__(eta, s_noise, noise)
        self.r = check_number("r", r, 0.0, 1.0, low_open=True, owner="DPMPPSDE")

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return 2 * steps - bool(ends_at_zero and steps >= 1)

    @property
    def order(self) -> int:
        return 2

    def _step(self, schedule, s, t, i):
        mid = Node.at_log_snr(schedule, s.lam + self.r * (t.lam - s.lam))
        down1, u1 = ancestral(s, mid, self.eta)
        a1, c1 = _euler(s, down1)
        down2, u2 = ancestral(s, t, self.eta)
        a2, c2 = _euler(s, down2)
        fac = 1.0 / (2.0 * self.r)
        return [mid], [(i, (i,), a1, (c1,), self._up(mid, u1), False),
                       (i, (i, i + 1), a2, ((1.0 - fac) * c2, fac * c2), self._up(t, u2), True)]

    def __repr__(self):
        return f"DPMPPSDE(eta={self.eta}, s_noise={self.s_noise}, noise={self.noise!r}, r={self.r})"


# --------------------------------------------------------------------------------------------- multistep SDE

class _MultistepSDE(StochasticSolver):
    """SDE-DPM-Solver++ multistep steps (``Form(data, eta)``: linear part ``(sigma_t/sigma_s) e^{-eta h}``, noise
    ``sigma_t sqrt(1 - e^{-2 eta h}) s_noise z``), one evaluation per step, planned by the base engine."""

    def _form(self) -> Form:
        return Form(data=True, eta=self.eta)

    def _update(self, nodes, anchor, points, end, rule):
        a, coeffs, noise_std, offset = super()._update(nodes, anchor, points, end, rule)
        return a, coeffs, noise_std * self.s_noise, offset

    def plan(self, schedule, ts):
        return FixedGridSolver.plan(self, schedule, ts)

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return steps

    @property
    def order(self) -> int:
        return 2


class DPMPP2MSDE(_MultistepSDE):
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; Lu et al. 2022b, Sec. 5).

    Order 2 (eta = 0: exactly ``dpmsolver++`` multistep order 2 with the same ``solver_type``), one evaluation
    per step; integrates x0. ``solver_type='midpoint'`` (k-diffusion's default) or ``'heun'`` weights the
    difference as DPM-Solver++'s ``'dpmsolver'`` / ``'taylor'`` rules. The same method as ``sde-dpmsolver++``
    (order 2), with k-diffusion's noise options: ``s_noise``, and Brownian noise by default.
    """

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, noise="brownian", solver_type: str = "midpoint"):
        self._configure_noise(eta, s_noise, noise)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"DPMPP2MSDE: solver_type must be 'midpoint' or 'heun' (k-diffusion's), got "
                             f"{solver_type!r}.")
        self.solver_type = solver_type
        self.rule = Rule.DPMSOLVER if solver_type == "midpoint" else Rule.TAYLOR

    def _stages(self, steps):
        orders = warmup_orders(2, steps, False)
        return [(i, tuple(range(i, i - orders[i], -1)), self.rule, True) for i in range(steps)]

    def __repr__(self):
        return (f"DPMPP2MSDE(eta={self.eta}, s_noise={self.s_noise}, noise={self.noise!r}, "
                f"solver_type={self.solver_type!r})")


class DPMPP3MSDE(_MultistepSDE):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``).

    Order 2, one evaluation per step; integrates x0. Steps: order 1, then the Taylor 2nd-order step, then the
    reference 3M update (DPM-Solver++'s ``'dpmsolver'`` rule with three points: the second difference at half
    the Taylor weight, hence order 2, as the reference multistep 3M), all with SDE-DPM-Solver++'s ``eta``
    (Lu et al. 2022b, Sec. 5). eta = 0 is its ODE form (k-diffusion's ``sample_dpmpp_3m_sde(eta=0)``, not the same as
    ``dpmsolver++`` order 3, whose warm-up differs). Brownian noise by default.
    """

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, noise="brownian"):
        self._configure_noise(eta, s_noise, noise)

    def _stages(self, steps):
        rules = (Rule.TAYLOR, Rule.TAYLOR, Rule.DPMSOLVER)
        return [(i, tuple(range(i, max(i - 3, -1), -1)), rules[min(i, 2)], True) for i in range(steps)]

    def __repr__(self):
        return f"DPMPP3MSDE(eta={self.eta}, s_noise={self.s_noise}, noise={self.noise!r})"
