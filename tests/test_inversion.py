"""Exact inversion (BDIA, EDICT) and noise maps of stochastic samplers.

* invert(..., exact=...) then sample(inv, exact=True) reconstructs the data to round-off (float64: 1e-10), where
  plain inversion leaves two discretisation errors; on the digits model (float32) to ~1e-4 at most.
* BDIA with gamma = 0 is DDIM; BDIA with gamma = 1 converges at second order (it is a symmetric two-step scheme).
* invert(..., noise_map=True) with a stochastic solver: replaying its noises reproduces the image to round-off,
  and editing (other conditioning, same noises) keeps the image's structure.
* Bad input: clear errors (wrong solver, grid to sigma = 0, mismatched grid, wrong method, misused noise).
"""

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.inversion import BDIA, EDICT, Inversion, NoiseSequence
from dpmsolve.lab import GaussianData, GaussianMixture

SCHEDULE = dp.DiscreteVP.linear()


@pytest.fixture
def mixture():
    return GaussianMixture.random(k=4, dim=3, seed=0)


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("method", ["bdia", "edict", BDIA(0.5)], ids=["bdia", "edict", "bdia-0.5"])
def test_exact_round_trip_to_round_off(mixture, method, steps):
    den = mixture.denoiser(SCHEDULE)
    x0 = mixture.data_sample(8, torch.Generator().manual_seed(0))
    plain = dp.invert(den, x0, "ddim", steps=steps, progress=False)
    plain_error = (dp.sample(den, plain.x, "ddim", steps=steps, progress=False).x - x0).abs().max()
    inv = dp.invert(den, x0, "ddim", steps=steps, exact=method, progress=False)
    assert isinstance(inv, Inversion) and inv.x.shape == x0.shape
    out = dp.sample(den, inv, "ddim", steps=steps, exact=True, progress=False)
    error = (out.x - x0).abs().max()
    tolerance = 1e-10 if not isinstance(method, BDIA) or steps <= 20 else 1e-6   # 1/gamma^steps amplification
    assert error < tolerance, float(error)
    assert plain_error > 1e-3
    edict = method == "edict"
    assert inv.nfe == (2 if edict else 1) * steps
    assert out.nfe == (2 * steps if edict else steps - 1)     # BDIA starts from the stored second point
    assert np.array_equal(inv.ts, plain.ts[::-1])


def test_bdia_gamma_zero_is_ddim_and_gamma_one_is_second_order():
    data = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    den = data.denoiser(SCHEDULE)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ddim = dp.sample(den, x, "ddim", steps=12, progress=False).x
    assert torch.allclose(dp.sample(den, x, "ddim", steps=12, exact=BDIA(0.0), progress=False).x, ddim, atol=1e-12)
    exact = data.exact_solution(SCHEDULE, x, SCHEDULE.t_max, SCHEDULE.t_min)
    errors = [float((dp.sample(den, x, exact="bdia", steps=n, progress=False).x - exact).square().mean().sqrt())
              for n in (20, 40, 80)]
    slopes = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(slopes > 1.8), errors


def test_exact_inversion_of_the_digits_model():
    from dpmsolve import zoo
    from dpmsolve.zoo.train import digits_data

    model = zoo.load("digits")
    x_test, y_test = digits_data("test")
    x0, y = x_test[:16], y_test[:16]
    den = zoo.guided(model, y, 1.0)
    plain = dp.invert(den, x0, "dpmsolver++", steps=20, progress=False)
    plain_error = (dp.sample(den, plain.x, "dpmsolver++", steps=20, progress=False).x - x0).abs().max()
    for method in ("bdia", "edict"):
        inv = dp.invert(den, x0, "ddim", steps=20, exact=method, progress=False)
        assert inv.x.dtype == torch.float32 and inv.state[0].dtype == torch.float64   # float64 states
        out = dp.sample(den, inv, exact=True, progress=False).x
        assert out.dtype == torch.float32
        error = (out - x0).abs().max()
        assert error < 1e-5 and plain_error > 1e-2, (method, float(error), float(plain_error))
    # float32 states: the inverse's round-off amplification shows, still far below the plain round trip
    inv = dp.invert(den, x0, "ddim", steps=20, exact=BDIA(precision=None), progress=False)
    assert inv.state[0].dtype == torch.float32
    assert (dp.sample(den, inv, exact=True, progress=False).x - x0).abs().max() < 1e-3


def test_sampling_from_an_inversion_checks_its_settings(mixture):
    den = mixture.denoiser(SCHEDULE)
    x0 = mixture.data_sample(4, torch.Generator().manual_seed(1))
    inv = dp.invert(den, x0, "ddim", steps=6, exact="edict", progress=False)
    with pytest.raises(ValueError, match=r"made on a grid of 6 steps.*5 steps"):
        dp.sample(den, inv, "ddim", steps=5, exact=True, progress=False)
    with pytest.raises(ValueError, match=r"made by EDICT.*same method"):
        dp.sample(den, inv, "ddim", exact="bdia", progress=False)
    with pytest.raises(ValueError, match=r"exact \(edict\); sample from it with exact=True"):
        dp.sample(den, inv, "ddim", exact=False, progress=False)
    with pytest.raises(ValueError, match=r"solver must be 'ddim'"):
        dp.sample(den, inv, "dpmsolver++", exact=True, progress=False)
    # the same grid given explicitly is fine; exact may be left out (the inversion says it)
    out = dp.sample(den, inv, "ddim", steps=6, grid="logSNR", progress=False)
    assert (out.x - x0).abs().max() < 1e-10


