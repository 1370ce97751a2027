"""The bad-input catalogue: one parametrised table of bad calls to every public entry point.

Each row is ``(case id, a zero-argument callable making the bad call, the exception type it must raise, the words
its message must contain)`` (case-insensitive; normally the argument's name and the bad value, plus words naming
the fix where sensible). Command-line rows expect ``SystemExit`` with a non-zero code and a one-line error on
stderr (argparse's usage lines apart) without a traceback; their words are checked against that line.

Rows marked ``xfail(strict=True)`` are the hardening to-do list: the current code returns silently, crashes with
an unhelpful error, or leaves the argument / bad value out of its message. When a fix lands, the row xpasses,
strict xfail turns that into a failure, and the mark is removed. Types: ValueError for bad values, TypeError for
wrong types, dpmsolve's own types (EMSError, PlanError: both ValueErrors) where they exist.

tests/test_errors.py holds the first, hand-written error tests; rows here use other bad values for the same API.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve.ems import EMS, EMSError
from dpmsolve.lab import GaussianData

try:
    from dpmsolve.integrations import diffusers as dpm_diffusers
except ImportError:  # pragma: no cover - diffusers is a test extra
    dpm_diffusers = None
from dpmsolve.integrations import kdiffusion as kd

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------- helpers

def ok(case_id, call, expected, words):
    """A row the current code already satisfies."""
    return pytest.param(call, expected, tuple(words), id=case_id)


def todo(case_id, call, expected, words, now):
    """A row pending hardening: ``now`` says what the current code does instead."""
    return pytest.param(call, expected, tuple(words), id=case_id,
                        marks=pytest.mark.xfail(strict=True, reason=f"pending hardening: {now}"))


SCHED = dp.LinearVP()
GAUSS = GaussianData([0.5, -0.3], [0.09, 0.5])
DEN = GAUSS.denoiser(SCHED)


def X(*shape, dtype=torch.float64):
    return torch.randn(shape or (2, 2), generator=torch.Generator().manual_seed(0), dtype=dtype)


def eps_net(schedule=SCHED, var=0.25):
    """A closure network: the exact noise prediction of zero-mean Gaussian data N(0, var I), continuous time."""
    def net(x, t, **kwargs):
        tt = t.detach().cpu().double().numpy()
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = torch.as_tensor(schedule.alpha(tt), dtype=x.dtype).reshape(shape)
        s = torch.as_tensor(schedule.sigma(tt), dtype=x.dtype).reshape(shape)
        return s * x / (var * a * a + s * s)
    return net


def wrapped(net=None, **options):
    return dp.wrap_model(eps_net() if net is None else net, SCHED, **options)


def run(den, x=None, solver="dpmsolver++", **kwargs):
    kwargs.setdefault("progress", False)
    if "grid" not in kwargs:
        kwargs.setdefault("steps", 3)
    return dp.sample(den, X() if x is None else x, solver, **kwargs)


def inv(x=None, solver="dpmsolver++", **kwargs):
    kwargs.setdefault("progress", False)
    if "grid" not in kwargs:
        kwargs.setdefault("steps", 3)
    return dp.invert(DEN, X() if x is None else x, solver, **kwargs)


@functools.lru_cache(maxsize=None)
def tmp() -> Path:
    path = Path(tempfile.mkdtemp(prefix="dpmsolve-catalogue-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def plan(schedule=SCHED, n=3, **fields):
    return dp.Plan.multistep(tuple(dp.make_grid(schedule, n)), schedule=schedule.fingerprint(), **fields)


def plan_file(name: str, data) -> str:
    """A file holding ``data`` (text as is, anything else as JSON)."""
    path = tmp() / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def plan_dict(**changes):
    data = plan().to_dict()
    data.update(changes)
    return data


def without(mapping: dict, key):
    return {k: v for k, v in mapping.items() if k != key}


def ems(schedule=SCHED, shape=(2,), stat=None, **fields):
    lam = np.linspace(*schedule.log_snr_range, 5)
    rows = (lam.size,) + (shape if stat is None else stat)
    return EMS(lam, np.ones(rows), np.zeros(rows), np.zeros(rows), shape, schedule.fingerprint(),
               **{"model": "catalogue", **fields})


def ems_file(name: str, *, metadata=None, drop=(), schedule=SCHED, shape=(2,), stat=None) -> str:
    """An EMS file, optionally with metadata overridden and arrays left out."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp() / name
    ems(schedule, shape, stat).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        arrays = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    meta.update(metadata or {})
    save_file(arrays, str(path), metadata=meta)
    return str(path)


def raw_file(name: str, content: bytes) -> str:
    path = tmp() / name
    path.write_bytes(content)
    return str(path)


def safetensors_without_metadata() -> str:
    from safetensors.torch import save_file

    path = tmp() / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    return str(path)


SHIPPED_EMS = Path(dp.__file__).parent / "zoo" / "weights" / "digits-cfg3.ems.safetensors"


def nan_net(x, t):
    return torch.full_like(x, NAN)


def cfg(scale=3.0, cond=None, uncond=None, net=None):
    net = wrapped(net or (lambda x, t, y: eps_net()(x, t)))
    cond = {"y": torch.ones(2)} if cond is None else cond
    uncond = {"y": torch.zeros(2)} if uncond is None else uncond
    return dp.ClassifierFreeGuidance(net, scale, cond=cond, uncond=uncond)


def classifier_guided(log_prob, scale=1.0):
    return dp.ClassifierGuidance(DEN, log_prob, scale)


# ------------------------------------------------------------------------------------ diffusers helpers

def scheduler(**config):
    return dpm_diffusers.DPMSolveScheduler(**config)


def stepped(model_output_shape=(2, 4), sample_shape=(2, 4), timestep=None, steps=5):
    sch = scheduler()
    sch.set_timesteps(steps)
    t = sch.timesteps[0] if timestep is None else timestep
    return sch.step(torch.randn(model_output_shape), t, torch.randn(sample_shape))


def step_past_the_end():
    sch = scheduler()
    sch.set_timesteps(2)
    x = torch.randn(2, 4)
    for t in sch.timesteps:
        x = sch.step(torch.zeros_like(x), t, x).prev_sample
    return sch.step(torch.zeros_like(x), sch.timesteps[-1], x)


def noised(timesteps, noise_shape=(2, 4)):
    sch = scheduler()
    return sch.add_noise(torch.randn(2, 4), torch.randn(noise_shape), torch.tensor(timesteps))


def from_config(**changes):
    config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
              "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_order": 2,
              "_class_name": "DPMSolverMultistepScheduler"}
    config.update(changes)
    return dpm_diffusers.DPMSolveScheduler.from_config(config)


needs_diffusers = pytest.mark.skipif(dpm_diffusers is None, reason="diffusers is not installed")


def D(case_id, call, expected, words, now=None):
    """A diffusers row (skipped without diffusers)."""
    marks = [needs_diffusers]
    if now is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=f"pending hardening: {now}"))
    return pytest.param(call, expected, tuple(words), id=case_id, marks=marks)


# ------------------------------------------------------------------------------------ k-diffusion helpers

