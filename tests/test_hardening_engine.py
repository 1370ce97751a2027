"""Hardening of the sampling engine: no silent wrong sample.

* Ownership: a network that returns the SAME output buffer at every call (what CUDA-graph / compiled runtimes
  do) gives the sample of the ordinary network, for every solver that keeps predictions; callbacks and returned
  intermediates are copies the solver never reads again.
* Refusals: silent coercions and ignored arguments become errors that name the argument and the value, raised
  before any model call.
* Fidelity to the reference DPM-Solver (LuChengTHU/dpm-solver): the adaptive step size control and the
  singlestep block times of DPM-Solver-fast on the logSNR grid, each against an independent re-implementation
  written here from the reference's formulas; DPM-Solver-v3's half split (thu-ml/DPM-Solver-v3).
* A warning for a combination known to be unstable (order 3 on few-step karras grids of DDPM schedules).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import dpmsolve as dp
from counting import Counting
from dpmsolve.lab import GaussianData


@pytest.fixture
def setup():
    gaussian = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.DiscreteVP.linear()
    x = gaussian.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(0))
    return gaussian, schedule, gaussian.denoiser(schedule), x




class SameBuffer(dp.Denoiser):
    """Writes every prediction into one preallocated pair of tensors and returns them (a CUDA-graph network)."""

    def __init__(self, inner):
        self.inner, self.schedule = inner, inner.schedule
        self.x0 = self.eps = None

    def __call__(self, x, t, **kw):
        pred = self.inner(x, t, **kw)
        if self.x0 is None or self.x0.shape != pred.x0.shape:
            self.x0, self.eps = torch.empty_like(pred.x0), torch.empty_like(pred.eps)
        self.x0.copy_(pred.x0)
        self.eps.copy_(pred.eps)
        return dp.Prediction(self.x0, self.eps)


def _random_ems(schedule, dim, seed=0):
    from dpmsolve.ems import EMS

    lo, hi = schedule.log_snr_range
    g = np.random.default_rng(seed)
    lam = np.linspace(lo, hi, 9)
    return EMS(lam, g.uniform(0.1, 1.0, (9, dim)), g.uniform(-0.6, 0.4, (9, dim)), g.uniform(-0.5, 0.5, (9, dim)),
               (dim,), schedule.fingerprint(), 100, "random")


def _plans(schedule, steps):
    ts = tuple(dp.make_grid(schedule, steps))
    mixed = ([dp.PlanStep("data", 3, "taylor", "unic")] * (steps - 4) + [dp.PlanStep("data", 3, "taylor")]
             + [dp.PlanStep("noise", 2)] * 3)
    single = [dp.PlanStep("noise", 3, "dpmsolver", method="singlestep")] * steps
    return {"plan-3M-unic-mixed": dp.Plan(ts, tuple(mixed), schedule=schedule.fingerprint()),
            "plan-3S": dp.Plan(ts, tuple(single), schedule=schedule.fingerprint())}


# Every solver that keeps predictions across evaluations (history, intermediate stages, corrector points).
KEEPING = {
    "dpmsolver++-2M": ("dpmsolver++", dict(order=2)),
    "dpmsolver++-3M-taylor": ("dpmsolver++", dict(order=3, solver_type="taylor")),
    "dpmsolver-3M": ("dpmsolver", dict(order=3)),
    "dpmsolver++-2M-unic": ("dpmsolver++", dict(order=2, corrector="unic")),
    "dpmsolver++-3S": ("dpmsolver++", dict(method="singlestep", order=3)),
    "dpmsolver-2S-taylor": ("dpmsolver", dict(method="singlestep", order=2, split="fixed", solver_type="taylor")),
    "unipc-3": ("unipc", dict(order=3)),
    "unipc-2-noise": ("unipc", dict(order=2, predict="noise")),
    "v3-degenerate-3": ("dpmsolver-v3", dict(ems="degenerate", order=3)),
    "v3-random-ems-2": ("dpmsolver-v3", dict(order=2, corrector_pseudo=True)),
    "sde-dpmsolver++-2M": ("sde-dpmsolver++", dict(order=2)),
    "adaptive-12": ("dpmsolver++", dict(method="adaptive", order=2, rtol=1e-3, atol=1e-3)),
    "adaptive-23-noise": ("dpmsolver", dict(method="adaptive", order=3, rtol=1e-3, atol=1e-3)),
    "plan-3M-unic-mixed": None,
    "plan-3S": None,
}


def _run(den, x, key, schedule, **kw):
    steps = 9
    if key.startswith("plan"):
        return dp.sample(den, x, _plans(schedule, steps)[key], progress=False, **kw)
    name, options = KEEPING[key]
    options = dict(options)
    if key == "v3-random-ems-2":
        options["ems"] = _random_ems(schedule, x.shape[1])
    if options.get("method") != "adaptive":
        kw.setdefault("steps", steps)
    if name == "sde-dpmsolver++":
        kw.setdefault("seed", 3)
    return dp.sample(den, x, name, progress=False, **options, **kw)


# ----------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("key", sorted(KEEPING))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_network_reusing_its_output_buffer_gives_the_same_sample(setup, key, dtype):
    _, schedule, den, x = setup
    x = x.to(dtype)
    truth = _run(den, x, key, schedule)
    aliased = _run(SameBuffer(den), x, key, schedule)
    assert aliased.nfe == truth.nfe
    torch.testing.assert_close(aliased.x, truth.x, rtol=0, atol=0)


def test_denoise_to_zero_result_is_not_the_networks_buffer(setup):
    _, schedule, den, x = setup
    net = SameBuffer(den)
    first = dp.sample(net, x, "dpmsolver++", steps=6, denoise_to_zero=True, progress=False)
    kept = first.x.clone()
    dp.sample(net, 2 * x, "dpmsolver++", steps=6, denoise_to_zero=True, progress=False)  # overwrites the buffer
    torch.testing.assert_close(first.x, kept, rtol=0, atol=0)
    torch.testing.assert_close(kept, dp.sample(den, x, "dpmsolver++", steps=6, denoise_to_zero=True,
                                               progress=False).x, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- item 2
def _vandal(info):
    info.x.mul_(-3.0).add_(100.0)
    info.x0.fill_(float("nan"))


@pytest.mark.parametrize("key", ["dpmsolver++-3M-taylor", "dpmsolver++-3S", "dpmsolver++-2M-unic", "unipc-3",
                                 "v3-degenerate-3", "adaptive-23-noise", "plan-3S"])
@pytest.mark.parametrize("intermediates", [False, True])
def test_a_callback_editing_its_tensors_in_place_changes_nothing(setup, key, intermediates):
    _, schedule, den, x = setup
    truth = _run(den, x, key, schedule, return_intermediates=True)
    edited = _run(den, x, key, schedule, callback=_vandal, return_intermediates=intermediates)
    torch.testing.assert_close(edited.x, truth.x, rtol=0, atol=0)
    if intermediates:
        for got, want in zip(edited.trajectory + edited.x0_previews, truth.trajectory + truth.x0_previews):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_intermediates_are_copies_and_previews_survive_a_reused_buffer(setup):
    """Singlestep: the preview is the x0 of the step's FIRST evaluation; with a reused output buffer it must
    not turn into a later evaluation's x0."""
    _, schedule, den, x = setup
    truth = _run(den, x, "dpmsolver++-3S", schedule, return_intermediates=True)
    got = _run(SameBuffer(den), x, "dpmsolver++-3S", schedule, return_intermediates=True)
    for a, b in zip(got.x0_previews + got.trajectory, truth.x0_previews + truth.trajectory):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    got.trajectory[0].fill_(7.0)  # the first entry is a copy of x, not the caller's tensor
    assert not torch.equal(x, got.trajectory[0])


