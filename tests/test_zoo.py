"""The shipped zoo models: offline deterministic loading, metadata, sampling, and a cheap quality check."""

import json

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.zoo.nets import DigitsUNet
from dpmsolve.zoo.train import digits_data, eps_loss, schedule_tables, train_digits


@pytest.fixture(scope="module")
def digits():
    return zoo.load("digits")


def test_weights_are_packaged_and_small():
    path = zoo.weights_path("digits")
    assert path.is_file() and path.parent.name == "weights"
    assert path.stat().st_size < 5 * 2**20


def test_load_is_offline_and_deterministic(no_network):
    rng = torch.get_rng_state()
    a, b = zoo.load("digits"), zoo.load("digits")
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the caller's RNG alone
    assert not a.net.training and all(p.dtype == torch.float32 for p in a.net.parameters())
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(4, *a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    pa, pb = a.denoiser(x, 0.5, y=torch.arange(4)), b.denoiser(x, 0.5, y=torch.arange(4))
    assert torch.equal(pa.x0, pb.x0) and torch.equal(pa.eps, pb.eps)


def test_metadata_and_fields(digits):
    meta = digits.metadata
    for key in ("name", "schedule", "prediction", "time_input", "num_classes", "null_class", "shape", "steps",
                "train_seconds", "final_loss", "seed"):
        assert key in meta, key
    assert meta["name"] == "digits" and meta["prediction"] == "eps" and meta["time_input"] == "discrete"
    assert digits.num_classes == 10 and digits.null_class == 10 and digits.shape == (1, 8, 8)
    assert isinstance(digits.schedule, dp.DiscreteVP) and digits.schedule.num_train_steps == 1000
    assert digits.schedule.fingerprint() == dp.DiscreteVP.linear().fingerprint()
    assert digits.denoiser.network_time(1.0) == pytest.approx(999.0)
    assert float(meta["final_loss"]) < 0.2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="digits"):
        zoo.load("mnist")


def test_guided_rejects_bad_labels(digits):
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        zoo.guided(digits, [3, 10])


