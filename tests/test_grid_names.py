"""The ecosystem's step schedules as grid names: ComfyUI's schedulers, diffusers' spacings and sigma flags, and the
AYS / GITS tables.

* ComfyUI names on a DiscreteVP against an independent float64 re-computation of ComfyUI's formulas
  (``comfy/samplers.py``) on the schedule's train sigmas, written here.
* diffusers' spacings and ``use_*_sigmas`` against diffusers' own ``set_timesteps`` (integer timesteps exactly,
  sigmas to 1e-6).
* AYS at 10 steps is the published table; other step counts are its log-linear interpolation; GITS rows are the
  table rows; both map log-linearly onto other schedules.
* Every name, on every schedule, for 1..30 steps and three kinds of end: steps + 1 strictly decreasing times inside
  the range.
"""

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve import grid_tables
from dpmsolve.grids import DIFFUSERS_SIGMA_FLAGS, loglinear_interp

NAMES = ["simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal", "leading",
         "linspace", "trailing", "beta_sigmas", "ays", "gits"]
COMFY_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
               "linear_quadratic", "kl_optimal"]

SCHEDULES = {
    "scaled_linear": lambda: dp.DiscreteVP.scaled_linear(),
    "discrete": lambda: dp.DiscreteVP.linear(),
    "linear": lambda: dp.LinearVP(),
    "cosine": lambda: dp.CosineVP(),
    "edm": lambda: dp.EDM(),
    "flow": lambda: dp.RectifiedFlow(),
}


def _ve(schedule, ts):
    """The VE sigma sigma/alpha of each time; 0 at t = 0."""
    ts = np.asarray(ts, dtype=np.float64)
    out = np.zeros_like(ts)
    pos = ts > 0
    out[pos] = np.exp(-np.asarray(schedule.log_snr(ts[pos])))
    return out


# ---------------------------------------------------------------------------------------------------- registry

def test_every_name_is_registered_and_listed_when_unknown():
    assert set(NAMES + COMFY_NAMES) <= set(dp.GRIDS)
    with pytest.raises(ValueError, match="Unknown grid") as err:
        dp.make_grid(dp.LinearVP(), 5, "align_your_steps")
    assert all(name in str(err.value) for name in NAMES)
    assert set(DIFFUSERS_SIGMA_FLAGS.values()) <= set(dp.GRIDS)


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", NAMES)
def test_every_name_is_a_valid_grid_for_1_to_30_steps(schedule_name, kind):
    schedule = SCHEDULES[schedule_name]()
    span = schedule.t_max - schedule.t_min
    custom = (schedule.t_min + 0.7 * span, schedule.t_min + 0.1 * span)
    for steps in range(1, 31):
        for t_start, t_end in [(None, None), (None, 0.0), custom, (custom[0], 0.0)]:
            ts = dp.make_grid(schedule, steps, kind, t_start=t_start, t_end=t_end)
            start = schedule.t_max if t_start is None else t_start
            end = schedule.t_min if t_end is None else t_end
            assert ts.shape == (steps + 1,) and ts.dtype == np.float64
            assert ts[0] == start and ts[-1] == end
            assert np.all(np.diff(ts) < 0), (kind, steps, t_start, t_end, ts)
            body = ts[:-1] if end == 0 else ts
            assert schedule.contains(body) and body.min() >= schedule.t_min
            np.testing.assert_array_equal(dp.check_grid(schedule, ts), ts)


@pytest.mark.parametrize("kind", ["beta", "ays", "gits", "simple", "leading"])
def test_sample_accepts_the_names(kind):
    from dpmsolve.lab import GaussianData

    schedule = dp.DiscreteVP.scaled_linear()
    den = GaussianData([0.2, -0.1], [0.3, 0.5]).denoiser(schedule)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = dp.sample(den, x, "dpmsolver++", steps=8, grid=kind, t_end=0, progress=False)
    assert out.nfe == 8 and out.ts[-1] == 0.0 and torch.isfinite(out.x).all()
    np.testing.assert_array_equal(out.ts, dp.make_grid(schedule, 8, kind, t_end=0))


