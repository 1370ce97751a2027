"""DPMSolveScheduler.from_config of a diffusers scheduler's config keeps that scheduler's samples: per family
(DPMSolverMultistep, DPMSolverSinglestep, UniPC, DEIS, Euler, Heun, LMS, PNDM / PLMS, DDIM), the same samples as
diffusers' own scheduler in a pipeline loop (``init_noise_sigma``, ``scale_model_input``, ``step``) and in a
tiny Stable Diffusion pipeline.

Precision: diffusers keeps its sigmas and alphas_cumprod in float32 (and the DPM-Solver-type steps cast the sample
to float32), so agreement is to float32 round-off: the samples are compared relative to their size, at 2e-6 for
the float64 toy network and 5e-6 through the float32 UNet. Grids of fractional timesteps (the sigma flags) are
run with a network of x alone: diffusers rounds those timesteps for the network (DPM-Solver-type) or interpolates
them in log sigma, dpmsolve hands over the exact fractional train index (module docstring of the adapter).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
from tiny_pipelines import _W, start_noise, tiny_stable_diffusion, toy_net  # noqa: E402

from dpmsolve.integrations.diffusers import DPMSolveScheduler  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def x_net(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth network of x alone (for grids whose timesteps diffusers rounds or interpolates its own way)."""
    h = x.to(torch.float64).reshape(x.shape[0], -1)
    return torch.tanh(h @ _W).reshape(x.shape).to(x.dtype)


def pipeline_loop(s, x, steps: int, net=toy_net, begin: int = 0):
    """What a diffusers pipeline does with its scheduler (StableDiffusionPipeline's loop without guidance)."""
    s.set_timesteps(steps)
    if begin:
        s.set_begin_index(begin)
    x = x * s.init_noise_sigma
    for t in s.timesteps[begin:]:
        x = s.step(net(s.scale_model_input(x, t), t), t, x).prev_sample
    return x


