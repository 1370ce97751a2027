"""DDIM, DPM-Solver and DPM-Solver++ (multistep, singlestep) and SDE-DPM-Solver++ on fixed grids.

All of them are the same exponential integrator (``_exponential``) with different choices of which earlier
predictions each step uses; every grid time but the last is evaluated exactly once, so NFE = steps.
"""

from __future__ import annotations

import math

from .._checks import check_real
from .._checks import check_order as _check_order
from ..grids import log_snr_blocks
from ._exponential import Form, Node, Rule
from .base import FixedGridSolver, pec_correctors, warmup_orders

_INTEGRATES = {"data": "x0", "noise": "eps"}
# The PEC correctors a multistep solver can apply (``corrector=``): UniC (Zhao et al. 2023) with B(h) = h
# ('unic-bh1') or e^h - 1 ('unic-bh2'; 'unic', the diffusers default). B(h) only matters for the corrector of
# an order-1 step; with more points UniC is the Taylor update through the step's points and the new one.
CORRECTORS = {"unic": Rule.BH2, "unic-bh1": Rule.BH1, "unic-bh2": Rule.BH2}


def _rule(solver_type: str) -> Rule:
    aliases = {"midpoint": "dpmsolver", "heun": "taylor"}
    name = aliases.get(solver_type, solver_type)
    if name not in (Rule.DPMSOLVER.value, Rule.TAYLOR.value):
        raise ValueError(f"Unknown solver_type {solver_type!r}; valid: 'dpmsolver' (alias 'midpoint'), "
                         "'taylor' (alias 'heun').")
    return Rule(name)


def configure(solver, order, allowed, predict: str, solver_type: str) -> None:
    """Validate and set the options every DPM-Solver variant shares."""
    solver._order = _check_order(type(solver).__name__, order, allowed)
    if predict not in _INTEGRATES:
        raise ValueError(f"predict must be 'data' (DPM-Solver++) or 'noise' (DPM-Solver), got {predict!r}.")
    solver.predict, solver.integrates = predict, _INTEGRATES[predict]
    solver.solver_type, solver.rule = solver_type, _rule(solver_type)


def configure_corrector(solver, corrector, disable_corrector) -> None:
    """Validate and set a multistep solver's PEC corrector options (see ``CORRECTORS``)."""
    if corrector is not None and corrector not in CORRECTORS:
        raise ValueError(f"Unknown corrector {corrector!r}; valid: None, {', '.join(map(repr, CORRECTORS))}.")
    try:
        disabled = tuple(sorted({int(k) for k in disable_corrector}))
    except (TypeError, ValueError):
        raise ValueError(f"disable_corrector must be step indices (ints >= 0), got {disable_corrector!r}.") from None
    if any(k < 0 for k in disabled):
        raise ValueError(f"disable_corrector must be step indices (ints >= 0), got {disable_corrector!r}.")
    solver.corrector, solver.disable_corrector = corrector, disabled
    solver.corrector_rule = CORRECTORS[corrector] if corrector is not None else None


class DDIM(FixedGridSolver):
    """DDIM (Song et al. 2021, Eq. 12): order 1, one evaluation per step.

    ``eta = 0`` is the deterministic DDIM, identical to DPM-Solver-1 and DPM-Solver++-1 (Lu et al. 2022,
    Sec. 4.1). ``eta > 0`` adds fresh noise of std ``eta * sigma_t * sqrt(1 - e^{-2h})`` per step (the DDPM
    posterior std at eta = 1, where DDIM equals SDE-DPM-Solver++-1); pass a seeded ``generator`` to
    ``sample`` for reproducible samples.
    """

    integrates = "x0"

    def __init__(self, eta: float = 0.0):
        self.eta = check_real("eta", eta, "DDIM")
        if not self.eta >= 0:
            raise ValueError(f"DDIM needs eta >= 0, got {eta!r}; pass eta in [0, 1] (0: deterministic DDIM).")
        if self.eta > 1:   # eta = 1 is the DDPM posterior std, the most noise a step holds
            raise ValueError(f"DDIM eta={eta!r} asks for more noise than the step holds; use eta <= 1 "
                             "(eta = 1 is DDPM's posterior).")

    @property
    def order(self) -> int:
        return 1

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _step_form(self, s: Node, t: Node) -> Form:
        # DDIM's noise std c = eta sigma_t sqrt(1 - e^{-2h}) is SDE-DPM-Solver++-1 with the step's own eta'.
        h = t.lam - s.lam
        if self.eta == 0 or h <= 0:
            return Form(data=True)
        keep = 1.0 - self.eta**2 * -math.expm1(-2.0 * h)
        if keep <= 0:
            raise ValueError(f"DDIM eta={self.eta} asks for more noise than the step holds; use eta <= 1.")
        return Form(data=True, eta=-math.log(keep) / (2.0 * h))

    def _stages(self, steps):
        return [(i, (i,), Rule.TAYLOR, True) for i in range(steps)]

    def __repr__(self):
        return f"DDIM(eta={self.eta})"


