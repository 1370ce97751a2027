"""Empirical model statistics: the estimator against closed forms, files, resuming, sharing, sources.

Closed forms (Gaussian data, x = alpha x0 + sigma z, lambda = log(alpha / sigma)):
* x0 ~ N(mu, C): sigma d eps / dx = (I + e^{2 lambda} C)^{-1}, so l = diag((I + e^{2 lambda} C)^{-1}); with a
  non-diagonal C the Hutchinson estimate is random with per-point variance sum_{e != d} M_de^2;
* diagonal C = diag(v): l = 1 / (1 + v e^{2 lambda}) exactly (no off-diagonal terms), f = N / alpha = -l mu
  depends on lambda only, so Var f = 0, s = 0 and b = f' = -l' mu.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.ems import EMS, EMSError
from dpmsolve.lab import GaussianData, GaussianMixture


class CorrelatedGaussian(dp.Denoiser):
    """The exact denoiser of x0 ~ N(mu, C) with a full covariance C."""

    def __init__(self, schedule, mu, cov):
        self.schedule, self.mu, self.cov = schedule, torch.as_tensor(mu), torch.as_tensor(cov)

    def __call__(self, x, t, **kwargs):
        a, s = self.schedule.alpha_sigma(t)
        # E[x0 | x] = mu + a C (a^2 C + s^2 I)^-1 (x - a mu), rows of x as samples
        gain = torch.linalg.solve(a * a * self.cov + s * s * torch.eye(len(self.mu)), a * self.cov).T
        x0 = self.mu + (x - a * self.mu) @ gain
        return dp.Prediction(x0, (x - a * x0) / s)

    def l_exact(self, lam):
        return np.array([np.diag(np.linalg.inv(np.eye(len(self.mu)) + np.exp(2 * u) * self.cov.numpy())) for u in lam])

    def hutchinson_std(self, lam):
        """Per-point std of (M v)_d v_d for M = (I + e^{2 lambda} C)^{-1}: sqrt(sum_{e != d} M_de^2)."""
        out = []
        for u in lam:
            m = np.linalg.inv(np.eye(len(self.mu)) + np.exp(2 * u) * self.cov.numpy())
            out.append(np.sqrt((m**2).sum(1) - np.diag(m) ** 2))
        return np.array(out)


def correlated_problem():
    g = np.random.default_rng(0)
    q, _ = np.linalg.qr(g.normal(size=(4, 4)))
    cov = q @ np.diag([0.05, 0.3, 0.9, 1.6]) @ q.T
    return np.array([0.3, -0.5, 0.2, 0.1]), cov


def test_l_matches_the_closed_form_within_monte_carlo_error():
    schedule = dp.DiscreteVP.linear()
    mu, cov = correlated_problem()
    model = CorrelatedGaussian(schedule, mu, cov)
    k = 4000
    x0 = torch.as_tensor(np.random.default_rng(1).multivariate_normal(mu, cov, size=k))
    ems = dp.ems.compute(model, x0, n_lambdas=20, batch_size=2000, progress=False)
    err = np.abs(ems.l - model.l_exact(ems.lambdas))
    stderr = model.hutchinson_std(ems.lambdas) / np.sqrt(k)
    assert stderr.max() > 1e-3                     # the estimate is genuinely random here ...
    assert np.all(err <= 4 * stderr + 1e-12)       # ... and within 4 standard errors of the truth everywhere
    assert err.max() > 0.1 * stderr.max()          # (not accidentally exact)


def test_diagonal_gaussian_statistics_have_closed_forms():
    schedule = dp.DiscreteVP.linear()
    mu, var = np.array([0.5, -0.3, 0.1, 0.8]), np.array([0.09, 0.5, 1.3, 0.02])
    data = GaussianData(mu, var)
    x0 = data.data_sample(400, torch.Generator().manual_seed(0))
    ems = dp.ems.compute(data.denoiser(schedule), x0, n_lambdas=200, batch_size=400, smooth=0, progress=False)
    lam = ems.lambdas[:, None]
    l = 1 / (1 + var * np.exp(2 * lam))
    dl = -2 * var * np.exp(2 * lam) / (1 + var * np.exp(2 * lam)) ** 2
    assert np.abs(ems.l - l).max() < 1e-12
    assert np.abs(ems.s).max() < 5e-3               # Var f is round-off: s is the slope of round-off, ~0
    # b = -l' mu: l' is a central difference on the node grid (one-sided at the ends), so compare inside.
    inner = slice(1, -1)
    scale = np.abs(dl * mu).max()
    assert np.abs(ems.b[inner] - (-dl * mu)[inner]).max() < 2e-3 * scale


def test_sampling_with_estimated_statistics_beats_dpm_solver_pp():
    """The point of it all, on a small mixture: v3 with statistics from 1000 data points beats DPM-Solver++
    and UniPC at 8 steps against the exact (DOP853) solution."""
    schedule = dp.DiscreteVP.linear()
    mix = GaussianMixture.random(k=3, dim=2, seed=0)
    den = mix.denoiser(schedule)
    ems = dp.ems.compute(den, mix.data_sample(1000, torch.Generator().manual_seed(0)), n_lambdas=60,
                         batch_size=500, progress=False)
    x = mix.prior_sample(schedule, 100, generator=torch.Generator().manual_seed(1))
    truth = mix.exact_solution(schedule, x, schedule.t_max, schedule.t_min)

    def rmse(solver, **options):
        out = dp.sample(den, x, solver, steps=8, progress=False, **options).x
        return float(((out - truth) ** 2).mean().sqrt())

    v3 = rmse("dpmsolver-v3", ems=ems, order=2)
    assert v3 < 0.8 * min(rmse("dpmsolver++", order=2), rmse("unipc", order=2))


# ----------------------------------------------------------------------------------------------- files
@pytest.fixture
def small_ems():
    schedule = dp.DiscreteVP.linear()
    data = GaussianData([0.5, -0.3], [0.09, 0.5])
    return schedule, dp.ems.compute(data.denoiser(schedule), data.data_sample(64, torch.Generator().manual_seed(0)),
                                    n_lambdas=8, batch_size=32, progress=False, model_id="gauss-2d")


def test_file_round_trip_keeps_everything(small_ems, tmp_path):
    schedule, ems = small_ems
    path = ems.save(tmp_path / "stats.safetensors")
    back = dp.ems.load(path, schedule, (2,))
    for name in ("lambdas", "l", "s", "b"):
        assert np.array_equal(getattr(back, name), getattr(ems, name))
    assert (back.data_shape, back.schedule, back.n_data, back.model) == ((2,), schedule.fingerprint(), 64, "gauss-2d")
    assert back.info["n_lambdas"] == 8 and back.info["wall_seconds"] > 0


def test_file_errors_say_what_is_wrong(small_ems, tmp_path):
    schedule, ems = small_ems
    path = ems.save(tmp_path / "stats.safetensors")
    with pytest.raises(EMSError, match="computed for the schedule"):
        dp.ems.load(path, dp.LinearVP())
    with pytest.raises(EMSError, match="cannot serve samples of shape"):
        dp.ems.load(path, schedule, (3,))
    with pytest.raises(EMSError, match="No EMS file"):
        dp.ems.load(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(EMSError, match="not a readable EMS file"):
        dp.ems.load(damaged)
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\xff" * 8                           # NaN bytes in the last array
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(EMSError, match="NaN or Inf"):
        dp.ems.load(corrupt)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"l": torch.zeros(3)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(EMSError, match="not a dpmsolve EMS file"):
        dp.ems.load(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"l": torch.zeros(3)}, str(newer), metadata={"format": "dpmsolve-ems", "version": "99"})
    with pytest.raises(EMSError, match="format version 99"):
        dp.ems.load(newer)


# --------------------------------------------------------------------------------------- resume, share, sources
class Interrupting(dp.Denoiser):
    def __init__(self, inner, after):
        self.inner, self.schedule, self.calls, self.after = inner, inner.schedule, 0, after

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(x, t, **kwargs)


def test_an_interrupted_computation_resumes_to_the_same_result(tmp_path):
    schedule = dp.DiscreteVP.linear()
    mix = GaussianMixture.random(k=3, dim=2, seed=0)
    x0 = mix.data_sample(90, torch.Generator().manual_seed(0))
    options = dict(n_lambdas=10, batch_size=30, progress=False)
    whole = dp.ems.compute(mix.denoiser(schedule), x0, **options)
    ckpt = tmp_path / "ems.ckpt"
    flaky = Interrupting(mix.denoiser(schedule), after=11 * 3 + 5)   # dies in the middle of the second batch
    with pytest.raises(KeyboardInterrupt):
        dp.ems.compute(flaky, x0, checkpoint=ckpt, **options)
    assert ckpt.is_file()
    counted = Interrupting(mix.denoiser(schedule), after=10**9)
    resumed = dp.ems.compute(counted, x0, checkpoint=ckpt, **options)
    assert counted.calls == 2 * 11 * 3               # only the two missing batches ran (3 calls per node)
    for name in ("l", "s", "b"):
        assert np.allclose(getattr(resumed, name), getattr(whole, name), rtol=1e-12, atol=1e-14)
    assert not ckpt.exists()
    ckpt_other = tmp_path / "other.ckpt"
    with pytest.raises(KeyboardInterrupt):
        dp.ems.compute(Interrupting(mix.denoiser(schedule), after=40), x0, checkpoint=ckpt_other, **options)
    with pytest.raises(EMSError, match="other settings"):
        dp.ems.compute(mix.denoiser(schedule), x0, checkpoint=ckpt_other, **{**options, "n_lambdas": 12})


def test_shared_statistics_pool_the_positions():
    schedule = dp.DiscreteVP.linear()
    g = GaussianData(np.zeros(2 * 3 * 3), np.linspace(0.1, 1.0, 18))

    class Image(dp.Denoiser):  # the same Gaussian seen as (2, 3, 3) images
        def __init__(self):
            self.schedule, self.inner = schedule, g.denoiser(schedule)

        def __call__(self, x, t, **kw):
            p = self.inner(x.reshape(len(x), -1), t)
            return dp.Prediction(p.x0.reshape(x.shape), p.eps.reshape(x.shape))

    x0 = g.data_sample(50, torch.Generator().manual_seed(0)).reshape(50, 2, 3, 3)
    # 40 intervals: on 6, l' (a central difference of l across the nodes) is so coarse that s comes out in the
    # hundreds where f hardly varies, and v3 rightly refuses the statistics.
    full = dp.ems.compute(Image(), x0, n_lambdas=40, batch_size=50, progress=False)
    shared = dp.ems.compute(Image(), x0, n_lambdas=40, batch_size=50, shared=True, progress=False)
    assert full.stat_shape == (2, 3, 3) and shared.stat_shape == (2, 1, 1) and shared.data_shape == (2, 3, 3)
    assert np.allclose(shared.l, full.l.mean(axis=(2, 3), keepdims=True), atol=1e-12)
    shared.check(schedule, (2, 5, 7))                # one file, other resolutions
    x = torch.randn(3, 2, 5, 7)
    big = GaussianData(np.zeros(70), np.full(70, 0.5))

    class Big(dp.Denoiser):
        def __init__(self):
            self.schedule, self.inner = schedule, big.denoiser(schedule)

        def __call__(self, x, t, **kw):
            p = self.inner(x.reshape(len(x), -1), t)
            return dp.Prediction(p.x0.reshape(x.shape), p.eps.reshape(x.shape))

    out = dp.sample(Big(), x, "dpmsolver-v3", ems=shared, steps=5, progress=False).x
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() < 10


def test_trajectory_source_and_guidance_factory():
    """No data: points on the model's own ODE trajectories; a factory builds the guided denoiser per batch."""
    schedule = dp.DiscreteVP.linear()
    mix = GaussianMixture.random(k=4, dim=2, seed=1, classes=2)
    base = mix.denoiser(schedule)
    labels = torch.arange(40) % 2

    def guided(conditions):
        y = conditions["y"]
        return dp.ClassifierFreeGuidance(base, 3.0, cond={"y": y}, uncond={"y": torch.full_like(y, -1)})

    ems = dp.ems.compute(guided, n_data=40, shape=(2,), conditions={"y": labels}, schedule=schedule, n_lambdas=8,
                         batch_size=20, progress=False)
    assert ems.info["source"] == "trajectory" and ems.n_data == 40 and ems.stat_shape == (2,)
    assert np.all((ems.l > -0.5) & (ems.l < 1.5))
    with pytest.raises(EMSError, match="n_data"):
        dp.ems.compute(base, n_data=None, shape=(2,), progress=False)
    with pytest.raises(EMSError, match="one entry per data point"):
        dp.ems.compute(base, mix.data_sample(10), conditions={"y": labels}, progress=False)


