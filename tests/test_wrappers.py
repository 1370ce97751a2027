"""Sampling extras that are wrappers: guidance in a limited interval of noise levels (Kynkaanniemi et al. 2024),
heavy-ball momentum on fixed-grid solvers (Wizadwongsa et al. 2023) and time-shifted DDIM (Li et al. 2024)."""

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData, GaussianMixture
from dpmsolve.solvers.momentum import HeavyBall
from dpmsolve.wrappers import PerSampleTime, TimeShift


class Calls(dp.Denoiser):
    """Records the batch size and time of every call reaching ``inner``."""

    def __init__(self, inner):
        self.inner, self.schedule, self.calls = inner, inner.schedule, []

    @property
    def per_sample_time(self):
        return True

    def __call__(self, x, t, **kw):
        self.calls.append((x.shape[0], t))
        return self.inner(x, t, **kw)


def guided_mixture(n=6, interval=None, scale=4.0):
    problem = GaussianMixture.random(k=6, dim=3, seed=1, classes=3)
    schedule = dp.DiscreteVP.linear()
    labels = torch.arange(n) % 3
    inner = Calls(PerSampleTime(problem.denoiser(schedule)))
    den = dp.ClassifierFreeGuidance(inner, scale, cond={"y": labels}, uncond={"y": torch.full_like(labels, -1)},
                                    interval=interval)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return problem, schedule, labels, inner, den, x


# ------------------------------------------------------------------------------------------- interval guidance
def test_interval_covering_everything_is_plain_cfg():
    _, schedule, labels, _, plain, x = guided_mixture()
    _, _, _, _, everywhere, _ = guided_mixture(interval=(0.0, math.inf))
    for t in (schedule.t_min, 0.3, schedule.t_max):
        a, b = plain(x, t), everywhere(x, t)
        assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)
    sol_a = dp.sample(plain, x, "dpmsolver++", steps=8, progress=False)
    sol_b = dp.sample(everywhere, x, "dpmsolver++", steps=8, progress=False)
    assert torch.equal(sol_a.x, sol_b.x) and sol_a.nfe == sol_b.nfe == 8


def test_interval_guidance_is_the_conditional_model_outside_and_guided_inside():
    problem, schedule, labels, inner, den, x = guided_mixture(interval=(0.5, 2.0))
    _, _, _, _, plain, _ = guided_mixture()
    rho = lambda t: math.exp(-schedule.log_snr(t))  # noqa: E731
    t_in = float(schedule.t_from_log_snr(-math.log(1.0)))      # rho = 1: inside
    t_lo = float(schedule.t_from_log_snr(-math.log(0.2)))      # rho = 0.2: below
    t_hi = float(schedule.t_from_log_snr(-math.log(5.0)))      # rho = 5: above
    assert rho(t_lo) < 0.5 < rho(t_in) <= 2.0 < rho(t_hi)
    cond = problem.denoiser(schedule)
    for t in (t_lo, t_hi):
        inner.calls.clear()
        out, ref = den(x, t), cond(x, t, y=labels)
        assert torch.equal(out.x0, ref.x0) and torch.equal(out.eps, ref.eps)
        assert inner.calls == [(x.shape[0], t)]                   # only the conditional half ran
    inner.calls.clear()
    out, ref = den(x, t_in), plain(x, t_in)
    assert torch.equal(out.x0, ref.x0) and inner.calls == [(2 * x.shape[0], t_in)]
    # per-sample times: each sample guided or not by its own noise level
    ts = np.array([t_lo, t_in, t_hi, t_in, t_lo, t_hi])
    out = den(x, ts)
    for k, t in enumerate(ts):
        ref = den(x, t_in) if t == t_in else cond(x, float(t), y=labels)
        torch.testing.assert_close(out.x0[k], ref.x0[k], rtol=1e-12, atol=1e-12)
    # the paper's interval is half open: (sigma_lo, sigma_hi]
    _, _, _, _, edges, _ = guided_mixture(interval=(rho(t_lo), rho(t_in)))
    assert edges.guided_at(t_in) and not edges.guided_at(t_lo)
    assert list(edges.guided_at(np.array([t_lo, t_in, t_hi]))) == [False, True, False]


