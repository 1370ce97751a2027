"""Time grids: shape, monotonicity, exact ends, each spacing against its closed form; check_grid's validation."""

import numpy as np
import pytest
import torch

import dpmsolve as dp

SCHEDULES = {
    "discrete": lambda: dp.DiscreteVP.linear(),
    "scaled_linear": lambda: dp.DiscreteVP.scaled_linear(),
    "linear": lambda: dp.LinearVP(),
    "cosine": lambda: dp.CosineVP(),
    "edm": lambda: dp.EDM(),
    "flow": lambda: dp.RectifiedFlow(),
}


def _sigma_ve(schedule, ts):
    return np.asarray(schedule.sigma(ts)) / np.asarray(schedule.alpha(ts))


def _custom_ends(schedule):
    span = schedule.t_max - schedule.t_min
    return schedule.t_min + 0.8 * span, schedule.t_min + 0.05 * span


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(dp.GRIDS))
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_every_grid_has_steps_plus_one_decreasing_points_and_exact_ends(schedule_name, kind, steps):
    schedule = SCHEDULES[schedule_name]()
    ts = dp.make_grid(schedule, steps, kind)
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float64 and ts.shape == (steps + 1,)
    assert np.all(np.isfinite(ts))
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == schedule.t_max and ts[-1] == schedule.t_min
    assert schedule.contains(ts)
    t_start, t_end = _custom_ends(schedule)
    ts = dp.make_grid(schedule, steps, kind, t_start=t_start, t_end=t_end)
    assert ts.shape == (steps + 1,)
    assert np.all(np.diff(ts) < 0)
    assert ts[0] == t_start and ts[-1] == t_end
    # a grid is a valid input to check_grid, unchanged
    np.testing.assert_array_equal(dp.check_grid(schedule, ts), ts)


