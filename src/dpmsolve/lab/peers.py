"""Peer runners: other projects' samplers, run on OUR denoiser from OUR start noise to OUR endpoint.

The accuracy lab compares dpmsolve's solvers with the samplers people actually use. A peer is run exactly as its
library ships it (its own step grid, its own float32 tables, its own last-step rules); only the model it calls is
ours, so every difference in the result is the peer's own discretisation.

* **diffusers** schedulers (VP coordinates, eps prediction) need a :class:`~dpmsolve.DiscreteVP` schedule: the
  scheduler is built from its ``alphas_cumprod`` (``trained_betas = 1 - abar_n / abar_{n-1}``,
  ``num_train_timesteps = N``), and the network it drives is ``net(x, timestep)`` = our denoiser's eps at
  ``t = (timestep + 1) / N``, with ``timestep`` used exactly as the scheduler hands it over (integers, rounded for
  the Karras and Lu grids: that rounding is diffusers' real behaviour). Every configuration here starts at train
  index ``N - 1`` = ``t_max`` (DDIM with ``timestep_spacing="trailing"``, the others with diffusers' default
  ``"linspace"`` or a sigma grid that starts at the training sigma_max); this is checked at run time.
* **k-diffusion** samplers work in VE coordinates ``x_ve = x / alpha`` with a denoiser ``D(x_ve, sigma)``; here
  ``D`` is our x0 prediction at the time whose ``sigma/alpha`` equals ``sigma``. They run on any dpmsolve schedule.
  The start is ``x_T / alpha(t_max)`` at ``sigma_max = sigma/alpha(t_max)``, and the result is multiplied back by
  ``alpha`` at the end time.

Endpoints: ``"zero"`` is the data end (sigma = 0: diffusers ``final_sigmas_type="zero"`` / DDIM
``set_alpha_to_one=True``, k-diffusion grids ending in 0); ``"t_min"`` is the schedule's ``t_min`` (for a
DiscreteVP train index 0: ``final_sigmas_type="sigma_min"`` / ``set_alpha_to_one=False``; k-diffusion grids
ending at ``sigma_min = sigma/alpha(t_min)`` without the 0). ``final_sigmas_type`` is passed to every scheduler
whose constructor has it. Peers that cannot end at sigma = 0 (diffusers' DEIS has no ``final_sigmas_type``; its
noise-prediction DPM-Solvers, ``algorithm_type="dpmsolver"``, raise a ValueError for ``final_sigmas_type="zero"``;
k-diffusion's ``sample_dpm_fast`` needs ``sigma_min > 0``) report that as their error for ``"zero"``.

Grids: a peer runs on its library's own timesteps, except ``diffusers:dpm++3s-time-quadratic``, which hands the
scheduler custom integer timesteps (``set_timesteps(timesteps=...)``, a documented diffusers feature) placing the
reference DPM-Solver's ``time_quadratic`` grid (uniform in sqrt(t)) on the train indices. diffusers' singlestep
scheduler may switch ``lower_order_final`` on in ``set_timesteps`` (a step count that is not a multiple of the
order, or an end at sigma = 0); the runner records such changes under ``"options_changed_by_diffusers"`` and the
orders it runs under ``"order_list"``, and keeps diffusers' logger quiet while building the scheduler.

NFE: ``nfe`` is the number of model evaluations a peer may use. DDIM/DPM/UniPC/DEIS make one call per timestep, so
they get ``nfe`` steps. k-diffusion's Heun and DPM-2 make 2 calls per step except an Euler step onto sigma = 0, so
they get the most steps whose calls do not exceed ``nfe`` (an even ``nfe`` at the ``"zero"`` end, or an odd one at
``"t_min"``, leaves one call unused). ``PeerResult.nfe`` is always the count of real calls, measured by wrapping
the denoiser, also when the peer fails part-way.

Known peer behaviours that are kept, not corrected (they are what a user of that library gets):

* DDIM steps to ``timestep - N // steps`` whatever the next timestep is; with ``trailing`` spacing and a step
  count that does not divide N, the model is evaluated one train step away from the sample's time, and the last
  step lands on train index 0 instead of ``final_alpha_cumprod`` (so ``"zero"`` is not reached: the settings say
  so under ``"note"`` and ``"t_end_actual"``).
* The Karras and Lu grids of diffusers evaluate the model at train index 0 already; with
  ``final_sigmas_type="sigma_min"`` the last step goes from sigma_min to sigma_min and is a wasted evaluation.
* diffusers keeps ``alphas_cumprod`` and ``sigmas`` in float32 and ``DPMSolverMultistepScheduler.step`` computes
  in float32; k-diffusion builds its sigma grid in torch's default dtype. Our side (the denoiser, start and end
  conversions) is float64. diffusers schedulers are built and stepped with torch's default dtype set to float32,
  as their users run them (under a float64 default, 0.42.1's UniPC corrector raises a dtype mismatch in
  ``linalg.solve``); the denoiser itself runs under the caller's default.
* diffusers 0.42.1's UniPC with ``solver_type="bh1"`` returns NaN on its last step onto sigma = 0
  (``B(h) = h`` with ``h = inf``); that is recorded as the peer's failure (``NonFiniteError``), like any
  non-finite output.
* DPMSolverMultistep at 15 or more steps has no ``lower_order_final``: with ``final_sigmas_type="sigma_min"`` on
  the Karras/Lu grids its 3M step over the zero-length last interval gives NaN (recorded as a failure); this holds
  for the data-prediction (``dpm++3m-*``) and the noise-prediction (``dpm3m-noise-lu``) 3M alike.
* diffusers 0.42.1 deprecates ``algorithm_type="dpmsolver"`` (a FutureWarning when the scheduler is built); it still
  runs the reference noise-prediction DPM-Solver, which is why those peers are here.
* The noise-prediction singlestep solvers of order 2-3 (``dpm2s-noise``, ``dpm3s-noise``) on diffusers' linspace
  grid end with a high-order step over the long last interval (train index ~N/steps to 0) when the step count is
  a multiple of the order; their error then jumps (e.g. 6 vs 5 steps). That is the method on that grid, kept.
* k-diffusion's Heun/Euler/DPM-2 draw ``randn_like`` every step even with ``s_churn = 0``; the runner forks the
  RNG so the caller's global generator state is not advanced.

k-diffusion (PyPI ``k-diffusion``) is imported lazily. Its package ``__init__`` pulls in torchvision, kornia,
scikit-image and other training-only modules that do not import beside every torch build, although
``k_diffusion/sampling.py`` needs none of them. :func:`_k_diffusion_sampling` therefore first tries the plain
``import k_diffusion.sampling`` and, if that fails, loads only ``sampling.py`` and its helper ``utils.py`` from the
installed package (under a private module name, without running the package ``__init__``), with placeholder
modules for whichever of their top-level imports is missing (torchvision, torchsde, torchdiffeq, PIL,
safetensors) present only while those two files are imported. None of the samplers used here touches them:
``sample_dpmpp_3m_sde`` gets an explicit (never called, eta = 0) noise sampler instead of its torchsde Brownian
tree. ``pip install --no-deps k-diffusion`` is enough.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..model import Denoiser, Prediction
from ..schedules import DiscreteVP

__all__ = ["PeerResult", "PEERS", "ENDPOINTS", "available_peers", "run_peer"]

ENDPOINTS = ("zero", "t_min")


@dataclass
class PeerResult:
    """What one peer run gave: the sample in dpmsolve's coordinates at the endpoint, or the error it raised."""

    name: str              # peer name (a key of PEERS)
    x: torch.Tensor | None  # final sample (x = alpha x0 + sigma eps at the endpoint), float64; None on failure
    nfe: int               # real model calls made (on failure: the calls made so far, a call that raised included)
    error: str | None      # None on success, else 'ExceptionType: message'
    settings: dict = field(default_factory=dict)  # library, class/function, options, grid actually run