def test_finite_difference_jvp_agrees_with_forward_mode():
    schedule = dp.DiscreteVP.linear()
    mu, cov = correlated_problem()
    model = CorrelatedGaussian(schedule, mu, cov)
    x0 = torch.as_tensor(np.random.default_rng(1).multivariate_normal(mu, cov, size=200))
    forward = dp.ems.compute(model, x0, n_lambdas=8, batch_size=200, progress=False)
    fd = dp.ems.compute(model, x0, n_lambdas=8, batch_size=200, jvp="finite_difference", progress=False)
    assert np.abs(forward.l - fd.l).max() < 1e-6      # the model is linear in x: the difference is exact

    class Numpy(dp.Denoiser):  # forward-mode AD cannot see through numpy
        def __init__(self):
            self.schedule = schedule

        def __call__(self, x, t, **kw):
            p = model(torch.as_tensor(x.numpy()), t)
            return p

    with pytest.raises(EMSError, match="finite_difference"):
        dp.ems.compute(Numpy(), x0, n_lambdas=4, batch_size=200, progress=False)


def test_lambda_batched_estimate_equals_one_node_per_call():
    """Several log-SNR nodes in one network call (a guided zoo network): the same statistics, up to float32
    round-off: the network's kernels round differently for another batch size (and thread count), and the
    difference along the ODE (/ 2 fd_step) and Cov / Var f amplify that to ~2e-4 in s at the noisiest node
    (float64 agrees to 1e-9 but takes 20 s here)."""
    from dpmsolve import zoo

    model = zoo.load("digits")
    options = dict(n_data=12, shape=model.shape, schedule=model.schedule, n_lambdas=7, shared=True, batch_size=6,
                   conditions={"y": torch.arange(12) % 10}, progress=False, dtype=torch.float32)
    factory = lambda c: zoo.guided(model, c["y"], 3.0)  # noqa: E731
    one = dp.ems.compute(factory, **options)
    for lambda_batch in (3, 8):
        batched = dp.ems.compute(factory, lambda_batch=lambda_batch, **options)
        np.testing.assert_allclose(batched.l, one.l, rtol=1e-5, atol=1e-6)
        for name in ("s", "b"):
            np.testing.assert_allclose(getattr(batched, name), getattr(one, name), rtol=2e-3, atol=2e-4)
    mix = GaussianMixture.random(k=2, dim=2, seed=0)
    with pytest.raises(EMSError, match="one time per sample"):
        dp.ems.compute(mix.denoiser(dp.DiscreteVP.linear()), mix.data_sample(8, torch.Generator().manual_seed(0)),
                       n_lambdas=4, lambda_batch=2, progress=False)


