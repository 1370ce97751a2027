"""The diffusers adapter: DPMSolveScheduler inside hand loops and real (tiny, random, offline) diffusers pipelines.

The adapter holds no solver maths, so every run must equal ``dpmsolve.sample`` on the same model, noise and grid:
exactly for a float64 toy network, to float32 round-off for the pipelines' networks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import SHAPE, hand_loop, start_noise, tiny_stable_diffusion, tiny_unet, toy_net  # noqa: E402, F401
import dpmsolve as dp  # noqa: E402
from dpmsolve.integrations.diffusers import (  # noqa: E402
    DDIMSolveScheduler,
    DPMSolverPPMultistepScheduler,
    DPMSolverSinglestepScheduler,
    DPMSolveScheduler,
    UniPCScheduler,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def native(s, net, x, solver: str, options: dict, ts=None, prediction=None, **kwargs) -> torch.Tensor:
    """dp.sample on the scheduler's own schedule and float64 grid."""
    time_input = "1000t" if s.config.use_flow_sigmas else "discrete"
    den = dp.wrap_model(net, s.schedule, prediction or s.config.prediction_type, time_input=time_input)
    return dp.sample(den, x, solver, grid=s._ts if ts is None else ts, progress=False, **kwargs, **options).x


SOLVERS = {
    "ddim": ("ddim", {}),
    "dpmpp-2m": ("dpmsolver++", {"order": 2}),
    "dpmpp-3m": ("dpmsolver++", {"order": 3}),
    "dpmpp-2m-taylor-lof": ("dpmsolver++", {"order": 2, "solver_type": "taylor", "lower_order_final": True}),
    "dpm-3m-noise": ("dpmsolver", {"order": 3}),
    "singlestep-3": ("dpmsolver++", {"method": "singlestep", "order": 3}),
    "singlestep-2-fixed": ("dpmsolver++", {"method": "singlestep", "order": 2, "split": "fixed"}),
    "unipc-2": ("unipc", {"order": 2}),
    "unipc-3-bh1": ("unipc", {"order": 3, "variant": "bh1"}),
}


# ------------------------------------------------------------------------------------------ (a) parity

