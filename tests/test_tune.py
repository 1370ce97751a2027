"""The tuner (dp.tune) and the model-free default plan, on problems with exact solutions."""

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab.problems import GaussianData, GaussianMixture
from dpmsolve.tuning import Plan, PlanStep, plan_errors
from dpmsolve.tuning.default import default_plan, guidance_of

SCHEDULE = dp.DiscreteVP.linear()


def gaussian():
    problem = GaussianData(np.linspace(-0.6, 0.6, 8), np.geomspace(0.01, 1.0, 8))
    return problem, problem.denoiser(SCHEDULE)


def exact(problem, x_T, endpoint="zero"):
    t_end = 1e-12 if endpoint == "zero" else SCHEDULE.t_min
    if endpoint == "zero":   # sigma = 0: the exact flow map of Gaussian data at rho = 0
        a0, s0 = SCHEDULE.alpha_sigma(SCHEDULE.t_max)
        z = (x_T / a0 - problem.mean) / torch.sqrt(problem.var + (s0 / a0) ** 2)
        return problem.mean + problem.var.sqrt() * z
    return problem.exact_solution(SCHEDULE, x_T, SCHEDULE.t_max, t_end)


def noise(n, seed):
    return torch.randn((n, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("endpoint", ["zero", "t_min"])
def test_tuning_never_worsens_held_out_error_on_gaussian_data(endpoint):
    problem, den = gaussian()
    x_T = noise(64, 0)
    plan = dp.tune(den, x_T, 4, reference=exact(problem, x_T, endpoint), endpoint=endpoint, budget=150)
    held, start = plan.info["held_out"], plan.info["start_plan"]
    assert held["n"] == 16 and plan.info["tune"]["n"] == 48
    assert held["median"] <= held["start_median"]
    # independently, on fresh noises: the tuned plan against the grid the search started from
    fresh = noise(256, 1)
    ref = exact(problem, fresh, endpoint)
    tuned = plan_errors(dp.sample(den, fresh, plan, progress=False).x, ref)
    begin = plan_errors(dp.sample(den, fresh, Plan(tuple(start["ts"]), tuple(PlanStep(**s) for s in start["steps"])),
                                  progress=False).x, ref)
    assert torch.log(tuned).mean() <= torch.log(begin).mean()
    assert plan.nfe == 4 and plan.to_zero == (endpoint == "zero")
    assert plan.schedule == SCHEDULE.fingerprint() and plan.data_shape == (8,)


def test_tuner_is_deterministic_and_counts_every_evaluation():
    problem, den = gaussian()
    calls = []

    class Counting(dp.Denoiser):
        schedule = SCHEDULE

        def __call__(self, x, t, **kw):
            calls.append(x.shape[0])
            return den(x, t, **kw)

    x_T = noise(40, 2)
    plans = [dp.tune(Counting(), x_T, [3, 5], budget=60, reference_rtol=1e-6, seed=4) for _ in range(2)]
    for k in (3, 5):
        assert plans[0][k] == plans[1][k]     # same times and step settings
        assert plans[0][k].nfe == k
    cost = [plans[0][k].info["cost"] for k in (3, 5)]
    assert cost[0]["reference_evaluations"] == cost[1]["reference_evaluations"] > 0   # references shared
    # every batched call: references once, each NFE's search and coefficient fit, the final checks
    total = cost[0]["reference_evaluations"] + sum(c["search_evaluations"] + c["check_evaluations"]
                                                   + c["fit_evaluations"] for c in cost)
    assert len(calls) / 2 == total           # two identical tune() calls


@pytest.mark.parametrize("endpoint", ["zero", "t_min"])
def test_a_plan_refined_to_more_steps_keeps_its_time_density_and_settings(endpoint):
    from dpmsolve.tuning.search import _Grid, refined

    to_zero = endpoint == "zero"
    grid = _Grid(SCHEDULE, to_zero, SCHEDULE.t_max, SCHEDULE.t_min)
    t_end = 0.0 if to_zero else None
    steps = (PlanStep("noise", 1), PlanStep("data", 2, "bh2", "unic-bh2"), PlanStep("data", 3, "taylor"))
    # uniform in log-SNR stays uniform in log-SNR: the grid dp.make_grid makes for 6 steps
    plan = Plan(dp.make_grid(SCHEDULE, 3, "logSNR", t_end=t_end), steps)
    six = refined(plan, grid, 6)
    np.testing.assert_allclose(six.ts, dp.make_grid(SCHEDULE, 6, "logSNR", t_end=t_end), rtol=1e-9, atol=1e-12)
    assert [(s.predict, s.order) for s in six.steps] == [("noise", 1)] * 2 + [("data", 2)] * 2 + [("data", 3)] * 2
    assert [s.corrector for s in six.steps] == [None, None, "unic-bh2", "unic-bh2", None, None]
    singlestep = Plan(plan.ts, tuple(PlanStep("data", 3, method="singlestep") for _ in range(3)))
    assert refined(singlestep, grid, 6) is None          # a singlestep block does not stretch


def test_tuning_several_nfes_starts_each_from_the_plan_below(tmp_path):
    problem, den = gaussian()
    x_T = noise(48, 3)
    plans = dp.tune(den, x_T, [5, 3], reference=exact(problem, x_T), budget=60, fit_iterations=0, seed=2)
    assert plans[5].info["seed"] == 2 and Plan.load(plans[5].save(tmp_path / "p.plan.json")) == plans[5]
    assert list(plans) == [5, 3]                        # in the order asked
    assert "seeds" in plans[3].info and plans[3].info["seeds"] == []
    (label, seeded), = plans[5].info["seeds"]
    assert label == "the NFE 3 plan refined"
    assert plans[5].info["tuning_objective"] <= seeded  # the search keeps the best of its starts


def test_per_sample_conditioning_travels_with_the_noise():
    # A class-conditional mixture: a label per start noise, passed as model_kwargs and as a guided wrapper.
    problem = GaussianMixture.random(k=8, dim=4, seed=5, classes=4)
    base = problem.denoiser(SCHEDULE)
    labels = torch.arange(48) % 4
    x_T = torch.randn((48, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    from dpmsolve.lab.reference import reference_between

    ref = reference_between(lambda y, rho: problem.posterior_mean(y, rho, labels), SCHEDULE, x_T, SCHEDULE.t_max, None)
    plan = dp.tune(base, x_T, 6, model_kwargs={"y": labels}, reference=ref, budget=80)
    out = dp.sample(base, x_T, plan, model_kwargs={"y": labels}, progress=False).x
    assert float(plan_errors(out, ref).median()) < 0.05
    guided = dp.ClassifierFreeGuidance(base, 2.0, cond={"y": labels}, uncond={"y": torch.full_like(labels, -1)})
    plan = dp.tune(guided, x_T, 5, budget=40, reference_rtol=1e-6)   # labels sliced inside the wrapper
    assert plan.info["held_out"]["n"] == 12 and np.isfinite(plan.info["held_out"]["median"])


def test_coefficient_fit_is_kept_only_when_the_check_noises_confirm_it():
    # A Gaussian-data plan at 4 steps: fitting its coefficient scales lowers the objective on noises the fit never saw
    # (fresh ones, against the exact flow); a model that is not differentiable leaves the plan as it was.
    from dpmsolve.tuning.search import fit_scales

    problem, den = gaussian()
    x_fit, x_check, x_fresh = noise(48, 11), noise(16, 12), noise(256, 13)
    plan = Plan.multistep(dp.make_grid(SCHEDULE, 4, "time_uniform", t_end=0.0), corrector="unic-bh2", rule="bh2")
    fitted, info = fit_scales(plan, den, x_fit, exact(problem, x_fit), 1e-12, x_check, exact(problem, x_check), den,
                              iterations=30)
    assert info["kept"] and info["check_after"] < info["check_before"] and info["iterations"] == 30
    assert info["evaluations"] == 30 * 4 + 2 * 4 - 1           # fit runs + the check of both plans (first call shared)
    assert all(s.scale for s in fitted.steps[:-1]) and not fitted.steps[-1].scale   # not the jump to sigma = 0
    ref = exact(problem, x_fresh)
    errors = [plan_errors(dp.sample(den, x_fresh, p, progress=False).x, ref).log().mean() for p in (plan, fitted)]
    assert errors[1] < errors[0] - 0.1, errors

    class Detached(dp.Denoiser):
        schedule = SCHEDULE

        def __call__(self, x, t, **kw):
            p = den(x, t, **kw)
            return type(p)(p.x0.detach(), p.eps.detach())

    same, info = fit_scales(plan, Detached(), x_fit, exact(problem, x_fit), 1e-12, x_check, exact(problem, x_check),
                            Detached(), iterations=5)
    assert same == plan and not info["kept"] and "differentiable" in info["why"]


TUNE_WORKER = """
import sys, torch, torch.distributed as dist
import dpmsolve as dp
from dpmsolve.lab.problems import GaussianMixture
dist.init_process_group("gloo")
problem = GaussianMixture.random(k=6, dim=4, seed=3)
den = problem.denoiser(dp.DiscreteVP.linear())
x_T = torch.randn((40, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
plan = dp.tune(den, x_T, 4, budget=40, reference_rtol=1e-7, fit_iterations=5, group=dist.group.WORLD)
if dist.get_rank() == 0:
    plan.save(sys.argv[1])
dist.destroy_process_group()
"""


def test_tuning_on_two_ranks_gives_the_single_process_plan(tmp_path):
    # torchrun (gloo, CPU): each rank evaluates half of every set of noises, references included; errors are
    # gathered and the fit's gradients summed, so the plan is the one a single process finds.
    import os
    import socket
    import subprocess
    import sys

    from dpmsolve.lab.problems import GaussianMixture

    (tmp_path / "worker.py").write_text(TUNE_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "worker.py", str(tmp_path / "plan.json")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = Plan.load(tmp_path / "plan.json")
    problem = GaussianMixture.random(k=6, dim=4, seed=3)
    den = problem.denoiser(SCHEDULE)
    x_T = torch.randn((40, 4), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    single = dp.tune(den, x_T, 4, budget=40, reference_rtol=1e-7, fit_iterations=5)
    np.testing.assert_allclose(ranks.ts, single.ts, rtol=1e-12)
    for a, b in zip(ranks.steps, single.steps):
        assert a.short() == b.short()
        np.testing.assert_allclose(a.scale + a.corrector_scale, b.scale + b.corrector_scale, atol=2e-6)
    for part in ("tune", "held_out"):
        assert ranks.info[part]["n"] == single.info[part]["n"]
        assert ranks.info[part]["median"] == pytest.approx(single.info[part]["median"], rel=1e-6)
    # evaluations are counted per rank: the same batched calls as one process, each on half the noises
    assert ranks.info["cost"]["search_evaluations"] == single.info["cost"]["search_evaluations"]


def test_bad_arguments_are_refused():
    _, den = gaussian()
    with pytest.raises(ValueError, match="nfe"):
        dp.tune(den, noise(16, 0), 1)
    with pytest.raises(ValueError, match="at least 8"):
        dp.tune(den, noise(4, 0), 5)
    with pytest.raises(ValueError, match="endpoint"):
        dp.tune(den, noise(16, 0), 5, endpoint="end")
    with pytest.raises(ValueError, match="schedule="):
        dp.tune(lambda kw: den, noise(16, 0), 5)


def test_default_plan_is_what_sample_runs_and_follows_guidance():
    problem, den = gaussian()
    x_T = noise(32, 5)
    for steps, t_end, endpoint in ((6, None, "t_min"), (8, 0.0, "zero")):
        plan = default_plan(SCHEDULE, steps, None, endpoint)
        assert plan.nfe == steps and plan.to_zero == (endpoint == "zero") and plan.info["default"]
        out = dp.sample(den, x_T, steps=steps, t_end=t_end, progress=False)
        assert out.nfe == steps
        assert torch.equal(out.x, dp.sample(den, x_T, plan, progress=False).x)
    guided = dp.ClassifierFreeGuidance(den, 4.0, cond={}, uncond={})
    assert guidance_of(guided) == 4.0 and guidance_of(den) is None
    assert default_plan(SCHEDULE, 6, 4.0).info["guidance"] == 4.0
    assert default_plan(SCHEDULE, 6, 1.0) == default_plan(SCHEDULE, 6, None)


def test_default_plan_converges_to_the_exact_solution():
    # Exact flow of Gaussian data: the default plan's error falls steadily with its step budget.
    problem, den = gaussian()
    x_T = noise(128, 9)
    medians = []
    for steps in (5, 10, 20):
        for endpoint, t_end in (("t_min", None), ("zero", 0.0)):
            ref = exact(problem, x_T, endpoint)
            medians.append(float(plan_errors(dp.sample(den, x_T, steps=steps, t_end=t_end, progress=False).x,
                                             ref).median()))
    for end in (0, 1):   # each doubling of the budget at least halves the median error
        assert medians[end] > 2 * medians[end + 2] > 4 * medians[end + 4], medians
