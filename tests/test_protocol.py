"""Registry-driven protocol tests: every solver in ``dp.SOLVERS``, with representative options.

What each solver promises, checked the same way for all of them:
  * measured NFE (real calls through a counting denoiser) = ``Solution.nfe`` = ``expected_nfe(steps)``;
  * ``tell`` never mutates the state it is given, and a hand-written init/ask/tell loop is ``sample``;
  * a batch equals its items run one by one (deterministic fixed-grid solvers);
  * fp16 / bf16 inputs keep their dtype and stay finite, with classifier-free guidance up to scale 15;
  * a seed reproduces a stochastic sample, another seed changes it;
  * the declared facts (order, stochastic, integrates) exist and are consistent.

A registry name without an entry in ``REPRESENTATIVE`` is still tested with its default options, so a newly
registered solver is covered the moment it is added.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import dpmsolve as dp
from counting import Counting
from dpmsolve.lab import GaussianData, GaussianMixture

# (registry name, options): the configurations the brief asks for, per registry name.
REPRESENTATIVE: list[tuple[str, dict]] = [
    ("ddim", {}),
    ("ddim", {"eta": 0.5}),
    *[(name, {"method": method, "order": order})
      for name in ("dpmsolver", "dpmsolver++") for method in ("multistep", "singlestep") for order in (1, 2, 3)],
    ("dpmsolver++", {"method": "adaptive", "order": 2}),
    ("dpmsolver++", {"method": "adaptive", "order": 3}),
    ("dpmsolver", {"method": "adaptive", "order": 3}),
    ("sde-dpmsolver++", {"order": 1}),
    ("sde-dpmsolver++", {"order": 2}),
    *[("unipc", {"order": order}) for order in (1, 2, 3)],
    ("unipc", {"order": 2, "variant": "bh1", "predict": "noise", "disable_corrector": (1,)}),
    ("dpmsolver++", {"order": 2, "corrector": "unic"}),
    ("dpmsolver-v3", {"ems": "degenerate"}),
    ("dpmsolver-v3", {"ems": "degenerate", "order": 3, "predictor_pseudo": True, "corrector_pseudo": True,
                      "half": "noisy", "lower_order_final": True}),
]
REPRESENTATIVE += [("sa-solver", {}), ("sa-solver", {"pece": True}), ("dpmpp-2m-sde", {}),
                   ("dpmpp-2m-sde", {"solver_type": "heun", "noise": "gaussian"})]
CONFIGS = REPRESENTATIVE + [(name, {}) for name in dp.SOLVERS if name not in {n for n, _ in REPRESENTATIVE}]


def _id(config) -> str:
    name, options = config
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def build(config) -> dp.Solver:
    name, options = config
    return dp.get_solver(name, **options)


def steps_for(solver: dp.Solver, steps: int) -> int | None:
    """``steps`` for a fixed-grid solver; None for the adaptive one, which refuses steps (it picks its own)."""
    return None if solver.adaptive else steps


def fixed_grid(config) -> bool:
    return not build(config).adaptive


def deterministic(config) -> bool:
    solver = build(config)
    return not solver.stochastic and not solver.adaptive


all_configs = pytest.mark.parametrize("config", CONFIGS, ids=_id)
fixed_configs = pytest.mark.parametrize("config", [c for c in CONFIGS if fixed_grid(c)], ids=_id)
adaptive_configs = pytest.mark.parametrize("config", [c for c in CONFIGS if not fixed_grid(c)], ids=_id)
deterministic_configs = pytest.mark.parametrize("config", [c for c in CONFIGS if deterministic(c)], ids=_id)
STOCHASTIC = [("sde-dpmsolver++", {"order": 1}), ("sde-dpmsolver++", {"order": 2}), ("ddim", {"eta": 0.5})]
STOCHASTIC += [(name, {}) for name in ("euler-ancestral", "dpm2-ancestral", "dpmpp-2s-ancestral", "dpmpp-sde",
                                        "dpmpp-2m-sde", "dpmpp-3m-sde", "er-sde")]




def problem():
    data = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.LinearVP()
    x = data.prior_sample(schedule, 3, generator=torch.Generator().manual_seed(7))
    return data, schedule, data.denoiser(schedule), x


# --------------------------------------------------------------------------------------------------- facts
def test_every_registry_entry_is_covered():
    assert {name for name, _ in CONFIGS} == set(dp.SOLVERS)
    for name in dp.SOLVERS:  # every entry builds with its defaults
        assert isinstance(dp.get_solver(name), dp.Solver)


@all_configs
def test_declared_facts(config):
    solver = build(config)
    assert isinstance(solver.order, int) and not isinstance(solver.order, bool) and solver.order >= 1
    assert isinstance(solver.stochastic, bool)
    assert isinstance(solver.adaptive, bool)
    assert solver.integrates in {"x0", "eps", "g"}  # g: DPM-Solver-v3's EMS parametrisation
    name, options = config
    if "order" in options:  # the declared convergence order never exceeds the requested one (+1 with a corrector)
        assert solver.order <= options["order"] + (getattr(solver, "corrector", None) is not None)
    if solver.adaptive:
        assert solver.expected_nfe(10) is None
    else:
        for steps in (1, 4, 10):
            n = solver.expected_nfe(steps)
            assert isinstance(n, int) and n >= steps


def test_declared_facts_follow_options():
    assert dp.get_solver("dpmsolver").integrates == "eps"
    assert dp.get_solver("dpmsolver++").integrates == "x0"
    assert dp.get_solver("dpmsolver", method="adaptive").integrates == "eps"
    assert dp.get_solver("dpmsolver++", method="adaptive").integrates == "x0"
    assert dp.get_solver("ddim").stochastic is False
    assert dp.get_solver("ddim", eta=0.5).stochastic is True
    assert dp.get_solver("sde-dpmsolver++").stochastic is True
    assert dp.get_solver("sde-dpmsolver++", eta=0.0).stochastic is False
    assert dp.get_solver("dpmsolver++", method="adaptive").adaptive is True
    assert dp.get_solver("dpmsolver++").adaptive is False
    assert dp.get_solver("ddim").order == 1
    assert dp.get_solver("dpmsolver++", order=2).order == 2
    assert dp.get_solver("dpmsolver++", method="multistep", order=3, solver_type="taylor").order == 3


# ----------------------------------------------------------------------------------------------------- NFE
@fixed_configs
def test_measured_nfe_equals_declared(config):
    _, _, den, x = problem()
    solver = build(config)
    for steps in (1, 2, 3, 7):
        for denoise_to_zero in (False, True):
            counting = Counting(den)
            sol = dp.sample(counting, x, solver, steps=steps, denoise_to_zero=denoise_to_zero, seed=0,
                            progress=False)
            assert counting.calls == sol.nfe == solver.expected_nfe(steps) + int(denoise_to_zero), \
                (steps, denoise_to_zero)
            assert sol.stats["steps"] == len(sol.ts) - 1


@adaptive_configs
@pytest.mark.parametrize("denoise_to_zero", [False, True])
def test_adaptive_nfe_is_counted(config, denoise_to_zero):
    _, _, den, x = problem()
    counting = Counting(den)
    solver = build(config)
    sol = dp.sample(counting, x, solver, denoise_to_zero=denoise_to_zero, progress=False)
    assert counting.calls == sol.nfe > 0
    accepted, rejected, p = sol.stats["accepted"], sol.stats["rejected"], solver.order
    assert accepted >= 1 and rejected >= 0 and sol.stats["steps"] == accepted
    # module docstring: an accepted step costs `order` evaluations, a rejected trial `order - 1`.
    assert sol.nfe == p * accepted + (p - 1) * rejected + int(denoise_to_zero)


# ------------------------------------------------------------------------------------------ ask/tell protocol
def _snapshot(value):
    """(identity, value copy, version counter) of every leaf of a state, recursively."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value.detach().clone(), value._version)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ("dataclass", id(value), tuple((f.name, id(getattr(value, f.name)), _snapshot(getattr(value, f.name)))
                                              for f in dataclasses.fields(value)))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, id(value), tuple(_snapshot(v) for v in value))
    if isinstance(value, dict):
        return ("dict", id(value), tuple((k, _snapshot(v)) for k, v in value.items()))
    if isinstance(value, torch.Generator):
        # A torch.Generator is a shared stream: a stochastic tell draws from it, which advances it. The state
        # must keep the same generator object; its position is not part of the state's value.
        return ("generator", id(value))
    return ("leaf", id(value), repr(value))


