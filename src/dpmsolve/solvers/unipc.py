"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that costs no evaluation.

Both halves are the exponential integrator of ``_exponential`` with UniPC's B(h) weighting (``Rule.BH1`` /
``Rule.BH2``) and run in the fixed-grid engine of ``base``: UniP-p is the multistep step of order p, and UniC
is a predict-evaluate-correct corrector (``base.pec_correctors``) applied when the evaluation at the predicted
point arrives. UniPC is therefore ``DPMSolverMultistep`` with another rule, the reference's warm-up and UniC
switched on; the same corrector is available on DPM-Solver(++) itself as ``corrector='unic'``.
"""

from __future__ import annotations

from ._exponential import Rule
from .dpm_solver import _INTEGRATES, DPMSolverMultistep, _check_order, configure_corrector


class UniPC(DPMSolverMultistep):
    """UniPC (Zhao et al. 2023, Alg. 1-3): UniP-p predictor + UniC corrector, orders 1-3, one evaluation per step.

    Integrates x0 (``predict='data'``, the paper's data-prediction UniPC) or eps (``predict='noise'``). Step i
    is UniP-p through the predictions at the last p grid times (warm-up: orders 1, 2, ... while history builds
    up, as the reference); when the model has been evaluated at the predicted x_{i+1}, UniC takes the step
    again with that evaluation as one more point, and the next step starts from the corrected x_{i+1}. The
    evaluation is not repeated (NFE = steps), and the final solution is not corrected.

    ``variant``: B(h) = h (``'bh1'``; the reference's default, recommended there for unconditional sampling
    with few steps) or e^h - 1 (``'bh2'``; diffusers' default). B(h) matters only where UniPC fixes its
    coefficient at 1/2 (UniP-2, and UniC after an order-1 step); with more points both variants are the Taylor
    update through the points (B(h) cancels; see ``Rule``). Equivalences: UniP-1 without corrector is DDIM;
    UniP-2-bh2 without corrector is DPM-Solver(++) 2M (``solver_type='dpmsolver'``), and UniPC-2-bh2 is that
    2M with ``corrector='unic'``; UniP-3's order-3 steps are 3M ``solver_type='taylor'`` steps (its order-2
    warm-up step uses the 1/2 rule).

    Order (global, measured by the tests): UniPC-p with corrector has order p + 1 in the bulk of the steps,
    capped at 3 by the warm-up (the first step is one DDIM step corrected with two points, local error
    O(h^3)): order 1 -> 2, 2 -> 3, 3 -> 3. Without corrector: p, and 2 for p = 3 (warm-up). With
    ``lower_order_final`` (diffusers' default; off here, as for DPM-Solver++) the last step is an uncorrected
    DDIM step: order 2. ``disable_corrector``: steps whose result stays uncorrected (diffusers' convention:
    step k lands on grid index k + 1; the reference's advice is to disable it in the first steps with large
    guidance); each caps the order at its predictor order + 1.
    """

    def __init__(self, order: int = 2, predict: str = "data", variant: str = "bh2", lower_order_final: bool = False,
                 corrector: bool = True, disable_corrector: tuple[int, ...] = ()):
        self._order = _check_order(type(self).__name__, order, (1, 2, 3))
        if predict not in _INTEGRATES:
            raise ValueError(f"predict must be 'data' (x0) or 'noise' (eps), got {predict!r}.")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1), got {variant!r}.")
        if not isinstance(corrector, bool):
            raise ValueError(f"corrector must be True (UniPC) or False (UniP only), got {corrector!r}.")
        self.predict, self.integrates = predict, _INTEGRATES[predict]
        self.variant = self.solver_type = variant
        self.rule = Rule(variant)
        self.warmup = "lower_order"
        self.lower_order_final = bool(lower_order_final)
        configure_corrector(self, f"unic-{variant}" if corrector else None, disable_corrector)

    def __repr__(self):
        return (f"UniPC(order={self._order}, predict={self.predict!r}, variant={self.variant!r}, "
                f"lower_order_final={self.lower_order_final}, corrector={self.corrector is not None}, "
                f"disable_corrector={self.disable_corrector})")
