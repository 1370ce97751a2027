"""The shipped networks in half precision: they run in float16 and bfloat16 on CPU (time embedding in the network's
dtype, output layer in float32), and ``dp.sample`` with such a network, under classifier-free guidance up to 15,
stays finite and close to the float32 sample.

"Close" is measured per sample as the relative RMS difference to the float32 network's sample (same noise, same
solver), against two bounds: a floor (1% for float16, 5% for bfloat16), and three times the difference that
rounding the float32 network's *output* to the half precision causes by itself. The second bound is what the
sampling problem allows: with 6 steps, an eps-prediction DDPM (digits) and guidance 15, rounding the output to
bfloat16 alone moves samples by up to ~50% (the x0 = (x - sigma eps) / alpha conversion multiplies it by up to
1/alpha ~ 150 and guidance by 15), and 1e-3 random relative noise on the float32 output moves them by 13-33%.
Measured (max over samples): float16 <= 0.003 at guidance 3, <= 0.031 at 15; bfloat16 <= 0.024 at 3, <= 0.72
at 15 (digits; digits-flow 0.067), patches 0.0008 / 0.015.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dpmsolve as dp
from dpmsolve import zoo

HALF = [torch.float16, torch.bfloat16]
FLOOR = {torch.float16: 0.01, torch.bfloat16: 0.05}
CASES = [("digits", 3.0), ("digits", 15.0), ("digits-flow", 3.0), ("digits-flow", 15.0), ("patches", None)]


@pytest.fixture(autouse=True)
def _float32_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def models():
    return {name: zoo.load(name) for name in zoo.MODELS}


def _denoiser(model, net, scale, n, **options):
    den = dp.wrap_model(net, model.schedule, prediction=model.metadata["prediction"],
                        time_input=model.metadata["time_input"], **options)
    if scale is None:
        return den
    labels = torch.arange(n) % model.num_classes
    null = torch.full_like(labels, model.null_class)
    return dp.ClassifierFreeGuidance(den, scale, cond={"y": labels}, uncond={"y": null})


def _relative_rms(x, ref):
    return ((x - ref).flatten(1).pow(2).mean(1).sqrt() / ref.flatten(1).pow(2).mean(1).sqrt()).max().item()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", zoo.MODELS)
def test_shipped_network_runs_in_half_precision(models, name, dtype):
    model = models[name]
    net = copy.deepcopy(model.net).to(dtype)
    seen = []
    net.time_mlp[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(3, *model.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 500.3, 999.0])
    args = (torch.arange(3),) if model.num_classes else ()
    out = net(x.to(dtype), t, *args)
    ref = model.net(x, t, *args)
    assert seen == [dtype]                                   # the embedding follows the network's dtype
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() < (0.02 if dtype == torch.float16 else 0.15) * ref.abs().max()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name,scale", CASES, ids=lambda v: str(v))
def test_sampling_with_a_half_precision_network_stays_finite_and_close(models, name, scale, dtype):
    model = models[name]
    n, steps = (2, 4) if name == "patches" else (4, 6)
    x = torch.randn(n, *model.shape, generator=torch.Generator().manual_seed(0))

    def sample(net, **options):
        return dp.sample(_denoiser(model, net, scale, n, **options), x, "dpmsolver++", steps=steps, progress=False).x

    ref = sample(model.net)
    out = sample(copy.deepcopy(model.net).to(dtype))
    rounded = sample(lambda *a, **k: model.net(*a, **k).to(dtype).float(), input_dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _relative_rms(out, ref) <= max(FLOOR[dtype], 3 * _relative_rms(rounded, ref))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_noise_keeps_its_dtype_under_strong_guidance(models, dtype):
    """x itself in half precision (the solver still works in float32): the sample keeps x's dtype and differs
    from the float32-noise run of the same network by little more than the start noise's rounding."""
    model = models["digits"]
    x = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(1))
    den = _denoiser(model, copy.deepcopy(model.net).to(dtype), 15.0, 4)
    sol = dp.sample(den, x.to(dtype), "dpmsolver++", steps=5, t_end=0, progress=False)
    ref = dp.sample(den, x, "dpmsolver++", steps=5, t_end=0, progress=False).x
    assert sol.x.dtype == dtype and torch.isfinite(sol.x).all()
    assert _relative_rms(sol.x.float(), ref) <= 2 * FLOOR[dtype]