# (scheduler class, its options, steps, network, our solver): every option from_config maps, each family
CASES = {
    "dpm-2m-linspace": (diffusers.DPMSolverMultistepScheduler, dict(SD), 10, toy_net, "dpmsolver++"),
    "dpm-3m-lof-leading": (diffusers.DPMSolverMultistepScheduler,
                           dict(SD, solver_order=3, timestep_spacing="leading", steps_offset=1), 10, toy_net,
                           "dpmsolver++"),
    "dpm-2m-heun-v-trailing-min": (diffusers.DPMSolverMultistepScheduler,
                                   dict(SD, solver_type="heun", prediction_type="v_prediction",
                                        timestep_spacing="trailing", final_sigmas_type="sigma_min"), 10, toy_net,
                                   "dpmsolver++"),
    "dpm-noise-min": (diffusers.DPMSolverMultistepScheduler,
                      dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 10, toy_net, "dpmsolver"),
    "dpm-karras": (diffusers.DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True), 10, x_net,
                   "dpmsolver++"),
    "dpm-lu-lambdas": (diffusers.DPMSolverMultistepScheduler, dict(SD, use_lu_lambdas=True), 10, x_net,
                       "dpmsolver++"),
    "singlestep-2": (diffusers.DPMSolverSinglestepScheduler, dict(SD), 9, toy_net, "dpmsolver++"),
    "unipc-bh2": (diffusers.UniPCMultistepScheduler, dict(SD), 10, toy_net, "unipc"),
    # (bh1 with a final step to sigma = 0 gives NaN in diffusers: B(h) = h is infinite there)
    "unipc-bh1-3-min": (diffusers.UniPCMultistepScheduler,
                        dict(SD, solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), 10, toy_net,
                        "unipc"),
    "unipc-bh2-exponential": (diffusers.UniPCMultistepScheduler, dict(SD, use_exponential_sigmas=True), 10, x_net,
                              "unipc"),
    "deis-2": (diffusers.DEISMultistepScheduler, dict(SD), 10, toy_net, "deis"),
    "deis-3": (diffusers.DEISMultistepScheduler, dict(solver_order=3), 10, toy_net, "deis"),
    "euler-linspace": (diffusers.EulerDiscreteScheduler, dict(SD), 10, toy_net, "euler"),
    "euler-leading-v": (diffusers.EulerDiscreteScheduler,
                        dict(SD, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 10,
                        toy_net, "euler"),
    "euler-karras": (diffusers.EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True), 10, x_net, "euler"),
    "euler-beta": (diffusers.EulerDiscreteScheduler, dict(SD, use_beta_sigmas=True), 10, x_net, "euler"),
    "heun-linspace": (diffusers.HeunDiscreteScheduler, dict(), 10, toy_net, "heun"),
    "heun-trailing-clip": (diffusers.HeunDiscreteScheduler,
                           dict(SD, timestep_spacing="trailing", clip_sample=True, clip_sample_range=2.0), 10,
                           toy_net, "heun"),
    "heun-karras": (diffusers.HeunDiscreteScheduler, dict(SD, use_karras_sigmas=True), 10, x_net, "heun"),
    "lms-linspace": (diffusers.LMSDiscreteScheduler, dict(SD), 10, toy_net, "lms"),
    "lms-leading": (diffusers.LMSDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1), 10,
                    toy_net, "lms"),
    "plms-sd": (diffusers.PNDMScheduler, dict(SD, skip_prk_steps=True, steps_offset=1), 10, toy_net, "plms"),
    "pndm-prk": (diffusers.PNDMScheduler, dict(SD, steps_offset=1), 10, toy_net, "pndm"),
    "pndm-prk-alpha-one": (diffusers.PNDMScheduler, dict(SD, set_alpha_to_one=True), 20, toy_net, "pndm"),
    "ddim-sd": (diffusers.DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 10,
                toy_net, "ddim"),
    "ddim-trailing": (diffusers.DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing"), 10,
                      toy_net, "ddim"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_samples_as_diffusers_scheduler(case, tmp_path):
    cls, options, steps, net, solver = CASES[case]
    theirs = cls(**options)
    theirs.save_pretrained(tmp_path)
    # diffusers' UniPC builds part of its linear system in torch's default dtype and part in float32: it runs in
    # float32 only (the tests' default dtype is float64, conftest.py)
    dtype, tol = (torch.float32, 1e-5) if solver == "unipc" else (torch.float64, 2e-6)
    torch.set_default_dtype(dtype)
    for config in (theirs.config, DPMSolveScheduler.load_config(tmp_path)):   # live (no class name) and saved
        ours = DPMSolveScheduler.from_config(config)
        assert ours.config.solver == solver
        x = start_noise(dtype=dtype)
        expected = pipeline_loop(theirs, x.clone(), steps, net)
        got = pipeline_loop(ours, x.clone(), steps, net)
        if net is toy_net:   # the same (integer or unrounded) timesteps
            np.testing.assert_allclose(ours.timesteps.numpy(), theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)
        else:                # the same noise levels
            np.testing.assert_allclose(ours.sigmas.numpy(), theirs.sigmas.numpy(), rtol=2e-5, atol=1e-6)
        diff = (got - expected).abs().max().item()
        print(f"{case}: {len(ours.timesteps)} evaluations, max |ours - diffusers| = {diff:.2e} "
              f"(sample size {expected.abs().max().item():.3g})")
        assert diff <= tol * expected.abs().max().item()


def test_heun_lists_every_evaluation_and_starts_mid_grid_as_diffusers():
    """diffusers' HeunDiscreteScheduler evaluates twice per step (the inner times twice, order 2); the adapter lists
    the same timesteps, counts num_inference_steps in grid intervals, and starts at set_begin_index(order * i) as
    an img2img pipeline does (add_noise at that timestep), refusing an index inside a step."""
    theirs = diffusers.HeunDiscreteScheduler(**SD)
    ours = DPMSolveScheduler.from_config(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    assert ours.order == theirs.order == 2 and ours.num_inference_steps == theirs.num_inference_steps == 10
    np.testing.assert_array_equal(ours.timesteps.numpy(), theirs.timesteps.numpy())
    assert len(ours.timesteps) == 19
    x0, noise = start_noise(1), start_noise(2)
    finals = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        begin = 2 * 3
        s.set_begin_index(begin)
        x = s.add_noise(x0, noise, s.timesteps[begin:begin + 1])
        for t in s.timesteps[begin:]:
            x = s.step(toy_net(s.scale_model_input(x, t), t), t, x).prev_sample
        finals.append(x)
    assert (finals[0] - finals[1]).abs().max().item() <= 2e-6 * finals[0].abs().max().item()
    ours.set_timesteps(10)
    ours.set_begin_index(5)
    with pytest.raises(ValueError, match="begin index 5 is inside a step"):
        ours.step(toy_net(noise, ours.timesteps[5]), ours.timesteps[5], noise)


def test_family_only_without_a_solver_choice():
    """Naming a dpmsolve solver (or using a preset class) keeps the config's schedule and dpmsolve's grid; naming
    only a grid keeps the source's method on that grid; diffusers' option only one scheduler has are read from
    its live config even after another scheduler's from_config carried foreign options into it."""
    pndm = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1)
    euler = diffusers.EulerDiscreteScheduler.from_config(pndm.config)   # carries skip_prk_steps along
    assert "skip_prk_steps" in euler.config
    assert DPMSolveScheduler.from_config(euler.config).config.solver == "euler"
    own = DPMSolveScheduler.from_config(pndm.config, solver="unipc")
    assert (own.config.solver, own.config.grid, own._grid_kind, own.config.final_sigma) == ("unipc", None, "logSNR",
                                                                                             "zero")
    on_karras = DPMSolveScheduler.from_config(diffusers.UniPCMultistepScheduler(**SD).config, grid="karras")
    assert (on_karras.config.solver, on_karras.config.grid) == ("unipc", "karras")
    heun = DPMSolveScheduler.from_config(diffusers.HeunDiscreteScheduler().config)   # Heun's own default betas
    assert (heun.config.beta_start, heun.config.beta_end) == (0.00085, 0.012)
    ddpm = DPMSolveScheduler.from_config(diffusers.DDPMScheduler().config)           # no family: the default
    assert ddpm.config.solver == "dpmsolver++" and ddpm.config.clip_sample is False


PIPELINE_FAMILIES = {
    "PNDM (PLMS)": lambda base: diffusers.PNDMScheduler.from_config(base),
    "Euler": lambda base: diffusers.EulerDiscreteScheduler.from_config(base),
    "Heun": lambda base: diffusers.HeunDiscreteScheduler.from_config(base),
    "LMS": lambda base: diffusers.LMSDiscreteScheduler.from_config(base),
    "DPMSolverMultistep": lambda base: diffusers.DPMSolverMultistepScheduler.from_config(base),
    "UniPC": lambda base: diffusers.UniPCMultistepScheduler.from_config(base),
    "DEIS": lambda base: diffusers.DEISMultistepScheduler.from_config(base),
    "DDIM": lambda base: diffusers.DDIMScheduler.from_config(base, clip_sample=False),
}


def test_tiny_stable_diffusion_pipeline_swap(tmp_path):
    """pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config) in a real (tiny, random) Stable
    Diffusion pipeline with classifier-free guidance: the same latents as the pipeline's own scheduler."""
    torch.set_default_dtype(torch.float32)   # a float32 pipeline (diffusers' UniPC needs it, see above)
    torch.manual_seed(0)
    pipe = tiny_stable_diffusion(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    for name, make in PIPELINE_FAMILIES.items():
        latents = []
        for scheduler in (make(base), None):
            pipe.scheduler = scheduler or DPMSolveScheduler.from_config(pipe.scheduler.config)
            latents.append(pipe("a cat", num_inference_steps=8, guidance_scale=7.5, output_type="latent",
                                generator=torch.Generator().manual_seed(0)).images)
        diff = (latents[0] - latents[1]).abs().max().item()
        print(f"{name}: max |ours - diffusers| = {diff:.2e} (latent size {latents[0].abs().max().item():.3g})")
        assert diff <= 5e-6 * latents[0].abs().max().item(), name
