"""PNDM and PLMS (Liu et al. 2022, "Pseudo numerical methods for diffusion models on manifolds").

Both integrate eps with the DDIM transfer ``phi(x_s, e, s -> t)`` (see ``linear_multistep``): in y = x / alpha
over rho = sigma / alpha that transfer is an Euler step, so PLMS is equal-step Adams-Bashforth 4 in rho and PNDM's
pseudo Runge-Kutta warm-up is classical RK4 in rho with its midpoints placed at the middle of the step in t.
Their extra evaluations (RK stages, the PLMS warm-up's second evaluation) are non-completing stages at extra
nodes, as a singlestep block's; the multistep history holds the evaluations at the grid's solutions.
"""

from __future__ import annotations

from ..schedules import Schedule
from ._exponential import Node
from .base import grid_nodes, stages_from
from .linear_multistep import _EpsMultistep, _is_zero, _transfer, adams_bashforth, fixed_adams


class _Pseudo(_EpsMultistep):
    """Shared planning: per step, a warm-up block (``_warmup``) or the PLMS step on the history."""

    def _warmup(self, i: int, steps: int, t: Node) -> str | None:
        """'rk4', 'heun' or None (a PLMS step) for step i of ``steps`` towards t."""
        return None

    def _coefficients(self, schedule, grid, i, points):  # the PLMS steps: equal-step Adams-Bashforth on eps
        return fixed_adams(schedule, grid, i, points)

    def plan(self, schedule: Schedule, ts):
        grid = grid_nodes(schedule, ts)
        self._check_nodes(schedule, tuple(grid))
        steps = len(grid) - 1
        nodes, specs, history = [grid[0]], [], []  # history: node indices of the evaluations at grid solutions
        for i, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
            k = len(nodes) - 1  # the node evaluated at the solution x_i
            history.insert(0, k)
            a, c = _transfer(s, t)
            kind = self._warmup(i, steps, t)
            if kind == "rk4":  # pseudo RK4: e1..e4, x_{i+1} = phi(x_i, (e1 + 2 e2 + 2 e3 + e4) / 6)
                mid = Node.at(schedule, 0.5 * (s.t + t.t))
                am, cm = _transfer(s, mid)
                specs += [(k, (k,), am, (cm,), 0.0, False), (k, (k + 1,), am, (cm,), 0.0, False),
                          (k, (k + 2,), a, (c,), 0.0, False),
                          (k, (k, k + 1, k + 2, k + 3), a, (c / 6, c / 3, c / 3, c / 6), 0.0, True)]
                nodes += [mid, mid, t, t]
            elif kind == "heun":  # PLMS warm-up: x* = phi(x_i, e0), x_{i+1} = phi(x_i, (e0 + e(x*)) / 2)
                specs += [(k, (k,), a, (c,), 0.0, False), (k, (k, k + 1), a, (c / 2, c / 2), 0.0, True)]
                nodes += [t, t]
            else:
                points = tuple(history[:4])
                specs.append((k, points, a, tuple(c * b for b in adams_bashforth(len(points))), 0.0, True))
                nodes.append(t)
        return tuple(nodes), stages_from(specs)


class PNDM(_Pseudo):
    """PNDM (Liu et al. 2022; diffusers ``PNDMScheduler``): 3 pseudo Runge-Kutta steps, then PLMS.

    Integrates eps with the DDIM transfer. The first 3 steps are pseudo RK4 (4 evaluations each, the middle two
    at the middle of the step in t), the rest pseudo linear multistep (equal-step Adams-Bashforth 4 on the
    evaluations at the grid's solutions; 1 evaluation each), so NFE = steps + 9 for steps >= 3. A step to
    sigma = 0 is never a RK step (no evaluation at sigma = 0): it is the multistep step on the history there.
    Order 2 on general grids (equal-step weights; RK midpoints in t); order 4 on a grid uniform in rho with t
    proportional to rho (EDM, time-uniform).
    """

    _warmup_steps = 3

    @property
    def order(self) -> int:
        return 2

    def _rk_steps(self, steps: int, ends_at_zero: bool) -> int:
        return min(self._warmup_steps, steps - bool(ends_at_zero))

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return steps + 3 * max(self._rk_steps(steps, ends_at_zero), 0)

    def _warmup(self, i, steps, t):
        return "rk4" if i < self._warmup_steps and not _is_zero(t) else None

    def __repr__(self):
        return "PNDM()"


class PLMS(_Pseudo):
    """PLMS (Liu et al. 2022, pseudo linear multistep; diffusers ``PNDMScheduler(skip_prk_steps=True)``).

    Integrates eps with the DDIM transfer: equal-step Adams-Bashforth (orders 2, 3, then 4) on the evaluations at
    the grid's solutions. Warm-up as diffusers: the first step (when there are at least 2) is a pseudo improved
    Euler step (2 evaluations: eps at x_0, and at its DDIM transfer), so NFE = steps + 1 (1 step: one DDIM
    step). A step to sigma = 0 is the multistep step. Order 2 on general grids (equal-step weights), at least 3
    on a rho-uniform grid (the warm-up's local error is O(h^3)).
    """

    @property
    def order(self) -> int:
        return 2

    def expected_nfe(self, steps: int, ends_at_zero: bool = False) -> int:
        return steps + (steps >= 2)

    def _warmup(self, i, steps, t):
        return "heun" if i == 0 and steps >= 2 else None

    def __repr__(self):
        return "PLMS()"