def _assert_same(before, after, path="state"):
    assert before[0] == after[0], path
    assert before[1] == after[1], f"{path} was replaced (identity changed)"
    if before[0] == "tensor":
        assert after[3] == before[3], f"{path} was modified in place"
        assert torch.equal(before[2], after[2]), f"{path} changed value"
    elif before[0] in ("generator",):
        pass
    elif before[0] == "leaf":
        assert before[2] == after[2], f"{path} changed"
    elif before[0] == "dataclass":
        for (name, ida, a), (_, idb, b) in zip(before[2], after[2]):
            assert ida == idb, f"{path}.{name} was replaced"
            _assert_same(a, b, f"{path}.{name}")
    else:
        assert len(before[2]) == len(after[2]), path
        for k, (a, b) in enumerate(zip(before[2], after[2])):
            _assert_same(a, b, f"{path}[{k}]")


@all_configs
def test_tell_leaves_its_input_state_unchanged(config):
    _, schedule, den, x = problem()
    solver = build(config)
    ts = dp.make_grid(schedule, 6)
    if solver.adaptive:
        ts = ts[[0, -1]]
    state = solver.init(schedule, ts, x.clone(), torch.Generator().manual_seed(0))
    evaluations = 0
    while not solver.done(state) and evaluations < 40:
        x_eval, t = solver.ask(state)
        pred = den(x_eval, t)
        before = _snapshot(state)
        new_state = solver.tell(state, pred)
        _assert_same(before, _snapshot(state))
        assert new_state is not state
        # ask is a pure query as well
        before_ask = _snapshot(new_state)
        solver.ask(new_state)
        _assert_same(before_ask, _snapshot(new_state))
        state, evaluations = new_state, evaluations + 1
    assert solver.done(state)


