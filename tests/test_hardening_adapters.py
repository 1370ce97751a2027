"""Hardening of the diffusers and k-diffusion adapters: bad input is refused with a message naming the argument,
the bad value and the fix; diffusers' config options are read where dpmsolve has the equivalent (checked against
diffusers' own scheduler as the oracle); presets run their own solver; DPM-Solver-v3 statistics travel with a
saved scheduler. Every test pins behaviour that was wrong before (noted in its docstring)."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import SHAPE, hand_loop, start_noise, toy_net  # noqa: E402
import dpmsolve as dp  # noqa: E402
from dpmsolve.integrations import kdiffusion as K  # noqa: E402
from dpmsolve.integrations.diffusers import (  # noqa: E402
    DDIMSolveScheduler,
    DPMSolverPPMultistepScheduler,
    DPMSolverSinglestepScheduler,
    DPMSolveScheduler,
    UniPCScheduler,
)
from dpmsolve.lab import GaussianMixture  # noqa: E402
from dpmsolve.sampling import NonFiniteError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PRESETS = [DDIMSolveScheduler, DPMSolverPPMultistepScheduler, DPMSolverSinglestepScheduler, UniPCScheduler]


def _scheduler(cls=DPMSolveScheduler, steps=5, **config):
    s = cls(**{**SD, **config})
    s.set_timesteps(steps)
    return s


# ------------------------------------------------------------------------------------------ A1 step count

@pytest.mark.parametrize("cls", [DPMSolveScheduler, *PRESETS])
@pytest.mark.parametrize("bad, error", [(2.5, ValueError), (3.0, ValueError), (0, ValueError), (-2, ValueError),
                                        (True, TypeError), ("4", TypeError)])
def test_set_timesteps_refuses_a_count_that_is_not_a_positive_integer(cls, bad, error):
    """Before: set_timesteps(2.5) ran 2 steps silently (int() of the count). A bool or a string: TypeError."""
    s = cls(**SD)
    with pytest.raises(error, match=r"num_inference_steps must be an integer >= 1, got .*pass an int"):
        s.set_timesteps(bad)
    s.set_timesteps(np.int64(3))  # numpy integers are counts
    assert len(s.timesteps) == 3


def test_set_timesteps_count_is_checked_with_a_plan_too(tmp_path):
    s = DPMSolveScheduler(**SD)
    plan = dp.Plan.multistep(dp.make_grid(s.schedule, 4, "logSNR"), schedule=s.schedule.fingerprint(),
                             data_shape=SHAPE[1:])
    s = DPMSolveScheduler(**SD, plan=str(plan.save(tmp_path / "p.plan.json")))
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer >= 1, got 4.5"):
        s.set_timesteps(4.5)


# ------------------------------------------------------------------------------------------ A2 output shape

def test_step_refuses_a_model_output_of_another_shape():
    """Before: a broadcastable output (one sample, or one value per channel) was broadcast into the update."""
    for shape in [(1, *SHAPE[1:]), (SHAPE[0], SHAPE[1], 1, 1), (SHAPE[0], SHAPE[1] + 1, *SHAPE[2:])]:
        s = _scheduler()
        x, t = start_noise(), s.timesteps[0]
        with pytest.raises(ValueError) as info:
            s.step(torch.zeros(shape, dtype=x.dtype), t, x)
        assert f"model_output of shape {shape}" in str(info.value)
        assert f"sample of shape {tuple(SHAPE)}" in str(info.value)
        assert "variance_type" not in str(info.value)


def test_learned_variance_channels_are_dropped_where_the_config_says_so():
    """diffusers' variance_type='learned'/'learned_range': the model output has 2C channels and step keeps the
    first C; the run equals the one given only the prediction. Without variance_type the doubled output is an
    error that names the option."""
    def doubled(x, t):
        return torch.cat([toy_net(x, t), 5.0 + torch.randn_like(x)], dim=1)

    x = start_noise()
    plain = hand_loop(_scheduler(), x.clone())
    for kind in ("learned", "learned_range"):
        assert torch.equal(hand_loop(_scheduler(variance_type=kind), x.clone(), net=doubled), plain)
    s = _scheduler()
    with pytest.raises(ValueError, match=r"twice the sample's channels.*variance_type='learned_range'"):
        s.step(doubled(x, s.timesteps[0]), s.timesteps[0], x)
    # The option comes over from a diffusers config (DeepFloyd IF ships learned_range).
    from diffusers import DDPMScheduler

    assert DPMSolveScheduler.from_config(DDPMScheduler(variance_type="learned_range").config).config.variance_type \
        == "learned_range"
    with pytest.raises(ValueError, match=r"Unknown variance_type 'learnt'; valid: .*'learned_range'"):
        DPMSolveScheduler(variance_type="learnt")


# ------------------------------------------------------------------------------------------ A3 step order

def test_step_refuses_a_repeated_or_skipped_timestep_and_keeps_its_state():
    """Before: step() ignored the timestep after the first call, so calling it twice at one timestep stepped
    twice. Now the refused call changes nothing: the run continued correctly equals the un-faulty run."""
    x = start_noise()
    expected = hand_loop(_scheduler(), x.clone())
    s = _scheduler()
    t0, t1, t2 = s.timesteps[:3]
    x1 = s.step(toy_net(x, t0), t0, x).prev_sample
    with pytest.raises(ValueError) as info:
        s.step(toy_net(x1, t0), t0, x1)
    message = str(info.value)
    assert "timesteps[0] (that step was already taken)" in message and "set_timesteps again" in message
    assert f"timesteps[1] = {float(t1):.6g}" in message
    with pytest.raises(ValueError, match=r"got timestep .* = timesteps\[2\], but the next step .* timesteps\[1\]"):
        s.step(toy_net(x1, t2), t2, x1)
    assert s.step_index == 1
    assert torch.equal(hand_loop(s, x1, timesteps=s.timesteps[1:]), expected)
    with pytest.raises(ValueError, match="All 5 steps have been taken; call set_timesteps again"):
        s.step(toy_net(x1, t0), s.timesteps[-1], x1)


def test_a_timestep_in_another_dtype_is_still_the_next_step():
    """Pipelines may pass the timestep as fp16 / int / a batch: the nearest entry of timesteps identifies it."""
    x = start_noise()
    expected = hand_loop(_scheduler(), x.clone())
    s = _scheduler()
    for i, t in enumerate(s.timesteps):
        given = [t.half(), int(t.round()), t.repeat(SHAPE[0]), float(t), t][i]
        x = s.step(toy_net(x, t), given, x).prev_sample
    assert torch.equal(x, expected)


def test_img2img_start_must_match_the_begin_index():
    s = _scheduler()
    s.set_begin_index(2)
    x = start_noise()
    with pytest.raises(ValueError, match=r"timesteps\[0\].*next step of this run is at timesteps\[2\]"):
        s.step(toy_net(x, s.timesteps[0]), s.timesteps[0], x)


# ------------------------------------------------------------------------------------------ A4 NaN guard

@pytest.mark.parametrize("cls", [DPMSolveScheduler, UniPCScheduler])
def test_step_stops_on_nan_as_dp_sample_does(cls):
    """Before: a NaN model output went into the solver state and came back as a NaN sample. Now step raises
    dpmsolve's NonFiniteError (the guard of dp.sample) naming the step index and timestep."""
    s = _scheduler(cls)
    x = start_noise()
    for k, t in enumerate(s.timesteps):
        out = toy_net(x, t)
        if k == 2:
            out[0, 0, 0, 0] = float("nan") if cls is DPMSolveScheduler else float("inf")
            with pytest.raises(NonFiniteError) as info:
                s.step(out, t, x)
            break
        x = s.step(out, t, x).prev_sample
    message = str(info.value)
    assert "NaN or Inf at step 3" in message and f"step_index 2, timestep {float(s.timesteps[2]):.6g}" in message
    assert "check_finite=False" in message
    assert dp.NonFiniteError is NonFiniteError
    # check_finite=False: the old behaviour, on request.
    s = _scheduler(cls, check_finite=False)
    out = s.step(torch.full(SHAPE, float("nan"), dtype=torch.float64), s.timesteps[0], start_noise()).prev_sample
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------------ A5 add_noise