# --------------------------------------------------------------------------------------------------- the registry

def _diffusers(cls: str, description: str, endpoints=ENDPOINTS, grid: str | None = None, **options) -> dict:
    """A diffusers scheduler with constructor ``options``. ``grid=None``: the scheduler's own timesteps
    (``set_timesteps(nfe)``); ``grid="time_quadratic"``: custom integer timesteps (``set_timesteps(timesteps=...)``,
    a documented diffusers feature) placing the reference DPM-Solver's time-quadratic grid on the train indices."""
    spec = {"library": "diffusers", "class": cls, "options": options, "endpoints": tuple(endpoints),
            "description": description}
    if grid is not None:
        spec["grid"] = grid
    return spec


def _kdiff(function: str, grid: str, calls: str, description: str, endpoints=ENDPOINTS, **options) -> dict:
    return {"library": "k-diffusion", "function": function, "grid": grid, "calls": calls, "options": options,
            "endpoints": tuple(endpoints), "description": description}


_MULTISTEP = "DPMSolverMultistepScheduler"
PEERS: dict[str, dict] = {
    # diffusers (DiscreteVP only). Options not listed are diffusers' defaults (lower_order_final=True, ...).
    "diffusers:ddim": _diffusers("DDIMScheduler", "DDIM (eta = 0), trailing spacing", timestep_spacing="trailing",
                                 clip_sample=False),
    "diffusers:dpm++2m": _diffusers(_MULTISTEP, "DPM-Solver++(2M), linspace spacing", solver_order=2),
    "diffusers:dpm++2m-karras": _diffusers(_MULTISTEP, "DPM-Solver++(2M), Karras sigmas", solver_order=2,
                                           use_karras_sigmas=True),
    "diffusers:dpm++2m-lu": _diffusers(_MULTISTEP, "DPM-Solver++(2M), uniform-lambda (Lu) grid", solver_order=2,
                                       use_lu_lambdas=True),
    "diffusers:dpm++3m": _diffusers(_MULTISTEP, "DPM-Solver++(3M), linspace spacing", solver_order=3),
    "diffusers:dpm++3m-karras": _diffusers(_MULTISTEP, "DPM-Solver++(3M), Karras sigmas", solver_order=3,
                                           use_karras_sigmas=True),
    "diffusers:dpm++3m-lu": _diffusers(_MULTISTEP, "DPM-Solver++(3M), uniform-lambda (Lu) grid", solver_order=3,
                                       use_lu_lambdas=True),
    "diffusers:dpm++2s": _diffusers("DPMSolverSinglestepScheduler", "DPM-Solver++(2S) singlestep", solver_order=2),
    # The reference DPM-Solver's configurations (Lu et al.): noise prediction (algorithm_type="dpmsolver"), which
    # diffusers only runs to sigma_min (final_sigmas_type="zero" raises for it), and the singlestep solvers.
    "diffusers:dpm2m-noise-lu": _diffusers(_MULTISTEP, "DPM-Solver(2M), noise prediction, uniform-lambda (Lu) grid, "
                                           "lower-order final; ends at sigma_min", endpoints=("t_min",),
                                           algorithm_type="dpmsolver", solver_order=2, use_lu_lambdas=True,
                                           lower_order_final=True),
    "diffusers:dpm3m-noise-lu": _diffusers(_MULTISTEP, "DPM-Solver(3M), noise prediction, uniform-lambda (Lu) grid, "
                                           "lower-order final (below 15 steps: diffusers' rule); ends at sigma_min",
                                           endpoints=("t_min",), algorithm_type="dpmsolver", solver_order=3,
                                           use_lu_lambdas=True, lower_order_final=True),
    "diffusers:dpm++3s": _diffusers("DPMSolverSinglestepScheduler", "DPM-Solver++(3S) singlestep (orders 1,2,3 per "
                                    "group of evaluations), linspace spacing", solver_order=3),
    "diffusers:dpm++3s-time-quadratic": _diffusers(
        "DPMSolverSinglestepScheduler", "DPM-Solver++(3S) singlestep on the reference DPM-Solver's time_quadratic "
        "grid (custom timesteps: round(N t - 1), t uniform in sqrt(t))", grid="time_quadratic", solver_order=3),
    "diffusers:dpm2s-noise": _diffusers("DPMSolverSinglestepScheduler", "DPM-Solver-2 singlestep, noise prediction, "
                                        "linspace spacing; ends at sigma_min", endpoints=("t_min",),
                                        algorithm_type="dpmsolver", solver_order=2),
    "diffusers:dpm3s-noise": _diffusers("DPMSolverSinglestepScheduler", "DPM-Solver-3 singlestep, noise prediction, "
                                        "linspace spacing; ends at sigma_min", endpoints=("t_min",),
                                        algorithm_type="dpmsolver", solver_order=3),
    "diffusers:unipc-bh1": _diffusers("UniPCMultistepScheduler", "UniPC order 2, B(h) = h", solver_type="bh1"),
    "diffusers:unipc-bh2": _diffusers("UniPCMultistepScheduler", "UniPC order 2, B(h) = e^h - 1",
                                      solver_type="bh2"),
    "diffusers:unipc-bh2-karras": _diffusers("UniPCMultistepScheduler", "UniPC order 2 bh2, Karras sigmas",
                                             solver_type="bh2", use_karras_sigmas=True),
    "diffusers:deis": _diffusers("DEISMultistepScheduler", "DEIS order 2 (logrho); always ends at sigma_min",
                                 endpoints=("t_min",)),
    "diffusers:deis-karras": _diffusers("DEISMultistepScheduler", "DEIS order 2, Karras sigmas; ends at sigma_min",
                                        endpoints=("t_min",), use_karras_sigmas=True),
    # k-diffusion (any schedule): grid 'karras' (rho = 7) or 'exponential' (geometric in sigma) between
    # sigma/alpha at t_min and t_max; 'calls' says how the model calls follow from the number of steps.
    **{f"k-diffusion:{name}-{grid}": _kdiff(fn, grid, calls, f"{desc}, {grid} sigmas", **opts)
       for grid in ("karras", "exponential")
       for name, fn, calls, desc, opts in (
           ("euler", "sample_euler", "one", "Euler (Karras Alg. 2, no churn)", {}),
           ("heun", "sample_heun", "two_but_last_to_zero", "Heun (Karras Alg. 2, no churn)", {}),
           ("dpm_2", "sample_dpm_2", "two_but_last_to_zero", "DPM-Solver-2 (midpoint in log sigma)", {}),
           ("lms", "sample_lms", "one", "linear multistep, order 4", {}),
           ("dpmpp_2m", "sample_dpmpp_2m", "one", "DPM-Solver++(2M)", {}),
           ("dpmpp_3m_sde(eta=0)", "sample_dpmpp_3m_sde", "one", "DPM-Solver++(3M) SDE at eta = 0 (an ODE solver)",
            {"eta": 0.0}),
       )},
    "k-diffusion:dpm_fast": _kdiff("sample_dpm_fast", "dpm_fast", "exact",
                                   "DPM-Solver-fast (orders 3,...,3,2,1; uniform in log sigma); needs sigma_min > 0",
                                   endpoints=("t_min",)),
}


