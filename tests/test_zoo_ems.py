"""The DPM-Solver-v3 statistics shipped with the zoo: they load offline, fit their model, and refuse other weights."""

from __future__ import annotations

import pytest
import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.zoo import ems as zoo_ems
from dpmsolve.ems import EMS, EMSError


def test_shipped_digits_statistics_fit_the_model():
    model = zoo.load("digits")
    stats = zoo.statistics("digits", 3.0)
    assert stats.data_shape == model.shape and stats.stat_shape == (1, 1, 1) and stats.n_data >= 256
    assert stats.model.startswith("digits@") and stats.model.endswith("|cfg=3")
    assert stats.info["source"] == "trajectory"
    lo, hi = stats.log_snr_range
    assert (lo, hi) == pytest.approx(model.schedule.log_snr_range)
    # l slides from ~1 (noise: data prediction) towards 0 (data: noise prediction), as the paper's Fig. 5.
    assert stats.l[0].item() == pytest.approx(1.0, abs=0.02) and stats.l[-1].item() < 0.5


@pytest.mark.parametrize("name", sorted(zoo_ems.SHIPPED))
def test_every_shipped_statistics_file_loads_and_fits(name):
    guidance, k, n, fd_step = zoo_ems.SHIPPED[name]
    model = zoo.load(name)
    stats = zoo.statistics(name, guidance)
    assert stats.n_data == k and stats.lambdas.size == n + 1 and stats.data_shape == model.shape
    assert stats.info["fd_step"] == (3e-3 if fd_step is None else fd_step)
    assert stats.stat_shape == (model.shape[0],) + (1,) * (len(model.shape) - 1)       # shared over positions
    x = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    den = zoo.guided(model, torch.arange(2), guidance) if guidance is not None else model.denoiser
    out = dp.sample(den, x, "dpmsolver-v3", ems=stats, steps=6, t_end=0, progress=False)
    assert torch.isfinite(out.x).all() and out.x.abs().max() < 5


def test_v3_samples_the_shipped_model():
    model = zoo.load("digits")
    labels = torch.arange(4)
    den = zoo.guided(model, labels, 3.0)
    x = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = dp.sample(den, x, "dpmsolver-v3", ems=zoo.statistics("digits", 3.0), steps=8, t_end=0, progress=False)
    again = dp.sample(den, x, "dpmsolver-v3", ems=str(zoo.statistics_path("digits", 3.0)), steps=8, t_end=0,
                      progress=False)
    assert out.nfe == 8 and out.x.dtype == torch.float32 and torch.isfinite(out.x).all()
    assert torch.equal(out.x, again.x)


def test_shipped_plans_with_v3_steps_come_with_the_shipped_statistics():
    from dpmsolve.tuning import Plan
    from dpmsolve.zoo.plans import plan_path

    model = zoo.load("digits")
    den = zoo.guided(model, torch.arange(8), 3.0)
    x = torch.randn(8, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    plan = zoo.plan("digits", 10)
    assert plan.uses_ems and plan.ems.model == zoo.statistics("digits", 3.0).model
    out = dp.sample(den, x, plan, progress=False)
    # against a tight reference solve (DPM-Solver++ 3M, 200 uniform log-SNR steps)
    ref = dp.sample(den, x, "dpmsolver++", order=3, steps=200, t_end=0, progress=False).x
    errors = (out.x - ref).reshape(8, -1).pow(2).mean(1).sqrt()
    assert out.nfe == 10 and float(errors.median()) < 0.03
    bare = Plan.load(plan_path("digits", 10, 3.0))          # a plan file alone does not hold the statistics
    with pytest.raises(EMSError, match="pass the model's statistics"):
        dp.sample(den, x, bare, progress=False)
    assert torch.equal(dp.sample(den, x, bare, ems=zoo.statistics("digits", 3.0), progress=False).x, out.x)


def test_statistics_of_other_weights_or_settings_are_refused(tmp_path, monkeypatch):
    stats = zoo.statistics("digits", 3.0)
    with pytest.raises(EMSError, match="No shipped statistics"):
        zoo.statistics("digits", 5.0)
    forged = EMS(stats.lambdas, stats.l, stats.s, stats.b, stats.data_shape, stats.schedule, stats.n_data,
                 "digits@0000000000000000|cfg=3", stats.info)
    forged.save(tmp_path / "digits-cfg3.ems.safetensors")
    monkeypatch.setattr(zoo_ems, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(EMSError, match="recompute them"):
        zoo.statistics("digits", 3.0)


@pytest.mark.parametrize("name", sorted(zoo_ems.SHIPPED))
def test_shipped_statistics_are_sound_and_keep_to_their_channels(name):
    """The soundness diagnostic that compute() runs passes on every shipped file; statistics shared over pixel
    positions serve other resolutions, but never another channel count (digits are 1-channel, patches RGB)."""
    model = zoo.load(name)
    stats = zoo.statistics(name, zoo_ems.SHIPPED[name].guidance)
    assert stats.diagnose() is None
    channels, *size = model.shape
    stats.check(model.schedule, (channels, *(2 * d for d in size)))
    for other in (channels + 1, 3 if channels == 1 else 1):
        with pytest.raises(EMSError, match=rf"cannot serve samples of shape \({other}, "):
            stats.check(model.schedule, (other, *size))
        with pytest.raises(EMSError, match="channels"):
            EMS.load(zoo.statistics_path(name, zoo_ems.SHIPPED[name].guidance), model.schedule, (other, *size))
