"""DPM-Solver-v3 (Zheng et al. 2023): the exponential integrator in the parametrisation given by the model's
empirical model statistics (EMS, :mod:`dpmsolve.ems`).

With ``f = (sigma eps - l x) / alpha`` and ``g`` the EMS-reweighted f (paper Eq. 8), the exact step from s to
t is (Eq. 9), element-wise,

    x_t = (alpha_t/alpha_s) e^{-dL} x_s - alpha_t e^{-dL} [ Cb + sum_k E_k g^(k)(lambda_s) ],

and ``g_j = e^{-dS_j} f_j - Bt_j`` at earlier points (``ems.quadrature`` has the integrals). The derivatives
g^(k) come from the stored points by polynomial interpolation (or pseudo-order divided differences), so the
update is ``x_t = A x_s + sum_j C_j f_j + d`` with per-element coefficient arrays, computed once per grid in
float64 and run by the same fixed-grid engine as every other solver. The integrand ``f_j`` is formed from
each evaluation as ``(1 - l_j) x_j / alpha_j - x0_j``; it is what the history keeps, so after a correction
the stored value still equals ``N / alpha`` of the uncorrected point, which is the reference's re-projection
``eps^c = eps + l (x^c - x) / sigma`` (Alg. 2) without recomputing anything.
"""

from __future__ import annotations

import math
import numbers
from os import PathLike

import numpy as np

from ..ems.quadrature import step_integrals
from ..ems.statistics import EMS, EMSError
from ._exponential import Node, Rule, derivative_matrix
from .base import FixedGridSolver, warmup_orders
from .dpm_solver import _check_order

HALVES = (None, "noisy", "clean")
_PLANS: list = []          # most recent first: (EMS, key, (nodes, stages), placed tensors); see DPMSolverV3.plan
_PLAN_CACHE_SIZE = 8
# Sound statistics give step coefficients of order 1 (at most ~75 measured, 5 steps on the digits KDE); spurious
# spikes of s (|s| ~ 500 from too wide a derivative step) gave 1e9-1e12 and samples of size 1e8. Refuse those.
MAX_COEFFICIENT = 1e6


