"""Oracles written by others: dpmsolve's solvers reproduce diffusers' schedulers on the same times.

Both sides drive the SAME float64 network: the exact posterior of a Gaussian mixture at train step ``n``,
returned as eps, x0 ("sample") or v. diffusers gets it at its integer ``timesteps``; dpmsolve wraps it with
``wrap_model(time_input="discrete")``, which maps our time ``t = (n + 1) / N`` back to ``n``. The grid is
therefore ``[(n + 1) / N for n in scheduler.timesteps] + [1 / N]``: ``final_sigmas_type="sigma_min"`` (DPM
schedulers) and ``set_alpha_to_one=False`` (DDIM) end at the training sigma of index 0, i.e. ``t = 1 / N``.

Precision. diffusers keeps ``alphas_cumprod`` and ``sigmas`` in float32 (and ``DPMSolverMultistepScheduler.step``
casts the sample to float32 for the update), so against diffusers as shipped ("float32 tables") agreement is
limited to ~1e-6 relative; the oracle tolerance is 1e-5. To check the update formulas beyond that floor, every
DDIM and singlestep case is also run with diffusers' tables replaced by the float64 values of the same schedule
("float64 tables"): they then agree to round-off (1e-11). The multistep scheduler cannot be checked that way
because its step() casts the sample to float32 regardless.

Known difference (pinned by a test below, not hidden): DPMSolverSinglestepScheduler order 3 with
``solver_type="midpoint"`` takes the intermediate step to ``s2`` with the *midpoint* 2nd-order formula, whereas
the reference DPM-Solver-3 (Lu et al. 2022, Alg. 2; LuChengTHU/dpm-solver ``singlestep_dpm_solver_third_update``)
and dpmsolve use the Taylor (phi_2) form there for every solver_type. Both are third-order methods; the final
update is identical. diffusers' 3M always uses the reference 3M formula (our order=3, solver_type="dpmsolver"):
its ``solver_type`` only changes the 2nd-order warm-up step, so 3M "heun" is not an oracle for our Taylor 3M.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler  # noqa: E402

import dpmsolve as dp  # noqa: E402
from dpmsolve.lab import GaussianMixture  # noqa: E402
from dpmsolve.solvers._exponential import Rule  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # diffusers deprecates algorithm_type="dpmsolver"
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers' np.array(tensor)
]

N_TRAIN = 1000
PROBLEM = GaussianMixture.random(k=3, dim=16, seed=0)
SHAPE = (6, 4, 2, 2)  # flattened to the mixture's 16 dimensions
ORACLE_TOL = 1e-5
# Non-uniform integer timesteps (variable step ratios r0, r1 != 1), 17 of them: diffusers' lower_order_final is
# gated on < 15 steps, so it is inactive here, as it is for the default 20-step grids.
CUSTOM_TIMESTEPS = (999, 950, 880, 800, 700, 600, 480, 380, 300, 230, 170, 120, 80, 50, 30, 15, 6)
SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def mixture_posterior_mean(y: torch.Tensor, rho: float) -> torch.Tensor:
    """E[x0 | x0 + rho eps = y] for PROBLEM (= PROBLEM.posterior_mean; normalised with logsumexp, which is much
    cheaper than torch.softmax for these tiny tensors on a loaded CPU)."""
    means, var = PROBLEM.means, PROBLEM.vars + rho**2
    diff = y[:, None, :] - means[None]
    log_p = -0.5 * (diff**2 / var + torch.log(2 * torch.pi * var)).sum(-1) + torch.log(PROBLEM.weights)
    w = torch.exp(log_p - torch.logsumexp(log_p, dim=-1, keepdim=True))
    per_k = means[None] + (PROBLEM.vars / var)[None] * diff
    return (w[..., None] * per_k).sum(1)


def network(schedule: dp.DiscreteVP, prediction: str):
    """A float64 'network' net(x, n): the exact posterior of PROBLEM at train index n, as eps / x0 / v.

    alpha and sigma come from our DiscreteVP at train index n (exactly alphas_cumprod[n] for integer n), so the
    eps output is exact for the mixture at every timestep diffusers evaluates.
    """

    def net(x: torch.Tensor, n) -> torch.Tensor:
        n = torch.as_tensor(n).reshape(-1)
        assert torch.all(n == n[0]), "one timestep per call"
        a, s = schedule.alpha_sigma(float(schedule.t_from_train_index(float(n[0]))))
        x64 = x.to(torch.float64)
        x0 = mixture_posterior_mean((x64 / a).reshape(x.shape[0], -1), s / a).reshape(x.shape)
        eps = (x64 - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction]
        return out.to(x.dtype)

    return net


def our_grid(timesteps) -> np.ndarray:
    """diffusers' integer timestep n is our t = (n + 1) / N; the final sigma_min / alphas_cumprod[0] is t = 1 / N."""
    return np.array([(int(n) + 1) / N_TRAIN for n in timesteps] + [1.0 / N_TRAIN])