# ------------------------------------------------------------------------ ComfyUI, re-computed from its formulas

SD = dp.DiscreteVP.scaled_linear()
AC = SD.alphas_cumprod
SIGMAS = np.sqrt((1.0 - AC) / AC)      # ComfyUI's model_sampling.sigmas: the VE sigma of each train step
LOG_SIGMAS = np.log(SIGMAS)


def comfy_sigma(timestep):
    """ModelSamplingDiscrete.sigma: log sigma interpolated between train steps."""
    t = np.clip(np.asarray(timestep, dtype=np.float64), 0, SIGMAS.size - 1)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    return np.exp((1 - w) * LOG_SIGMAS[low] + w * LOG_SIGMAS[high])


def comfy_simple(steps):
    ss = SIGMAS.size / steps
    return np.array([SIGMAS[-(1 + int(x * ss))] for x in range(steps)] + [0.0])


def comfy_normal(steps, sgm=False):
    start, end = SIGMAS.size - 1, 0          # timestep(sigma_max), timestep(sigma_min)
    ts = np.linspace(start, end, steps + 1)[:-1] if sgm else np.linspace(start, end, steps)
    return np.append(comfy_sigma(ts), 0.0)


def comfy_ddim(steps):
    sigs, x = [0.0], 1
    ss = max(SIGMAS.size // steps, 1)
    while x < SIGMAS.size:
        sigs.append(SIGMAS[x])
        x += ss
    return np.array(sigs[::-1])


def comfy_beta(steps, a=0.6, b=0.6):
    import scipy.stats

    total = SIGMAS.size - 1
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), a, b) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(SIGMAS[int(t)])
        last = t
    return np.array(sigs + [0.0])


def comfy_linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        qc = diff / (linear_steps * quad_steps ** 2)
        lc = threshold_noise / linear_steps - 2 * diff / (quad_steps ** 2)
        const = qc * (linear_steps ** 2)
        quad = [qc * (i ** 2) + lc * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in lin + quad + [1.0]]
    return np.array(schedule) * sigma_max


def comfy_kl_optimal(n, sigma_min, sigma_max):
    adj = np.arange(n) / (n - 1)
    return np.append(np.tan(adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)), 0.0)


def comfy_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return np.append((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho, 0.0)


def comfy_exponential(n, sigma_min, sigma_max):
    return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), 0.0)


STEPS = [1, 2, 3, 4, 5, 7, 10, 13, 20, 25, 30]


@pytest.mark.parametrize("steps", STEPS)
def test_comfy_schedulers_on_a_discrete_vp(steps):
    expected = {
        "simple": comfy_simple(steps),
        "sgm_uniform": comfy_normal(steps, sgm=True),
        "normal": comfy_normal(steps),
        "beta": comfy_beta(steps),
        "linear_quadratic": comfy_linear_quadratic(steps, SIGMAS[-1]),
        "karras": comfy_karras(steps, SIGMAS[0], SIGMAS[-1]),
        "exponential": comfy_exponential(steps, SIGMAS[0], SIGMAS[-1]),
    }
    if steps > 1:   # ComfyUI's kl_optimal divides by steps - 1 (NaN for one step); dpmsolve gives [t_max, 0]
        expected["kl_optimal"] = comfy_kl_optimal(steps, SIGMAS[0], SIGMAS[-1])
    for kind, sigmas in expected.items():
        assert sigmas.size == steps + 1, kind
        ts = dp.make_grid(SD, steps, kind, t_end=0)
        np.testing.assert_allclose(_ve(SD, ts), sigmas, rtol=1e-9, atol=0, err_msg=kind)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 9, 10, 13, 20, 25, 30, 40])
