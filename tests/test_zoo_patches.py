"""The shipped patches model, the patches distance and the zoo models as lab problems (cached references)."""

import json

import pytest
import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.zoo.metrics import blurred_noise, patches_distance, sliced_wasserstein
from dpmsolve.zoo.nets import PatchesUNet
from dpmsolve.zoo.train import (PATCH, PATCH_BLOCK, heldout_blocks, patches_data, random_patches, train_positions,
                                v_loss)


@pytest.fixture(scope="module")
def patches():
    return zoo.load("patches")


@pytest.fixture(scope="module")
def heldout():
    return patches_data("test")


def test_patches_loads_offline_and_deterministically(no_network):
    rng = torch.get_rng_state()
    a, b = zoo.load("patches"), zoo.load("patches")
    assert torch.equal(torch.get_rng_state(), rng)
    assert zoo.weights_path("patches").stat().st_size < 5 * 2**20
    assert not a.net.training and all(p.dtype == torch.float32 for p in a.net.parameters())
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(3, *a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    pa, pb = a.denoiser(x, 0.5), b.denoiser(x, 0.5)
    assert torch.equal(pa.x0, pb.x0) and torch.equal(pa.eps, pb.eps)


def test_patches_metadata(patches):
    meta = patches.metadata
    assert meta["name"] == "patches" and meta["prediction"] == "v" and meta["time_input"] == "1000t"
    assert meta["schedule"] == "CosineVP()" and meta["seed"] == "0" and meta["format"] == "dpmsolve.zoo/1"
    for key in ("steps", "train_seconds", "final_loss", "heldout_loss", "num_params"):
        assert key in meta, key
    assert isinstance(patches.schedule, dp.CosineVP) and patches.schedule.fingerprint() == dp.CosineVP().fingerprint()
    assert patches.shape == (3, 32, 32) and patches.num_classes == 0
    assert patches.denoiser.network_time(0.5) == pytest.approx(500.0)
    with pytest.raises(ValueError, match="unconditional"):
        zoo.guided(patches, [0])


def test_patches_sample_shape_dtype_and_seed(patches):
    x = torch.randn(4, *patches.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    s1 = dp.sample(patches.denoiser, x, "dpmsolver++", steps=5, t_end=0.0, progress=False)
    s2 = dp.sample(patches.denoiser, x, "dpmsolver++", steps=5, t_end=0.0, progress=False)
    assert s1.x.shape == (4, 3, 32, 32) and s1.x.dtype == torch.float32 and s1.nfe == 5
    assert torch.isfinite(s1.x).all() and torch.equal(s1.x, s2.x)


def test_heldout_v_loss_beats_untrained_net(patches, heldout):
    torch.manual_seed(0)
    untrained = PatchesUNet(**json.loads(patches.metadata["net_kwargs"])).float().eval()
    x = heldout[::4]
    with torch.no_grad():
        for t in (0.3, 0.6):
            trained = v_loss(patches.net, x, generator=torch.Generator().manual_seed(1), t=t).item()
            base = v_loss(untrained, x, generator=torch.Generator().manual_seed(1), t=t).item()
            assert trained < 0.5 * base, (t, trained, base)


def test_heldout_blocks_never_overlap_training_crops():
    blocks = heldout_blocks()
    assert len(blocks) == 8 and len(set(blocks)) == 8
    pos = train_positions()
    for k, top, left in blocks:
        mine = pos[pos[:, 0] == k]
        overlap = ((mine[:, 1] < top + PATCH_BLOCK) & (mine[:, 1] + PATCH > top)
                   & (mine[:, 2] < left + PATCH_BLOCK) & (mine[:, 2] + PATCH > left))
        assert not overlap.any()
    x = random_patches(8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert patches_data("test").shape == (200, 3, 32, 32)


def test_sliced_wasserstein_is_a_deterministic_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 12, generator=g), torch.randn(40, 12, generator=g) + 1.0
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, b) == sliced_wasserstein(a, b) > 0.3
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=0.1)
    with pytest.raises(ValueError, match="dimensions"):
        sliced_wasserstein(a, b[:, :5])


