"""Schedules: alpha, sigma and lambda against their closed forms; the exact inverse; the discrete table."""

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData

N_TRAIN = 1000


def _linear_betas(n=N_TRAIN, start=1e-4, end=0.02):
    return np.linspace(start, end, n)


def _scaled_linear_betas(n=N_TRAIN, start=0.00085, end=0.012):
    return np.linspace(start**0.5, end**0.5, n) ** 2


def _rescale_zero_terminal_snr(betas):
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2024, Algorithm 1), transcribed to numpy."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    a0, a_last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - a_last) * (a0 / (a0 - a_last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


# name -> (schedule factory, closed-form (alpha, sigma) as functions of a float64 array t)
def _cosine_alpha(t, s=0.008):
    return np.cos(np.pi / 2 * (t + s) / (1 + s)) / np.cos(np.pi / 2 * s / (1 + s))


def _linear_vp_alpha(t, b0=0.1, b1=20.0):
    return np.exp(-(b1 - b0) * t**2 / 4 - b0 * t / 2)


CLOSED_FORMS = {
    "linear_vp": (lambda: dp.LinearVP(),
                  lambda t: (_linear_vp_alpha(t), np.sqrt(1 - _linear_vp_alpha(t) ** 2))),
    "linear_vp_custom": (lambda: dp.LinearVP(beta_0=0.5, beta_1=10.0, t_min=1e-4, t_max=0.9),
                         lambda t: (_linear_vp_alpha(t, 0.5, 10.0), np.sqrt(1 - _linear_vp_alpha(t, 0.5, 10.0) ** 2))),
    "cosine": (lambda: dp.CosineVP(),
               lambda t: (_cosine_alpha(t), np.sqrt(1 - _cosine_alpha(t) ** 2))),
    "edm": (lambda: dp.EDM(), lambda t: (np.ones_like(t), t)),
    "edm_custom": (lambda: dp.EDM(sigma_min=1e-3, sigma_max=500.0), lambda t: (np.ones_like(t), t)),
    "flow": (lambda: dp.RectifiedFlow(), lambda t: (1 - t, t)),
    "flow_custom": (lambda: dp.RectifiedFlow(t_min=1e-5, t_max=1 - 1e-5), lambda t: (1 - t, t)),
}

ALL_SCHEDULES = {
    "discrete_linear": lambda: dp.DiscreteVP.linear(),
    "discrete_scaled_linear": lambda: dp.DiscreteVP.scaled_linear(),
    "discrete_from_alphas_cumprod": lambda: dp.DiscreteVP.from_alphas_cumprod(np.cumprod(1 - _linear_betas(50))),
    "discrete_zero_snr": lambda: dp.DiscreteVP.from_betas(_rescale_zero_terminal_snr(_scaled_linear_betas())),
    **{name: factory for name, (factory, _) in CLOSED_FORMS.items()},
}


def _dense(schedule, n=20001):
    return np.linspace(schedule.t_min, schedule.t_max, n)


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_alpha_sigma_log_snr_match_closed_form(name):
    factory, closed = CLOSED_FORMS[name]
    schedule = factory()
    t = _dense(schedule)
    alpha, sigma = closed(t)
    np.testing.assert_allclose(schedule.alpha(t), alpha, rtol=1e-12, atol=0)
    np.testing.assert_allclose(schedule.sigma(t), sigma, rtol=1e-10, atol=0)
    np.testing.assert_allclose(schedule.log_snr(t), np.log(alpha) - np.log(sigma), rtol=1e-10, atol=1e-12)


def test_linear_vp_log_alpha_formula():
    schedule = dp.LinearVP(beta_0=0.1, beta_1=20.0)
    t = _dense(schedule)
    np.testing.assert_allclose(schedule.log_alpha(t), -(20.0 - 0.1) * t**2 / 4 - 0.1 * t / 2, rtol=1e-14)
    # and its derivative is -beta(t)/2 with beta(t) = beta_0 + t (beta_1 - beta_0) (Song et al. 2021)
    h = 1e-6
    deriv = (schedule.log_alpha(t[1:-1] + h) - schedule.log_alpha(t[1:-1] - h)) / (2 * h)
    np.testing.assert_allclose(deriv, -0.5 * (0.1 + t[1:-1] * 19.9), rtol=1e-7)


