"""DPM-Solver-v3: quadrature, degenerate statistics, exactness on an EMS-ideal model, corrector semantics.

Independent truths used here:
* the lambda integrals against scipy's adaptive ``quad`` (piecewise-linear statistics);
* ``l = 1, s = b = 0`` against our DPM-Solver++ multistep (Taylor, lower-order warm-up), itself checked
  against diffusers elsewhere (the paper's degenerate case);
* an "EMS-ideal" model, whose f = (sigma eps - l x) / alpha depends on lambda only and solves f' = s f + b
  exactly: then g is constant along every step, so EVERY v3 configuration must reproduce a tight scipy solve of
  the ODE ``dy/dlambda = -l y - f`` up to quadrature error, with any grid and any step count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

import dpmsolve as dp
from dpmsolve.ems import EMS, EMSError, step_integrals
from dpmsolve.solvers._exponential import derivative_matrix

from conftest import SCHEDULES


def random_ems(schedule, dim=3, nodes=9, seed=0):
    lo, hi = schedule.log_snr_range
    g = np.random.default_rng(seed)
    lam = np.linspace(lo, hi, nodes)
    return EMS(lam, g.uniform(0.1, 1.0, (nodes, dim)), g.uniform(-0.6, 0.4, (nodes, dim)),
               g.uniform(-0.5, 0.5, (nodes, dim)), (dim,), schedule.fingerprint(), 100, "random")


# ------------------------------------------------------------------------------------------------ quadrature
@pytest.mark.parametrize("direction", [1, -1])
def test_step_integrals_match_adaptive_quadrature(direction):
    schedule = dp.DiscreteVP.linear()
    ems = random_ems(schedule, dim=1, nodes=7)
    lo, hi = ems.log_snr_range
    a, b = (lo + 0.4, hi - 1.3)[::direction]
    lam, l, s, bb = ems.lambdas, ems.l[:, 0], ems.s[:, 0], ems.b[:, 0]
    pts = list(lam)

    def integral(f, x0, x1):
        return quad(f, x0, x1, points=[p for p in pts if min(x0, x1) < p < max(x0, x1)] or None, limit=200,
                    epsabs=1e-13, epsrel=1e-12)[0]

    S = lambda x: integral(lambda u: np.interp(u, lam, s), a, x)  # noqa: E731
    L = lambda x: integral(lambda u: np.interp(u, lam, l), a, x)  # noqa: E731
    Bt = lambda x: integral(lambda r: math.exp(-S(r)) * np.interp(r, lam, bb), a, x)  # noqa: E731
    out = step_integrals(ems, a, b, n_taylor=3, with_cb=True)
    assert abs(out.dL[0] - L(b)) < 1e-12 and abs(out.dS[0] - S(b)) < 1e-12
    assert abs(out.b_tilde[0] - Bt(b)) < 1e-11
    for k in range(3):
        truth = integral(lambda x: math.exp(L(x) + S(x)) * (x - a) ** k / math.factorial(k), a, b)
        assert abs(out.E[k][0] - truth) < 1e-10 * max(1.0, abs(truth))
    truth = integral(lambda x: math.exp(L(x) + S(x)) * Bt(x), a, b)
    assert abs(out.cb[0] - truth) < 1e-9 * max(1.0, abs(truth))


def test_degenerate_integrals_are_the_phi_functions():
    from dpmsolve.solvers._exponential import phi

    ems = EMS.degenerate(dp.LinearVP())
    lo, _ = ems.log_snr_range
    for h in (0.01, 0.7, 6.0):
        out = step_integrals(ems, lo, lo + h, n_taylor=3, with_cb=True)
        assert abs(out.dL - h) < 1e-14 and out.dS == 0 and out.cb == 0
        for k in range(3):  # int_0^h e^u u^k / k! du = h^(k+1) e^h phi_(k+1)(-h)
            truth = h ** (k + 1) * math.exp(h) * phi(k + 1, -h)
            assert abs(out.E[k] - truth) < 1e-13 * truth


def test_derivative_matrix():
    rhos = [0.0, -0.7, -1.5, 0.4]
    poly = np.array([0.3, -1.1, 0.8, 0.25])                      # m(rho) = sum_k poly[k] rho^k
    values = np.polyval(poly[::-1], rhos)
    truth = np.array([poly[k] * math.factorial(k) for k in range(4)])  # h^k m^(k)(0) with h = 1
    assert np.allclose(derivative_matrix(rhos) @ values, truth, atol=1e-12)
    pseudo = derivative_matrix(rhos, pseudo=True) @ values
    for k in range(4):  # k! times the divided difference of the first k + 1 points
        dd = values[: k + 1].copy()
        for level in range(1, k + 1):
            dd = np.array([(dd[j + 1] - dd[j]) / (rhos[j + level] - rhos[j]) for j in range(len(dd) - 1)])
        assert abs(pseudo[k] - math.factorial(k) * dd[0]) < 1e-12


# --------------------------------------------------------------------------------------- degenerate = DPM++
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid,t_end", [("logSNR", None), ("time_uniform", 0.0), ("karras", None)])
def test_degenerate_statistics_are_dpm_solver_pp(schedule_name, order, grid, t_end, mixture):
    schedule = SCHEDULES[schedule_name]()
    den = mixture.denoiser(schedule)
    x = mixture.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(0))
    ours = dp.sample(den, x, "dpmsolver-v3", ems="degenerate", order=order, corrector=False, steps=7, grid=grid,
                     t_end=t_end, progress=False).x
    per_element = EMS.degenerate(schedule, (2,))                    # the same, as a file would hold it
    also = dp.sample(den, x, "dpmsolver-v3", ems=per_element, order=order, corrector=False, steps=7, grid=grid,
                     t_end=t_end, progress=False).x
    pp = dp.sample(den, x, "dpmsolver++", order=order, solver_type="taylor", warmup="lower_order", steps=7,
                   grid=grid, t_end=t_end, progress=False).x
    assert (ours - pp).abs().max() < 1e-12 and (also - pp).abs().max() < 1e-12


def test_degenerate_inversion_is_dpm_solver_pp(mixture):
    schedule = dp.DiscreteVP.linear()
    den = mixture.denoiser(schedule)
    x0 = mixture.data_sample(4, torch.Generator().manual_seed(1))
    ours = dp.invert(den, x0, "dpmsolver-v3", ems="degenerate", order=2, corrector=False, steps=9, progress=False)
    pp = dp.invert(den, x0, "dpmsolver++", order=2, solver_type="taylor", steps=9, progress=False)
    assert (ours.x - pp.x).abs().max() < 1e-11


# ---------------------------------------------------------------------------------------- EMS-ideal model
class IdealModel(dp.Denoiser):
    """A model whose f = (sigma eps - l x) / alpha is f(lambda) with f' = s f + b exactly (per element)."""

    def __init__(self, schedule, ems: EMS, f_start):
        self.schedule, self.ems = schedule, ems
        lam = ems.lambdas

        def rhs(u, f):
            return [np.interp(u, lam, ems.s[:, d]) * f[d] + np.interp(u, lam, ems.b[:, d]) for d in range(len(f))]

        # Piece by piece between the nodes, where the statistics are smooth (no kink inside a DOP853 step).
        pieces, f = [], np.asarray(f_start, dtype=np.float64)
        for lo, hi in zip(lam[:-1], lam[1:]):
            sol = solve_ivp(rhs, (lo, hi), f, method="DOP853", rtol=1e-13, atol=1e-14, dense_output=True)
            pieces.append(sol.sol)
            f = sol.y[:, -1]
        self.f = lambda u: pieces[min(max(np.searchsorted(lam, u) - 1, 0), len(pieces) - 1)](u)

    def __call__(self, x, t, **kwargs):
        lam = float(self.schedule.log_snr(t))
        a, s = self.schedule.alpha_sigma(t)
        l = torch.as_tensor(self.ems.at(lam)[0]).to(x)
        f = torch.as_tensor(self.f(lam)).to(x)
        x0 = (1 - l) * x / a - f
        return dp.Prediction(x0, (x - a * x0) / s)

    def exact(self, x, t_start, t_end):
        """dy/dlambda = -l y - f(lambda), y = x / alpha, by DOP853."""
        sch, lam = self.schedule, self.ems.lambdas
        l0, l1 = float(sch.log_snr(t_start)), float(sch.log_snr(t_end))
        y0 = (x / sch.alpha(t_start)).numpy()

        def rhs(u, y):
            l = np.array([np.interp(u, lam, self.ems.l[:, d]) for d in range(y0.shape[1])])
            return (-l * y.reshape(y0.shape) - self.f(u)).reshape(-1)

        y = y0.reshape(-1)
        breaks = [l0, *lam[(lam > min(l0, l1)) & (lam < max(l0, l1))][:: 1 if l1 > l0 else -1], l1]
        for lo, hi in zip(breaks[:-1], breaks[1:]):
            y = solve_ivp(rhs, (lo, hi), y, method="DOP853", rtol=1e-13, atol=1e-14).y[:, -1]
        return torch.as_tensor(y.reshape(y0.shape)) * sch.alpha(t_end)


