"""Stochastic samplers (solvers/stochastic.py, er_sde.py, sa_solver.py) and the Brownian tree (noise.py).

* Oracles: with the same noise (a k-diffusion ``noise_sampler`` fed from one list), every k-diffusion-style
  sampler reproduces k-diffusion's own function to round-off, calling the sampler with the same sigma pairs;
  SA-Solver reproduces diffusers' ``SASolverScheduler`` (float64 tables) with the same generator draws; ER-SDE
  and SA-Solver's PECE variant (no installed oracle) reproduce independent loop implementations written here
  from the papers' formulas (scipy quadrature for the integrals).
* eta = 0 (tau = 0): each sampler IS its ODE counterpart, and converges with its declared order.
* Noise: the engine's default path is unchanged (bitwise); a Brownian tree is reproducible in any order, its
  increments are consistent and have the right law; with it the samplers converge pathwise (strong order ~1)
  when the grid is refined, and dpmpp-sde's two correlated noises give it a much smaller weak error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.integrations.kdiffusion import _ExternalNoise
from dpmsolve.lab import GaussianData
from dpmsolve.noise import BrownianNoise, BrownianTree

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DATA = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])


def _k_diffusion():
    from dpmsolve.lab.peers import _k_diffusion_sampling

    try:
        return _k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not installed ({exc})")


def ve_model(x, sigma, **extra_args):
    return DATA.posterior_mean(x, float(sigma[0]))


def start(n=6, seed=3):
    return torch.randn((n, 4), generator=torch.Generator().manual_seed(seed)) * SIGMA_MAX


class Noises:
    """A k-diffusion noise sampler handing out a fixed list of draws in call order, recording the sigma pairs."""

    def __init__(self, shape, seed=11, count=64):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g) for _ in range(count)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.draws[len(self.calls) - 1]


def ve_sample(solver, x, sigmas, **kw):
    ts = sigmas.numpy()
    schedule = dp.EDM(sigma_min=float(ts[ts > 0].min()), sigma_max=float(ts[0]))
    den = dp.wrap_model(ve_model, schedule, prediction="x0", time_input="continuous")
    return dp.sample(den, x, solver, grid=ts, progress=False, **kw)


# ------------------------------------------------------------------------------------------- k-diffusion
K_CASES = [
    ("euler-ancestral", "sample_euler_ancestral", {"eta": 1.0}),
    ("euler-ancestral", "sample_euler_ancestral", {"eta": 0.7, "s_noise": 0.5}),
    ("dpm2-ancestral", "sample_dpm_2_ancestral", {"eta": 1.0}),
    ("dpm2-ancestral", "sample_dpm_2_ancestral", {"eta": 1.3}),  # sigma_down = 0 on the big steps: Euler, no noise
    ("dpmpp-2s-ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.0}),
    ("dpmpp-2s-ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.3, "s_noise": 0.8}),
    ("dpmpp-sde", "sample_dpmpp_sde", {"eta": 1.0}),
    ("dpmpp-sde", "sample_dpmpp_sde", {"eta": 0.6, "r": 0.3}),
    ("dpmpp-2m-sde", "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp-2m-sde", "sample_dpmpp_2m_sde", {"eta": 0.8, "solver_type": "heun", "s_noise": 0.7}),
    ("dpmpp-3m-sde", "sample_dpmpp_3m_sde", {"eta": 1.0}),
    ("dpmpp-3m-sde", "sample_dpmpp_3m_sde", {"eta": 0.0}),
]


@pytest.mark.parametrize("to_zero", [True, False], ids=["to_zero", "to_sigma_min"])
@pytest.mark.parametrize("name,function,options", K_CASES, ids=[f"{n}-{o}" for n, _, o in K_CASES])
def test_equals_k_diffusion_with_the_same_noise(name, function, options, to_zero):
    kd = _k_diffusion()
    sigmas = kd.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX).double()
    sigmas = sigmas if to_zero else sigmas[:-1]
    x = start()
    ours_noise, their_noise = Noises(x.shape), Noises(x.shape)
    s_noise = options.get("s_noise", 1.0)
    solver = dp.get_solver(name, **{k: v for k, v in options.items() if k != "s_noise"})
    # through the k-diffusion adapter's noise wrapper: s_noise and the sampler's sigmas as k-diffusion gives them
    ours = ve_sample(_ExternalNoise(solver, ours_noise, sigmas, s_noise), x, sigmas, seed=0).x
    theirs = getattr(kd, function)(ve_model, x, sigmas, disable=True, noise_sampler=their_noise, **options)
    diff = (ours - theirs).abs().max().item()
    print(f"{name} {options}: max |ours - k-diffusion| = {diff:.2g}")
    assert diff < 1e-12 * SIGMA_MAX
    assert len(ours_noise.calls) == len(their_noise.calls)
    np.testing.assert_allclose(ours_noise.calls, their_noise.calls, rtol=1e-14, atol=0)
    if "r" not in options and name != "dpmpp-sde":  # grid sigmas are passed as k-diffusion's own entries
        assert ours_noise.calls == their_noise.calls


@pytest.mark.parametrize("name,function,options", [K_CASES[0], K_CASES[3], K_CASES[5]], ids=lambda v: str(v))
def test_k_diffusion_formulas_on_a_vp_schedule(name, function, options):
    """On a VP schedule the sampler runs in y = x / alpha with sigma~ = sigma / alpha: k-diffusion's VE function
    applied to y on the sigma~ grid gives the same sample (divided by alpha) for the same noise."""
    kd = _k_diffusion()
    schedule = dp.LinearVP()
    ts = dp.make_grid(schedule, 8)
    alpha = np.array([schedule.alpha(t) for t in ts])
    sigmas = torch.from_numpy(np.exp(-schedule.log_snr(ts)))
    x = DATA.prior_sample(schedule, 5, generator=torch.Generator().manual_seed(0))
    noise_a, noise_b = Noises(x.shape), Noises(x.shape)
    ours = dp.sample(DATA.denoiser(schedule), x, dp.get_solver(name, noise=noise_a, **options), grid=ts,
                     progress=False).x
    theirs = getattr(kd, function)(ve_model, x / alpha[0], sigmas, disable=True, noise_sampler=noise_b, **options)
    torch.testing.assert_close(ours / alpha[-1], theirs, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(noise_a.calls, noise_b.calls, rtol=1e-12)


# ------------------------------------------------------------------------------------------- eta = 0
def _grid_sample(solver, schedule, ts, x, **kw):
    return dp.sample(DATA.denoiser(schedule), x, solver, grid=ts, progress=False, **kw).x


EQUIVALENT = [
    (("euler-ancestral", {"eta": 0.0}), ("euler", {})),
    (("dpm2-ancestral", {"eta": 0.0}), ("dpm2", {})),
    (("dpmpp-sde", {"eta": 0.0}), ("dpmpp-2s-ancestral", {"eta": 0.0})),
    (("dpmpp-2m-sde", {"eta": 0.0}), ("dpmsolver++", {"order": 2, "solver_type": "dpmsolver"})),
    (("dpmpp-2m-sde", {"eta": 0.0, "solver_type": "heun"}), ("dpmsolver++", {"order": 2, "solver_type": "taylor"})),
    (("er-sde", {"solver_type": "ode", "max_stage": 1}), ("euler", {})),
    (("er-sde", {"eta": 0.0, "max_stage": 3}), ("er-sde", {"solver_type": "ode"})),
    *[(("sa-solver", {"tau": 0.0, "corrector_order": 0, "predictor_order": p}),
       ("dpmsolver++", {"order": p, "solver_type": "taylor", "warmup": "lower_order"})) for p in (1, 2, 3)],
    (("sa-solver", {"tau": 0.0, "predictor_order": 1, "corrector_order": 2, "simple_order_2": True}),
     ("dpmsolver++", {"order": 1, "corrector": "unic-bh1"})),
]


@pytest.mark.parametrize("schedule", [dp.LinearVP(), dp.EDM(), dp.RectifiedFlow()], ids=["vp", "edm", "flow"])
@pytest.mark.parametrize("pair", EQUIVALENT, ids=lambda p: f"{p[0][0]}{p[0][1]}=={p[1][0]}{p[1][1]}")
def test_eta_zero_is_the_ode_counterpart(pair, schedule):
    (name, options), (other, other_options) = pair
    solver = dp.get_solver(name, **options)
    assert not solver.stochastic
    x = DATA.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(1))
    for to_zero in (False, True):
        ts = dp.make_grid(schedule, 7, t_end=0 if to_zero else None)
        if name == "sa-solver" and other_options.get("corrector") and to_zero:
            continue  # UniC's plan corrects before the final jump, SA-Solver (PEC) need not: same sample anyway
        a = _grid_sample(solver, schedule, ts, x)
        b = _grid_sample(dp.get_solver(other, **other_options), schedule, ts, x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp-2s-ancestral", "dpmpp-sde"])
def test_2s_at_eta_zero_is_singlestep_dpmsolverpp_with_midpoints(name):
    schedule = dp.LinearVP()
    ts = dp.make_grid(schedule, 6)
    lam = schedule.log_snr(ts)
    mids = schedule.t_from_log_snr(0.5 * (lam[:-1] + lam[1:]))
    both = np.empty(2 * len(ts) - 1)
    both[0::2], both[1::2] = ts, mids
    x = DATA.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(2))
    ours = _grid_sample(dp.get_solver(name, eta=0.0), schedule, ts, x)
    singlestep = dp.get_solver("dpmsolver++", method="singlestep", orders=(2,) * (len(ts) - 1))
    torch.testing.assert_close(ours, _grid_sample(singlestep, schedule, both, x), rtol=1e-11, atol=1e-11)


def test_gaussian_noise_is_the_engines_default_path():
    """noise='gaussian' draws exactly what the engine draws: dpmpp-2m-sde == sde-dpmsolver++ (2M), bitwise."""
    schedule = dp.LinearVP()
    x = DATA.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(0))
    a = dp.sample(DATA.denoiser(schedule), x, dp.get_solver("dpmpp-2m-sde", noise="gaussian"), steps=9, seed=5,
                  progress=False).x
    b = dp.sample(DATA.denoiser(schedule), x, dp.get_solver("sde-dpmsolver++", order=2), steps=9, seed=5,
                  progress=False).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _slope(solver, schedule, steps):
    t0, t1 = float(schedule.t_from_log_snr(-1.0)), float(schedule.t_from_log_snr(2.0))
    x = DATA.prior_sample(schedule, 8, t=t0, generator=torch.Generator().manual_seed(0))
    truth = DATA.exact_solution(schedule, x, t0, t1)
    errors = [(dp.sample(DATA.denoiser(schedule), x, solver, steps=n, t_start=t0, t_end=t1, progress=False).x
               - truth).abs().max().item() for n in steps]
    return float(np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0])


@pytest.mark.parametrize("name,options", [
    ("dpmpp-sde", {"eta": 0.0, "r": 0.3}), ("dpmpp-3m-sde", {"eta": 0.0}), ("er-sde", {"solver_type": "ode"}),
    ("er-sde", {"eta": 0.0, "max_stage": 2}), ("sa-solver", {"tau": 0.0}),
    ("sa-solver", {"tau": 0.0, "pece": True}), ("sa-solver", {"tau": 0.0, "corrector_order": 0}),
    ("sa-solver", {"tau": 0.0, "predictor_order": 2, "corrector_order": 2, "lower_order_final": True}),
], ids=lambda v: str(v))
def test_declared_order_at_eta_zero(name, options):
    solver = dp.get_solver(name, **options)
    slope = _slope(solver, dp.RectifiedFlow(), (24, 48, 96, 192))
    # SA-Solver 3/4: order 3 from its first (warm-up) step, 4 in the bulk: the slope reads ~3.5 here
    assert solver.order - 0.3 < slope < solver.order + (0.8 if name == "sa-solver" else 0.3), slope


# ------------------------------------------------------------------------------------------- SA-Solver
N_TRAIN = 1000
VP = dp.DiscreteVP.linear()


def _discrete_net(x, n):
    a, s = VP.alpha_sigma(float(VP.t_from_train_index(float(torch.as_tensor(n).reshape(-1)[0]))))
    return DATA.posterior_mean(x / a, s / a)


SA_CASES = [  # (predictor, corrector, lower_order_final, tau at train step n)
    (2, 2, True, "window"), (3, 4, False, "window"), (1, 1, False, "one"), (3, 3, True, "zero"), (2, 3, False, "one"),
]


@pytest.mark.parametrize("p,c,final,tau", SA_CASES, ids=[str(c) for c in SA_CASES])
def test_sa_solver_equals_diffusers(p, c, final, tau):
    diffusers = pytest.importorskip("diffusers")
    tau_of = {"window": lambda n: 1 if 200 <= n <= 800 else 0, "one": lambda n: 1, "zero": lambda n: 0}[tau]
    scheduler = diffusers.SASolverScheduler(predictor_order=p, corrector_order=c, prediction_type="sample",
                                            tau_func=tau_of, lower_order_final=final)
    steps = 12
    scheduler.set_timesteps(steps)
    sig = np.sqrt((1.0 - VP.alphas_cumprod) / VP.alphas_cumprod)  # float64 tables (diffusers keeps float32)
    scheduler.sigmas = torch.from_numpy(np.concatenate([sig[scheduler.timesteps.numpy()], sig[:1]]))
    x = torch.randn((5, 4), generator=torch.Generator().manual_seed(0))
    theirs, generator = x.clone(), torch.Generator().manual_seed(5)
    for n in scheduler.timesteps:
        theirs = scheduler.step(_discrete_net(theirs, n), n, theirs, generator=generator).prev_sample
    # diffusers draws one randn per step from the generator: the same draws, handed out by step
    ts = np.array([(int(n) + 1) / N_TRAIN for n in scheduler.timesteps] + [1.0 / N_TRAIN])
    draws = Noises(x.shape, seed=5, count=steps).draws
    step_of = {round(float(np.exp(-VP.log_snr(t))), 9): k for k, t in enumerate(ts)}
    solver = dp.get_solver("sa-solver", predictor_order=p, corrector_order=c, simple_order_2=True,
                           lower_order_final=final, tau=lambda s, t: float(tau_of(round(s * N_TRAIN - 1))),
                           noise=lambda s, t: draws[step_of[round(float(s), 9)]])
    den = dp.wrap_model(_discrete_net, VP, prediction="x0", time_input="discrete")
    ours = dp.sample(den, x, solver, grid=ts, progress=False).x
    diff = (ours - theirs).abs().max().item()
    print(f"SA-Solver p={p} c={c}: max |ours - diffusers| = {diff:.2g}")
    assert diff < 1e-12


def _lagrange_weights(lams, lam_s, lam_t, tau2):
    """int_{lam_s}^{lam_t} (1 + tau2) e^{-(1 + tau2)(lam_t - l)} L_j(l) dl for the Lagrange basis over ``lams``."""
    from scipy.integrate import quad

    def basis(j, l):
        return np.prod([(l - lams[m]) / (lams[j] - lams[m]) for m in range(len(lams)) if m != j])

    k = 1.0 + tau2
    return [quad(lambda l: k * math.exp(-k * (lam_t - l)) * basis(j, l), lam_s, lam_t, epsabs=0, epsrel=1e-13)[0]
            for j in range(len(lams))]


def sa_reference(den, schedule, x, ts, p, c, tau, pece, draws):
    """SA-Solver as a plain loop (Xue et al. 2023, Alg. 1 with the corrector; PECE re-evaluates the corrected
    point), data prediction, orders ramping up with the history, no lower_order_final."""
    lam = schedule.log_snr(ts[ts > 0])
    alpha = [schedule.alpha(t) for t in ts]
    sigma = [schedule.sigma(t) for t in ts]
    n = len(ts) - 1
    preds, x_corr, x_pred, noise = [], x, x, None

    def step(k, x_from, points):  # the deterministic part of the step k -> k + 1 through grid points
        w = _lagrange_weights(lam[list(points)], lam[k], lam[k + 1], tau * tau)
        out = x_from * (sigma[k + 1] / sigma[k] * math.exp(-tau * tau * (lam[k + 1] - lam[k])))
        return out + alpha[k + 1] * sum(wj * preds[j] for wj, j in zip(w, points))

    for k in range(n):
        preds.append(den(x_pred, ts[k]).x0)
        if k > 0 and c > 0 and (ts[k + 1] > 0 or pece):
            x_corr = step(k - 1, x_corr, range(k, max(k - c, -1), -1)) + noise
            if pece:
                preds[k] = den(x_corr, ts[k]).x0
        else:
            x_corr = x_pred
        if ts[k + 1] == 0:
            return preds[k]
        noise = sigma[k + 1] * math.sqrt(-math.expm1(-2 * tau * tau * (lam[k + 1] - lam[k]))) * draws[k]
        x_pred = step(k, x_corr, range(k, max(k - p, -1), -1)) + noise
    return x_pred


@pytest.mark.parametrize("pece", [False, True])
@pytest.mark.parametrize("to_zero", [False, True])
def test_sa_solver_pec_and_pece_equal_a_reference_loop(pece, to_zero):
    schedule = dp.LinearVP()
    ts = dp.make_grid(schedule, 9, t_end=0 if to_zero else None)
    x = DATA.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(4))
    draws = Noises(x.shape, count=len(ts)).draws
    step_of = {round(float(np.exp(-schedule.log_snr(t))), 9): k for k, t in enumerate(ts[ts > 0])}
    solver = dp.get_solver("sa-solver", predictor_order=3, corrector_order=4, tau=0.8, pece=pece,
                           noise=lambda s, t: draws[step_of[round(float(s), 9)]])
    den = DATA.denoiser(schedule)
    sol = dp.sample(den, x, solver, grid=ts, progress=False)
    assert sol.nfe == solver.expected_nfe(len(ts) - 1, ends_at_zero=to_zero)
    reference = sa_reference(den, schedule, x, ts, 3, 4, 0.8, pece, draws)
    print(f"SA-Solver pece={pece}: max |ours - reference| = {(sol.x - reference).abs().max().item():.2g}")
    torch.testing.assert_close(sol.x, reference, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- ER-SDE
def er_sde_reference(model, y, sigmas, log_phi, draws, max_stage=3, s_noise=1.0, points=None):
    """ER-SDE-Solver-1/2/3 as a loop in VE coordinates (Cui et al. 2023): y = x / alpha, s = sigma / alpha."""
    from scipy.integrate import quad

    s, old, old_d = sigmas, None, None
    for i in range(len(s) - 1):
        d = model(y, s[i][None])
        if s[i + 1] == 0:
            return d
        si, st = float(s[i]), float(s[i + 1])
        r = math.exp(log_phi(st) - log_phi(si))
        y_new = r * y + (1 - r) * d
        stage = min(max_stage, i + 1)
        if stage >= 2:
            if points is None:
                s1 = quad(lambda u: math.exp(-log_phi(u)), st, si, epsrel=1e-13)[0]
                s2 = quad(lambda u: (u - si) * math.exp(-log_phi(u)), st, si, epsrel=1e-13)[0]
            else:  # ComfyUI's left Riemann sum
                h = (si - st) / points
                pos = [st + k * h for k in range(points)]
                s1 = sum(h * math.exp(-log_phi(u)) for u in pos)
                s2 = sum(h * (u - si) * math.exp(-log_phi(u)) for u in pos)
            dd = (d - old) / (si - float(s[i - 1]))
            y_new = y_new + (st - si + s1 * math.exp(log_phi(st))) * dd
            if stage >= 3:
                ddd = (dd - old_d) / ((si - float(s[i - 2])) / 2)
                y_new = y_new + ((st - si) ** 2 / 2 + s2 * math.exp(log_phi(st))) * ddd
            old_d = dd
        y = y_new + draws[i] * s_noise * math.sqrt(max(st * st - (si * r) ** 2, 0.0))
        old = d
    return y


@pytest.mark.parametrize("options", [{}, {"max_stage": 2, "s_noise": 0.6}, {"solver_type": "reverse-sde", "eta": 0.5},
                                     {"integration_points": 200}, {"solver_type": "ode"}], ids=str)
@pytest.mark.parametrize("to_zero", [False, True])
def test_er_sde_equals_a_reference_loop_on_a_vp_schedule(options, to_zero):
    schedule = dp.LinearVP()
    ts = dp.make_grid(schedule, 8, t_end=0 if to_zero else None)
    alpha = schedule.alpha(ts[-1]) if ts[-1] > 0 else 1.0
    sigmas = torch.from_numpy(np.append(np.exp(-schedule.log_snr(ts[ts > 0])), [0.0] * to_zero))
    x = DATA.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(5))
    draws, calls = Noises(x.shape).draws, Noises(x.shape)
    solver = dp.get_solver("er-sde", noise=calls, **options)
    ours = dp.sample(DATA.denoiser(schedule), x, solver, grid=ts, progress=False).x
    kind, eta = options.get("solver_type", "er-sde"), options.get("eta", 1.0)
    log_phi = {"er-sde": lambda u: math.log(u) + eta * math.log(math.exp(u**0.3) + 10.0),
               "reverse-sde": lambda u: (eta + 1) * math.log(u), "ode": math.log}[kind]
    theirs = er_sde_reference(ve_model, x / schedule.alpha(ts[0]), sigmas, log_phi, draws,
                              options.get("max_stage", 3), options.get("s_noise", 1.0),
                              options.get("integration_points"))
    print(f"ER-SDE {options}: max |ours - reference| = {(ours / alpha - theirs).abs().max().item():.2g}")
    torch.testing.assert_close(ours / alpha, theirs, rtol=1e-10, atol=1e-10)
    assert len(calls.calls) == (0 if kind == "ode" else len(ts) - 1 - to_zero)


# ------------------------------------------------------------------------------------------- Brownian tree
def test_brownian_tree_is_reproducible_in_any_order_and_consistent():
    times = [0.3, 2.5, 0.01, 7.9, 4.0, 1.0 + 1e-9, 1.0, 8.0, 0.0]
    a = BrownianTree((50,), 0.0, 8.0, seed=42, dtype=torch.float64)
    first = {t: a(t) for t in times}
    b = BrownianTree((50,), 0.0, 8.0, seed=42, dtype=torch.float64, cache_size=1)
    for t in reversed(times):
        assert torch.equal(b(t), first[t]), t
    assert torch.equal(a(0.0), torch.zeros(50))
    torch.testing.assert_close(a.increment(0.3, 2.5) + a.increment(2.5, 7.9), a.increment(0.3, 7.9), rtol=0,
                               atol=1e-12)
    assert not torch.allclose(BrownianTree((50,), 0.0, 8.0, seed=43, dtype=torch.float64)(2.5), first[2.5])
    with pytest.raises(ValueError, match="outside"):
        a(8.5)


def test_brownian_tree_has_the_law_of_brownian_motion():
    tree = BrownianTree((40000,), 0.002, 80.0, seed=7, dtype=torch.float64)
    # disjoint, nested, and short intervals (geometric bisection: relative resolution ~1e-6 everywhere)
    spans = [(0.002, 0.5), (0.5, 3.0), (3.0, 80.0), (0.5, 1.7), (10.0, 10.001), (10.001, 10.003), (0.0021, 0.00211)]
    z = {span: tree.increment(*span) / math.sqrt(span[1] - span[0]) for span in spans}
    tol = 5 / math.sqrt(40000)
    for span in spans:
        assert abs(z[span].mean().item()) < tol and abs(z[span].var().item() - 1) < 2 * tol, span
    corr = lambda u, v: (z[u] * z[v]).mean().item()  # noqa: E731
    assert abs(corr(spans[0], spans[1])) < tol and abs(corr(spans[4], spans[5])) < tol
    assert abs(corr(spans[1], spans[3]) - math.sqrt(1.2 / 2.5)) < tol  # overlap / sqrt(len * len)


def test_brownian_noise_sampler_batches_per_item_seeds():
    x = torch.zeros(3, 5)
    batched = BrownianNoise(x, 0.1, 10.0, seed=[1, 2, 3])
    single = BrownianNoise(x[1:2], 0.1, 10.0, seed=[2])
    torch.testing.assert_close(batched(5.0, 2.0)[1:2], single(5.0, 2.0), rtol=0, atol=0)
    assert batched(5.0, 2.0).shape == x.shape and batched(5.0, 2.0).dtype == x.dtype
    with pytest.raises(ValueError, match="seeds"):
        BrownianNoise(x, 0.1, 10.0, seed=[1, 2])


def _run(name, schedule, x, steps, **options):
    t0, t1 = float(schedule.t_from_log_snr(-1.0)), float(schedule.t_from_log_snr(2.0))
    return dp.sample(DATA.denoiser(schedule), x, dp.get_solver(name, **options), steps=steps, t_start=t0,
                     t_end=t1, seed=7, progress=False).x


@pytest.mark.parametrize("name", ["euler-ancestral", "dpmpp-sde", "sa-solver"])
def test_brownian_noise_converges_pathwise_when_the_grid_is_refined(name):
    """One seed = one Brownian path for every grid: the samples converge (strong order ~1, additive noise in
    y = x / alpha); fresh Gaussian draws give another path per grid and do not."""
    schedule = dp.LinearVP()
    t0 = float(schedule.t_from_log_snr(-1.0))
    x = DATA.prior_sample(schedule, 32, t=t0, generator=torch.Generator().manual_seed(0))
    ref = _run(name, schedule, x, 256, noise="brownian")
    steps = (8, 16, 32)
    errors = [(_run(name, schedule, x, n, noise="brownian") - ref).pow(2).mean().sqrt().item() for n in steps]
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert slope > 0.6 and errors[0] > errors[1] > errors[2], (slope, errors)  # ~1 asymptotically
    fresh = (_run(name, schedule, x, 32, noise="gaussian") - _run(name, schedule, x, 256, noise="gaussian"))
    assert fresh.pow(2).mean().sqrt().item() > 10 * errors[-1]


def _output_law(name, options, schedule, steps, correlated):
    """Exact mean and variance of the sample on Gaussian data (every stage is affine: the sample is
    A x_T + sum_k B_k z_k), for z_k independent or increments of one Brownian path."""
    t0, t1 = float(schedule.t_from_log_snr(-1.0)), float(schedule.t_from_log_snr(2.0))
    a0, s0 = schedule.alpha_sigma(t0)
    mean0, var0 = a0 * DATA.mean, a0 * a0 * DATA.var + s0 * s0

    def run(x, unit=None):
        calls = []

        def noise(s, t):
            calls.append((float(s), float(t)))
            return torch.ones(1, 4) if len(calls) - 1 == unit else torch.zeros(1, 4)

        solver = dp.get_solver(name, noise=noise, **options)
        out = dp.sample(DATA.denoiser(schedule), x[None], solver, steps=steps, t_start=t0, t_end=t1, progress=False)
        return out.x[0], calls

    base, spans = run(mean0)
    var = (run(mean0 + 1.0)[0] - base) ** 2 * var0
    b = [run(mean0, k)[0] - base for k in range(len(spans))]
    for i, (p, q) in enumerate(spans):
        for j, (u, v) in enumerate(spans):
            if i == j or correlated:  # cov of normalised increments over [q, p] and [v, u] (sigma decreasing)
                overlap = max(min(p, u) - max(q, v), 0.0) / math.sqrt((p - q) * (u - v))
                var = var + b[i] * b[j] * overlap
    a1, s1 = schedule.alpha_sigma(t1)
    return max((base - a1 * DATA.mean).abs().max().item(), (var - a1 * a1 * DATA.var - s1 * s1).abs().max().item())


def test_weak_error_and_dpmpp_sde_needs_correlated_noise():
    schedule = dp.LinearVP()
    euler = [_output_law("euler-ancestral", {}, schedule, n, False) for n in (16, 32)]
    assert 0.8 < np.log2(euler[0] / euler[1]) < 1.3, euler  # weak order 1
    brownian = [_output_law("dpmpp-sde", {}, schedule, n, True) for n in (8, 16)]
    independent = _output_law("dpmpp-sde", {}, schedule, 16, False)
    assert np.log2(brownian[0] / brownian[1]) > 1.5, brownian  # ~2 on this (linear) problem
    assert independent > 10 * brownian[1]


# ------------------------------------------------------------------------------------------- errors, facts
@pytest.mark.parametrize("name,options,error,words", [
    ("euler-ancestral", {"eta": -1.0}, ValueError, ["eta", "-1"]),
    ("dpmpp-sde", {"s_noise": float("nan")}, ValueError, ["s_noise", "nan"]),
    ("dpmpp-sde", {"r": 0.0}, ValueError, ["r", "0"]),
    ("dpm2-ancestral", {"noise": "pink"}, ValueError, ["noise", "pink", "brownian"]),
    ("dpmpp-3m-sde", {"noise": 3}, TypeError, ["noise", "int"]),
    ("dpmpp-2m-sde", {"solver_type": "taylor"}, ValueError, ["solver_type", "midpoint", "heun"]),
    ("er-sde", {"solver_type": "sde"}, ValueError, ["solver_type", "er-sde", "ode"]),
    ("er-sde", {"max_stage": 4}, ValueError, ["max_stage", "4"]),
    ("er-sde", {"integration_points": 0}, ValueError, ["integration_points", "0"]),
    ("sa-solver", {"predictor_order": 5}, ValueError, ["predictor_order", "5"]),
    ("sa-solver", {"corrector_order": 2.0}, ValueError, ["corrector_order", "2.0"]),
    ("sa-solver", {"tau": -0.5}, ValueError, ["tau", "-0.5"]),
    ("sa-solver", {"tau": "1"}, TypeError, ["tau", "str"]),
])
def test_bad_options_say_what_to_pass(name, options, error, words):
    with pytest.raises(error) as err:
        dp.get_solver(name, **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_tau_function_is_checked_per_step():
    solver = dp.get_solver("sa-solver", tau=lambda s, t: -1.0)
    with pytest.raises(ValueError, match="tau"):
        dp.sample(DATA.denoiser(dp.LinearVP()), torch.zeros(2, 4), solver, steps=3, progress=False)


def test_declared_facts():
    assert dp.get_solver("dpmpp-sde").noise == "brownian" and dp.get_solver("euler-ancestral").noise == "gaussian"
    assert dp.get_solver("er-sde", solver_type="ode").stochastic is False
    assert dp.get_solver("sa-solver", tau=0.0).stochastic is False and dp.get_solver("sa-solver").stochastic
    assert dp.get_solver("euler-ancestral", s_noise=0.0).stochastic is False
    assert dp.get_solver("sa-solver", predictor_order=2, corrector_order=2, lower_order_final=True).order == 2
    assert dp.get_solver("sa-solver", pece=True).expected_nfe(10) == 19
    assert dp.get_solver("dpm2-ancestral", eta=1.5).expected_nfe(10) is None
    assert dp.get_solver("dpmpp-sde").expected_nfe(10, ends_at_zero=True) == 19