# --------------------------------------------------------------------------------------------------- availability

_LOCK = threading.Lock()
_KD_CACHE: dict[str, Any] = {}


def _diffusers_module():
    import diffusers

    return diffusers


class _Placeholder:
    """Stands for a name from a module that is not installed; any use raises ImportError."""

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not available: dpmsolve loaded k_diffusion.sampling without that "
                          "optional dependency (only the ODE samplers used by dpmsolve.lab.peers work).")

    __call__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fail()


class _PlaceholderModule(types.ModuleType):
    """A stand-in module for a missing import: its attributes are placeholders that raise when used."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so that 'from name import submodule' resolves through __getattr__

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


# The top-level imports of k_diffusion/sampling.py and k_diffusion/utils.py that dpmsolve does not depend on (torch,
# scipy and tqdm are dpmsolve dependencies). 'torchvision.transforms' is listed for utils' 'from ... import'.
_KD_OPTIONAL_IMPORTS = ("torchvision", "torchvision.transforms", "torchsde", "torchdiffeq", "PIL", "safetensors")


def _importable(name: str) -> bool:
    top = name.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return False
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - e.g. a torchvision wheel built for another torch raises RuntimeError
        return False


def _k_diffusion_sampling():
    """k-diffusion's ``sampling`` module (cached); raises ImportError saying why it cannot be used."""
    with _LOCK:
        if "module" in _KD_CACHE:
            return _KD_CACHE["module"]
        if "error" in _KD_CACHE:
            raise ImportError(_KD_CACHE["error"])
        try:
            module, how = _load_k_diffusion_sampling()
        except Exception as exc:  # noqa: BLE001
            _KD_CACHE["error"] = f"k-diffusion is unusable here: {type(exc).__name__}: {exc}"
            raise ImportError(_KD_CACHE["error"]) from exc
        _KD_CACHE["module"], _KD_CACHE["how"] = module, how
        return module