# ----------------------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("bad,error", [((2.5, 2), ValueError), ((3, 2.0), ValueError), ((True, 2), TypeError),
                                       (("2", 2), TypeError), ((3, None), TypeError), ("32", TypeError)])
def test_singlestep_orders_are_never_truncated(bad, error):
    with pytest.raises(error, match=r"orders"):
        dp.get_solver("dpmsolver++", method="singlestep", orders=bad)


def test_singlestep_orders_accept_numpy_integers():
    solver = dp.get_solver("dpmsolver++", method="singlestep", orders=np.array([3, 2]))
    assert solver.orders == (3, 2) and all(type(o) is int for o in solver.orders)


def test_adaptive_with_steps_is_refused_naming_both(setup):
    _, _, den, x = setup
    counting = Counting(den)
    with pytest.raises(ValueError, match=r"steps=10.*method='adaptive'.*drop steps"):
        dp.sample(counting, x, "dpmsolver++", method="adaptive", steps=10, progress=False)
    with pytest.raises(ValueError, match=r"steps=5.*adaptive"):
        dp.invert(counting, x, "dpmsolver++", method="adaptive", steps=5, progress=False)
    assert counting.calls == 0


@pytest.mark.parametrize("callback", [5, "print", [print]])
def test_a_non_callable_callback_is_refused_before_any_model_call(setup, callback):
    _, _, den, x = setup
    counting = Counting(den)
    for call in (lambda: dp.sample(counting, x, steps=4, callback=callback, progress=False),
                 lambda: dp.invert(counting, x, steps=4, callback=callback, progress=False),
                 lambda: dp.sample(counting, x, "dpmsolver++", method="adaptive", callback=callback, progress=False)):
        with pytest.raises(TypeError, match=rf"callback must be callable.*{type(callback).__name__}"):
            call()
    assert counting.calls == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_start_noise_is_blamed_on_the_input(setup, value):
    _, _, den, x = setup
    counting = Counting(den)
    bad = x.clone()
    bad[1, 2] = value
    with pytest.raises(ValueError, match=r"input x contains NaN or Inf \(before any model call\)"):
        dp.sample(counting, bad, "dpmsolver++", steps=4, progress=False)
    with pytest.raises(ValueError, match=r"input x0 contains NaN or Inf"):
        dp.invert(counting, bad, steps=4, progress=False)
    with pytest.raises(ValueError, match=r"input x contains NaN"):
        dp.sample(counting, bad.half(), "dpmsolver++", method="adaptive", progress=False)
    assert counting.calls == 0
    # check_finite=False turns the guard off, for the input as for the model
    out = dp.sample(den, bad, "ddim", steps=2, check_finite=False, progress=False).x
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("grid,words", [
    ([1.0, float("nan"), 0.01], r"nan at index 1"),
    ([float("inf"), 0.5, 0.01], r"inf at index 0"),
    ([float("nan"), 0.5, 0.0], r"nan at index 0"),
])
def test_explicit_grid_with_nan_or_inf_names_the_value(setup, grid, words):
    _, _, den, x = setup
    with pytest.raises(ValueError, match=words):
        dp.sample(den, x, grid=grid, progress=False)