class DPMSolverMultistep(FixedGridSolver):
    """Multistep DPM-Solver (``predict='noise'``) / DPM-Solver++ (``predict='data'``), orders 1-3.

    One evaluation per step; step i uses the predictions at the last ``order`` grid times (Lu et al. 2022b,
    Alg. 2 and App. B). Order 1 is DDIM.

    - ``solver_type``: ``'dpmsolver'`` (reference formulas; diffusers' ``midpoint``) or ``'taylor'`` (exact
      integration of the interpolating polynomial; diffusers' ``heun``). The reference 3M update exists only in
      the ``'dpmsolver'`` form and weights the second difference by half the Taylor value, so it converges with
      order 2; ``'taylor'`` 3M is third order.
    - ``warmup``: ``'singlestep'`` (default) runs the first ``order - 1`` steps as one singlestep block of order
      ``order - 1``, which keeps the declared order for 3M; ``'lower_order'`` is the reference's ramp
      (orders 1, 2, ... while history builds up), which limits 3M to order 2.
    - ``lower_order_final``: drop to order ``steps - i`` for the last steps (stabilises few-step sampling on
      grids with a huge final lambda step). Explicit, with no hidden step-count threshold; it caps the global
      order at 2.
    - ``corrector='unic'`` (or ``'unic-bh1'``, ``'unic-bh2'``): the UniC corrector of UniPC on top of this
      predictor ("solver_p + UniC"; Zhao et al. 2023, Sec. 3.1). When the evaluation at x_i arrives, the step
      that landed there is taken again with that evaluation as one more point, and the next step starts from
      the corrected x_i; the evaluation itself is not repeated, so NFE stays = steps. The final solution is
      not corrected (there is no evaluation at the final time). It raises the order by one, up to 3: order
      1 -> 2, 2 -> 3, 3 -> 3 (the first step, one DDIM step corrected with two points, has local error
      O(h^3)). ``disable_corrector``: steps whose result is left uncorrected (diffusers' convention: step k
      lands on grid index k + 1); each caps the order at its predictor order + 1.
    """

    def __init__(self, order: int = 2, predict: str = "data", solver_type: str = "dpmsolver",
                 lower_order_final: bool = False, warmup: str = "singlestep", corrector: str | None = None,
                 disable_corrector: tuple[int, ...] = ()):
        configure(self, order, (1, 2, 3), predict, solver_type)
        if warmup not in ("singlestep", "lower_order"):
            raise ValueError(f"warmup must be 'singlestep' or 'lower_order', got {warmup!r}.")
        self.warmup = warmup
        self.lower_order_final = bool(lower_order_final)
        configure_corrector(self, corrector, disable_corrector)

    @property
    def order(self) -> int:
        p = self._order
        predictor = 2 if p == 3 and self.rule is Rule.DPMSOLVER else p  # order of the steps in the bulk
        if self.corrector_rule is None:
            return 2 if p == 3 and (self.warmup == "lower_order" or self.lower_order_final) else predictor
        # A corrected step has local error O(h^(predictor + 2)). Capped by the first step (O(h^3): one DDIM
        # step corrected with two points, or the singlestep warm-up block whose intermediate evaluation carries
        # an O(h^2) error), by an uncorrected final order-1 step (lower_order_final), and by each step left
        # uncorrected (its predictor's local error).
        order = min(predictor + 1, 3)
        if self.lower_order_final:
            order = min(order, 2)
        if self.disable_corrector:
            stages = self._stages(max(self.disable_corrector) + 2 * p + 2)  # the ends stay clear of lof
            for k in self.disable_corrector:
                _, points, _, completes = stages[k]
                if completes:
                    order = min(order, min(len(points), predictor) + 1)
        return order

    def _correctors(self, stages, nodes):
        if self.corrector_rule is None:
            return super()._correctors(stages, nodes)
        return pec_correctors(stages, self.corrector_rule, skip={k + 1 for k in self.disable_corrector})

    def _stages(self, steps):
        orders = warmup_orders(self._order, steps, self.lower_order_final)
        block = min(self._order - 1, steps) if self.warmup == "singlestep" and self._order > 2 else 0
        stages = []
        for i in range(steps):
            if i < block:  # one singlestep block over the first `block` intervals, anchored at 0
                stages.append((0, tuple(range(i + 1)), Rule.TAYLOR if i + 1 < block else self.rule, i + 1 == block))
            else:
                stages.append((i, tuple(range(i, i - orders[i], -1)), self.rule, True))
        return stages

    def __repr__(self):
        return (f"DPMSolverMultistep(order={self._order}, predict={self.predict!r}, solver_type={self.solver_type!r}"
                f", lower_order_final={self.lower_order_final}, warmup={self.warmup!r}, corrector={self.corrector!r}"
                f", disable_corrector={self.disable_corrector})")


