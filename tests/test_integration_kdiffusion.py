"""The k-diffusion-style adapters: equal to the native API, to k-diffusion's own samplers where the methods coincide,
convergent on exact data, and faithful to k-diffusion's calling conventions (callback dict, disable, extra_args)."""

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.integrations import kdiffusion as K

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _k_diffusion():
    from dpmsolve.lab.peers import _k_diffusion_sampling

    try:
        return _k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not installed ({exc}); scripts/setup.sh installs it with --no-deps")


def ve_model(problem):
    """The exact VE denoiser D(x, sigma) of an analytic problem, called as k-diffusion calls a model."""
    def model(x, sigma, **extra_args):
        assert sigma.shape == (x.shape[0],)
        return problem.posterior_mean(x, float(sigma[0]))

    return model


def exact_x0(problem, x, sigma_max):
    """The exact probability-flow solution at sigma = 0 of Gaussian data, from x at sigma_max (VE)."""
    mean, var = problem.mean, problem.var
    return mean + var.sqrt() * (x - mean) / torch.sqrt(var + sigma_max**2)


def start(generator, batch=6, dim=4, sigma=SIGMA_MAX):
    return torch.randn((batch, dim), generator=generator) * sigma


def native(model, x, sigmas, solver, **options):
    """dp.sample with an EDM schedule over the sigmas and the sigmas as the explicit grid."""
    ts = sigmas.numpy()
    schedule = dp.EDM(sigma_min=float(ts[ts > 0].min()), sigma_max=float(ts[0]))
    denoiser = dp.wrap_model(model, schedule, prediction="x0", time_input="continuous")
    return dp.sample(denoiser, x, solver, grid=ts, progress=False, **options).x


# Each adapter, with option variants, and the native solver it must equal.
CASES = [(name, {}) for name in K.SAMPLERS] + [
    ("ddim", {"eta": 0.5, "seed": 7}),
    ("dpmpp_2m", {"solver_type": "taylor", "lower_order_final": True}),
    ("dpmpp_3m", {"warmup": "lower_order"}),
    ("dpmpp_3s", {"split": "fixed"}),
    ("dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "seed": 3}),
    ("unipc", {"order": 2}),
]


@pytest.mark.parametrize("to_zero", [True, False], ids=["to_zero", "to_sigma_min"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in CASES])
def test_equals_native_api(gaussian, generator, name, options, to_zero):
    sigmas = K.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX)
    sigmas = sigmas if to_zero else sigmas[:-1]
    x, model = start(generator), ve_model(gaussian)
    solver, defaults = K.SAMPLERS[name]
    if "seed" not in options and dp.get_solver(solver, **{**defaults, **options}).stochastic:
        options = {**options, "seed": 11}   # the same noise on both sides
    ours = getattr(K, f"sample_{name}")(model, x, sigmas, disable=True, **options)
    expected = native(model, x, sigmas, solver, **{**defaults, **options})
    assert ours.shape == x.shape and ours.dtype == x.dtype
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


# ----- k-diffusion itself, where the configuration coincides