def test_cosine_default_range_matches_reference():
    schedule = dp.CosineVP()
    assert schedule.t_max == pytest.approx(0.9946)
    assert schedule.t_min == pytest.approx(1e-3)
    assert schedule.log_alpha(np.float64(0.0)) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_variance_preserving(name):
    schedule = ALL_SCHEDULES[name]()
    if not isinstance(schedule, dp.schedules.VPSchedule):
        return
    t = _dense(schedule)
    np.testing.assert_allclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, 1.0, rtol=1e-13)


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_log_snr_is_strictly_decreasing_and_inverse_is_exact(name):
    schedule = ALL_SCHEDULES[name]()
    t = _dense(schedule)
    lam = schedule.log_snr(t)
    assert lam.shape == t.shape and lam.dtype == np.float64
    assert np.all(np.isfinite(lam))
    assert np.all(np.diff(lam) < 0)
    back = schedule.t_from_log_snr(lam)
    np.testing.assert_allclose(back, t, rtol=1e-10, atol=0)
    # lambda is consistent with alpha and sigma
    np.testing.assert_allclose(lam, np.log(schedule.alpha(t)) - np.log(schedule.sigma(t)), rtol=1e-12, atol=1e-12)
    lo, hi = schedule.log_snr_range
    assert lo == schedule.log_snr(schedule.t_max) and hi == schedule.log_snr(schedule.t_min)
    assert lo < hi


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_inverse_of_log_snr_on_a_lambda_grid(name):
    """The other direction: log_snr(t_from_log_snr(lam)) == lam for lam inside the schedule's range."""
    schedule = ALL_SCHEDULES[name]()
    lo, hi = schedule.log_snr_range
    lam = np.linspace(lo, hi, 5001)
    np.testing.assert_allclose(schedule.log_snr(schedule.t_from_log_snr(lam)), lam, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_scalar_in_float_out_array_in_array_out(name):
    schedule = ALL_SCHEDULES[name]()
    t = 0.5 * (schedule.t_min + schedule.t_max)
    for fn in (schedule.alpha, schedule.sigma, schedule.log_snr):
        out = fn(t)
        assert type(out) is float
        assert type(fn(np.float64(t))) is float
        arr = fn(np.array([t, schedule.t_min]))
        assert isinstance(arr, np.ndarray) and arr.shape == (2,) and arr.dtype == np.float64
        assert arr[0] == out
        assert fn([t]).shape == (1,)
        assert fn(np.full((2, 3), t)).shape == (2, 3)
    lam = schedule.log_snr(t)
    assert type(schedule.t_from_log_snr(lam)) is float
    assert isinstance(schedule.t_from_log_snr(np.array([lam])), np.ndarray)
    a, s = schedule.alpha_sigma(t)
    assert type(a) is float and type(s) is float
    assert a == schedule.alpha(t) and s == schedule.sigma(t)


# ----------------------------------------------------------------------------------------------------------------
# DiscreteVP: the table, its construction, the piecewise-linear interpolation


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_discrete_constructors_agree(kind):
    betas = _linear_betas() if kind == "linear" else _scaled_linear_betas()
    named = getattr(dp.DiscreteVP, kind)()
    from_betas = dp.DiscreteVP.from_betas(betas)
    from_ac = dp.DiscreteVP.from_alphas_cumprod(np.cumprod(1.0 - betas))
    expected = np.cumprod(1.0 - betas)
    for schedule in (named, from_betas, from_ac):
        np.testing.assert_allclose(schedule.alphas_cumprod, expected, rtol=1e-14)
        assert schedule.num_train_steps == N_TRAIN
        assert schedule.t_min == 1 / N_TRAIN and schedule.t_max == 1.0
    t = _dense(named)
    np.testing.assert_array_equal(named.log_snr(t), from_betas.log_snr(t))
    np.testing.assert_allclose(named.log_snr(t), from_ac.log_snr(t), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["discrete_linear", "discrete_scaled_linear", "discrete_from_alphas_cumprod",
                                  "discrete_zero_snr"])
def test_discrete_reproduces_the_table(name):
    schedule = ALL_SCHEDULES[name]()
    ac = schedule.alphas_cumprod
    n_train = ac.size
    t_n = (np.arange(n_train) + 1.0) / n_train
    np.testing.assert_allclose(schedule.alpha(t_n) ** 2, ac, rtol=1e-13, atol=0)
    np.testing.assert_allclose(schedule.sigma(t_n) ** 2, 1.0 - ac, rtol=1e-13, atol=0)
    np.testing.assert_allclose(schedule.log_snr(t_n), 0.5 * np.log(ac / (1.0 - ac)), rtol=1e-12, atol=1e-13)
    # the network time of t_n is the train index n (the reference's 1000 (t - 1/N) for N = 1000)
    np.testing.assert_allclose(schedule.train_index(t_n), np.arange(n_train), atol=1e-9)
    np.testing.assert_allclose(schedule.t_from_train_index(np.arange(n_train)), t_n, rtol=1e-15)


@pytest.mark.parametrize("name", ["discrete_linear", "discrete_scaled_linear", "discrete_zero_snr"])
def test_discrete_is_piecewise_linear_in_log_alpha(name):
    schedule = ALL_SCHEDULES[name]()
    ac = schedule.alphas_cumprod
    n_train = ac.size
    log_a = 0.5 * np.log(ac)
    rng = np.random.default_rng(0)
    n = rng.integers(0, n_train - 1, size=500)
    frac = rng.random(500)
    t = (n + 1 + frac) / n_train
    expected = (1 - frac) * log_a[n] + frac * log_a[n + 1]
    np.testing.assert_allclose(np.log(schedule.alpha(t)), expected, rtol=1e-11, atol=1e-14)
    # midpoints: the geometric mean of the neighbouring alphas
    mid = (np.arange(n_train - 1) + 1.5) / n_train
    np.testing.assert_allclose(schedule.alpha(mid), np.sqrt(np.sqrt(ac[:-1] * ac[1:])), rtol=1e-12)


def test_discrete_t_from_log_snr_matches_reference_inverse_lambda():
    """The reference's ``inverse_lambda``: log alpha = -logaddexp(0, -2 lambda)/2, interpolated back to t."""
    schedule = dp.DiscreteVP.linear()
    t_array = np.linspace(0.0, 1.0, N_TRAIN + 1)[1:]
    log_alpha_array = 0.5 * np.log(schedule.alphas_cumprod)
    lam = np.linspace(*schedule.log_snr_range, 777)
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
    expected = np.interp(log_alpha, log_alpha_array[::-1], t_array[::-1])
    np.testing.assert_allclose(schedule.t_from_log_snr(lam), expected, rtol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Zero terminal SNR


def test_zero_terminal_snr_schedule_is_finite_everywhere():
    betas = _rescale_zero_terminal_snr(_scaled_linear_betas())
    assert betas[-1] == 1.0
    ac_raw = np.cumprod(1.0 - betas)
    assert ac_raw[-1] == 0.0
    for schedule in (dp.DiscreteVP.from_betas(betas), dp.DiscreteVP.from_alphas_cumprod(ac_raw)):
        t = np.concatenate([_dense(schedule), [schedule.t_max]])
        for values in (schedule.alpha(t), schedule.sigma(t), schedule.log_snr(t)):
            assert np.all(np.isfinite(values))
        assert np.all(schedule.alpha(t) > 0)
        assert schedule.sigma(1.0) == pytest.approx(1.0, abs=1e-7)
        assert schedule.alpha(1.0) < 1e-3  # essentially zero SNR, clamped like diffusers (2**-24 in alpha_bar)
        assert np.all(np.diff(schedule.log_snr(t[:-1])) < 0)
        lam = schedule.log_snr(t)
        assert np.all(np.isfinite(schedule.t_from_log_snr(lam)))
        np.testing.assert_allclose(schedule.t_from_log_snr(lam), t, rtol=1e-10)
        # every other train step is untouched
        np.testing.assert_allclose(schedule.alphas_cumprod[:-1], ac_raw[:-1], rtol=1e-14)


@pytest.mark.parametrize("solver,grid", [("dpmsolver++", "logSNR"), ("dpmsolver", "time_uniform"),
                                         ("ddim", "karras")])
def test_zero_terminal_snr_sampling_is_finite(solver, grid):
    schedule = dp.DiscreteVP.from_betas(_rescale_zero_terminal_snr(_scaled_linear_betas()))
    problem = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    exact = problem.denoiser(schedule)

    def v_net(x, t_net):  # a v-prediction network, as zero-SNR models are trained (index time input)
        t = float(schedule.t_from_train_index(t_net[0].item()))
        a, s = schedule.alpha_sigma(t)
        pred = exact(x, t)
        return a * pred.eps - s * pred.x0

    denoiser = dp.wrap_model(v_net, schedule, prediction="v", time_input="discrete")
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    out = dp.sample(denoiser, x_T, solver, steps=25, grid=grid, progress=False)
    assert torch.isfinite(out.x).all()
    assert out.nfe == 25
    ref = problem.exact_solution(schedule, x_T, schedule.t_max, schedule.t_min)
    assert torch.isfinite(ref).all()
    assert (out.x - ref).abs().max() < 0.5  # 25 steps: a sanity bound; the point here is finiteness


# ----------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("build", [
    lambda: dp.DiscreteVP.from_alphas_cumprod([0.9]),
    lambda: dp.DiscreteVP.from_alphas_cumprod([0.9, 0.95, 0.5]),          # not decreasing
    lambda: dp.DiscreteVP.from_alphas_cumprod([1.0, 0.9, 0.5]),           # sigma = 0
    lambda: dp.DiscreteVP.from_alphas_cumprod([0.9, 0.0, 0.0]),           # zero before the end
    lambda: dp.DiscreteVP.from_alphas_cumprod([0.9, float("nan"), 0.1]),
    lambda: dp.DiscreteVP.from_betas([0.1, -0.1, 0.2]),
    lambda: dp.DiscreteVP.from_betas([0.1, 1.5]),
    lambda: dp.LinearVP(beta_0=20.0, beta_1=0.1),
    lambda: dp.LinearVP(t_min=0.0),
    lambda: dp.CosineVP(t_max=1.0),
    lambda: dp.EDM(sigma_min=0.0),
    lambda: dp.EDM(sigma_min=10.0, sigma_max=1.0),
    lambda: dp.RectifiedFlow(t_min=0.0),
    lambda: dp.RectifiedFlow(t_max=1.0),
])
def test_invalid_schedules_raise(build):
    with pytest.raises(ValueError):
        build()


