"""UniPC (UniP predictor + UniC corrector) and UniC on top of DPM-Solver(++): oracle, order, exactness, protocol.

* Oracle: diffusers' ``UniPCMultistepScheduler`` on the same times and the same float64 'network' as
  ``test_diffusers_oracle`` (its helpers are reused). diffusers computes its coefficients from float32 sigma
  tables and expects torch's default dtype to be float32 (under a float64 default its corrector stacks a float64
  ``R`` with a float32 ``b`` and fails), so it is run under a float32 default. As shipped (float32 tables) the
  agreement is limited by float32: worst 4.7e-5 relative (noise form, order 3) with float32 samples, 1.0e-5
  with float64 samples; tolerance 1e-4. With diffusers' sigma table replaced by the float64 values of the same
  schedule (and a float64 default) both sides compute in float64 and agree to round-off (worst 4.7e-13;
  tolerance 1e-11): the update formulas, warm-up, corrector, ``lower_order_final`` and ``disable_corrector``
  coincide term by term.
* Convergence: the methodology of ``test_convergence`` (lambda window [-1, 2], the same data, step counts and
  0.3 tolerance). UniPC-p with corrector converges with order p + 1 in the bulk, but its first step (one DDIM
  step corrected with two points) has local error O(h^3), so p = 3 is order 3, not 4. That O(h^3) term has a
  small constant: at the standard counts UniPC-3-bh2 reads 3.2 (Gaussian) and 4.0 (mixture) before it
  settles. Configurations with a third-order predictor and a corrector are therefore measured at 4x the step
  counts on the Gaussian (96..768) and 8x on the mixture (384..3072), there against a DOP853 reference at rtol
  1e-13 (the rtol 1e-10 one is too coarse at errors of 1e-12). Local slopes measured for UniPC-3-bh2 on the
  mixture: 4.04, 3.72, 3.23, 3.13, 3.07 from 96 to 3072 steps (pinned by
  ``test_order3_warmup_is_preasymptotic_on_the_mixture``).
* Exactness: point mass (every variant, 1-5 steps) and polynomial predictions for the corrector alone.
* Equivalences: UniP-1 = DDIM, UniP-2-bh2 = DPM-Solver(++) 2M, UniPC = DPM-Solver(++) + ``corrector='unic'``
  where the predictors coincide (one code path).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import PointMass, reference_solution
from dpmsolve.solvers._exponential import Rule

from test_convergence import GAUSS_STEPS, MIXTURE_STEPS, TOLERANCE, _problem_setup, fitted_slope  # noqa: I001
from test_exactness import PolynomialDenoiser, _poly_coeffs, _start
from test_protocol import Counting

EXACT = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array


# --------------------------------------------------------------------------------------------------- oracle
@functools.lru_cache(maxsize=None)
def _oracle_helpers():
    pytest.importorskip("diffusers")
    import test_diffusers_oracle as helpers
    from diffusers import UniPCMultistepScheduler

    return helpers, UniPCMultistepScheduler


@dataclasses.dataclass(frozen=True)
class Case:
    order: int
    variant: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = False
    disable_corrector: tuple[int, ...] = ()
    prediction: str = "epsilon"
    steps: int = 20
    spacing: str = "linspace"

    @property
    def id(self) -> str:
        out = f"o{self.order}-{self.variant}-{'data' if self.predict_x0 else 'noise'}"
        if self.lower_order_final:
            out += "-lof"
        if self.disable_corrector:
            out += "-disable" + "_".join(map(str, self.disable_corrector))
        if self.prediction != "epsilon":
            out += f"-{self.prediction}"
        if self.spacing != "linspace":
            out += f"-{self.spacing}"
        return out + f"-{self.steps}steps"

    def ours(self) -> dp.UniPC:
        return dp.UniPC(order=self.order, variant=self.variant, predict="data" if self.predict_x0 else "noise",
                        lower_order_final=self.lower_order_final, disable_corrector=self.disable_corrector)


CASES = [
    *[Case(order, variant, x0) for order in (1, 2, 3) for variant in ("bh1", "bh2") for x0 in (True, False)],
    *[Case(order, variant, lower_order_final=True, steps=steps)
      for order in (2, 3) for variant in ("bh1", "bh2") for steps in (10, 20)],
    Case(3, "bh1", False, lower_order_final=True, steps=10),
    *[Case(order, "bh2", x0, disable_corrector=(0, 3)) for order in (2, 3) for x0 in (True, False)],
    Case(2, "bh1", disable_corrector=(1, 2, 5)),
    Case(2, "bh2", prediction="v_prediction"),
    Case(3, "bh1", prediction="sample"),
    Case(2, "bh2", spacing="trailing", steps=8),
    Case(3, "bh2", spacing="leading", steps=6, lower_order_final=True),
]
FLOAT32_TOL = 1e-4
FLOAT64_TABLES_TOL = 1e-11


def run_unipc_oracle(case: Case, sample_dtype=torch.float64, tables: str = "float32",
                     solver: dp.Solver | None = None):
    """(ours, theirs) from the same start noise on diffusers' times (see the module docstring)."""
    helpers, scheduler_cls = _oracle_helpers()
    sched = scheduler_cls(solver_order=case.order, solver_type=case.variant, predict_x0=case.predict_x0,
                          lower_order_final=case.lower_order_final, disable_corrector=list(case.disable_corrector),
                          prediction_type=case.prediction, final_sigmas_type="sigma_min",
                          timestep_spacing=case.spacing)
    sched.set_timesteps(case.steps)
    timesteps = sched.timesteps.clone()
    schedule = dp.DiscreteVP.from_alphas_cumprod(sched.alphas_cumprod.numpy())
    if tables == "float64":
        helpers.float64_tables(sched, schedule)
    net = helpers.network(schedule, case.prediction)
    x_start = torch.randn(helpers.SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_start = x_start.to(sample_dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if tables == "float64" else torch.float32)
    try:
        x = x_start.clone()
        for t in timesteps:
            x = sched.step(net(x, t), t, x).prev_sample
    finally:
        torch.set_default_dtype(old)
    denoiser = dp.wrap_model(net, schedule, prediction=case.prediction, time_input="discrete")
    sol = dp.sample(denoiser, x_start.clone(), solver or case.ours(), grid=helpers.our_grid(timesteps),
                    progress=False)
    assert sol.nfe == len(timesteps) and sol.x.dtype == x.dtype == sample_dtype
    assert torch.isfinite(x).all()
    return sol.x, x


def _rel(ours, theirs) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_diffusers_unipc(case):
    # float32 samples (diffusers' own setting), float64 samples (the network is float64), as shipped
    for dtype in (torch.float32, torch.float64):
        ours, theirs = run_unipc_oracle(case, dtype)
        assert _rel(ours, theirs) < FLOAT32_TOL, dtype
    # with float64 tables the difference is round-off: the same update, term by term
    ours, theirs = run_unipc_oracle(case, torch.float64, tables="float64")
    assert _rel(ours, theirs) < FLOAT64_TABLES_TOL


@pytest.mark.parametrize("case, wrong", [
    (Case(2, "bh1"), dict(variant="bh2")),
    (Case(2, "bh2"), dict(corrector=False)),
    (Case(1, "bh1"), dict(variant="bh2")),            # B(h) of the order-1 corrector
    (Case(3, "bh2"), dict(order=2)),
    (Case(2, "bh2", disable_corrector=(0, 3), steps=8), dict(disable_corrector=())),
    (Case(2, "bh2", lower_order_final=True, steps=10), dict(lower_order_final=False)),
    (Case(2, "bh2", predict_x0=False), dict(predict="data")),
], ids=lambda v: v.id if isinstance(v, Case) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_oracle_tolerance_discriminates(case, wrong):
    """A neighbouring configuration misses the oracle by far more than the float32 tolerance."""
    options = dict(order=case.order, variant=case.variant, predict="data" if case.predict_x0 else "noise",
                   lower_order_final=case.lower_order_final, disable_corrector=case.disable_corrector)
    ours, theirs = run_unipc_oracle(case, torch.float64, tables="float64", solver=dp.UniPC(**{**options, **wrong}))
    assert _rel(ours, theirs) > 5 * FLOAT32_TOL


# ---------------------------------------------------------------------------------------------- convergence
UNIPC_CONFIGS = [
    *[(f"unipc{p}-{v}", "unipc", dict(order=p, variant=v)) for p in (1, 2, 3) for v in ("bh1", "bh2")],
    *[(f"unipc{p}-noise", "unipc", dict(order=p, predict="noise")) for p in (2, 3)],
    *[(f"unip{p}-no-corrector", "unipc", dict(order=p, corrector=False)) for p in (1, 2, 3)],
    *[(f"unipc{p}-lof", "unipc", dict(order=p, lower_order_final=True)) for p in (2, 3)],
    ("unipc2-disable0", "unipc", dict(order=2, disable_corrector=(0,))),
    ("unipc2-disable3", "unipc", dict(order=2, disable_corrector=(3,))),
    # UniC on DPM-Solver(++): the same corrector on another predictor
    *[(f"dpmsolver++{p}-unic", "dpmsolver++", dict(order=p, corrector="unic")) for p in (1, 2, 3)],
    ("dpmsolver++3-taylor-unic", "dpmsolver++", dict(order=3, solver_type="taylor", corrector="unic")),
    ("dpmsolver++2-unic-bh1", "dpmsolver++", dict(order=2, corrector="unic-bh1")),
    ("dpmsolver2-unic", "dpmsolver", dict(order=2, corrector="unic")),
]
CONVERGENCE = [pytest.param(name, opts, id=cid) for cid, name, opts in UNIPC_CONFIGS]
DECLARED = {"unipc1-bh1": 2, "unipc1-bh2": 2, "unipc2-bh1": 3, "unipc2-bh2": 3, "unipc3-bh1": 3, "unipc3-bh2": 3,
            "unipc2-noise": 3, "unipc3-noise": 3, "unip1-no-corrector": 1, "unip2-no-corrector": 2,
            "unip3-no-corrector": 2, "unipc2-lof": 2, "unipc3-lof": 2, "unipc2-disable0": 2, "unipc2-disable3": 3,
            "dpmsolver++1-unic": 2, "dpmsolver++2-unic": 3, "dpmsolver++3-unic": 3, "dpmsolver++3-taylor-unic": 3,
            "dpmsolver++2-unic-bh1": 3, "dpmsolver2-unic": 3}


def _warmup_capped(name: str, opts) -> bool:
    """A third-order predictor with UniC: order 4 in the bulk, 3 only through the warm-up's O(h^3) term."""
    corrected = opts.get("corrector", name == "unipc") not in (False, None)
    third = opts.get("order") == 3 and (name == "unipc" or opts.get("solver_type") == "taylor")
    return corrected and third and not opts.get("lower_order_final", False)


@functools.lru_cache(maxsize=None)
def _tight_mixture_truth():
    schedule, problem, x, _, t0, t1 = _problem_setup("mixture", "discrete")
    return reference_solution(problem, schedule, x, t0, t1, rtol=1e-13, atol=1e-15)


def measure(kind: str, schedule_name: str, name: str, opts: dict, steps=None, grid: str = "logSNR"):
    schedule, problem, x, truth, t0, t1 = _problem_setup(kind, schedule_name)
    if steps is None:
        steps = GAUSS_STEPS if kind == "gaussian" else MIXTURE_STEPS
        if _warmup_capped(name, opts):
            steps = tuple(4 * n for n in steps) if kind == "gaussian" else tuple(8 * n for n in steps)
    if kind == "mixture" and max(steps) > max(MIXTURE_STEPS):
        truth = _tight_mixture_truth()
    solver = dp.get_solver(name, **opts)
    slope, errors = fitted_slope(problem.denoiser(schedule), x, solver, steps, grid, t0, t1, truth)
    return solver.order, slope, steps, errors


def _check(order, slope, steps, errors):
    assert np.all(np.isfinite(errors)) and np.all(errors > 1e-13), f"errors hit the float floor: {errors}"
    assert np.all(np.diff(errors) < 0), f"error does not shrink with steps {steps}: {errors}"
    assert abs(slope - order) < TOLERANCE, f"measured order {slope:.2f} != declared {order} ({steps}: {errors})"


def test_declared_orders():
    for cid, name, opts in UNIPC_CONFIGS:
        assert dp.get_solver(name, **opts).order == DECLARED[cid], cid


@pytest.mark.parametrize("schedule_name", ["discrete", "flow"])
@pytest.mark.parametrize("name,opts", CONVERGENCE)
def test_order_gaussian(name, opts, schedule_name):
    _check(*measure("gaussian", schedule_name, name, opts))


@pytest.mark.parametrize("name,opts", [p for p in CONVERGENCE if p.id in ("unipc1-bh2", "unipc2-bh1", "unipc2-bh2")])
def test_order_gaussian_time_uniform_flow(name, opts):
    """A grid non-uniform in lambda (UniPC-3 is left out: on this grid it needs > 768 steps to settle at 3)."""
    _check(*measure("gaussian", "flow", name, opts, grid="time_uniform"))


@pytest.mark.parametrize("name,opts", CONVERGENCE)
def test_order_mixture(name, opts):
    _check(*measure("mixture", "discrete", name, opts))


def test_order3_warmup_is_preasymptotic_on_the_mixture():
    """Pins the reason for the longer counts: at the standard counts UniPC-3-bh2 reads ~4 on the mixture."""
    _, slope, _, _ = measure("mixture", "discrete", "unipc", dict(order=3), steps=MIXTURE_STEPS)
    assert slope > 3.6


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_unic_raises_the_order_of_dpmsolver_pp(kind):
    """UniC on DPM-Solver++: 1 -> 2 and 2M -> 3 (one order up, and smaller errors at every step count);
    3M (Taylor) stays 3, as the warm-up caps it."""
    for p, before, after in ((1, 1, 2), (2, 2, 3)):
        plain = measure(kind, "discrete", "dpmsolver++", dict(order=p))
        corrected = measure(kind, "discrete", "dpmsolver++", dict(order=p, corrector="unic"))
        assert (plain[0], corrected[0]) == (before, after)
        _check(*plain)
        _check(*corrected)
        assert corrected[1] - plain[1] > 0.7
        assert np.all(corrected[3] < plain[3])
    # (measured with the other warm-up-capped configurations in test_order_*)
    assert dp.get_solver("dpmsolver++", order=3, solver_type="taylor", corrector="unic").order == 3


# ---------------------------------------------------------------------------------------------- exactness
ALL_VARIANTS = [dict(order=p, variant=v, predict=pr, corrector=c) for p in (1, 2, 3) for v in ("bh1", "bh2")
                for pr in ("data", "noise") for c in (True, False)]


POINT_SCHEDULES = {"discrete": dp.DiscreteVP.linear, "edm": dp.EDM, "flow": dp.RectifiedFlow}


def _point_mass_error(schedule, opts, steps, lam_window=None) -> float:
    problem = PointMass([0.7, -1.2, 0.3])
    t0, t1 = schedule.t_max, schedule.t_min
    if lam_window is not None:
        lo, hi = schedule.log_snr_range
        t0, t1 = schedule.t_from_log_snr(max(lo, lam_window[0])), schedule.t_from_log_snr(min(hi, lam_window[1]))
    x = problem.prior_sample(schedule, 4, t=t0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = problem.exact_solution(schedule, x, t0, t1)
    sol = dp.sample(problem.denoiser(schedule), x, "unipc", steps=steps, t_start=t0, t_end=t1, progress=False, **opts)
    return (sol.x - truth).abs().max().item() / max(1.0, truth.abs().max().item())


@pytest.mark.parametrize("schedule_name", sorted(POINT_SCHEDULES))
@pytest.mark.parametrize("opts", ALL_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_point_mass_is_solved_exactly(opts, schedule_name):
    """x0 and eps are constant along exact point-mass trajectories: every UniPC variant lands on the exact
    solution in 1, 2, 3 or 5 steps; the data form over the whole range. The noise form is run on |lambda| <= 4
    (see the next test for why)."""
    schedule = POINT_SCHEDULES[schedule_name]()
    window = None if opts["predict"] == "data" else (-4.0, 4.0)
    for steps in (1, 2, 3, 5):
        assert _point_mass_error(schedule, opts, steps, window) < EXACT, steps


def test_noise_form_corrector_amplifies_round_off_on_huge_steps():
    """Exact in exact arithmetic, but the noise-form corrector puts the weight sigma_t (e^h - 1) / 2 (bh2) on
    eps at the predicted point, whose sensitivity to x is 1 / sigma_t: round-off grows by ~(e^h - 1) / 2 per
    step. On RectifiedFlow's whole range (lambda span 13.8) in 5 steps (h = 2.8) that is 3e-9; bh1's weight
    sigma_t h / 2 grows far less, and the data form (x0 independent of x) not at all."""
    schedule = dp.RectifiedFlow()
    errors = {(v, pr): max(_point_mass_error(schedule, dict(order=o, variant=v, predict=pr), 5) for o in (1, 2, 3))
              for v in ("bh1", "bh2") for pr in ("data", "noise")}
    assert errors["bh1", "data"] < 1e-14 and errors["bh2", "data"] < 1e-14
    assert 1e-10 < errors["bh2", "noise"] < 1e-7
    assert errors["bh1", "noise"] < errors["bh2", "noise"] / 10


def _corrected_one_step_errors(den, solver, ts) -> list[tuple[int, float]]:
    """Drive the solver by hand; put the exact solution in place of every corrected point once it has been
    read, so each error is that of one corrector application from an exact start (with exact history: the
    prediction does not depend on x). The corrected x_i is visible as the next state's ``x_prev``."""
    schedule = den.schedule
    x0 = _start(schedule)
    state = solver.init(schedule, ts, x0)
    out = []
    while not solver.done(state):
        x_eval, t = solver.ask(state)
        state = solver.tell(state, den(x_eval, t))
        if state.x_prev is not None:
            i = state.i - 1  # the grid index just corrected (then stepped from)
            truth = den.exact_solution(x0, float(ts[0]), float(ts[i]))
            if state.stages[i].corrector is not None:
                out.append((len(state.stages[i].corrector.points), float((state.x_prev - truth).abs().max())))
            state = dataclasses.replace(state, x_prev=truth)
    return out


@pytest.mark.parametrize("schedule_name", ["discrete", "flow"])
@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("order", [2, 3])
def test_unic_exact_for_degree_points_minus_one(order, data, schedule_name):
    """A UniC correction through n >= 3 predictions (n = order + 1 after the warm-up) is exact for predictions
    of degree n - 1 in lambda: B(h) cancels and it is the Taylor update through the points. Through n = 2
    (after the order-1 warm-up step) UniC fixes its coefficient at 1/2 and is exact for degree 0 only."""
    schedule = {"discrete": dp.DiscreteVP.linear, "flow": dp.RectifiedFlow}[schedule_name]()
    ts = dp.make_grid(schedule, 8, "logSNR")
    for variant in ("bh1", "bh2"):
        solver = dp.UniPC(order=order, variant=variant, predict="data" if data else "noise")
        for degree in range(order + 1):
            den = PolynomialDenoiser(schedule, _poly_coeffs(degree), data=data)
            errors = _corrected_one_step_errors(den, solver, ts)
            # grid indices 1 .. 6 are corrected and kept (the corrected x_7 feeds the last step only)
            assert [n for n, _ in errors] == [min(i, order) + 1 for i in range(1, 7)]
            for n, err in errors:
                if n >= 3 and degree <= n - 1 or degree == 0:
                    assert err < EXACT, (variant, degree, errors)
                elif n == 2 or degree == n:
                    assert err > 1e-6, (variant, degree, errors)


# ------------------------------------------------------------------------------------------ equivalences
def _gauss_run(solver, steps=9, grid="time_uniform"):
    data = dp.lab.GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.DiscreteVP.linear()
    x = data.prior_sample(schedule, 5, generator=torch.Generator().manual_seed(3))
    return dp.sample(data.denoiser(schedule), x, solver, steps=steps, grid=grid, progress=False).x


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unip1_without_corrector_is_ddim(variant):
    ddim = _gauss_run(dp.DDIM())
    torch.testing.assert_close(_gauss_run(dp.UniPC(order=1, variant=variant, corrector=False)), ddim,
                               rtol=0, atol=1e-14)
    # and the corrector really acts
    assert (_gauss_run(dp.UniPC(order=1, variant=variant)) - ddim).abs().max() > 1e-4


@pytest.mark.parametrize("predict", ["data", "noise"])
def test_unip2_bh2_without_corrector_is_dpm_solver_2m(predict):
    """UniP-2-bh2 is DPM-Solver(++) 2M with the reference 'dpmsolver' rule; UniP-2-bh1 is not. (UniP-3 has no
    DPM-Solver twin: its warm-up order-2 step uses UniPC's 1/2 rule and its order-3 steps the Taylor one.)"""
    name = "dpmsolver++" if predict == "data" else "dpmsolver"
    ms2 = _gauss_run(dp.get_solver(name, order=2, solver_type="dpmsolver"))
    unip2 = _gauss_run(dp.UniPC(order=2, predict=predict, corrector=False))
    torch.testing.assert_close(unip2, ms2, rtol=0, atol=1e-14)
    bh1 = _gauss_run(dp.UniPC(order=2, variant="bh1", predict=predict, corrector=False))
    assert (bh1 - ms2).abs().max() > 1e-5


@pytest.mark.parametrize("predict", ["data", "noise"])
@pytest.mark.parametrize("order, variant, solver_type", [(1, "bh1", "taylor"), (1, "bh2", "taylor"),
                                                         (2, "bh2", "dpmsolver")])
def test_unipc_is_dpm_solver_multistep_with_unic(order, variant, solver_type, predict):
    """One code path: where the predictors coincide, UniPC equals DPM-Solver(++) + UniC (the same corrector
    option of the multistep solver, with the same B(h))."""
    name = "dpmsolver++" if predict == "data" else "dpmsolver"
    unipc = _gauss_run(dp.UniPC(order=order, variant=variant, predict=predict))
    dpm = _gauss_run(dp.get_solver(name, order=order, solver_type=solver_type, corrector=f"unic-{variant}"))
    torch.testing.assert_close(unipc, dpm, rtol=0, atol=1e-14)


def test_rule_bh_coefficients():
    """B(h) cancels in UniPC's square systems (three or more points: the Taylor weights); with two points
    BH2 is DPM-Solver-2's W0/2 rule and BH1 weights the difference by c_t h / 2."""
    from dpmsolve.solvers._exponential import Form, Node, step_coefficients

    schedule = dp.LinearVP()
    s, t = Node.at(schedule, 0.7), Node.at(schedule, 0.5)
    h = t.lam - s.lam
    for form in (Form(data=True), Form(data=False)):
        for rhos in ([0.0, -0.8, -1.7], [0.0, -0.8, 1.0], [0.0, -0.9, -1.6, 1.0]):
            taylor = step_coefficients(form, s, t, rhos, Rule.TAYLOR)
            for rule in (Rule.BH1, Rule.BH2):
                a, c = step_coefficients(form, s, t, rhos, rule)
                assert a == taylor[0] and np.allclose(c, taylor[1], rtol=1e-13, atol=1e-15)
        _, c2 = step_coefficients(form, s, t, [0.0, -0.8], Rule.BH2)
        np.testing.assert_array_equal(c2, step_coefficients(form, s, t, [0.0, -0.8], Rule.DPMSOLVER)[1])
        _, c1 = step_coefficients(form, s, t, [0.0, 1.0], Rule.BH1)
        ch = (t.alpha if form.data else -t.sigma) * h
        assert c1[1] == pytest.approx(ch / 2, rel=1e-13) and sum(c1) == pytest.approx(form.linear_and_weights(s, t, 1)[1][0])


# ------------------------------------------------------------------------------------------------ protocol
def _gauss_problem():
    data = dp.lab.GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.LinearVP()
    x = data.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(7))
    return schedule, data.denoiser(schedule), x




PROTOCOL = [dict(order=p, variant=v) for p in (1, 2, 3) for v in ("bh1", "bh2")] + [
    dict(order=3, predict="noise", disable_corrector=(1,)), dict(order=2, lower_order_final=True)]


@pytest.mark.parametrize("opts", PROTOCOL, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_protocol(opts):
    schedule, den, x = _gauss_problem()
    solver = dp.UniPC(**opts)
    for steps in (1, 2, 3, 7):
        counting = Counting(den)
        sol = dp.sample(counting, x, solver, steps=steps, progress=False)
        assert counting.calls == sol.nfe == steps == solver.expected_nfe(steps)
    # the state is never modified: tell returns a new state and leaves its input (tensors included) untouched
    state = solver.init(schedule, dp.make_grid(schedule, 6), x.clone())
    seen = 0
    while not solver.done(state):
        x_eval, t = solver.ask(state)
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        copies = {k: v.clone() for k, v in fields.items() if isinstance(v, torch.Tensor)}
        versions = {k: v._version for k, v in fields.items() if isinstance(v, torch.Tensor)}
        new = solver.tell(state, den(x_eval, t))
        assert new is not state
        for k, v in fields.items():
            assert getattr(state, k) is v
        for k, v in copies.items():
            assert getattr(state, k)._version == versions[k] and torch.equal(getattr(state, k), v)
        state, seen = new, seen + 1
    assert seen == 6
    assert state.x_prev is None  # nothing is kept after the last step
    # a batch equals its items one by one
    batch = dp.sample(den, x, solver, steps=6, progress=False).x
    items = torch.cat([dp.sample(den, x[i:i + 1], solver, steps=6, progress=False).x for i in range(len(x))])
    torch.testing.assert_close(batch, items, rtol=1e-13, atol=1e-13)


def test_history_is_bounded():
    """UniC reads the predictor's points plus one: the state keeps order + 1 predictions at most, and the
    start of the last step (x_prev) only while the next stage has a corrector."""
    schedule, den, x = _gauss_problem()
    for order in (1, 2, 3):
        solver = dp.UniPC(order=order)
        state = solver.init(schedule, dp.make_grid(schedule, 12), x)
        while not solver.done(state):
            state = solver.tell(state, den(*solver.ask(state)))
            assert len(state.history) <= order + 1


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(order=4), "order 1, 2, 3"),
    (dict(variant="bh3"), "variant must be 'bh1'"),
    (dict(predict="v"), "predict must be"),
    (dict(corrector="unic"), "corrector must be True"),
    (dict(disable_corrector=(-1,)), "disable_corrector"),
    (dict(disable_corrector="ab"), "disable_corrector"),
])
def test_unipc_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp.UniPC(**kwargs)


def test_dpm_solver_corrector_validation():
    with pytest.raises(ValueError, match="Unknown corrector 'unic-bh3'"):
        dp.get_solver("dpmsolver++", corrector="unic-bh3")
    with pytest.raises(ValueError, match="Unknown solver_type 'bh1'"):  # UniPC's rules stay UniPC's
        dp.get_solver("dpmsolver++", solver_type="bh1")
    assert dp.get_solver("dpmsolver++").corrector is None
    assert "unipc" in dp.SOLVERS and isinstance(dp.get_solver("unipc"), dp.UniPC)
    assert dp.get_solver("unipc").order == 3 and dp.get_solver("unipc").integrates == "x0"
    assert dp.get_solver("unipc", predict="noise").integrates == "eps"