@pytest.mark.parametrize("grid", ["karras", "exponential", "karras_no_zero"])
def test_dpmpp_2m_equals_k_diffusion(gaussian, generator, grid):
    kd = _k_diffusion()
    make = {"karras": kd.get_sigmas_karras, "exponential": kd.get_sigmas_exponential}[grid.split("_")[0]]
    sigmas = make(10, SIGMA_MIN, SIGMA_MAX)
    sigmas = sigmas[:-1] if grid.endswith("no_zero") else sigmas
    x, model = start(generator), ve_model(gaussian)
    ours = K.sample_dpmpp_2m(model, x, sigmas, disable=True)
    theirs = kd.sample_dpmpp_2m(model, x, sigmas, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_ddim_equals_k_diffusion_euler(gaussian, generator):
    # Euler on the VE ODE dx/dsigma = (x - D) / sigma is DDIM (DPM-Solver-1) step for step.
    kd = _k_diffusion()
    sigmas = kd.get_sigmas_karras(12, SIGMA_MIN, SIGMA_MAX)
    x, model = start(generator), ve_model(gaussian)
    with torch.random.fork_rng():  # sample_euler draws randn_like even without churn
        theirs = kd.sample_euler(model, x, sigmas, disable=True)
    torch.testing.assert_close(K.sample_ddim(model, x, sigmas, disable=True), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta,s_noise", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.5)])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_equals_k_diffusion(gaussian, generator, eta, s_noise, solver_type):
    kd = _k_diffusion()
    sigmas = kd.get_sigmas_exponential(9, SIGMA_MIN, SIGMA_MAX)
    x, model = start(generator), ve_model(gaussian)
    noises = [torch.randn(x.shape, generator=generator) for _ in range(len(sigmas))]

    def noise_sampler(calls):
        def draw(sigma, sigma_next):
            calls.append((float(sigma), float(sigma_next)))
            return noises[len(calls) - 1]
        return draw

    ours_calls, their_calls = [], []
    ours = K.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, eta=eta, s_noise=s_noise, solver_type=solver_type,
                                 noise_sampler=noise_sampler(ours_calls))
    theirs = kd.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, eta=eta, s_noise=s_noise,
                                    solver_type=solver_type, noise_sampler=noise_sampler(their_calls))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert ours_calls == their_calls  # the same (sigma, sigma_next) pairs, in the same order


def test_grid_helpers_equal_k_diffusion():
    kd = _k_diffusion()
    for n in (1, 2, 7, 30):
        torch.testing.assert_close(K.get_sigmas_karras(n, 0.03, 14.6, rho=5.0),
                                   kd.get_sigmas_karras(n, 0.03, 14.6, rho=5.0), rtol=1e-12, atol=0)
        torch.testing.assert_close(K.get_sigmas_exponential(n, 0.03, 14.6),
                                   kd.get_sigmas_exponential(n, 0.03, 14.6), rtol=1e-12, atol=0)
    assert K.get_sigmas_logsnr is K.get_sigmas_exponential


# ----- exact reference

@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpm_solver_3s", "unipc"])
def test_error_decreases_with_steps(gaussian, generator, name):
    # Exponential sigmas ending at 0 (k-diffusion's layout): the error shrinks at least with the solver's order,
    # up to 2 (measured: ddim 1.0, 2M 2.0, 3M ~4, 2S 1.9, DPM-Solver-3S (fast split) 3.4, UniPC-3 2.1 per halving).
    x, model = start(generator), ve_model(gaussian)
    exact = exact_x0(gaussian, x, SIGMA_MAX)
    errors = []
    for n in (12, 24, 48, 96):
        out = getattr(K, f"sample_{name}")(model, x, K.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX), disable=True)
        errors.append(float((out - exact).abs().max()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    solver, defaults = K.SAMPLERS[name]
    slope = np.log2(errors[1] / errors[3]) / 2
    assert slope > min(dp.get_solver(solver, **defaults).order, 2) - 0.3, (slope, errors)


def test_dpm_adaptive(gaussian, generator):
    x, model = start(generator), ve_model(gaussian)
    out, info = K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, rtol=1e-4, atol=1e-5, disable=True,
                                      return_info=True)
    exact = gaussian.exact_solution(dp.EDM(SIGMA_MIN, SIGMA_MAX), x, SIGMA_MAX, SIGMA_MIN)
    assert float((out - exact).abs().max()) < 1e-3
    assert info["nfe"] > 0 and info["n_accept"] > 0
    denoiser = dp.wrap_model(model, dp.EDM(SIGMA_MIN, SIGMA_MAX), prediction="x0")
    expected = dp.sample(denoiser, x, "dpmsolver", method="adaptive", order=3, rtol=1e-4, atol=1e-5,
                         grid=[SIGMA_MAX, SIGMA_MIN], progress=False).x
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="eta"):
        K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, eta=1.0)


# ----- calling conventions

