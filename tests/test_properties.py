"""Property-based tests (hypothesis) of the conventions every schedule, grid and solver promises.

* Schedules, for random valid parameters of every schedule class: lambda(t) decreases strictly in t,
  ``t_from_log_snr(lambda(t)) == t`` to float64 round-off, and ``alpha^2 + sigma^2 = 1`` for VP schedules.
* Grids, for any valid kind, step count, options and end points: ``steps + 1`` strictly decreasing times inside
  ``[t_min, t_max]`` that start exactly at ``t_start`` (default ``t_max``) and end exactly at ``t_end`` (default
  ``t_min``; 0 for a grid to sigma = 0, whose other times stay in range).
* Solvers, for random registry names with valid options, step counts and grids, on Gaussian data whose
  denoiser is known in closed form (a network wrapped by ``wrap_model``): the NFE reported equals the network
  calls counted, the start noise is not modified in place, and (deterministic solvers) a batch equals its items
  sampled one by one, to round-off.

Hypothesis runs without its example database (nothing is written into the repository) and without deadlines;
the whole file takes well under 30 s on one CPU thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dpmsolve as dp

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
floats = st.floats  # finite by construction below: every strategy gives explicit bounds


# -------------------------------------------------------------------------------------------- schedules

@st.composite
def linear_vp(draw):
    beta_0 = draw(floats(0.01, 2.0))
    beta_1 = beta_0 + draw(floats(0.5, 40.0))
    t_min = draw(floats(1e-4, 0.05))
    t_max = draw(floats(0.5, 1.0))
    return dp.LinearVP(beta_0=beta_0, beta_1=beta_1, t_min=t_min, t_max=t_max)


@st.composite
def cosine_vp(draw):
    return dp.CosineVP(s=draw(floats(1e-3, 0.1)), t_min=draw(floats(1e-4, 0.05)), t_max=draw(floats(0.5, 0.995)))


@st.composite
def discrete_vp(draw):
    n = draw(st.integers(10, 1000))
    beta_start = draw(floats(1e-5, 2e-3))
    beta_end = draw(floats(5e-3, 0.05))
    kind = draw(st.sampled_from(["linear", "scaled_linear"]))
    if kind == "linear":
        return dp.DiscreteVP.linear(n, beta_start, beta_end)
    return dp.DiscreteVP.scaled_linear(n, beta_start, beta_end)


@st.composite
def edm(draw):
    return dp.EDM(sigma_min=draw(floats(1e-4, 0.1)), sigma_max=draw(floats(1.0, 200.0)))


@st.composite
def rectified_flow(draw):
    return dp.RectifiedFlow(t_min=draw(floats(1e-4, 0.1)), t_max=draw(floats(0.9, 1 - 1e-4)))


SCHEDULE_STRATEGIES = {"LinearVP": linear_vp(), "CosineVP": cosine_vp(), "DiscreteVP": discrete_vp(),
                       "EDM": edm(), "RectifiedFlow": rectified_flow()}
any_schedule = st.one_of(*SCHEDULE_STRATEGIES.values())


def times(schedule, fractions) -> np.ndarray:
    """Sorted times inside the schedule's range: both ends, and the given fractions of the range in between,
    at least 1e-7 of the range apart (closer times are not resolvable in float64 lambda)."""
    span = schedule.t_max - schedule.t_min
    inner = schedule.t_min + np.sort(np.asarray(fractions, dtype=np.float64)) * span
    kept = [schedule.t_min]
    for t in inner:
        if t - kept[-1] > 1e-7 * span and schedule.t_max - t > 1e-7 * span:
            kept.append(float(t))
    return np.array(kept + [schedule.t_max])


fractions = st.lists(floats(0.0, 1.0), min_size=1, max_size=40)


@pytest.mark.parametrize("kind", sorted(SCHEDULE_STRATEGIES))
@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), u=fractions)
def test_log_snr_decreases_strictly(kind, data, u):
    schedule = data.draw(SCHEDULE_STRATEGIES[kind], label="schedule")
    t = times(schedule, u)
    lam = schedule.log_snr(t)
    assert np.all(np.isfinite(lam)), (schedule, t[~np.isfinite(lam)])
    assert np.all(np.diff(lam) < 0), (schedule, t, lam)
    lo, hi = schedule.log_snr_range
    assert lo < hi and lo == lam[-1] and hi == lam[0]


@pytest.mark.parametrize("kind", sorted(SCHEDULE_STRATEGIES))
@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), u=fractions)
def test_t_from_log_snr_inverts_log_snr(kind, data, u):
    schedule = data.draw(SCHEDULE_STRATEGIES[kind], label="schedule")
    t = times(schedule, u)
    back = schedule.t_from_log_snr(schedule.log_snr(t))
    # float64 round-off: relative to t, plus a hair of the range (arccos near 1, interpolation tables).
    tol = 1e-9 * t + 1e-12 * (schedule.t_max - schedule.t_min)
    err = np.abs(back - t)
    assert np.all(err <= tol), (schedule, t[np.argmax(err / tol)], float(np.max(err / tol)))
    for one in t[[0, len(t) // 2, -1]]:  # the scalar path returns a float
        value = schedule.t_from_log_snr(schedule.log_snr(float(one)))
        assert isinstance(value, float) and abs(value - one) <= 1e-9 * one + 1e-12 * (schedule.t_max - schedule.t_min)


@pytest.mark.parametrize("kind", ["LinearVP", "CosineVP", "DiscreteVP"])
@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), u=fractions)
def test_variance_preserving(kind, data, u):
    schedule = data.draw(SCHEDULE_STRATEGIES[kind], label="schedule")
    assert isinstance(schedule, dp.schedules.VPSchedule)
    t = times(schedule, u)
    a, s = schedule.alpha(t), schedule.sigma(t)
    assert np.all((a > 0) & (a < 1) & (s > 0) & (s < 1))
    np.testing.assert_allclose(a * a + s * s, 1.0, rtol=0, atol=1e-12)
    one = float(t[len(t) // 2])
    a1, s1 = schedule.alpha_sigma(one)
    assert a1 * a1 + s1 * s1 == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ grids

GRID_OPTIONS = {
    "logSNR": st.just({}),
    "exponential": st.just({}),
    "time_uniform": st.just({}),
    "time_quadratic": st.just({}),
    "time_power": st.fixed_dictionaries({}, optional={"power": floats(0.5, 3.0)}),
    "karras": st.fixed_dictionaries({}, optional={"rho": floats(0.5, 10.0)}),
    "flow_shift": st.fixed_dictionaries({}, optional={"shift": floats(0.2, 5.0)}),
    "simple": st.just({}),
    "sgm_uniform": st.just({}),
    "normal": st.just({}),
    "ddim_uniform": st.just({}),
    "beta": st.fixed_dictionaries({}, optional={"alpha": floats(0.3, 2.0), "beta": floats(0.3, 2.0)}),
    "beta_sigmas": st.fixed_dictionaries({}, optional={"alpha": floats(0.3, 2.0), "beta": floats(0.3, 2.0)}),
    "linear_quadratic": st.just({}),
    "kl_optimal": st.just({}),
    "leading": st.fixed_dictionaries({}, optional={"scheduler": st.sampled_from(["dpmsolver", "ddim"])}),
    "linspace": st.fixed_dictionaries({}, optional={"scheduler": st.sampled_from(["dpmsolver", "ddim"])}),
    "trailing": st.just({}),
    "ays": st.fixed_dictionaries({}, optional={"model": st.sampled_from(["sd15", "sdxl", "svd"])}),
    "gits": st.fixed_dictionaries({}, optional={"coeff": st.sampled_from([0.8, 1.0, 1.2, 1.5])}),
}


def test_grid_options_cover_every_grid():
    assert set(GRID_OPTIONS) == set(dp.GRIDS)


@st.composite
def grid_request(draw):
    """(schedule, steps, kind, t_start, t_end, options) of a valid make_grid call."""
    schedule = draw(any_schedule)
    kind = draw(st.sampled_from(sorted(dp.GRIDS)))
    options = draw(GRID_OPTIONS[kind])
    steps = draw(st.integers(1, 40))
    span = schedule.t_max - schedule.t_min
    t_start = t_end = None
    if draw(st.booleans()):
        t_start = schedule.t_min + draw(floats(0.05, 1.0)) * span
    high = schedule.t_max if t_start is None else t_start
    ending = draw(st.sampled_from(["default", "inside", "zero"]))
    if ending == "inside":
        t_end = schedule.t_min + draw(floats(0.0, 0.9)) * (high - schedule.t_min)
    elif ending == "zero":
        t_end = 0.0
    return schedule, steps, kind, t_start, t_end, options


@settings(max_examples=150, **SETTINGS)
@given(request=grid_request())
def test_make_grid_is_valid(request):
    schedule, steps, kind, t_start, t_end, options = request
    try:
        ts = dp.make_grid(schedule, steps, kind, t_start, t_end, **options)
    except ValueError as err:
        # The documented refusals of a valid-looking request: a time-spaced grid to t = 0 whose last evaluation
        # would fall below t_min, or a grid of train steps with more steps than the range has train steps.
        assume("evaluates below t_min" not in str(err) and "would repeat a train step" not in str(err))
        raise
    start = schedule.t_max if t_start is None else t_start
    end = schedule.t_min if t_end is None else t_end
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float64 and ts.shape == (steps + 1,)
    assert ts[0] == start and ts[-1] == end
    assert np.all(np.diff(ts) < 0), ts
    body = ts[:-1] if end == 0.0 else ts
    assert np.all((body >= schedule.t_min) & (body <= schedule.t_max)), (schedule, ts)
    # what sample() does with it: check_grid accepts it unchanged
    np.testing.assert_array_equal(dp.check_grid(schedule, ts), ts)


# ---------------------------------------------------------------------------------------------- solvers

SOLVER_SCHEDULES = {
    "LinearVP": dp.LinearVP,
    "CosineVP": dp.CosineVP,
    "DiscreteVP": dp.DiscreteVP.linear,
    "EDM": dp.EDM,
    "RectifiedFlow": dp.RectifiedFlow,
}
MEAN = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
VAR = torch.tensor([0.09, 0.5, 1.3], dtype=torch.float64)


class GaussianNet:
    """The exact noise prediction of x0 ~ N(MEAN, diag(VAR)) under ``schedule`` (continuous time input), and a
    count of its calls and of the samples it saw."""

    def __init__(self, schedule):
        self.schedule, self.calls, self.rows = schedule, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        tt = t.detach().cpu().double().numpy()
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = torch.as_tensor(self.schedule.alpha(tt), dtype=x.dtype).reshape(shape)
        s = torch.as_tensor(self.schedule.sigma(tt), dtype=x.dtype).reshape(shape)
        mean, var = MEAN.to(x), VAR.to(x)
        # E[x0 | x_t] for y = x / a with VE noise level rho = s / a, then eps = (x - a x0) / s.
        rho2 = (s / a) ** 2
        x0 = mean + var / (var + rho2) * (x / a - mean)
        return (x - a * x0) / s


@st.composite
def solver_config(draw):
    """(name, options, deterministic) of a valid registry configuration."""
    name = draw(st.sampled_from(sorted(dp.SOLVERS)))
    if name == "ddim":
        eta = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
        return name, {"eta": eta}, eta == 0.0
    if name in ("dpmsolver", "dpmsolver++"):
        method = draw(st.sampled_from(["multistep", "singlestep", "adaptive"]))
        order = draw(st.integers(2 if method == "adaptive" else 1, 3))
        options = {"method": method, "order": order, "solver_type": draw(st.sampled_from(["dpmsolver", "taylor"]))}
        if method == "multistep":
            options["lower_order_final"] = draw(st.booleans())
            options["corrector"] = draw(st.sampled_from([None, "unic"]))
        return name, options, True
    if name == "sde-dpmsolver++":
        eta = draw(st.sampled_from([0.0, 0.5, 1.0]))
        return name, {"order": draw(st.integers(1, 2)), "eta": eta}, eta == 0.0
    if name == "unipc":
        return name, {"order": draw(st.integers(1, 3)), "variant": draw(st.sampled_from(["bh1", "bh2"])),
                      "corrector": draw(st.booleans()), "predict": draw(st.sampled_from(["data", "noise"]))}, True
    if name == "dpmsolver-v3":
        return name, {"ems": "degenerate", "order": draw(st.integers(1, 3))}, True
    return name, {}, not dp.get_solver(name).stochastic  # a newly registered solver, with its defaults


@st.composite
def sampling_run(draw):
    """Everything for one dp.sample call: schedule name, solver config, grid keywords, batch size, seed."""
    schedule = draw(st.sampled_from(sorted(SOLVER_SCHEDULES)))
    name, options, deterministic = draw(solver_config())
    adaptive = options.get("method") == "adaptive"
    grid = {}
    if not adaptive:
        grid["steps"] = draw(st.integers(1, 10))
        grid["grid"] = draw(st.sampled_from(["logSNR", "time_uniform", "karras"]))
        ending = draw(st.sampled_from(["t_min", "zero", "denoise"]))
        if ending == "zero":
            grid["t_end"] = 0
        elif ending == "denoise":
            grid["denoise_to_zero"] = True
    batch = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    return schedule, name, options, deterministic, grid, batch, seed


def _sample(schedule_name, name, options, grid, x, seed):
    schedule = SOLVER_SCHEDULES[schedule_name]()
    net = GaussianNet(schedule)
    denoiser = dp.wrap_model(net, schedule, prediction="eps", time_input="continuous")
    out = dp.sample(denoiser, x, name, seed=seed, progress=False, **grid, **options)
    return out, net


@settings(max_examples=60, **SETTINGS)
@given(run=sampling_run())
def test_nfe_is_counted_and_x_T_is_not_modified(run):
    schedule, name, options, deterministic, grid, batch, seed = run
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    before = x.clone()
    out, net = _sample(schedule, name, options, grid, x, seed)
    assert out.nfe == net.calls, (out.nfe, net.calls)
    assert net.rows == batch * net.calls
    solver = dp.get_solver(name, **options)
    expected = solver.expected_nfe(grid.get("steps", 0), ends_at_zero=grid.get("t_end") == 0)
    if expected is not None:
        assert out.nfe == expected + int(grid.get("denoise_to_zero", False))
    assert torch.equal(x, before), "sample() modified x_T in place"
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and bool(torch.isfinite(out.x).all())
    assert out.x.data_ptr() != x.data_ptr()


@settings(max_examples=40, **SETTINGS)
@given(run=sampling_run())
def test_a_batch_equals_its_items(run):
    schedule, name, options, deterministic, grid, batch, seed = run
    # Stochastic solvers draw their noise per batch, and the adaptive solver controls its step size by the
    # worst sample of the batch (as the reference implementation does): neither is batch-separable.
    assume(deterministic and options.get("method") != "adaptive")
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    together, _ = _sample(schedule, name, options, grid, x, seed)
    for i in range(batch):
        alone, _ = _sample(schedule, name, options, grid, x[i:i + 1].clone(), seed)
        torch.testing.assert_close(together.x[i:i + 1], alone.x, rtol=1e-12, atol=1e-12)
        assert alone.nfe == together.nfe