def test_add_noise_refuses_timesteps_outside_the_schedule():
    """Before: timesteps 1000 or -1 (1000 train steps) were clipped to 999 / 0 silently."""
    s = DDIMSolveScheduler()
    x0, noise = start_noise(1), start_noise(2)
    for bad in (1000, -1, 1e6, float("nan")):
        with pytest.raises(ValueError, match=r"outside the network times \[0, 999\] .*num_train_timesteps=1000"):
            s.add_noise(x0, noise, torch.tensor([bad]))
    ac = s.schedule.alphas_cumprod
    for n in (0, 999):   # both ends are still valid, at their closed form
        want = math.sqrt(ac[n]) * x0 + math.sqrt(1 - ac[n]) * noise
        assert (s.add_noise(x0, noise, torch.tensor([n])) - want).abs().max() <= 1e-12
    f = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=r"\[1, 999\].*N t for a flow model"):
        f.scale_noise(x0, torch.tensor([1000.0]), noise)


# ------------------------------------------------------------------------------------------ A6 config values

BAD_CONFIGS = [
    ({"solver": "unipcc"}, "Unknown solver 'unipcc'; valid names are: .*unipc"),
    ({"algorithm_type": "dpmsolver+++"}, r"Unknown algorithm_type 'dpmsolver\+\+\+'; valid: 'dpmsolver\+\+'"),
    ({"beta_schedule": "cosine"}, "Unknown beta_schedule 'cosine'; valid: 'linear'"),
    ({"beta_schedule": "cosine", "trained_betas": [0.01] * 1000}, "Unknown beta_schedule 'cosine'"),
    ({"trained_betas": [0.01] * 10}, r"trained_betas must hold num_train_timesteps=1000 values"),
    ({"grid": "karas"}, "Unknown grid 'karas'; valid: .*'karras'"),
    ({"grid": "karras", "grid_options": {"r": 7}}, "Grid 'karras' has no option.* r; its options are: rho"),
    ({"grid_options": {"rho": 7}}, "Grid 'logSNR' has no option"),
    ({"flow_shift": -1.0}, r"flow_shift must be a finite number > 0, got -1.0"),
    ({"beta_start": float("nan")}, "beta_start must be a finite number > 0 and < 1, got nan"),
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer >= 2, got 0"),
    ({"prediction_type": "eps"}, "Unknown prediction_type 'eps'; valid: 'epsilon'"),
    ({"final_sigma": "sigma_min"}, "final_sigma must be 'zero'.*final_sigma='min'"),
    ({"thresholding": "yes"}, "thresholding must be True or False, got 'yes'"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio must be a finite number > 0 and <= 1"),
    ({"solver_type": "mid"}, "Unknown solver_type 'mid'; valid: 'midpoint', 'heun'"),
    ({"timestep_spacing": "uniform"}, "Unknown timestep_spacing 'uniform'; valid: 'linspace'"),
    ({"final_sigmas_type": "max"}, "Unknown final_sigmas_type 'max'; valid: 'zero', 'sigma_min'"),
    ({"solver_order": 2.5}, "solver_order must be an integer >= 1, got 2.5"),
    ({"solver_options": {"order": 2, "callback": print}}, r"solver_options\['callback'\] is a builtin_function"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS, ids=[next(iter(c)) + f"-{i}" for i, (c, _) in
                                                             enumerate(BAD_CONFIGS)])
def test_from_config_refuses_unknown_values(config, message):
    """Before: an unknown algorithm_type, a beta_schedule next to trained_betas, an unknown grid (until the first
    set_timesteps), grid options, a negative flow_shift ... were kept or ignored silently."""
    with pytest.raises(ValueError, match=message):
        DPMSolveScheduler.from_config(config)


# ------------------------------------------------------------------------------------------ A7 explicit grids

@pytest.mark.parametrize("kwargs, name", [({"timesteps": [999, float("nan"), 100]}, "timesteps"),
                                          ({"sigmas": [10.0, 1.0, float("nan")]}, "sigmas"),
                                          ({"sigmas": torch.tensor([float("inf"), 1.0, 0.1])}, "sigmas"),
                                          ({"sigmas": [10.0, -1.0]}, "negative sigmas")])
def test_set_timesteps_refuses_nan_in_explicit_grids(kwargs, name):
    """Before: a NaN sigma mapped to t = 0 (a trailing NaN became the end of the grid, silently)."""
    s = DPMSolveScheduler(**SD)
    with pytest.raises(ValueError, match=f"set_timesteps got {name}"):
        s.set_timesteps(**kwargs)


# ------------------------------------------------------------------------------------------ B k-diffusion grids

def _k_model(x, sigma, **extra):
    return x / (1.0 + sigma[:, None] ** 2)


@pytest.mark.parametrize("sigmas, where", [([0.1, 1.0, 10.0, 0.0], r"sigmas\[0\] = 0.1 is followed by sigmas\[1\] = 1"),
                                           ([10.0, 1.0, 5.0, 0.0], r"sigmas\[1\] = 1 is followed by sigmas\[2\] = 5"),
                                           ([10.0, 1.0, 1.0, 0.0], r"sigmas\[1\] = 1 is followed by sigmas\[2\] = 1"),
                                           ([10.0, 1.0, 0.0, 0.0], r"sigmas\[2\] = 0 is followed by sigmas\[3\] = 0")])
def test_kdiffusion_sigmas_must_decrease(sigmas, where):
    """Before: the error spoke of 'the time grid' and t_max (dpmsolve's internals), not of the sigmas given."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as info:
        K.sample_dpmpp_2m(_k_model, x, torch.tensor(sigmas, dtype=torch.float64))
    message = str(info.value)
    assert message.startswith("sigmas must be strictly decreasing") and "to 0 (or to sigma_min)" in message
    assert __import__("re").search(where, message), message


def test_kdiffusion_nan_sigmas_and_grid_helper_arguments():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"sigmas must be finite: sigmas\[1\] = nan.*decreasing.*to 0"):
        K.sample_dpmpp_2m(_k_model, x, torch.tensor([10.0, float("nan"), 0.0]))
    for helper in (K.get_sigmas_karras, K.get_sigmas_exponential):
        for lo, hi in ((10.0, 0.1), (float("nan"), 10.0), (0.1, float("inf")), (0.0, 10.0)):
            with pytest.raises(ValueError) as info:
                helper(5, lo, hi)
            message = str(info.value)
            assert message.startswith(f"{helper.__name__} needs 0 < sigma_min < sigma_max")
            assert f"sigma_min={lo!r}, sigma_max={hi!r}" in message and "decrease from sigma_max" in message
    with pytest.raises(ValueError, match=r"sample_dpm_adaptive needs 0 < sigma_min < sigma_max.*sigma_min=nan"):
        K.sample_dpm_adaptive(_k_model, x, float("nan"), 10.0)


# ------------------------------------------------------------------------------------------ C1 presets

@pytest.mark.parametrize("cls", PRESETS)
def test_preset_from_config_runs_its_own_solver_with_the_users_schedule(cls, tmp_path):
    """Before: UniPCScheduler.from_config(DPMSolveScheduler(...).config) ran the source's DPM-Solver++ (its solver and
    options came with the config). Now a preset runs its own solver; schedule options carry over. Truth: the
    preset built directly with those schedule options."""
    schedule = dict(**SD, prediction_type="v_prediction", grid="karras", grid_options={"rho": 5.0},
                    final_sigma="min")
    direct = cls(**schedule)
    direct.set_timesteps(6)
    x = start_noise()
    expected = hand_loop(direct, x.clone())
    other = DDIMSolveScheduler if cls is not DDIMSolveScheduler else UniPCScheduler
    sources = [DPMSolveScheduler(solver="dpmsolver", solver_options={"order": 3}, **schedule),
               DPMSolveScheduler(solver="sde-dpmsolver++", **schedule), other(**schedule)]
    sources[0].save_pretrained(tmp_path)
    for config in [s.config for s in sources] + [DPMSolveScheduler.load_config(tmp_path)]:
        s = cls.from_config(config)
        assert s.config.solver == cls._default_solver and repr(s.solver) == repr(direct.solver)
        assert s.config.grid == "karras" and s.config.final_sigma == "min"
        s.set_timesteps(6)
        assert torch.equal(hand_loop(s, x.clone()), expected)


def test_preset_keeps_options_of_its_own_solver_and_the_generic_class_keeps_the_configs():
    """A preset's own config (order 3) keeps its options; singlestep and multistep DPM-Solver++ are different
    solvers. The generic class runs whatever solver a config names, live or saved (a live preset config used to
    lose its solver: diffusers dropped it as a 'default value')."""
    u3 = UniPCScheduler(solver_options={"order": 3, "variant": "bh1"})
    assert UniPCScheduler.from_config(u3.config).config.solver_options == {"order": 3, "variant": "bh1"}
    single = DPMSolverSinglestepScheduler.from_config(DPMSolverPPMultistepScheduler().config)
    assert isinstance(single.solver, dp.DPMSolverSinglestep)
    multi = DPMSolverPPMultistepScheduler.from_config(DPMSolverSinglestepScheduler().config)
    assert isinstance(multi.solver, dp.DPMSolverMultistep)
    for preset in PRESETS:
        generic = DPMSolveScheduler.from_config(preset().config)
        assert generic.config.solver == preset._default_solver
        assert generic.config.solver_options == preset._default_solver_options
    assert UniPCScheduler.from_config(DPMSolveScheduler().config, solver_options={"order": 1}).solver._order == 1


# ------------------------------------------------------------------------------------------ C2 v3 statistics

@pytest.fixture(scope="module")
def toy_ems():
    """Smooth, non-trivial statistics for SHAPE samples under SD's schedule (shared over positions)."""
    schedule = DPMSolveScheduler(**SD).schedule
    lo, hi = schedule.log_snr_range
    lam = np.linspace(lo, hi, 21)
    wave = np.sin(lam)[:, None, None, None] * np.arange(1.0, 5.0)[None, :, None, None] / 4
    return dp.ems.EMS(lam, 1.0 + 0.1 * wave, 0.05 * wave, 0.02 * wave, SHAPE[1:], schedule.fingerprint(),
                      model="toy")


def test_v3_scheduler_with_an_ems_object_prints_saves_and_loads(toy_ems, tmp_path):
    """Before: the EMS object sat in the config, so print(scheduler) and save_pretrained failed (not JSON). Now the
    config names it; save_pretrained writes ems.safetensors beside the config, which refers to it relative to the
    directory (the folder may move), and from_pretrained gives identical samples."""
    s = DPMSolveScheduler(solver="dpmsolver-v3", solver_options={"ems": toy_ems, "order": 2}, final_sigma="min",
                          **SD)
    assert "<in-memory EMS 'toy'>" in repr(s) and s.solver.ems is toy_ems
    s.set_timesteps(7)
    x = start_noise()
    ours = hand_loop(s, x.clone())
    s.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())
    assert saved["solver_options"] == {"ems": "ems.safetensors", "order": 2}
    assert s.config.solver_options["ems"] == "<in-memory EMS 'toy'>"   # the live config is unchanged
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    again = DPMSolveScheduler.from_pretrained(tmp_path / "moved")
    again.set_timesteps(7)
    assert torch.equal(hand_loop(again, x.clone()), ours)
    np.testing.assert_array_equal(again.solver.ems.l, toy_ems.l)
    # Saved again from the loaded one (a path in its config): the statistics are copied beside the new config.
    again.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "ems.safetensors").is_file()
    assert json.loads((tmp_path / "copy" / "scheduler_config.json").read_text())["solver_options"]["ems"] == \
        "ems.safetensors"
    # A live config cannot carry the object: a clear error with the two ways out.
    with pytest.raises(dp.ems.EMSError, match=r"EMS object.*solver_options=\{'ems': ems_object\}.*save_pretrained"):
        DPMSolveScheduler.from_config(s.config)
    assert torch.isfinite(ours).all()


