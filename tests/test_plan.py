"""Plans: a grid plus per-step settings, run by the fixed-grid engine (dpmsolve.tuning.plan)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab.problems import GaussianData, GaussianMixture
from dpmsolve.tuning import Plan, PlanError, PlanStep

SCHEDULE = dp.DiscreteVP.linear()


@pytest.fixture(scope="module")
def mixture():
    problem = GaussianMixture.random(k=6, dim=4, seed=3)
    x_T = torch.randn((32, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return problem.denoiser(SCHEDULE), x_T


@pytest.mark.parametrize("grid, t_end", [("logSNR", None), ("time_power", 0.0)])
@pytest.mark.parametrize("options, plan_options", [
    ({"solver": "dpmsolver++", "order": 2}, {}),
    ({"solver": "dpmsolver++", "order": 3, "solver_type": "taylor", "warmup": "lower_order"},
     {"order": 3, "rule": "taylor"}),
    ({"solver": "dpmsolver++", "order": 2, "lower_order_final": True, "warmup": "lower_order", "order": 3},
     {"order": 3, "rule": "dpmsolver", "lower_order_final": True}),
    ({"solver": "dpmsolver", "order": 2}, {"predict": "noise"}),
    ({"solver": "unipc", "order": 2}, {"rule": "bh2", "corrector": "unic-bh2"}),
    ({"solver": "unipc", "order": 3, "variant": "bh1"}, {"order": 3, "rule": "bh1", "corrector": "unic-bh1"}),
])
def test_uniform_plan_reproduces_the_solver_exactly(mixture, grid, t_end, options, plan_options):
    den, x_T = mixture
    ts = dp.make_grid(SCHEDULE, 7, grid, t_end=t_end)
    options = dict(options)
    name = options.pop("solver")
    expected = dp.sample(den, x_T, name, grid=ts, progress=False, **options)
    got = dp.sample(den, x_T, Plan.multistep(ts, **plan_options), progress=False)
    assert torch.equal(expected.x, got.x)
    assert got.nfe == expected.nfe == 7


def test_nfe_accounting_is_exact(mixture):
    den, x_T = mixture
    ts = dp.make_grid(SCHEDULE, 5, "logSNR")
    for plan in (Plan.multistep(ts), Plan.multistep(ts, denoise_to_zero=True),
                 Plan.multistep(np.append(ts[:-1], 0.0), corrector="unic")):
        calls = []

        class Counting(dp.Denoiser):
            schedule = SCHEDULE

            def __call__(self, x, t, **kw):
                calls.append(t)
                return den(x, t, **kw)

        out = dp.sample(Counting(), x_T, plan, progress=False)
        assert out.nfe == len(calls) == plan.nfe


def test_mixed_predictions_and_compensation_converge():
    # Exact flow of Gaussian data in closed form: a plan switching prediction, with correctors and compensated
    # steps, still converges to it as the grid is refined (second order at least: the error drops ~4x per halving of h).
    problem = GaussianData(np.linspace(-0.5, 0.5, 8), np.linspace(0.05, 1.0, 8) ** 2)
    den = problem.denoiser(SCHEDULE)
    x_T = torch.randn((16, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):
        ts = dp.make_grid(SCHEDULE, n, "logSNR")
        steps = [PlanStep("noise" if i < n // 2 else "data", 2, "taylor", "unic" if i < n - 1 else None,
                          0.1 if i % 3 == 1 else 0.0) for i in range(n)]
        steps[n // 2 - 1] = PlanStep("noise", 2, "taylor")  # no corrector across the change of prediction
        x = dp.sample(den, x_T, Plan(tuple(ts), tuple(steps)), progress=False).x
        exact = problem.exact_solution(SCHEDULE, x_T, SCHEDULE.t_max, SCHEDULE.t_min)
        errors.append(float((x - exact).pow(2).mean().sqrt()))
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors


def test_save_load_round_trip_and_refusals(tmp_path):
    ts = dp.make_grid(SCHEDULE, 6, "time_power", t_end=0.0)
    plan = Plan.multistep(ts, order=3, rule="taylor", corrector="unic", schedule=SCHEDULE.fingerprint(),
                          data_shape=(4,), model="toy@123", info={"note": "made here"})
    path = plan.save(tmp_path / "p.plan.json")
    loaded = Plan.load(path, SCHEDULE, (4,), "toy@123")
    assert loaded == plan and loaded.ts == plan.ts and loaded.info == plan.info
    with pytest.raises(PlanError, match="schedule"):
        Plan.load(path, dp.CosineVP())
    with pytest.raises(PlanError, match="shape"):
        Plan.load(path, SCHEDULE, (8,))
    with pytest.raises(PlanError, match="model"):
        Plan.load(path, model="other@456")
    den = GaussianMixture.random(k=3, dim=8).denoiser(SCHEDULE)
    with pytest.raises(PlanError, match="shape"):
        dp.sample(den, torch.zeros(2, 8, dtype=torch.float64), loaded, progress=False)
    with pytest.raises(PlanError, match="schedule"):
        dp.sample(GaussianMixture.random(k=3, dim=4).denoiser(dp.CosineVP()), torch.zeros(2, 4), loaded)
    with pytest.raises(ValueError, match="steps"):
        dp.sample(GaussianMixture.random(k=3, dim=4).denoiser(SCHEDULE), torch.zeros(2, 4), loaded, steps=5)
    data = json.loads(path.read_text())
    for damage, match in ((lambda d: d.pop("steps"), "damaged"), (lambda d: d.update(format="x"), "not a dpmsolve"),
                          (lambda d: d.update(version=99), "Upgrade"), (lambda d: d["ts"].reverse(), "decreasing"),
                          (lambda d: d["steps"][0].update(order=5), "order")):
        bad = json.loads(json.dumps(data))
        damage(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PlanError, match=match):
            Plan.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="readable"):
        Plan.load(tmp_path / "junk.json")


@pytest.mark.parametrize("kwargs, match", [
    ({"predict": "velocity"}, "predict"), ({"order": 4}, "order"), ({"order": 2.5}, "order"),
    ({"rule": "midpoint"}, "rule"), ({"corrector": "v3"}, "corrector"), ({"compensation": float("nan")}, "finite"),
    ({"compensation": 0.2, "rule": "dpmsolver"}, "taylor"),
    ({"scale": (1.0, float("inf"))}, "finite"), ({"scale": "1"}, "list"), ({"corrector_scale": (1.0,)}, "corrector"),
])
def test_bad_step_settings_are_refused(kwargs, match):
    with pytest.raises(PlanError, match=match):
        PlanStep(**kwargs)


def test_bad_plans_are_refused():
    with pytest.raises(PlanError, match="3 steps"):
        Plan((1.0, 0.5, 0.1, 0.01), (PlanStep(),))
    with pytest.raises(PlanError, match="last step"):
        Plan((1.0, 0.5), (PlanStep(corrector="unic"),))
    with pytest.raises(PlanError, match="another prediction"):
        Plan((1.0, 0.5, 0.1), (PlanStep(corrector="unic"), PlanStep("noise")))
    with pytest.raises(PlanError, match="cannot also denoise"):
        Plan((1.0, 0.0), (PlanStep(),), denoise_to_zero=True)


@pytest.mark.parametrize("predict, name", [("data", "dpmsolver++"), ("noise", "dpmsolver")])
@pytest.mark.parametrize("orders, steps, t_end", [((3, 3, 3, 2, 2, 1), 14, None), ((3, 3, 3, 2, 2), 12, None),
                                                   ((2, 2, 1), 5, 0.0), ((3, 3, 3, 3, 3, 3), 6, 0.0)])
def test_singlestep_blocks_reproduce_the_singlestep_solver(mixture, predict, name, orders, steps, t_end):
    # Per-step orders [3, 3, 3, 2, 2, 1] give blocks 3 + 2 + 1 (a block takes its first step's order).
    den, x_T = mixture
    per_step = [o for o in orders for _ in range(o)][:steps] if len(orders) < steps else list(orders)
    plan_steps = tuple(PlanStep(predict, o, "dpmsolver", method="singlestep") for o in per_step)
    ts = dp.make_grid(SCHEDULE, len(plan_steps), "time_quadratic", t_end=t_end)
    plan = Plan(tuple(ts), plan_steps)
    blocks = [length for _, length in plan.solver().blocks()]
    expected = dp.sample(den, x_T, name, method="singlestep", orders=tuple(blocks), grid=ts, progress=False)
    got = dp.sample(den, x_T, plan, progress=False)
    assert torch.equal(expected.x, got.x) and got.nfe == expected.nfe == len(plan_steps)


def test_singlestep_scales_belong_to_the_stage_that_ends_at_each_step(mixture):
    # A DPM-Solver++ 2S block over (s, u, t): step 1's scale multiplies the block's final update
    # x_t = a x_s + c_0 m_s + c_1 m_u, whose linear coefficient is a = sigma_t / sigma_s (data prediction);
    # scaling only a by f moves the result by (f - 1) a x_s exactly, and leaves the intermediate stage alone.
    den, x = mixture
    ts = (0.8, 0.5, 0.2)
    plain = Plan(ts, (PlanStep("data", 2, "dpmsolver", method="singlestep"),) * 2)
    scaled = Plan(ts, (plain.steps[0], dataclasses.replace(plain.steps[1], scale=(1.25, 1.0, 1.0))))
    a = SCHEDULE.sigma(0.2) / SCHEDULE.sigma(0.8)
    out_plain, out_scaled = (dp.sample(den, x, p, progress=False).x for p in (plain, scaled))
    torch.testing.assert_close(out_scaled - out_plain, 0.25 * float(a) * x, rtol=1e-10, atol=1e-12)
    # the intermediate stage takes its own scale (a, c_0): a change there moves the evaluation at u
    first = Plan(ts, (dataclasses.replace(plain.steps[0], scale=(1.0, 1.1)), plain.steps[1]))
    assert not torch.allclose(dp.sample(den, x, first, progress=False).x, out_plain)
    with pytest.raises(PlanError, match="Step 0's scale has 3 values"):
        dp.sample(den, x, Plan(ts, (dataclasses.replace(plain.steps[0], scale=(1.0, 1.0, 1.0)), plain.steps[1])),
                  progress=False)


def test_coefficient_scales_multiply_the_update(mixture, tmp_path):
    # x' = a x + sum_j c_j m_j with (a, c_j) scaled: a one-step plan checked against the DPM-Solver++ 1 update by hand
    den, x = mixture
    s, t = 0.8, 0.5
    plan = Plan((s, t), (PlanStep("data", 1, "taylor", scale=(1.5, 0.75)),))
    out = dp.sample(den, x, plan, progress=False).x
    (a_s, sig_s), (a_t, sig_t) = SCHEDULE.alpha_sigma(s), SCHEDULE.alpha_sigma(t)
    h = float(SCHEDULE.log_snr(t) - SCHEDULE.log_snr(s))
    expected = 1.5 * (sig_t / sig_s) * x + 0.75 * a_t * (-np.expm1(-h)) * den(x, s).x0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # scales of 1 are the plain plan, bit for bit; a scaled plan survives save / load
    ts = dp.make_grid(SCHEDULE, 6, "logSNR", t_end=0.0)
    plain = Plan.multistep(ts, corrector="unic-bh2", rule="bh2")
    ones = Plan(plain.ts, tuple(dataclasses.replace(st, scale=(1.0,) * (1 + min(2, i + 1)) if i < 5 else (),
                                                    corrector_scale=(1.0,) * (2 + min(2, i + 1)) if st.corrector else ())
                                for i, st in enumerate(plain.steps)))
    assert torch.equal(dp.sample(den, x, ones, progress=False).x, dp.sample(den, x, plain, progress=False).x)
    assert Plan.load(ones.save(tmp_path / "p.json")) == ones
    wrong = Plan(plain.ts, (dataclasses.replace(plain.steps[0], scale=(1.0, 1.0, 1.0)),) + plain.steps[1:])
    with pytest.raises(PlanError, match="scale has 3 values"):
        dp.sample(den, x, wrong, progress=False)


@pytest.fixture(scope="module")
def mixture_ems(mixture):
    den, _ = mixture
    problem = GaussianMixture.random(k=6, dim=4, seed=3)
    return dp.ems.compute(den, data=problem.data_sample(512, torch.Generator().manual_seed(1)), n_lambdas=50,
                          progress=False)


@pytest.mark.parametrize("order, rule, t_end", [(2, "taylor", None), (3, "pseudo", None), (2, "taylor", 0.0)])
def test_ems_plan_reproduces_dpmsolver_v3(mixture, mixture_ems, order, rule, t_end):
    # EMS steps with the v3 corrector on the steps the reference corrects (not the first: its predictor has one point)
    den, x_T = mixture
    ts = dp.make_grid(SCHEDULE, 6, "logSNR", t_end=t_end)
    expected = dp.sample(den, x_T, "dpmsolver-v3", ems=mixture_ems, order=order, predictor_pseudo=rule == "pseudo",
                         grid=ts, progress=False)
    n = len(ts) - 1
    plan = Plan(tuple(ts), tuple(PlanStep("ems", order, rule, "v3" if 0 < i < n - 1 else None) for i in range(n)))
    got = dp.sample(den, x_T, plan, ems=mixture_ems, progress=False)
    assert torch.equal(got.x, expected.x) and got.nfe == expected.nfe == n
    with pytest.raises(dp.ems.EMSError, match="pass the model's statistics"):
        dp.sample(den, x_T, plan, progress=False)


@pytest.mark.parametrize("kwargs", [dict(rule="bh2"), dict(corrector="unic-bh2"), dict(method="singlestep"),
                                    dict(rule="taylor", compensation=0.25)])
def test_ems_steps_take_only_v3_settings(kwargs):
    with pytest.raises(PlanError, match="An EMS step"):
        PlanStep("ems", 2, **{"rule": "taylor", **kwargs})
    with pytest.raises(PlanError, match="'v3' on EMS steps"):
        PlanStep("data", 2, "taylor", "v3")


def test_tuning_with_statistics_searches_v3_steps(mixture, mixture_ems):
    den, x_T = mixture
    noise = torch.randn((32, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plan = dp.tune(den, noise, 4, ems=mixture_ems, families=(), budget=40, reference_rtol=1e-7, fit_iterations=3)
    assert plan.uses_ems and plan.nfe == 4 and "EMS: attached" in plan.report()
    # the v3 family on a standard grid is where the search started: the held-out noises are no worse after it
    assert plan.info["held_out"]["median"] <= plan.info["held_out"]["start_median"] * 1.0001
    out = dp.sample(den, x_T, plan, progress=False)          # the statistics travel with the tuned plan
    assert out.nfe == 4 and torch.isfinite(out.x).all()
    assert torch.equal(dp.sample(den, x_T, plan, ems=mixture_ems, progress=False).x, out.x)


def test_saved_plan_with_v3_steps_needs_its_statistics_again(tmp_path, mixture, mixture_ems):
    den, x_T = mixture
    ts = dp.make_grid(den.schedule, 5, "logSNR", t_end=0.0)
    plan = Plan.multistep(ts, "ems", 2, "taylor").with_ems(mixture_ems)
    expected = dp.sample(den, x_T, plan, progress=False).x
    path = plan.save(tmp_path / "v3.plan.json")
    loaded = Plan.load(path)
    assert loaded == plan and loaded.ems is None and "not attached" in loaded.report()
    with pytest.raises(dp.ems.EMSError, match="pass the model's statistics"):
        dp.sample(den, x_T, loaded, progress=False)
    assert torch.equal(dp.sample(den, x_T, Plan.load(path, ems=mixture_ems), progress=False).x, expected)