def k_model(x, sigma, **kwargs):
    """A VE denoiser returning x0 = 0 (enough to drive the samplers)."""
    return torch.zeros_like(x)


def k_sample(sigmas, x=None, sampler=kd.sample_dpmpp_2m, **options):
    return sampler(k_model, X() * 10 if x is None else x, torch.as_tensor(sigmas, dtype=torch.float64),
                   disable=True, **options)


# ------------------------------------------------------------------------------------------ CLI helpers

def cli(*args):
    from dpmsolve.cli import main

    return lambda: main(list(args))


def out_dir(name="out") -> str:
    return str(tmp() / name)


def a_file() -> str:
    return raw_file("a-file.txt", b"not a folder")


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ===================================================================================================== table

CASES = [
    # ------------------------------------------------------------------------------------- sample: solver
    ok("sample-solver-unknown", lambda: run(DEN, solver="dpmsolver+++"), ValueError, ["dpmsolver+++", "valid"]),
    ok("sample-solver-wrong-case", lambda: run(DEN, solver="DDIM"), ValueError, ["'DDIM'", "ddim", "valid"]),
    ok("sample-solver-empty", lambda: run(DEN, solver=""), ValueError, ["solver ''", "valid"]),
    ok("sample-solver-float", lambda: run(DEN, solver=3.5), TypeError, ["solver", "float"]),
    # ------------------------------------------------------------------------------------- sample: steps
    ok("sample-steps-0-ddim", lambda: run(DEN, solver="ddim", steps=0), ValueError, ["steps", "0", ">= 1"]),
    ok("sample-steps-minus-1", lambda: run(DEN, steps=-1), ValueError, ["steps", "-1"]),
    ok("sample-steps-2.5", lambda: run(DEN, steps=2.5), ValueError, ["steps", "2.5"]),
    ok("sample-steps-True", lambda: run(DEN, steps=True), TypeError, ["steps", "true"]),
    ok("sample-steps-str", lambda: run(DEN, steps="10"), TypeError, ["steps", "'10'"]),
    ok("sample-steps-numpy-float", lambda: run(DEN, steps=np.float64(4.0)), ValueError, ["steps", "4.0"]),
    # ------------------------------------------------------------------------------------- sample: order
    ok("sample-order-0-unipc", lambda: run(DEN, solver="unipc", order=0), ValueError, ["order", "0", "1, 2, 3"]),
    ok("sample-order-4-dpmsolver", lambda: run(DEN, solver="dpmsolver", order=4), ValueError, ["order", "4"]),
    ok("sample-order-2.5-unipc", lambda: run(DEN, solver="unipc", order=2.5), ValueError, ["order", "2.5"]),
    ok("sample-order-str", lambda: run(DEN, order="2"), TypeError, ["order", "'2'"]),
    ok("sample-order-negative-singlestep", lambda: run(DEN, method="singlestep", order=-2), ValueError,
       ["order", "-2"]),
    # ------------------------------------------------------------------------------------- sample: grids
    ok("sample-grid-unknown", lambda: run(DEN, grid="uniform"), ValueError, ["grid", "uniform", "logsnr"]),
    ok("sample-grid-karras-rho-0", lambda: run(DEN, grid="karras", grid_options={"rho": 0}), ValueError,
       ["rho", "0"]),
    ok("sample-grid-time-power-negative", lambda: run(DEN, grid="time_power", grid_options={"power": -1.0}),
       ValueError, ["power", "-1"]),
    ok("sample-grid-flow-shift-0", lambda: run(DEN, grid="flow_shift", grid_options={"shift": 0.0}), ValueError,
       ["shift", "0"]),
    ok("sample-grid-unknown-option", lambda: run(DEN, grid="karras", grid_options={"sigma": 1.0}), ValueError,
       ["sigma", "rho"]),
    ok("sample-grid-options-not-a-mapping", lambda: run(DEN, grid="karras", grid_options="rho=7"), TypeError,
       ["grid_options", "str"]),
    ok("sample-grid-int", lambda: run(DEN, grid=5, steps=None), TypeError, ["grid", "int"]),
    ok("sample-grid-2d", lambda: run(DEN, grid=[[1.0, 0.5], [0.2, 0.1]]), ValueError, ["grid", "shape"]),
    ok("sample-grid-zigzag-to-zero", lambda: run(DEN, grid=[1.0, 0.2, 0.5, 0.0]), ValueError,
       ["decreasing", "0.5"]),
    # ------------------------------------------------------------------------------------- sample: t range
    ok("sample-t_start-above-t_max", lambda: run(DEN, t_start=1.5), ValueError, ["t_start", "1.5"]),
    ok("sample-t_end-negative", lambda: run(DEN, t_end=-0.5), ValueError, ["t_end", "-0.5"]),
    ok("sample-t_start-t_end-reversed", lambda: run(DEN, t_start=0.1, t_end=0.5), ValueError,
       ["t_start", "t_end", "0.1", "0.5", "decreasing"]),
    ok("sample-t_start-equals-t_end", lambda: run(DEN, t_start=0.5, t_end=0.5), ValueError,
       ["t_start", "t_end", "0.5"]),
    ok("sample-t_start-nan", lambda: run(DEN, t_start=NAN), ValueError, ["t_start", "nan", "t_max"]),
    ok("sample-t_end-inf", lambda: run(DEN, t_end=INF), ValueError, ["t_end", "inf", "t_min"]),
    # ------------------------------------------------------------------------------------- sample: x_T
    ok("sample-x-nan", lambda: run(DEN, x=X().index_fill(0, torch.tensor([1]), NAN)), ValueError, ["x", "nan"]),
    ok("sample-x-inf", lambda: run(DEN, x=torch.tensor([[INF, 0.0], [0.0, 1.0]])), ValueError, ["x", "inf"]),
    ok("sample-x-int32", lambda: run(DEN, x=torch.ones(2, 2, dtype=torch.int32)), TypeError, ["x", "int32"]),
    ok("sample-x-bool", lambda: run(DEN, x=torch.ones(2, 2, dtype=torch.bool)), TypeError, ["x", "bool"]),
    ok("sample-x-complex", lambda: run(DEN, x=torch.ones(2, 2, dtype=torch.complex64)), TypeError,
       ["x", "complex64"]),
    ok("sample-x-numpy", lambda: run(DEN, x=np.zeros((2, 2))), TypeError, ["x", "ndarray"]),
    ok("sample-x-list", lambda: run(DEN, x=[[0.0, 1.0]]), TypeError, ["x", "list"]),
    ok("sample-x-0-dim", lambda: run(DEN, x=torch.tensor(1.0)), ValueError, ["x", "batch"]),
    # ------------------------------------------------------------------------------------- sample: options
    ok("sample-callback-int", lambda: run(DEN, callback=5), TypeError, ["callback", "int"]),
    ok("sample-callback-str", lambda: run(DEN, callback="print"), TypeError, ["callback", "str"]),
    ok("sample-model_kwargs-list", lambda: run(DEN, model_kwargs=[("y", 1)]), TypeError, ["model_kwargs", "list"]),
    ok("sample-model_kwargs-str", lambda: run(DEN, model_kwargs="y"), TypeError, ["model_kwargs", "str"]),
    ok("sample-plan-with-steps", lambda: run(DEN, solver=plan(), steps=5), ValueError, ["plan", "steps"]),
    ok("sample-plan-with-grid", lambda: run(DEN, solver=plan(), steps=None, grid="karras"), ValueError,
       ["plan", "grid"]),
    ok("sample-plan-with-order", lambda: run(DEN, solver=plan(), steps=None, order=3), ValueError,
       ["plan", "order"]),
    ok("sample-adaptive-with-steps", lambda: run(DEN, method="adaptive", steps=10), ValueError,
       ["steps", "adaptive"]),
    ok("sample-adaptive-rtol-negative", lambda: run(DEN, method="adaptive", rtol=-1e-5), ValueError,
       ["rtol", "-1e-05"]),
    ok("sample-adaptive-atol-0", lambda: run(DEN, method="adaptive", atol=0), ValueError, ["atol", "0"]),
    ok("sample-adaptive-rtol-nan", lambda: run(DEN, method="adaptive", rtol=NAN), ValueError, ["rtol", "nan"]),
    ok("sample-adaptive-rtol-str", lambda: run(DEN, method="adaptive", rtol="1e-3"), TypeError, ["rtol", "str"]),
    ok("sample-seed-str", lambda: run(DEN, solver="sde-dpmsolver++", seed="abc"), TypeError, ["seed", "str"]),
    ok("sample-unipc-unknown-option", lambda: run(DEN, solver="unipc", orders=(1, 2)), ValueError,
       ["orders", "order"]),
    ok("sample-unipc-variant", lambda: run(DEN, solver="unipc", variant="bh3"), ValueError, ["variant", "bh3"]),
    ok("sample-solver_type-case", lambda: run(DEN, solver_type="Taylor"), ValueError, ["solver_type", "Taylor"]),
    ok("sample-sde-eta-inf", lambda: run(DEN, solver="sde-dpmsolver++", eta=INF), ValueError, ["eta", "inf"]),
    ok("sample-denoiser-none", lambda: run(None), TypeError, ["denoiser", "nonetype"]),
    ok("sample-model-returns-nan", lambda: run(wrapped(nan_net)), dp.NonFiniteError,
       ["nan", "step 1", "check_finite"]),
    ok("sample-v3-without-ems", lambda: run(DEN, solver="dpmsolver-v3"), EMSError, ["ems"]),
    # ------------------------------------------------------------------------------------------- invert
    ok("invert-steps-minus-1", lambda: inv(steps=-1), ValueError, ["steps", "-1"]),
    ok("invert-increasing-grid", lambda: inv(grid=[0.1, 0.5, 1.0]), ValueError, ["grid", "decreasing"]),
    ok("invert-x0-nan", lambda: inv(x=torch.full((2, 2), NAN)), ValueError, ["x0", "nan"]),
    ok("invert-x0-int", lambda: inv(x=torch.ones(2, 2, dtype=torch.int64)), TypeError, ["x0", "int64"]),
    ok("invert-t_start-above", lambda: inv(t_start=5.0), ValueError, ["t_start", "5"]),
    ok("invert-order-5", lambda: inv(order=5), ValueError, ["order", "5"]),
    ok("invert-plan", lambda: inv(solver=plan(), steps=None), ValueError, ["plan"]),
    ok("invert-callback-int", lambda: inv(callback=1), TypeError, ["callback", "int"]),
    # ---------------------------------------------------------------------------------------- get_solver
    ok("get_solver-unknown", lambda: dp.get_solver("euler_a"), ValueError, ["euler_a", "valid", "dpmsolver++"]),
    ok("get_solver-none", lambda: dp.get_solver(None), TypeError, ["none"]),
    ok("get_solver-order-negative", lambda: dp.get_solver("dpmsolver++", order=-1), ValueError, ["order", "-1"]),
    ok("get_solver-unipc-order-4", lambda: dp.get_solver("unipc", order=4), ValueError, ["order", "4"]),
    ok("get_solver-sde-order-0", lambda: dp.get_solver("sde-dpmsolver++", order=0), ValueError, ["order", "0"]),
    ok("get_solver-method-case", lambda: dp.get_solver("dpmsolver++", method="Adaptive"), ValueError,
       ["method", "Adaptive", "adaptive"]),
    ok("get_solver-ddim-eta-1.5", lambda: dp.get_solver("ddim", eta=1.5), ValueError, ["eta", "1.5"]),
    ok("get_solver-v3-ems-int", lambda: dp.get_solver("dpmsolver-v3", ems=5), TypeError, ["ems", "int"]),
    ok("get_solver-v3-ems-missing-file", lambda: dp.get_solver("dpmsolver-v3", ems=str(tmp() / "none.ems")),
       EMSError, ["none.ems"]),
    ok("get_solver-singlestep-orders-0", lambda: dp.get_solver("dpmsolver", method="singlestep", orders=(2, 0)),
       ValueError, ["orders", "0"]),
    ok("get_solver-unipc-corrector-str", lambda: dp.get_solver("unipc", corrector="yes"), ValueError,
       ["corrector", "yes"]),
    ok("get_solver-warmup", lambda: dp.get_solver("dpmsolver++", warmup="none"), ValueError, ["warmup", "none"]),
    ok("get_solver-split", lambda: dp.get_solver("dpmsolver++", method="singlestep", split="slow"), ValueError,
       ["split", "slow"]),
    ok("get_solver-disable_corrector-negative", lambda: dp.get_solver("dpmsolver++", disable_corrector=[-1]),
       ValueError, ["disable_corrector", "-1"]),
    ok("get_solver-corrector-unknown", lambda: dp.get_solver("dpmsolver++", corrector="unic-bh3"), ValueError,
       ["corrector", "unic-bh3"]),
    ok("get_solver-adaptive-theta-1.5", lambda: dp.get_solver("dpmsolver++", method="adaptive", theta=1.5),
       ValueError, ["theta", "1.5"]),
    ok("get_solver-adaptive-h_init-negative", lambda: dp.get_solver("dpmsolver++", method="adaptive",
                                                                    h_init=-0.1),
       ValueError, ["h_init", "-0.1"]),
    ok("get_solver-v3-half", lambda: dp.get_solver("dpmsolver-v3", ems="degenerate", half="middle"), ValueError,
       ["half", "middle"]),
    # --------------------------------------------------------------------------------- make_grid, check_grid
    ok("make_grid-n-minus-2", lambda: dp.make_grid(SCHED, -2), ValueError, ["steps", "-2"]),
    ok("make_grid-n-float", lambda: dp.make_grid(SCHED, 3.0), ValueError, ["steps", "3.0"]),
    ok("make_grid-kind-case", lambda: dp.make_grid(SCHED, 5, "Karras"), ValueError, ["grid", "Karras", "karras"]),
    ok("make_grid-karras-rho-negative", lambda: dp.make_grid(SCHED, 5, "karras", rho=-7), ValueError,
       ["rho", "-7"]),
    ok("make_grid-karras-rho-nan", lambda: dp.make_grid(SCHED, 5, "karras", rho=NAN), ValueError, ["rho", "nan"]),
    ok("make_grid-time_power-0", lambda: dp.make_grid(SCHED, 5, "time_power", power=0), ValueError,
       ["power", "0"]),
    ok("make_grid-time_power-inf", lambda: dp.make_grid(SCHED, 5, "time_power", power=INF), ValueError,
       ["power", "inf"]),
    ok("make_grid-flow_shift-negative", lambda: dp.make_grid(SCHED, 5, "flow_shift", shift=-1), ValueError,
       ["shift", "-1"]),
    ok("make_grid-logSNR-option", lambda: dp.make_grid(SCHED, 5, "logSNR", rho=7), ValueError, ["rho", "none"]),
    ok("make_grid-t-reversed", lambda: dp.make_grid(SCHED, 5, t_start=0.5, t_end=0.9), ValueError,
       ["t_start", "t_end", "decreasing"]),
    ok("make_grid-t_end-equals-t_max", lambda: dp.make_grid(SCHED, 5, t_end=1.0), ValueError, ["t_start", "t_end"]),
    ok("make_grid-t_end-nan", lambda: dp.make_grid(SCHED, 5, t_end=NAN), ValueError, ["t_end", "nan"]),
    ok("make_grid-t_end-negative", lambda: dp.make_grid(SCHED, 5, t_end=-0.1), ValueError, ["t_end", "-0.1"]),
    ok("make_grid-schedule-str", lambda: dp.make_grid("linear", 5), TypeError, ["schedule", "str"]),
    ok("check_grid-not-decreasing", lambda: dp.check_grid(SCHED, [0.9, 0.5, 0.7]), ValueError,
       ["decreasing", "0.7"]),
    ok("check_grid-nan", lambda: dp.check_grid(SCHED, [1.0, NAN]), ValueError, ["nan"]),
    ok("check_grid-inf", lambda: dp.check_grid(SCHED, [INF, 0.5]), ValueError, ["inf"]),
    ok("check_grid-above-range", lambda: dp.check_grid(SCHED, [2.0, 0.5]), ValueError, ["range", "2"]),
    ok("check_grid-one-time", lambda: dp.check_grid(SCHED, [1.0]), ValueError, ["at least 2", "1"]),
    ok("check_grid-empty", lambda: dp.check_grid(SCHED, []), ValueError, ["at least 2", "0"]),
    ok("check_grid-to-zero-below-t_min", lambda: dp.check_grid(SCHED, [1.0, 0.0005, 0.0]), ValueError,
       ["range", "0.0005"]),
    ok("check_grid-2d", lambda: dp.check_grid(SCHED, [[1.0, 0.5], [0.2, 0.1]]), ValueError, ["shape"]),
    ok("check_grid-increasing-wanted", lambda: dp.check_grid(SCHED, [0.5, 0.1], increasing=True), ValueError,
       ["increasing"]),
    ok("check_grid-strings", lambda: dp.check_grid(SCHED, ["a", "b"]), TypeError, ["str"]),
    # ---------------------------------------------------------------------------------------- schedules
    ok("LinearVP-beta_0-negative", lambda: dp.LinearVP(beta_0=-0.5), ValueError, ["beta_0", "-0.5"]),
    ok("LinearVP-betas-reversed", lambda: dp.LinearVP(beta_0=25.0, beta_1=20.0), ValueError,
       ["beta_0", "beta_1", "25", "20"]),
    ok("LinearVP-beta_1-nan", lambda: dp.LinearVP(beta_1=NAN), ValueError, ["beta_1", "nan"]),
    ok("LinearVP-t_min-negative", lambda: dp.LinearVP(t_min=-0.01), ValueError, ["t_min", "-0.01"]),
    ok("LinearVP-t_min-equals-t_max", lambda: dp.LinearVP(t_min=0.5, t_max=0.5), ValueError,
       ["t_min", "t_max", "0.5"]),
    ok("LinearVP-beta_0-str", lambda: dp.LinearVP(beta_0="0.1"), TypeError, ["beta_0", "str"]),
    ok("CosineVP-s-0", lambda: dp.CosineVP(s=0.0), ValueError, ["CosineVP", "s", "0.0"]),
    ok("CosineVP-s-negative", lambda: dp.CosineVP(s=-0.5), ValueError, ["CosineVP", "-0.5"]),
    ok("CosineVP-s-nan", lambda: dp.CosineVP(s=NAN), ValueError, ["CosineVP", "nan"]),
    ok("CosineVP-t_max-above-1", lambda: dp.CosineVP(t_max=1.2), ValueError, ["t_max", "1.2"]),
    ok("CosineVP-t_min-above-t_max", lambda: dp.CosineVP(t_min=0.6, t_max=0.5), ValueError, ["t_min", "0.6"]),
    ok("EDM-sigma_min-negative", lambda: dp.EDM(sigma_min=-1.0), ValueError, ["sigma_min", "-1"]),
    ok("EDM-sigmas-reversed", lambda: dp.EDM(sigma_min=10.0, sigma_max=5.0), ValueError,
       ["sigma_min", "sigma_max", "10", "5"]),
    ok("EDM-sigma_max-inf", lambda: dp.EDM(sigma_max=INF), ValueError, ["sigma_max", "inf"]),
    ok("EDM-sigma_min-nan", lambda: dp.EDM(sigma_min=NAN), ValueError, ["sigma_min", "nan"]),
    ok("RectifiedFlow-t_max-1", lambda: dp.RectifiedFlow(t_max=1.0), ValueError, ["t_max", "1.0"]),
    ok("RectifiedFlow-t_min-0", lambda: dp.RectifiedFlow(t_min=0.0), ValueError, ["t_min", "0.0"]),
    ok("RectifiedFlow-t-reversed", lambda: dp.RectifiedFlow(t_min=0.7, t_max=0.3), ValueError,
       ["t_min", "t_max", "0.7", "0.3"]),
    ok("DiscreteVP-no-betas", lambda: dp.DiscreteVP.from_betas([]), ValueError, ["train steps", "0"]),
    ok("DiscreteVP-linear-n-1", lambda: dp.DiscreteVP.linear(n=1), ValueError, ["train steps", "1"]),
    ok("DiscreteVP-betas-inf", lambda: dp.DiscreteVP.from_betas([0.02, INF]), ValueError, ["betas", "inf"]),
    ok("DiscreteVP-alphas_cumprod-nan", lambda: dp.DiscreteVP.from_alphas_cumprod([0.9, 0.5, NAN]), ValueError,
       ["alphas_cumprod", "nan"]),
    ok("DiscreteVP-alphas_cumprod-2d", lambda: dp.DiscreteVP.from_alphas_cumprod([[0.9, 0.5], [0.3, 0.1]]),
       ValueError, ["alphas_cumprod", "shape"]),
    ok("DiscreteVP-linear-beta_end-above-1", lambda: dp.DiscreteVP.linear(beta_end=1.5), ValueError,
       ["beta", "1.5"]),
    ok("DiscreteVP-scaled_linear-beta_start-negative", lambda: dp.DiscreteVP.scaled_linear(beta_start=-0.1),
       ValueError, ["beta_start", "-0.1"]),
    # --------------------------------------------------------------------------------------- wrap_model
    ok("wrap_model-prediction-unknown", lambda: wrapped(prediction="epsilon2"), ValueError,
       ["prediction", "epsilon2", "valid"]),
    ok("wrap_model-prediction-case", lambda: wrapped(prediction="V"), ValueError, ["prediction", "'V'"]),
    ok("wrap_model-time_input-case", lambda: wrapped(time_input="Continuous"), ValueError,
       ["time_input", "Continuous", "continuous"]),
    ok("wrap_model-time_input-int", lambda: wrapped(time_input=5), TypeError, ["time_input", "int"]),
    ok("wrap_model-schedule-str", lambda: dp.wrap_model(eps_net(), "linear"), TypeError, ["schedule", "str"]),
    ok("wrap_model-net-none", lambda: dp.wrap_model(None, SCHED), TypeError, ["net", "nonetype"]),
    ok("wrap_model-net-str", lambda: dp.wrap_model("model.pt", SCHED), TypeError, ["net", "str"]),
    ok("wrap_model-model_kwargs-int", lambda: wrapped(model_kwargs=5), TypeError, ["model_kwargs", "int"]),
    ok("wrap_model-input_dtype-str", lambda: wrapped(input_dtype="float16"), TypeError, ["input_dtype", "str"]),
    ok("net-returns-none", lambda: run(wrapped(lambda x, t: None)), TypeError, ["returned", "nonetype"]),
    ok("net-returns-numpy", lambda: run(wrapped(lambda x, t: x.numpy())), TypeError, ["returned", "ndarray"]),
    ok("net-returns-dict", lambda: run(wrapped(lambda x, t: {"eps": x})), TypeError, ["returned", "dict"]),
    ok("net-returns-float", lambda: run(wrapped(lambda x, t: 0.0)), TypeError, ["returned", "float"]),
    ok("net-returns-transposed", lambda: run(wrapped(lambda x, t: x.T.contiguous()), x=X(2, 3)), ValueError,
       ["shape", "(3, 2)", "(2, 3)"]),
    ok("wrap_model-time_input-callable-returns-none", lambda: run(wrapped(time_input=lambda t: None)), TypeError,
       ["time_input", "nonetype"]),
    # ----------------------------------------------------------------------------------------- guidance
    ok("cfg-cond-batch-mismatch", lambda: run(cfg(cond={"y": torch.ones(3)}, uncond={"y": torch.zeros(3)})),
       ValueError, ["batch", "3", "2"]),
    ok("cfg-cond-uncond-batch-mismatch", lambda: cfg(cond={"y": torch.ones(2)}, uncond={"y": torch.zeros(3)}),
       ValueError, ["cond", "uncond", "2", "3"]),
    ok("cfg-scale-negative", lambda: cfg(scale=-1.0), ValueError, ["scale", "-1"]),
    ok("cfg-scale-nan", lambda: cfg(scale=NAN), ValueError, ["scale", "nan"]),
    ok("cfg-scale-inf", lambda: cfg(scale=INF), ValueError, ["scale", "inf"]),
    ok("cfg-cond-tensor", lambda: cfg(cond=torch.ones(2)), TypeError, ["cond", "tensor"]),
    ok("cfg-inner-callable", lambda: dp.ClassifierFreeGuidance(eps_net(), 3.0, {}, {}), TypeError,
       ["denoiser", "function"]),
    ok("classifier-log_prob-ignores-x", lambda: run(classifier_guided(lambda x, t: torch.zeros(x.shape[0]))),
       ValueError, ["log_prob", "depend"]),
    ok("classifier-log_prob-detached", lambda: run(classifier_guided(lambda x, t: x.detach().sum(1))),
       ValueError, ["log_prob", "depend"]),
    ok("classifier-log_prob-returns-none", lambda: run(classifier_guided(lambda x, t: None)), TypeError,
       ["log_prob", "nonetype"]),
    ok("classifier-log_prob-not-callable", lambda: classifier_guided(5), TypeError, ["log_prob", "int"]),
    ok("classifier-scale-nan", lambda: classifier_guided(lambda x, t: x.sum(1), scale=NAN), ValueError,
       ["scale", "nan"]),
    ok("DynamicThresholding-ratio-above-1", lambda: dp.DynamicThresholding(DEN, ratio=1.5), ValueError,
       ["ratio", "1.5"]),
    ok("DynamicThresholding-ratio-negative", lambda: dp.DynamicThresholding(DEN, ratio=-0.1), ValueError,
       ["ratio", "-0.1"]),
    ok("DynamicThresholding-ratio-nan", lambda: dp.DynamicThresholding(DEN, ratio=NAN), ValueError,
       ["ratio", "nan"]),
    ok("DynamicThresholding-max_value-negative", lambda: dp.DynamicThresholding(DEN, max_value=-2.0), ValueError,
       ["max_value", "-2"]),
    ok("ClipX0-reversed", lambda: dp.ClipX0(DEN, min_value=2.0, max_value=-2.0), ValueError,
       ["min_value", "max_value", "2.0", "-2.0"]),
    ok("ClipX0-equal", lambda: dp.ClipX0(DEN, min_value=0.5, max_value=0.5), ValueError, ["min_value", "0.5"]),
    ok("ClipX0-max_value-nan", lambda: dp.ClipX0(DEN, max_value=NAN), ValueError, ["max_value", "nan"]),
    # ---------------------------------------------------------------------------------------------- ems
    ok("ems-load-missing", lambda: dp.ems.load(tmp() / "missing.ems.safetensors"), EMSError,
       ["no ems file", "missing.ems.safetensors"]),
    ok("ems-load-garbage", lambda: dp.ems.load(raw_file("garbage.safetensors", b"\x00not safetensors")), EMSError,
       ["garbage.safetensors", "not a readable"]),
    ok("ems-load-foreign-safetensors", lambda: dp.ems.load(safetensors_without_metadata()), EMSError,
       ["plain.safetensors", "dpmsolve-ems"]),
    ok("ems-load-future-version", lambda: dp.ems.load(ems_file("v99.ems", metadata={"version": "99"})), EMSError,
       ["version", "99", "upgrade"]),
    ok("ems-load-version-not-a-number", lambda: dp.ems.load(ems_file("vx.ems", metadata={"version": "x"})),
       EMSError, ["version", "'x'"]),
    ok("ems-load-missing-array", lambda: dp.ems.load(ems_file("nob.ems", drop=("b",))), EMSError, ["'b'", "damaged"]),
    ok("ems-load-damaged-metadata", lambda: dp.ems.load(ems_file("meta.ems", metadata={"data_shape": "(2,"})),
       EMSError, ["metadata", "damaged"]),
    ok("ems-load-other-schedule", lambda: dp.ems.load(SHIPPED_EMS, schedule=dp.LinearVP()), EMSError,
       ["schedule", "linearvp"]),
    ok("ems-load-channel-mismatch", lambda: dp.ems.load(ems_file("chan.ems", shape=(3, 8, 8), stat=(3, 1, 1)),
                                                        data_shape=(4, 8, 8)), EMSError, ["(3, 8, 8)", "(4, 8, 8)"]),
    ok("ems-lambdas-decreasing", lambda: EMS([1.0, 0.0], np.ones((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), (1,),
                                             "x"), EMSError, ["lambdas", "increasing"]),
    ok("ems-l-nan", lambda: EMS([0.0, 1.0], np.full((2, 1), NAN), np.zeros((2, 1)), np.zeros((2, 1)), (1,), "x"),
       EMSError, ["nan"]),
    ok("ems-rows-mismatch", lambda: EMS([0.0, 1.0], np.ones((3, 1)), np.zeros((2, 1)), np.zeros((2, 1)), (1,), "x"),
       EMSError, ["3 rows", "2"]),
    ok("ems-sample-channel-mismatch", lambda: run(DEN, solver="dpmsolver-v3", ems=ems(shape=(3,))), EMSError,
       ["(3,)", "(2,)"]),
    ok("ems-sample-other-schedule", lambda: run(DEN, solver="dpmsolver-v3", ems=ems(dp.EDM())), EMSError,
       ["schedule", "edm"]),
    ok("ems-compute-data-str", lambda: dp.ems.compute(DEN, "data.pt"), TypeError, ["data", "str", "tensor"]),
    ok("ems-compute-n_lambdas-1", lambda: dp.ems.compute(DEN, X(4, 2), n_lambdas=1), EMSError,
       ["n_lambdas", "1"]),
    # --------------------------------------------------------------------------------------- Plan, PlanStep
    ok("PlanStep-order-0", lambda: dp.PlanStep(order=0), dp.PlanError, ["order", "0"]),
    ok("PlanStep-order-4", lambda: dp.PlanStep(order=4), dp.PlanError, ["order", "4"]),
    ok("PlanStep-order-float", lambda: dp.PlanStep(order=2.0), dp.PlanError, ["order", "2.0"]),
    ok("PlanStep-order-bool", lambda: dp.PlanStep(order=True), dp.PlanError, ["order", "true"]),
    ok("PlanStep-rule", lambda: dp.PlanStep(rule="rk4"), dp.PlanError, ["rule", "rk4", "taylor"]),
    ok("PlanStep-predict", lambda: dp.PlanStep(predict="x0"), dp.PlanError, ["predict", "x0", "data"]),
    ok("PlanStep-corrector", lambda: dp.PlanStep(corrector="unipc"), dp.PlanError, ["corrector", "unipc", "unic"]),
    ok("PlanStep-compensation-nan", lambda: dp.PlanStep(compensation=NAN), dp.PlanError, ["compensation", "nan"]),
    ok("PlanStep-method", lambda: dp.PlanStep(method="adaptive"), dp.PlanError, ["method", "adaptive"]),
    ok("PlanStep-singlestep-corrector", lambda: dp.PlanStep(method="singlestep", corrector="unic"), dp.PlanError,
       ["singlestep", "corrector"]),
    ok("PlanStep-compensation-needs-taylor", lambda: dp.PlanStep(compensation=0.3), dp.PlanError,
       ["compensation", "taylor", "dpmsolver"]),
    ok("Plan-times-repeated", lambda: dp.Plan((1.0, 0.5, 0.5, 0.1), (dp.PlanStep(),) * 3), dp.PlanError,
       ["decreasing", "0.5"]),
    ok("Plan-steps-count", lambda: dp.Plan((1.0, 0.5, 0.1), (dp.PlanStep(),) * 3), dp.PlanError,
       ["3 times", "2 steps", "3 step settings"]),
    ok("Plan-last-step-corrector", lambda: dp.Plan((1.0, 0.1), (dp.PlanStep(corrector="unic"),)), dp.PlanError,
       ["last step", "corrector"]),
    ok("Plan-negative-time", lambda: dp.Plan((1.0, 0.5, -0.1), (dp.PlanStep(),) * 2), dp.PlanError, ["-0.1"]),
    ok("Plan-zero-and-denoise", lambda: dp.Plan((1.0, 0.0), (dp.PlanStep(),), denoise_to_zero=True), dp.PlanError,
       ["denoise"]),
    ok("Plan-step-dict", lambda: dp.Plan((1.0, 0.1), ({"order": 9},)), dp.PlanError, ["order", "9"]),
    ok("Plan-load-missing", lambda: dp.Plan.load(tmp() / "none.plan.json"), dp.PlanError,
       ["no plan file", "none.plan.json"]),
    ok("Plan-load-not-json", lambda: dp.Plan.load(plan_file("bad.plan.json", "{not json")), dp.PlanError,
       ["bad.plan.json", "not a readable plan"]),
    ok("Plan-load-foreign-json", lambda: dp.Plan.load(plan_file("foreign.json", {"format": "other"})),
       dp.PlanError, ["foreign.json", "not a dpmsolve plan"]),
    ok("Plan-load-json-list", lambda: dp.Plan.load(plan_file("list.json", [1, 2])), dp.PlanError,
       ["not a dpmsolve plan"]),
    ok("Plan-load-future-version", lambda: dp.Plan.load(plan_file("v9.json", plan_dict(version=9))), dp.PlanError,
       ["version", "9", "upgrade"]),
    ok("Plan-load-version-not-a-number", lambda: dp.Plan.load(plan_file("vx.json", plan_dict(version="x"))),
       dp.PlanError, ["version", "'x'"]),
    ok("Plan-load-no-steps", lambda: dp.Plan.load(plan_file("nosteps.json", without(plan_dict(), "steps"))),
       dp.PlanError, ["damaged", "steps"]),
    ok("Plan-load-step-order-7", lambda: dp.Plan.load(plan_file(
        "order7.json", plan_dict(steps=[{"order": 7}] * 3))), dp.PlanError, ["order", "7"]),
    ok("Plan-load-null-time", lambda: dp.Plan.load(plan_file("null.json", plan_dict(ts=[1.0, None, 0.5, 0.1]))),
       dp.PlanError, ["null.json", "times"]),
    ok("Plan-load-other-schedule", lambda: dp.Plan.load(plan_file("p.json", plan_dict()), schedule=dp.EDM()),
       dp.PlanError, ["schedule", "edm"]),
    ok("Plan-load-other-shape", lambda: dp.Plan.load(plan_file("shape.json", plan_dict(data_shape=[2])),
                                                     data_shape=(3,)), dp.PlanError, ["shape", "(3,)", "(2,)"]),
    ok("Plan-load-other-model", lambda: dp.Plan.load(plan_file("model.json", plan_dict(model="net@1")),
                                                     model="net@2"), dp.PlanError, ["model", "net@1", "net@2"]),
    ok("sample-plan-other-schedule", lambda: run(DEN, solver=plan(dp.CosineVP()), steps=None), dp.PlanError,
       ["schedule"]),
    ok("sample-plan-other-shape", lambda: run(DEN, solver=plan(data_shape=(3,)), steps=None), dp.PlanError,
       ["shape", "(3,)", "(2,)"]),
    # --------------------------------------------------------------------------------------------- tune
    ok("tune-nfe-0", lambda: dp.tune(DEN, X(16, 2), nfe=0), ValueError, ["nfe", "0"]),
    ok("tune-nfe-list-with-1", lambda: dp.tune(DEN, X(16, 2), nfe=[3, 1]), ValueError, ["nfe", "1"]),
    ok("tune-nfe-2.5", lambda: dp.tune(DEN, X(16, 2), nfe=2.5), ValueError, ["nfe", "2.5"]),
    ok("tune-nfe-True", lambda: dp.tune(DEN, X(16, 2), nfe=True), TypeError, ["nfe", "true"]),
    ok("tune-noise-numpy", lambda: dp.tune(DEN, np.zeros((16, 2)), nfe=4), TypeError, ["noise", "ndarray"]),
    ok("tune-noise-too-few", lambda: dp.tune(DEN, X(4, 2), nfe=4), ValueError, ["noise", "8", "4"]),
    ok("tune-held_out-1", lambda: dp.tune(DEN, X(16, 2), nfe=4, held_out=1.0), ValueError, ["held_out", "1.0"]),
    ok("tune-held_out-negative", lambda: dp.tune(DEN, X(16, 2), nfe=4, held_out=-0.1), ValueError,
       ["held_out", "-0.1"]),
    ok("tune-held_out-nan", lambda: dp.tune(DEN, X(16, 2), nfe=4, held_out=NAN), ValueError, ["held_out", "nan"]),
    ok("tune-endpoint", lambda: dp.tune(DEN, X(16, 2), nfe=4, endpoint="end"), ValueError, ["endpoint", "end"]),
    ok("tune-denoiser-str", lambda: dp.tune("model", X(16, 2), nfe=4), TypeError, ["denoiser", "str"]),
    # -------------------------------------------------------------------------------- diffusers scheduler
    D("diffusers-solver-unknown", lambda: scheduler(solver="dpm++"), ValueError, ["dpm++", "valid"]),
    D("diffusers-prediction_type", lambda: scheduler(prediction_type="eps"), ValueError, ["prediction_type", "eps"]),
    D("diffusers-final_sigma", lambda: scheduler(final_sigma="max"), ValueError, ["final_sigma", "max"]),
    D("diffusers-beta_schedule", lambda: scheduler(beta_schedule="cosine"), ValueError, ["beta_schedule", "cosine"]),
    D("diffusers-adaptive-solver", lambda: scheduler(solver="dpmsolver++", solver_options={"method": "adaptive"}),
      ValueError, ["adaptive", "fixed-grid"]),
    D("diffusers-solver-order-7", lambda: scheduler(solver_options={"order": 7}), ValueError, ["order", "7"]),
    D("diffusers-num_train_timesteps-0", lambda: scheduler(num_train_timesteps=0), ValueError,
      ["num_train_timesteps", "0"]),
    D("diffusers-trained_betas-above-1", lambda: scheduler(trained_betas=[0.1, 2.0]), ValueError,
      ["trained_betas", "2.0"]),
    D("diffusers-plan-int", lambda: scheduler(plan=123), TypeError, ["plan", "int"]),
    D("diffusers-plan-missing", lambda: scheduler(plan=str(tmp() / "gone.plan.json")), dp.PlanError,
      ["gone.plan.json", "no plan file"]),
    D("diffusers-grid-unknown", lambda: scheduler(grid="nope"), ValueError, ["grid", "nope"]),
    D("diffusers-flow_shift-0", lambda: scheduler(use_flow_sigmas=True, flow_shift=0.0), ValueError,
      ["flow_shift", "0"]),
    D("diffusers-set_timesteps-0", lambda: scheduler().set_timesteps(0), ValueError, ["num_inference_steps", "0"]),
    D("diffusers-set_timesteps-2.5", lambda: scheduler().set_timesteps(2.5), ValueError,
      ["num_inference_steps", "2.5"]),
    D("diffusers-set_timesteps-negative", lambda: scheduler().set_timesteps(-3), ValueError,
      ["num_inference_steps", "-3"]),
    D("diffusers-set_timesteps-nothing", lambda: scheduler().set_timesteps(), ValueError,
      ["num_inference_steps", "timesteps", "sigmas"]),
    D("diffusers-set_timesteps-repeated", lambda: scheduler().set_timesteps(timesteps=[999, 500, 500, 10]),
      ValueError, ["timesteps", "decreasing"]),
    D("diffusers-set_timesteps-out-of-range", lambda: scheduler().set_timesteps(timesteps=[1500, 500]), ValueError,
      ["timesteps", "1500"]),
    D("diffusers-set_timesteps-sigmas-increasing", lambda: scheduler().set_timesteps(sigmas=[0.5, 1.0, 5.0]),
      ValueError, ["sigmas", "decreasing"]),
    D("diffusers-step-before-set_timesteps", lambda: scheduler().step(torch.zeros(2, 4), 999, torch.zeros(2, 4)),
      ValueError, ["set_timesteps"]),
    D("diffusers-step-unknown-timestep", lambda: stepped(timestep=12345), ValueError, ["timestep", "12345"]),
    D("diffusers-step-past-the-end", step_past_the_end, ValueError, ["set_timesteps"]),
    D("diffusers-step-output-shape", lambda: stepped(model_output_shape=(2, 3)), ValueError,
      ["model_output", "(2, 3)", "(2, 4)"]),
    D("diffusers-step-output-broadcasts", lambda: stepped(model_output_shape=(1, 4)), ValueError,
      ["model_output", "(1, 4)", "(2, 4)"]),
    D("diffusers-add_noise-timestep-above", lambda: noised([5000, 10]), ValueError, ["timesteps", "5000"]),
    D("diffusers-add_noise-timestep-negative", lambda: noised([-1, 10]), ValueError, ["timesteps", "-1"]),
    D("diffusers-add_noise-noise-shape", lambda: noised([10, 10], noise_shape=(2, 3)), ValueError,
      ["noise", "(2, 3)", "(2, 4)"]),
    D("diffusers-from_config-algorithm_type", lambda: from_config(algorithm_type="dpmsolver+++"), ValueError,
      ["algorithm_type", "dpmsolver+++"]),
    D("diffusers-from_config-beta_schedule", lambda: from_config(beta_schedule="cosine_v3"), ValueError,
      ["beta_schedule", "cosine_v3"]),
    D("diffusers-from_config-prediction_type", lambda: from_config(prediction_type="noise"), ValueError,
      ["prediction_type", "noise"]),
    # ------------------------------------------------------------------------------------------- k-diffusion
    ok("kdiffusion-sigmas-increasing", lambda: k_sample([0.1, 1.0, 10.0]), ValueError, ["sigmas", "decreasing"]),
    ok("kdiffusion-sigmas-nan", lambda: k_sample([10.0, NAN, 0.0]), ValueError, ["sigmas", "nan"]),
    ok("kdiffusion-sigmas-negative", lambda: k_sample([10.0, 1.0, -1.0]), ValueError, ["sigmas", "-1"]),
    ok("kdiffusion-sigmas-2d", lambda: k_sample([[10.0, 1.0], [0.5, 0.0]]), ValueError, ["sigmas", "1-d"]),
    ok("kdiffusion-sigmas-all-zero", lambda: k_sample([0.0, 0.0]), ValueError, ["sigmas", "0"]),
    ok("kdiffusion-x-list", lambda: k_sample([10.0, 1.0, 0.0], x=[[1.0, 2.0]]), TypeError, ["x", "list"]),
    ok("kdiffusion-unknown-option", lambda: k_sample([10.0, 1.0, 0.0], foo=1), ValueError, ["foo"]),
    ok("kdiffusion-karras-n-0", lambda: kd.get_sigmas_karras(0, 0.1, 10.0), ValueError, ["n", "0"]),
    ok("kdiffusion-karras-sigmas-reversed", lambda: kd.get_sigmas_karras(5, 10.0, 0.1), ValueError,
       ["sigma_min", "10", "0.1"]),
    ok("kdiffusion-karras-rho-0", lambda: kd.get_sigmas_karras(5, 0.1, 10.0, rho=0.0), ValueError, ["rho", "0"]),
    ok("kdiffusion-exponential-sigma_min-negative", lambda: kd.get_sigmas_exponential(5, -1.0, 10.0), ValueError,
       ["sigma_min", "-1"]),
    ok("kdiffusion-adaptive-sigmas-reversed",
       lambda: kd.sample_dpm_adaptive(k_model, X(), sigma_min=1.0, sigma_max=0.5, disable=True), ValueError,
       ["sigma_min", "1.0", "0.5"]),
    ok("kdiffusion-adaptive-eta", lambda: kd.sample_dpm_adaptive(k_model, X(), 0.1, 10.0, eta=0.5, disable=True),
       ValueError, ["eta"]),
    ok("kdiffusion-sample_plan-without-plan", lambda: k_sample([10.0, 1.0, 0.0], sampler=kd.sample_plan),
       ValueError, ["plan"]),
    ok("kdiffusion-sample_plan-sigmas-count", lambda: k_sample([10.0, 1.0, 0.0], sampler=kd.sample_plan,
                                                               plan=plan(dp.EDM(), n=4)), dp.PlanError,
       ["sigmas", "5"]),
    # --------------------------------------------------------------------------------------------------- CLI
    ok("cli-unknown-command", cli("frobnicate"), SystemExit, ["frobnicate"]),
    ok("cli-sample-model-case", cli("sample", "--model", "Digits", "--out", out_dir()), SystemExit,
       ["--model", "Digits", "digits"]),
    ok("cli-sample-steps-not-int", cli("sample", "--model", "digits", "--steps", "abc"), SystemExit,
       ["--steps", "abc"]),
    ok("cli-sample-steps-0", cli("sample", "--model", "digits", "--steps", "0", "--out", out_dir()), SystemExit,
       ["--steps", "0"]),
    ok("cli-sample-batch-negative", cli("sample", "--model", "digits", "--batch", "-2", "--out", out_dir()),
       SystemExit, ["--batch", "-2"]),
    ok("cli-sample-order-7", cli("sample", "--model", "digits", "--order", "7", "--out", out_dir()), SystemExit,
       ["--order", "7"]),
    ok("cli-sample-ddim-order", cli("sample", "--model", "digits", "--solver", "ddim", "--order", "2", "--out",
                                    out_dir()), SystemExit, ["ddim", "order"]),
    ok("cli-sample-solver-unknown", cli("sample", "--model", "digits", "--solver", "rk4", "--out", out_dir()),
       SystemExit, ["rk4", "valid"]),
    ok("cli-sample-grid-unknown", cli("sample", "--model", "digits", "--grid", "cosine", "--steps", "2", "--out",
                                      out_dir()), SystemExit, ["grid", "cosine"]),
    ok("cli-sample-final-max", cli("sample", "--model", "digits", "--final", "max"), SystemExit, ["--final", "max"]),
    ok("cli-sample-label-10", cli("sample", "--model", "digits", "--label", "10", "--out", out_dir()), SystemExit,
       ["--label", "10"]),
    ok("cli-sample-unconditional-guidance", cli("sample", "--model", "patches", "--guidance", "3", "--out",
                                                out_dir()), SystemExit, ["--guidance", "patches"]),
    ok("cli-sample-guidance-nan", cli("sample", "--model", "digits", "--guidance", "nan", "--steps", "1",
                                      "--batch", "1", "--out", out_dir("nan")), SystemExit, ["--guidance", "nan"]),
    ok("cli-sample-plan-missing", cli("sample", "--model", "digits", "--plan", str(tmp() / "gone.plan.json"),
                                      "--out", out_dir()), SystemExit, ["--plan", "no plan file"]),
    ok("cli-sample-out-under-a-file", lambda: cli("sample", "--model", "digits", "--steps", "1", "--batch", "1",
                                                  "--out", str(Path(a_file()) / "sub"))(), SystemExit,
       ["--out", "a-file.txt"]),
    pytest.param(cli("sample", "--model", "digits", "--device", "cuda", "--steps", "1", "--batch", "1", "--out",
                     out_dir("cuda")), SystemExit, ("--device", "cuda"), id="cli-sample-device-cuda-unavailable",
                 marks=no_cuda),
    ok("cli-tune-model-unknown", cli("tune", "--model", "imagenet"), SystemExit, ["--model", "imagenet", "digits"]),
    ok("cli-tune-nfe-not-int", cli("tune", "--model", "digits", "--nfe", "five"), SystemExit, ["--nfe", "five"]),
    ok("cli-tune-nfe-1", cli("tune", "--model", "digits", "--nfe", "1", "--out", out_dir()), SystemExit,
       ["--nfe", "1", ">= 2"]),
    ok("cli-tune-samples-4", cli("tune", "--model", "digits", "--samples", "4", "--out", out_dir()), SystemExit,
       ["--samples", "4", ">= 8"]),
    ok("cli-tune-unconditional-guidance", cli("tune", "--model", "patches", "--guidance", "3"), SystemExit,
       ["--guidance", "patches"]),
    ok("cli-bench-samples-0", cli("bench", "--samples", "0", "--out", out_dir()), SystemExit, ["--samples", "0"]),
    ok("cli-demo-mixture-samples-0", cli("demo", "--mixture-samples", "0", "--out", out_dir()), SystemExit,
       ["--mixture-samples", "0"]),
    ok("cli-demo-patches-negative", cli("demo", "--patches", "-3", "--out", out_dir()), SystemExit,
       ["--patches", "-3"]),
]


def _error_line(err: str) -> list[str]:
    """stderr without argparse's usage lines (``usage: ...`` and its indented continuation lines)."""
    return [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("usage:", " "))]


@pytest.fixture(scope="module", autouse=True)
def _warm_up():
    """One-off costs outside the rows' time: diffusers' first from_config (~2 s of lazy imports)."""
    if dpm_diffusers is not None:
        from_config()


@pytest.mark.parametrize("call, expected, words", CASES)
def test_bad_input(call, expected, words, capsys):
    with pytest.raises(expected) as info:
        call()
    if expected is SystemExit:
        assert info.value.code not in (0, None), f"exit status {info.value.code!r}"
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = _error_line(err)
        assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
        text = lines[0]
    else:
        text = str(info.value)
    missing = [w for w in words if w.lower() not in text.lower()]
    assert not missing, f"{type(info.value).__name__} message lacks {missing}: {text}"


def test_the_catalogue_is_large_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 120
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