@pytest.mark.parametrize("final_sigma", ["zero", "min"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_hand_loop_equals_native_sample(name, prediction, final_sigma):
    solver, options = SOLVERS[name]
    s = DPMSolveScheduler(solver=solver, solver_options=options, prediction_type=prediction,
                          final_sigma=final_sigma, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(7)
    assert len(s.timesteps) == 7 and len(s.sigmas) == 8 and (s.sigmas[-1] == 0) == (final_sigma == "zero")
    x = start_noise()
    ours = hand_loop(s, x.clone())
    theirs = native(s, toy_net, x.clone(), solver, options)
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() <= 1e-12


@pytest.mark.parametrize("grid, grid_options", [("karras", {"rho": 7.0}), ("time_uniform", {}),
                                                ("time_quadratic", {})])
def test_named_grids(grid, grid_options):
    s = UniPCScheduler(grid=grid, grid_options=grid_options)
    s.set_timesteps(6)
    expected = dp.make_grid(s.schedule, 6, grid, t_end=0.0, **grid_options)
    np.testing.assert_array_equal(s._ts, expected)
    x = start_noise()
    assert (hand_loop(s, x.clone()) - native(s, toy_net, x.clone(), "unipc", {"order": 2})).abs().max() <= 1e-12


def test_stochastic_solver_takes_the_generator():
    """A stochastic solver draws from the generator given to step (on the first step), as dp.sample does."""
    s = DPMSolveScheduler(solver="sde-dpmsolver++", solver_options={"order": 2})
    s.set_timesteps(6)
    x = start_noise()
    ours = hand_loop(s, x.clone(), generator=torch.Generator().manual_seed(5))
    theirs = native(s, toy_net, x.clone(), "sde-dpmsolver++", {"order": 2},
                    generator=torch.Generator().manual_seed(5))
    assert (ours - theirs).abs().max() <= 1e-12
    s.set_timesteps(6)
    other = hand_loop(s, x.clone(), generator=torch.Generator().manual_seed(6))
    assert (other - theirs).abs().max() > 1e-2


def test_flow_prediction_loop_equals_native_rectified_flow():
    s = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                          solver="dpmsolver++", solver_options={"order": 2})
    assert isinstance(s.schedule, dp.RectifiedFlow)
    s.set_timesteps(6)
    np.testing.assert_allclose(s.timesteps.numpy(), 1000 * s._ts[:-1], rtol=1e-6)
    np.testing.assert_array_equal(s._ts, dp.make_grid(s.schedule, 6, "flow_shift", t_end=0.0, shift=3.0))
    x = start_noise()
    ours = hand_loop(s, x.clone())
    theirs = native(s, toy_net, x.clone(), "dpmsolver++", {"order": 2}, prediction="flow")
    assert (ours - theirs).abs().max() <= 1e-12


def test_explicit_timesteps_and_sigmas():
    s = DPMSolverPPMultistepScheduler(final_sigma="min")
    s.set_timesteps(timesteps=[999, 800, 600, 400, 200, 50])
    np.testing.assert_allclose(s._ts, np.array([999, 800, 600, 400, 200, 50, 0]) / 1000 + 1e-3, rtol=1e-12)
    np.testing.assert_array_equal(s.timesteps.numpy(), [999, 800, 600, 400, 200, 50])
    x = start_noise()
    assert (hand_loop(s, x.clone()) - native(s, toy_net, x.clone(), "dpmsolver++", {"order": 2})).abs().max() \
        <= 1e-12
    # VE sigmas sigma/alpha: the times they name, with the end appended (final_sigma='zero' -> 0).
    z = DPMSolverPPMultistepScheduler()
    z.set_timesteps(sigmas=[80.0, 10.0, 1.0, 0.1])
    np.testing.assert_allclose(z.sigmas.numpy(), [80.0, 10.0, 1.0, 0.1, 0.0], rtol=1e-6)
    assert z._ts[-1] == 0.0 and len(z.timesteps) == 4
    # Flux-style flow sigmas; a trailing 0 is the end of the grid.
    f = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    f.set_timesteps(sigmas=[1.0 - 1e-3, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(f.timesteps.numpy(), [999.0, 750.0, 500.0, 250.0], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(timesteps=[999, 500], sigmas=[1.0, 0.5])


def test_dynamic_shift_mu():
    s = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    s.set_timesteps(5, mu=np.log(3.0))
    np.testing.assert_allclose(s._ts, dp.make_grid(s.schedule, 5, "flow_shift", t_end=0.0, shift=3.0))


def test_protocol_details():
    s = UniPCScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    assert len(s) == 1000 and s.init_noise_sigma == 1.0 and s.order == 1
    s.set_timesteps(4)
    x = start_noise()
    assert s.scale_model_input(x, s.timesteps[0]) is x
    assert s.step_index is None and s.begin_index is None
    out = s.step(toy_net(x, s.timesteps[0]), s.timesteps[0], x, generator=torch.Generator(), eta=0.3)
    assert s.step_index == 1 and out.pred_original_sample.shape == x.shape
    assert isinstance(s.step(toy_net(out.prev_sample, s.timesteps[1]), s.timesteps[1], out.prev_sample,
                             return_dict=False), tuple)
    with pytest.raises(ValueError, match="adaptive"):
        DPMSolveScheduler(solver="dpmsolver++", solver_options={"method": "adaptive"})
    with pytest.raises(ValueError, match="final_sigma"):
        DPMSolveScheduler(final_sigma="sigma_min")
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolveScheduler(prediction_type="eps")


def test_half_precision_keeps_dtype():
    s = DPMSolverPPMultistepScheduler()
    s.set_timesteps(5)
    x16 = start_noise(dtype=torch.float16)
    out = hand_loop(s, x16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = native(s, toy_net, x16.clone(), "dpmsolver++", {"order": 2})
    assert (out.float() - ref.float()).abs().max() < 1e-3 * ref.float().abs().max()  # fp16 round-off


def test_changed_sample_is_adopted():
    """A sample changed between steps (a pipeline callback editing latents) is the new solution at a completed
    step; an equal copy changes nothing. With DDIM (no history) adopting equals restarting from that grid point."""
    def run(edit, begin_at_1=None):
        s = DDIMSolveScheduler()
        s.set_timesteps(5)
        x = start_noise()
        if begin_at_1 is not None:
            s.set_begin_index(1)
            return hand_loop(s, begin_at_1, timesteps=s.timesteps[1:])
        t0 = s.timesteps[0]
        x = edit(s.step(toy_net(x, t0), t0, x).prev_sample)
        return hand_loop(s, x, timesteps=s.timesteps[1:]), x

    plain, x1 = run(lambda v: v)
    copied, _ = run(lambda v: v.clone())
    moved, x1_moved = run(lambda v: v + 0.1)
    assert torch.equal(plain, copied)
    assert (moved - plain).abs().max() > 1e-3
    assert (moved - run(None, begin_at_1=x1_moved.clone())).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------ (f) img2img

@pytest.mark.parametrize("name", ["dpmpp-3m", "unipc-2", "singlestep-3"])
@pytest.mark.parametrize("begin", [0, 3, 6])
def test_img2img_start_equals_native_from_that_grid_point(name, begin):
    solver, options = SOLVERS[name]
    s = DPMSolveScheduler(solver=solver, solver_options=options)
    s.set_timesteps(7)
    x0, noise = start_noise(1), start_noise(2)
    timesteps = s.timesteps[begin:]
    x_start = s.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    a, sig = s.schedule.alpha_sigma(s._ts[begin])
    assert (x_start - (a * x0 + sig * noise)).abs().max() <= 1e-14  # the grid time itself, not a float32 copy
    s.set_begin_index(begin)
    ours = hand_loop(s, x_start.clone(), timesteps=timesteps)
    ts = s._ts[begin:]
    if ts.size == 2 and ts[-1] == 0:  # a lone jump to sigma = 0: the x0 prediction at ts[0]
        den = dp.wrap_model(toy_net, s.schedule, "epsilon", time_input="discrete")
        theirs = den(x_start.clone(), float(ts[0])).x0
    else:
        theirs = native(s, toy_net, x_start.clone(), solver, options, ts=ts)
    assert (ours - theirs).abs().max() <= 1e-12


def test_add_noise_at_train_indices():
    s = DDIMSolveScheduler()
    x0, noise = start_noise(1), start_noise(2)
    idx = torch.tensor([0, 10, 500, 999])
    ac = s.schedule.alphas_cumprod[idx.numpy()]
    x0, noise = x0[:1].expand(4, -1, -1, -1), noise[:1].expand(4, -1, -1, -1)
    want = torch.from_numpy(np.sqrt(ac)).view(-1, 1, 1, 1) * x0 + torch.from_numpy(np.sqrt(1 - ac)).view(
        -1, 1, 1, 1) * noise
    assert (s.add_noise(x0, noise, idx) - want).abs().max() <= 1e-12
    f = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    out = f.scale_noise(x0, torch.tensor([250.0]), noise)
    assert (out - (0.75 * x0 + 0.25 * noise)).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------ (e), (g) config

def _diffusers_schedulers():
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, PNDMScheduler)

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return {
        "DDPM": DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
        "DDIM": DDIMScheduler(**sd, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "PNDM": PNDMScheduler(**sd, skip_prk_steps=True, steps_offset=1),
        "DPMSolverMultistep": DPMSolverMultistepScheduler(**sd, use_karras_sigmas=True),
        "Euler": EulerDiscreteScheduler(**sd, prediction_type="v_prediction"),
        "DPMSolverMultistep-flow": DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                               prediction_type="flow_prediction"),
        "FlowMatchEuler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


@pytest.mark.parametrize("source", list(_diffusers_schedulers()))
@pytest.mark.parametrize("cls", [DPMSolveScheduler, UniPCScheduler, DPMSolverSinglestepScheduler])
def test_from_config_of_diffusers_schedulers(source, cls, tmp_path):
    theirs = _diffusers_schedulers()[source]
    configs = [theirs.config]
    theirs.save_pretrained(tmp_path)  # a config loaded from disk carries _class_name
    configs.append(cls.load_config(tmp_path))
    for config in configs:
        s = cls.from_config(config)
        flow = source.endswith("flow") or source == "FlowMatchEuler"
        assert s.config.use_flow_sigmas == flow
        if flow:
            assert s.config.prediction_type == "flow_prediction" and s.config.flow_shift == 3.0
        else:
            for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"):
                assert s.config[key] == theirs.config[key]
            betas = theirs.betas.numpy().astype(np.float64)
            np.testing.assert_allclose(s.schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
        # The generic class runs the source scheduler's own method where dpmsolve has it (from_config).
        own = {"DDIM": "ddim", "PNDM": "plms", "Euler": "euler"}.get(source) if cls is DPMSolveScheduler else None
        assert s.config.solver == (own or cls._default_solver)
        s.set_timesteps(4)
        out = hand_loop(s, start_noise(dtype=torch.float32), net=lambda x, t: toy_net(x.double(), t).float())
        assert torch.isfinite(out).all()


def test_from_config_overrides_and_beta_schedules():
    s = DPMSolveScheduler.from_config(_diffusers_schedulers()["FlowMatchEuler"].config, flow_shift=5.0)
    assert s.config.flow_shift == 5.0
    from diffusers import DDPMScheduler

    for kwargs in (dict(beta_schedule="squaredcos_cap_v2"), dict(rescale_betas_zero_snr=True),
                   dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())):
        theirs = DDPMScheduler(**kwargs)
        ours = DPMSolveScheduler.from_config(theirs.config)
        ac = theirs.alphas_cumprod.numpy().astype(np.float64)
        # diffusers clamps a zero-SNR alpha_bar[-1] to 2**-24 even where alpha_bar[-2] is smaller (linear
        # betas): it would rise at the last step, so ours continues it geometrically there.
        np.testing.assert_allclose(ours.schedule.alphas_cumprod[:-1], ac[:-1], rtol=2e-5, atol=1e-9)
        assert 0 < ours.schedule.alphas_cumprod[-1] < ours.schedule.alphas_cumprod[-2]
        ours.set_timesteps(5)
        assert torch.isfinite(hand_loop(ours, start_noise())).all()
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       rescale_betas_zero_snr=True)
    ours = DPMSolveScheduler.from_config(sd.config)
    np.testing.assert_allclose(ours.schedule.alphas_cumprod[:-1], sd.alphas_cumprod.numpy()[:-1], rtol=1e-4)  # theirs: float32
    assert ours.schedule.alphas_cumprod[-1] == 2.0**-24  # DPMSolverMultistepScheduler's clamp


@pytest.mark.parametrize("cls", [DPMSolveScheduler, DDIMSolveScheduler, DPMSolverPPMultistepScheduler,
                                 DPMSolverSinglestepScheduler, UniPCScheduler])
def test_save_pretrained_round_trip(cls, tmp_path):
    s = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, grid="karras",
            grid_options={"rho": 5.0}, final_sigma="min")
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__ and saved["solver"] == cls._default_solver
    for loader in (cls, DPMSolveScheduler):  # the generic class rebuilds any preset from its saved config
        r = loader.from_pretrained(tmp_path)
        assert r.config.solver == s.config.solver and r.config.solver_options == s.config.solver_options
        assert repr(r.solver) == repr(s.solver)
        s.set_timesteps(6)
        r.set_timesteps(6)
        assert torch.equal(s.timesteps, r.timesteps)
        x = start_noise()
        assert torch.equal(hand_loop(s, x.clone()), hand_loop(r, x.clone()))


# ------------------------------------------------------------------------------------------ (b) DDPMPipeline

def _tiny_unet():
    torch.manual_seed(0)
    return tiny_unet().float().eval()


@pytest.mark.parametrize("cls", [UniPCScheduler, DPMSolverSinglestepScheduler, DPMSolverPPMultistepScheduler])
def test_ddpm_pipeline(cls):
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.set_default_dtype(torch.float32)
    unet = _tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # The same run by hand, and by dp.sample.
    s = pipe.scheduler
    s.set_timesteps(5)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = hand_loop(s, x.clone(), net=lambda x, t: unet(x, t).sample, generator=torch.Generator())
        den = dp.wrap_model(unet, s.schedule, "eps", time_input="discrete")
        ref = dp.sample(den, x.clone(), s.config.solver, grid=s._ts, progress=False, **s.config.solver_options).x
    to_np = lambda v: (v / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, to_np(by_hand), atol=1e-6)
    assert (by_hand - ref).abs().max() < 1e-4 * ref.abs().max()


# ------------------------------------------------------------------------------------------ (c) SD + CFG

def test_stable_diffusion_pipeline_with_cfg(tmp_path):
    pytest.importorskip("transformers")
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    pipe = tiny_stable_diffusion(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverPPMultistepScheduler.from_config(pipe.scheduler.config, grid="karras")
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, height=8, width=8)
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert latents.shape == (1, 4, 8, 8) and images.shape == (1, 8, 8, 3) and np.isfinite(images).all()

    # dp.sample with the CFG wrapper on the pipeline's own prompt embeddings and start noise.
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True)
        den = dp.wrap_model(pipe.unet, pipe.scheduler.schedule, "eps", time_input="discrete")
        cfg = dp.ClassifierFreeGuidance(den, 5.0, cond={"encoder_hidden_states": cond},
                                        uncond={"encoder_hidden_states": uncond})
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        pipe.scheduler.set_timesteps(6)
        ref = dp.sample(cfg, x, "dpmsolver++", order=2, grid=pipe.scheduler._ts, progress=False).x
    assert (latents - ref).abs().max() < 1e-4 * ref.abs().max()


# ------------------------------------------------------------------------------------------ (d) SD3 flow

def test_sd3_flow_matching_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        norm_num_groups=4, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.06, scaling_factor=1.5).eval()
    # No text encoders: the prompt embeddings are given directly (SD3 accepts None components then).
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = UniPCScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
    g = torch.Generator().manual_seed(1)
    pe, npe, pp, npp = (torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g),
                        torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g))
    embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pp,
                  negative_pooled_prompt_embeds=npp)
    latents = pipe(**embeds, num_inference_steps=5, guidance_scale=4.0, height=8, width=8, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()

    def net(x, t, encoder_hidden_states, pooled_projections):
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections).sample

    with torch.no_grad():
        s = pipe.scheduler
        den = dp.wrap_model(net, s.schedule, "flow", time_input="1000t")
        cfg = dp.ClassifierFreeGuidance(den, 4.0, cond={"encoder_hidden_states": pe, "pooled_projections": pp},
                                        uncond={"encoder_hidden_states": npe, "pooled_projections": npp})
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        s.set_timesteps(5)
        ref = dp.sample(cfg, x, "unipc", order=2, grid=s._ts, progress=False).x
    assert (latents - ref).abs().max() < 1e-4 * ref.abs().max()


