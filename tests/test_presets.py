"""Presets by ComfyUI name (dpmsolve.presets): every name resolves, in dp.sample, the k-diffusion functions and the
diffusers scheduler alike, to the solver and grid of the one table; unknown names list the valid ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve import presets
from dpmsolve.integrations import kdiffusion as K
from dpmsolve.lab import GaussianData

# ComfyUI's comfy/samplers.py (Comfy-Org/ComfyUI 311c014): KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"], and
# SCHEDULER_NAMES.
COMFY_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
COMFY_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal"]
FIXED = [name for name, p in presets.SAMPLERS.items() if not p.range_only]
DATA = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])


def _start(schedule, seed=0):
    return DATA.prior_sample(schedule, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_comfyui_name_is_in_the_table_or_says_why():
    assert sorted(COMFY_SAMPLERS) == sorted([*presets.SAMPLERS, *presets.NOT_IMPLEMENTED])
    assert not set(presets.SAMPLERS) & set(presets.NOT_IMPLEMENTED)
    assert set(COMFY_SCHEDULERS) <= set(presets.SCHEDULERS)
    for name, preset in presets.SAMPLERS.items():
        solver = dp.get_solver(preset.solver, **preset.options)   # every entry builds
        assert preset.checked, name
        assert solver.adaptive == (name == "dpm_adaptive")
    for name, (grid, options) in presets.SCHEDULERS.items():
        dp.make_grid(dp.DiscreteVP.scaled_linear(), 8, grid, t_end=0.0, **options)


@pytest.mark.parametrize("name", sorted(presets.SAMPLERS))
def test_sampler_and_scheduler_names_resolve_in_sample(name):
    schedule = dp.DiscreteVP.scaled_linear()
    den, x = DATA.denoiser(schedule), _start(schedule)
    preset = presets.SAMPLERS[name]
    for scheduler in (None, "karras", "normal"):
        full = name if scheduler is None else f"{name}_{scheduler}"
        assert presets.parse_preset(full) == (name, scheduler)
        out = dp.sample(den, x, full, steps=8, seed=3, progress=False)
        if full in dp.SOLVERS:          # a registry name comes first: its own defaults and dpmsolve's grid
            assert presets.is_preset(full) is False and out.ts[-1] == schedule.t_min
            continue
        assert torch.isfinite(out.x).all() and type(out.solver) is type(dp.get_solver(preset.solver,
                                                                                     **preset.options))
        if preset.range_only:           # dpm_fast / dpm_adaptive: the range's ends, no jump to sigma = 0
            assert out.ts[0] == schedule.t_max and out.ts[-1] == schedule.t_min
            continue
        kind, options = presets.SCHEDULERS[scheduler] if scheduler else (presets.DEFAULT_GRID, {})
        ts = dp.make_grid(schedule, 9 if preset.discard_penultimate else 8, kind, t_end=0.0, **options)
        if preset.discard_penultimate:  # ComfyUI: one step more, the penultimate time dropped
            ts = np.delete(ts, -2)
        np.testing.assert_array_equal(out.ts, ts)


def test_preset_equals_its_solver_on_its_grid_and_options_override():
    schedule = dp.DiscreteVP.scaled_linear()
    den, x = DATA.denoiser(schedule), _start(schedule)
    ts = dp.make_grid(schedule, 10, "karras", t_end=0.0)
    a = dp.sample(den, x, "dpmpp_2m_karras", steps=10, progress=False)
    b = dp.sample(den, x, "dpmsolver++", order=2, grid=ts, progress=False)
    assert torch.equal(a.x, b.x)
    # grid= takes the scheduler (ComfyUI's or any dpmsolve grid name), options override the preset's
    c = dp.sample(den, x, "dpmpp_2m_sde", grid="karras", steps=10, seed=4, eta=0.5, progress=False)
    d = dp.sample(den, x, "dpmpp-2m-sde", grid=ts, seed=4, eta=0.5, progress=False)
    assert torch.equal(c.x, d.x) and c.solver.eta == 0.5
    e = dp.sample(den, x, "dpmpp_2m", grid="time_uniform", steps=10, t_end=schedule.t_min, progress=False)
    np.testing.assert_array_equal(e.ts, dp.make_grid(schedule, 10, "time_uniform"))
    # registry names come first: "euler" is the registry's Euler on dpmsolve's default grid
    assert dp.sample(den, x, "euler", steps=5, progress=False).ts[-1] == schedule.t_min
    assert dp.sample(den, x, "euler_normal", steps=5, progress=False).ts[-1] == 0.0


def test_kdiffusion_functions_are_the_table():
    for name, preset in presets.SAMPLERS.items():
        if preset.range_only:
            assert callable(getattr(K, f"sample_{name}"))
            continue
        assert K.SAMPLERS[name] == (preset.solver, dict(preset.options))
        assert getattr(K, f"sample_{name}").__name__ == f"sample_{name}" and f"sample_{name}" in K.__all__


def test_sample_dpm_fast_equals_k_diffusion():
    from dpmsolve.lab.peers import _k_diffusion_sampling

    try:
        kd = _k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion is not installed ({exc})")

    def model(x, sigma, **kw):
        return DATA.posterior_mean(x, float(sigma[0]))

    x = torch.randn((6, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # k-diffusion computes its log-sigma grid in the default dtype
    try:
        for n in (5, 9, 10, 11):
            ours = K.sample_dpm_fast(model, x, 0.002, 80.0, n, disable=True)
            theirs = kd.sample_dpm_fast(model, x, 0.002, 80.0, n, disable=True)
            assert (ours - theirs).abs().max().item() < 1e-11
    finally:
        torch.set_default_dtype(default)
    with pytest.raises(ValueError, match="eta = 0"):
        K.sample_dpm_fast(model, x, 0.002, 80.0, 5, eta=1.0)


@pytest.mark.parametrize("name, match", [
    ("dpmpp_2m_karas", r"Unknown solver 'dpmpp_2m_karas'; valid names are: .*dpmsolver\+\+.*dpmpp_2m_sde.*kl_optimal"),
    ("euler_cfg_pp", r"'euler_cfg_pp' is not implemented in dpmsolve: CFG\+\+"),
    ("lcm_karras", r"'lcm' is not implemented in dpmsolve: sampling of latent-consistency"),
    ("seeds_2", r"SEEDS"),
])
def test_unknown_names_list_the_valid_ones(name, match):
    schedule = dp.DiscreteVP.linear()
    with pytest.raises(ValueError, match=match):
        dp.sample(DATA.denoiser(schedule), _start(schedule), name, steps=4, progress=False)


def test_refusals():
    schedule = dp.DiscreteVP.linear()
    den, x = DATA.denoiser(schedule), _start(schedule)
    with pytest.raises(ValueError, match="names the scheduler 'karras' and grid='normal'"):
        dp.sample(den, x, "dpmpp_2m_karras", grid="normal", progress=False)
    with pytest.raises(ValueError, match="DPMSolverMultistep has no option"):
        dp.sample(den, x, "dpmpp_2m", eta=1.0, progress=False)
    with pytest.raises(TypeError, match="steps must be an integer"):
        dp.sample(den, x, "dpm_2_karras", steps="8", progress=False)
    with pytest.raises(ValueError, match="steps=5 disagrees"):
        dp.sample(den, x, "euler_ancestral", grid=dp.make_grid(schedule, 4), steps=5, progress=False)
    with pytest.raises(TypeError, match="a number is not a grid"):
        dp.sample(den, x, "dpmpp_2m", grid=5, progress=False)
    with pytest.raises(ValueError, match="Unknown scheduler 'karas'"):
        presets.preset_settings("dpmpp_2m", "karas")


# ------------------------------------------------------------------------------------------ diffusers

def _hand_loop(s, x, net, generator=None):
    for t in s.timesteps:
        x = s.step(net(x, t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("name", FIXED)
def test_diffusers_scheduler_by_comfyui_names_equals_sample(name):
    """DPMSolveScheduler.from_config(config, sampler=..., scheduler=...) runs what dp.sample runs for
    "<sampler>_<scheduler>" on the scheduler's schedule: the same times (every evaluation as a timestep: Heun,
    DPM-2, SDE singlesteps, PECE evaluate between grid times), the same noise from the same generator."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    from dpmsolve.integrations.diffusers import DPMSolveScheduler

    theirs = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    s = DPMSolveScheduler.from_config(theirs.config, sampler=name, scheduler="karras")
    preset = presets.SAMPLERS[name]
    assert (s.config.solver, s.config.grid, s.config.final_sigma) == (preset.solver, "karras", "zero")
    assert s.config.discard_penultimate_sigma == preset.discard_penultimate
    s.set_timesteps(6)
    den = DATA.denoiser(s.schedule)
    n_train = s.config.num_train_timesteps

    def net(x, timestep):   # eps at the network's (fractional) train index, taken in float32 as a UNet does
        index = float(torch.as_tensor(timestep).reshape(-1)[0].to(torch.float32))
        return den(x, (index + 1.0) / n_train).eps

    x = _start(s.schedule, seed=2)
    ours = _hand_loop(s, x.clone(), net, generator=torch.Generator().manual_seed(7))
    network = dp.wrap_model(net, s.schedule, "eps", time_input="discrete")
    native = dp.sample(network, x.clone(), f"{name}_karras", steps=6, generator=torch.Generator().manual_seed(7),
                       progress=False)
    assert len(s.timesteps) == native.nfe
    assert (ours - native.x).abs().max().item() < 1e-9


def test_diffusers_names_refusals():
    pytest.importorskip("diffusers")
    from dpmsolve.integrations.diffusers import DPMSolveScheduler, UniPCScheduler

    config = DPMSolveScheduler().config
    s = DPMSolveScheduler.from_config(config, sampler="dpmpp_2m_sde_karras", solver_options={"eta": 0.5})
    assert s.config.grid == "karras" and s.solver.eta == 0.5
    s = DPMSolveScheduler.from_config(config, scheduler="beta")
    assert (s.config.grid, s.config.grid_options, s.config.solver) == ("beta", {"alpha": 0.6, "beta": 0.6},
                                                                       "dpmsolver++")
    with pytest.raises(ValueError, match="adaptive"):
        DPMSolveScheduler.from_config(config, sampler="dpm_adaptive")
    with pytest.raises(ValueError, match="both name the solver"):
        DPMSolveScheduler.from_config(config, sampler="euler", solver="ddim")
    with pytest.raises(ValueError, match="runs its own solver"):
        UniPCScheduler.from_config(config, sampler="euler")
    with pytest.raises(ValueError, match="Unknown solver 'eulr'; valid names are"):
        DPMSolveScheduler.from_config(config, sampler="eulr")