@pytest.mark.parametrize("name", sorted(K.SAMPLERS))
def test_callback_dict(gaussian, generator, name):
    sigmas = K.get_sigmas_karras(7, SIGMA_MIN, SIGMA_MAX)
    x, model = start(generator), ve_model(gaussian)
    seen = []
    out = getattr(K, f"sample_{name}")(model, x, sigmas, callback=seen.append, disable=True, seed=0)
    assert len(seen) == len(sigmas) - 1
    for i, info in enumerate(seen):
        assert set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert info["i"] == i and float(info["sigma"]) == float(sigmas[i]) == float(info["sigma_hat"])
        # x is where the model was evaluated at sigmas[i], denoised its prediction there
        torch.testing.assert_close(info["denoised"], model(info["x"], sigmas[i] * x.new_ones(x.shape[0])))
    torch.testing.assert_close(seen[0]["x"], x, rtol=0, atol=0)
    if name not in ("lms", "sa_solver_pece"):  # LMS integrates its polynomial to 0; PECE evaluates the corrected x too
        torch.testing.assert_close(seen[-1]["denoised"], out, rtol=0, atol=0)  # the final jump to sigma = 0


def test_disable_prints_nothing_and_extra_args_reach_the_model(gaussian, generator, capfd):
    sigmas = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX)
    x, inner = start(generator), ve_model(gaussian)
    received = []

    def model(x, sigma, cond=None, scale=1.0):
        received.append((cond, scale))
        return inner(x, sigma)

    K.sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": "a cat", "scale": 7.5}, disable=True)
    assert received == [("a cat", 7.5)] * (len(sigmas) - 1)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    K.sample_dpmpp_2m(model, x, sigmas, disable=False)
    assert "dpmsolve" in capfd.readouterr().err  # the tqdm bar when asked for


def test_stochastic_seed_from_options_or_extra_args(gaussian, generator):
    sigmas = K.get_sigmas_exponential(6, SIGMA_MIN, SIGMA_MAX)
    x, inner = start(generator), ve_model(gaussian)

    def model(x, sigma, seed=None):  # ComfyUI's models take the seed in extra_args too
        return inner(x, sigma)

    a = K.sample_dpmpp_2m_sde(model, x, sigmas, extra_args={"seed": 5}, disable=True)
    b = K.sample_dpmpp_2m_sde(model, x, sigmas, extra_args={"seed": 5}, disable=True)
    c = K.sample_dpmpp_2m_sde(model, x, sigmas, seed=5, disable=True)
    d = K.sample_dpmpp_2m_sde(model, x, sigmas, extra_args={"seed": 6}, disable=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert not torch.allclose(a, d)


def test_dtype_and_errors(gaussian, generator):
    sigmas = K.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX, dtype=torch.float32)
    model = ve_model(gaussian)
    x32 = start(generator).float()
    out = K.sample_dpmpp_2m(lambda x, s: model(x.double(), s).to(x.dtype), x32, sigmas, disable=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert K.sample_dpmpp_2m(model, x32, sigmas[:1]) is x32  # no step
    with pytest.raises(ValueError, match="decreasing"):
        K.sample_dpmpp_2m(model, x32.double(), sigmas.flip(0).double() + 1)
    with pytest.raises(ValueError, match="no option"):
        K.sample_dpmpp_2m(model, x32.double(), sigmas.double(), s_churn=1.0)
    one_step = K.sample_dpmpp_2m(model, x32.double(), torch.tensor([SIGMA_MAX, 0.0]), disable=True)
    torch.testing.assert_close(one_step, model(x32.double(), torch.full((x32.shape[0],), SIGMA_MAX)))


def test_get_sigmas_for_dpmsolve_schedules():
    edm = dp.EDM(SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(K.get_sigmas(edm, 10, "karras"), K.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX),
                               rtol=1e-12, atol=0)
    vp = dp.DiscreteVP.linear()
    for kind in ("time_uniform", "time_quadratic", "logSNR", "karras"):
        sigmas = K.get_sigmas(vp, 12, kind)
        assert sigmas.shape == (13,) and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())
        ac = vp.alphas_cumprod
        assert float(sigmas[0]) == pytest.approx(np.sqrt((1 - ac[-1]) / ac[-1]), rel=1e-12)
    uniform = K.get_sigmas(vp, 10, "time_uniform")
    ts = np.linspace(1.0, 0.0, 11)[:-1]
    np.testing.assert_allclose(uniform[:-1].numpy(), vp.sigma(ts) / vp.alpha(ts), rtol=1e-12)
    no_zero = K.get_sigmas(vp, 10, "logSNR", append_zero=False)
    assert no_zero.shape == (11,) and float(no_zero[-1]) > 0