def float64_tables(sched, schedule: dp.DiscreteVP) -> None:
    """Replace diffusers' float32 schedule tables by the float64 values of the same alphas_cumprod."""
    ac = schedule.alphas_cumprod
    if isinstance(sched, DDIMScheduler):
        sched.alphas_cumprod = torch.from_numpy(ac.copy())
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]  # set_alpha_to_one=False
    else:
        sig = np.sqrt((1.0 - ac) / ac)
        sched.sigmas = torch.from_numpy(np.concatenate([sig[sched.timesteps.numpy()], sig[:1]]))


@dataclass(frozen=True)
class Oracle:
    """One diffusers configuration and the dpmsolve solver that must reproduce it."""

    name: str
    scheduler: Callable  # (prediction_type=...) -> diffusers scheduler
    solver: Callable[[], dp.Solver]
    prediction: str = "epsilon"
    steps: int | None = 20
    timesteps: tuple | None = None
    # None; "generator": the same seeded torch.Generator on both sides (same draws, same order);
    # "variance_noise": z_i drawn from an identically seeded generator, handed to diffusers' step.
    noise: str | None = None
    dtype: torch.dtype = torch.float64  # the sample's dtype on both sides
    step_kwargs: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.scheduler.func.__name__


def ddim(**kw):
    return functools.partial(DDIMScheduler, clip_sample=False, set_alpha_to_one=False, **kw)


def multistep(**kw):
    return functools.partial(DPMSolverMultistepScheduler,
                             **{"final_sigmas_type": "sigma_min", "lower_order_final": False, "euler_at_final": False,
                                **kw})


def singlestep(**kw):
    return functools.partial(DPMSolverSinglestepScheduler,
                             **{"final_sigmas_type": "sigma_min", "lower_order_final": False, **kw})


MS2 = functools.partial(dp.get_solver, "dpmsolver++", order=2, solver_type="dpmsolver")
MS3 = functools.partial(dp.get_solver, "dpmsolver++", order=3, solver_type="dpmsolver", warmup="lower_order")