def test_sample_shape_dtype_and_seed(digits):
    labels = torch.arange(10)
    x = torch.randn(10, *digits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    s1 = dp.sample(zoo.guided(digits, labels, 3.0), x, "dpmsolver++", steps=10, progress=False)
    s2 = dp.sample(zoo.guided(digits, labels, 3.0), x, "dpmsolver++", steps=10, progress=False)
    assert s1.x.shape == (10, 1, 8, 8) and s1.x.dtype == torch.float32 and s1.nfe == 10
    assert torch.isfinite(s1.x).all() and torch.equal(s1.x, s2.x)


def test_heldout_denoising_loss_beats_untrained_net(digits):
    # Mid noise levels on digits the model never saw; the untrained net of the same architecture scores ~1.
    x, y = digits_data("test")
    alphas, sigmas = schedule_tables(digits.schedule)
    torch.manual_seed(0)
    untrained = DigitsUNet(**json.loads(digits.metadata["net_kwargs"])).float().eval()
    with torch.no_grad():
        for n in (300, 500):
            idx = torch.full((len(y),), n)
            trained = eps_loss(digits.net, x, y, alphas, sigmas, torch.Generator().manual_seed(n), idx).item()
            base = eps_loss(untrained, x, y, alphas, sigmas, torch.Generator().manual_seed(n), idx).item()
            assert trained < 0.5 * base, (n, trained, base)


def test_guided_samples_look_like_their_digits(digits):
    svm = pytest.importorskip("sklearn.svm")
    labels = torch.arange(10).repeat(3)
    x = torch.randn(len(labels), *digits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    s = dp.sample(zoo.guided(digits, labels, 3.0), x, "dpmsolver++", steps=20, progress=False).x.clamp(-1, 1)
    xtr, ytr = digits_data("train")
    clf = svm.SVC(gamma="scale").fit(xtr.reshape(len(xtr), -1).numpy(), ytr.numpy())
    acc = float(np.mean(clf.predict(s.reshape(len(s), -1).numpy()) == labels.numpy()))
    assert acc >= 0.8, acc
    # Samples lie near real digits, far closer than noise does.
    real = digits_data("all")[0].reshape(-1, 64)
    d_samples = torch.cdist(s.reshape(len(s), -1), real).min(1).values.median()
    d_noise = torch.cdist(x.reshape(len(x), -1).clamp(-1, 1), real).min(1).values.median()
    assert d_samples < 0.5 * d_noise, (d_samples, d_noise)


def test_training_script_smoke(tmp_path):
    from safetensors import safe_open

    out = train_digits(steps=2, out=tmp_path / "d.safetensors", log_every=1)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["steps"] == "2" and meta["seed"] == "0"
    DigitsUNet(**json.loads(meta["net_kwargs"])).load_state_dict(state)


# --- digits-flow, the classifier and the metrics ---------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_flow():
    return zoo.load("digits-flow")


def test_digits_flow_loads_offline_and_deterministically(no_network):
    rng = torch.get_rng_state()
    a, b = zoo.load("digits-flow"), zoo.load("digits-flow")
    assert torch.equal(torch.get_rng_state(), rng)
    assert zoo.weights_path("digits-flow").stat().st_size < 5 * 2**20
    assert isinstance(a.schedule, dp.RectifiedFlow) and a.schedule.fingerprint() == dp.RectifiedFlow().fingerprint()
    meta = a.metadata
    assert meta["name"] == "digits-flow" and meta["schedule"] == "RectifiedFlow()"
    assert meta["prediction"] == "flow" and meta["time_input"] == "1000t" and meta["seed"] == "0"
    assert a.denoiser.network_time(0.5) == pytest.approx(500.0)
    assert a.num_classes == 10 and a.null_class == 10 and a.shape == (1, 8, 8)
    x = torch.randn(4, *a.shape, generator=torch.Generator().manual_seed(0))
    pa, pb = a.denoiser(x, 0.5, y=torch.arange(4)), b.denoiser(x, 0.5, y=torch.arange(4))
    assert torch.equal(pa.x0, pb.x0) and torch.equal(pa.eps, pb.eps)


def test_classifier_loads_and_classifies_heldout_digits(no_network):
    from dpmsolve.zoo.metrics import class_accuracy

    clf = zoo.classifier()
    assert not clf.training and zoo.weights_path("digits-classifier").stat().st_size < 5 * 2**20
    x, y = digits_data("test")
    with torch.no_grad():
        assert clf(x).shape == (len(y), 10)
    assert class_accuracy(x, y) > 0.9


def test_digits_fd_separates_real_digits_from_blurred_noise():
    from dpmsolve.zoo.metrics import digits_fd

    x, _ = digits_data("test")
    noise = torch.randn(len(x), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(noise, kernel, padding=1).clamp(-1, 1)
    fd_real, fd_noise = digits_fd(x), digits_fd(blurred)
    assert fd_real < 0.2 * fd_noise, (fd_real, fd_noise)


def test_guided_flow_samples_are_classified_as_their_labels(digits_flow):
    from dpmsolve.zoo.metrics import class_accuracy

    labels = torch.arange(10).repeat(2)
    x = torch.randn(len(labels), *digits_flow.shape, generator=torch.Generator().manual_seed(0))
    s = dp.sample(zoo.guided(digits_flow, labels, 3.0), x, "dpmsolver++", steps=10, progress=False).x
    assert torch.isfinite(s).all()
    assert class_accuracy(s, labels) >= 0.8


@pytest.mark.parametrize("name", ["digits-flow", "digits-classifier"])
def test_training_script_smoke_other_models(tmp_path, name):
    from safetensors import safe_open

    from dpmsolve.zoo.nets import ARCHITECTURES
    from dpmsolve.zoo.train import TRAINERS

    out = TRAINERS[name](steps=2, out=tmp_path / "m.safetensors", log_every=1, threads=1)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["name"] == name and meta["steps"] == "2" and meta["seed"] == "0"
    ARCHITECTURES[meta["architecture"]](**json.loads(meta["net_kwargs"])).load_state_dict(state)