# ----- a VP eps model behind a k-diffusion-style (CompVis-like) wrapper

class CompVisLikeDenoiser:
    """k-diffusion's DiscreteEpsDDPMDenoiser, written out: sigma -> fractional train index by interpolation in
    log sigma, input scaled by c_in = 1/sqrt(sigma^2 + 1), D = x - sigma * eps."""

    def __init__(self, eps_net, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod)
        self.eps_net = eps_net
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log()

    def sigma_to_t(self, sigma):
        index = np.arange(self.log_sigmas.numel(), dtype=np.float64)
        return torch.as_tensor(np.interp(sigma.log().numpy(), self.log_sigmas.numpy(), index))

    def __call__(self, x, sigma, **extra_args):
        c_in = (1.0 / (sigma**2 + 1) ** 0.5)[:, None]
        eps = self.eps_net(x * c_in, self.sigma_to_t(sigma), **extra_args)
        return x - sigma[:, None] * eps


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver_3s"])
def test_vp_model_through_the_adapter(gaussian, generator, name):
    schedule = dp.DiscreteVP.linear()
    exact = gaussian.denoiser(schedule)

    def eps_net(x, train_index):  # an eps network on the train-index axis (a stand-in for a CompVis UNet)
        return exact(x, float(schedule.t_from_train_index(float(train_index[0])))).eps

    index = np.array([999, 760, 520, 330, 190, 95, 40, 12, 3])  # train steps: the grid of both runs
    ts = np.append(schedule.t_from_train_index(index), 0.0)
    sigmas = torch.as_tensor(np.append(np.sqrt((1 - schedule.alphas_cumprod[index]) / schedule.alphas_cumprod[index]),
                                       0.0))
    x_vp = torch.randn((6, 4), generator=generator)
    solver, defaults = K.SAMPLERS[name]
    expected = dp.sample(dp.wrap_model(eps_net, schedule, prediction="eps", time_input="discrete"), x_vp, solver,
                         grid=ts, progress=False, **defaults).x
    x_ve = x_vp / schedule.alpha(1.0)  # = noise * sigmas[0] in VE coordinates: x_vp * sqrt(1 + sigma_max^2)
    ours = getattr(K, f"sample_{name}")(CompVisLikeDenoiser(eps_net, schedule.alphas_cumprod), x_ve, sigmas,
                                        disable=True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


# ----- plans (dpmsolve.Plan) in a k-diffusion loop

def _plans(schedule):
    """Plans of every ending: to sigma = 0 (with correctors), to t_min + a final denoising evaluation (noise
    prediction), to t_min, and mixed per-step settings (a prediction switch, compensation)."""
    fp = schedule.fingerprint()
    mixed_ts = dp.make_grid(schedule, 6, "logSNR", t_end=0.0)
    mixed = [dp.PlanStep("noise", 2, "taylor", "unic"), dp.PlanStep("noise", 2, "taylor"),
             dp.PlanStep("data", 3, "taylor", "unic-bh2", 0.1), dp.PlanStep("data", 3, "taylor", None, -0.05),
             dp.PlanStep("data", 2, "bh1"), dp.PlanStep("data", 1)]
    return {
        "to_zero": dp.Plan.multistep(dp.make_grid(schedule, 7, "time_power", t_end=0.0), order=3, rule="taylor",
                                     corrector="unic", schedule=fp, data_shape=(4,)),
        "denoise": dp.Plan.multistep(dp.make_grid(schedule, 7, "logSNR"), predict="noise", denoise_to_zero=True,
                                     schedule=fp),
        "t_min": dp.Plan.multistep(dp.make_grid(schedule, 7, "logSNR"), schedule=fp),
        "mixed": dp.Plan(tuple(mixed_ts), tuple(mixed), schedule=fp),
    }


@pytest.mark.parametrize("kind", ["to_zero", "denoise", "t_min", "mixed"])
@pytest.mark.parametrize("schedule", [dp.EDM(SIGMA_MIN, SIGMA_MAX), dp.DiscreteVP.linear()], ids=["edm", "vp"])
def test_plan_equals_native_plan(gaussian, generator, schedule, kind):
    """sample_plan on plan_sigmas(plan, schedule) with a VE denoiser equals dp.sample(den, x_T, plan) on the plan's
    own schedule (a VP plan: x = x_T / alpha in VE coordinates; the same lambda nodes, so up to round-off)."""
    plan = _plans(schedule)[kind]
    sigmas = K.plan_sigmas(plan, schedule)
    assert sigmas.shape == (plan.nfe + 1,) and (float(sigmas[-1]) == 0.0) == plan.to_zero
    ts = np.asarray(plan.ts)
    body = ts[ts > 0]
    np.testing.assert_allclose(sigmas[:body.size].numpy(), schedule.sigma(body) / schedule.alpha(body), rtol=1e-12)
    x_T = torch.randn((6, 4), generator=generator)
    expected = dp.sample(gaussian.denoiser(schedule), x_T, plan, progress=False).x
    ours = K.sample_plan(ve_model(gaussian), x_T / schedule.alpha(plan.ts[0]), sigmas, plan=plan, disable=True)
    if not plan.to_zero:  # VE x at sigma_min -> the schedule's coordinates
        ours = ours * schedule.alpha(plan.ts[-1])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12 if isinstance(schedule, dp.EDM) else 1e-10)