def test_interval_guidance_in_sampling_and_zoo():
    _, _, _, inner, den, x = guided_mixture(interval=(0.3, 3.0))
    sol = dp.sample(den, x, "dpmsolver++", steps=10, progress=False)
    sizes = {size for size, _ in inner.calls}
    assert sol.nfe == 10 and sizes == {x.shape[0], 2 * x.shape[0]}   # guided and plain steps both happened
    from dpmsolve import zoo

    model = zoo.load("digits")
    guided = zoo.guided(model, torch.arange(3), 5.0, interval=(0.2, 4.0))
    assert guided.interval == (0.2, 4.0) and "interval" in repr(guided)
    assert zoo.guided(model, torch.arange(3), 5.0).interval is None


@pytest.mark.parametrize("interval,error", [((1.0, 0.5), ValueError), ((-1.0, 2.0), ValueError),
                                            ((0.1, float("nan")), ValueError), ((0.1,), TypeError),
                                            ("0.1,2", TypeError), ((0.1, "2"), TypeError)])
def test_bad_interval_is_refused(interval, error):
    _, schedule, labels, _, _, _ = guided_mixture()
    with pytest.raises(error, match="interval"):
        dp.ClassifierFreeGuidance(GaussianMixture.random(k=2, dim=2, classes=2).denoiser(schedule), 3.0,
                                  {"y": labels}, {"y": labels}, interval=interval)


# ----------------------------------------------------------------------------------------------------- momentum
def gaussian(n=16):
    data = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.LinearVP()
    x = data.prior_sample(schedule, n, generator=torch.Generator().manual_seed(3))
    return data, schedule, data.denoiser(schedule), x


BASES = [("dpmsolver++", {"order": 2}), ("dpmsolver++", {"order": 3, "solver_type": "taylor"}),
         ("dpmsolver", {"order": 3, "method": "singlestep"}), ("plms", {}), ("pndm", {}), ("deis", {"order": 3}),
         ("ddim", {})]


@pytest.mark.parametrize("name,options", BASES, ids=lambda v: str(v))
def test_momentum_beta_one_is_the_base_solver_bit_for_bit(name, options):
    _, _, den, x = gaussian()
    base = dp.get_solver(name, **options)
    for steps, t_end in ((6, None), (9, 0.0)):
        ref = dp.sample(den, x, base, steps=steps, t_end=t_end, progress=False)
        out = dp.sample(den, x, "momentum", base=name, beta=1.0, steps=steps, t_end=t_end, progress=False, **options)
        assert torch.equal(ref.x, out.x) and ref.nfe == out.nfe
    assert HeavyBall(base, beta=1.0).order == base.order and HeavyBall(base, beta=0.9).order == 1