def test_grid_registry_names():
    assert {"time_uniform", "logSNR", "time_quadratic", "time_power", "karras", "exponential",
            "flow_shift"} <= set(dp.GRIDS)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_log_snr_grid_is_uniform_in_lambda(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    for t_start, t_end in [(schedule.t_max, schedule.t_min), _custom_ends(schedule)]:
        ts = dp.make_grid(schedule, 20, "logSNR", t_start=t_start, t_end=t_end)
        lam = schedule.log_snr(ts)
        expected = np.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), 21)
        np.testing.assert_allclose(lam, expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-8)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_time_power_is_uniform_in_a_root_of_t_and_spans_uniform_and_quadratic(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    ts = dp.make_grid(schedule, 12, "time_power")   # default power 1.5: uniform in t^(2/3)
    np.testing.assert_allclose(np.diff(ts ** (2 / 3)), (schedule.t_min ** (2 / 3) - schedule.t_max ** (2 / 3)) / 12,
                               rtol=1e-9)
    for power, kind in ((1.0, "time_uniform"), (2.0, "time_quadratic")):
        np.testing.assert_allclose(dp.make_grid(schedule, 12, "time_power", power=power),
                                   dp.make_grid(schedule, 12, kind), rtol=1e-12)
    # between the two: each interior time lies between time_uniform's and time_quadratic's
    tu, tq = dp.make_grid(schedule, 12, "time_uniform"), dp.make_grid(schedule, 12, "time_quadratic")
    assert np.all((ts[1:-1] < tu[1:-1]) & (ts[1:-1] > tq[1:-1]))


def test_time_power_to_zero_and_validation():
    schedule = dp.DiscreteVP.linear()
    ts = dp.make_grid(schedule, 6, "time_power", t_end=0)
    np.testing.assert_allclose(ts, np.linspace(1, 0, 7) ** 1.5, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="power > 0"):
        dp.make_grid(schedule, 6, "time_power", power=0.0)
    with pytest.raises(ValueError, match="no option"):
        dp.make_grid(schedule, 6, "time_power", rho=7)


def test_recommended_lab_config_runs_its_grid_to_zero():
    from dpmsolve.lab import GaussianData
    from dpmsolve.lab.evaluate import DEFAULT_CONFIGS, RECOMMENDED

    assert RECOMMENDED in DEFAULT_CONFIGS and RECOMMENDED.grid == "time_power"
    schedule = dp.DiscreteVP.linear()
    den = GaussianData([0.0, 0.1, -0.1], [0.25, 0.25, 0.25]).denoiser(schedule)
    res = RECOMMENDED.run(den, torch.randn(4, 3, dtype=torch.float64), 5, "zero")
    assert res.nfe == 5 and res.ts[-1] == 0.0


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_time_uniform_and_time_quadratic(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    ts = dp.make_grid(schedule, 16, "time_uniform")
    np.testing.assert_allclose(np.diff(ts), (schedule.t_min - schedule.t_max) / 16, rtol=1e-10)
    ts = dp.make_grid(schedule, 16, "time_quadratic")
    root = np.sqrt(ts)
    np.testing.assert_allclose(np.diff(root), (np.sqrt(schedule.t_min) - np.sqrt(schedule.t_max)) / 16, rtol=1e-10)
    # the reference's time_quadratic: linspace(t_T^(1/2), t_0^(1/2), N + 1)^2
    expected = np.linspace(schedule.t_max**0.5, schedule.t_min**0.5, 17) ** 2
    np.testing.assert_allclose(ts, expected, rtol=1e-14)


def _karras_eq5(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022, Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    i = np.arange(n)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _kdiffusion_get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's ``get_sigmas_karras`` (crowsonkb/k-diffusion, sampling.py), by hand, without its final zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).numpy()


def _kdiffusion_get_sigmas_exponential(n, sigma_min, sigma_max):
    """k-diffusion's ``get_sigmas_exponential``, by hand, without its final zero."""
    return torch.linspace(np.log(sigma_max), np.log(sigma_min), n, dtype=torch.float64).exp().numpy()


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_grid_matches_eq5_on_ve_sigma(schedule_name, rho):
    schedule = SCHEDULES[schedule_name]()
    steps = 18
    options = {} if rho == 7.0 else {"rho": rho}
    for t_start, t_end in [(schedule.t_max, schedule.t_min), _custom_ends(schedule)]:
        ts = dp.make_grid(schedule, steps, "karras", t_start=t_start, t_end=t_end, **options)
        s_max, s_min = _sigma_ve(schedule, t_start), _sigma_ve(schedule, t_end)
        sig = _sigma_ve(schedule, ts)
        np.testing.assert_allclose(sig, _karras_eq5(s_min, s_max, steps + 1, rho), rtol=1e-9)
        np.testing.assert_allclose(sig, _kdiffusion_get_sigmas_karras(steps + 1, s_min, s_max, rho), rtol=1e-9)


def test_karras_on_edm_is_the_edm_paper_grid():
    """For EDM (t = sigma) the grid is exactly Karras' sigmas with sigma_min = 0.002, sigma_max = 80."""
    ts = dp.make_grid(dp.EDM(), 17, "karras")
    np.testing.assert_allclose(ts, _karras_eq5(0.002, 80.0, 18), rtol=1e-13)
    with pytest.raises(ValueError, match="rho"):
        dp.make_grid(dp.EDM(), 17, "karras", rho=0.0)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_exponential_grid_is_geometric_in_ve_sigma(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    steps = 12
    for t_start, t_end in [(schedule.t_max, schedule.t_min), _custom_ends(schedule)]:
        ts = dp.make_grid(schedule, steps, "exponential", t_start=t_start, t_end=t_end)
        sig = _sigma_ve(schedule, ts)
        ratios = sig[1:] / sig[:-1]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
        s_max, s_min = _sigma_ve(schedule, t_start), _sigma_ve(schedule, t_end)
        np.testing.assert_allclose(sig, _kdiffusion_get_sigmas_exponential(steps + 1, s_min, s_max), rtol=1e-9)


def _shift(u, shift):
    return shift * u / (1.0 + (shift - 1.0) * u)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 6.0])
def test_flow_shift_grid_is_the_sd3_shift(shift):
    schedule = dp.RectifiedFlow()
    steps = 28
    options = {} if shift == 3.0 else {"shift": shift}
    ts = dp.make_grid(schedule, steps, "flow_shift", **options)
    u = np.linspace(1.0, 0.0, steps + 1)
    t_start, t_end = schedule.t_max, schedule.t_min
    np.testing.assert_allclose(ts, t_end + (t_start - t_end) * _shift(u, shift), rtol=1e-13)
    # on (nearly) the full range [0, 1] this is the shift formula itself, as in SD3 / diffusers
    wide = dp.RectifiedFlow(t_min=1e-12, t_max=1 - 1e-12)
    ts = dp.make_grid(wide, steps, "flow_shift", **options)
    np.testing.assert_allclose(ts, _shift(u, shift), rtol=0, atol=1e-11)
    if shift == 1.0:
        np.testing.assert_allclose(dp.make_grid(schedule, steps, "flow_shift", shift=1.0),
                                   dp.make_grid(schedule, steps, "time_uniform"), rtol=1e-14)
    if shift > 1.0:  # more of the steps at high noise than the uniform grid
        assert np.median(dp.make_grid(schedule, steps, "flow_shift", shift=shift)) > 0.5


def test_flow_shift_rejects_nonpositive_shift():
    with pytest.raises(ValueError, match="shift"):
        dp.make_grid(dp.RectifiedFlow(), 10, "flow_shift", shift=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Validation


@pytest.fixture
def vp():
    return dp.LinearVP()


@pytest.mark.parametrize("ts,match", [
    ([0.9, 0.5, 0.5, 0.1], "strictly decreasing"),        # repeated time
    ([0.1, 0.5, 0.9], "strictly decreasing"),             # increasing
    ([0.9, 0.3, 0.5, 0.1], "strictly decreasing"),        # not monotone
    ([1.5, 0.5, 0.1], "range"),                           # above t_max
    ([0.9, 0.5, 1e-5], "range"),                          # below t_min
    ([0.5], "at least 2"),                                # too short
    ([], "at least 2"),
    ([0.9, float("nan"), 0.1], "NaN"),
    ([0.9, 0.5, float("inf")], "NaN or Inf"),
])
def test_check_grid_rejects_bad_grids(vp, ts, match):
    with pytest.raises(ValueError, match=match):
        dp.check_grid(vp, ts)


def test_check_grid_accepts_and_returns_float64(vp):
    out = dp.check_grid(vp, [1.0, 0.5, 0.001])
    assert out.dtype == np.float64 and out.shape == (3,)
    np.testing.assert_array_equal(out, [1.0, 0.5, 0.001])
    out = dp.check_grid(vp, torch.tensor([0.9, 0.1]))
    np.testing.assert_array_equal(out, [0.9, 0.1])
    # rounding just outside the range is tolerated and clipped back onto it
    out = dp.check_grid(vp, [1.0 + 1e-13, 0.001 - 1e-15])
    assert out[0] == 1.0 and out[-1] == 0.001


def test_check_grid_increasing(vp):
    ts = [0.001, 0.5, 1.0]
    np.testing.assert_array_equal(dp.check_grid(vp, ts, increasing=True), ts)
    with pytest.raises(ValueError, match="increasing"):
        dp.check_grid(vp, ts[::-1], increasing=True)
    with pytest.raises(ValueError, match="increasing"):
        dp.check_grid(vp, [0.001, 0.5, 0.5], increasing=True)
    with pytest.raises(ValueError, match="decreasing"):
        dp.check_grid(vp, ts)
    with pytest.raises(ValueError, match="range"):
        dp.check_grid(vp, [0.001, 2.0], increasing=True)


def test_make_grid_validation(vp):
    with pytest.raises(ValueError, match="Unknown grid"):
        dp.make_grid(vp, 10, "uniform_in_vibes")
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            dp.make_grid(vp, steps, "logSNR")
    for steps in (True, "10"):                                       # wrong types
        with pytest.raises(TypeError, match="steps"):
            dp.make_grid(vp, steps, "logSNR")
    with pytest.raises(ValueError):
        dp.make_grid(vp, 10, "logSNR", t_start=0.2, t_end=0.5)      # start below end
    with pytest.raises(ValueError, match="range"):
        dp.make_grid(vp, 10, "logSNR", t_start=2.0)
    with pytest.raises(ValueError, match="range"):
        dp.make_grid(vp, 10, "logSNR", t_end=1e-5)
    assert dp.make_grid(vp, np.int64(4), "logSNR").shape == (5,)


def test_default_grid_is_log_snr(vp):
    np.testing.assert_array_equal(dp.make_grid(vp, 9), dp.make_grid(vp, 9, "logSNR"))


@pytest.mark.parametrize("kind", sorted(dp.GRIDS))
def test_grid_to_zero_ends_at_sigma_zero(kind):
    schedule = dp.DiscreteVP.linear()
    ts = dp.make_grid(schedule, 6, kind, t_end=0)
    assert ts.size == 7 and ts[-1] == 0.0 and ts[0] == schedule.t_max
    assert np.all(np.diff(ts) < 0) and np.all(ts[:-1] >= schedule.t_min)
    if kind == "time_uniform":  # diffusers' default DDPM spacing: evaluations at 1, 5/6, ..., 1/6
        np.testing.assert_allclose(ts, np.linspace(1, 0, 7), rtol=0, atol=1e-15)
    if kind in ("logSNR", "karras", "exponential"):  # lambda grids: steps - 1 intervals to t_min, then 0
        np.testing.assert_allclose(ts[:-1], dp.make_grid(schedule, 5, kind), rtol=1e-14)


def test_sampling_to_zero_returns_the_x0_jump():
    from dpmsolve.lab import GaussianData

    schedule = dp.LinearVP()
    problem = GaussianData([0.3, -0.2], [0.5, 0.1])
    den = problem.denoiser(schedule)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    ts = dp.make_grid(schedule, 8, "time_uniform", t_end=0)
    res = dp.sample(den, x, "dpmsolver++", grid=ts, return_intermediates=True, progress=False)
    assert res.nfe == 8 and res.ts[-1] == 0.0 and len(res.trajectory) == 9
    # the last step is the x0 prediction at the previous grid time (DDIM's step to sigma = 0)
    torch.testing.assert_close(res.x, den(res.trajectory[-2], ts[-2]).x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.x, res.trajectory[-1], rtol=0, atol=0)
    # the same for noise prediction, a singlestep block and UniPC (whose corrector acts before the jump)
    for name, opts in [("dpmsolver", {"order": 2}), ("dpmsolver++", {"method": "singlestep", "order": 3}),
                       ("unipc", {"order": 2})]:
        r = dp.sample(den, x, name, grid=ts, return_intermediates=True, progress=False, **opts)
        assert r.nfe == 8
        torch.testing.assert_close(r.x, den(r.trajectory[-2], ts[-2]).x0, rtol=1e-10, atol=1e-10)
    # and it converges to the exact data-end solution: y = mean + sqrt(var) z
    a, s = schedule.alpha_sigma(schedule.t_max)
    z = (x / a - problem.mean) / torch.sqrt(problem.var + (s / a) ** 2)
    exact = problem.mean + problem.var.sqrt() * z
    errs = [float((dp.sample(den, x, "dpmsolver++", steps=n, grid="time_uniform", t_end=0, order=2,
                             progress=False).x - exact).abs().max()) for n in (10, 40)]
    assert errs[1] < errs[0] / 4