class DPMSolverV3(FixedGridSolver):
    """DPM-Solver-v3 (Zheng et al. 2023, Alg. 1-2): multistep predictor of order 1-3 with its corrector, one
    evaluation per step, integrating the EMS parametrisation g of the model (``integrates = "g"``).

    Args:
        ems: the model's statistics (:func:`dpmsolve.ems.compute` or :meth:`EMS.load`), the path of an EMS file
            (loaded here; this is how a diffusers scheduler config refers to them), or ``"degenerate"``
            (l = 1, s = b = 0), with which this solver is DPM-Solver++ multistep with Taylor coefficients and the
            lower-order warm-up (``DPMSolverMultistep(order, solver_type='taylor', warmup='lower_order')``).
        order: predictor order (warm-up 1, 2, ... while history builds, as the reference).
        predictor_pseudo: pseudo-order predictor (the reference's ``p_pseudo``; divided differences of the first
            k + 1 points for the k-th derivative, Thm. 3.4): more stable at <= 5 steps, formal order <= 2.
        corrector: the v3 corrector (Alg. 2). When the evaluation at x_i arrives, the step from x_{i-1} is taken
            again with it among its points; the next step starts from the corrected x_i. No extra evaluation,
            none on the final step. Its order is the previous predictor's (points i-1, i, i-2, ...), or one more
            with ``corrector_pseudo`` (the reference's ``c_pseudo``), and it is applied only where that order
            is at least 2.
        half: None (correct at every step), ``"noisy"`` (only at times t > ``half_split``: what the reference
            code does) or ``"clean"`` (only at t <= ``half_split``: what the paper and the reference README say).
        half_split: the time splitting the halves; default 0.5, the reference's (thu-ml/DPM-Solver-v3, its
            ``timesteps[step - 1] > 0.5``), on schedules whose time runs within [0, 1] (VP, flow). Other schedules
            (EDM: t = sigma) need it given when ``half`` is set.
        lower_order_final: drop to order ``steps - i`` for the last steps (explicit, no hidden threshold).

    Order (global): 1 for order 1 (2 with ``corrector_pseudo``); 2 otherwise (the first step is order 1, and
    pseudo-order estimates are at most second order).
    """

    integrates = "g"
    _fresh_integrand = True     # f_i is computed from x0 (see ``_integrand``), never the network's own buffer

    def __init__(self, ems: EMS | str | None = None, order: int = 2, predictor_pseudo: bool = False,
                 corrector: bool = True, corrector_pseudo: bool = False, half: str | None = None,
                 half_split: float | None = None, lower_order_final: bool = False):
        if isinstance(ems, (str, PathLike)) and ems != "degenerate":
            ems = EMS.load(ems)            # a file path: what a serialised config (diffusers scheduler) can hold
        if not (ems is None or ems == "degenerate" or isinstance(ems, EMS)):
            raise TypeError("ems must be a dpmsolve.ems.EMS (ems.compute(...) or EMS.load(path)), the path of an EMS "
                            f"file, or 'degenerate'; got {ems!r} ({type(ems).__name__}).")
        self.ems = ems
        self._order = _check_order(type(self).__name__, order, (1, 2, 3))
        for name, value in (("predictor_pseudo", predictor_pseudo), ("corrector", corrector),
                            ("corrector_pseudo", corrector_pseudo), ("lower_order_final", lower_order_final)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        if half not in HALVES:
            raise ValueError(f"half must be None, 'noisy' (t > half_split, the reference code) or 'clean' "
                             f"(t <= half_split, the paper); got {half!r}.")
        self.predictor_pseudo, self.corrector, self.corrector_pseudo = predictor_pseudo, corrector, corrector_pseudo
        if half_split is not None and (isinstance(half_split, bool) or not isinstance(half_split, numbers.Real)
                                       or not math.isfinite(half_split)):
            raise ValueError(f"half_split must be None (0.5) or a finite time, got {half_split!r}.")
        self.half, self.half_split = half, None if half_split is None else float(half_split)
        self.lower_order_final = lower_order_final

    @staticmethod
    def recommended(guidance: float | None = None) -> dict:
        """The options we recommend for a model sampled without guidance (``None`` or scale 1) or with
        classifier-free guidance at scale ``guidance``, as measured by ``benchmarks/v3.py`` (and the reference's
        own Stable Diffusion recipe: order 3 unconditional, 2 guided, corrector off from scale 5):

        - unguided: order 3 with the pseudo-order predictor (mixture, digits KDE, patches: better than order 2
          in 9 of 12 cells at 5-10 NFE, within 4% in the others);
        - guided below scale 5: order 2 (digits and digits-flow at scale 3: order 3 up to 2x worse at 5-6 NFE);
        - guided from scale 5: order 2 with ``half="noisy"`` (mixture at 7.5: 2-5x better than the full
          corrector at 5-10 NFE).
        """
        if guidance is None or float(guidance) == 1.0:
            return {"order": 3, "predictor_pseudo": True}
        return {"order": 2} if float(guidance) < 5.0 else {"order": 2, "half": "noisy"}

    @property
    def order(self) -> int:
        if self._order == 1:
            return 2 if self.corrector and self.corrector_pseudo and self.half is None else 1
        return 2

    # ---------------------------------------------------------------------------------------- statistics
    @property
    def statistics(self) -> EMS:
        """The EMS this solver integrates with (``ems='degenerate'``: l = 1, s = b = 0 on any log-SNR)."""
        if self.ems is None:
            raise EMSError("DPM-Solver-v3 needs the model's empirical statistics: pass ems=dpmsolve.ems.compute(...) "
                           "or dpmsolve.ems.EMS.load(path), or ems='degenerate' (then it is DPM-Solver++).")
        return _DEGENERATE if isinstance(self.ems, str) else self.ems

    def init(self, schedule, ts, x, generator=None):
        self.statistics.check(schedule, tuple(x.shape[1:]))
        return super().init(schedule, ts, x, generator)

    def plan(self, schedule, ts):
        """The base plan, cached: with per-element statistics the step integrals cost ~0.6 s for a 20-step grid
        of Stable-Diffusion latents (4x64x64) on a CPU, which a pipeline would otherwise pay at every generation.
        The key holds the EMS object itself (its arrays are read-only), the settings, the schedule and the grid."""
        ts = np.asarray(ts, dtype=np.float64)
        key = (self._settings(), schedule.fingerprint(), ts.tobytes())
        ems = self.statistics
        for i, (cached_ems, cached_key, result, _) in enumerate(_PLANS):
            if cached_ems is ems and cached_key == key:
                _PLANS.insert(0, _PLANS.pop(i))
                return result
        result = super().plan(schedule, ts)
        _PLANS.insert(0, (ems, key, result, {}))
        del _PLANS[_PLAN_CACHE_SIZE:]
        return result

    def _placed(self, stages, x):
        # The tensors of a cached plan, per device and dtype, are cached with it (a few ms for SD latents).
        for _, _, (_, cached_stages), placed in _PLANS:
            if cached_stages is stages:
                where = (x.device, x.dtype)
                if where not in placed:
                    placed[where] = super()._placed(stages, x)
                return placed[where]
        return super()._placed(stages, x)

    def _settings(self) -> tuple:
        return (self._order, self.predictor_pseudo, self.corrector, self.corrector_pseudo, self.half,
                self.half_split, self.lower_order_final)

    def _check_nodes(self, schedule, nodes):
        if self.corrector and self.half is not None and self.half_split is None and not (
                0.0 <= schedule.t_min and schedule.t_max <= 1.0):
            raise ValueError(f"half={self.half!r} splits the steps at t = half_split, whose default 0.5 (the "
                             f"reference's) is for times in [0, 1]; this schedule's run over [{schedule.t_min:.6g}, "
                             f"{schedule.t_max:.6g}]: pass half_split (a time in that range).")
        self.statistics.check(schedule)
        self.statistics.check_range([n.lam for n in nodes if math.isfinite(n.lam)])

    # ------------------------------------------------------------------------------------- coefficients
    def _aux(self, nodes: tuple[Node, ...], i: int):
        """(1 - l_i) / alpha_i: the integrand is f_i = (1 - l_i) x_i / alpha_i - x0_i."""
        l_i = self.statistics.at(nodes[i].lam)[0]
        return np.asarray((1.0 - l_i) / nodes[i].alpha)

    def _integrand(self, stage, x_eval, pred):
        return (x_eval * stage.aux).sub_(pred.x0)

    def _update(self, nodes, anchor, points, end, rule):
        ems = self.statistics
        s, t = nodes[anchor], nodes[end]
        h = t.lam - s.lam
        p = len(points)
        step = step_integrals(ems, s.lam, t.lam, n_taylor=p, with_cb=True)
        d = derivative_matrix([(nodes[j].lam - s.lam) / h for j in points], pseudo=rule is Rule.PSEUDO)
        w = [step.E[k] / h**k for k in range(p)]                      # weights of h^k g^(k)
        decay = np.exp(-step.dL)
        scale = t.alpha * decay                                        # alpha_t e^{-dL}
        a = math.exp(t.log_alpha - s.log_alpha) * decay
        coeffs, inner = [], step.cb
        for j, point in enumerate(points):
            c_j = sum(d[k, j] * w[k] for k in range(p))                # weight of g_j = e^{-dS_j} f_j - Bt_j
            if point == anchor:
                d_s, b_t = 0.0, 0.0
            elif point == end:
                d_s, b_t = step.dS, step.b_tilde
            else:
                other = step_integrals(ems, s.lam, nodes[point].lam)
                d_s, b_t = other.dS, other.b_tilde
            coeffs.append(np.asarray(-scale * c_j * np.exp(-d_s)))
            inner = inner - c_j * b_t
        offset = -scale * inner
        largest = max(float(np.max(np.abs(v))) for v in (a, offset, *coeffs))
        if not largest <= MAX_COEFFICIENT:                              # also catches NaN
            s_max = float(np.max(np.abs(ems.at(np.linspace(s.lam, t.lam, 9))[1])))
            raise EMSError(f"The EMS give step coefficients of {largest:.3g} for the step lambda {s.lam:.4g} -> "
                           f"{t.lam:.4g} (max |s| there: {s_max:.3g}): the statistics are unsound and the sample "
                           "would be too. Recompute them (default fd_step, more data, or a larger var_floor).")
        return np.asarray(a), tuple(coeffs), 0.0, (np.asarray(offset) if np.any(offset) else None)

    def _to_zero(self, nodes, i):
        return self._aux(nodes, i), (-1.0,), None                     # x0 = (1 - l_i) x_i / alpha_i - f_i

    # ------------------------------------------------------------------------------------------- stages
    def _stages(self, steps):
        orders = warmup_orders(self._order, steps, self.lower_order_final)
        rule = Rule.PSEUDO if self.predictor_pseudo else Rule.TAYLOR
        return [(i, tuple(range(i, i - orders[i], -1)), rule, True) for i in range(steps)]

    def _correctors(self, stages, nodes):
        if not self.corrector:
            return [None] * len(stages)
        out = [None] * min(1, len(stages))
        split = 0.5 if self.half_split is None else self.half_split
        rule = Rule.PSEUDO if self.corrector_pseudo else Rule.TAYLOR
        for i in range(1, len(stages)):
            c = len(stages[i - 1][1]) + int(self.corrector_pseudo)
            t = nodes[i].t
            wanted = self.half is None or (t > split if self.half == "noisy" else t <= split)
            if c < 2 or not wanted:
                out.append(None)
                continue
            out.append((i - 1, (i - 1, i) + tuple(range(i - 2, i - c, -1)), rule))
        return out

    def __repr__(self):
        return (f"DPMSolverV3(ems={self.ems!r}, order={self._order}, predictor_pseudo={self.predictor_pseudo}, "
                f"corrector={self.corrector}, corrector_pseudo={self.corrector_pseudo}, half={self.half!r}, "
                f"half_split={self.half_split}, lower_order_final={self.lower_order_final})")


# l = 1, s = b = 0 on a log-SNR range wider than any schedule's: DPM-Solver++ (``ems="degenerate"``).
_DEGENERATE = EMS(np.array([-60.0, 60.0]), np.ones(2), np.zeros(2), np.zeros(2), (), "any", model="degenerate")