def test_exact_bad_input(mixture):
    den = mixture.denoiser(SCHEDULE)
    x0 = mixture.data_sample(3, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"solver must be 'ddim'.*BELM"):
        dp.invert(den, x0, "dpmsolver++", steps=4, exact=True)
    with pytest.raises(ValueError, match=r"solver options \['eta'\].*noise_map"):
        dp.invert(den, x0, "ddim", steps=4, exact=True, eta=0.5)
    with pytest.raises(ValueError, match="Unknown exact inversion method 'foo'"):
        dp.invert(den, x0, "ddim", steps=4, exact="foo")
    with pytest.raises(TypeError, match="exact must be True, 'bdia', 'edict'"):
        dp.invert(den, x0, "ddim", steps=4, exact=3)
    with pytest.raises(ValueError, match=r"ends inside the schedule.*t_end=0"):
        dp.invert(den, x0, "ddim", steps=4, exact=True, t_end=0.0)
    with pytest.raises(ValueError, match="exact= and noise_map=True"):
        dp.invert(den, x0, "ddim", steps=4, exact=True, noise_map=True)
    with pytest.raises(ValueError, match="gamma=0 is plain DDIM"):
        dp.invert(den, x0, "ddim", steps=4, exact=BDIA(0.0))
    with pytest.raises(ValueError, match=r"gamma must be a finite number in \[0, 1\]"):
        BDIA(1.5)
    with pytest.raises(ValueError, match=r"p must be a finite number in \(0, 1\]"):
        EDICT(0.0)


@pytest.mark.parametrize("name,options", [("sde-dpmsolver++", {}), ("sde-dpmsolver++", {"order": 1}),
                                          ("ddim", {"eta": 0.5})])
def test_noise_map_replay_reproduces_the_image(mixture, name, options):
    den = mixture.denoiser(SCHEDULE)
    x0 = mixture.data_sample(6, torch.Generator().manual_seed(3))
    inv = dp.invert(den, x0, name, steps=15, noise_map=True, seed=0, progress=False, **options)
    assert inv.method == "noise_map" and isinstance(inv.noise, NoiseSequence) and len(inv.noise) == 15
    replay = dp.sample(den, inv, progress=False)
    assert (replay.x - x0).abs().max() < 1e-12
    again = dp.sample(den, inv.x, name, steps=15, noise_sequence=inv.noise, progress=False, **options)
    assert torch.equal(again.x, replay.x)
    # the noises are what the solver would add: a replay of drawn noise reproduces a seeded sample bit for bit
    drawn = dp.sample(den, inv.x, name, steps=15, seed=7, grad=True, progress=False, **options)
    assert torch.equal(drawn.x.detach(), dp.sample(den, inv.x, name, steps=15, seed=7, progress=False, **options).x)


def test_noise_map_edit_on_the_digits_model():
    from dpmsolve import zoo
    from dpmsolve.zoo.metrics import class_accuracy
    from dpmsolve.zoo.train import digits_data

    model = zoo.load("digits")
    x_test, y_test = digits_data("test")
    x0, y = x_test[:10], y_test[:10]
    inv = dp.invert(zoo.guided(model, y, 3.0), x0, "sde-dpmsolver++", steps=20, noise_map=True, seed=0,
                    progress=False)
    replay = dp.sample(zoo.guided(model, y, 3.0), inv, progress=False)
    assert (replay.x - x0).abs().max() < 1e-5                 # float32 round-off
    target = (y + 1) % 10
    edited = dp.sample(zoo.guided(model, target, 3.0), inv, progress=False)
    assert class_accuracy(edited.x, target) >= 0.8
    # the structure is kept: the edit is closer to its source than to other digits of the new class
    assert (edited.x - x0).square().mean() < (edited.x - x0.roll(1, 0)).square().mean()


def test_noise_bad_input(mixture):
    den = mixture.denoiser(SCHEDULE)
    x0 = mixture.data_sample(3, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"invert\(\) needs a deterministic solver.*noise_map=True"):
        dp.invert(den, x0, "sde-dpmsolver++", steps=4)
    with pytest.raises(ValueError, match="noise_map=True recovers the noises of a stochastic solver"):
        dp.invert(den, x0, "dpmsolver++", steps=4, noise_map=True)
    with pytest.raises(ValueError, match=r"ends at t_min.*t_end=0"):
        dp.invert(den, x0, "sde-dpmsolver++", steps=4, noise_map=True, t_end=0.0)
    inv = dp.invert(den, x0, "sde-dpmsolver++", steps=4, noise_map=True, seed=1)
    with pytest.raises(ValueError, match="holds 4 steps but the grid has 5"):
        dp.sample(den, inv.x, "sde-dpmsolver++", steps=5, noise_sequence=inv.noise)
    with pytest.raises(ValueError, match="adds none"):
        dp.sample(den, inv.x, "dpmsolver++", steps=4, noise_sequence=inv.noise)
    with pytest.raises(TypeError, match="noise_sequence must be a dpmsolve.NoiseSequence"):
        dp.sample(den, inv.x, "sde-dpmsolver++", steps=4, noise_sequence=[torch.zeros(3, 3)] * 4)
    with pytest.raises(ValueError, match="carries its own noise sequence"):
        dp.sample(den, inv, noise_sequence=inv.noise)
    with pytest.raises(ValueError, match="not an exact inversion"):
        dp.sample(den, inv, exact=True)
    with pytest.raises(ValueError, match="generator / seed are used by noise_map=True only"):
        dp.invert(den, x0, "ddim", steps=4, seed=0)
