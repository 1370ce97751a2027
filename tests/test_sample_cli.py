"""``dpmsolve sample``: a saved (tiny, random, offline) diffusers pipeline sampled by our scheduler from the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from dpmsolve.cli import main  # noqa: E402
from dpmsolve.integrations.diffusers import DPMSolveScheduler  # noqa: E402
from dpmsolve.sample_cli import NO_PIPELINE_MESSAGE  # noqa: E402
from tiny_pipelines import tiny_stable_diffusion, tiny_unet  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def float32():
    torch.set_default_dtype(torch.float32)  # as in a fresh process (the autouse fixture restores float64)


def _tiny_unet():
    torch.manual_seed(0)
    return tiny_unet().float().eval()


@pytest.fixture
def ddpm_dir(tmp_path, float32):
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path / "ddpm"
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def _pngs(folder):
    files = sorted(folder.glob("*.png"))
    return files, [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype("uint8")  # diffusers' numpy_to_pil


def test_sample_ddpm_pipeline_equals_python_run(ddpm_dir, tmp_path, capsys):
    from diffusers import DDPMPipeline

    out = tmp_path / "out"
    assert main(["sample", str(ddpm_dir), "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    files, arrays = _pngs(out)
    assert [f.name for f in files] == [f"sample_{i:04d}.png" for i in range(4)]   # --batch 4 by default
    assert all(a.shape == (8, 8, 3) for a in arrays)
    printed = capsys.readouterr().out
    assert "Wrote 4 image(s) of 8x8 pixels" in printed and str(out) in printed and "dpmsolver++" in printed

    # The same pipeline in Python with our scheduler: identical pixels.
    pipe = DDPMPipeline.from_pretrained(ddpm_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, solver="dpmsolver++",
                                                   solver_options={"order": 2}, grid="logSNR", final_sigma="zero")
    images = pipe(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_array_equal(np.stack(arrays), _to_uint8(images))


def test_sample_options_reach_the_scheduler(ddpm_dir, tmp_path):
    from diffusers import DDPMPipeline

    out = tmp_path / "out"
    assert main(["sample", str(ddpm_dir), "--solver", "unipc", "--order", "3", "--grid", "karras", "--final", "min",
                 "--steps", "4", "--seed", "7", "--batch", "2", "--out", str(out), "--device", "cpu"]) == 0
    _, arrays = _pngs(out)
    pipe = DDPMPipeline.from_pretrained(ddpm_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, solver="unipc",
                                                   solver_options={"order": 3}, grid="karras", final_sigma="min")
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
                  output_type="np").images
    np.testing.assert_array_equal(np.stack(arrays), _to_uint8(images))
    # ddim has no order option: the default order is simply not passed.
    assert main(["sample", str(ddpm_dir), "--solver", "ddim", "--steps", "2", "--batch", "1",
                 "--out", str(tmp_path / "ddim"), "--device", "cpu"]) == 0
    assert len(_pngs(tmp_path / "ddim")[0]) == 1


def test_sample_text_to_image_pipeline(tmp_path, float32, capsys):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    pipe = tiny_stable_diffusion(tmp_path)
    path = tmp_path / "sd"
    pipe.save_pretrained(path)

    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["sample", str(path), "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert "text-to-image pipeline: pass --prompt" in capsys.readouterr().err
    assert main(["sample", str(path), "--prompt", "a cat", "--guidance", "5", "--steps", "3", "--batch", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    _, arrays = _pngs(out)
    assert len(arrays) == 2 and all(a.shape == (8, 8, 3) for a in arrays)

    loaded = type(pipe).from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    loaded.scheduler = DPMSolveScheduler.from_config(loaded.scheduler.config, solver="dpmsolver++",
                                                     solver_options={"order": 2}, final_sigma="zero")
    images = loaded("a cat", guidance_scale=5.0, num_inference_steps=3, num_images_per_prompt=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(np.stack(arrays), _to_uint8(images))


def test_without_pipeline_or_model_says_what_to_pass(capsys):
    assert main(["sample"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == NO_PIPELINE_MESSAGE
    assert "--model digits" in err and "diffusers pipeline" in err


def test_sample_shipped_digits_model(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["sample", "--model", "digits", "--steps", "5", "--batch", "3", "--label", "7",
                 "--out", str(out)]) == 0
    paths, arrays = _pngs(out)
    assert len(arrays) == 3 and all(a.shape == (32, 32, 3) for a in arrays)
    assert all("label7" in p.name for p in paths)
    with pytest.raises(SystemExit):
        main(["sample", "--model", "nope", "--out", str(out)])
    assert "shipped models: digits" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["digits", "patches"])
def test_sample_shipped_model_with_dpm_solver_v3(model, tmp_path, capsys):
    """--solver dpmsolver-v3 on a shipped model uses the statistics shipped with it; the images equal dp.sample's."""
    import dpmsolve as dp
    from dpmsolve import zoo

    out = tmp_path / model
    assert main(["sample", "--model", model, "--solver", "dpmsolver-v3", "--steps", "6", "--batch", "2",
                 "--out", str(out)]) == 0
    _, arrays = _pngs(out)
    m = zoo.load(model)
    den = m.denoiser if model == "patches" else zoo.guided(m, torch.arange(2), 3.0)
    x = torch.randn((2, *m.shape), generator=torch.Generator().manual_seed(0))   # as the command draws it
    scale = None if model == "patches" else 3.0
    ems = zoo.statistics(model, scale)
    ref = dp.sample(den, x, "dpmsolver-v3", ems=ems, steps=6, t_end=0.0, seed=0, progress=False,
                    **dp.DPMSolverV3.recommended(scale)).x
    pixels = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    first = pixels[0].reshape(pixels.shape[-2:]) if pixels.shape[1] == 1 else pixels[0].transpose(1, 2, 0)
    got = arrays[0][::4, ::4] if arrays[0].ndim == 2 or pixels.shape[1] == 3 else arrays[0][::4, ::4, 0]
    assert np.array_equal(np.asarray(got).reshape(first.shape), first)