def test_v3_statistics_in_a_saved_pipeline(toy_ems, tmp_path):
    """A pipeline saved with a v3 scheduler loads back offline with its statistics (subfolder 'scheduler')."""
    from diffusers import DDPMPipeline
    from tiny_pipelines import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet().eval()
    pipe_shape_ems = dp.ems.EMS.degenerate(DPMSolveScheduler().schedule, (3, 8, 8))
    sched = DPMSolveScheduler(solver="dpmsolver-v3", solver_options={"ems": pipe_shape_ems})
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler.solver.ems, dp.ems.EMS)
    np.testing.assert_array_equal(loaded.scheduler.solver.ems.lambdas, pipe_shape_ems.lambdas)


# ------------------------------------------------------------------------------------------ C3 diffusers options

PROBLEM = GaussianMixture.random(k=3, dim=16, seed=0)


def _vp_mixture_eps(x: torch.Tensor, sigma) -> torch.Tensor:
    """The exact eps of PROBLEM's data at VE noise level sigma = sigma_t / alpha_t (float64)."""
    sigma = float(sigma)
    a = 1.0 / math.sqrt(1.0 + sigma**2)
    x64 = x.to(torch.float64)
    x0 = PROBLEM.posterior_mean((x64 / a).reshape(x.shape[0], -1), sigma).reshape(x.shape)
    return ((x64 - a * x0) / (sigma * a)).to(x.dtype)


