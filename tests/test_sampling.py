"""The sampling loop (``dp.sample`` / ``dp.invert``): callbacks, intermediates, progress bar, the NaN/Inf
guard, denoise_to_zero, adaptive step size control, explicit grids and inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpmsolve as dp

FIXED = [
    ("ddim", {}),
    ("ddim", {"eta": 0.5}),
    ("dpmsolver", {"order": 2}),
    ("dpmsolver++", {"order": 3}),
    ("dpmsolver++", {"method": "singlestep", "order": 3}),
    ("dpmsolver", {"method": "singlestep", "order": 2}),
    ("sde-dpmsolver++", {"order": 2}),
]


def _id(config) -> str:
    name, options = config
    return name + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.fixture
def setup(gaussian):
    schedule = dp.LinearVP()
    x = gaussian.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(0))
    return gaussian, schedule, gaussian.denoiser(schedule), x


class NaNAt(dp.Denoiser):
    """Returns ``value`` (NaN or Inf) in both predictions at the ``bad``-th call (1-based)."""

    def __init__(self, inner, bad, value=float("nan")):
        self.inner, self.schedule, self.bad, self.value, self.calls = inner, inner.schedule, bad, value, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        pred = self.inner(x, t, **kw)
        if self.calls == self.bad:
            return dp.Prediction(torch.full_like(pred.x0, self.value), torch.full_like(pred.eps, self.value))
        return pred


# ------------------------------------------------------------------------------ callbacks and intermediates
@pytest.mark.parametrize("config", FIXED, ids=_id)
def test_callback_once_per_step_at_the_grid_times(setup, config):
    _, schedule, den, x = setup
    name, options = config
    steps = 8
    grid = dp.get_solver(name, **options).grid(schedule, steps)  # singlestep: the reference's blocks
    infos: list[dp.StepInfo] = []
    sol = dp.sample(den, x, name, steps=steps, seed=0, callback=infos.append, progress=False,
                    return_intermediates=True, **options)
    assert len(infos) == steps
    assert [i.step for i in infos] == list(range(1, steps + 1))
    np.testing.assert_allclose([i.t for i in infos], grid[1:], rtol=1e-12, atol=0)
    assert [i.nfe for i in infos] == list(range(1, steps + 1))  # one evaluation per grid step
    for k, info in enumerate(infos, start=1):
        assert isinstance(info, dp.StepInfo)
        assert info.x.shape == x.shape and info.x0.shape == x.shape
        torch.testing.assert_close(info.x, sol.trajectory[k], rtol=0, atol=0)
        torch.testing.assert_close(info.x0, sol.x0_previews[k - 1], rtol=0, atol=0)
        # the preview is the x0 prediction of the step's first evaluation: at the previous grid time
        torch.testing.assert_close(info.x0, den(sol.trajectory[k - 1], grid[k - 1]).x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(infos[-1].x, sol.x, rtol=0, atol=0)


def test_x0_previews_approach_the_sample(setup):
    _, _, den, x = setup
    infos = []
    sol = dp.sample(den, x, "dpmsolver++", steps=10, callback=infos.append, progress=False)
    errors = [(i.x0 - sol.x).abs().max().item() for i in infos]
    assert errors[-1] < 0.1 * errors[0]


@pytest.mark.parametrize("config", FIXED, ids=_id)
def test_return_intermediates(setup, config):
    _, schedule, den, x = setup
    name, options = config
    steps = 6
    grid = dp.get_solver(name, **options).grid(schedule, steps)  # singlestep: the reference's blocks
    sol = dp.sample(den, x, name, steps=steps, seed=0, return_intermediates=True, progress=False, **options)
    assert len(sol.trajectory) == steps + 1
    assert len(sol.x0_previews) == steps
    np.testing.assert_allclose(sol.ts, grid, rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.trajectory[0], x, rtol=0, atol=0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x, rtol=0, atol=0)
    assert all(t.shape == x.shape for t in sol.trajectory + sol.x0_previews)

    plain = dp.sample(den, x, name, steps=steps, seed=0, progress=False, **options)
    assert plain.trajectory is None and plain.x0_previews is None
    np.testing.assert_allclose(plain.ts, grid, rtol=1e-12, atol=0)
    torch.testing.assert_close(plain.x, sol.x, rtol=0, atol=0)  # keeping intermediates changes nothing


def test_adaptive_callbacks_and_intermediates(setup):
    _, schedule, den, x = setup
    infos = []
    sol = dp.sample(den, x, "dpmsolver++", method="adaptive", order=3, callback=infos.append,
                    return_intermediates=True, progress=False)
    accepted = sol.stats["accepted"]
    assert len(infos) == accepted == len(sol.trajectory) - 1 == len(sol.ts) - 1 == len(sol.x0_previews)
    assert [i.step for i in infos] == list(range(1, accepted + 1))
    assert sol.ts[0] == schedule.t_max and sol.ts[-1] == pytest.approx(schedule.t_min, rel=1e-12)
    assert np.all(np.diff(sol.ts) < 0)
    np.testing.assert_allclose([i.t for i in infos], sol.ts[1:], rtol=0, atol=0)
    assert [i.nfe for i in infos][-1] == sol.nfe
    torch.testing.assert_close(infos[-1].x, sol.x, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- progress
def test_progress_bar_on_and_off(setup, capsys):
    _, _, den, x = setup
    dp.sample(den, x, "dpmsolver++", steps=5, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""

    dp.sample(den, x, "dpmsolver++", steps=5, progress=True)
    out = capsys.readouterr()
    # tqdm (leave=False) draws "0/5" and clears the line at the end; the total is the declared NFE
    assert "dpmsolve" in out.err and "/5" in out.err and "nfe" in out.err
    assert out.out == ""

    # None: tqdm decides; under pytest's capture there is no terminal, so nothing is shown.
    dp.sample(den, x, "dpmsolver++", steps=5, progress=None)
    assert capsys.readouterr().err == ""


def test_progress_bar_with_adaptive_solver_and_invert(setup, capsys):
    _, _, den, x = setup
    dp.sample(den, x, "dpmsolver++", method="adaptive", progress=True)
    assert "dpmsolve" in capsys.readouterr().err
    dp.invert(den, x, "dpmsolver++", steps=4, progress=True)
    assert "/4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- NaN/Inf guard
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("bad", [1, 3, 5])
def test_non_finite_model_output_raises_naming_step_and_t(setup, value, bad):
    _, schedule, den, x = setup
    grid = dp.make_grid(schedule, 5)
    model = NaNAt(den, bad, value)
    with pytest.raises(dp.NonFiniteError) as err:
        dp.sample(model, x, "dpmsolver++", steps=5, progress=False)
    message = str(err.value)
    assert f"step {bad}" in message
    assert f"t={grid[bad - 1]:.6g}" in message
    assert "check_finite=False" in message  # says what to do
    assert model.calls == bad  # stopped at once
    assert isinstance(err.value, FloatingPointError)


def test_non_finite_guard_covers_denoise_to_zero(setup):
    _, schedule, den, x = setup
    with pytest.raises(dp.NonFiniteError, match=f"t={schedule.t_min:.6g}"):
        dp.sample(NaNAt(den, 5), x, "dpmsolver++", steps=4, denoise_to_zero=True, progress=False)


def test_check_finite_false_lets_non_finite_values_through(setup):
    _, _, den, x = setup
    model = NaNAt(den, 3)
    sol = dp.sample(model, x, "dpmsolver++", steps=5, check_finite=False, progress=False)
    assert model.calls == sol.nfe == 5
    assert torch.isnan(sol.x).any()


def test_non_finite_guard_in_adaptive_solver(setup):
    _, _, den, x = setup
    with pytest.raises(dp.NonFiniteError, match="step 1"):
        dp.sample(NaNAt(den, 2), x, "dpmsolver++", method="adaptive", progress=False)


# ------------------------------------------------------------------------------------------ denoise_to_zero
@pytest.mark.parametrize("config", [("dpmsolver++", {"order": 2}), ("dpmsolver", {"order": 3}),
                                    ("ddim", {}), ("dpmsolver++", {"method": "adaptive"})], ids=_id)
def test_denoise_to_zero_returns_the_last_x0_prediction(setup, config):
    _, schedule, den, x = setup
    name, options = config
    steps = None if options.get("method") == "adaptive" else 6  # the adaptive solver takes no steps
    plain = dp.sample(den, x, name, steps=steps, progress=False, **options)
    final = dp.sample(den, x, name, steps=steps, denoise_to_zero=True, progress=False, **options)
    assert final.nfe == plain.nfe + 1
    torch.testing.assert_close(final.x, den(plain.x, schedule.t_min).x0, rtol=0, atol=0)
    assert not torch.allclose(final.x, plain.x)
    np.testing.assert_array_equal(final.ts, plain.ts)  # no extra step is reported


# --------------------------------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("predict", ["dpmsolver++", "dpmsolver"])
def test_adaptive_reaches_the_tolerance(setup, order, predict):
    gaussian, schedule, den, x = setup
    exact = gaussian.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    errors, nfes = [], []
    for tol in (1e-2, 1e-3, 1e-4):
        sol = dp.sample(den, x, predict, method="adaptive", order=order, rtol=tol, atol=tol, progress=False)
        assert sol.nfe > 0 and sol.stats["accepted"] >= 1 and sol.stats["rejected"] >= 0
        assert sol.stats["steps"] == sol.stats["accepted"]
        error = (sol.x - exact).abs().max().item()
        assert error < 10 * tol, (tol, error)
        errors.append(error)
        nfes.append(sol.nfe)
    assert errors[0] > errors[1] > errors[2], errors
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_adaptive_rejects_and_recovers_from_a_too_large_first_step(setup):
    gaussian, schedule, den, x = setup
    sol = dp.sample(den, x, "dpmsolver++", method="adaptive", order=2, h_init=5.0, rtol=1e-3, atol=1e-3,
                    progress=False)
    assert sol.stats["rejected"] >= 1
    exact = gaussian.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    assert (sol.x - exact).abs().max().item() < 3e-2


# ------------------------------------------------------------------------------------------- explicit grids
@pytest.mark.parametrize("config", [("dpmsolver++", {"order": 2}), ("dpmsolver", {"method": "singlestep"}),
                                    ("ddim", {})], ids=_id)
def test_explicit_grid_arrays(setup, config):
    _, schedule, den, x = setup
    name, options = config
    named = dp.sample(den, x, name, steps=7, grid="time_uniform", progress=False, **options)
    grid = dp.make_grid(schedule, 7, "time_uniform")
    for explicit in (grid, grid.tolist(), torch.from_numpy(grid)):
        sol = dp.sample(den, x, name, grid=explicit, progress=False, **options)
        torch.testing.assert_close(sol.x, named.x, rtol=0, atol=0)
        assert sol.nfe == 7
        np.testing.assert_allclose(sol.ts, grid, rtol=0, atol=0)
    # steps may be repeated when it agrees
    sol = dp.sample(den, x, name, grid=grid, steps=7, progress=False, **options)
    torch.testing.assert_close(sol.x, named.x, rtol=0, atol=0)


def test_explicit_partial_grid(setup):
    gaussian, schedule, den, x = setup
    lams = np.linspace(schedule.log_snr(0.9), schedule.log_snr(0.05), 13)
    grid = np.array([schedule.t_from_log_snr(lam) for lam in lams])  # built by hand, not by make_grid
    grid[0], grid[-1] = 0.9, 0.05
    x_start = gaussian.prior_sample(schedule, 3, t=0.9, generator=torch.Generator().manual_seed(1))
    sol = dp.sample(den, x_start, "dpmsolver++", grid=grid, return_intermediates=True, progress=False)
    np.testing.assert_allclose(sol.ts, grid, rtol=0, atol=0)
    exact = gaussian.exact_solution(schedule, x_start, 0.9, 0.05)
    assert (sol.x - exact).abs().max().item() < 3e-2
    named = dp.sample(den, x_start, "dpmsolver++", steps=4, grid="time_uniform", t_start=0.9, t_end=0.05,
                      progress=False)
    explicit = dp.sample(den, x_start, "dpmsolver++", grid=np.linspace(0.9, 0.05, 5), progress=False)
    torch.testing.assert_close(named.x, explicit.x, rtol=1e-14, atol=1e-14)


# -------------------------------------------------------------------------------------------------- invert
@pytest.mark.parametrize("order", [2, 3])
def test_invert_then_sample_reconstructs(schedule, gaussian, order):
    den = gaussian.denoiser(schedule)
    x0 = gaussian.data_sample(3, torch.Generator().manual_seed(1))
    errors = []
    for steps in (20, 50):
        inv = dp.invert(den, x0, "dpmsolver++", order=order, steps=steps, progress=False)
        assert inv.nfe == steps
        np.testing.assert_allclose(inv.ts, dp.make_grid(schedule, steps)[::-1], rtol=1e-12, atol=0)
        back = dp.sample(den, inv.x, "dpmsolver++", order=order, steps=steps, progress=False)
        errors.append((back.x - x0).abs().max().item())
    assert errors[1] < errors[0]
    assert errors[1] < 5e-4, errors


def test_invert_reaches_the_exact_noise(gaussian):
    schedule = dp.LinearVP()
    den = gaussian.denoiser(schedule)
    x0 = gaussian.data_sample(3, torch.Generator().manual_seed(1))
    exact = gaussian.exact_solution(schedule, x0, schedule.t_min, schedule.t_max)
    errors = [(dp.invert(den, x0, "dpmsolver++", steps=n, progress=False).x - exact).abs().max().item()
              for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_invert_with_adaptive_solver_and_callbacks(gaussian):
    schedule = dp.LinearVP()
    den = gaussian.denoiser(schedule)
    x0 = gaussian.data_sample(2, torch.Generator().manual_seed(1))
    infos = []
    inv = dp.invert(den, x0, "dpmsolver++", method="adaptive", rtol=1e-4, atol=1e-4, callback=infos.append,
                    progress=False)
    assert np.all(np.diff(inv.ts) > 0) and inv.ts[-1] == pytest.approx(schedule.t_max)
    assert len(infos) == inv.stats["accepted"]
    back = dp.sample(den, inv.x, "dpmsolver++", method="adaptive", rtol=1e-4, atol=1e-4, progress=False)
    assert (back.x - x0).abs().max().item() < 1e-2


def test_model_kwargs_reach_the_model(setup):
    _, schedule, _, x = setup
    seen = []

    def net(x, t, scale):
        seen.append(scale)
        return torch.zeros_like(x) + scale

    den = dp.wrap_model(net, schedule, prediction="eps")
    dp.sample(den, x, "ddim", steps=3, model_kwargs={"scale": 0.5}, progress=False)
    assert seen == [0.5] * 3


def test_solution_fields(setup):
    _, _, den, x = setup
    solver = dp.get_solver("dpmsolver++", order=2)
    sol = dp.sample(den, x, solver, steps=4, progress=False)
    assert isinstance(sol, dp.Solution)
    assert sol.solver is solver
    assert sol.x.shape == x.shape and sol.x.dtype == x.dtype
    assert sol.stats["steps"] == 4
    assert isinstance(sol.ts, np.ndarray) and sol.ts.dtype == np.float64