# ------------------------------------------------------------------------------------------------ hardening
def _with_metadata(path, tmp_path, name, **changes):
    """A copy of the EMS file at ``path`` with metadata fields changed (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, arrays = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    out = tmp_path / name
    save_file(arrays, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("changes,words", [
    ({"version": "x"}, r"'version' is 'x', not an integer"),
    ({"n_data": "many"}, r"'n_data' is 'many', not an integer"),
    ({"data_shape": "5"}, r"'data_shape' is '5', not a list"),
    ({"data_shape": "[2, -1]"}, r"data_shape must be a tuple of positive integers .*\(2, -1\)"),
    ({"data_shape": '["a"]'}, r"data_shape must be a tuple of positive integers"),
    ({"data_shape": None}, r"damaged EMS metadata \(no 'data_shape'\)"),
    ({"schedule": None}, r"damaged EMS metadata \(no 'schedule'\)"),
    ({"info": "[1, 2]"}, r"info must be a dict, got list"),
    ({"info": "{oops"}, r"'info' is not valid JSON"),
], ids=lambda v: None)
def test_malformed_metadata_is_an_ems_error(small_ems, tmp_path, changes, words):
    _, ems = small_ems
    path = _with_metadata(ems.save(tmp_path / "ok.safetensors"), tmp_path, "bad.safetensors", **changes)
    with pytest.raises(EMSError, match=words) as err:
        dp.ems.load(path)
    assert type(err.value) is EMSError and "bad.safetensors" in str(err.value)


def _shared_grey_ems(schedule, info=None):
    """Statistics of 1x8x8 data shared over positions: (1, 1, 1), as compute(shared=True) stores them."""
    lam = np.linspace(*schedule.log_snr_range, 4)
    rows = np.ones((4, 1, 1, 1))
    return EMS(lam, 0.5 * rows, 0 * rows, 0 * rows, (1, 8, 8), schedule.fingerprint(), 16, "grey",
               {"shared": True} if info is None else info)


@pytest.mark.parametrize("info", [None, {}], ids=["compute-shared", "no-info"])
def test_shared_statistics_refuse_another_channel_count(tmp_path, info):
    schedule = dp.DiscreteVP.linear()
    ems = _shared_grey_ems(schedule, info)
    ems.check(schedule, (1, 16, 16))                               # other resolutions: fine
    with pytest.raises(EMSError, match=r"computed for samples of shape \(1, 8, 8\) .*cannot serve samples of shape "
                                       r"\(3, 8, 8\) .*dimension\(s\) 0 \(e.g. the channels\) must match"):
        ems.check(schedule, (3, 8, 8))
    path = ems.save(tmp_path / "grey.ems.safetensors")
    with pytest.raises(EMSError, match=r"cannot serve samples of shape \(3, 16, 16\)"):
        dp.ems.load(path, schedule, (3, 16, 16))
    den = GaussianData(np.zeros(3 * 64), np.full(3 * 64, 0.5)).denoiser(schedule)

    class Image(dp.Denoiser):
        def __init__(self):
            self.schedule = schedule

        def __call__(self, x, t, **kw):
            p = den(x.reshape(len(x), -1), t)
            return dp.Prediction(p.x0.reshape(x.shape), p.eps.reshape(x.shape))

    with pytest.raises(EMSError, match=r"cannot serve samples of shape \(3, 8, 8\)"):
        dp.sample(Image(), torch.randn(2, 3, 8, 8), "dpmsolver-v3", ems=ems, steps=4, progress=False)
    # averaged with share(): the recorded dims are free, the others still must match
    per_element = EMS(ems.lambdas, np.full((4, 1, 8, 8), 0.5), np.zeros((4, 1, 8, 8)), np.zeros((4, 1, 8, 8)),
                      (1, 8, 8), schedule.fingerprint())
    with pytest.raises(EMSError, match="only the shape they were estimated on"):
        per_element.check(schedule, (3, 8, 8))
    per_element.share().check(schedule, (1, 32, 32))
    with pytest.raises(EMSError, match=r"cannot serve samples of shape \(3, 32, 32\)"):
        per_element.share().check(schedule, (3, 32, 32))


def test_saving_where_a_file_stands_in_the_way(small_ems, tmp_path):
    _, ems = small_ems
    blocker = tmp_path / "stats"
    blocker.write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError, match=r"Cannot save the EMS to .*model.ems.safetensors: .*stats is a file, "
                                                 r"not a folder"):
        ems.save(blocker / "model.ems.safetensors")
    with pytest.raises(IsADirectoryError, match=r"Cannot save the EMS to .*: it is a folder. Give a file name"):
        ems.save(tmp_path)
    with pytest.raises(NotADirectoryError, match=r"Cannot save the EMS checkpoint"):
        dp.ems.compute(GaussianData([0.5, -0.3], [0.09, 0.5]).denoiser(dp.DiscreteVP.linear()),
                       torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), n_lambdas=4, batch_size=4,
                       checkpoint=blocker / "run.ckpt", progress=False)


def test_damaged_checkpoint_metadata_is_an_ems_error(tmp_path):
    from safetensors.torch import load_file, save_file

    schedule = dp.DiscreteVP.linear()
    data = GaussianData([0.5, -0.3], [0.09, 0.5])
    x0 = data.data_sample(8, torch.Generator().manual_seed(0))
    options = dict(n_lambdas=4, batch_size=4, progress=False)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        dp.ems.compute(Interrupting(data.denoiser(schedule), after=5 * 3 + 1), x0, checkpoint=ckpt, **options)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "done": "one"})
    with pytest.raises(EMSError, match=r"checkpoint .* has damaged metadata"):
        dp.ems.compute(data.denoiser(schedule), x0, checkpoint=ckpt, **options)
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "settings": "{oops"})
    with pytest.raises(EMSError, match=r"other settings or data"):
        dp.ems.compute(data.denoiser(schedule), x0, checkpoint=ckpt, **options)


def test_data_given_as_a_file_name():
    den = GaussianData([0.5, -0.3], [0.09, 0.5]).denoiser(dp.DiscreteVP.linear())
    with pytest.raises(TypeError, match=r"data must be a tensor .* got str \(load the file first"):
        dp.ems.compute(den, "data.pt")


class Traced(dp.Denoiser):
    """An analytic denoiser called through numpy (forward-mode AD cannot trace it); ``float32_only`` refuses
    float64 inputs like a float32 network that does not cast."""

    def __init__(self, inner, float32_only=False):
        self.inner, self.schedule, self.float32_only = inner, inner.schedule, float32_only

    def __call__(self, x, t, **kw):
        if self.float32_only and x.dtype != torch.float32:
            raise RuntimeError("expected scalar type Float but found Double")
        return self.inner(torch.as_tensor(x.numpy()), t)


def sharp_mixture():
    """8 components of std 0.05 in 64 dimensions: eps changes over a small fraction of sigma at low noise."""
    g = np.random.default_rng(0)
    return GaussianMixture(g.normal(size=(8, 64)), np.full((8, 64), 0.05**2))


def test_finite_difference_statistics_of_a_sharp_model_agree_with_forward_mode():
    """float32 points, 64 dims. The old fixed step (3e-3, two-point) gave l off by 1.3e-4 and s off by 3.5; the
    fourth-order difference with a step ~ sigma, evaluated in float64 where the denoiser takes it, agrees with
    forward-mode AD to float32 round-off."""
    schedule = dp.DiscreteVP.linear()
    mix = sharp_mixture()
    x0 = mix.data_sample(128, torch.Generator().manual_seed(0))
    options = dict(n_lambdas=40, batch_size=128, progress=False, dtype=torch.float32)
    forward = dp.ems.compute(mix.denoiser(schedule), x0, **options)
    fd = dp.ems.compute(Traced(mix.denoiser(schedule)), x0, jvp="finite_difference", **options)
    assert np.abs(fd.l - forward.l).max() < 2e-6                  # float32 AD's own round-off is ~4e-7
    # s = Cov / Var f: at the noisiest node Var f ~ 0 and s is a ratio of round-off; elsewhere tight
    assert np.abs(fd.s - forward.s).max() < 0.1
    assert np.abs(fd.s - forward.s)[1:].max() < 2e-3 and np.abs(fd.b - forward.b)[1:].max() < 2e-3
    assert fd.diagnose() is None and forward.diagnose() is None
    # a denoiser that refuses float64 is differenced in float32: rounding-limited, still close and sound
    f32 = dp.ems.compute(Traced(mix.denoiser(schedule), float32_only=True), x0, jvp="finite_difference", **options)
    assert np.abs(f32.l - forward.l).max() < 2e-4 and np.abs(f32.s - forward.s)[1:].max() < 0.05
    assert f32.diagnose() is None


def test_soundness_diagnostic_names_the_nodes_and_the_fix():
    schedule = dp.DiscreteVP.linear()
    lam = np.linspace(*schedule.log_snr_range, 41)
    s = np.zeros((41, 2))
    assert EMS(lam, np.ones((41, 2)), s, np.zeros((41, 2)), (2,), schedule.fingerprint()).diagnose() is None
    s[17, 1] = 500.0                        # one spurious spike, as float32 differences produced on a sharp model
    spiky = EMS(lam, np.ones((41, 2)), s, np.zeros((41, 2)), (2,), schedule.fingerprint(), info={"jvp": "forward"})
    message = spiky.diagnose()
    assert f"node(s) 17 (lambda {lam[17]:.3g}, max |s| 500)" in message
    assert "n_lambdas" in message and "more steps" in message
    with pytest.raises(EMSError, match=r"These EMS look unsound: .*int \|s\| reaches 1[0-9]{2} > 13.8"):
        spiky.check_sound()
    # moderate s of order 1 (DPM-Solver's s = -1 everywhere) is sound
    assert EMS(lam, np.zeros((41, 2)), -np.ones((41, 2)), np.zeros((41, 2)), (2,), "x").diagnose() is None


def test_compute_warns_about_unsound_statistics_and_returns_them():
    """Too coarse a grid (6 intervals, 18 dims): l' is a coarse difference, s comes out in the hundreds where f hardly
    varies. compute says so at once, naming the nodes, and still returns the statistics."""
    schedule = dp.DiscreteVP.linear()
    g = GaussianData(np.zeros(18), np.linspace(0.1, 1.0, 18))
    x0 = g.data_sample(50, torch.Generator().manual_seed(0))
    with pytest.warns(dp.ems.EMSWarning, match=r"These EMS look unsound: .*at node\(s\) .*Recompute them with more "
                                               r"nodes \(n_lambdas\)") as record:
        ems = dp.ems.compute(g.denoiser(schedule), x0, n_lambdas=6, batch_size=50, progress=False)
    assert len(record) == 1 and ems.lambdas.size == 7
    with pytest.raises(EMSError):
        ems.check_sound()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", dp.ems.EMSWarning)
        dp.ems.compute(g.denoiser(schedule), x0, n_lambdas=40, batch_size=50, progress=False)