@all_configs
def test_manual_ask_tell_loop_reproduces_sample(config):
    _, schedule, den, x = problem()
    steps = 7
    x_copy, version = x.clone(), x._version
    sol = dp.sample(den, x, build(config), steps=steps_for(build(config), steps),
                    generator=torch.Generator().manual_seed(3), progress=False)
    assert x._version == version and torch.equal(x, x_copy)  # sample never writes into the caller's x

    solver = build(config)
    ts = solver.grid(schedule, steps)  # the times sample() uses (singlestep: the reference's blocks)
    if solver.adaptive:
        ts = ts[[0, -1]]
    state = solver.init(schedule, ts, x, torch.Generator().manual_seed(3))
    nfe = 0
    while not solver.done(state):
        x_eval, t = solver.ask(state)
        state = solver.tell(state, den(x_eval, t))
        nfe += 1
    x_end, t_end = solver.current(state)
    assert t_end == pytest.approx(schedule.t_min, rel=1e-12)
    assert nfe == sol.nfe
    torch.testing.assert_close(x_end, sol.x, rtol=0, atol=0)


@all_configs
def test_a_solver_object_is_reusable(config):
    """Settings objects hold no memory: the same object gives the same answer twice, also interleaved."""
    _, _, den, x = problem()
    solver = build(config)
    a = dp.sample(den, x, solver, steps=steps_for(solver, 5), seed=11, progress=False).x
    dp.sample(den, x[:1] * 0.5, solver, steps=steps_for(solver, 3), seed=2, progress=False)
    b = dp.sample(den, x, solver, steps=steps_for(solver, 5), seed=11, progress=False).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- batch vs items
@deterministic_configs
def test_batch_equals_items_one_by_one(config):
    _, _, den, x = problem()
    solver = build(config)
    batch = dp.sample(den, x, solver, steps=6, progress=False).x
    items = torch.cat([dp.sample(den, x[i:i + 1], solver, steps=6, progress=False).x for i in range(len(x))])
    torch.testing.assert_close(batch, items, rtol=1e-13, atol=1e-13)