def test_pipeline_save_and_load_with_our_scheduler(tmp_path):
    """model_index.json names our module, so DiffusionPipeline.from_pretrained rebuilds the scheduler offline."""
    from diffusers import DDPMPipeline

    torch.set_default_dtype(torch.float32)
    pipe = DDPMPipeline(unet=_tiny_unet(), scheduler=UniPCScheduler(grid="karras", final_sigma="min"))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["dpmsolve.integrations.diffusers", "UniPCScheduler"]
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is UniPCScheduler
    assert loaded.scheduler.config.grid == "karras" and loaded.scheduler.config.final_sigma == "min"


def test_dpm_solver_v3_runs_in_the_scheduler_from_an_ems_file(tmp_path):
    """DPM-Solver-v3 is one more fixed-grid solver for the adapter: its statistics travel in the scheduler config
    as a file path (JSON-serialisable), and the hand loop equals dp.sample with the same statistics."""
    s = DPMSolveScheduler(solver="dpmsolver++", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = dp.wrap_model(toy_net, s.schedule, "epsilon", time_input="discrete")
    stats = dp.ems.compute(den, n_data=16, shape=SHAPE[1:], n_lambdas=20, batch_size=16, dtype=torch.float64,
                           progress=False, model_id="toy")
    path = str(stats.save(tmp_path / "toy.ems.safetensors"))
    options = {"ems": path, "order": 2}
    s = DPMSolveScheduler(solver="dpmsolver-v3", solver_options=options, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012, final_sigma="min")
    s.set_timesteps(7)
    x = start_noise()
    ours = hand_loop(s, x.clone())
    theirs = native(s, toy_net, x.clone(), "dpmsolver-v3", {"ems": stats, "order": 2})
    assert (ours - theirs).abs().max().item() <= 1e-12
    s.save_pretrained(tmp_path / "sched")
    again = DPMSolveScheduler.from_pretrained(tmp_path / "sched")
    again.set_timesteps(7)
    assert torch.equal(hand_loop(again, x.clone()), ours)
    pp = DPMSolveScheduler(solver="dpmsolver++", solver_options={"order": 2}, beta_schedule="scaled_linear",
                           beta_start=0.00085, beta_end=0.012, final_sigma="min")
    pp.set_timesteps(7)
    assert (hand_loop(pp, x.clone()) - ours).abs().max() > 1e-6     # the statistics do change the sample


# ------------------------------------------------------------------------------------------ plans

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _plan_file(tmp_path, kind="to_zero", schedule=None, name="p", **fields):
    """A plan saved as a file for the scheduler's schedule (SD's scaled-linear betas by default)."""
    schedule = schedule or DPMSolveScheduler(**SD).schedule
    shape = fields.pop("data_shape", SHAPE[1:])
    if kind == "to_zero":     # time_power grid to sigma = 0, order 3 + UniC corrector
        plan = dp.Plan.multistep(dp.make_grid(schedule, 6, "time_power", t_end=0.0), order=3, rule="taylor",
                                 corrector="unic", schedule=schedule.fingerprint(), data_shape=shape, **fields)
    elif kind == "denoise":   # noise prediction to t_min, then a final denoising evaluation
        plan = dp.Plan.multistep(dp.make_grid(schedule, 6, "logSNR"), predict="noise", denoise_to_zero=True,
                                 schedule=schedule.fingerprint(), data_shape=shape, **fields)
    elif kind == "mixed":     # per-step settings that no registry solver has: prediction switch, compensation
        ts = dp.make_grid(schedule, 7, "logSNR", t_end=0.0)
        steps = [dp.PlanStep("noise", 2, "taylor", "unic"), dp.PlanStep("noise", 2, "taylor"),
                 dp.PlanStep("data", 3, "taylor", "unic-bh2", 0.1), dp.PlanStep("data", 3, "taylor", None, -0.05),
                 dp.PlanStep("data", 2, "bh1"), dp.PlanStep("data", 2, "dpmsolver"), dp.PlanStep("data", 1)]
        plan = dp.Plan(tuple(ts), tuple(steps), schedule=schedule.fingerprint(), data_shape=shape, **fields)
    else:                     # to t_min, default DPM-Solver++(2M) settings
        plan = dp.Plan.multistep(dp.make_grid(schedule, 5, "logSNR"), schedule=schedule.fingerprint(),
                                 data_shape=shape, **fields)
    return plan, str(plan.save(tmp_path / f"{name}.plan.json"))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["to_zero", "denoise", "mixed", "t_min"])