V3_CONFIGS = [
    dict(order=1, corrector=False), dict(order=1, corrector_pseudo=True), dict(order=2), dict(order=2, corrector=False),
    dict(order=3), dict(order=3, predictor_pseudo=True, corrector_pseudo=True), dict(order=3, half="noisy"),
    dict(order=2, half="clean", lower_order_final=True),
]


@pytest.mark.parametrize("options", V3_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("schedule_name", ["discrete", "edm", "flow"])
def test_every_configuration_is_exact_on_an_ems_ideal_model(options, schedule_name):
    schedule = SCHEDULES[schedule_name]()
    if "half" in options and schedule_name == "edm":  # t = sigma: the reference's split 0.5 is a VP time
        options = {**options, "half_split": 1.0}
    ems = random_ems(schedule, dim=3, nodes=9, seed=2)
    model = IdealModel(schedule, ems, [0.4, -0.2, 0.7])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3)) * schedule.sigma(schedule.t_max)
    truth = model.exact(x, schedule.t_max, schedule.t_min)
    for steps, grid in ((3, "logSNR"), (6, "time_uniform")):
        out = dp.sample(model, x, "dpmsolver-v3", ems=ems, steps=steps, grid=grid, progress=False, **options).x
        assert (out - truth).abs().max() < 1e-10 * max(1.0, truth.abs().max().item()), (steps, grid)
    # A grid ending at sigma = 0: the jump is x0 = (1 - l) x / alpha - f at the last evaluated point, exact here.
    sol = dp.sample(model, x, "dpmsolver-v3", ems=ems, steps=5, grid="logSNR", t_end=0, progress=False, **options)
    ts = dp.make_grid(schedule, 5, "logSNR", t_end=0)
    x_last = model.exact(x, schedule.t_max, ts[-2])
    assert (sol.x - model(x_last, ts[-2]).x0).abs().max() < 1e-10


