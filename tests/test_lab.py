"""The accuracy lab: exact references, the disk cache, and evaluate()."""

import math

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData, GaussianMixture
from dpmsolve.lab.evaluate import LabProblem, SolverConfig, evaluate, high_accuracy_reference, standard_problems
from dpmsolve.lab.reference import cached, reference_between


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPMSOLVE_CACHE", str(tmp_path))


@pytest.mark.parametrize("schedule", [dp.DiscreteVP.linear(), dp.LinearVP(), dp.EDM(), dp.RectifiedFlow()],
                         ids=["discrete", "linear", "edm", "flow"])
def test_reference_matches_closed_form_gaussian(schedule):
    problem = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    x = problem.prior_sample(schedule, 6, generator=torch.Generator().manual_seed(0))
    # to t_min: the closed-form flow map
    exact = problem.exact_solution(schedule, x, schedule.t_max, schedule.t_min)
    ref = reference_between(problem.posterior_mean, schedule, x, schedule.t_max, schedule.t_min)
    assert (ref - exact).abs().max() < 1e-8
    # to sigma = 0: y = mean + sqrt(var) z with z fixed along the trajectory
    a, s = schedule.alpha_sigma(schedule.t_max)
    z = (x / a - problem.mean) / torch.sqrt(problem.var + (s / a) ** 2)
    ref0 = reference_between(problem.posterior_mean, schedule, x, schedule.t_max, None)
    assert (ref0 - (problem.mean + problem.var.sqrt() * z)).abs().max() < 1e-8


def test_guided_mixture_reference_agrees_with_a_fine_solve_of_our_own():
    (problem,) = standard_problems(n=8, names=["mixture-cfg7.5"])
    ref = problem.reference("t_min")
    fine = dp.sample(problem.denoiser, problem.x_T, "dpmsolver++", order=3, solver_type="taylor", steps=2000,
                     progress=False).x
    assert (fine - ref).abs().max() < 1e-5