def test_a_2d_grid_is_not_flattened(setup):
    _, schedule, den, x = setup
    with pytest.raises(ValueError, match=r"1-D.*shape \(2, 2\)"):
        dp.sample(den, x, "dpmsolver++", grid=[[1.0, 0.5], [0.2, 0.1]], progress=False)


@pytest.mark.parametrize("kind,options,error,words", [
    ("karras", {"rho": float("nan")}, ValueError, r"rho=nan"),
    ("karras", {"rho": float("inf")}, ValueError, r"rho=inf"),
    ("karras", {"rho": 1e-3}, ValueError, r"rho=0.001 has NaN or Inf"),
    ("karras", {"rho": "7"}, TypeError, r"rho .*'7'"),
    ("karras", {"rho": True}, TypeError, r"rho .*True"),
    ("karras", {"rho": 0}, ValueError, r"rho > 0, got 0"),
    ("time_power", {"power": float("inf")}, ValueError, r"power=inf"),
    ("time_power", {"power": -1.0}, ValueError, r"power > 0, got -1"),
    ("flow_shift", {"shift": float("nan")}, ValueError, r"shift=nan"),
])
def test_grid_options_that_give_nan_or_inf_are_named(setup, kind, options, error, words):
    _, schedule, den, x = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warnings on the way to the error
        with pytest.raises(error, match=words):
            dp.make_grid(schedule, 5, kind, **options)
        with pytest.raises(error, match=words):
            dp.sample(den, x, grid=kind, steps=5, grid_options=options, progress=False)