ORACLES = [
    # --- DDIMScheduler ("leading" spacing + steps_offset=1: 951, 901, ..., 1; "trailing": 999, 949, ..., 49)
    *[Oracle(f"ddim-eta0-{p}", ddim(steps_offset=1), lambda: dp.get_solver("ddim"), p)
      for p in ("epsilon", "v_prediction", "sample")],
    Oracle("ddim-eta0-trailing", ddim(timestep_spacing="trailing"), lambda: dp.get_solver("ddim")),
    Oracle("ddim-eta0.5-generator", ddim(steps_offset=1), lambda: dp.DDIM(eta=0.5), noise="generator",
           step_kwargs=dict(eta=0.5)),
    Oracle("ddim-eta1-generator", ddim(steps_offset=1), lambda: dp.DDIM(eta=1.0), noise="generator",
           step_kwargs=dict(eta=1.0)),
    Oracle("ddim-eta1-generator-v", ddim(timestep_spacing="trailing"), lambda: dp.DDIM(eta=1.0), "v_prediction",
           noise="generator", step_kwargs=dict(eta=1.0)),
    # --- DPMSolverMultistepScheduler, dpmsolver++ (data prediction)
    Oracle("multistep-1", multistep(solver_order=1), lambda: dp.get_solver("dpmsolver++", order=1)),
    *[Oracle(f"multistep-2M-midpoint-{p}", multistep(solver_order=2, solver_type="midpoint"), MS2, p)
      for p in ("epsilon", "v_prediction", "sample")],
    Oracle("multistep-2M-heun", multistep(solver_order=2, solver_type="heun"),
           lambda: dp.get_solver("dpmsolver++", order=2, solver_type="taylor")),
    Oracle("multistep-2M-heun-v", multistep(solver_order=2, solver_type="heun"),
           lambda: dp.get_solver("dpmsolver++", order=2, solver_type="taylor"), "v_prediction"),
    *[Oracle(f"multistep-3M-{p}", multistep(solver_order=3, solver_type="midpoint"), MS3, p)
      for p in ("epsilon", "v_prediction", "sample")],
    Oracle("multistep-2M-custom-timesteps", multistep(solver_order=2), MS2, steps=None, timesteps=CUSTOM_TIMESTEPS),
    Oracle("multistep-2M-heun-custom-timesteps", multistep(solver_order=2, solver_type="heun"),
           lambda: dp.get_solver("dpmsolver++", order=2, solver_type="taylor"), steps=None,
           timesteps=CUSTOM_TIMESTEPS),
    Oracle("multistep-3M-custom-timesteps", multistep(solver_order=3), MS3, steps=None, timesteps=CUSTOM_TIMESTEPS),
    Oracle("multistep-2M-scaled-linear", multistep(solver_order=2, **SCALED_LINEAR), MS2),
    Oracle("multistep-3M-scaled-linear-trailing", multistep(solver_order=3, timestep_spacing="trailing",
                                                            **SCALED_LINEAR), MS3),
    # lower_order_final: diffusers applies it only below 15 steps (orders ..., 2, 1 at the end), ours always.
    Oracle("multistep-2M-lower-order-final-10", multistep(solver_order=2, lower_order_final=True),
           lambda: dp.get_solver("dpmsolver++", order=2, lower_order_final=True), steps=10),
    Oracle("multistep-3M-lower-order-final-10", multistep(solver_order=3, lower_order_final=True),
           lambda: dp.get_solver("dpmsolver++", order=3, lower_order_final=True, warmup="lower_order"), steps=10),
    # --- DPMSolverMultistepScheduler, dpmsolver (noise prediction; deprecated in diffusers)
    Oracle("multistep-noise-1", multistep(solver_order=1, algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=1)),
    Oracle("multistep-noise-2M-midpoint", multistep(solver_order=2, algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=2, solver_type="dpmsolver")),
    Oracle("multistep-noise-2M-midpoint-v", multistep(solver_order=2, algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=2, solver_type="dpmsolver"), "v_prediction"),
    Oracle("multistep-noise-2M-heun", multistep(solver_order=2, solver_type="heun", algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=2, solver_type="taylor")),
    Oracle("multistep-noise-3M", multistep(solver_order=3, algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=3, solver_type="dpmsolver", warmup="lower_order")),
    Oracle("multistep-noise-3M-custom-timesteps", multistep(solver_order=3, algorithm_type="dpmsolver"),
           lambda: dp.get_solver("dpmsolver", order=3, solver_type="dpmsolver", warmup="lower_order"),
           steps=None, timesteps=CUSTOM_TIMESTEPS),
    # --- DPMSolverMultistepScheduler, sde-dpmsolver++ (eta = 1)
    *[Oracle(f"multistep-sde-{k}-{st}-variance-noise", multistep(solver_order=k, solver_type=st,
                                                                 algorithm_type="sde-dpmsolver++"),
             functools.partial(dp.get_solver, "sde-dpmsolver++", order=k, eta=1.0, solver_type=st),
             noise="variance_noise")
      for k in (1, 2) for st in ("midpoint", "heun")],
    Oracle("multistep-sde-2-v-variance-noise", multistep(solver_order=2, algorithm_type="sde-dpmsolver++"),
           lambda: dp.get_solver("sde-dpmsolver++", order=2), "v_prediction", noise="variance_noise"),
    # diffusers draws the multistep SDE noise in float32 from the generator: with a float32 sample on our side too
    # (the network still computes in float64) the shared seeded generator gives the identical draws.
    *[Oracle(f"multistep-sde-{k}-generator-float32", multistep(solver_order=k, algorithm_type="sde-dpmsolver++"),
             functools.partial(dp.get_solver, "sde-dpmsolver++", order=k), noise="generator", dtype=torch.float32)
      for k in (1, 2)],
    # --- DPMSolverSinglestepScheduler (order_list [1, 2, 1, 2, ...] / [1, 2, 3, ...]; 18 steps divide both)
    *[Oracle(f"singlestep-2S-midpoint-{p}", singlestep(solver_order=2, solver_type="midpoint"),
             lambda: dp.get_solver("dpmsolver++", method="singlestep", order=2, split="fixed"), p, steps=18)
      for p in ("epsilon", "v_prediction", "sample")],
    Oracle("singlestep-2S-midpoint-explicit-orders", singlestep(solver_order=2),
           lambda: dp.DPMSolverSinglestep(order=2, orders=(2,) * 9), steps=18),
    Oracle("singlestep-2S-heun", singlestep(solver_order=2, solver_type="heun"),
           lambda: dp.DPMSolverSinglestep(order=2, solver_type="taylor", split="fixed"), steps=18),
    Oracle("singlestep-2S-custom-timesteps", singlestep(solver_order=2),
           lambda: dp.DPMSolverSinglestep(order=2, split="fixed"), steps=None, timesteps=CUSTOM_TIMESTEPS[:16]),
    Oracle("singlestep-noise-2S-midpoint", singlestep(solver_order=2, algorithm_type="dpmsolver"),
           lambda: dp.DPMSolverSinglestep(order=2, predict="noise", split="fixed"), steps=18),
    Oracle("singlestep-3S-heun", singlestep(solver_order=3, solver_type="heun"),
           lambda: dp.DPMSolverSinglestep(order=3, solver_type="taylor", split="fixed"), steps=18),
    Oracle("singlestep-3S-heun-v", singlestep(solver_order=3, solver_type="heun"),
           lambda: dp.DPMSolverSinglestep(order=3, solver_type="taylor", split="fixed"), "v_prediction", steps=18),
    Oracle("singlestep-noise-3S-heun", singlestep(solver_order=3, solver_type="heun", algorithm_type="dpmsolver"),
           lambda: dp.DPMSolverSinglestep(order=3, predict="noise", solver_type="taylor", split="fixed"), steps=18),
    Oracle("singlestep-sde-1-generator", singlestep(solver_order=1, algorithm_type="sde-dpmsolver++"),
           lambda: dp.get_solver("sde-dpmsolver++", order=1), noise="generator"),
]
ORACLES_BY_NAME = {o.name: o for o in ORACLES}
assert len(ORACLES_BY_NAME) == len(ORACLES)