@adaptive_configs
def test_adaptive_batch_of_copies_equals_the_single_item(config):
    """Adaptive solvers are exempt from batch == items: their step size is chosen from the error of the whole
    batch (max over items), so an item's path depends on its batch-mates. What does hold: a batch of copies
    of one item takes exactly that item's steps."""
    _, _, den, x = problem()
    solver = build(config)
    single = dp.sample(den, x[:1], solver, progress=False)
    copies = dp.sample(den, x[:1].repeat(4, 1), solver, progress=False)
    assert copies.nfe == single.nfe
    np.testing.assert_array_equal(copies.ts, single.ts)
    torch.testing.assert_close(copies.x, single.x.repeat(4, 1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("config", STOCHASTIC, ids=_id)
def test_stochastic_batch_items_share_the_deterministic_part(config):
    """Stochastic solvers draw one noise tensor per batch, so items run alone get other noise; exempt from
    batch == items. With eta = 0 they are deterministic and must satisfy it."""
    name, options = config
    _, _, den, x = problem()
    solver = dp.get_solver(name, **{**options, "eta": 0.0})
    assert not solver.stochastic
    batch = dp.sample(den, x, solver, steps=6, progress=False).x
    items = torch.cat([dp.sample(den, x[i:i + 1], solver, steps=6, progress=False).x for i in range(len(x))])
    torch.testing.assert_close(batch, items, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------------- low precision + CFG
MEANS = [[1.0, 0.5, -0.5], [-1.0, 0.0, 0.5], [0.0, -1.0, 0.0]]
VARS = [[0.1, 0.2, 0.15], [0.2, 0.1, 0.1], [0.15, 0.15, 0.2]]
NULL_CLASS = -1


class ClassConditionalMixture(torch.nn.Module):
    """A class-conditional x0-prediction 'network': class k is mixture component k, label -1 the whole
    mixture. It computes the exact posterior mean in float64 and answers in its input's dtype, like a
    half-precision network would."""

    def __init__(self, schedule: dp.Schedule, time_from_input):
        super().__init__()
        self.schedule, self.time_from_input = schedule, time_from_input
        self.mixture = GaussianMixture(MEANS, VARS)
        self.batch_sizes: list[int] = []

    def forward(self, x, t_net, y):
        self.batch_sizes.append(x.shape[0])
        t = self.time_from_input(float(t_net.double()[0]))
        a, s = self.schedule.alpha_sigma(t)
        yv, rho = x.double() / a, s / a
        means, var = self.mixture.means.to(yv), self.mixture.vars.to(yv) + rho**2
        diff = yv[:, None, :] - means[None]
        log_p = -0.5 * (diff**2 / var + torch.log(var)).sum(-1)  # equal weights: p(k | y) up to a constant
        log_p = torch.where((y == NULL_CLASS)[:, None] | (torch.arange(len(MEANS))[None] == y[:, None]),
                            log_p, torch.full_like(log_p, -torch.inf))
        w = torch.exp(log_p - log_p.logsumexp(-1, keepdim=True))  # (torch.softmax is slow on small CPU tensors)
        per_k = means[None] + (self.mixture.vars.to(yv) / var)[None] * diff
        return (w[..., None] * per_k).sum(1).to(x.dtype)


def guided_denoiser(schedule: dp.Schedule, scale: float, dtype: torch.dtype, labels: torch.Tensor):
    if isinstance(schedule, dp.DiscreteVP):  # the network takes the (fractional) train index
        net = ClassConditionalMixture(schedule, lambda v: float(schedule.t_from_train_index(v)))
        den = dp.wrap_model(net, schedule, prediction="x0", time_input="discrete", input_dtype=dtype)
    else:
        net = ClassConditionalMixture(schedule, lambda v: v)
        den = dp.wrap_model(net, schedule, prediction="x0", input_dtype=dtype)
    cfg = dp.ClassifierFreeGuidance(den, scale, cond={"y": labels}, uncond={"y": torch.full_like(labels, NULL_CLASS)})
    return cfg, net


def test_class_conditional_model_is_the_mixture_and_its_components():
    schedule = dp.LinearVP()
    net = ClassConditionalMixture(schedule, lambda v: v)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = 0.3
    a, s = schedule.alpha_sigma(t)
    out = net(x, torch.full((4,), t), torch.tensor([NULL_CLASS, 0, 1, 2]))
    torch.testing.assert_close(out[:1], GaussianMixture(MEANS, VARS).posterior_mean(x[:1] / a, s / a))
    for k in range(3):
        component = GaussianMixture(MEANS[k:k + 1], VARS[k:k + 1])
        torch.testing.assert_close(out[k + 1:k + 2], component.posterior_mean(x[k + 1:k + 2] / a, s / a))


LOW_PRECISION_SCHEDULES = {"discrete": dp.DiscreteVP.linear, "flow": dp.RectifiedFlow}


@all_configs
@pytest.mark.parametrize("schedule_name", sorted(LOW_PRECISION_SCHEDULES))
def test_low_precision_keeps_dtype_and_stays_finite_with_guidance(config, schedule_name):
    schedule = LOW_PRECISION_SCHEDULES[schedule_name]()
    labels = torch.tensor([0, 1, 2])
    for dtype in (torch.float16, torch.bfloat16):
        for scale in (1.0, 7.5, 15.0):
            den, net = guided_denoiser(schedule, scale, dtype, labels)
            x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
            seen = []
            sol = dp.sample(den, x, build(config), steps=steps_for(build(config), 10), seed=0, progress=False,
                            return_intermediates=True,
                            callback=lambda info: seen.append((info.x.dtype, info.x0.dtype)))
            # check_finite is on: a NaN/Inf from the guided model would have raised NonFiniteError.
            where = (dtype, scale)
            assert sol.x.dtype == dtype, where
            assert torch.isfinite(sol.x).all(), where
            assert all(t.dtype == dtype and torch.isfinite(t).all() for t in sol.trajectory), where
            assert all(t.dtype == dtype and torch.isfinite(t).all() for t in sol.x0_previews), where
            assert seen and all(pair == (dtype, dtype) for pair in seen), where
            # one network call per NFE; with guidance cond + uncond go through it as one doubled batch
            assert net.batch_sizes == [3 if scale == 1.0 else 6] * sol.nfe, where
            assert x.dtype == dtype


@pytest.mark.parametrize("config", [("dpmsolver++", {"order": 2}), ("ddim", {}), ("dpmsolver", {"order": 2})],
                         ids=_id)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)], ids=["fp16", "bf16"])