def test_reference_is_cached_on_disk(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(3.0, dtype=torch.float64)

    a = cached("some|key", compute)
    b = cached("some|key", compute)
    assert calls == [1] and torch.equal(a, b)
    assert len(list((tmp_path / "references").glob("*.npy"))) == 1


def test_evaluate_ranks_third_order_above_ddim_and_reports_nfe():
    problem = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.LinearVP()
    den = problem.denoiser(schedule)
    x_T = torch.randn((16, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_between(problem.posterior_mean, schedule, x_T, schedule.t_max, schedule.t_min)
    configs = [SolverConfig("ddim", "ddim"), SolverConfig("3M", "dpmsolver++", {"order": 3, "solver_type": "taylor"})]
    report = evaluate(den, x_T, configs, nfes=[10, 20], reference=ref, endpoint="t_min", problem="g",
                      progress=False)
    rows = {(r.label, r.nfe): r for r in report.rows}
    assert rows[("3M", 20)].rmse < 0.1 * rows[("ddim", 20)].rmse
    assert all(r.nfe_used == r.nfe for r in report.rows)
    assert report.best("g", 20).label == "3M"
    # endpoint zero: nfe - 1 steps plus the final x0 evaluation, still exactly nfe
    report0 = evaluate(den, x_T, configs, nfes=[10], reference=reference_between(
        problem.posterior_mean, schedule, x_T, schedule.t_max, None), endpoint="zero", progress=False)
    assert all(r.nfe_used == 10 for r in report0.rows)
    md = report.to_markdown("g")
    assert "| 3M |" in md and "NFE 20" in md
    assert '"rows"' in report.to_json()


def test_high_accuracy_reference_matches_the_exact_solution():
    problem = GaussianMixture.random(k=3, dim=2, seed=1)
    schedule = dp.DiscreteVP.linear()
    x_T = torch.randn((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, est = high_accuracy_reference(problem.denoiser(schedule), x_T, endpoint="t_min")
    exact = reference_between(problem.posterior_mean, schedule, x_T, schedule.t_max, schedule.t_min)
    err = float(torch.sqrt(((ref - exact) ** 2).mean()))
    assert err < 1e-4 and est < 1e-3


def test_failing_configuration_is_recorded_not_dropped():
    problem = GaussianData([0.0, 0.0], [1.0, 1.0])
    den = problem.denoiser(dp.LinearVP())
    x_T = torch.randn(4, 2, dtype=torch.float64)
    bad = SolverConfig("bad", "dpmsolver++", {"order": 7})
    report = evaluate(den, x_T, [bad], nfes=[5], reference=x_T, progress=False)
    (row,) = report.rows
    assert row.rmse is None and "order" in row.error
    assert "failed" in report.to_markdown("model")


def test_unknown_problem_and_endpoint_rejected():
    with pytest.raises(ValueError, match="valid"):
        standard_problems(names=["nope"])
    (problem,) = standard_problems(n=2, names=["gaussian"])
    with pytest.raises(ValueError, match="endpoint"):
        problem.reference("middle")


def test_evaluate_reports_per_sample_statistics_with_one_threshold():
    from dpmsolve.lab.metrics import far_threshold, per_sample_errors

    problem = GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])
    schedule = dp.LinearVP()
    x_T = torch.randn((32, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_between(problem.posterior_mean, schedule, x_T, schedule.t_max, schedule.t_min)
    configs = [SolverConfig("ddim", "ddim"), SolverConfig("2M", "dpmsolver++", {"order": 2})]
    report = evaluate(problem.denoiser(schedule), x_T, configs, nfes=[5, 10], reference=ref, endpoint="t_min",
                      problem="g", progress=False, n_boot=200)
    thr = far_threshold(ref)
    assert report.meta["far_threshold"] == thr and report.meta["samples"] == 32
    for r in report.rows:
        assert r.threshold == thr and r.n == 32
        e = per_sample_errors(dp.sample(problem.denoiser(schedule), x_T, configs[r.label == "2M"].solver,
                                        steps=r.nfe, progress=False, **configs[r.label == "2M"].options).x, ref)
        assert np.allclose(r.errors, e.numpy())
        assert r.median == pytest.approx(float(np.median(e.numpy())))
        assert r.far == pytest.approx(float((e > thr).double().mean()))
        assert r.rmse == pytest.approx(float(e.pow(2).mean().sqrt())) and r.mse == pytest.approx(r.rmse ** 2)
        for value, (lo, hi) in ((r.median, r.median_ci), (r.far, r.far_ci), (r.rmse, r.rmse_ci)):
            assert lo <= value <= hi
    assert report.best("g", 10, by="median").label == "2M"
    with pytest.raises(ValueError, match="by must be"):
        report.best("g", 10, by="mean")
    md = report.to_markdown("g")
    assert "median / far% / RMSE" in md and "%" in md.splitlines()[2]
    import json

    row = json.loads(report.to_json())["rows"][0]
    assert {"median", "median_ci", "far", "far_ci", "rmse", "rmse_ci", "threshold", "n"} <= set(row)
    assert "errors" not in row and len(row["median_ci"]) == 2


def test_best_by_median_and_by_rmse_can_differ():
    from dpmsolve.lab.evaluate import Report, Row

    # 'a': small typical error, one sample in another mode (large RMSE); 'b': uniform moderate error
    rows = [Row("p", "a", "dpmsolve", 5, 5, rmse=1.0, mse=1.0, median=0.01, far=0.05),
            Row("p", "b", "diffusers", 5, 5, rmse=0.2, mse=0.04, median=0.15, far=0.0),
            Row("p", "c", "diffusers", 5, 5, None, None, "ValueError: nope")]
    report = Report(rows, "zero")
    assert report.best("p", 5).label == "b"                      # the default stays RMSE (old callers)
    assert report.best("p", 5, by="median").label == "a"
    assert report.best("p", 5, by="far").label == "b"
    assert report.best("p", 5, exclude="dpmsolve", by="median").label == "b"