def test_plan_hand_loop_equals_native_sample(tmp_path, kind, prediction):
    """A scheduler with a plan file runs the plan's times and step settings: a diffusers-style loop equals
    dp.sample(den, x_T, plan)."""
    plan, path = _plan_file(tmp_path, kind)
    s = DPMSolveScheduler(**SD, prediction_type=prediction, plan=path)
    assert s.plan == plan and s.config.plan == path
    s.set_timesteps(plan.nfe)
    assert s.num_inference_steps == len(s.timesteps) == plan.nfe and len(s.sigmas) == plan.nfe + 1
    assert (float(s.sigmas[-1]) == 0.0) == plan.to_zero
    evaluated = plan.ts if plan.denoise_to_zero else plan.ts[:-1]
    np.testing.assert_allclose(s.timesteps.numpy(), 1000 * np.asarray(evaluated) - 1, rtol=1e-6)
    x = start_noise()
    ours = hand_loop(s, x.clone())
    den = dp.wrap_model(toy_net, s.schedule, prediction, time_input="discrete")
    theirs = dp.sample(den, x.clone(), plan, progress=False)
    assert theirs.nfe == plan.nfe
    assert (ours - theirs.x).abs().max().item() <= 1e-12
    s.set_timesteps()  # None: the plan's count
    assert torch.equal(hand_loop(s, x.clone()), ours)