@pytest.mark.parametrize("name,value", [("t_start", float("nan")), ("t_end", float("inf"))])
def test_non_finite_t_start_t_end_are_named(setup, name, value):
    _, schedule, den, x = setup
    with pytest.raises(ValueError, match=rf"{name}={value}.*\[t_min, t_max\]"):
        dp.sample(den, x, "ddim", steps=3, progress=False, **{name: value})


@pytest.mark.parametrize("seed,error,words", [("abc", TypeError, r"seed.*'abc' \(str\)"),
                                              ("3", TypeError, r"seed.*str"), (True, TypeError, r"seed.*bool"),
                                              (2.7, ValueError, r"seed.*2.7"), (3.0, ValueError, r"seed.*3.0"),
                                              (2**64, ValueError, r"seed.*18446744073709551616")])
def test_seeds_are_integers(setup, seed, error, words):
    _, _, den, x = setup
    with pytest.raises(error, match=words):
        dp.sample(den, x, "sde-dpmsolver++", steps=3, seed=seed, progress=False)


def test_seed_and_generator_together_are_refused(setup):
    _, _, den, x = setup
    with pytest.raises(ValueError, match=r"seed=1 and a generator"):
        dp.sample(den, x, "sde-dpmsolver++", steps=3, seed=1, generator=torch.Generator(), progress=False)
    a = dp.sample(den, x, "sde-dpmsolver++", steps=3, seed=np.int64(5), progress=False).x
    b = dp.sample(den, x, "sde-dpmsolver++", steps=3, generator=torch.Generator().manual_seed(5), progress=False).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,options", [("dpmsolver++", {}), ("dpmsolver++", {"method": "singlestep"}),
                                          ("dpmsolver", {"method": "adaptive", "order": 3}),
                                          ("dpmsolver++", {"method": "adaptive", "order": 2})])
def test_an_empty_batch_returns_an_empty_sample(setup, name, options):
    _, _, den, x = setup
    empty = x[:0]
    infos = []
    sol = dp.sample(den, empty, name, callback=infos.append, progress=False, **options)
    assert sol.x.shape == (0, 4) and sol.x.dtype == x.dtype and sol.nfe >= 1
    assert all(info.x.shape == (0, 4) for info in infos)


