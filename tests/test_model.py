"""The model wrapper: prediction conversions, network time inputs, kwargs, guidance and x0 corrections."""

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianMixture

from conftest import SCHEDULES


def _times(schedule):
    return [schedule.t_min, 0.37 * schedule.t_min + 0.63 * schedule.t_max, schedule.t_max]


def _target(prediction, x0, eps, a, s):
    """What an exact network of each parametrization outputs."""
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,          # Salimans & Ho 2022
        "score": -eps / s,              # grad_x log p_t(x) = -E[eps | x] / sigma
        "flow": eps - x0,               # rectified-flow velocity (SD3 / Flux convention)
    }[prediction]


class Recorder:
    """A network that returns ``fn(x, t, **kw)`` and records every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, **kwargs):
        self.calls.append({"x": x, "t": t, "kwargs": kwargs})
        return self.fn(x, t, **kwargs)


def _pair(generator, shape=(3, 2, 4), dtype=torch.float64):
    x0 = torch.randn(shape, generator=generator, dtype=dtype)
    eps = torch.randn(shape, generator=generator, dtype=dtype)
    return x0, eps


# ----------------------------------------------------------------------------------------------------------------
# Prediction conversions


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
def test_exact_network_of_each_parametrization_gives_x0_and_eps_back(schedule_name, prediction, generator):
    schedule = SCHEDULES[schedule_name]()
    x0, eps = _pair(generator)
    for t in _times(schedule):
        a, s = schedule.alpha_sigma(t)
        x = a * x0 + s * eps
        target = _target(prediction, x0, eps, a, s)

        def net(x_in, t_in):
            assert torch.equal(x_in, x)
            return target.clone()

        pred = dp.wrap_model(net, schedule, prediction=prediction)(x, t)
        assert isinstance(pred, dp.Prediction)
        torch.testing.assert_close(pred.x0, x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pred.eps, eps, rtol=1e-12, atol=1e-12)
        # the two predictions are always consistent with x
        torch.testing.assert_close(a * pred.x0 + s * pred.eps, x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("alias,name", [("epsilon", "eps"), ("noise", "eps"), ("sample", "x0"), ("x_start", "x0"),
                                        ("v_prediction", "v"), ("flow_prediction", "flow")])
def test_prediction_aliases(alias, name):
    assert dp.wrap_model(lambda x, t: x, dp.EDM(), prediction=alias).prediction == name


def test_unknown_prediction_and_time_input_raise():
    with pytest.raises(ValueError, match="prediction"):
        dp.wrap_model(lambda x, t: x, dp.EDM(), prediction="epsilonn")
    with pytest.raises(ValueError, match="time_input"):
        dp.wrap_model(lambda x, t: x, dp.EDM(), time_input="seconds")
    with pytest.raises(TypeError, match="time_input .* got int 3"):
        dp.wrap_model(lambda x, t: x, dp.EDM(), time_input=3)
    with pytest.raises(TypeError, match="schedule must be a dpmsolve Schedule .* got str"):
        dp.wrap_model(lambda x, t: x, "edm")


def test_output_shape_mismatch_raises():
    x = torch.zeros(2, 3, 4)
    learned_variance = dp.wrap_model(lambda x, t: torch.cat([x, x], dim=1), dp.LinearVP())
    with pytest.raises(ValueError, match="shape"):
        learned_variance(x, 0.5)
    wrong_batch = dp.wrap_model(lambda x, t: x[:1], dp.LinearVP())
    with pytest.raises(ValueError, match="shape"):
        wrong_batch(x, 0.5)


def test_tuple_and_dataclass_outputs_are_unwrapped(generator):
    """diffusers models return an object with ``.sample`` or a tuple (return_dict=False)."""
    schedule = dp.EDM()
    x0, eps = _pair(generator)
    x = x0 + 2.0 * eps

    class Output:
        def __init__(self, sample):
            self.sample = sample

    for net in (lambda x, t: (eps,), lambda x, t: Output(eps)):
        pred = dp.wrap_model(net, schedule)(x, 2.0)
        torch.testing.assert_close(pred.eps, eps)
        torch.testing.assert_close(pred.x0, x0)


# ----------------------------------------------------------------------------------------------------------------
# Network time inputs


def _expected_time(schedule, time_input, t):
    a, s = schedule.alpha_sigma(t)
    if time_input == "discrete":
        return schedule.num_train_steps * t - 1.0
    return {"continuous": t, "1000t": 1000.0 * t, "sigma": s / a, "c_noise": math.log(s / a) / 4}[time_input]


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("time_input", ["continuous", "discrete", "1000t", "sigma", "c_noise"])
def test_network_receives_the_mapped_time(schedule_name, time_input):
    schedule = SCHEDULES[schedule_name]()
    if time_input == "discrete" and not isinstance(schedule, dp.DiscreteVP):
        with pytest.raises(ValueError, match="DiscreteVP"):
            dp.wrap_model(lambda x, t: x, schedule, time_input=time_input)
        return
    net = Recorder(lambda x, t: torch.zeros_like(x))
    denoiser = dp.wrap_model(net, schedule, time_input=time_input)
    x = torch.randn(5, 3)
    for t in _times(schedule):
        denoiser(x, t)
        t_net = net.calls[-1]["t"]
        assert isinstance(t_net, torch.Tensor) and t_net.shape == (5,)
        assert t_net.dtype.is_floating_point
        expected = _expected_time(schedule, time_input, t)
        torch.testing.assert_close(t_net, torch.full((5,), expected), rtol=1e-13, atol=1e-13)
        assert denoiser.network_time(t) == pytest.approx(expected, rel=1e-13, abs=1e-13)


def test_discrete_time_input_hits_train_indices():
    schedule = dp.DiscreteVP.linear()
    net = Recorder(lambda x, t: torch.zeros_like(x))
    denoiser = dp.wrap_model(net, schedule, time_input="discrete")
    for n in (0, 1, 499, 998, 999):
        denoiser(torch.zeros(2, 1), (n + 1) / 1000)
        torch.testing.assert_close(net.calls[-1]["t"], torch.full((2,), float(n)), rtol=0, atol=1e-9)
    # the reference DPM-Solver's t_input = 1000 (t - 1/N) for N = 1000
    t = 0.4237
    denoiser(torch.zeros(2, 1), t)
    assert net.calls[-1]["t"][0].item() == pytest.approx(1000 * (t - 1 / 1000), rel=1e-13)
    # another table length: the index is N t - 1 for that N
    short = dp.wrap_model(net, dp.DiscreteVP.linear(n=50), time_input="discrete")
    for n in (0, 17, 49):
        short(torch.zeros(2, 1), (n + 1) / 50)
        torch.testing.assert_close(net.calls[-1]["t"], torch.full((2,), float(n)), rtol=0, atol=1e-12)
    short(torch.zeros(2, 1), 0.5 / 50 + 1 / 50)
    assert net.calls[-1]["t"][0].item() == pytest.approx(0.5)


def test_edm_time_inputs_are_karras_preconditioning_values():
    schedule = dp.EDM()
    for t in (0.002, 0.5, 80.0):
        assert dp.wrap_model(lambda x, t: x, schedule, time_input="sigma").network_time(t) == pytest.approx(t)
        assert dp.wrap_model(lambda x, t: x, schedule, time_input="c_noise").network_time(t) == pytest.approx(
            0.25 * math.log(t))


def test_callable_time_input():
    schedule = dp.RectifiedFlow()
    net = Recorder(lambda x, t: torch.zeros_like(x))
    denoiser = dp.wrap_model(net, schedule, time_input=lambda t: 7.0 * t + 1.0)
    denoiser(torch.zeros(4, 2), 0.25)
    torch.testing.assert_close(net.calls[-1]["t"], torch.full((4,), 2.75))
    assert denoiser.network_time(0.25) == 2.75


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype_and_an_accurate_time(dtype, generator):
    schedule = dp.DiscreteVP.linear()
    x0, eps = _pair(generator)
    t = 0.7773
    a, s = schedule.alpha_sigma(t)
    x = (a * x0 + s * eps).to(dtype)
    for prediction in ("eps", "x0", "v", "score", "flow"):
        target = _target(prediction, x0, eps, a, s)
        net = Recorder(lambda x_in, t_in: target.to(dtype))
        denoiser = dp.wrap_model(net, schedule, prediction=prediction, time_input="discrete")
        pred = denoiser(x, t)
        assert pred.x0.dtype == dtype and pred.eps.dtype == dtype
        assert torch.isfinite(pred.x0).all() and torch.isfinite(pred.eps).all()
        torch.testing.assert_close(pred.eps.double(), eps, rtol=0.05, atol=0.05)
        # the time input is a noise level, not data: it must not be rounded to the data's half precision
        # (bf16 would turn the train index 776.3 into 776 or 780); the reference keeps it in float32.
        assert net.calls[-1]["t"][0].item() == pytest.approx(1000 * t - 1, rel=1e-6)
    # a network output in another dtype is cast back to the input's dtype
    pred = dp.wrap_model(lambda x_in, t_in: eps.float(), schedule)(x, t)
    assert pred.eps.dtype == dtype and pred.x0.dtype == dtype


# ----------------------------------------------------------------------------------------------------------------
# Model kwargs


def test_model_kwargs_pass_through_and_per_call_kwargs_override():
    net = Recorder(lambda x, t, **kw: torch.zeros_like(x))
    denoiser = dp.wrap_model(net, dp.LinearVP(), model_kwargs={"y": 1, "context": "a"})
    denoiser(torch.zeros(2, 3), 0.5)
    assert net.calls[-1]["kwargs"] == {"y": 1, "context": "a"}
    denoiser(torch.zeros(2, 3), 0.5, context="b", mask=None)
    assert net.calls[-1]["kwargs"] == {"y": 1, "context": "b", "mask": None}
    denoiser(torch.zeros(2, 3), 0.5)
    assert net.calls[-1]["kwargs"] == {"y": 1, "context": "a"}  # the override did not stick


def test_sample_passes_model_kwargs_to_every_call():
    net = Recorder(lambda x, t, **kw: torch.zeros_like(x) + kw["shift"])
    denoiser = dp.wrap_model(net, dp.LinearVP())
    sol = dp.sample(denoiser, torch.randn(2, 3), "dpmsolver++", steps=4, model_kwargs={"shift": 0.5},
                    progress=False)
    assert sol.nfe == 4 and len(net.calls) == 4
    assert all(call["kwargs"] == {"shift": 0.5} for call in net.calls)


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def _conditional_net(w):
    """A nonlinear network whose output depends on a class-label embedding ``y`` of shape (batch, 1)."""
    def fn(x, t, y):
        assert y.shape[0] == x.shape[0]
        return torch.tanh(w * x + y[:, :, None]) + 0.1 * t[:, None, None] * x
    return fn


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("scale", [0.0, 3.5, 7.5])
def test_cfg_is_one_doubled_call_equal_to_two_separate_calls(prediction, scale, generator):
    schedule = dp.LinearVP()
    w = torch.randn(1, 3, 4, generator=generator)
    net = Recorder(_conditional_net(w))
    model = dp.wrap_model(net, schedule, prediction=prediction)
    x = torch.randn(2, 3, 4, generator=generator)
    y_c, y_u = torch.tensor([[0.7], [-1.3]]), torch.zeros(2, 1)
    guided = dp.ClassifierFreeGuidance(model, scale, cond={"y": y_c}, uncond={"y": y_u})
    t = 0.42
    out = guided(x, t)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call["x"].shape == (4, 3, 4)
    torch.testing.assert_close(call["x"], torch.cat([x, x]))
    torch.testing.assert_close(call["kwargs"]["y"], torch.cat([y_u, y_c]))
    assert call["t"].shape == (4,)

    m_c, m_u = model(x, t, y=y_c), model(x, t, y=y_u)
    torch.testing.assert_close(out.x0, m_u.x0 + scale * (m_c.x0 - m_u.x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.eps, m_u.eps + scale * (m_c.eps - m_u.eps), rtol=1e-12, atol=1e-12)
    # guidance on (x0, eps) equals guidance in the network's own output space
    raw_c, raw_u = net.fn(x, net.calls[1]["t"], y_c), net.fn(x, net.calls[1]["t"], y_u)
    a, s = schedule.alpha_sigma(t)
    ref = dp.PREDICTIONS[prediction](raw_u + scale * (raw_c - raw_u), x, a, s)
    torch.testing.assert_close(out.x0, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.eps, ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.alpha(t) * out.x0 + schedule.sigma(t) * out.eps, x, rtol=1e-12, atol=1e-12)


def test_cfg_scale_one_is_the_conditional_model_with_one_undoubled_call(generator):
    w = torch.randn(1, 3, 4, generator=generator)
    net = Recorder(_conditional_net(w))
    model = dp.wrap_model(net, dp.EDM())
    x = torch.randn(2, 3, 4, generator=generator)
    y_c, y_u = torch.tensor([[0.7], [-1.3]]), torch.zeros(2, 1)
    out = dp.ClassifierFreeGuidance(model, 1.0, cond={"y": y_c}, uncond={"y": y_u})(x, 3.0)
    assert len(net.calls) == 1 and net.calls[0]["x"].shape == (2, 3, 4)
    torch.testing.assert_close(net.calls[0]["kwargs"]["y"], y_c)
    ref = model(x, 3.0, y=y_c)
    assert torch.equal(out.x0, ref.x0) and torch.equal(out.eps, ref.eps)


def test_cfg_non_tensor_kwargs_are_shared_and_mismatched_keys_raise():
    net = Recorder(lambda x, t, y, mode: torch.zeros_like(x) + y[:, None])
    model = dp.wrap_model(net, dp.EDM())
    guided = dp.ClassifierFreeGuidance(model, 2.0, cond={"y": torch.ones(3), "mode": "fast"},
                                       uncond={"y": torch.zeros(3), "mode": "fast"})
    out = guided(torch.zeros(3, 2), 1.0)
    assert net.calls[-1]["kwargs"]["mode"] == "fast"
    torch.testing.assert_close(out.eps, torch.full((3, 2), 2.0))
    with pytest.raises(ValueError, match="same model keyword"):
        dp.ClassifierFreeGuidance(model, 2.0, cond={"y": torch.ones(3)}, uncond={"label": torch.zeros(3)})
    with pytest.raises(TypeError, match="wraps a dpmsolve denoiser .* got function"):
        dp.ClassifierFreeGuidance(lambda x, t: x, 2.0, cond={}, uncond={})


# ----------------------------------------------------------------------------------------------------------------
# Classifier guidance


@pytest.mark.parametrize("schedule_name", ["discrete", "edm", "flow"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_classifier_guidance_shifts_eps_by_scaled_gradient(schedule_name, scale, generator):
    schedule = SCHEDULES[schedule_name]()
    w = torch.randn(2, 3, generator=generator)
    c = torch.randn(2, 3, generator=generator)
    inner = dp.wrap_model(lambda x, t: torch.sin(x) + 0.01 * t[:, None], schedule, time_input="1000t")
    seen = []

    def linear_log_prob(x, t_net):
        seen.append(t_net)
        return (w * x).sum(dim=1)

    def quadratic_log_prob(x, t_net, width):
        return -0.5 * (((x - c) / width) ** 2).sum(dim=1)

    x = torch.randn(2, 3, generator=generator)
    t = 0.5 * (schedule.t_min + schedule.t_max)
    a, s = schedule.alpha_sigma(t)
    base = inner(x, t)
    for guided, grad in [
        (dp.ClassifierGuidance(inner, linear_log_prob, scale), w),
        (dp.ClassifierGuidance(inner, quadratic_log_prob, scale, classifier_kwargs={"width": 0.5}),
         (c - x) / 0.25),
    ]:
        out = guided(x, t)
        torch.testing.assert_close(out.eps, base.eps - scale * s * grad, rtol=1e-12, atol=1e-12)
        # x0 stays consistent with x (up to the rounding of a sum whose terms are of size s |eps|)
        tol = 1e-13 * max(1.0, s * out.eps.abs().max().item())
        torch.testing.assert_close(a * out.x0 + s * out.eps, x, rtol=0, atol=tol)
    # the classifier sees the network's time, as a (batch,) tensor
    assert seen[-1].shape == (2,)
    torch.testing.assert_close(seen[-1], torch.full((2,), 1000.0 * t))
    assert not x.requires_grad and not out.eps.requires_grad


def test_classifier_guidance_with_exact_posterior_is_the_exact_conditional_denoiser():
    """For a Gaussian mixture, grad log p(k | x_t) added to the unconditional score is the score of component k:
    guidance at scale 1 with the exact component posterior is the exact single-component denoiser."""
    mixture = GaussianMixture.random(k=3, dim=2, seed=0)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3)) * 1.5
    for schedule in (dp.LinearVP(), dp.EDM(), dp.RectifiedFlow(), dp.DiscreteVP.linear()):
        uncond = mixture.denoiser(schedule)
        for k in range(3):
            component = GaussianMixture(mixture.means[k:k + 1], mixture.vars[k:k + 1])

            def log_p_k(x_t, t_net, k=k, schedule=schedule):
                # Bayes with the marginals p(x_t | j) = N(alpha mu_j, alpha^2 var_j + sigma^2), written out here
                # independently of the mixture's own posterior code (and in log space, so far points are fine).
                a, s = schedule.alpha_sigma(float(t_net[0]))
                normal = torch.distributions.Normal(a * mixture.means, torch.sqrt(a**2 * mixture.vars + s**2))
                log_joint = normal.log_prob(x_t[:, None, :]).sum(-1) + torch.log(mixture.weights)
                return log_joint[:, k] - torch.logsumexp(log_joint, dim=1)

            guided = dp.ClassifierGuidance(uncond, log_p_k, scale=1.0)
            for t in (schedule.t_max, 0.5 * (schedule.t_min + schedule.t_max), 10 * schedule.t_min):
                out = guided(x, t)
                ref = component.denoiser(schedule)(x, t)
                torch.testing.assert_close(out.eps, ref.eps, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(out.x0, ref.x0, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# x0 corrections


def _numpy_dynamic_thresholding(x0, ratio, max_value):
    x0 = np.asarray(x0, dtype=np.float64)
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.maximum(np.quantile(flat, ratio, axis=1), max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 1.5), (1.0, 0.5)])
def test_dynamic_thresholding_matches_reference_definition(ratio, max_value, generator):
    schedule = dp.DiscreteVP.linear()
    # per-sample magnitudes: one sample well inside [-1, 1] (only divided by max_value... i.e. left as is when
    # max_value = 1), others far outside, so both branches of max(quantile, max_value) are exercised
    scales = torch.tensor([0.2, 1.0, 3.0, 10.0]).reshape(4, 1, 1, 1)
    x0_net = torch.randn(4, 3, 8, 8, generator=generator) * scales
    net = Recorder(lambda x, t: x0_net.clone())
    model = dp.wrap_model(net, schedule, prediction="x0")
    thresholded = dp.DynamicThresholding(model, ratio=ratio, max_value=max_value)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    t = 0.3
    out = thresholded(x, t)
    expected = _numpy_dynamic_thresholding(x0_net.numpy(), ratio, max_value)
    np.testing.assert_allclose(out.x0.numpy(), expected, rtol=1e-12, atol=1e-12)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(out.eps, (x - a * out.x0) / s, rtol=1e-12, atol=1e-12)
    assert out.x0.abs().max() <= 1.0 / min(1.0, max_value) + 1e-12
    assert len(net.calls) == 1
    if max_value == 1.0:  # the quiet sample is untouched
        torch.testing.assert_close(out.x0[0], x0_net[0], rtol=0, atol=0)


def test_dynamic_thresholding_validation():
    model = dp.wrap_model(lambda x, t: x, dp.LinearVP())
    for kwargs in ({"ratio": 0.0}, {"ratio": 1.5}, {"max_value": 0.0}):
        with pytest.raises(ValueError):
            dp.DynamicThresholding(model, **kwargs)
    with pytest.raises(ValueError):
        dp.ClipX0(model, min_value=1.0, max_value=-1.0)


def test_clip_x0_clips_and_recomputes_eps(generator):
    schedule = dp.EDM()
    x0_net = 3.0 * torch.randn(5, 7, generator=generator)
    model = dp.wrap_model(lambda x, t: x0_net.clone(), schedule, prediction="x0")
    x = torch.randn(5, 7, generator=generator)
    for lo, hi in ((-1.0, 1.0), (-0.5, 2.0)):
        out = dp.ClipX0(model, lo, hi)(x, 4.0)
        torch.testing.assert_close(out.x0, x0_net.clamp(lo, hi), rtol=0, atol=0)
        torch.testing.assert_close(out.eps, (x - out.x0) / 4.0, rtol=1e-14, atol=1e-14)
    out = dp.ClipX0(model)(x, 4.0)
    assert out.x0.min() >= -1 and out.x0.max() <= 1


# ----------------------------------------------------------------------------------------------------------------
# Composition, NFE, dtype


def test_wrappers_compose_and_cost_one_network_call(generator):
    schedule = dp.DiscreteVP.linear()
    w = torch.randn(1, 3, 4, generator=generator)
    net = Recorder(lambda x, t, y: 3.0 * _conditional_net(w)(x, t, y))
    model = dp.wrap_model(net, schedule, prediction="x0", time_input="discrete")
    y_c, y_u = torch.tensor([[0.7], [-1.3]]), torch.zeros(2, 1)
    cfg = dp.ClassifierFreeGuidance(model, 4.0, cond={"y": y_c}, uncond={"y": y_u})
    stack = dp.DynamicThresholding(cfg, ratio=0.9)
    x = torch.randn(2, 3, 4, generator=generator)
    t = 0.55
    out = stack(x, t)
    assert len(net.calls) == 1
    ref_cfg = cfg(x, t)
    expected = _numpy_dynamic_thresholding(ref_cfg.x0.numpy(), 0.9, 1.0)
    np.testing.assert_allclose(out.x0.numpy(), expected, rtol=1e-12, atol=1e-12)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(out.eps, (x - a * out.x0) / s, rtol=1e-12, atol=1e-12)
    assert stack.schedule is schedule
    assert stack.network_time(t) == model.network_time(t) == pytest.approx(549.0)

    # a deeper stack, in a full sampling run: NFE = steps and one network call per NFE
    net.calls.clear()
    deep = dp.ClipX0(dp.ClassifierGuidance(cfg, lambda x, t_net: -(x**2).sum(dim=(1, 2)), 0.5), -2.0, 2.0)
    sol = dp.sample(deep, torch.randn(2, 3, 4, generator=generator), "dpmsolver++", steps=6, progress=False)
    assert sol.nfe == 6 and len(net.calls) == 6
    assert all(call["x"].shape[0] == 4 for call in net.calls)
    assert torch.isfinite(sol.x).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrappers_keep_half_precision(dtype, generator):
    schedule = dp.LinearVP()
    w = torch.randn(1, 3, 4, generator=generator)
    net = Recorder(lambda x, t, y: _conditional_net(w.to(x.dtype))(x, t, y.to(x.dtype)))
    model = dp.wrap_model(net, schedule, prediction="v")
    y_c, y_u = torch.tensor([[0.7], [-1.3]]), torch.zeros(2, 1)
    x = torch.randn(2, 3, 4, generator=generator).to(dtype)
    stacks = [
        dp.ClassifierFreeGuidance(model, 3.0, cond={"y": y_c}, uncond={"y": y_u}),
        dp.DynamicThresholding(dp.ClassifierFreeGuidance(model, 3.0, cond={"y": y_c}, uncond={"y": y_u})),
        dp.ClipX0(dp.ClassifierGuidance(dp.ClassifierFreeGuidance(model, 3.0, cond={"y": y_c}, uncond={"y": y_u}),
                                        lambda x, t: -(x.float() ** 2).sum(dim=(1, 2)), 1.0)),
    ]
    for stack in stacks:
        out = stack(x, 0.6)
        assert out.x0.dtype == dtype and out.eps.dtype == dtype
        assert torch.isfinite(out.x0).all() and torch.isfinite(out.eps).all()
        ref = stack(x.double(), 0.6)
        torch.testing.assert_close(out.x0.double(), ref.x0, rtol=0.05, atol=0.1)
        torch.testing.assert_close(out.eps.double(), ref.eps, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
@pytest.mark.parametrize("time_input", ["continuous", "discrete"])
def test_per_sample_times_equal_one_call_per_time(prediction, time_input, generator):
    """ems.compute stacks several log-SNR nodes into one call: t as an array, one time per sample."""
    schedule = dp.DiscreteVP.linear()
    net = Recorder(lambda x, t, **kw: torch.sin(x) * (1 + t.to(x.dtype)[:, None, None] / 1000))
    den = dp.wrap_model(net, schedule, prediction=prediction, time_input=time_input)
    guided = dp.ClassifierFreeGuidance(den, 2.5, cond={"c": torch.ones(6)}, uncond={"c": torch.zeros(6)})
    assert den.per_sample_time and guided.per_sample_time
    x = torch.randn((6, 2, 4), generator=generator, dtype=torch.float64)
    ts = np.repeat([0.9, 0.31, 0.004], 2)
    for model in (den, guided):
        batched = model(x, ts)
        for i in range(0, 6, 2):
            alone = dp.ClassifierFreeGuidance(den, 2.5, cond={"c": torch.ones(2)}, uncond={"c": torch.zeros(2)}) \
                if model is guided else den
            one = alone(x[i:i + 2], float(ts[i]))
            assert torch.allclose(batched.x0[i:i + 2], one.x0, rtol=1e-12, atol=1e-12)
            assert torch.allclose(batched.eps[i:i + 2], one.eps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one time per sample"):
        den(x, ts[:3])
    assert not dp.DynamicThresholding(den).per_sample_time       # wrappers that need one time say so