@pytest.mark.parametrize("name,options", BASES[:4], ids=lambda v: str(v))
def test_momentum_converges_with_order_one(name, options):
    data, schedule, den, x = gaussian(64)
    solver = dp.get_solver("momentum", base=name, beta=0.8, **options)
    steps = [40, 80, 160]
    errors = []
    for n in steps:
        ts = dp.make_grid(schedule, n, "logSNR")
        exact = data.exact_solution(schedule, x, ts[0], ts[-1])
        errors.append(float((dp.sample(den, x, solver, grid=ts, progress=False).x - exact).pow(2).mean().sqrt()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 0.8 < slope < 1.3, (errors, slope)
    assert errors[-1] < 0.05


def test_momentum_changes_the_sample_and_keeps_the_state():
    _, schedule, den, x = gaussian()
    solver = HeavyBall("dpmsolver++", beta=0.7, order=2)
    plain = dp.sample(den, x, "dpmsolver++", order=2, steps=8, progress=False).x
    out = dp.sample(den, x, solver, steps=8, progress=False)
    assert out.nfe == 8 and not torch.allclose(out.x, plain)
    state = solver.init(schedule, dp.make_grid(schedule, 8, "logSNR"), x)
    for _ in range(3):
        xe, t = solver.ask(state)
        before_x, before_v = state.base.x.clone(), state.velocity
        new = solver.tell(state, den(xe, t))
        assert torch.equal(state.base.x, before_x) and state.velocity is before_v and new is not state
        state = new


def test_momentum_refuses_what_it_cannot_wrap():
    with pytest.raises(ValueError, match="deterministic"):
        HeavyBall("sde-dpmsolver++")
    with pytest.raises(ValueError, match="fixed-grid"):
        HeavyBall("dpmsolver++", method="adaptive", order=3)
    with pytest.raises(ValueError, match="beta"):
        HeavyBall("plms", beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        dp.get_solver("momentum", beta=1.5)
    with pytest.raises(TypeError, match="beta"):
        HeavyBall("plms", beta="0.8")
    with pytest.raises(ValueError, match="options"):
        HeavyBall(dp.get_solver("plms"), order=2)
    with pytest.raises(TypeError, match="base"):
        HeavyBall(3)
    _, _, den, x = gaussian()
    with pytest.raises(ValueError, match="corrector"):
        dp.sample(den, x, HeavyBall("unipc"), steps=5, progress=False)


# ------------------------------------------------------------------------------------------------ time shift
def kde():
    data = GaussianMixture.random(k=8, dim=16, seed=2, spread=0.6)
    schedule = dp.DiscreteVP.linear()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    return data, schedule, PerSampleTime(data.denoiser(schedule)), x


@pytest.mark.parametrize("t_end", [None, 0.0])
def test_time_shift_with_window_zero_or_full_cutoff_is_ddim(t_end):
    _, _, den, x = kde()
    for grid in ("time_uniform", "logSNR"):
        ref = dp.sample(den, x, "ddim", steps=7, grid=grid, t_end=t_end, progress=False).x
        for solver in (TimeShift(window=0.0), TimeShift(window=0.05, cutoff=1.0)):
            out = dp.sample(den, x, solver, steps=7, grid=grid, t_end=t_end, progress=False)
            assert torch.equal(out.x, ref) and out.nfe == 7


def test_time_shift_follows_the_papers_rule():
    data, schedule, den, x = kde()
    solver = TimeShift(window=0.04, cutoff=0.25)
    ts = dp.make_grid(schedule, 10, "time_uniform", t_end=0.0)
    state, shifted = solver.init(schedule, ts, x), 0
    span = schedule.t_max - schedule.t_min
    while not solver.done(state):
        xe, t = solver.ask(state)
        grid_t = state.base.nodes[state.base.i].t
        if (grid_t - schedule.t_min) / span > 0.25:
            assert isinstance(t, np.ndarray) and t.shape == (x.shape[0],)
            assert np.all(np.abs(t - grid_t) <= 0.02 * span + 1e-12)
            var = xe.reshape(x.shape[0], -1).var(dim=1).numpy()         # VP: match sigma(t_s)^2 = Var(x)
            sig2 = schedule.sigma(t) ** 2
            lo, hi = max(grid_t - 0.02 * span, schedule.t_min), min(grid_t + 0.02 * span, schedule.t_max)
            inside = (t > lo + 1e-9) & (t < hi - 1e-9)
            np.testing.assert_allclose(sig2[inside], var[inside], rtol=1e-8)
            # clipped: the window's end nearest to the match (sigma^2 increases with t)
            edge = ~inside
            assert np.all((t == hi)[edge & (var > sig2)]) and np.all((t == lo)[edge & (var < sig2)])
            shifted += 1
            pred = den(xe, t)
            a, s = schedule.alpha_sigma(float(state.base.nodes[state.base.i + 1].t))
            expected = a * pred.x0 + s * pred.eps                        # DDIM from t_s to the next grid time
            state = solver.tell(state, pred)
            torch.testing.assert_close(state.base.x, expected, rtol=1e-12, atol=1e-12)
        else:
            assert t == grid_t
            state = solver.tell(state, den(xe, t))
    assert shifted == 8                                                  # t = 1.0, 0.9, ..., 0.3
    sol = dp.sample(den, x, solver, grid=ts, progress=False)
    assert sol.nfe == 10 and torch.isfinite(sol.x).all()


def test_time_shift_on_a_network_with_guidance():
    from dpmsolve import zoo

    model = zoo.load("digits")
    labels = torch.arange(4)
    den = zoo.guided(model, labels, 3.0)
    x = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(0))
    out = dp.sample(den, x, TimeShift(window=0.03, cutoff=0.2), steps=4, grid="time_uniform", progress=False)
    ref = dp.sample(den, x, "ddim", steps=4, grid="time_uniform", progress=False)
    assert out.nfe == 4 and out.x.shape == x.shape and torch.isfinite(out.x).all()
    assert not torch.equal(out.x, ref.x)


def test_time_shift_and_per_sample_time_errors():
    with pytest.raises(ValueError, match="window"):
        TimeShift(window=-0.1)
    with pytest.raises(ValueError, match="cutoff"):
        TimeShift(cutoff=1.5)
    data, schedule, den, x = kde()
    with pytest.raises(ValueError, match="one time per sample"):
        den(x, np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="at least 2 coordinates"):
        dp.sample(den, x[:, :1], TimeShift(window=0.05, cutoff=0.0), steps=3, progress=False)
    plain = data.denoiser(schedule)
    out = den(x, 0.4)
    ref = plain(x, 0.4)
    assert torch.equal(out.x0, ref.x0)