# Agreement reached with float64 tables (see the module docstring). DPMSolverMultistepScheduler is left out there:
# its step() casts the sample to float32 whatever the tables are, which keeps it at the ~1e-6 floor.
FLOAT64_TABLES_TOL = 1e-11


def run_oracle(oracle: Oracle, tables: str = "float32", solver: dp.Solver | None = None, seed: int = 7):
    """(ours, theirs, diffusers' timesteps) for one oracle on identical inputs and identical noise."""
    sched = oracle.scheduler(prediction_type=oracle.prediction)
    if oracle.timesteps is not None:
        sched.set_timesteps(timesteps=list(oracle.timesteps))
    else:
        sched.set_timesteps(oracle.steps)
    timesteps = sched.timesteps.clone()
    if isinstance(sched, DDIMScheduler):
        # DDIM steps to `timestep - N // steps`, whatever the next timestep is: the grid must be that chain.
        ratio = N_TRAIN // sched.num_inference_steps
        assert np.all(np.diff(timesteps.numpy()) == -ratio) and int(timesteps[-1]) - ratio < 0
    schedule = dp.DiscreteVP.from_alphas_cumprod(sched.alphas_cumprod.numpy())
    if tables == "float64":
        float64_tables(sched, schedule)
    net = network(schedule, oracle.prediction)
    x_start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(oracle.dtype)

    steps = len(timesteps)
    noise_gen = torch.Generator().manual_seed(seed)
    zs = [torch.randn(SHAPE, generator=noise_gen, dtype=oracle.dtype) for _ in range(steps)]
    theirs_gen = torch.Generator().manual_seed(seed)
    x = x_start.clone()
    for i, t in enumerate(timesteps):
        kwargs = dict(oracle.step_kwargs)
        if oracle.noise == "generator":
            kwargs["generator"] = theirs_gen
        elif oracle.noise == "variance_noise":
            kwargs["variance_noise"] = zs[i]
        x = sched.step(net(x, t), t, x, **kwargs).prev_sample
    theirs = x

    denoiser = dp.wrap_model(net, schedule, prediction=oracle.prediction, time_input="discrete")
    sol = dp.sample(denoiser, x_start.clone(), solver or oracle.solver(), grid=our_grid(timesteps), progress=False,
                    generator=torch.Generator().manual_seed(seed) if oracle.noise else None)
    assert sol.nfe == steps and sol.x.dtype == theirs.dtype == oracle.dtype
    return sol.x, theirs, timesteps


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    ours, theirs = ours.to(torch.float64), theirs.to(torch.float64)
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("name", list(ORACLES_BY_NAME))
def test_matches_diffusers(name):
    oracle = ORACLES_BY_NAME[name]
    ours, theirs, _ = run_oracle(oracle)
    assert torch.isfinite(theirs).all()
    assert rel_diff(ours, theirs) < ORACLE_TOL