def test_plan_from_a_file_callback_and_refusals(gaussian, generator, tmp_path):
    schedule = dp.DiscreteVP.linear()
    plan = _plans(schedule)["to_zero"]
    path = plan.save(tmp_path / "p.plan.json")
    sigmas, model = K.plan_sigmas(plan, schedule), ve_model(gaussian)
    x = torch.randn((6, 4), generator=generator) * sigmas[0]
    seen = []
    out = K.sample_plan(model, x, sigmas, plan=str(path), callback=seen.append, disable=True)  # a path, as ComfyUI's extra_options
    torch.testing.assert_close(out, K.sample_plan(model, x, sigmas, plan=plan, disable=True), rtol=0, atol=0)
    assert [info["i"] for info in seen] == list(range(plan.nfe))
    assert [float(info["sigma"]) for info in seen] == [float(s) for s in sigmas[:-1]]
    torch.testing.assert_close(seen[-1]["denoised"], out, rtol=0, atol=0)
    with pytest.raises(dp.PlanError, match="8 sigmas"):
        K.sample_plan(model, x, sigmas[1:], plan=plan)
    with pytest.raises(dp.PlanError, match="ends at sigma = 0"):
        K.sample_plan(model, x, torch.cat([sigmas[:-1], sigmas[-2:-1] / 2]), plan=plan)
    with pytest.raises(dp.PlanError, match="shape"):
        K.sample_plan(model, torch.zeros(2, 8), sigmas, plan=plan)
    with pytest.raises(ValueError, match="own step settings"):
        K.sample_plan(model, x, sigmas, plan=plan, order=3)
    with pytest.raises(ValueError, match="plan="):
        K.sample_plan(model, x, sigmas)
    with pytest.raises(dp.PlanError, match="schedule"):
        K.plan_sigmas(plan, dp.CosineVP())