def test_non_ideal_model_is_not_solved_exactly(mixture):
    """The exactness above is not automatic: the same statistics on another model leave a visible error."""
    schedule = dp.DiscreteVP.linear()
    ems = random_ems(schedule, dim=2, nodes=9, seed=2)
    den = mixture.denoiser(schedule)
    x = mixture.prior_sample(schedule, 5, generator=torch.Generator().manual_seed(0))
    truth = mixture.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    out = dp.sample(den, x, "dpmsolver-v3", ems=ems, steps=6, progress=False).x
    assert (out - truth).abs().max() > 1e-4


# -------------------------------------------------------------------------------------- corrector semantics
def _corrected(solver, schedule, steps=10):
    nodes, stages = solver.plan(schedule, dp.make_grid(schedule, steps, "logSNR"))
    return [i for i, st in enumerate(stages) if st.corrector is not None], nodes, stages


def test_corrector_points_and_halves():
    schedule = dp.LinearVP()
    on, _, stages = _corrected(dp.DPMSolverV3("degenerate", order=3), schedule)
    assert on == list(range(2, 10))                  # index 1 follows an order-1 step: corrector order 1, skipped
    assert stages[2].corrector.points == (1, 2)      # order 2: anchor, new point
    assert stages[5].corrector.points == (4, 5, 3)   # order 3: anchor, new point, the one before the anchor
    on, _, stages = _corrected(dp.DPMSolverV3("degenerate", order=3, corrector_pseudo=True), schedule)
    assert on == list(range(1, 10)) and stages[5].corrector.points == (4, 5, 3, 2)
    noisy, nodes, _ = _corrected(dp.DPMSolverV3("degenerate", half="noisy"), schedule)
    clean, _, _ = _corrected(dp.DPMSolverV3("degenerate", half="clean"), schedule)
    split = 0.5                                      # the reference's split (thu-ml/DPM-Solver-v3)
    assert noisy and clean and set(noisy).isdisjoint(clean) and set(noisy) | set(clean) == set(range(2, 10))
    assert all(nodes[i].t > split for i in noisy) and all(nodes[i].t <= split for i in clean)
    at, nodes, _ = _corrected(dp.DPMSolverV3("degenerate", half="noisy", half_split=0.3), schedule)
    assert all(nodes[i].t > 0.3 for i in at) and any(nodes[i].t < 0.5 for i in at)
    assert not _corrected(dp.DPMSolverV3("degenerate", corrector=False), schedule)[0]