def test_patches_distance_puts_samples_with_real_patches_far_from_blurred_noise(patches, heldout):
    # Distances to the default reference (2000 training crops), 32 images each. Samples of the shipped model at
    # 20 NFE score like real patches (0.31-0.37 over three seeds, real training crops 0.33-0.42, held-out
    # 0.41-0.46: the held-out blocks are other parts of the photos); blurred noise with the data's colour
    # statistics scores 0.93.
    n = 32
    held = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:n]]
    train = random_patches(n, generator=torch.Generator().manual_seed(100), flip=False)
    x = torch.randn(n, *patches.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    samples = dp.sample(patches.denoiser, x, "dpmsolver++", steps=20, t_end=0.0, progress=False).x
    d_train, d_held, d_samples, d_noise = (patches_distance(v) for v in (train, held, samples, blurred_noise(n)))
    assert patches_distance(held) == d_held  # deterministic
    assert max(d_train, d_held) < 0.6 * d_noise, (d_train, d_held, d_noise)
    assert d_samples < 1.25 * d_held and d_samples < 0.5 * d_noise, (d_train, d_held, d_samples, d_noise)


def test_patches_training_script_smoke(tmp_path):
    from safetensors import safe_open

    from dpmsolve.zoo.train import TRAINERS

    out = TRAINERS["patches"](steps=2, out=tmp_path / "p.safetensors", log_every=1, threads=1)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["name"] == "patches" and meta["steps"] == "2" and meta["seed"] == "0"
    PatchesUNet(**json.loads(meta["net_kwargs"])).load_state_dict(state)


# --- the zoo models as lab problems -----------------------------------------------------------------------------

def test_zoo_problem_reference_is_cached_and_identical(tmp_path, monkeypatch):
    from dpmsolve.lab import evaluate, neural

    monkeypatch.setenv("DPMSOLVE_CACHE", str(tmp_path))
    problem = neural.zoo_problem("digits", n=2, seed=3, guidance=3.0, rtol=1e-2)
    assert problem.x_T.shape == (2, 1, 8, 8) and problem.x_T.dtype == torch.float64
    assert isinstance(problem.schedule, dp.DiscreteVP) and problem.name == "digits-cfg3"
    first = problem.reference("zero")
    files = list((tmp_path / "references").glob("*.npy"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not recompute the reference")

    monkeypatch.setattr(evaluate, "high_accuracy_reference", refuse)
    again = neural.zoo_problem("digits", n=2, seed=3, guidance=3.0, rtol=1e-2)
    assert torch.equal(again.x_T, problem.x_T)
    second = again.reference("zero")
    assert torch.equal(first, second) and second.dtype == first.dtype
    # another seed, n, guidance or endpoint is another problem, with another key
    keys = {problem.key, neural.zoo_problem("digits", n=2, seed=4, rtol=1e-2).key,
            neural.zoo_problem("digits", n=3, seed=3, rtol=1e-2).key,
            neural.zoo_problem("digits", n=2, seed=3, guidance=1.0, rtol=1e-2).key}
    assert len(keys) == 4 and all(neural.weights_hash("digits") in k for k in keys)
    with pytest.raises(AssertionError, match="cache hit"):
        again.reference("t_min")


def test_zoo_problem_unconditional_and_errors():
    from dpmsolve.lab.neural import zoo_problem, zoo_problems

    problem = zoo_problem("patches", n=2)
    assert problem.name == "patches" and isinstance(problem.schedule, dp.CosineVP)
    assert problem.x_T.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unconditional"):
        zoo_problem("patches", n=2, guidance=3.0)
    with pytest.raises(ValueError, match="valid"):
        zoo_problems(names=["mnist"])


def test_bench_includes_zoo_problems_on_request(tmp_path, monkeypatch):
    from dpmsolve.lab import neural
    from dpmsolve.lab.bench import run_bench

    monkeypatch.setenv("DPMSOLVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(neural, "REFERENCE_RTOL", 1e-2)
    report = run_bench(problems=[], nfes=[5], zoo=["digits-flow"], zoo_samples=2, peers=False,
                       out=tmp_path / "bench", progress=False)
    assert report.problems() == ["digits-flow-cfg3"]
    assert all(r.rmse is not None and r.nfe_used == 5 for r in report.rows)
    assert "digits-flow-cfg3" in (tmp_path / "bench" / "accuracy.md").read_text()


def test_sample_cli_patches_model(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dpmsolve.cli import main

    out = tmp_path / "patches"
    assert main(["sample", "--model", "patches", "--steps", "4", "--batch", "2", "--out", str(out)]) == 0
    paths = sorted(out.glob("*.png"))
    assert [p.name for p in paths] == ["sample_0000.png", "sample_0001.png"]
    assert all(np.asarray(Image.open(p)).shape == (128, 128, 3) for p in paths)
    assert "unconditional" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--model", "patches", "--guidance", "3", "--out", str(out)])
    assert "unconditional" in capsys.readouterr().err