def fast_orders(order: int, steps: int) -> list[int]:
    """The reference's DPM-Solver-fast split of ``steps`` evaluations into singlestep orders (Lu et al. 2022,
    Sec. 3.4): mostly ``order``, ending with lower orders so that the orders sum to ``steps``."""
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        return [3] * (k - 1) + [steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


def fixed_orders(order: int, steps: int) -> list[int]:
    """``order`` for every block, with the remainder as one lower-order block at the end.

    For order 3 a remainder of 1 is spent as two order-2 blocks (3 + 1 = 2 + 2): a final order-1 block (one
    DDIM step, local error O(h^2)) would cap the global order at 2, while a bounded number of order-2 blocks
    (local error O(h^3)) keeps it at 3.
    """
    if order == 3 and steps > 3 and steps % 3 == 1:
        return [3] * (steps // 3 - 1) + [2, 2]
    return [order] * (steps // order) + ([steps % order] if steps % order else [])


class DPMSolverSinglestep(FixedGridSolver):
    """Singlestep DPM-Solver (``predict='noise'``) / DPM-Solver++ (``predict='data'``), orders 1-3.

    A block of order k spans k grid intervals: it evaluates the model at the block start and at the k - 1 grid
    times inside the block (Lu et al. 2022, Alg. 1-2; r1, r2 follow from the grid, 1/3 and 2/3 on a uniform
    logSNR grid), so NFE = steps. Intermediate points use Taylor steps of increasing order, the block's last
    update uses ``solver_type`` (``'dpmsolver'``: DPM-Solver-2/3 of the paper; ``'taylor'``).

    ``split='fast'`` is the reference's DPM-Solver-fast order split, which ends with lower-order blocks (order 3
    then converges with order 2); ``split='fixed'`` uses ``order`` for every block (remainder last), or pass
    ``orders`` explicitly (integers 1-3 that sum to ``steps``).

    ``spacing`` places the blocks on a named grid that is uniform in lambda (``'logSNR'``, ``'exponential'``):
    ``'blocks'`` (default) is the reference's: K + 1 block ends uniform in lambda (K blocks), each block divided
    uniformly in lambda into its order's steps (LuChengTHU/dpm-solver,
    ``get_orders_and_timesteps_for_singlestep_solver``), so a lower-order block spans as much lambda as an
    order-3 one; ``'grid'`` takes the grid's own equal steps. On other named grids the reference takes the grid's
    own times, as both settings do here; explicit arrays of times, and grids ending at t = 0, are used as given.
    """

    def __init__(self, order: int = 3, predict: str = "data", solver_type: str = "dpmsolver",
                 split: str = "fast", orders: tuple[int, ...] | None = None, spacing: str = "blocks"):
        configure(self, order, (1, 2, 3), predict, solver_type)
        if split not in ("fast", "fixed"):
            raise ValueError(f"split must be 'fast' or 'fixed', got {split!r}.")
        if spacing not in ("blocks", "grid"):
            raise ValueError(f"spacing must be 'blocks' (the reference's equal lambda blocks) or 'grid', got "
                             f"{spacing!r}.")
        self.split, self.spacing = split, spacing
        if orders is not None:
            if isinstance(orders, (str, bytes)) or not hasattr(orders, "__iter__"):
                raise TypeError(f"orders must be a sequence of block orders (ints 1-3), got {orders!r}.")
            orders = tuple(_check_order(f"orders[{k}]", o, (1, 2, 3)) for k, o in enumerate(orders))
            if not orders:
                raise ValueError("orders must hold at least one block order (ints 1-3 summing to steps), got ().")
        self.orders = orders

    @property
    def order(self) -> int:
        if self.orders is not None:
            return min(self.orders)
        return min(self._order, 2) if self.split == "fast" else self._order

    def block_orders(self, steps: int) -> list[int]:
        if self.orders is not None:
            if sum(self.orders) != steps:
                raise ValueError(f"orders {self.orders} sum to {sum(self.orders)} but the grid has {steps} steps.")
            return list(self.orders)
        return (fast_orders if self.split == "fast" else fixed_orders)(self._order, steps)

    def grid(self, schedule, steps, kind="logSNR", t_start=None, t_end=None, **options):
        ts = super().grid(schedule, steps, kind, t_start, t_end, **options)
        if self.spacing == "blocks" and kind in ("logSNR", "exponential") and ts[-1] != 0.0:
            return log_snr_blocks(schedule, self.block_orders(len(ts) - 1), ts[0], ts[-1])
        return ts

    def _stages(self, steps):
        stages, start = [], 0
        for k in self.block_orders(steps):
            for q in range(k):
                last = q == k - 1
                stages.append((start, tuple(range(start, start + q + 1)), self.rule if last else Rule.TAYLOR, last))
            start += k
        return stages

    def __repr__(self):
        return (f"DPMSolverSinglestep(order={self._order}, predict={self.predict!r}, solver_type={self.solver_type!r}, "
                f"split={self.split!r}, orders={self.orders}, spacing={self.spacing!r})")


class SDEDPMSolverPP(FixedGridSolver):
    """SDE-DPM-Solver++ (Lu et al. 2022b, Sec. 5), order 1 or 2 (multistep '2M'), one evaluation per step.

    Integrates x0 with the linear part ``(sigma_t/sigma_s) e^{-eta h}``, weights in ``H = (1 + eta) h`` and
    fresh Gaussian noise ``sigma_t sqrt(1 - e^{-2 eta h}) z`` per step; ``eta = 1`` is the reverse SDE (diffusers'
    ``sde-dpmsolver++``), ``eta = 0`` reproduces DPM-Solver++ exactly. Noise comes from the ``generator``
    given to ``sample``. Strong order with eta > 0 is 1/2 (weak order follows ``order``).
    """

    integrates = "x0"

    def __init__(self, order: int = 2, eta: float = 1.0, solver_type: str = "dpmsolver",
                 lower_order_final: bool = False):
        self._order = _check_order(type(self).__name__, order, (1, 2))
        self.eta = check_real("eta", eta, "SDEDPMSolverPP")
        if not 0 <= self.eta < math.inf:
            raise ValueError(f"SDEDPMSolverPP: eta must be >= 0, got {eta!r}; eta must be finite in [0, ...) (1: the "
                             "reverse SDE, 0: the ODE).")
        self.solver_type = solver_type
        self.rule = _rule(solver_type)
        self.lower_order_final = bool(lower_order_final)

    @property
    def order(self) -> int:
        return self._order

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _form(self) -> Form:
        return Form(data=True, eta=self.eta)

    def _stages(self, steps):
        orders = warmup_orders(self._order, steps, self.lower_order_final)
        return [(i, tuple(range(i, i - orders[i], -1)), self.rule, True) for i in range(steps)]

    def __repr__(self):
        return f"SDEDPMSolverPP(order={self._order}, eta={self.eta}, solver_type={self.solver_type!r})"