def test_plan_with_v3_steps_takes_the_schedulers_statistics(tmp_path):
    """EMS steps (DPM-Solver-v3) in a plan file: the scheduler gives them solver_options['ems']."""
    schedule = DPMSolveScheduler(**SD).schedule
    ts = dp.make_grid(schedule, 6, "logSNR", t_end=0.0)
    steps = [dp.PlanStep("ems", 2, "taylor", "v3" if 0 < i < 5 else None) for i in range(6)]
    plan = dp.Plan(tuple(ts), tuple(steps), schedule=schedule.fingerprint(), data_shape=SHAPE[1:])
    path = str(plan.save(tmp_path / "v3.plan.json"))
    s = DPMSolveScheduler(**SD, plan=path, solver="dpmsolver-v3", solver_options={"ems": "degenerate"})
    s.set_timesteps(plan.nfe)
    x = start_noise()
    den = dp.wrap_model(toy_net, s.schedule, "epsilon", time_input="discrete")
    expected = dp.sample(den, x.clone(), plan, ems="degenerate", progress=False).x
    assert (hand_loop(s, x.clone()) - expected).abs().max().item() <= 1e-12
    with pytest.raises(dp.ems.EMSError, match="pass the model's statistics"):
        DPMSolveScheduler(**SD, plan=path)