# ------------------------------------------------------------------------------------------------ item 4a
class ReferenceAdaptive:
    """The reference's ``dpm_solver_adaptive`` (LuChengTHU/dpm-solver, dpm_solver_pytorch.py) written from its
    formulas (Lu et al. 2022, Alg. 4-5 and the DPM-Solver(++)-1/2/3 singlestep updates), in float64: lower
    update then higher update sharing its evaluations, ``delta = max(atol, rtol * max(|x_lower|, |x_prev|))``,
    ``E = max over the batch of RMS((x_higher - x_lower) / delta)``, accept iff E <= 1 (then x_prev = x_lower),
    ``h = min(theta h E^(-1/order), lambda_0 - lambda_s)`` after every trial. It stops exactly at t_0 (the
    reference stops within t_err = 1e-5 of it)."""

    def __init__(self, den, data, order, solver_type, rtol, atol, h_init, theta=0.9):
        self.den, self.s, self.data, self.order, self.type = den, den.schedule, data, order, solver_type
        self.rtol, self.atol, self.h_init, self.theta = rtol, atol, h_init, theta
        self.nfe = 0

    def model(self, x, t):
        self.nfe += 1
        pred = self.den(x, t)
        return pred.x0 if self.data else pred.eps

    def coef(self, s, t):
        """(linear factor, c_t, phi_1, h) of the step s -> t: x_t = lin x_s - c_t phi_1 m_s + ..."""
        sch = self.s
        h = sch.log_snr(t) - sch.log_snr(s)
        if self.data:
            return sch.sigma(t) / sch.sigma(s), sch.alpha(t), math.expm1(-h), h
        return sch.alpha(t) / sch.alpha(s), sch.sigma(t), math.expm1(h), h

    def first(self, x, s, t, m_s):
        lin, c, phi_1, _ = self.coef(s, t)
        return lin * x - c * phi_1 * m_s

    def second(self, x, s, t, r1, m_s=None):
        """DPM-Solver(++)-2 with its intermediate evaluation at r1: (x_t, m_s, m_s1)."""
        sch = self.s
        m_s = self.model(x, s) if m_s is None else m_s
        s1 = float(sch.t_from_log_snr(sch.log_snr(s) + r1 * (sch.log_snr(t) - sch.log_snr(s))))
        m_s1 = self.model(self.first(x, s, s1, m_s), s1)
        lin, c, phi_1, h = self.coef(s, t)
        sign = 1.0 if self.data else -1.0
        if self.type == "dpmsolver":
            x_t = lin * x - c * phi_1 * m_s - (0.5 / r1) * c * phi_1 * (m_s1 - m_s)
        else:
            x_t = lin * x - c * phi_1 * m_s + sign * (1.0 / r1) * c * (phi_1 / h + sign) * (m_s1 - m_s)
        return x_t, m_s, m_s1

    def third(self, x, s, t, r1, r2, m_s, m_s1):
        sch = self.s
        sign = 1.0 if self.data else -1.0
        s2 = float(sch.t_from_log_snr(sch.log_snr(s) + r2 * (sch.log_snr(t) - sch.log_snr(s))))
        lin2, c2, phi_12, h2 = self.coef(s, s2)                 # h2 = r2 h
        x_s2 = lin2 * x - c2 * phi_12 * m_s + sign * (r2 / r1) * c2 * (phi_12 / h2 + sign) * (m_s1 - m_s)
        m_s2 = self.model(x_s2, s2)
        lin, c, phi_1, h = self.coef(s, t)
        phi_2 = phi_1 / h + sign
        if self.type == "dpmsolver":
            return lin * x - c * phi_1 * m_s + sign * (1.0 / r2) * c * phi_2 * (m_s2 - m_s)
        phi_3 = phi_2 / h - 0.5
        d1_0, d1_1 = (m_s1 - m_s) / r1, (m_s2 - m_s) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return lin * x - c * phi_1 * m_s + sign * c * phi_2 * d1 - c * phi_3 * d2

    def solve(self, x, t_T, t_0):
        sch = self.s
        s, lam_s, lam_0 = t_T, sch.log_snr(t_T), sch.log_snr(t_0)
        h, x_prev, accepted, rejected, times = self.h_init, x, 0, 0, [t_T]
        while s != t_0:
            at_end = abs(lam_s + h - lam_0) <= 1e-12 * max(1.0, abs(lam_0))
            t = t_0 if at_end else float(sch.t_from_log_snr(lam_s + h))
            if self.order == 2:  # DPM-Solver-12: DPM-Solver-1, then DPM-Solver-2 (r1 = 1/2) reusing m_s
                m_s = self.model(x, s)
                x_lower = self.first(x, s, t, m_s)
                x_higher = self.second(x, s, t, 0.5, m_s)[0]
            else:                # DPM-Solver-23: DPM-Solver-2 (r1 = 1/3), then DPM-Solver-3 reusing m_s, m_s1
                x_lower, m_s, m_s1 = self.second(x, s, t, 1.0 / 3.0)
                x_higher = self.third(x, s, t, 1.0 / 3.0, 2.0 / 3.0, m_s, m_s1)
            delta = torch.clamp(self.rtol * torch.maximum(x_lower.abs(), x_prev.abs()), min=self.atol)
            err = ((x_higher - x_lower) / delta).pow(2).reshape(x.shape[0], -1).mean(1).sqrt().max().item()
            if err <= 1.0:
                x, s, x_prev, lam_s = x_higher, t, x_lower, sch.log_snr(t)
                accepted += 1
                times.append(t)
            else:
                rejected += 1
            h = min(self.theta * h * err ** (-1.0 / self.order) if err > 0 else math.inf, lam_0 - lam_s)
        return x, accepted, rejected, times


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
@pytest.mark.parametrize("name", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("tol,h_init", [(1e-3, 0.05), (1e-2, 2.0)])
def test_adaptive_matches_the_reference_step_control(setup, order, solver_type, name, tol, h_init):
    _, schedule, den, x = setup
    x = x * torch.tensor([3.0, 0.2, 1.0, 0.05])  # rows of different scales: the rtol part of delta matters
    ref = ReferenceAdaptive(den, name == "dpmsolver++", order, solver_type, rtol=tol, atol=tol / 10, h_init=h_init)
    x_ref, accepted, rejected, times = ref.solve(x, schedule.t_max, schedule.t_min)
    sol = dp.sample(den, x, name, method="adaptive", order=order, solver_type=solver_type, rtol=tol,
                    atol=tol / 10, h_init=h_init, progress=False)
    assert (sol.stats["accepted"], sol.stats["rejected"]) == (accepted, rejected)
    # To round-off only: a trial far below the tolerance has E = (x_higher - x_lower) / delta from two nearly
    # equal numbers, and h grows by E^(-1/order), so the times agree to ~1e-8 while the samples agree to ~1e-12.
    np.testing.assert_allclose(sol.ts, times, rtol=1e-6, atol=0)
    torch.testing.assert_close(sol.x, x_ref, rtol=1e-9, atol=1e-11)
    # The reference evaluates the model at s again after a rejection; dpmsolve keeps that evaluation.
    assert ref.nfe == order * (accepted + rejected) and sol.nfe == ref.nfe - rejected
    if h_init == 2.0:
        assert rejected >= 1


# ------------------------------------------------------------------------------------------------ item 4b
def _reference_singlestep_times(schedule, orders, t_T, t_0):
    """get_orders_and_timesteps_for_singlestep_solver with skip_type='logSNR', then each block's
    get_time_steps('logSNR', s, t, order) (LuChengTHU/dpm-solver): K + 1 block ends uniform in lambda, each block
    split uniformly in lambda, the times recovered from the lambdas."""
    lam = lambda t: float(schedule.log_snr(t))  # noqa: E731
    outer = [float(schedule.t_from_log_snr(v)) for v in np.linspace(lam(t_T), lam(t_0), len(orders) + 1)]
    times = [t_T]
    for k, q in enumerate(orders):
        inner = np.linspace(lam(outer[k]), lam(outer[k + 1]), q + 1)[1:]
        times += [float(schedule.t_from_log_snr(v)) for v in inner]
    times[-1] = t_0
    return np.array(times)


@pytest.mark.parametrize("steps,order,orders", [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 2, 1]), (8, 3, [3, 3, 2]),
                                                (7, 2, [2, 2, 2, 1]), (5, 1, [1] * 5)])