def test_corrector_keeps_f_and_costs_no_evaluation(mixture):
    schedule = dp.DiscreteVP.linear()
    den = mixture.denoiser(schedule)
    x = mixture.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(0))
    solver = dp.DPMSolverV3("degenerate", order=2)
    sol = dp.sample(den, x, solver, steps=8, progress=False)
    assert sol.nfe == 8
    # With l = 1 the stored integrand is -x0 of the UNcorrected point (the reference's N-preserving re-projection).
    state = solver.init(schedule, dp.make_grid(schedule, 8, "logSNR"), x)
    for _ in range(3):
        xe, t = solver.ask(state)
        pred = den(xe, t)
        state = solver.tell(state, pred)
    assert torch.equal(state.history[0][1], -pred.x0)


@pytest.fixture(scope="module")
def mixture_ems():
    from test_convergence import _problem_setup

    schedule, problem, _, _, t0, t1 = _problem_setup("mixture", "discrete")
    x0 = problem.data_sample(1000, torch.Generator().manual_seed(5))
    # Few nodes on the window: the order shows once the steps are finer than the statistics' nodes. Statistics
    # with many nodes and few points carry node-to-node noise, which puts a floor under the error (measured:
    # 300 nodes, K = 1000 stall near 4e-5 from 192 steps on; see the v3 benchmark for the low-NFE effect).
    return dp.ems.compute(problem.denoiser(schedule), x0, n_lambdas=6, t_start=t0, t_end=t1, batch_size=500,
                          progress=False)