def _trajectory(sched, net=_vp_mixture_eps) -> list[torch.Tensor]:
    """Every prev_sample of a run whose model sees the scheduler's own noise level of each step (diffusers
    rounds Karras timesteps to integers, dpmsolve does not: the noise level is the common ground)."""
    x = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(net(x, sched.sigmas[i]), t, x).prev_sample
        out.append(x)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _pair(steps: int, **options):
    """diffusers' DPMSolverMultistepScheduler(**options) and DPMSolveScheduler.from_config of its config, both with
    their timesteps set. diffusers' alphas_cumprod (float32, ~1e-4 off at t = 1) are replaced by the float64
    values of the same betas, so that the comparison is of the solvers and grids, not of the tables."""
    from diffusers import DPMSolverMultistepScheduler

    theirs = DPMSolverMultistepScheduler(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # everything here is honoured
        ours = DPMSolveScheduler.from_config(theirs.config)
    theirs.alphas_cumprod = torch.from_numpy(ours.schedule.alphas_cumprod.copy())
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ours, theirs


@pytest.mark.parametrize("steps", [8, 12])
def test_from_config_of_dpm_solver_3m_karras_matches_diffusers(steps):
    """The issue's case. Before: from_config dropped solver_order and use_karras_sigmas (DPM-Solver++ 2M on the
    logSNR grid ran). Now: order 3 with diffusers' warm-up and lower_order_final, the Karras grid; the timesteps
    are diffusers' before its rounding to integers, the sigmas equal, every sample within 1e-5."""
    ours, theirs = _pair(steps, solver_order=3, use_karras_sigmas=True)
    assert ours.config.grid == "karras" and ours.solver._order == 3 and ours.solver.lower_order_final
    np.testing.assert_array_equal(ours.timesteps.round().numpy(), theirs.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas.numpy(), theirs.sigmas.numpy(), rtol=1e-6)
    reference = _trajectory(theirs)
    for mine, their in zip(_trajectory(ours), reference):
        assert _rel(mine, their) < 1e-5
    # The tolerance discriminates: 2M (what from_config ran before) misses by orders of magnitude.
    before = DPMSolveScheduler.from_config(ours.config, solver_options={"order": 2})
    before.set_timesteps(steps)
    assert _rel(_trajectory(before)[-2], reference[-2]) > 100 * 1e-5


@pytest.mark.parametrize("options", [
    dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False),
    dict(solver_order=2, solver_type="heun", use_lu_lambdas=True),
    dict(solver_order=2, timestep_spacing="trailing"),
    dict(solver_order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
], ids=["3M-karras-no-lof-20-steps", "2M-heun-lu", "2M-trailing", "noise-2M-sigma-min"])
def test_from_config_maps_diffusers_solver_and_grid_options(options):
    """solver_type heun -> taylor, use_lu_lambdas -> uniform log-SNR, 'trailing' spacing -> uniform t (the same
    integer timesteps when N divides 1000), algorithm_type 'dpmsolver' -> noise prediction, final_sigmas_type
    'sigma_min' -> final_sigma 'min'. With lower_order_final=False at 20 steps: diffusers' lower_order_final acts
    below 15 steps only, dpmsolve's at every count; with it off both run the full order to the end."""
    ours, theirs = _pair(20 if options.get("lower_order_final") is False else 10, **options)
    if "timestep_spacing" in options:
        np.testing.assert_array_equal(ours.timesteps.numpy(), theirs.timesteps.numpy())
    if "final_sigmas_type" in options:
        # dpmsolve's grid for the 'linspace' default is its own (log-SNR); run both on diffusers' timesteps.
        assert ours.config.final_sigma == "min" and ours.solver.predict == "noise"
        ours.set_timesteps(timesteps=theirs.timesteps.tolist())
        np.testing.assert_allclose(ours.sigmas.numpy(), theirs.sigmas.numpy(), rtol=1e-6)
    for mine, their in zip(_trajectory(ours), _trajectory(theirs)):
        assert _rel(mine, their) < 1e-5


@pytest.mark.parametrize("ratio, max_value", [(0.9, 1.5), (0.995, 1.0), (0.8, 0.8)])
def test_from_config_thresholding_matches_diffusers(ratio, max_value):
    """thresholding / dynamic_thresholding_ratio / sample_max_value: diffusers' rule s = clamp(q, 1, max) built from
    dpmsolve's ClipX0 + DynamicThresholding. Before: the options were dropped (no thresholding at all)."""
    def big(x, sigma):   # an x0 prediction up to 2.5 in size, so that the thresholds act
        sigma = float(sigma)
        a = 1.0 / math.sqrt(1.0 + sigma**2)
        x0 = 2.5 * torch.tanh(x.to(torch.float64) / a)
        return ((x.to(torch.float64) - a * x0) / (sigma * a)).to(x.dtype)

    ours, theirs = _pair(8, solver_order=2, use_karras_sigmas=True, thresholding=True,
                         dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    mine, their = _trajectory(ours, big), _trajectory(theirs, big)
    for a, b in zip(mine, their):
        assert _rel(a, b) < 1e-5
    plain = DPMSolveScheduler.from_config(ours.config, thresholding=False)
    plain.set_timesteps(8)
    assert _rel(_trajectory(plain, big)[-2], their[-2]) > 1e-2    # the thresholding matters here


def test_from_config_warns_once_about_options_it_cannot_honour():
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler

    theirs = DPMSolverMultistepScheduler(lambda_min_clipped=-5.1, euler_at_final=True, final_sigmas_type="sigma_min",
                                         time_shift_type="linear", use_karras_sigmas=True)
    with pytest.warns(UserWarning) as record:
        s = DPMSolveScheduler.from_config(theirs.config)
    ours = [str(w.message) for w in record if "cannot honour" in str(w.message)]
    assert len(ours) == 1
    for name in ("lambda_min_clipped=-5.1", "euler_at_final=True", "time_shift_type='linear'"):
        assert name in ours[0]
    assert "use_karras_sigmas" not in ours[0] and s.config.grid == "karras" and s.config.final_sigma == "min"
    with pytest.warns(UserWarning, match=r"algorithm_type='sde-dpmsolver' \(no dpmsolve solver; 'dpmsolver\+\+' "
                      r"runs\)"):
        DPMSolveScheduler.from_config(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver",
                                                                  final_sigmas_type="sigma_min").config)
    assert DPMSolveScheduler.from_config(DEISMultistepScheduler().config).config.solver == "deis"  # its own method
    with warnings.catch_warnings():   # defaults, and configs of other schedulers, ask for nothing extra
        warnings.simplefilter("error", UserWarning)
        DPMSolveScheduler.from_config(DPMSolverMultistepScheduler().config)
        DPMSolveScheduler.from_config(DPMSolverMultistepScheduler(euler_at_final=True).config)  # ends at 0
        DPMSolveScheduler.from_config(theirs.config, solver="ddim", grid="logSNR", final_sigma="zero",
                                      lambda_min_clipped=-math.inf, time_shift_type="exponential")


def test_from_config_maps_unipc_options_onto_the_unipc_preset():
    from diffusers import UniPCMultistepScheduler

    theirs = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", predict_x0=False, disable_corrector=[0],
                                     use_karras_sigmas=True)
    s = UniPCScheduler.from_config(theirs.config)
    assert (s.solver._order, s.solver.variant, s.solver.predict, s.solver.disable_corrector) == (3, "bh1", "noise",
                                                                                                  (0,))
    assert s.solver.lower_order_final and s.config.grid == "karras"
    from diffusers import DPMSolverMultistepScheduler

    assert DPMSolveScheduler.from_config(DPMSolverMultistepScheduler(use_exponential_sigmas=True).config).config.grid \
        == "exponential"
    # Keywords in diffusers' names work as with diffusers' own from_config.
    k = DPMSolveScheduler.from_config(DPMSolveScheduler(**SD).config, use_karras_sigmas=True, solver_order=3)
    assert k.config.grid == "karras" and k.solver._order == 3 and k.config.beta_schedule == "scaled_linear"