@pytest.mark.parametrize("name", [o.name for o in ORACLES
                                  if o.dtype == torch.float64 and o.family != "DPMSolverMultistepScheduler"])
def test_matches_diffusers_float64_tables(name):
    """With diffusers' schedule tables in float64 the remaining difference is round-off: the update formulas are
    the same term by term, and the noise draws are the same."""
    ours, theirs, _ = run_oracle(ORACLES_BY_NAME[name], tables="float64")
    assert rel_diff(ours, theirs) < FLOAT64_TABLES_TOL


@pytest.mark.parametrize("name, wrong", [
    ("multistep-2M-midpoint-epsilon", lambda: dp.get_solver("dpmsolver++", order=2, solver_type="taylor")),
    ("multistep-2M-heun", lambda: dp.get_solver("dpmsolver++", order=2, solver_type="dpmsolver")),
    ("multistep-3M-epsilon", MS2),
    ("multistep-noise-2M-midpoint", MS2),
    ("singlestep-2S-midpoint-epsilon", MS2),
    ("ddim-eta1-generator", lambda: dp.DDIM(eta=0.5)),
])
def test_oracle_tolerance_discriminates(name, wrong):
    """The tolerance is meaningful: a neighbouring configuration misses the oracle by orders of magnitude."""
    ours, theirs, _ = run_oracle(ORACLES_BY_NAME[name], solver=wrong())
    assert rel_diff(ours, theirs) > 100 * ORACLE_TOL


