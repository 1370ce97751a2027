"""Hardening of the model wrappers: what a network returns, guidance inputs, empty batches, the default time
input of discrete schedules, argument types, and saving a plan where it cannot go.

Every error must name the argument (or what came back), the bad value, and what to do instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData

SCHED = dp.LinearVP()


def run(den, x=None, **kwargs):
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) if x is None else x
    return dp.sample(den, x, "dpmsolver++", steps=3, progress=False, **kwargs)


# ------------------------------------------------------------------------------------ what the network returns
@pytest.mark.parametrize("returned,name,hint", [
    (lambda x: None, "NoneType", "forget|without a return"),
    (lambda x: x.numpy(), "ndarray", "torch.from_numpy"),
    (lambda x: {"eps": x}, "dict", r"keys \['eps'\].*net\(x, t\)\['eps'\]"),
    (lambda x: 0.0, "float", ""),
    (lambda x: ("eps", x), "tuple", ""),
    (lambda x: (), "tuple", ""),
], ids=["none", "numpy", "dict", "float", "tuple-of-str", "empty-tuple"])
def test_network_returning_something_else_than_a_tensor(returned, name, hint):
    den = dp.wrap_model(lambda x, t: returned(x), SCHED)
    with pytest.raises(TypeError, match=rf"The network returned {name}.*{hint}.*expects a torch.Tensor of the input's "
                                        r"shape"):
        den(torch.zeros(2, 3), 0.5)
    with pytest.raises(TypeError, match=rf"returned {name}"):
        run(den)


def test_network_returning_integers_or_a_wrong_shape():
    with pytest.raises(TypeError, match=r"returned a tensor of dtype torch.int64; it must return a floating-point"):
        dp.wrap_model(lambda x, t: torch.ones(x.shape, dtype=torch.long), SCHED)(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match=r"returned shape \(2, 6\) for input shape \(2, 3\)"):
        dp.wrap_model(lambda x, t: torch.cat([x, x], 1), SCHED)(torch.zeros(2, 3), 0.5)


def test_tuple_and_diffusers_style_outputs_still_unwrap():
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))

    class Output(dict):                            # diffusers' BaseOutput: a dict with attributes
        def __init__(self, sample):
            super().__init__(sample=sample)
            self.sample = sample

    for net in (lambda x, t: (eps, None), lambda x, t: [eps], lambda x, t: Output(eps)):
        assert torch.equal(dp.wrap_model(net, dp.EDM())(torch.zeros(2, 3), 2.0).eps, eps)


# ---------------------------------------------------------------------------------- classifier-free guidance
def _cfg(cond, uncond, scale=3.0):
    net = dp.wrap_model(lambda x, t, y: torch.zeros_like(x), SCHED)   # ignores y: a mismatch would go unseen
    return dp.ClassifierFreeGuidance(net, scale, cond=cond, uncond=uncond)


@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_cfg_labels_for_another_batch_size(scale):
    guided = _cfg({"y": torch.ones(3)}, {"y": torch.zeros(3)}, scale)
    with pytest.raises(ValueError, match=r"cond\['y'\] has 3 rows for a batch of 2 samples; give one row per sample"):
        run(guided)
    assert run(guided, x=torch.zeros(3, 3)).x.shape == (3, 3)


def test_cfg_cond_and_uncond_of_different_sizes_or_kinds():
    with pytest.raises(ValueError, match=r"cond\['y'\] has 2 rows but uncond\['y'\] has 3"):
        _cfg({"y": torch.ones(2)}, {"y": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"cond\['y'\] and uncond\['y'\] must both be tensors with one row per sample"):
        _cfg({"y": torch.ones(2)}, {"y": None})
    with pytest.raises(ValueError, match=r"must both be tensors"):
        _cfg({"y": torch.tensor(1.0)}, {"y": torch.tensor(0.0)})           # no batch dimension
    # non-tensor values are shared by both halves of the one call, so they must agree
    with pytest.raises(ValueError, match=r"cond\['w'\] = 1.0 and uncond\['w'\] = 0.0 differ but are not tensors"):
        _cfg({"w": 1.0}, {"w": 0.0})
    _cfg({"mode": "fast"}, {"mode": "fast"})


@pytest.mark.parametrize("scale,error,words", [(-1.0, ValueError, r"scale >= 0 .* got scale=-1.0"),
                                               (float("nan"), ValueError, r"scale must be finite, got nan"),
                                               ("3", TypeError, r"scale must be a real number, got str '3'")])
def test_cfg_scale(scale, error, words):
    with pytest.raises(error, match=words):
        _cfg({"y": torch.ones(2)}, {"y": torch.zeros(2)}, scale)


def test_cfg_cond_not_a_dict_and_inner_not_a_denoiser():
    with pytest.raises(TypeError, match=r"cond must be a dict of model keyword arguments.*got Tensor"):
        _cfg(torch.ones(2), {"y": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"wraps a dpmsolve denoiser \(built by wrap_model\), got function"):
        dp.ClassifierFreeGuidance(lambda x, t: x, 3.0, {}, {})


# -------------------------------------------------------------------------------------- classifier guidance
DEN = GaussianData([0.5, -0.3, 0.1], [0.09, 0.5, 0.3]).denoiser(SCHED)


@pytest.mark.parametrize("log_prob", [lambda x, t: torch.zeros(x.shape[0]),
                                      lambda x, t: x.detach().sum(1),
                                      lambda x, t: torch.zeros(x.shape[0], requires_grad=True) * 2],
                         ids=["constant", "detached", "other-graph"])
def test_classifier_whose_log_prob_does_not_depend_on_x(log_prob):
    with pytest.raises(ValueError, match=r"log_prob's output does not depend on x \(no gradient reaches x\)"):
        run(dp.ClassifierGuidance(DEN, log_prob, 1.0))


def test_classifier_returning_none_logits_or_not_callable():
    with pytest.raises(TypeError, match=r"log_prob returned NoneType; it must return a tensor of per-sample "
                                        r"log-probabilities, shape \(2,\)"):
        run(dp.ClassifierGuidance(DEN, lambda x, t: None, 1.0))
    with pytest.raises(ValueError, match=r"log_prob returned shape \(2, 3\) for a batch of 2; it must return one "
                                         r"log-probability per sample"):
        run(dp.ClassifierGuidance(DEN, lambda x, t: x.log_softmax(-1), 1.0))
    with pytest.raises(TypeError, match=r"log_prob must be a function .* got int"):
        dp.ClassifierGuidance(DEN, 5, 1.0)
    with pytest.raises(ValueError, match=r"scale must be finite, got nan"):
        dp.ClassifierGuidance(DEN, lambda x, t: x.sum(1), float("nan"))


def test_classifier_guidance_still_adds_the_gradient():
    w = torch.tensor([0.3, -1.0, 2.0])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    out = dp.ClassifierGuidance(DEN, lambda x, t: (x * w).sum(1), 2.0)(x, 0.4)
    torch.testing.assert_close(out.eps, DEN(x, 0.4).eps - 2.0 * SCHED.sigma(0.4) * w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- x0 corrections: values
@pytest.mark.parametrize("build,error,words", [
    (lambda: dp.DynamicThresholding(DEN, ratio=1.5), ValueError, r"0 < ratio <= 1 .*got ratio=1.5"),
    (lambda: dp.DynamicThresholding(DEN, ratio=float("nan")), ValueError, r"ratio must be finite, got nan"),
    (lambda: dp.DynamicThresholding(DEN, max_value=-2.0), ValueError, r"max_value > 0 .*got max_value=-2.0"),
    (lambda: dp.ClipX0(DEN, 2.0, -2.0), ValueError, r"min_value < max_value; got min_value=2.0, max_value=-2.0"),
    (lambda: dp.ClipX0(DEN, max_value=float("nan")), ValueError, r"max_value must be finite, got nan"),
])
def test_correction_parameters(build, error, words):
    with pytest.raises(error, match=words):
        build()


# ------------------------------------------------------------------------------------------- empty batches
def _stacks():
    def net(x, t, y=None):
        assert x.shape[0] > 0, "a network that cannot take an empty batch"
        return torch.tanh(x)

    den = dp.wrap_model(net, dp.DiscreteVP.linear())
    none = torch.zeros(0, dtype=torch.long)
    return {"model": den,
            "cfg": dp.ClassifierFreeGuidance(den, 3.0, cond={"y": none}, uncond={"y": none}),
            "classifier": dp.ClassifierGuidance(den, lambda x, t: -(x**2).sum(1), 1.0),
            "thresholding": dp.DynamicThresholding(den),
            "clip": dp.ClipX0(den)}


@pytest.mark.parametrize("name", sorted(_stacks()))
def test_empty_batches_pass_through_every_wrapper(name):
    den = _stacks()[name]
    x = torch.zeros(0, 2, 4)
    pred = den(x, 0.5)
    assert pred.x0.shape == pred.eps.shape == (0, 2, 4)
    sol = dp.sample(den, x, "dpmsolver++", steps=3, progress=False)
    assert sol.x.shape == (0, 2, 4) and sol.nfe == 3


def test_empty_batch_with_per_sample_times():
    den = _stacks()["cfg"]
    assert den(torch.zeros(0, 3), np.zeros(0)).x0.shape == (0, 3)


# ------------------------------------------------------------------------ the time input of discrete schedules
class TrainIndexGaussianNet:
    """The exact eps prediction of N(mean, var) data for a DDPM network that takes the (fractional) train index
    n: alpha_bar(n) is read off the table by log-linear interpolation, as such a network was trained."""

    def __init__(self, alphas_cumprod, mean, var):
        self.log_ac = np.log(np.asarray(alphas_cumprod, dtype=np.float64))
        self.mean, self.var = torch.as_tensor(mean), torch.as_tensor(var)
        self.seen = []

    def __call__(self, x, n):
        self.seen.append(n)
        idx = n.double().numpy()
        ac = np.exp(np.interp(idx, np.arange(self.log_ac.size), self.log_ac))
        a = torch.as_tensor(np.sqrt(ac))[:, None]
        s = torch.as_tensor(np.sqrt(1.0 - ac))[:, None]
        # E[eps | x] for x = a x0 + s eps, x0 ~ N(mean, var): s (x - a mean) / (a^2 var + s^2)
        return s * (x - a * self.mean) / (a * a * self.var + s * s)


def test_discrete_schedule_defaults_to_the_train_index():
    schedule = dp.DiscreteVP.linear()
    data = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    x = data.prior_sample(schedule, 256, generator=torch.Generator().manual_seed(0))
    truth = data.exact_solution(schedule, x, schedule.t_max, schedule.t_min)

    net = TrainIndexGaussianNet(schedule.alphas_cumprod, data.mean, data.var)
    den = dp.wrap_model(net, schedule, prediction="eps")
    assert den.time_input == "discrete"
    out = dp.sample(den, x, "dpmsolver++", steps=20, progress=False).x
    assert float(net.seen[0][0]) == pytest.approx(999.0)          # t_max = 1 is train step N - 1
    # the same run as with the analytic denoiser in the schedule's own time, and near the exact flow
    analytic = dp.sample(data.denoiser(schedule), x, "dpmsolver++", steps=20, progress=False).x
    assert (out - analytic).abs().max() < 1e-9
    assert (out - truth).abs().max() < 0.1 and out.std(0).sub(data.var.sqrt()).abs().max() < 0.1

    # explicit "continuous" is honoured: the network sees t itself (a DDPM net then reads it as step ~0)
    net.seen.clear()
    cont = dp.wrap_model(net, schedule, prediction="eps", time_input="continuous")
    assert cont.time_input == "continuous"
    bad = dp.sample(cont, x, "dpmsolver++", steps=20, progress=False).x
    assert float(net.seen[0][0]) == pytest.approx(1.0)
    assert bad.std() > 10 * out.std()                              # what the newcomer saw (std in the hundreds)


@pytest.mark.parametrize("schedule", [dp.LinearVP(), dp.CosineVP(), dp.EDM(), dp.RectifiedFlow()],
                         ids=lambda s: type(s).__name__)
def test_other_schedules_default_to_their_continuous_time(schedule):
    seen = []
    den = dp.wrap_model(lambda x, t: seen.append(t) or torch.zeros_like(x), schedule)
    assert den.time_input == "continuous"
    t = 0.5 * (schedule.t_min + schedule.t_max)
    den(torch.zeros(2, 1), t)
    assert seen[-1][0].item() == pytest.approx(t, rel=1e-12)


# ------------------------------------------------------------------------------------------ argument types
@pytest.mark.parametrize("call,words", [
    (lambda: dp.wrap_model(None, SCHED), r"net must be the network .* got NoneType"),
    (lambda: dp.wrap_model("model.pt", SCHED), r"net must be the network .* got str"),
    (lambda: dp.wrap_model(torch.tanh, "linear"), r"schedule must be a dpmsolve Schedule .* got str"),
    (lambda: dp.wrap_model(torch.tanh, SCHED, time_input=5), r"time_input must be a name .* got int 5"),
    (lambda: dp.wrap_model(torch.tanh, SCHED, model_kwargs=5), r"model_kwargs must be a dict .* got int"),
    (lambda: dp.wrap_model(torch.tanh, SCHED, input_dtype="float16"), r"input_dtype must be a floating-point "
                                                                      r"torch.dtype .* got str 'float16'"),
    (lambda: dp.wrap_model(torch.tanh, SCHED, input_dtype=torch.int32), r"input_dtype .* got dtype torch.int32"),
])
def test_wrap_model_argument_types(call, words):
    with pytest.raises(TypeError, match=words):
        call()


def test_time_input_callable_returning_no_number():
    den = dp.wrap_model(lambda x, t: torch.zeros_like(x), SCHED, time_input=lambda t: None)
    with pytest.raises(TypeError, match=r"time_input callable returned NoneType None for t=0.5; it must return a "
                                        r"number"):
        den(torch.zeros(2, 3), 0.5)
    assert math.isclose(dp.wrap_model(torch.tanh, SCHED, time_input=lambda t: 3 * t).network_time(0.5), 1.5)


# ---------------------------------------------------------------------------------------------- plan files
def test_plan_save_where_a_file_stands_in_the_way(tmp_path):
    plan = dp.Plan.multistep(tuple(dp.make_grid(SCHED, 3)), schedule=SCHED.fingerprint())
    blocker = tmp_path / "plans"
    blocker.write_text("a file, not a folder")
    with pytest.raises(NotADirectoryError, match=rf"Cannot save the plan to .*nfe3.plan.json: .*plans is a file, "
                                                 r"not a folder"):
        plan.save(blocker / "sub" / "nfe3.plan.json")
    with pytest.raises(IsADirectoryError, match=r"Cannot save the plan to .*: it is a folder. Give a file name"):
        plan.save(tmp_path)
    saved = plan.save(tmp_path / "new" / "nfe3.plan.json")
    assert dp.Plan.load(saved).ts == plan.ts