def test_contains_and_fingerprint():
    schedule = dp.DiscreteVP.linear()
    assert schedule.contains([schedule.t_min, 0.5, schedule.t_max])
    assert not schedule.contains(0.0)
    assert not schedule.contains(1.01)
    assert schedule.fingerprint() == dp.DiscreteVP.linear().fingerprint()
    assert schedule.fingerprint() != dp.DiscreteVP.scaled_linear().fingerprint()
    assert dp.EDM().fingerprint() != dp.EDM(sigma_max=100.0).fingerprint()
    assert math.isclose(dp.EDM().log_snr(1.0), 0.0, abs_tol=1e-15)


def test_discrete_from_a_float32_torch_table_as_diffusers_builds_it():
    """diffusers keeps ``alphas_cumprod`` as a float32 tensor; passing it straight in must work."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    schedule = dp.DiscreteVP.from_alphas_cumprod(ac)
    assert schedule.alphas_cumprod.dtype == np.float64
    t_n = (np.arange(N_TRAIN) + 1.0) / N_TRAIN
    np.testing.assert_allclose(schedule.alpha(t_n) ** 2, ac.double().numpy(), rtol=1e-13)
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - _scaled_linear_betas()), rtol=1e-4)
    # and the zero-terminal-SNR rescale done in float32 torch, as diffusers does it
    zsnr = torch.from_numpy(_rescale_zero_terminal_snr(betas.double().numpy())).float()
    schedule = dp.DiscreteVP.from_betas(zsnr)
    assert np.all(np.isfinite(schedule.log_snr(_dense(schedule))))
    assert schedule.alphas_cumprod[-1] > 0


@pytest.mark.parametrize("build,error,words", [
    (lambda: dp.LinearVP(beta_0=-0.5), ValueError, r"0 < beta_0 < beta_1 .*got beta_0=-0.5, beta_1=20.0"),
    (lambda: dp.LinearVP(beta_0=25.0, beta_1=20.0), ValueError, r"got beta_0=25.0, beta_1=20.0"),
    (lambda: dp.LinearVP(beta_1=float("inf")), ValueError, r"LinearVP beta_1 must be finite, got inf"),
    (lambda: dp.LinearVP(t_max=float("nan")), ValueError, r"LinearVP t_max must be finite, got nan"),
    (lambda: dp.LinearVP(t_min=0.5, t_max=0.5), ValueError, r"0 < t_min < t_max .*got t_min=0.5, t_max=0.5"),
    (lambda: dp.LinearVP(beta_0="0.1"), TypeError, r"LinearVP beta_0 must be a real number, got str '0.1'"),
    (lambda: dp.CosineVP(s=0.0), ValueError, r"CosineVP needs an offset 0 < s <= 1 .*got s=0.0"),
    (lambda: dp.CosineVP(s=-0.5), ValueError, r"got s=-0.5"),
    (lambda: dp.CosineVP(s=50.0), ValueError, r"got s=50.0"),
    (lambda: dp.CosineVP(s=float("nan")), ValueError, r"CosineVP s must be finite, got nan"),
    (lambda: dp.CosineVP(t_max=1.2), ValueError, r"0 < t_min < t_max < 1 .*got t_min=0.001, t_max=1.2"),
    (lambda: dp.CosineVP(t_min=0.6, t_max=0.5), ValueError, r"got t_min=0.6, t_max=0.5"),
    (lambda: dp.EDM(sigma_min=-1.0), ValueError, r"0 < sigma_min < sigma_max .*got sigma_min=-1.0, sigma_max=80.0"),
    (lambda: dp.EDM(sigma_min=10.0, sigma_max=5.0), ValueError, r"got sigma_min=10.0, sigma_max=5.0"),
    (lambda: dp.EDM(sigma_max=float("inf")), ValueError, r"EDM sigma_max must be finite, got inf"),
    (lambda: dp.EDM(sigma_min=None), TypeError, r"EDM sigma_min must be a real number, got NoneType"),
    (lambda: dp.RectifiedFlow(t_max=1.0), ValueError, r"RectifiedFlow needs 0 < t_min < t_max < 1 .*t_max=1.0"),
    (lambda: dp.RectifiedFlow(t_min=0.7, t_max=0.3), ValueError, r"got t_min=0.7, t_max=0.3"),
    (lambda: dp.DiscreteVP.from_betas([]), ValueError, r"at least 2 train steps; got 0 betas"),
    (lambda: dp.DiscreteVP.linear(n=1), ValueError, r"DiscreteVP.linear needs n >= 2 train steps .*got n=1"),
    (lambda: dp.DiscreteVP.linear(n=10.5), ValueError, r"got n=10.5"),
    (lambda: dp.DiscreteVP.from_betas([0.02, float("inf")]), ValueError, r"betas must be finite .*got inf at index 1"),
    (lambda: dp.DiscreteVP.from_alphas_cumprod([0.9, 0.5, float("nan")]), ValueError,
     r"alphas_cumprod must be finite .*got nan at index 2"),
    (lambda: dp.DiscreteVP.from_alphas_cumprod([[0.9, 0.5], [0.3, 0.1]]), ValueError,
     r"alphas_cumprod must be a 1-D array .*got shape \(2, 2\)"),
    (lambda: dp.DiscreteVP.linear(beta_end=1.5), ValueError, r"betas in \(0, 1\]; got beta_end=1.5"),
    (lambda: dp.DiscreteVP.scaled_linear(beta_start=-0.1), ValueError, r"got beta_start=-0.1"),
], ids=lambda v: None)
def test_out_of_range_parameters_are_named_with_their_value(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_parameters_at_the_edge_of_the_range_still_build():
    assert dp.CosineVP(s=1.0).log_snr(0.5) > dp.CosineVP(s=1.0).log_snr(0.9)
    assert np.isfinite(dp.CosineVP(t_max=0.9999).log_snr_range).all()
    assert dp.DiscreteVP.linear(n=2).num_train_steps == 2
    assert dp.DiscreteVP.from_betas([0.5, 1.0]).alphas_cumprod[-1] > 0          # zero terminal SNR, clamped
    assert dp.LinearVP(t_max=5.0).t_max == 5.0 and np.isfinite(dp.LinearVP(t_max=5.0).log_snr(5.0))