def _load_k_diffusion_sampling():
    if importlib.util.find_spec("k_diffusion") is None:
        raise ImportError("k-diffusion is not installed (pip install --no-deps 'k-diffusion==0.1.1.post1').")
    try:  # a complete install whose training-side dependencies all import: use it as is
        import k_diffusion.sampling as sampling

        return sampling, "import k_diffusion.sampling"
    except Exception as exc:  # noqa: BLE001 - ImportError, or a RuntimeError from a mismatched torchvision
        full_import_error = f"{type(exc).__name__}: {exc}"

    # Load only k_diffusion/sampling.py (+ its 'from . import utils') from the installed package, as the
    # submodules of a private package object whose __path__ is k_diffusion's folder: k_diffusion/__init__.py (which
    # imports augmentation, models, torchvision, ...) is not executed, and sys.modules['k_diffusion'] is untouched.
    spec = importlib.util.find_spec("k_diffusion")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ImportError("k_diffusion is not a package directory")
    alias = "_dpmsolve_k_diffusion"
    package = types.ModuleType(alias)
    package.__path__ = locations
    package.__package__ = alias
    # Placeholders for the missing optional imports, present in sys.modules ONLY while the two files are imported.
    missing = [name for name in _KD_OPTIONAL_IMPORTS if not _importable(name)]
    saved = {name: sys.modules.get(name) for name in missing}
    sys.modules[alias] = package
    try:
        for name in missing:
            sys.modules[name] = _PlaceholderModule(name)
        sampling = importlib.import_module(f"{alias}.sampling")
    except Exception:
        for name in [alias, f"{alias}.utils", f"{alias}.sampling"]:
            sys.modules.pop(name, None)
        raise
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    how = (f"k_diffusion/sampling.py loaded without the package __init__ ({full_import_error}); "
           f"placeholders at import time for: {', '.join(missing) or 'nothing'}")
    return sampling, how


