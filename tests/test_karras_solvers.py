"""Euler, Heun and DPM-2 (solvers/karras.py): k-diffusion parity, Euler == DDIM, convergence order, NFE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpmsolve as dp
from counting import Counting
from dpmsolve.lab import GaussianData

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NAMES = {"euler": "sample_euler", "heun": "sample_heun", "dpm2": "sample_dpm_2"}
ORDERS = {"euler": 1, "heun": 2, "dpm2": 2}


def _k_diffusion():
    from dpmsolve.lab.peers import _k_diffusion_sampling

    try:
        return _k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not installed ({exc}); scripts/setup.sh installs it with --no-deps")


def _data() -> GaussianData:
    return GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])




@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("name", list(NAMES))
def test_equals_k_diffusion(name, to_zero):
    kd = _k_diffusion()
    data = _data()

    def model(x, sigma, **extra_args):
        return data.posterior_mean(x, float(sigma[0]))

    sigmas = kd.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX).double()
    sigmas = sigmas if to_zero else sigmas[:-1]
    x = torch.randn((6, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_MAX
    theirs = getattr(kd, NAMES[name])(model, x, sigmas, disable=True)
    ts = sigmas.numpy()
    schedule = dp.EDM(sigma_min=float(ts[ts > 0].min()), sigma_max=float(ts[0]))
    counting = Counting(dp.wrap_model(model, schedule, prediction="x0", time_input="continuous"))
    sol = dp.sample(counting, x, name, grid=ts, progress=False)
    diff = (sol.x - theirs).abs().max().item()
    print(f"{name} to_zero={to_zero}: max |ours - k-diffusion| = {diff:.3g}")
    assert diff < 1e-11 * float(x.abs().max())
    steps = len(ts) - 1
    assert counting.calls == sol.nfe == dp.get_solver(name).expected_nfe(steps, ends_at_zero=to_zero)
    assert sol.stats["steps"] == steps and len(sol.ts) == steps + 1


@pytest.mark.parametrize("schedule", [dp.LinearVP, dp.DiscreteVP.linear, dp.RectifiedFlow])
def test_euler_equals_ddim(schedule):
    schedule, data = schedule(), _data()
    x = data.prior_sample(schedule, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = data.denoiser(schedule)
    for grid in ("logSNR", "karras"):
        a = dp.sample(den, x, "euler", steps=12, grid=grid, progress=False).x
        b = dp.sample(den, x, "ddim", steps=12, grid=grid, progress=False).x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", [dp.LinearVP, dp.EDM, dp.RectifiedFlow])
@pytest.mark.parametrize("name", list(NAMES))
def test_convergence_order(name, schedule):
    schedule, data = schedule(), _data()
    t0, t1 = float(schedule.t_from_log_snr(-1.0)), float(schedule.t_from_log_snr(2.0))
    x = data.prior_sample(schedule, 8, t=t0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = data.exact_solution(schedule, x, t0, t1)
    solver, den, steps, errors = dp.get_solver(name), data.denoiser(schedule), (24, 48, 96, 192), []
    for n in steps:
        sol = dp.sample(den, x, solver, steps=n, t_start=t0, t_end=t1, progress=False)
        errors.append((sol.x - truth).abs().max().item())
    slope = np.polyfit(np.log(1.0 / np.array(steps, dtype=np.float64)), np.log(errors), 1)[0]
    print(f"{name} {type(schedule).__name__}: slope {slope:.3f}, errors {errors}")
    assert np.all(np.diff(errors) < 0) and min(errors) > 1e-12
    assert abs(slope - ORDERS[name]) < 0.3 and solver.order == ORDERS[name]


@pytest.mark.parametrize("name", list(NAMES))
def test_nfe_counted(name):
    schedule, data = dp.LinearVP(), _data()
    x = data.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    solver = dp.get_solver(name)
    per_step = 1 if name == "euler" else 2
    for steps in (1, 2, 5):
        for t_end in (None, 0.0):
            counting = Counting(data.denoiser(schedule))
            sol = dp.sample(counting, x, solver, steps=steps, t_end=t_end, progress=False)
            expected = per_step * steps - (per_step - 1) * (t_end == 0.0)
            assert counting.calls == sol.nfe == expected == solver.expected_nfe(steps, ends_at_zero=t_end == 0.0)
            assert sol.stats["steps"] == steps and torch.isfinite(sol.x).all()


@pytest.mark.parametrize("solver", ["heun", "dpm2"])
def test_two_evaluation_solvers_drive_a_diffusers_pipeline_one_timestep_per_evaluation(solver):
    """A pipeline calls the model once per timestep: the scheduler lists every evaluation, the ones between grid
    times too (as diffusers' HeunDiscreteScheduler does; parity with it: tests/test_diffusers_configs.py)."""
    pytest.importorskip("diffusers")
    from dpmsolve.integrations.diffusers import DPMSolveScheduler

    s = DPMSolveScheduler(beta_schedule="linear", solver=solver)
    s.set_timesteps(6)
    assert len(s.timesteps) == 11 and s.num_inference_steps == 6 and s.order == 2