def test_singlestep_fast_on_logsnr_uses_the_reference_blocks(setup, steps, order, orders):
    _, schedule, den, x = setup
    solver = dp.get_solver("dpmsolver++", method="singlestep", order=order)
    assert solver.block_orders(steps) == orders
    want = _reference_singlestep_times(schedule, orders, schedule.t_max, schedule.t_min)
    sol = dp.sample(den, x, solver, steps=steps, progress=False)
    assert sol.nfe == steps
    np.testing.assert_allclose(sol.ts, want, rtol=1e-9, atol=0)
    # the same sample as the solver on those times given explicitly
    explicit = dp.sample(den, x, solver, grid=want, progress=False)
    torch.testing.assert_close(sol.x, explicit.x, rtol=1e-9, atol=1e-12)
    # and 'grid' keeps the plain uniform-lambda steps
    plain = dp.sample(den, x, "dpmsolver++", method="singlestep", order=order, spacing="grid", steps=steps,
                      progress=False)
    np.testing.assert_allclose(plain.ts, dp.make_grid(schedule, steps, "logSNR"), rtol=1e-12, atol=0)
    if len(set(orders)) > 1:
        assert np.abs(sol.ts - plain.ts).max() > 1e-3


def test_singlestep_blocks_only_change_lambda_uniform_named_grids(setup):
    _, schedule, den, x = setup
    for grid in ("time_uniform", "karras"):
        sol = dp.sample(den, x, "dpmsolver++", method="singlestep", order=3, steps=10, grid=grid, progress=False)
        np.testing.assert_allclose(sol.ts, dp.make_grid(schedule, 10, grid), rtol=1e-12, atol=0)
    blocks = dp.sample(den, x, "dpmsolver++", method="singlestep", steps=10, grid="exponential", progress=False)
    logsnr = dp.sample(den, x, "dpmsolver++", method="singlestep", steps=10, grid="logSNR", progress=False)
    np.testing.assert_allclose(blocks.ts, logsnr.ts, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"spacing must be 'blocks'.*got 'equal'"):
        dp.get_solver("dpmsolver++", method="singlestep", spacing="equal")