def test_comfy_ddim_uniform_keeps_steps_and_starts_at_t_start(steps):
    comfy = comfy_ddim(steps)
    ts = dp.make_grid(SD, steps, "ddim_uniform", t_end=0)
    sig = _ve(SD, ts)
    # ComfyUI returns every train step 1 + j * (N // steps) below N: one more than `steps` when N % steps > 1.
    # dpmsolve keeps the lowest `steps` of them; the first time is t_start (where the start noise is given).
    kept = comfy[-(steps + 1):]
    if SIGMAS.size % steps <= 1:
        assert comfy.size == steps + 1
    np.testing.assert_allclose(sig[1:], kept[1:], rtol=1e-12)
    assert ts[0] == SD.t_max
    # it is diffusers' DDIM 'leading' spacing with steps_offset=1
    np.testing.assert_array_equal(ts, dp.make_grid(SD, steps, "leading", t_end=0, steps_offset=1, scheduler="ddim"))


def test_comfy_beta_options_and_quantiles():
    import scipy.stats

    ts = dp.make_grid(SD, 12, "beta", t_end=0, alpha=0.4, beta=0.8)
    np.testing.assert_allclose(_ve(SD, ts), comfy_beta(12, 0.4, 0.8), rtol=1e-9)
    # continuous schedules: the Beta quantiles of the t range, without rounding to train steps
    flow = dp.RectifiedFlow()
    ts = dp.make_grid(flow, 9, "beta")
    q = scipy.stats.beta.ppf(1 - np.linspace(0, 1, 9, endpoint=False), 0.6, 0.6)
    np.testing.assert_allclose(ts[:-1], flow.t_min + q * (flow.t_max - flow.t_min), rtol=1e-12)
    with pytest.raises(ValueError, match="alpha > 0"):
        dp.make_grid(SD, 5, "beta", alpha=0.0)


def test_comfy_linear_quadratic_options():
    ts = dp.make_grid(SD, 12, "linear_quadratic", t_end=0, threshold_noise=0.05, linear_steps=4)
    np.testing.assert_allclose(_ve(SD, ts), comfy_linear_quadratic(12, SIGMAS[-1], 0.05, 4), rtol=1e-9)
    # on rectified flow ComfyUI's sigma is t itself (Mochi's schedule): t = t_start * (1 - x)
    flow = dp.RectifiedFlow()
    ts = dp.make_grid(flow, 16, "linear_quadratic", t_end=0)
    np.testing.assert_allclose(ts, comfy_linear_quadratic(16, flow.t_max), rtol=1e-12)
    with pytest.raises(ValueError, match="linear_steps"):
        dp.make_grid(SD, 6, "linear_quadratic", linear_steps=6)
    with pytest.raises(ValueError, match="threshold_noise"):
        dp.make_grid(SD, 6, "linear_quadratic", threshold_noise=1.5)