def test_low_precision_tracks_float64(config, dtype, tol):
    """The solver works in float32 or wider, so a half-precision run differs from a float64 run only by the
    network's rounding, not by a half-precision integration."""
    schedule = dp.DiscreteVP.linear()
    labels = torch.tensor([0, 1, 2])
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    ref = dp.sample(guided_denoiser(schedule, 3.0, torch.float64, labels)[0], x, build(config), steps=15,
                    progress=False).x
    low = dp.sample(guided_denoiser(schedule, 3.0, dtype, labels)[0], x.to(dtype), build(config), steps=15,
                    progress=False).x
    assert low.dtype == dtype
    assert (low.double() - ref).abs().max().item() < tol


# ------------------------------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("config", STOCHASTIC, ids=_id)
def test_same_seed_same_sample(config):
    _, _, den, x = problem()
    solver = build(config)
    assert solver.stochastic

    def run(**kw):
        return dp.sample(den, x, solver, steps=6, progress=False, **kw).x

    by_seed = run(seed=123)
    torch.testing.assert_close(run(seed=123), by_seed, rtol=0, atol=0)
    by_gen = run(generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(run(generator=torch.Generator().manual_seed(123)), by_gen, rtol=0, atol=0)
    # seed=s is documented as a generator seeded with s on x's device
    torch.testing.assert_close(by_gen, by_seed, rtol=0, atol=0)
    # other seeds, and no seed at all, give other samples
    assert not torch.allclose(run(seed=124), by_seed)
    assert not torch.allclose(run(generator=torch.Generator().manual_seed(124)), by_gen)
    assert not torch.allclose(run(), run())


@pytest.mark.parametrize("config", STOCHASTIC, ids=_id)
def test_seed_does_not_touch_the_global_rng(config):
    _, _, den, x = problem()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dp.sample(den, x, build(config), steps=4, seed=5, progress=False)
    dp.sample(den, x, build(config), steps=4, generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@deterministic_configs
def test_deterministic_solvers_ignore_the_seed(config):
    _, _, den, x = problem()
    a = dp.sample(den, x, build(config), steps=4, seed=1, progress=False).x
    b = dp.sample(den, x, build(config), steps=4, seed=2, progress=False).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