# ------------------------------------------------------------------------------------------------- item 5
def test_v3_half_split_defaults_to_the_reference_half():
    """The reference corrects only while ``timesteps[step - 1] > 0.5`` (half=True): 0.5, not the grid midpoint
    (0.5005 on a DiscreteVP). A time at 0.5003 is on the noisy side."""
    schedule = dp.DiscreteVP.linear()
    ts = np.array([1.0, 0.8, 0.5003, 0.3, 0.1, 0.001])
    for half, side in (("noisy", lambda t: t > 0.5), ("clean", lambda t: t <= 0.5)):
        nodes, stages = dp.DPMSolverV3("degenerate", order=2, half=half).plan(schedule, ts)
        corrected = [i for i, st in enumerate(stages) if st.corrector is not None]
        assert corrected == [i for i in range(2, len(stages)) if side(ts[i])]


def test_v3_half_needs_a_split_on_a_schedule_beyond_unit_time():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"half='noisy'.*half_split"):
        dp.DPMSolverV3("degenerate", half="noisy").init(dp.EDM(), dp.make_grid(dp.EDM(), 5), x)
    dp.DPMSolverV3("degenerate", half="noisy", half_split=1.0).init(dp.EDM(), dp.make_grid(dp.EDM(), 5), x)
    with pytest.raises(ValueError, match=r"half_split.*nan"):
        dp.DPMSolverV3("degenerate", half="noisy", half_split=float("nan"))


# ------------------------------------------------------------------------------------------------- item 6
def test_order3_on_a_short_karras_grid_of_a_ddpm_schedule_warns_once(setup):
    _, schedule, den, x = setup
    for name, options in (("dpmsolver++", {"order": 3}), ("unipc", {"order": 3}),
                          ("dpmsolver", {"order": 3, "method": "singlestep"})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dp.sample(den, x, name, steps=10, grid="karras", progress=False, **options)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert len(messages) == 1 and "order=2" in messages[0] and "logSNR" in messages[0], messages


@pytest.mark.parametrize("name,options,steps,grid,schedule", [
    ("dpmsolver++", {"order": 2}, 10, "karras", "discrete"),              # 2M: the recommended choice
    ("dpmsolver++", {"order": 3}, 10, "logSNR", "discrete"),
    ("dpmsolver++", {"order": 3}, 11, "karras", "discrete"),
    ("dpmsolver++", {"order": 3}, 10, "karras", "linear"),
    ("dpmsolver++", {"order": 3, "method": "singlestep"}, 10, "karras", "discrete"),
])
def test_no_warning_outside_the_unstable_combination(name, options, steps, grid, schedule):
    schedule = {"discrete": dp.DiscreteVP.linear(), "linear": dp.LinearVP()}[schedule]
    den = GaussianData([0.5, -0.3], [0.09, 0.5]).denoiser(schedule)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp.sample(den, x, name, steps=steps, grid=grid, progress=False, **options)