def test_comfy_names_on_continuous_schedules_follow_comfys_timestep_coordinate():
    # EDM: ComfyUI's ModelSamplingContinuousEDM has timestep = log(sigma) / 4, so 'normal' is geometric in sigma
    edm = dp.EDM()
    np.testing.assert_allclose(dp.make_grid(edm, 9, "normal", t_end=0)[:-1], dp.make_grid(edm, 8, "exponential"),
                               rtol=1e-12)
    np.testing.assert_allclose(dp.make_grid(edm, 9, "normal"), dp.make_grid(edm, 9, "exponential"), rtol=1e-12)
    # kl_optimal on EDM is ComfyUI's own (sigma_min, sigma_max) formula
    np.testing.assert_allclose(dp.make_grid(edm, 9, "kl_optimal", t_end=0), comfy_kl_optimal(9, 0.002, 80.0),
                               rtol=1e-12)
    # t-timed schedules: simple / sgm_uniform / trailing evaluate at t_start - i/steps (t_start - t_min), then 0
    for schedule in (dp.LinearVP(), dp.CosineVP(), dp.RectifiedFlow()):
        ramp = schedule.t_max - np.arange(7) / 7 * (schedule.t_max - schedule.t_min)
        for kind in ("simple", "sgm_uniform", "trailing"):
            np.testing.assert_allclose(dp.make_grid(schedule, 7, kind, t_end=0), np.append(ramp, 0.0),
                                       rtol=1e-12, err_msg=kind)
        for kind in ("simple", "sgm_uniform", "normal", "linspace", "trailing"):   # ending at t_min: uniform in t
            np.testing.assert_allclose(dp.make_grid(schedule, 7, kind), dp.make_grid(schedule, 7, "time_uniform"),
                                       rtol=1e-12, err_msg=kind)
    # kl_optimal and linear_quadratic use ComfyUI's sigma: the VE sigma sigma/alpha on VP schedules
    vp = dp.LinearVP()
    ts = dp.make_grid(vp, 6, "kl_optimal", t_end=0)
    np.testing.assert_allclose(_ve(vp, ts), comfy_kl_optimal(6, _ve(vp, [vp.t_min])[0], _ve(vp, [vp.t_max])[0]),
                               rtol=1e-10)


def test_custom_range_on_a_discrete_vp_uses_the_train_steps_inside_it():
    t_start, t_end = SD.t_from_train_index(799), SD.t_from_train_index(100)
    ts = dp.make_grid(SD, 7, "simple", t_start=t_start, t_end=t_end)
    k = np.round(SD.train_index(ts)).astype(int)
    m = 700   # train steps 100..799
    np.testing.assert_array_equal(k[:-1], 799 - np.floor(np.arange(7) * (m / 7)).astype(int))
    assert ts[-1] == t_end


def test_too_many_steps_for_a_discrete_table_is_refused():
    small = dp.DiscreteVP.linear(20)
    for kind in ("simple", "beta", "ddim_uniform", "leading", "linspace", "trailing"):
        with pytest.raises(ValueError, match="would repeat a train step"):
            dp.make_grid(small, 30, kind, t_end=0)
    # continuous-timestep names interpolate between train steps, like ComfyUI
    assert dp.make_grid(small, 30, "normal", t_end=0).size == 31
    assert dp.make_grid(small, 30, "sgm_uniform").size == 31


# ---------------------------------------------------------------------------------------------------- diffusers

def _diffusers(cls_name, **config):
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, cls_name)
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config)


def _schedule_of(sched):
    return dp.DiscreteVP.from_alphas_cumprod(sched.alphas_cumprod.double().numpy())


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("cls_name", ["DPMSolverMultistepScheduler", "DDIMScheduler", "UniPCMultistepScheduler"])
def test_diffusers_timestep_spacings(cls_name, spacing, offset):
    sched = _diffusers(cls_name, timestep_spacing=spacing, steps_offset=offset)
    schedule = _schedule_of(sched)
    options = {"steps_offset": offset} if spacing == "leading" else {}
    if spacing != "trailing" and cls_name == "DDIMScheduler":
        options["scheduler"] = "ddim"
    for steps in list(range(1, 31)) + [50, 100]:
        sched.set_timesteps(steps)
        expected = sched.timesteps.numpy()
        ts = dp.make_grid(schedule, steps, spacing, t_end=0, **options)
        assert ts[-1] == 0.0 and ts.size == steps + 1 == expected.size + 1
        got = np.round(schedule.train_index(ts[:-1])).astype(np.int64)
        np.testing.assert_allclose(schedule.train_index(ts[1:-1]), got[1:], rtol=0, atol=1e-9)
        # every timestep exactly; the grid starts at t_max where diffusers starts below it ('leading'; DDIM's
        # 'linspace' for one step evaluates only at timestep 0), at its first timestep
        first = 0 if expected[0] == 999 else 1
        np.testing.assert_array_equal(got[first:], expected[first:], err_msg=f"{steps} steps")
        assert ts[0] == schedule.t_max and (first == 0 or spacing == "leading" or steps == 1)
        if cls_name != "DDIMScheduler":   # the solver's sigmas: the train sigmas at those timesteps, then 0
            np.testing.assert_allclose(_ve(schedule, ts)[first:], sched.sigmas.numpy()[first:], rtol=1e-6)