def test_errors(tmp_path, ddpm_dir, capsys):
    def fails(args, message):
        with pytest.raises(SystemExit) as info:
            main(["sample", *args, "--out", str(tmp_path / "never"), "--device", "cpu"])
        assert info.value.code == 2
        assert message in capsys.readouterr().err

    fails([str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "not a diffusers pipeline: it has no model_index.json")
    (tmp_path / "file.txt").write_text("x")
    fails([str(tmp_path / "file.txt")], "is a file, not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    fails([str(broken)], "could not load the diffusers pipeline")
    fails([str(ddpm_dir), "--prompt", "a cat"], "unconditional pipeline: it takes no --prompt")
    fails([str(ddpm_dir), "--guidance", "3"], "unconditional pipeline: it takes no --guidance")
    fails([str(ddpm_dir), "--solver", "nope"], "Unknown solver 'nope'")
    fails([str(ddpm_dir), "--solver", "ddim", "--order", "2"], "DDIM has no option(s) order")
    fails([str(ddpm_dir), "--grid", "nope"], "could not build the dpmsolve scheduler")
    fails([str(ddpm_dir), "--steps", "0"], "--steps must be >= 1")
    fails([str(ddpm_dir), "--final", "max"], "invalid choice")
    assert not (tmp_path / "never").exists()


# ----- --plan FILE: a tuned plan instead of --solver / --steps

def _mixed_plan(schedule, shape, n=4, **fields):
    """A plan no --solver gives: noise prediction first, then data prediction of order 3 with a UniC corrector."""
    import dpmsolve as dp

    ts = dp.make_grid(schedule, n, "time_power", t_end=0.0)
    steps = [dp.PlanStep("noise", 2, "taylor"), dp.PlanStep("data", 3, "taylor", "unic")]
    steps += [dp.PlanStep("data", 3, "taylor")] * (n - 2)
    return dp.Plan(tuple(ts), tuple(steps), schedule=schedule.fingerprint(), data_shape=shape, **fields)


def test_sample_pipeline_with_a_plan(ddpm_dir, tmp_path, capsys):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(ddpm_dir)
    pipe.set_progress_bar_config(disable=True)
    schedule = DPMSolveScheduler.from_config(pipe.scheduler.config).schedule
    plan = _mixed_plan(schedule, (3, 8, 8))
    path = str(plan.save(tmp_path / "ddpm.plan.json"))
    out = tmp_path / "out"
    assert main(["sample", str(ddpm_dir), "--plan", path, "--batch", "2", "--seed", "3", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert f"plan {path}" in capsys.readouterr().out
    _, arrays = _pngs(out)
    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, plan=path)
    images = pipe(batch_size=2, num_inference_steps=plan.nfe, generator=torch.Generator().manual_seed(3),
                  output_type="np").images
    np.testing.assert_array_equal(np.stack(arrays), _to_uint8(images))


def test_sample_shipped_model_with_a_plan(tmp_path, capsys):
    import dpmsolve as dp
    from dpmsolve import zoo

    m = zoo.load("digits")
    plan = _mixed_plan(m.schedule, m.shape, n=5)
    path = str(plan.save(tmp_path / "digits.plan.json"))
    out = tmp_path / "digits"
    assert main(["sample", "--model", "digits", "--plan", path, "--batch", "2", "--out", str(out)]) == 0
    assert "5 NFE (5 used)" in capsys.readouterr().out
    _, arrays = _pngs(out)
    x = torch.randn((2, *m.shape), generator=torch.Generator().manual_seed(0))   # as the command draws it
    ref = dp.sample(zoo.guided(m, torch.arange(2), 3.0), x, plan, progress=False).x
    pixels = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(arrays[0][::4, ::4, 0], pixels[0, 0])
    # A shipped plan with DPM-Solver-v3 steps runs with the statistics shipped for the model and guidance.
    from dpmsolve.zoo.plans import plan_path

    shipped = plan_path("digits", 6, 3.0)
    assert main(["sample", "--model", "digits", "--plan", str(shipped), "--batch", "2", "--out", str(out)]) == 0
    assert "E2ta" in capsys.readouterr().out
    expected = dp.sample(zoo.guided(m, torch.arange(2), 3.0), x, zoo.plan("digits", 6), progress=False).x
    pixels = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(_pngs(out)[1][0][::4, ::4, 0], pixels[0, 0])
    # A plan tuned for another model (identity recorded by dpmsolve.tune) is refused.
    from dpmsolve.tuning import search
    assert search.model_identity(zoo.guided(m, torch.arange(2), 3.0)).endswith("|cfg=3")
    other = _mixed_plan(m.schedule, m.shape, model="net@0123456789abcdef|cfg=3").save(tmp_path / "other.plan.json")
    with pytest.raises(SystemExit):
        main(["sample", "--model", "digits", "--plan", str(other), "--out", str(tmp_path / "never")])
    assert "made for the model" in capsys.readouterr().err


def test_plan_errors(tmp_path, ddpm_dir, capsys):
    import dpmsolve as dp

    def fails(args, message):
        with pytest.raises(SystemExit) as info:
            main(["sample", *args, "--out", str(tmp_path / "never"), "--device", "cpu"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        return err

    path = str(_mixed_plan(dp.DiscreteVP.linear(), (3, 8, 8)).save(tmp_path / "p.plan.json"))
    fails([str(ddpm_dir), "--plan", path, "--steps", "5"], "give no --steps with it")
    fails(["--model", "digits", "--plan", path, "--solver", "unipc", "--steps", "4"], "give no --solver / --steps")
    fails([str(ddpm_dir), "--plan", path, "--grid", "karras"], "give no --grid")
    fails([str(ddpm_dir), "--plan", str(tmp_path / "missing.json")], "No plan file")
    cosine = str(_mixed_plan(dp.CosineVP(), (3, 8, 8)).save(tmp_path / "cos.plan.json"))
    fails([str(ddpm_dir), "--plan", cosine], f"--plan {cosine}: This plan was made for the schedule")
    fails(["--model", "digits", "--plan", path], "shape")   # digits: (1, 8, 8)
    wide = str(_mixed_plan(dp.DiscreteVP.linear(), (4, 8, 8)).save(tmp_path / "wide.plan.json"))
    fails([str(ddpm_dir), "--plan", wide], "shape")         # the pipeline's latents: (3, 8, 8)
    assert not (tmp_path / "never").exists()


# ----- help, --upscale, --device

def test_help_mentions_model_upscale_and_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL" in out and "shipped model (--model digits)" in out
    assert "upscaled --upscale times" in out and "(default: 4)" in out and "dpmsolve sample --model digits" in out


def test_model_output_says_upscaled_and_upscale_option(tmp_path, capsys):
    assert main(["sample", "--model", "digits", "--steps", "3", "--batch", "1", "--out", str(tmp_path / "a")]) == 0
    assert "of 32x32 pixels (8x8 samples upscaled 4x)" in capsys.readouterr().out
    assert main(["sample", "--model", "digits", "--steps", "3", "--batch", "1", "--upscale", "1",
                 "--out", str(tmp_path / "b")]) == 0
    assert "of 8x8 pixels to" in capsys.readouterr().out
    assert _pngs(tmp_path / "b")[1][0].shape == (8, 8, 3)
    assert np.array_equal(_pngs(tmp_path / "a")[1][0][::4, ::4], _pngs(tmp_path / "b")[1][0])


def test_model_honours_device(tmp_path, monkeypatch, capsys):
    """--device reaches the network, the noise and the labels (the meta device exists on every torch build)."""
    import dpmsolve.sampling
    from dpmsolve import zoo

    loaded, seen = [], {}
    real_load = zoo.load

    def load(name):
        loaded.append(real_load(name))
        return loaded[-1]

    def guided(model, labels, scale):
        seen["labels"] = labels.device
        return model.denoiser

    def fake_sample(denoiser, x, *args, **kwargs):
        seen["x"] = x.device
        return SimpleNamespace(x=torch.zeros(x.shape), nfe=3)

    monkeypatch.setattr(zoo, "load", load)
    monkeypatch.setattr(zoo, "guided", guided)
    monkeypatch.setattr(dpmsolve.sampling, "sample", fake_sample)
    assert main(["sample", "--model", "digits", "--steps", "3", "--batch", "2", "--device", "meta",
                 "--out", str(tmp_path)]) == 0
    assert seen == {"x": torch.device("meta"), "labels": torch.device("meta")}
    assert next(loaded[0].net.parameters()).device == torch.device("meta")
    assert "on meta" in capsys.readouterr().out


def test_unavailable_device_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as info:
        main(["sample", "--model", "digits", "--device", "cuda", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("dpmsolve: error: --device cuda is not available here")
    assert not (tmp_path / "never").exists()


def test_pipeline_run_prints_no_third_party_warnings(ddpm_dir, tmp_path):
    """In a fresh process with every warning shown (-W default): no diffusers deprecation / config / logger
    chatter on stderr (diffusers' logger says "Cannot initialize model with low cpu memory usage ... accelerate")."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "default", "-m", "dpmsolve", "sample", str(ddpm_dir), "--steps", "2",
                           "--batch", "1", "--out", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Wrote 1 image(s)" in proc.stdout
    assert "Warning" not in proc.stderr and "accelerate" not in proc.stderr, proc.stderr
    assert "deprecat" not in proc.stderr.lower() and "config attributes" not in proc.stderr
