"""One test per bad input: each raises ValueError (or the documented error) with a message that says what was
wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData


@pytest.fixture
def den():
    return GaussianData([0.5, -0.3], [0.09, 0.5]).denoiser(dp.LinearVP())


@pytest.fixture
def x():
    return torch.randn(2, 2, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(den, x, steps):
    with pytest.raises(ValueError, match=rf"steps must be an integer >= 1, got {steps}"):
        dp.sample(den, x, steps=steps)


@pytest.mark.parametrize("steps", [2.5, 3.0])
def test_steps_not_an_integer(den, x, steps):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
        dp.sample(den, x, steps=steps)


@pytest.mark.parametrize("steps", ["5", True])
def test_steps_of_the_wrong_type(den, x, steps):
    with pytest.raises(TypeError, match=r"steps must be an integer >= 1"):
        dp.sample(den, x, steps=steps)


def test_steps_below_one_in_invert_and_make_grid(den, x):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        dp.invert(den, x, steps=0)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        dp.make_grid(den.schedule, 0)


def test_steps_with_an_adaptive_solver_are_still_checked(den, x):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
        dp.sample(den, x, "dpmsolver++", method="adaptive", steps=0)


# ----------------------------------------------------------------------------------------------------- orders
@pytest.mark.parametrize("name,options,valid", [
    ("dpmsolver++", {"order": 4}, "1, 2, 3"),
    ("dpmsolver++", {"order": 0}, "1, 2, 3"),
    ("dpmsolver", {"method": "singlestep", "order": 4}, "1, 2, 3"),
    ("dpmsolver++", {"method": "adaptive", "order": 1}, "2, 3"),
    ("dpmsolver", {"method": "adaptive", "order": 4}, "2, 3"),
    ("sde-dpmsolver++", {"order": 3}, "1, 2"),
])
def test_order_the_solver_lacks(den, x, name, options, valid):
    with pytest.raises(ValueError, match=rf"supports order {valid}; got {options['order']}"):
        dp.sample(den, x, name, **options)
    with pytest.raises(ValueError, match=rf"supports order {valid}"):
        dp.get_solver(name, **options)


def test_order_must_be_an_integer(den, x):
    with pytest.raises(ValueError, match=r"supports order 1, 2, 3; got 2.5"):
        dp.sample(den, x, "dpmsolver++", order=2.5)


def test_singlestep_orders_that_do_not_fill_the_grid(den, x):
    with pytest.raises(ValueError, match=r"orders \(3, 3\) sum to 6 but the grid has 5 steps"):
        dp.sample(den, x, "dpmsolver++", method="singlestep", orders=(3, 3), steps=5)


# ------------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("grid", [[1.0, 0.5, 0.5, 0.1], [1.0, 0.3, 0.5, 0.1]], ids=["repeated", "zigzag"])
def test_explicit_grid_not_strictly_decreasing(den, x, grid):
    with pytest.raises(ValueError, match=r"must be strictly decreasing \(from noise at t_max to data at t_min\)"):
        dp.sample(den, x, grid=grid)


def test_increasing_grid_says_to_reverse_or_invert(den, x):
    with pytest.raises(ValueError, match=r"strictly decreasing.*Reverse it, or use invert\(\)"):
        dp.sample(den, x, grid=[0.1, 0.5, 1.0])


@pytest.mark.parametrize("grid", [[1.5, 0.5, 0.1], [1.0, 0.5, 1e-4], [1.0, 0.5, -0.1]],
                         ids=["above", "below-t_min", "negative"])
def test_grid_leaves_the_schedule_range(den, x, grid):
    with pytest.raises(ValueError, match=r"leaves the schedule's range \[t_min, t_max\] = \[0.001, 1\]"):
        dp.sample(den, x, grid=grid)


@pytest.mark.parametrize("kw", [{"t_start": 2.0}, {"t_end": 1e-4}], ids=["t_start", "t_end"])
def test_named_grid_endpoints_outside_the_range(den, x, kw):
    with pytest.raises(ValueError, match=r"\[t_start, t_end\] leaves the schedule's range"):
        dp.sample(den, x, **kw)


def test_grid_with_one_time_or_nan(den, x):
    with pytest.raises(ValueError, match=r"needs at least 2 times \(start and end\), got 1"):
        dp.sample(den, x, grid=[1.0])
    with pytest.raises(ValueError, match=r"contains NaN or Inf"):
        dp.sample(den, x, grid=[1.0, float("nan"), 0.1])


def test_steps_disagreeing_with_an_explicit_grid(den, x):
    with pytest.raises(ValueError, match=r"steps=3 disagrees with the explicit grid of 3 times \(2 steps\); "
                                         r"pass one of them"):
        dp.sample(den, x, grid=[1.0, 0.5, 0.1], steps=3)


def test_named_grid_options_with_an_explicit_grid(den, x):
    with pytest.raises(ValueError, match=r"apply to named grids only"):
        dp.sample(den, x, grid=[1.0, 0.5, 0.1], grid_options={"rho": 7})
    with pytest.raises(ValueError, match=r"apply to named grids only"):
        dp.sample(den, x, grid=[1.0, 0.5, 0.1], t_end=0.1)


def test_bad_grid_option_value(den, x):
    with pytest.raises(ValueError, match=r"karras grid needs rho > 0"):
        dp.sample(den, x, grid="karras", grid_options={"rho": -1.0})


# ------------------------------------------------------------------------------------------- unknown names
def test_unknown_solver_lists_valid_names(den, x):
    with pytest.raises(ValueError, match=r"Unknown solver 'dpm-solver-foo'; valid names are: ") as err:
        dp.sample(den, x, "dpm-solver-foo")
    assert all(name in str(err.value) for name in dp.SOLVERS)


def test_solver_of_the_wrong_type(den, x):
    with pytest.raises(TypeError, match=r"solver must be a registry name or a Solver object, got int"):
        dp.sample(den, x, 3)


def test_unknown_grid_lists_valid_names(den, x):
    with pytest.raises(ValueError, match=r"Unknown grid 'linear'; valid names are: ") as err:
        dp.sample(den, x, grid="linear")
    assert all(name in str(err.value) for name in dp.GRIDS)
    assert "explicit array" in str(err.value)


def test_unknown_prediction_lists_valid_names(den):
    with pytest.raises(ValueError, match=r"Unknown prediction 'velocityx'; valid names are: ") as err:
        dp.wrap_model(lambda x, t: x, den.schedule, prediction="velocityx")
    assert all(name in str(err.value) for name in dp.PREDICTIONS)


def test_unknown_time_input_lists_valid_names(den):
    with pytest.raises(ValueError, match=r"Unknown time_input 'steps'; valid names are: ") as err:
        dp.wrap_model(lambda x, t: x, den.schedule, time_input="steps")
    assert all(name in str(err.value) for name in dp.TIME_INPUTS)


def test_discrete_time_input_needs_a_discrete_schedule(den):
    with pytest.raises(ValueError, match=r"time_input='discrete' needs a DiscreteVP schedule; use 'continuous'"):
        dp.wrap_model(lambda x, t: x, den.schedule, time_input="discrete")


def test_unknown_method_lists_valid_names(den, x):
    with pytest.raises(ValueError, match=r"Unknown method 'multi'; valid: multistep, singlestep, adaptive"):
        dp.sample(den, x, "dpmsolver++", method="multi")


def test_unknown_solver_type_lists_valid_names(den, x):
    with pytest.raises(ValueError, match=r"Unknown solver_type 'rk'; valid: 'dpmsolver'.*'taylor'"):
        dp.sample(den, x, "dpmsolver++", solver_type="rk")


# ------------------------------------------------------------------------------------------ solver options
@pytest.mark.parametrize("name,options,cls,bad", [
    ("dpmsolver++", {"foo": 1}, "DPMSolverMultistep", "foo"),
    ("ddim", {"order": 2}, "DDIM", "order"),
    ("dpmsolver", {"method": "adaptive", "split": "fast"}, "AdaptiveDPMSolver", "split"),
    ("sde-dpmsolver++", {"method": "multistep"}, "SDEDPMSolverPP", "method"),
])
def test_unknown_solver_option_lists_the_options(den, x, name, options, cls, bad):
    with pytest.raises(ValueError, match=rf"{cls} has no option\(s\) {bad}; its options are: ") as err:
        dp.sample(den, x, name, **options)
    assert "order" in str(err.value) or "eta" in str(err.value)


def test_solver_options_with_a_solver_object(den, x):
    solver = dp.get_solver("dpmsolver++")
    with pytest.raises(ValueError, match=r"Solver options \['order'\] were given with a solver object; set them "
                                         r"on the object instead"):
        dp.sample(den, x, solver, order=3)
    with pytest.raises(ValueError, match=r"given with a solver object"):
        dp.invert(den, x, solver, order=3)


@pytest.mark.parametrize("options,message", [
    ({"rtol": 0.0}, r"rtol=0.0"),
    ({"atol": -1e-3}, r"atol=-0.001"),
    ({"rtol": -1.0, "atol": 0.0}, r"rtol=-1.0, atol=0.0"),
])
def test_adaptive_tolerances_must_be_positive(den, x, options, message):
    with pytest.raises(ValueError, match=rf"Adaptive tolerances must be > 0; got .*{message}"):
        dp.sample(den, x, "dpmsolver++", method="adaptive", **options)


@pytest.mark.parametrize("name,eta", [("ddim", -1.0), ("sde-dpmsolver++", -0.5), ("ddim", float("nan"))])
def test_negative_eta(den, x, name, eta):
    with pytest.raises(ValueError, match=r"eta (must be )?>= 0, got"):
        dp.sample(den, x, name, eta=eta)  # "needs eta >= 0" / "eta must be >= 0"


def test_ddim_eta_above_one(den, x):
    with pytest.raises(ValueError, match=r"asks for more noise than the step holds; use eta <= 1"):
        dp.sample(den, x, "ddim", eta=2.0)


# ---------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("out", [lambda x: torch.cat([x, x], 1), lambda x: x[:1], lambda x: x[..., None]],
                         ids=["channels", "batch", "extra-dim"])
def test_model_output_shape_differs_from_x(den, x, out):
    net = dp.wrap_model(lambda x, t: out(x), den.schedule)
    with pytest.raises(ValueError, match=r"The model returned shape .* for input shape \(2, 2\); it must return "
                                         r"one prediction of the input's shape"):
        dp.sample(net, x, steps=3)


class WrongShape(dp.Denoiser):
    """A hand-written denoiser whose predictions would broadcast against x instead of matching it."""

    def __init__(self, inner):
        self.inner, self.schedule = inner, inner.schedule

    def __call__(self, x, t, **kw):
        pred = self.inner(x, t)
        return dp.Prediction(pred.x0[:1], pred.eps[:1])


def test_denoiser_output_shape_differs_from_x(den, x):
    with pytest.raises(ValueError, match=r"returned predictions of shape \(1, 2\) / \(1, 2\) for x of shape "
                                         r"\(2, 2\); they must have x's shape"):
        dp.sample(WrongShape(den), x, steps=3)


def test_shape_error_under_guidance(den, x):
    net = dp.wrap_model(lambda x, t, y: x[:, :1], den.schedule)
    cfg = dp.ClassifierFreeGuidance(net, 5.0, cond={"y": torch.ones(2)}, uncond={"y": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"it must return one prediction of the input's shape"):
        dp.sample(cfg, x, steps=3)


def test_a_plain_callable_is_not_a_denoiser(den, x):
    with pytest.raises(TypeError, match=r"denoiser must be built by dpmsolve.wrap_model"):
        dp.sample(lambda x, t: x, x)
    with pytest.raises(TypeError, match=r"denoiser must be built by dpmsolve.wrap_model"):
        dp.invert(lambda x, t: x, x)


def test_x_must_be_floating_point(den):
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch.int64"):
        dp.sample(den, torch.ones(2, 2, dtype=torch.long))


def test_guidance_kwargs_must_match(den):
    net = dp.wrap_model(lambda x, t, y: x, den.schedule)
    with pytest.raises(ValueError, match=r"cond and uncond must name the same model keyword arguments"):
        dp.ClassifierFreeGuidance(net, 3.0, cond={"y": torch.ones(2)}, uncond={"z": torch.ones(2)})


# -------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("alphas_cumprod,where", [
    ([0.9, 0.8, 0.8, 0.5], r"train step 2 \(0.8 -> 0.8\)"),
    ([0.9, 0.95, 0.5], r"train step 1 \(0.9 -> 0.95\)"),
], ids=["flat", "increasing"])
def test_discrete_schedule_with_non_monotone_lambda(alphas_cumprod, where):
    with pytest.raises(ValueError, match=rf"alphas_cumprod must decrease strictly so that log-SNR is monotone; it "
                                         rf"does not at {where}\. Check the betas"):
        dp.DiscreteVP.from_alphas_cumprod(alphas_cumprod)


@pytest.mark.parametrize("betas", [[0.1, 0.0, 0.2], [0.1, -0.1, 0.2], [0.1, 1.5, 0.2], [0.1, float("nan")]],
                         ids=["zero", "negative", "above-one", "nan"])
def test_discrete_schedule_with_betas_outside_unit_interval(betas):
    with pytest.raises(ValueError, match=r"betas must be finite and in \(0, 1\]"):
        dp.DiscreteVP.from_betas(betas)


def test_discrete_schedule_with_alphas_cumprod_out_of_range():
    with pytest.raises(ValueError, match=r"alphas_cumprod must be finite and in \(0, 1\]"):
        dp.DiscreteVP.from_alphas_cumprod([0.9, -0.2, 0.1])
    with pytest.raises(ValueError, match=r"alphas_cumprod must be < 1 everywhere"):
        dp.DiscreteVP.from_alphas_cumprod([1.0, 0.5, 0.1])
    with pytest.raises(ValueError, match=r"at least 2 train steps"):
        dp.DiscreteVP.from_alphas_cumprod([0.5])


# ----------------------------------------------------------------------------------------------------- invert
@pytest.mark.parametrize("name,options", [("sde-dpmsolver++", {}), ("ddim", {"eta": 0.5}),
                                          ("sde-dpmsolver++", {"order": 1, "eta": 1.0})])
def test_invert_with_a_stochastic_solver(den, x, name, options):
    with pytest.raises(ValueError, match=r"invert\(\) needs a deterministic solver \(eta = 0\)"):
        dp.invert(den, x, name, **options)
    with pytest.raises(ValueError, match=r"invert\(\) needs a deterministic solver"):
        dp.invert(den, x, dp.get_solver(name, **options))


def test_invert_with_eta_zero_is_allowed(den, x):
    assert dp.invert(den, x, "sde-dpmsolver++", eta=0.0, steps=3, progress=False).nfe == 3
    assert dp.invert(den, x, "ddim", eta=0.0, steps=3, progress=False).nfe == 3


def test_errors_are_raised_before_any_model_call(den, x):
    calls = []

    class Spy(dp.Denoiser):
        schedule = den.schedule

        def __call__(self, x, t, **kw):
            calls.append(t)
            return den(x, t)

    for kwargs in ({"steps": 0}, {"grid": [0.1, 1.0]}, {"order": 4}, {"grid": "nope"}, {"foo": 1}):
        with pytest.raises(ValueError):
            dp.sample(Spy(), x, "dpmsolver++", **kwargs)
    assert calls == []


def test_grid_to_zero_with_denoise_to_zero_is_ambiguous(den, x):
    with pytest.raises(ValueError, match="already ends at sigma = 0"):
        dp.sample(den, x, t_end=0, denoise_to_zero=True)


def test_time_grid_to_zero_with_too_many_steps(den, x):
    with pytest.raises(ValueError, match="evaluates below t_min"):
        dp.make_grid(den.schedule, 5000, "time_uniform", t_end=0)