def test_plan_in_a_flow_scheduler(tmp_path):
    s = DPMSolveScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    plan, path = _plan_file(tmp_path, "to_zero", schedule=s.schedule)
    s = UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", plan=path)  # presets too
    s.set_timesteps(plan.nfe)
    x = start_noise()
    den = dp.wrap_model(toy_net, s.schedule, "flow", time_input="1000t")
    assert (hand_loop(s, x.clone()) - dp.sample(den, x.clone(), plan, progress=False).x).abs().max() <= 1e-12


@pytest.mark.parametrize("kind", ["mixed", "denoise"])
@pytest.mark.parametrize("begin", [2, 5])
def test_plan_img2img_runs_the_plans_tail(tmp_path, kind, begin):
    """set_begin_index(k): the plan's steps from k on, on its times from k on (its history builds up again)."""
    plan, path = _plan_file(tmp_path, kind)
    s = DPMSolveScheduler(**SD, plan=path)
    s.set_timesteps(plan.nfe)
    x = start_noise()
    s.set_begin_index(begin)
    ours = hand_loop(s, x.clone(), timesteps=s.timesteps[begin:])
    den = dp.wrap_model(toy_net, s.schedule, "epsilon", time_input="discrete")
    tail = dp.Plan(plan.ts[begin:], plan.steps[begin:], plan.denoise_to_zero)
    assert (ours - dp.sample(den, x.clone(), tail, progress=False).x).abs().max() <= 1e-12