def test_sde_noise_is_really_shared():
    """Another seed on our side gives an O(1) difference, so the SDE matches above are not noise-free by accident."""
    oracle = ORACLES_BY_NAME["multistep-sde-2-midpoint-variance-noise"]
    _, theirs, _ = run_oracle(oracle)
    ours_other_seed, _, _ = run_oracle(oracle, seed=8)
    assert rel_diff(ours_other_seed, theirs) > 0.1


class _MidpointIntermediateSinglestep(dp.DPMSolverSinglestep):
    """dpmsolve's singlestep solver with diffusers' choice for order 3: the 2nd-order step to the intermediate
    point s2 uses ``solver_type`` (midpoint) instead of the reference's Taylor form."""

    def _stages(self, steps):
        return [(anchor, points, self.rule if len(points) >= 2 else rule, completes)
                for anchor, points, rule, completes in super()._stages(steps)]


@pytest.mark.parametrize("algorithm_type, predict", [("dpmsolver++", "data"), ("dpmsolver", "noise")])
def test_singlestep_3_midpoint_differs_only_in_the_intermediate_stage(algorithm_type, predict):
    """diffusers' 3S 'midpoint' != DPM-Solver-3 of the paper / reference code, and the difference is exactly the
    rule of the intermediate stage: with that one change our solver reproduces diffusers to round-off."""
    oracle = Oracle(f"singlestep-3S-midpoint-{predict}",
                    singlestep(solver_order=3, solver_type="midpoint", algorithm_type=algorithm_type),
                    lambda: dp.DPMSolverSinglestep(order=3, predict=predict, solver_type="dpmsolver", split="fixed"),
                    steps=18)
    ours, theirs, _ = run_oracle(oracle)
    assert rel_diff(ours, theirs) > 1e-3  # reference DPM-Solver-3 (Taylor intermediate) vs diffusers
    variant = _MidpointIntermediateSinglestep(order=3, predict=predict, solver_type="dpmsolver", split="fixed")
    assert variant._stages(6)[1][2] is Rule.DPMSOLVER  # the intermediate stage now uses the block's rule
    for tables, tol in (("float32", ORACLE_TOL), ("float64", FLOAT64_TABLES_TOL)):
        ours, theirs, _ = run_oracle(oracle, tables=tables, solver=variant)
        assert rel_diff(ours, theirs) < tol


def test_network_is_the_lab_mixture_denoiser():
    """The oracle network is the lab's exact mixture posterior (only normalised differently)."""
    y = 3.0 * torch.randn(32, PROBLEM.dim, generator=torch.Generator().manual_seed(1))
    for rho in (0.01, 0.5, 20.0):
        assert torch.allclose(mixture_posterior_mean(y, rho), PROBLEM.posterior_mean(y, rho), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("order, lower_order_final, steps", [(2, True, 10), (3, True, 10), (3, False, 10),
                                                            (3, True, 16)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_matches_diffusers_ending_at_sigma_zero(order, lower_order_final, steps, prediction):
    """final_sigmas_type='zero': diffusers' last step is the first-order jump to sigma = 0 and its
    lower_order_final (below 15 steps) lowers the step before it; ours with a grid ending at t = 0 does the same."""
    sched = multistep(final_sigmas_type="zero", lower_order_final=lower_order_final, solver_order=order)(
        prediction_type=prediction)
    sched.set_timesteps(steps)
    schedule = dp.DiscreteVP.from_alphas_cumprod(sched.alphas_cumprod.numpy())
    net = network(schedule, prediction)
    x = x_start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x).prev_sample
    grid = np.append((sched.timesteps.numpy() + 1.0) / N_TRAIN, 0.0)
    solver = dp.DPMSolverMultistep(order=order, solver_type="dpmsolver", warmup="lower_order",
                                   lower_order_final=lower_order_final and steps < 15)
    ours = dp.sample(dp.wrap_model(net, schedule, prediction=prediction, time_input="discrete"), x_start, solver,
                     grid=grid, progress=False)
    assert ours.nfe == steps
    assert rel_diff(ours.x, x) < 1e-5
