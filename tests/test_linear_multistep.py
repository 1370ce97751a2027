"""DEIS, LMS, iPNDM(-v), PNDM, PLMS, RES multistep, gradient estimation: oracle parity, measured order,
equivalences, NFE.

Oracles (the same float64 analytic model on both sides; diffusers' float32 tables replaced by the float64
values of the same schedule, so agreement is to round-off):
  deis (variant='logrho')  diffusers DEISMultistepScheduler           (the only variant diffusers implements)
  pndm / plms              diffusers PNDMScheduler (PRK / skip_prk_steps=True)
  lms                      k-diffusion sample_lms; diffusers LMSDiscreteScheduler
  ipndm                    diffusers IPNDMScheduler (its steps before the last: it ends with the multistep
                           step to sigma = 0, ours with ComfyUI's x0 prediction)
  ipndm_v, deis tab/rhoab  k-diffusion sample_lms (same Adams weights in rho; tAB = rhoAB on EDM)
  res-multistep            diffusers DPMSolverMultistepScheduler 2M 'heun' (its step casts to float32)
  gradient-estimation      a loop written from Permenter & Yuan 2024 (no installed oracle)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from counting import Counting
from dpmsolve.lab import GaussianData

NEW = ("deis", "pndm", "plms", "ipndm", "ipndm_v", "lms", "res-multistep", "gradient-estimation")
N_TRAIN = 1000
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _data() -> GaussianData:
    return GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])


def _diffusers():
    return pytest.importorskip("diffusers")  # its schedulers are the oracles


def _k_diffusion():
    from dpmsolve.lab.peers import _k_diffusion_sampling

    try:
        return _k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not installed ({exc}); scripts/setup.sh installs it with --no-deps")




def _start(schedule, n=6, seed=3, t=None):
    return _data().prior_sample(schedule, n, t=t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _report(name, ours, theirs, tol):
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |ours - oracle| = {diff:.3g}")
    assert diff < tol * max(1.0, float(theirs.abs().max())), diff


# ------------------------------------------------------------------------------------------ diffusers oracles
def _discrete_eps(schedule):
    den = _data().denoiser(schedule)
    return lambda x, n: den(x, (float(n) + 1) / N_TRAIN).eps


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lof", [False, True])
def test_deis_logrho_equals_diffusers(order, lof):
    DEISMultistepScheduler = _diffusers().DEISMultistepScheduler
    schedule = dp.DiscreteVP.linear()
    steps = 10 if lof else 20  # diffusers applies lower_order_final only below 15 steps
    sched = DEISMultistepScheduler(solver_order=order, lower_order_final=lof)
    sched.set_timesteps(steps)
    ts = sched.timesteps.numpy()
    sig = np.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    sched.sigmas = torch.from_numpy(np.concatenate([sig[ts], sig[:1]]))  # float64 tables
    eps, x = _discrete_eps(schedule), _start(schedule)
    theirs = x
    for n in sched.timesteps:
        theirs = sched.step(eps(theirs, n), n, theirs).prev_sample
    grid = np.array([(n + 1) / N_TRAIN for n in ts] + [1 / N_TRAIN])
    ours = dp.sample(_data().denoiser(schedule), x, "deis", order=order, variant="logrho", lower_order_final=lof,
                     grid=grid, progress=False).x
    _report(f"deis-{order} logrho lof={lof} vs diffusers", ours, theirs, 1e-12)


@pytest.mark.parametrize("prk", [True, False])
@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_pndm_plms_equal_diffusers(prk, alpha_to_one):
    PNDMScheduler = _diffusers().PNDMScheduler
    schedule, steps = dp.DiscreteVP.linear(), 10  # step ratio 100: diffusers' RK midpoint (ratio // 2) is exact
    sched = PNDMScheduler(skip_prk_steps=not prk, set_alpha_to_one=alpha_to_one, steps_offset=1)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)  # float64 tables
    sched.final_alpha_cumprod = torch.tensor(1.0 if alpha_to_one else schedule.alphas_cumprod[0], dtype=torch.float64)
    eps, x = _discrete_eps(schedule), _start(schedule)
    theirs = x
    for n in sched.timesteps:
        theirs = sched.step(eps(theirs, n), n, theirs).prev_sample
    grid = np.array([(n + 1) / N_TRAIN for n in sched._timesteps[::-1]] + [0.0 if alpha_to_one else 1 / N_TRAIN])
    counting = Counting(_data().denoiser(schedule))
    name = "pndm" if prk else "plms"
    sol = dp.sample(counting, x, name, grid=grid, progress=False)
    _report(f"{name} alpha_to_one={alpha_to_one} vs diffusers PNDMScheduler", sol.x, theirs, 1e-12)
    assert counting.calls == sol.nfe == len(sched.timesteps) == dp.get_solver(name).expected_nfe(steps, alpha_to_one)


def test_lms_equals_diffusers():
    LMSDiscreteScheduler = _diffusers().LMSDiscreteScheduler
    schedule, steps = dp.DiscreteVP.linear(), 10
    sched = LMSDiscreteScheduler()
    sched.set_timesteps(steps)
    ts = sched.timesteps.numpy().astype(np.int64)  # linspace(0, 999, 10): integers
    sig = np.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    sched.sigmas = torch.from_numpy(np.concatenate([sig[ts], [0.0]]))
    eps, x = _discrete_eps(schedule), _start(schedule)
    theirs = x / schedule.alpha(1.0)  # diffusers' LMS works in y = x / alpha
    for n in sched.timesteps:
        theirs = sched.step(eps(sched.scale_model_input(theirs, n), n), n, theirs).prev_sample
    grid = np.array([(n + 1) / N_TRAIN for n in ts] + [0.0])
    ours = dp.sample(_data().denoiser(schedule), x, "lms", grid=grid, progress=False).x
    _report("lms vs diffusers LMSDiscreteScheduler", ours, theirs, 1e-9)  # its weights: scipy quad, epsrel 1e-4


def test_ipndm_equals_diffusers():
    IPNDMScheduler = _diffusers().IPNDMScheduler
    schedule, steps = dp.LinearVP(), 12
    ts = np.append(dp.make_grid(schedule, steps - 1, "logSNR"), 0.0)  # diffusers' schedule ends at sigma = 0
    sched = IPNDMScheduler()
    sched.set_timesteps(steps)
    alphas = torch.tensor([schedule.alpha(t) for t in ts[:-1]] + [1.0], dtype=torch.float64)
    sigmas = torch.tensor([schedule.sigma(t) for t in ts[:-1]] + [0.0], dtype=torch.float64)
    sched.alphas, sched.betas = alphas, sigmas  # its "betas" are sigma (float64 tables of our schedule)
    den, x = _data().denoiser(schedule), _start(schedule)
    theirs = x
    for k, n in enumerate(sched.timesteps[:-1]):  # all but the step to sigma = 0
        pred = den(theirs, float(ts[k]))
        v = alphas[k] * pred.eps - sigmas[k] * pred.x0
        theirs = sched.step(v, n, theirs).prev_sample
    ours = dp.sample(den, x, "ipndm", grid=ts[:-1], progress=False).x
    _report("ipndm vs diffusers IPNDMScheduler", ours, theirs, 1e-12)


def test_res_multistep_equals_diffusers_2m_heun():
    DPMSolverMultistepScheduler = _diffusers().DPMSolverMultistepScheduler
    schedule = dp.DiscreteVP.linear()
    sched = DPMSolverMultistepScheduler(solver_order=2, solver_type="heun", lower_order_final=False,
                                        final_sigmas_type="sigma_min", euler_at_final=False)
    sched.set_timesteps(20)
    ts = sched.timesteps.numpy()
    sig = np.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    sched.sigmas = torch.from_numpy(np.concatenate([sig[ts], sig[:1]]))
    eps, x = _discrete_eps(schedule), _start(schedule)
    theirs = x
    for n in sched.timesteps:
        theirs = sched.step(eps(theirs, n), n, theirs).prev_sample.double()
    grid = np.array([(n + 1) / N_TRAIN for n in ts] + [1 / N_TRAIN])
    ours = dp.sample(_data().denoiser(schedule), x, "res-multistep", grid=grid, progress=False).x
    _report("res-multistep vs diffusers 2M heun", ours, theirs, 1e-5)  # diffusers' step casts to float32


# ------------------------------------------------------------------------- k-diffusion oracles (EDM sigmas)
def _edm_case(to_zero: bool):
    kd = _k_diffusion()
    data = _data()
    sigmas = kd.get_sigmas_karras(12, SIGMA_MIN, SIGMA_MAX).double()
    sigmas = sigmas if to_zero else sigmas[:-1]
    ts = sigmas.numpy()
    schedule = dp.EDM(sigma_min=float(ts[ts > 0].min()), sigma_max=float(ts[0]))
    x = torch.randn((6, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * float(ts[0])

    def model(x, sigma, **extra_args):
        return data.posterior_mean(x, float(sigma[0]))

    return kd, model, sigmas, ts, x, data.denoiser(schedule)


@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_equals_k_diffusion(order, to_zero):
    kd, model, sigmas, ts, x, den = _edm_case(to_zero)
    theirs = kd.sample_lms(model, x, sigmas, disable=True, order=order)
    counting = Counting(den)
    sol = dp.sample(counting, x, "lms", order=order, grid=ts, progress=False)
    _report(f"lms-{order} to_zero={to_zero} vs k-diffusion sample_lms", sol.x, theirs, 1e-11)
    assert counting.calls == sol.nfe == len(ts) - 1


@pytest.mark.parametrize("name,options,kd_order", [
    ("ipndm_v", {}, 4), ("ipndm_v", {"order": 2}, 2), ("deis", {"variant": "rhoab"}, 3), ("deis", {}, 3),
    ("deis", {"order": 2}, 2)])
def test_rho_adams_equal_k_diffusion_lms(name, options, kd_order):
    """iPNDM-v and DEIS rhoAB are LMS (tAB too on EDM, where t = rho) on a grid that does not end at sigma = 0."""
    kd, model, sigmas, ts, x, den = _edm_case(False)
    theirs = kd.sample_lms(model, x, sigmas, disable=True, order=kd_order)
    ours = dp.sample(den, x, name, grid=ts, progress=False, **options).x
    _report(f"{name} {options} vs k-diffusion sample_lms(order={kd_order})", ours, theirs, 1e-11)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
@pytest.mark.parametrize("to_zero", [True, False])
def test_gradient_estimation_equals_the_paper_loop(gamma, to_zero):
    kd, model, sigmas, ts, x, den = _edm_case(to_zero)
    theirs, d_old = x.clone(), None
    for i in range(len(sigmas) - 1):  # Permenter & Yuan 2024, in k-diffusion's sigma-space form
        denoised = model(theirs, sigmas[i : i + 1])
        d = (theirs - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            theirs = denoised
        else:
            direction = d if d_old is None else gamma * d + (1 - gamma) * d_old
            theirs = theirs + (sigmas[i + 1] - sigmas[i]) * direction
        d_old = d
    ours = dp.sample(den, x, "gradient-estimation", gamma=gamma, grid=ts, progress=False).x
    _report(f"gradient-estimation gamma={gamma} to_zero={to_zero} vs paper loop", ours, theirs, 1e-11)


# ------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("schedule", [dp.DiscreteVP.linear, dp.LinearVP, dp.EDM, dp.RectifiedFlow])
def test_order_one_is_ddim(schedule):
    schedule = schedule()
    den, x = _data().denoiser(schedule), _start(schedule, 5, 1)
    configs = [("deis", dict(order=1, variant=v)) for v in ("tab", "rhoab", "logrho")]
    configs += [(n, dict(order=1)) for n in ("lms", "ipndm", "ipndm_v")] + [("gradient-estimation", dict(gamma=1.0))]
    for t_end in (None, 0.0):
        ddim = dp.sample(den, x, "ddim", steps=9, t_end=t_end, progress=False).x
        for name, options in configs:
            ours = dp.sample(den, x, name, steps=9, t_end=t_end, progress=False, **options).x
            torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-12, msg=f"{name} {options} t_end={t_end}")


@pytest.mark.parametrize("schedule", [dp.DiscreteVP.linear, dp.RectifiedFlow])
def test_res_multistep_is_dpmsolverpp_2m_taylor(schedule):
    schedule = schedule()
    den, x = _data().denoiser(schedule), _start(schedule, 5, 2)
    for grid, t_end in (("logSNR", None), ("karras", 0.0), ("time_uniform", None)):
        a = dp.sample(den, x, "res-multistep", steps=11, grid=grid, t_end=t_end, progress=False).x
        b = dp.sample(den, x, "dpmsolver++", order=2, solver_type="taylor", warmup="lower_order", steps=11,
                      grid=grid, t_end=t_end, progress=False).x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_ipndm_v_is_lms_but_for_the_step_to_zero():
    schedule = dp.LinearVP()
    den, x = _data().denoiser(schedule), _start(schedule, 5, 4)
    a = dp.sample(den, x, "ipndm_v", steps=10, progress=False).x
    torch.testing.assert_close(a, dp.sample(den, x, "lms", steps=10, progress=False).x, rtol=0, atol=1e-13)
    a = dp.sample(den, x, "ipndm_v", steps=10, t_end=0.0, progress=False).x
    assert (a - dp.sample(den, x, "lms", steps=10, t_end=0.0, progress=False).x).abs().max() > 1e-6


def test_plms_warmup_is_pseudo_improved_euler():
    """PLMS's first step: x* = DDIM(x_0, e_0), x_1 = DDIM(x_0, (e_0 + e(x*)) / 2); then AB2 (3 e_1 - e_0) / 2;
    one step alone is one DDIM step."""
    schedule = dp.CosineVP()
    den, x = _data().denoiser(schedule), _start(schedule, 4, 5)
    ts = dp.make_grid(schedule, 5, "logSNR")
    solver = dp.get_solver("plms")
    state = solver.init(schedule, ts, x)
    for _ in range(3):  # the warm-up (2 evaluations) and the AB2 step (1)
        xs, t = solver.ask(state)
        state = solver.tell(state, den(xs, t))
    (a0, s0), (a1, s1), (a2, s2) = (schedule.alpha_sigma(t) for t in ts[:3])

    def transfer(x, e, a, s, a_t, s_t):  # DDIM: x_t = a_t (x - s e) / a + s_t e
        return a_t * (x - s * e) / a + s_t * e

    e0 = den(x, ts[0]).eps
    x1 = transfer(x, (e0 + den(transfer(x, e0, a0, s0, a1, s1), ts[1]).eps) / 2, a0, s0, a1, s1)
    x2 = transfer(x1, (3 * den(x1, ts[1]).eps - e0) / 2, a1, s1, a2, s2)
    assert state.anchor_index == 3 and solver.done(state) is False
    torch.testing.assert_close(state.x, x2, rtol=0, atol=1e-13)
    one = dp.sample(den, x, "plms", grid=ts[:2], progress=False)
    torch.testing.assert_close(one.x, dp.sample(den, x, "ddim", grid=ts[:2], progress=False).x, rtol=0, atol=1e-13)
    assert one.nfe == 1


def test_t_adams_weights_integrate_polynomials_in_t():
    """DEIS tAB: with 3 points the step integrates any quadratic q(t) exactly against d rho."""
    from scipy.integrate import quad

    from dpmsolve.solvers.linear_multistep import grid_nodes, t_adams

    schedule = dp.LinearVP()
    grid = grid_nodes(schedule, dp.make_grid(schedule, 8, "logSNR"))
    q = np.polynomial.Polynomial([0.3, -1.1, 2.0])
    rho = lambda t: schedule.sigma(t) / schedule.alpha(t)  # noqa: E731
    for i in (2, 5):
        a, c = t_adams(schedule, grid, i, (i, i - 1, i - 2))
        s, t = grid[i], grid[i + 1]
        ours = sum(cj * q(grid[j].t) for cj, j in zip(c, (i, i - 1, i - 2))) / t.alpha  # = sum_j w_j q(t_j)
        h = 1e-6  # d rho/dt by central differences is enough at rtol 1e-7 here
        exact = quad(lambda tau: q(tau) * (rho(tau + h) - rho(tau - h)) / (2 * h), s.t, t.t, epsabs=0, epsrel=1e-12)[0]
        assert a == pytest.approx(t.alpha / s.alpha, rel=1e-14)
        assert ours == pytest.approx(exact, rel=1e-7)


# ---------------------------------------------------------------------------------------- convergence order
ORDER_CASES = [
    ("deis", {}, dp.DiscreteVP.linear), ("deis", {"variant": "rhoab"}, dp.RectifiedFlow),
    ("deis", {"variant": "logrho", "order": 2}, dp.LinearVP), ("deis", {"order": 1}, dp.EDM),
    ("lms", {}, dp.EDM), ("ipndm", {}, dp.LinearVP), ("ipndm_v", {}, dp.RectifiedFlow),
    ("pndm", {}, dp.DiscreteVP.linear), ("plms", {}, dp.EDM), ("res-multistep", {}, dp.RectifiedFlow),
    ("gradient-estimation", {}, dp.LinearVP), ("gradient-estimation", {"gamma": 1.5}, dp.DiscreteVP.linear),
]


def _slope(name, options, schedule, grid="logSNR", steps=(24, 48, 96, 192)):
    schedule, data = schedule(), _data()
    t0, t1 = float(schedule.t_from_log_snr(-1.0)), float(schedule.t_from_log_snr(2.0))
    x = _start(schedule, 8, 0, t=t0)
    truth = data.exact_solution(schedule, x, t0, t1)
    solver, den, errors = dp.get_solver(name, **options), data.denoiser(schedule), []
    for n in steps:
        sol = dp.sample(den, x, solver, steps=n, grid=grid, t_start=t0, t_end=t1, progress=False)
        errors.append((sol.x - truth).abs().max().item())
    slope = np.polyfit(np.log(1.0 / np.array(steps, dtype=np.float64)), np.log(errors), 1)[0]
    print(f"{name} {options} {type(schedule).__name__} {grid}: slope {slope:.3f} (declared {solver.order}), "
          f"errors {errors}")
    assert np.all(np.diff(errors) < 0) and min(errors) > 1e-12
    return solver.order, slope


@pytest.mark.parametrize("name,options,schedule", ORDER_CASES)
def test_convergence_order(name, options, schedule):
    order, slope = _slope(name, options, schedule)
    assert abs(slope - order) < 0.3


def test_pndm_is_fourth_order_on_a_rho_uniform_grid():
    """On EDM (t = rho) with a time-uniform grid the equal-step weights are exact and the RK midpoints are the
    rho midpoints: PNDM is RK4 + Adams-Bashforth 4 in rho."""
    _, slope = _slope("pndm", {}, dp.EDM, grid="time_uniform", steps=(96, 192, 384))
    assert abs(slope - 4) < 0.3


# -------------------------------------------------------------------------------------------------- NFE, API
@pytest.mark.parametrize("name", NEW)
def test_nfe_counted(name):
    schedule, data = dp.LinearVP(), _data()
    x = _start(schedule, 3, 7)
    solver = dp.get_solver(name)
    for steps in (1, 2, 3, 4, 6):
        for t_end in (None, 0.0):
            counting = Counting(data.denoiser(schedule))
            sol = dp.sample(counting, x, solver, steps=steps, t_end=t_end, progress=False)
            expected = solver.expected_nfe(steps, ends_at_zero=t_end == 0.0)
            assert counting.calls == sol.nfe == expected, (steps, t_end)
            assert sol.stats["steps"] == steps and torch.isfinite(sol.x).all()
    per_step = {"pndm": (4 * 3 + 3) / 6, "plms": 7 / 6}.get(name, 1)
    assert solver.expected_nfe(6) == round(per_step * 6)


@pytest.mark.parametrize("name", NEW)
def test_registered_with_facts_and_repr(name):
    solver = dp.get_solver(name)
    assert name in dp.SOLVERS and not solver.stochastic and not solver.adaptive
    assert solver.integrates == ("x0" if name == "res-multistep" else "eps")
    assert repr(solver).startswith(type(solver).__name__ + "(") and eval(repr(solver), vars(dp)).__class__ is type(solver)


@pytest.mark.parametrize("name,options,error,match", [
    ("deis", {"order": 4}, ValueError, r"DEIS supports order 1, 2, 3; got 4"),
    ("deis", {"order": 2.0}, ValueError, r"DEIS supports order"),
    ("deis", {"variant": "rho"}, ValueError, r"DEIS variant must be one of 'tab', 'rhoab', 'logrho', got 'rho'"),
    ("deis", {"lower_order_final": 1}, TypeError, r"DEIS lower_order_final must be True or False"),
    ("lms", {"order": 5}, ValueError, r"LMS supports order 1, 2, 3, 4; got 5"),
    ("ipndm", {"order": "4"}, TypeError, r"IPNDM supports order"),
    ("ipndm_v", {"order": 0}, ValueError, r"IPNDMV supports order"),
    ("gradient-estimation", {"gamma": "2"}, TypeError, r"GradientEstimation gamma must be a real number"),
    ("gradient-estimation", {"gamma": math.inf}, ValueError, r"gamma must be a finite number"),
    ("pndm", {"order": 4}, ValueError, r"PNDM has no option\(s\) order"),
    ("res-multistep", {"eta": 0.0}, ValueError, r"RESMultistep has no option\(s\) eta"),
])
def test_bad_options(name, options, error, match):
    with pytest.raises(error, match=match):
        dp.get_solver(name, **options)