def test_plan_refusals(tmp_path):
    plan, path = _plan_file(tmp_path, "t_min")
    # Made for another schedule: refused when the scheduler is built, naming the file.
    with pytest.raises(dp.PlanError, match="schedule") as info:
        DPMSolveScheduler(beta_schedule="linear", plan=path)
    assert path in str(info.value)
    with pytest.raises(dp.PlanError, match="schedule"):
        DPMSolveScheduler.from_config(DPMSolveScheduler().config, plan=path)
    with pytest.raises(dp.PlanError, match="No plan file") as info:
        DPMSolveScheduler(**SD, plan=str(tmp_path / "missing.json"))
    assert "missing.json" in str(info.value)
    with pytest.raises(ValueError, match="plan.save"):
        DPMSolveScheduler(**SD, plan=plan)  # the config holds a path, not the object
    s = DPMSolveScheduler(**SD, plan=path)
    # A count that is not the plan's, explicit grids.
    with pytest.raises(ValueError, match=r"num_inference_steps=7 .* 5 model evaluations"):
        s.set_timesteps(7)
    with pytest.raises(ValueError, match="own times"):
        s.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="own times"):
        s.set_timesteps(5, timesteps=[999, 500, 100])
    # Samples of another shape: refused on the first step.
    s.set_timesteps(5)
    x = torch.zeros(2, 16, 1, 1)
    with pytest.raises(dp.PlanError, match="shape") as info:
        s.step(toy_net(x, s.timesteps[0]), s.timesteps[0], x)
    assert path in str(info.value)