@pytest.mark.parametrize("flag", sorted(DIFFUSERS_SIGMA_FLAGS))
def test_diffusers_sigma_flags(flag):
    pytest.importorskip("scipy")
    sched = _diffusers("DPMSolverMultistepScheduler", **{flag: True})
    schedule = _schedule_of(sched)
    for steps in (1, 2, 5, 10, 17, 30):
        sched.set_timesteps(steps)
        ts = dp.make_grid(schedule, steps, DIFFUSERS_SIGMA_FLAGS[flag], t_end=0)
        # the sigmas the solver steps between (the network's time input, diffusers' timestep of each sigma or
        # dpmsolve's fractional train index, is the model wrapper's business, not the grid's)
        np.testing.assert_allclose(_ve(schedule, ts), sched.sigmas.numpy(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------- AYS, GITS

AYS_RANGES = {"sd15": (0.0291671582, 14.6146412293), "sdxl": (0.0291671582, 14.6146412293), "svd": (0.002, 700.0)}


@pytest.mark.parametrize("model", sorted(grid_tables.AYS_SIGMAS))
def test_ays_at_10_steps_is_the_table(model):
    table = np.array(grid_tables.AYS_SIGMAS[model])
    lo, hi = AYS_RANGES[model]
    edm = dp.EDM(sigma_min=lo, sigma_max=hi)           # the model's own sigma range: the table itself
    np.testing.assert_allclose(dp.make_grid(edm, 10, "ays", model=model), table, rtol=1e-12)
    np.testing.assert_allclose(dp.make_grid(edm, 10, "ays", model=model, t_end=0), np.append(table[:-1], 0.0),
                               rtol=1e-12)   # ComfyUI's AlignYourStepsScheduler: the last sigma is 0
    if model != "svd":   # on Stable Diffusion's own DiscreteVP (the table's ends are its float32 sigmas)
        np.testing.assert_allclose(_ve(SD, dp.make_grid(SD, 10, "ays", model=model)), table, rtol=1e-6)


def test_ays_other_step_counts_interpolate_log_linearly():
    table = np.array(grid_tables.AYS_SIGMAS["sd15"])
    edm = dp.EDM(sigma_min=table[-1], sigma_max=table[0])
    ts = dp.make_grid(edm, 20, "ays")
    np.testing.assert_allclose(ts[::2], table, rtol=1e-12)                           # the table's own points
    np.testing.assert_allclose(ts[1::2], np.sqrt(table[:-1] * table[1:]), rtol=1e-12)  # log-midpoints
    for steps in (1, 4, 15, 33):
        ts = dp.make_grid(edm, steps, "ays")
        x = np.linspace(0, 1, steps + 1)
        expected = np.exp(np.interp(x, np.linspace(0, 1, 11), np.log(table[::-1])))[::-1]
        np.testing.assert_allclose(ts, expected, rtol=1e-12)
        np.testing.assert_allclose(ts, loglinear_interp(table, steps + 1), rtol=1e-12)


@pytest.mark.parametrize("kind,options,table", [
    ("ays", {"model": "sdxl"}, grid_tables.AYS_SIGMAS["sdxl"]),
    ("gits", {"coeff": 0.9}, grid_tables.GITS_SIGMAS[0.9][8]),
])
@pytest.mark.parametrize("schedule_name", ["edm", "linear", "flow", "discrete"])
def test_tables_map_log_linearly_onto_other_schedules(kind, options, table, schedule_name):
    schedule = SCHEDULES[schedule_name]()
    table = np.array(table)
    span = schedule.t_max - schedule.t_min
    custom = (schedule.t_min + 0.6 * span, schedule.t_min + 0.1 * span)
    for t_start, t_end in [(schedule.t_max, schedule.t_min), custom]:
        ts = dp.make_grid(schedule, 10, kind, t_start=t_start, t_end=t_end, **options)
        log_s = np.log(_ve(schedule, ts))
        f = (log_s - log_s[-1]) / (log_s[0] - log_s[-1])
        f_table = (np.log(table) - np.log(table[-1])) / (np.log(table[0]) - np.log(table[-1]))
        np.testing.assert_allclose(f, f_table, rtol=0, atol=1e-9)


@pytest.mark.parametrize("coeff", [0.80, 1.05, 1.20, 1.50])
def test_gits_rows_are_the_table(coeff):
    rows = grid_tables.GITS_SIGMAS[coeff]
    sd_range = dp.EDM(sigma_min=0.02916753, sigma_max=14.61464119)
    for steps in range(2, 21):
        ts = dp.make_grid(sd_range, steps, "gits", coeff=coeff)
        np.testing.assert_allclose(ts, rows[steps - 2], rtol=1e-12)
    ts = dp.make_grid(sd_range, 30, "gits", coeff=coeff, t_end=0)   # above 20 steps: the 20-step row interpolated
    np.testing.assert_allclose(ts[:-1], loglinear_interp(rows[-1], 31)[:-1], rtol=1e-12)
    assert ts[-1] == 0.0
    np.testing.assert_array_equal(dp.make_grid(sd_range, 1, "gits", coeff=coeff), [14.61464119, 0.02916753])
    if coeff == 1.20:   # the default, as ComfyUI's GITSScheduler
        np.testing.assert_array_equal(dp.make_grid(sd_range, 10, "gits"), dp.make_grid(sd_range, 10, "gits", coeff=1.2))


def test_tables_are_well_formed():
    assert sorted(grid_tables.AYS_SIGMAS) == ["sd15", "sdxl", "svd"]
    for table in grid_tables.AYS_SIGMAS.values():
        assert len(table) == 11 and all(a > b > 0 for a, b in zip(table, table[1:]))
    assert sorted(grid_tables.GITS_SIGMAS) == [round(0.80 + 0.05 * i, 2) for i in range(15)]
    for rows in grid_tables.GITS_SIGMAS.values():
        assert [len(r) for r in rows] == list(range(3, 22))
        for row in rows:
            assert row[0] == 14.61464119 and row[-1] == 0.02916753
            assert all(a > b for a, b in zip(row, row[1:]))


# --------------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kind,options,error,match", [
    ("ays", {"model": "sd21"}, ValueError, r"model='sd21'.*'sd15', 'sdxl', 'svd'"),
    ("ays", {"model": 1}, TypeError, "model .* must be a name"),
    ("gits", {"coeff": 1.23}, ValueError, "coeff=1.23 .* 0.80, 0.85"),
    ("leading", {"scheduler": "pndm"}, ValueError, "'dpmsolver', 'ddim'"),
    ("leading", {"steps_offset": 1.5}, ValueError, "steps_offset .* integer"),
    ("linspace", {"steps_offset": 1}, ValueError, "no option"),
    ("beta", {"alpha": float("nan")}, ValueError, "alpha=nan"),
    ("linear_quadratic", {"linear_steps": "half"}, TypeError, "linear_steps .* must be a number"),
])
def test_option_errors_name_the_option(kind, options, error, match):
    with pytest.raises(error, match=match):
        dp.make_grid(SD, 8, kind, **options)


def test_steps_offset_needs_train_steps():
    with pytest.raises(ValueError, match="steps_offset=1 .* only a DiscreteVP"):
        dp.make_grid(dp.LinearVP(), 8, "leading", steps_offset=1)
