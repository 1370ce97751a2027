"""Our solvers through the diffusers adapter, measured in the accuracy lab against diffusers' own schedulers.

On the lab's gaussian problem (same model, start noise and endpoint), DPM-Solver++ 2M and UniPC-2 (bh2) run
through ``DPMSolveScheduler`` on the peer's own timesteps give the peer's result up to diffusers' float32
arithmetic, so their errors are no larger than diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler
(beyond that round-off); on the adapter's default logSNR grid they are well below. Every adapter run equals
``dp.sample`` on the same float64 grid.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import dpmsolve as dp  # noqa: E402
from dpmsolve.lab.adapter_check import AdapterConfig, run_adapter  # noqa: E402
from dpmsolve.lab.evaluate import evaluate, standard_problems  # noqa: E402
from dpmsolve.lab.peers import run_peer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# (peer, our solver, our options matching the peer's defaults at the 'zero' end: the last step is the jump to
# sigma = 0, first order for both, so lower_order_final does not matter there)
PAIRS = {
    "dpm++2m": ("diffusers:dpm++2m", "dpmsolver++", {"order": 2}),
    "unipc-bh2": ("diffusers:unipc-bh2", "unipc", {"order": 2, "variant": "bh2"}),
}
NFES = (5, 10, 20)


@pytest.fixture(scope="module")
def gaussian_problem(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DPMSOLVE_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        (problem,) = standard_problems(n=8, names=["gaussian"])
        refs = {endpoint: problem.reference(endpoint) for endpoint in ("zero", "t_min")}
    finally:
        mp.undo()
    return problem, refs


def _rmse(x, ref):
    return math.sqrt(float(((x.to(torch.float64) - ref) ** 2).mean()))


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_adapter_no_worse_than_diffusers_on_the_same_grid(gaussian_problem, pair, nfe):
    problem, refs = gaussian_problem
    peer_name, solver, options = PAIRS[pair]
    peer = run_peer(peer_name, problem.denoiser, problem.x_T, nfe, endpoint="zero")
    assert peer.error is None and peer.nfe == nfe
    ours = run_adapter(solver, options, peer.settings["grid"], problem.denoiser, problem.x_T, nfe, "zero")
    assert ours.error is None and ours.nfe == nfe
    assert ours.settings["timesteps"] == [float(t) for t in peer.settings["grid"]]
    e_peer, e_ours = _rmse(peer.x, refs["zero"]), _rmse(ours.x, refs["zero"])
    # Same evaluation times, same update: the results differ only by diffusers' float32 tables and arithmetic
    # (measured: <= 7e-7 per coordinate, error ratios within 2.5e-6 of 1).
    assert (ours.x - peer.x).abs().max().item() < 2e-6
    assert e_ours <= e_peer * (1 + 1e-5), (e_ours, e_peer)
    # On the adapter's default logSNR grid our solver is far more accurate than diffusers' default (linspace).
    default = run_adapter(solver, options, "logSNR", problem.denoiser, problem.x_T, nfe, "zero")
    assert default.error is None and default.nfe == nfe
    assert _rmse(default.x, refs["zero"]) < 0.6 * e_peer


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_adapter_matches_diffusers_at_t_min_with_its_last_step_rule(gaussian_problem, pair, nfe):
    """At the t_min end the last step is a real (large) step: diffusers takes it at first order (DPM-Solver++ only
    below 15 steps, UniPC always); with that rule as an explicit option the adapter gives diffusers' result."""
    problem, refs = gaussian_problem
    peer_name, solver, options = PAIRS[pair]
    lower_order_final = pair == "unipc-bh2" or nfe < 15
    peer = run_peer(peer_name, problem.denoiser, problem.x_T, nfe, endpoint="t_min")
    ours = run_adapter(solver, {**options, "lower_order_final": lower_order_final}, peer.settings["grid"],
                       problem.denoiser, problem.x_T, nfe, "t_min")
    assert peer.error is None and ours.error is None
    assert (ours.x - peer.x).abs().max().item() < 2e-5
    assert _rmse(ours.x, refs["t_min"]) == pytest.approx(_rmse(peer.x, refs["t_min"]), rel=5e-5)


@pytest.mark.parametrize("endpoint", ["zero", "t_min"])
@pytest.mark.parametrize("grid", ["logSNR", "karras", "peer"])
@pytest.mark.parametrize("config", [("dpmsolver++", {"order": 2}), ("unipc", {"order": 2}),
                                    ("dpmsolver++", {"order": 3, "solver_type": "taylor"})])
def test_adapter_equals_native_sample(gaussian_problem, config, grid, endpoint):
    problem, _ = gaussian_problem
    solver, options = config
    if grid == "peer":
        grid = run_peer("diffusers:dpm++2m", problem.denoiser, problem.x_T, 7, endpoint).settings["grid"]
    result = run_adapter(solver, options, grid, problem.denoiser, problem.x_T, 7, endpoint)
    assert result.error is None and result.nfe == 7
    ts = result.settings["ts"]
    assert len(ts) == 8 and (ts[-1] == 0.0) == (endpoint == "zero")
    native = dp.sample(problem.denoiser, problem.x_T, solver, grid=ts, progress=False, **options)
    assert native.nfe == 7
    assert (result.x - native.x).abs().max().item() <= 1e-10


def test_adapter_config_in_evaluate(gaussian_problem):
    problem, refs = gaussian_problem
    config = AdapterConfig("adapter DPM-Solver++ 2M", "dpmsolver++", {"order": 2})
    report = evaluate(problem.denoiser, problem.x_T, [config], nfes=[6], reference=refs["zero"], progress=False,
                      problem="gaussian")
    (row,) = report.rows
    assert row.error is None and row.nfe_used == 6 and row.source == "dpmsolve"
    native = dp.sample(problem.denoiser, problem.x_T, "dpmsolver++", order=2, steps=6, t_end=0.0, progress=False)
    assert row.rmse == pytest.approx(_rmse(native.x, refs["zero"]), rel=1e-9)


def test_adapter_failures_are_recorded(gaussian_problem):
    problem, _ = gaussian_problem
    bad = run_adapter("dpmsolver++", {"order": 2}, [999, 500], problem.denoiser, problem.x_T, 3)
    assert bad.x is None and "2 timesteps, but nfe=3" in bad.error
    flow = dp.wrap_model(lambda x, t: x, dp.RectifiedFlow(), "flow")
    bad = run_adapter("unipc", {}, "logSNR", flow, problem.x_T, 3)
    assert bad.x is None and "DiscreteVP" in bad.error
    bad = run_adapter("dpmsolver++", {"method": "adaptive"}, "logSNR", problem.denoiser, problem.x_T, 3)
    assert bad.x is None and "adaptive" in bad.error