@pytest.mark.parametrize("cls", [DPMSolveScheduler, DPMSolverPPMultistepScheduler, UniPCScheduler])
def test_plan_config_round_trip(tmp_path, cls):
    plan, path = _plan_file(tmp_path, "mixed")
    s = cls(**SD, plan=path)
    s.save_pretrained(tmp_path / "sched")
    saved = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert saved["plan"] == path and saved["_class_name"] == cls.__name__
    x = start_noise()
    s.set_timesteps(plan.nfe)
    expected = hand_loop(s, x.clone())
    for again in (cls.from_pretrained(tmp_path / "sched"), DPMSolveScheduler.from_pretrained(tmp_path / "sched"),
                  DPMSolveScheduler.from_config(s.config), cls.from_config(dict(s.config))):
        assert again.config.plan == path and again.plan == plan
        again.set_timesteps(plan.nfe)
        assert torch.equal(hand_loop(again, x.clone()), expected)
    # A diffusers scheduler's config + plan=...; and plan=None turns it off again.
    from diffusers import DDIMScheduler

    theirs = DDIMScheduler(**SD)
    assert DPMSolveScheduler.from_config(theirs.config, plan=path).plan == plan
    assert DPMSolveScheduler.from_config(s.config, plan=None).plan is None


def test_plan_in_a_ddpm_pipeline(tmp_path):
    """A real pipeline with a plan file in its scheduler equals dp.sample with the plan."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.set_default_dtype(torch.float32)
    unet = _tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    schedule = DPMSolveScheduler.from_config(pipe.scheduler.config).schedule
    plan, path = _plan_file(tmp_path, "mixed", schedule=schedule, data_shape=(3, 8, 8))
    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, plan=path)
    with pytest.raises(ValueError, match="num_inference_steps=1000"):   # DDPMPipeline's default count
        pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np")
    images = pipe(batch_size=2, num_inference_steps=plan.nfe, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        den = dp.wrap_model(unet, schedule, "eps", time_input="discrete")
        ref = dp.sample(den, x, plan, progress=False).x
    to_np = lambda v: (v / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, to_np(ref), atol=1e-4)