def _library_available(library: str) -> bool:
    try:
        if library == "diffusers":
            _diffusers_module()
        else:
            _k_diffusion_sampling()
        return True
    except Exception:  # noqa: BLE001
        return False


def available_peers() -> list[str]:
    """The peers whose library can be imported here (a peer that then fails on a given model still counts)."""
    ok = {lib: _library_available(lib) for lib in {spec["library"] for spec in PEERS.values()}}
    return [name for name, spec in PEERS.items() if ok[spec["library"]]]


# --------------------------------------------------------------------------------------------------- running

class _Counted(Denoiser):
    """Counts the evaluations of a denoiser (the peer's NFE)."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.schedule = inner.schedule
        self.calls = 0

    def network_time(self, t: float) -> float:
        return self.inner.network_time(t)

    def __call__(self, x: torch.Tensor, t: float, **model_kwargs) -> Prediction:
        self.calls += 1
        return self.inner(x, t, **model_kwargs)


def run_peer(name: str, denoiser: Denoiser, x_T: torch.Tensor, nfe: int, endpoint: str = "zero") -> PeerResult:
    """Run peer ``name`` with at most ``nfe`` model evaluations of ``denoiser`` from ``x_T`` at ``t_max`` to
    ``endpoint`` (``"zero"``: sigma = 0, the sample is x0; ``"t_min"``: the schedule's t_min).

    Never raises for a failing peer: the error is recorded in the result (``x`` None), with the calls made so far.
    """
    settings: dict[str, Any] = {"peer": name, "nfe_requested": nfe, "endpoint": endpoint}
    counted: _Counted | None = None
    try:
        if name not in PEERS:
            raise ValueError(f"Unknown peer {name!r}; valid names are: {', '.join(PEERS)}.")
        spec = PEERS[name]
        settings.update(library=spec["library"], description=spec["description"])
        if endpoint not in ENDPOINTS:
            raise ValueError(f"Unknown endpoint {endpoint!r}; use one of {ENDPOINTS}.")
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}.")
        if not isinstance(denoiser, Denoiser):
            raise ValueError(f"denoiser must be a dpmsolve Denoiser, got {type(denoiser).__name__}.")
        if endpoint not in spec["endpoints"]:
            raise ValueError(f"{name} cannot end at endpoint={endpoint!r} (it supports {spec['endpoints']}): "
                             f"{spec['description']}.")
        counted = _Counted(denoiser)
        x_T = x_T.detach().to(torch.float64)
        runner = _run_diffusers if spec["library"] == "diffusers" else _run_k_diffusion
        with torch.no_grad():
            x = runner(spec, counted, x_T, int(nfe), endpoint, settings)
        settings["nfe"] = counted.calls
        if not bool(torch.isfinite(x).all()):
            return PeerResult(name, None, counted.calls,
                              f"NonFiniteError: {name} returned NaN or Inf after {counted.calls} model calls",
                              settings)
        return PeerResult(name, x, counted.calls, None, settings)
    except Exception as exc:  # noqa: BLE001 - a failing peer is a finding: record it, never drop it
        calls = counted.calls if counted is not None else 0
        return PeerResult(name, None, calls, f"{type(exc).__name__}: {exc}", settings)


# ----- diffusers

def _run_diffusers(spec: dict, denoiser: _Counted, x_T: torch.Tensor, nfe: int, endpoint: str,
                   settings: dict) -> torch.Tensor:
    diffusers = _diffusers_module()
    schedule = denoiser.schedule
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"diffusers schedulers need a DiscreteVP schedule (a discrete train grid), got "
                         f"{type(schedule).__name__}; k-diffusion peers run on any schedule.")
    n_train = schedule.num_train_steps
    ac = schedule.alphas_cumprod
    betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
    cls = getattr(diffusers, spec["class"])
    options = dict(spec["options"])
    if spec["class"] == "DDIMScheduler":
        options["set_alpha_to_one"] = endpoint == "zero"
    elif "final_sigmas_type" in inspect.signature(cls.__init__).parameters:
        options["final_sigmas_type"] = "zero" if endpoint == "zero" else "sigma_min"
    settings.update({"class": spec["class"], "version": diffusers.__version__,
                     "options": {"num_train_timesteps": n_train, "trained_betas": "1 - abar_n / abar_(n-1)",
                                 "prediction_type": "epsilon", **options},
                     "num_inference_steps": nfe, "torch_default_dtype": "float32"})
    caller_dtype = torch.get_default_dtype()
    # diffusers assumes torch's default dtype is float32 (under a float64 default UniPC's corrector stacks a float64
    # torch.ones(()) with float32 sigmas and linalg.solve raises a dtype mismatch), so the scheduler is built and
    # stepped under a float32 default, as its users run it; our denoiser runs under the caller's default.
    with _default_dtype(torch.float32), _quiet_diffusers(diffusers):
        sched = cls(num_train_timesteps=n_train, trained_betas=betas.tolist(), prediction_type="epsilon", **options)
        built = dict(sched.config)
        if spec.get("grid") is None:
            sched.set_timesteps(nfe)
        else:
            custom = _custom_timesteps(spec["grid"], schedule, nfe)
            settings["custom_timesteps"] = spec["grid"]
            sched.set_timesteps(timesteps=custom)
    # what the scheduler really runs with: set_timesteps may change its config (the singlestep scheduler turns
    # lower_order_final on for a step count that is not a multiple of the order, or when it ends at sigma = 0)
    changed = {k: v for k, v in sched.config.items() if k in built and k != "trained_betas" and v != built[k]}
    if changed:
        settings["options_changed_by_diffusers"] = changed
    if hasattr(sched, "order_list"):
        settings["order_list"] = list(sched.order_list)
    timesteps = sched.timesteps
    settings["grid"] = [float(t) if t.is_floating_point() else int(t) for t in timesteps]
    first = float(timesteps[0])
    if first != n_train - 1:
        raise RuntimeError(f"{spec['class']} starts at timestep {first}, not at t_max (train index {n_train - 1}).")
    if hasattr(sched, "sigmas") and spec["class"] != "DDIMScheduler":
        settings["sigmas"] = [float(s) for s in sched.sigmas]
    _note_ddim_end(sched, spec, endpoint, settings, n_train)

    def net(x: torch.Tensor, timestep) -> torch.Tensor:
        t = (float(timestep) + 1.0) / n_train       # the timestep as the scheduler gives it (train index)
        with _default_dtype(caller_dtype):
            return denoiser(x.to(torch.float64), t).eps

    x = x_T
    with _default_dtype(torch.float32):
        for timestep in timesteps:
            x = sched.step(net(x, timestep), timestep, x).prev_sample
    return x.to(torch.float64)


def _custom_timesteps(grid: str, schedule: DiscreteVP, nfe: int) -> list[int]:
    """The first ``nfe`` of ``nfe + 1`` grid times from t_max to t_min, as integer train indices round(N t - 1)
    (train index n is our t = (n + 1) / N); the scheduler's last step goes to its final sigma (zero or sigma_min).
    """
    if grid != "time_quadratic":
        raise ValueError(f"unknown custom grid {grid!r} (only 'time_quadratic').")
    n_train = schedule.num_train_steps
    ts = np.linspace(math.sqrt(schedule.t_max), math.sqrt(schedule.t_min), nfe + 1) ** 2
    steps = np.round(ts[:-1] * n_train - 1.0).astype(np.int64)
    if np.any(np.diff(steps) >= 0) or steps[-1] < 0:
        raise ValueError(f"the {grid} grid with {nfe} steps has repeated train indices: {steps.tolist()}")
    return steps.tolist()


@contextlib.contextmanager
def _quiet_diffusers(diffusers):
    """diffusers' logger at error level inside the block (the singlestep scheduler logs a warning each time it
    switches lower_order_final on; the runner records the switch in the settings instead)."""
    logging = diffusers.utils.logging
    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(old)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """torch's default dtype set to ``dtype`` inside the block (process-wide: the lab runs peers one at a time)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _note_ddim_end(sched, spec: dict, endpoint: str, settings: dict, n_train: int) -> None:
    """DDIM steps to ``timestep - N // steps``: say where its last step really lands."""
    if spec["class"] != "DDIMScheduler":
        settings["t_end_actual"] = 0.0 if endpoint == "zero" else 1.0 / n_train
        return
    prev = int(sched.timesteps[-1]) - n_train // sched.num_inference_steps
    if prev < 0:
        settings["t_end_actual"] = 0.0 if endpoint == "zero" else 1.0 / n_train
    else:
        settings["t_end_actual"] = (prev + 1) / n_train
        settings["note"] = (f"DDIM's last step goes to train index {prev} (timestep - N // steps), not to the "
                            f"final alpha: the output lives at t = {(prev + 1) / n_train:g}, not at the requested "
                            f"endpoint {endpoint!r} (diffusers' behaviour when steps does not divide N)")
    ts = sched.timesteps.numpy()
    if len(ts) > 1 and np.any(np.diff(ts) != -(n_train // sched.num_inference_steps)):
        settings["note_grid"] = ("the model is evaluated at timesteps that differ from the times DDIM stepped to "
                                 "(trailing spacing with steps not dividing N)")


# ----- k-diffusion

def _steps_for(calls: str, nfe: int, to_zero: bool) -> int:
    """The largest number of steps whose model calls stay within nfe."""
    def cost(steps: int) -> int:
        if calls == "one":
            return steps
        return 2 * steps - 1 if to_zero else 2 * steps  # two per step, the Euler step onto sigma = 0 one

    steps = max((s for s in range(1, nfe + 1) if cost(s) <= nfe), default=0)
    if steps == 0:
        raise ValueError(f"nfe={nfe} is too small for one step of this sampler (a step costs {cost(1)} calls).")
    return steps


def _zero_noise(sigma, sigma_next):  # never called at eta = 0; replaces sample_dpmpp_3m_sde's torchsde tree
    raise RuntimeError("noise requested from an eta = 0 sampler")


def _run_k_diffusion(spec: dict, denoiser: _Counted, x_T: torch.Tensor, nfe: int, endpoint: str,
                     settings: dict) -> torch.Tensor:
    kd = _k_diffusion_sampling()
    schedule = denoiser.schedule
    a_max, s_max = schedule.alpha_sigma(schedule.t_max)
    a_min, s_min = schedule.alpha_sigma(schedule.t_min)
    sigma_max, sigma_min = s_max / a_max, s_min / a_min
    to_zero = endpoint == "zero"
    settings.update({"function": spec["function"], "version": _k_diffusion_version(),
                     "import": _KD_CACHE.get("how"), "options": dict(spec["options"]),
                     "sigma_min": sigma_min, "sigma_max": sigma_max})

    def model(x_ve: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])              # k-diffusion passes one noise level for the whole batch
        t = float(schedule.t_from_log_snr(-math.log(s)))
        return denoiser(schedule.alpha(t) * x_ve, t).x0

    x = x_T / a_max
    fork = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):        # Euler/Heun/DPM-2/dpm_fast draw randn_like even at churn 0
        if spec["grid"] == "dpm_fast":
            settings["grid"] = f"uniform in log sigma from {sigma_max:g} to {sigma_min:g}, {nfe} evaluations"
            out = kd.sample_dpm_fast(model, x, sigma_min, sigma_max, nfe, disable=True)
        else:
            steps = _steps_for(spec["calls"], nfe, to_zero)
            make = {"karras": kd.get_sigmas_karras, "exponential": kd.get_sigmas_exponential}[spec["grid"]]
            # k-diffusion grids: n sigmas from sigma_max to sigma_min, then 0 appended.
            sigmas = make(steps if to_zero else steps + 1, sigma_min, sigma_max).to(torch.float64)
            if not to_zero:
                sigmas = sigmas[:-1]
            settings.update(steps=steps, grid=[float(s) for s in sigmas])
            options = dict(spec["options"])
            if spec["function"] == "sample_dpmpp_3m_sde":
                options["noise_sampler"] = _zero_noise
            out = getattr(kd, spec["function"])(model, x, sigmas, disable=True, **options)
    return out.to(torch.float64) * (1.0 if to_zero else a_min)


def _k_diffusion_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("k-diffusion")
    except Exception:  # noqa: BLE001
        return None