@pytest.mark.parametrize("options", [dict(order=1, corrector=False), dict(order=1, corrector_pseudo=True),
                                     dict(order=2), dict(order=2, corrector=False), dict(order=3)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_v3_convergence_order_matches_declared(options, mixture_ems):
    """Against DOP853 on the convergence suite's mixture (lambda window [-1, 2]), with estimated statistics."""
    from test_convergence import MIXTURE_STEPS, _check, _problem_setup, fitted_slope

    schedule, problem, x, truth, t0, t1 = _problem_setup("mixture", "discrete")
    solver = dp.DPMSolverV3(mixture_ems, **options)
    slope, errors = fitted_slope(problem.denoiser(schedule), x, solver, MIXTURE_STEPS, "logSNR", t0, t1, truth)
    _check(solver.order, slope, MIXTURE_STEPS, errors)


# ------------------------------------------------------------------------------------------------- errors
def test_missing_or_mismatched_statistics_raise_clear_errors(mixture):
    schedule = dp.DiscreteVP.linear()
    den = mixture.denoiser(schedule)
    x = mixture.prior_sample(schedule, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(EMSError, match="needs the model's empirical statistics"):
        dp.sample(den, x, "dpmsolver-v3", steps=5)
    with pytest.raises(EMSError, match="computed for the schedule"):
        dp.sample(den, x, "dpmsolver-v3", ems=random_ems(dp.LinearVP(), dim=2), steps=5)
    with pytest.raises(EMSError, match="cannot serve samples of shape"):
        dp.sample(den, x, "dpmsolver-v3", ems=random_ems(schedule, dim=3), steps=5)
    lo, hi = schedule.log_snr_range
    narrow = EMS(np.linspace(lo + 1, hi, 5), np.ones((5, 2)), np.zeros((5, 2)), np.zeros((5, 2)), (2,),
                 schedule.fingerprint())
    with pytest.raises(EMSError, match="outside the EMS grid"):
        dp.sample(den, x, "dpmsolver-v3", ems=narrow, steps=5)
    inside = float(schedule.t_from_log_snr(lo + 1.0))
    assert dp.sample(den, x, "dpmsolver-v3", ems=narrow, steps=5, t_start=inside, progress=False).nfe == 5
    spiky_s = np.zeros((5, 2))
    spiky_s[1] = 500.0                    # a spurious spike, as too wide a derivative step produced on a KDE
    spiky = EMS(np.linspace(lo, hi, 5), np.ones((5, 2)), spiky_s, np.zeros((5, 2)), (2,), schedule.fingerprint())
    with pytest.raises(EMSError, match="statistics are unsound"):
        dp.sample(den, x, "dpmsolver-v3", ems=spiky, steps=5)
    for bad in (dict(order=4), dict(half="both"), dict(corrector="yes"), dict(ems=np.ones(3))):
        with pytest.raises(ValueError):
            dp.DPMSolverV3(**{"ems": "degenerate", **bad})


def test_shared_statistics_serve_other_resolutions():
    schedule = dp.DiscreteVP.linear()
    lam = np.linspace(*schedule.log_snr_range, 4)
    shared = EMS(lam, np.full((4, 3, 1, 1), 0.5), np.zeros((4, 3, 1, 1)), np.zeros((4, 3, 1, 1)), (3, 8, 8),
                 schedule.fingerprint())
    shared.check(schedule, (3, 16, 16))
    with pytest.raises(EMSError):
        shared.check(schedule, (4, 8, 8))
    per_element = EMS(lam, np.full((4, 3, 8, 8), 0.5), np.zeros((4, 3, 8, 8)), np.zeros((4, 3, 8, 8)), (3, 8, 8),
                      schedule.fingerprint())
    with pytest.raises(EMSError, match="only the shape they were estimated on"):
        per_element.check(schedule, (3, 16, 16))
    assert per_element.share().stat_shape == (3, 1, 1)


def test_plans_are_cached_per_statistics_grid_and_settings(mixture):
    """Planning with per-element statistics is the expensive part; a second init on the same grid reuses it, and
    any change of statistics, settings or grid plans anew (same numbers as an uncached plan)."""
    from dpmsolve.solvers import v3 as v3_module

    schedule = dp.DiscreteVP.linear()
    ems = random_ems(schedule, dim=2, nodes=9, seed=4)
    ts = dp.make_grid(schedule, 6, "logSNR")
    first = dp.DPMSolverV3(ems, order=2).plan(schedule, ts)
    assert dp.DPMSolverV3(ems, order=2).plan(schedule, ts) is first          # another solver object, same settings
    assert dp.DPMSolverV3(ems, order=3).plan(schedule, ts) is not first
    assert dp.DPMSolverV3(ems, order=2).plan(schedule, dp.make_grid(schedule, 7, "logSNR")) is not first
    copy = EMS(ems.lambdas, ems.l, ems.s, ems.b, ems.data_shape, ems.schedule)
    again = dp.DPMSolverV3(copy, order=2).plan(schedule, ts)
    assert again is not first
    v3_module._PLANS.clear()
    fresh = dp.DPMSolverV3(ems, order=2).plan(schedule, ts)
    for a, b in zip(fresh[1], first[1]):
        assert all(np.array_equal(x, y) for x, y in zip(a.coeffs, b.coeffs)) and np.array_equal(a.a, b.a)


def test_recommended_settings_by_guidance():
    """Order 3 with the pseudo predictor unguided, 2 guided, and the noisy-half corrector from scale 5."""
    rec = dp.DPMSolverV3.recommended
    assert rec() == rec(1.0) == {"order": 3, "predictor_pseudo": True}
    assert rec(3.0) == {"order": 2} and rec(7.5) == {"order": 2, "half": "noisy"}
    for scale in (None, 3.0, 7.5):
        assert dp.DPMSolverV3("degenerate", **rec(scale)).order == 2
