"""diffusers schedulers that run dpmsolve's solvers: a drop-in for any diffusers pipeline.

``DPMSolveScheduler`` is one generic scheduler: it builds a dpmsolve schedule from the usual diffusers config
(betas, prediction type, flow sigmas), a dpmsolve grid, and drives any fixed-grid dpmsolve solver through its
ask/tell protocol, one model evaluation per ``step``. It holds no solver maths: the update is the solver's own,
so a pipeline run equals ``dpmsolve.sample`` on the same model, noise and grid. The named subclasses (presets)
fix the solver and its default options:

```python
from dpmsolve.integrations.diffusers import DPMSolverPPMultistepScheduler
pipe.scheduler = DPMSolverPPMultistepScheduler.from_config(pipe.scheduler.config)
pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, solver="unipc",
                                               solver_options={"order": 3}, grid="karras")
```

A tuned :class:`~dpmsolve.Plan` (``dpmsolve.tune``, saved with ``plan.save``) runs the same way: the config holds
its file path, and the plan's times and step settings replace ``solver`` and ``grid``:

```python
pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, plan="digits-8nfe.plan.json")
pipe(..., num_inference_steps=pipe.scheduler.plan.nfe)
```

Conventions (see ``set_timesteps``): ``timesteps`` are the network's time values of the evaluations, as float32
-- the fractional train index ``N t - 1`` for DDPM-type models (UNet2DModel / UNet2DConditionModel accept
fractional timesteps; our discrete schedule interpolates log alpha between train steps, as the reference
DPM-Solver), ``N t`` for flow models (``use_flow_sigmas``; SD3/Flux pipelines pass it on as sigma * 1000).
``sigmas`` holds the VE ratio sigma/alpha (flow: the flow sigma t) of every grid time, the end included.

``from_config`` of a diffusers scheduler's config (DPMSolverMultistep, DPMSolverSinglestep, UniPC, DEIS, Euler,
Heun, LMS, PNDM, DDIM) runs that scheduler's own method on its own timesteps, so that swapping keeps the
pipeline's samples (``from_config`` lists the known differences); ``solver=`` (or a preset class) names another
solver, which keeps the config's schedule and the diffusers options it has; ``sampler=`` / ``scheduler=`` take
ComfyUI's names (``dpmsolve.presets``). It warns once naming every set option it cannot honour. A preset
(``UniPCScheduler``, ...) always runs its own solver, whatever config it is built from.

Solvers that evaluate between grid times (Heun, DPM-2, PNDM / PLMS, the two-stage SDE samplers) list every
evaluation in ``timesteps`` (diffusers' Heun does the same: each inner time twice); ``num_inference_steps`` then
counts grid intervals and ``order`` the evaluations per step, and ``set_begin_index`` takes the first evaluation
of a step (``order * i``, as img2img pipelines pass it).

Behaviours of diffusers' own schedulers that this one does not copy: ``step`` accepts ``generator`` (diffusers'
UniPC/DEIS raise a TypeError inside ``DDPMPipeline``); it never rounds timesteps to integers (so no duplicated
timesteps on dense Karras grids); the solver's lower-order final steps are explicit solver options, not gated on
the number of steps (diffusers applies ``lower_order_final`` below 15 steps only).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .._checks import check_count as _check_count
from .._checks import check_tensor
from ..ems.statistics import EMS, EMSError
from ..grids import DIFFUSERS_SIGMA_FLAGS, GRIDS, check_grid, make_grid
from ..model import PREDICTIONS, ClipX0, Denoiser, DynamicThresholding, Prediction
from ..sampling import NonFiniteError, _check_finite, inversion_grid
from ..schedules import ZERO_SNR_ALPHA_BAR, DiscreteVP, RectifiedFlow
from ..solvers import SOLVERS, get_solver
from ..tuning.plan import Plan, PlanError, PlanSolver

__all__ = ["DPMSolveScheduler", "DPMSolveSchedulerOutput", "DDIMSolveScheduler", "DPMSolverPPMultistepScheduler",
           "DPMSolverSinglestepScheduler", "UniPCScheduler", "DPMSolveInverseScheduler"]

# diffusers' prediction_type -> dpmsolve.PREDICTIONS key
_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
_FINAL_SIGMAS = ("zero", "min")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' variance types (DDPMScheduler); the learned ones mean the model output carries variance channels
_VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                   "learned_range")
_LEARNED_VARIANCE = ("learned", "learned_range")
EMS_FILE = "ems.safetensors"     # DPM-Solver-v3 statistics, beside the config written by save_pretrained
_IN_MEMORY_EMS = "<in-memory EMS"

# ---- diffusers options that from_config translates (DPMSolverMultistepScheduler's, plus UniPC's own)
_ALGORITHMS = {"dpmsolver++": "dpmsolver++", "dpmsolver": "dpmsolver", "sde-dpmsolver++": "sde-dpmsolver++"}
_FOREIGN_ALGORITHMS = ("sde-dpmsolver", "deis")          # diffusers' own, without a dpmsolve solver
_SOLVER_TYPES = {"midpoint": ("solver_type", "dpmsolver"), "heun": ("solver_type", "taylor"),
                 "bh1": ("variant", "bh1"), "bh2": ("variant", "bh2"), "logrho": None}
_SPACINGS = {"linspace": None, "leading": None, "trailing": "time_uniform"}  # None: dpmsolve's grid instead
_FINAL_SIGMAS_TYPES = {"zero": "zero", "sigma_min": "min"}
# Options dpmsolve cannot honour, with the value that asks for nothing (any other value draws the warning).
_NEUTRAL = {"lambda_min_clipped": -math.inf, "time_shift_type": "exponential",
            "solver_p": None, "sigma_min": None, "sigma_max": None, "shift_terminal": None}
_DIFFUSERS_OPTIONS = ("solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                      "use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                      "timestep_spacing", "steps_offset", "final_sigmas_type", "predict_x0", "disable_corrector",
                      "skip_prk_steps", "set_alpha_to_one", "interpolation_type", "timestep_type", *_NEUTRAL)
_DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing")   # grids that are diffusers' own timesteps here
# The model's schedule: kept from a diffusers scheduler's config also where it holds that class's defaults (Heun's
# and KDPM2's betas default to 0.00085 / 0.012, not DDPM's 0.0001 / 0.02).
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")

# ---- the diffusers schedulers whose method from_config reproduces (see from_config)
_FAMILIES = {"DPMSolverMultistepScheduler": "dpm", "DPMSolverSinglestepScheduler": "singlestep",
             "UniPCMultistepScheduler": "unipc", "DEISMultistepScheduler": "deis", "EulerDiscreteScheduler": "euler",
             "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms", "PNDMScheduler": "pndm",
             "DDIMScheduler": "ddim",
             # diffusers' inverse schedulers: the method of their forward counterpart (by _class_name only)
             "DDIMInverseScheduler": "ddim", "DPMSolverMultistepInverseScheduler": "dpm"}
_KARRAS_PORTS = ("euler", "heun", "lms")      # k-diffusion ports: n timesteps, 'linspace' not rounded
_DDIM_SPACING = ("ddim", "pndm", *_KARRAS_PORTS)   # n timesteps (DPM-Solver-type: n + 1, the last dropped)


def _family(config: Mapping) -> str | None:
    """The diffusers scheduler a config belongs to (``_FAMILIES``' values): by its ``_class_name`` (saved configs),
    else by its first keys, which a live config (``scheduler.config``) holds in the order of that class's
    ``__init__`` parameters (diffusers' ``register_to_config``; options carried over from another scheduler's
    config by ``from_config`` follow them). None for any other scheduler, dpmsolve's own and hand-made dicts.
    KDPM2's options are LMS's, in the same order: its live config reads as LMS."""
    name = config.get("_class_name")
    if name:
        return _FAMILIES.get(str(name))
    if "solver" in config:
        return None
    keys = [k for k in config if not str(k).startswith("_")]
    for family in _FAMILIES.values():
        params = [k for k, _ in _family_defaults_cached(family)]
        if keys[:len(params)] == params:
            return family
    return None


@functools.lru_cache(maxsize=None)
def _family_defaults_cached(family: str) -> tuple:
    import diffusers

    name = next(k for k, v in _FAMILIES.items() if v == family)
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    return tuple((k, p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty)


def _family_defaults(family: str | None) -> dict:
    """The defaults of the diffusers scheduler ``family`` (a saved config omits the options left at them)."""
    return {} if family is None else dict(_family_defaults_cached(family))


def _family_solver(family: str, full: Mapping, found: Mapping, ignored: list) -> tuple[str, dict]:
    """The dpmsolve solver and options of diffusers scheduler ``family`` configured as ``full``."""
    if family in ("dpm", "singlestep"):
        algorithm = full.get("algorithm_type") or "dpmsolver++"
        solver = _ALGORITHMS.get(algorithm)
        if solver is None or (family == "singlestep" and solver == "sde-dpmsolver++"):
            solver = "dpmsolver++"
            ignored.append(f"algorithm_type={algorithm!r} (no dpmsolve solver; {solver!r} runs)")
        base = {"method": "singlestep", "split": "fixed"} if family == "singlestep" else {}
    else:
        solver, base = {"unipc": ("unipc", {}), "deis": ("deis", {"variant": "logrho"}), "euler": ("euler", {}),
                        "heun": ("heun", {}), "lms": ("lms", {"order": 4}), "ddim": ("ddim", {}),
                        "pndm": ("plms" if full.get("skip_prk_steps") else "pndm", {})}[family]
    if family == "euler":
        if full.get("interpolation_type", "linear") != "linear":
            ignored.append(f"interpolation_type={full['interpolation_type']!r} (dpmsolve interpolates log alpha "
                           "between train steps)")
        if full.get("timestep_type", "discrete") != "discrete":
            ignored.append(f"timestep_type={full['timestep_type']!r} (the network gets train-step timesteps)")
    return solver, {**base, **DPMSolveScheduler._solver_options_from(found, solver, base)}


def _family_grid(family: str, full: Mapping) -> tuple[str, dict]:
    """The grid (and options) giving the timesteps of diffusers scheduler ``family`` configured as ``full``."""
    flag = next((f for f in DIFFUSERS_SIGMA_FLAGS if full.get(f)), None)
    if flag is not None:
        return DIFFUSERS_SIGMA_FLAGS[flag], {}
    spacing = "linspace" if family == "singlestep" else (full.get("timestep_spacing") or "linspace")
    if spacing == "trailing":
        return "trailing", {}
    if spacing == "leading":
        options = {"steps_offset": int(full.get("steps_offset") or 0)}
        return "leading", {**options, "scheduler": "ddim"} if family in _DDIM_SPACING else options
    if family in _KARRAS_PORTS:
        return "normal", {}   # np.linspace(0, N - 1, n): train steps, unrounded, then sigma = 0
    return "linspace", {"scheduler": "ddim"} if family in _DDIM_SPACING else {}


def _family_noise_scale(family: str, full: Mapping) -> float:
    """The start noise's std in the adapter's coordinates x_t = alpha x0 + sigma eps: 1, except for the k-diffusion
    ports on 'linspace' / 'trailing' timesteps, whose init_noise_sigma is sigma_max and not sqrt(sigma_max^2 + 1)
    (diffusers' rule): their start is sigma(t_max) eps = sqrt(1 - alpha_bar[-1]) eps here."""
    if family not in _KARRAS_PORTS or (full.get("timestep_spacing") or "linspace") == "leading":
        return 1.0
    n = int(full.get("num_train_timesteps") or 1000)
    betas = _betas(n, full.get("beta_start", 0.0001), full.get("beta_end", 0.02),
                   full.get("beta_schedule") or "linear", full.get("trained_betas"))
    ac = _alphas_cumprod(betas, bool(full.get("rescale_betas_zero_snr")))
    return float(math.sqrt(1.0 - max(ac[-1], ZERO_SNR_ALPHA_BAR)))


def _family_final(family: str, full: Mapping) -> str:
    """final_sigma of diffusers scheduler ``family``: its final_sigmas_type, set_alpha_to_one, or fixed end."""
    if family in ("ddim", "pndm"):
        return "zero" if full.get("set_alpha_to_one") else "min"
    if family == "deis":
        return "min"
    if family in ("heun", "lms"):
        return "zero"
    return _FINAL_SIGMAS_TYPES[full.get("final_sigmas_type") or "zero"]


@dataclasses.dataclass
class DPMSolveSchedulerOutput(BaseOutput):
    """``prev_sample``: where the model is evaluated next (the final sample after the last step).
    ``pred_original_sample``: the x0 prediction of this step's model output."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
           trained_betas) -> np.ndarray:
    """diffusers' beta schedules, in float64."""
    n = int(num_train_timesteps)
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64).reshape(-1)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # betas_for_alpha_bar(..., alpha_transform_type="cosine")
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; valid: {', '.join(map(repr, _BETA_SCHEDULES))} "
                     "(or pass trained_betas).")


def _alphas_cumprod(betas: np.ndarray, rescale_zero_snr: bool) -> np.ndarray:
    ac = np.cumprod(1.0 - betas)
    if rescale_zero_snr:  # Lin et al. 2024, Alg. 1 (diffusers' rescale_zero_terminal_snr), on sqrt(alpha_bar)
        s = np.sqrt(ac)
        s0, s_t = s[0], s[-1]
        ac = ((s - s_t) * (s0 / (s0 - s_t))) ** 2  # last entry 0: DiscreteVP clamps it to 2**-24 as diffusers
        if ac[-2] <= ZERO_SNR_ALPHA_BAR:
            # diffusers' clamp would make alpha_bar rise at the last step (e.g. linear betas: alpha_bar[-2] = 4e-9);
            # continue it geometrically instead, so that log-SNR stays monotone.
            ac[-1] = ac[-2] ** 2 / ac[-3]
    return ac


# --------------------------------------------------------------------------------------------- validation

def _check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def _check_number(name: str, value, low: float, high: float = math.inf, high_included: bool = False) -> None:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value) \
        and low < value and (value <= high if high_included else value < high)
    if not ok:
        bound = "" if high == math.inf else f" and {'<=' if high_included else '<'} {high:g}"
        raise ValueError(f"{name} must be a finite number > {low:g}{bound}, got {value!r}.")


def _finite_values(name: str, values) -> np.ndarray:
    """An explicit grid given to set_timesteps, as float64; NaN / Inf refused naming the argument."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"set_timesteps got empty {name}; pass at least one value.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"set_timesteps got {name} with NaN or Inf (at index {int(bad[0])}: {arr.tolist()}); pass "
                         f"finite, strictly decreasing {name}.")
    return arr


def _config_value(where: str, value):
    """``value`` as a scheduler config holds it (JSON): paths become strings, other objects are refused."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_config_value(where, v) for v in value]
    if isinstance(value, Mapping):
        return {k: _config_value(f"{where}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is a {type(value).__name__} object, which a scheduler config (JSON) cannot hold; "
                         "pass a number, string or file path instead.") from None
    return value


# --------------------------------------------------------------------------------------------- model output

class _ModelOutput(Denoiser):
    """The model output handed to ``step``, as a dpmsolve denoiser, so that x0 corrections (thresholding) wrap it
    as they wrap any network. ``output`` is set before each call."""

    def __init__(self, schedule, prediction: str):
        self.schedule, self.output, self._convert = schedule, None, PREDICTIONS[prediction]

    def __call__(self, x, t, **model_kwargs):
        a, s = self.schedule.alpha_sigma(t)
        return Prediction(*self._convert(self.output.to(x.dtype), x, a, s))


def _diffusers_thresholding(denoiser: Denoiser, ratio: float, max_value: float) -> Denoiser:
    """diffusers' dynamic thresholding, ``s = clamp(quantile_ratio(|x0|), 1, max_value)``, ``x0 -> clamp(x0, -s, s)
    / s``, composed of dpmsolve's wrappers: clipping to ``+-max_value`` first caps the quantile at max_value, then
    DynamicThresholding raises it to at least 1 (``min(1, max_value)``: diffusers' clamp gives max_value when it
    is below 1)."""
    return DynamicThresholding(ClipX0(denoiser, -max_value, max_value), ratio, min(1.0, max_value))


# --------------------------------------------------------------------------------------------- from_config

def _solver_params(name: str, options: dict) -> set[str]:
    """The options solver ``name`` (built with ``options``; unknown names and options raise) takes."""
    built = type(get_solver(name, **options))
    if inspect.isclass(SOLVERS[name]):
        return set(inspect.signature(built).parameters)
    # A family name ('dpmsolver', 'dpmsolver++') fixes the prediction and the method picks the class.
    return set(inspect.signature(built).parameters) - {"predict"}


def _same_solver(name: str, a: dict, b: dict) -> bool:
    """Whether options ``a`` and ``b`` give solver ``name`` of one class (multistep vs singlestep DPM-Solver++)."""
    return type(get_solver(name, **a)) is type(get_solver(name, **b))


class DPMSolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any dpmsolve fixed-grid solver (ask/tell), one evaluation per ``step``.

    Args:
        num_train_timesteps: train steps N of the DDPM schedule, as in diffusers (``DiscreteVP``; times
            ``t = (n + 1) / N`` for train index n).
        beta_start: first beta of the ``'linear'`` / ``'scaled_linear'`` schedules.
        beta_end: last beta of those schedules.
        beta_schedule: ``'linear'``, ``'scaled_linear'`` or ``'squaredcos_cap_v2'``, as in diffusers.
        trained_betas: explicit betas, one per train step, each in (0, 1]; replace ``beta_schedule``.
        rescale_betas_zero_snr: rescale the schedule to zero terminal SNR (Lin et al. 2024), as in diffusers.
        prediction_type: ``'epsilon'``, ``'sample'``, ``'v_prediction'`` or ``'flow_prediction'``.
        solver: a dpmsolve registry name; any fixed-grid solver (not the adaptive one: a pipeline needs its
            timesteps up front).
        solver_options: the solver's options (``{"order": 3}``). DPM-Solver-v3's ``ems`` may be an EMS object
            (the config then shows ``'<in-memory EMS ...>'``; ``save_pretrained`` writes it beside the config as
            ``ems.safetensors``) or the path of an EMS file.
        grid: a dpmsolve grid name (``'logSNR'``, ``'time_uniform'``, ``'time_quadratic'``, ``'karras'``,
            ``'exponential'``, ``'flow_shift'``, ComfyUI's and diffusers' names, ``'ays'``, ``'gits'``); default
            ``'logSNR'``, or ``'flow_shift'`` with ``shift=flow_shift`` for flow models. diffusers' ``'leading'``,
            ``'linspace'``, ``'trailing'`` are diffusers' own timesteps (``'leading'`` starts below the top, where
            diffusers starts; ``final_sigma='min'`` then ends at the training sigma_min as diffusers does).
        grid_options: the grid's options (``{"rho": 7}`` for karras).
        final_sigma: ``'zero'``: the grid ends at t = 0 and the last step returns the x0 prediction at the last
            evaluated time (diffusers' ``final_sigmas_type='zero'``, k-diffusion's appended zero); ``'min'``:
            it ends at the schedule's t_min (the training sigma of index 0; flow: 1/N).
        use_flow_sigmas: a rectified-flow model (``x_t = (1 - t) x0 + t eps``, t in [1/N, 1 - 1/N]) whose network
            takes ``N t`` (SD3/Flux pass sigma * 1000).
        flow_shift: the default grid's shift for flow models.
        use_dynamic_shifting: for flow models, ``set_timesteps(mu=...)`` sets the shift to ``exp(mu)`` (Flux).
        plan: the path of a :class:`~dpmsolve.Plan` file (``Plan.save``; a path keeps the config JSON-serialisable),
            loaded and checked against this scheduler's schedule when the scheduler is built (a
            :class:`~dpmsolve.PlanError` naming the path otherwise) and against the sample shape on the first step.
            The plan's times and per-step settings then replace ``solver``, ``solver_options``, ``grid``,
            ``grid_options`` and ``final_sigma`` (which stay in the config, unused): ``set_timesteps`` takes no
            count but the plan's (``plan.nfe``), and a run equals ``dpmsolve.sample(denoiser, x_T, plan)``. The
            loaded plan is ``scheduler.plan`` (None without one). A relative path is read from the working
            directory, also by ``from_pretrained``. A plan with DPM-Solver-v3 steps takes the statistics from
            ``solver_options["ems"]`` (with ``solver="dpmsolver-v3"``).
        variance_type: diffusers' name; ``'learned'`` / ``'learned_range'``: the model output has twice the
            sample's channels and ``step`` keeps the first half (the prediction), as diffusers' DPM-Solver does.
        thresholding: diffusers' dynamic thresholding of the x0 prediction
            (``s = clamp(quantile_ratio(|x0|), 1, sample_max_value)``, ``x0 -> clamp(x0, -s, s) / s``), run as
            dpmsolve's ``ClipX0`` + ``DynamicThresholding`` wrappers.
        dynamic_thresholding_ratio: the quantile ratio of ``thresholding``, in (0, 1].
        sample_max_value: the largest threshold ``s`` of ``thresholding``.
        check_finite: ``step`` raises :class:`~dpmsolve.NonFiniteError` (naming the step and timestep) when the
            model output holds NaN or Inf, as ``dpmsolve.sample`` does (one read-back per step).
        clip_sample: diffusers' x0 clipping to ``+-clip_sample_range`` (DDIM, Heun), as dpmsolve's ``ClipX0``;
            ``thresholding`` takes precedence, as in diffusers.
        clip_sample_range: the bound of ``clip_sample``.
        discard_penultimate_sigma: ComfyUI's rule for its ``dpm_2``, ``dpm_2_ancestral``, ``uni_pc`` samplers: the
            named grid of one step more, without its penultimate time.
        init_noise_sigma: the scale a pipeline gives the start noise (1: x_T = eps, the adapter's coordinates are
            ``alpha x0 + sigma eps``); ``from_config`` of diffusers' Euler / Heun / LMS on 'linspace' / 'trailing'
            timesteps sets ``sqrt(1 - alpha_bar_T)``, their start.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler",
                                                                  "FlowMatchHeunDiscreteScheduler"]
    order = 1
    _default_solver: str = "dpmsolver++"
    _default_solver_options: dict = {"order": 2}
    _preset = False   # a preset runs its own solver whatever config it is built from (see from_config)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | np.ndarray | None = None,
                 rescale_betas_zero_snr: bool = False, prediction_type: str = "epsilon",
                 solver: str | None = None, solver_options: dict[str, Any] | None = None,
                 grid: str | None = None, grid_options: dict[str, Any] | None = None, final_sigma: str = "zero",
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, use_dynamic_shifting: bool = False,
                 plan: str | None = None, variance_type: str | None = None, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 check_finite: bool = True, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 discard_penultimate_sigma: bool = False, init_noise_sigma: float = 1.0):
        # Class defaults of the named presets are written into the config, so a saved config is self-contained.
        if solver is None:
            solver = self._default_solver
            if solver_options is None:
                solver_options = dict(self._default_solver_options)
        solver_options = dict(solver_options or {})
        grid_options = dict(grid_options or {})
        n = _check_count("num_train_timesteps", num_train_timesteps, minimum=2)
        if trained_betas is not None:
            trained_betas = [float(b) for b in np.asarray(trained_betas, dtype=np.float64).reshape(-1)]
            bad = [(k, b) for k, b in enumerate(trained_betas) if not 0.0 < b <= 1.0]
            if bad:
                raise ValueError(f"trained_betas must hold values in (0, 1] (one beta per train step), got "
                                 f"{bad[0][1]!r} at index {bad[0][0]}"
                                 f"{f' ({len(bad)} such values)' if len(bad) > 1 else ''}; pass the betas the model "
                                 "was trained with.")
            if len(trained_betas) != n:
                raise ValueError(f"trained_betas must hold num_train_timesteps={n} values, got {len(trained_betas)}; "
                                 "pass one beta per train step, or set num_train_timesteps to their number.")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            _check_number(name, value, 0.0, 1.0)
        _check_choice("beta_schedule", beta_schedule, _BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, tuple(_PREDICTION_TYPES))
        if grid is not None:
            _check_choice("grid", grid, tuple(GRIDS))
        if final_sigma not in _FINAL_SIGMAS:
            raise ValueError(f"final_sigma must be 'zero' (end at sigma = 0) or 'min' (end at t_min), got "
                             f"{final_sigma!r} (diffusers' final_sigmas_type='sigma_min' is final_sigma='min').")
        _check_number("flow_shift", flow_shift, 0.0)
        _check_choice("variance_type", variance_type, _VARIANCE_TYPES)
        _check_number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0.0, 1.0, high_included=True)
        _check_number("sample_max_value", sample_max_value, 0.0)
        _check_number("clip_sample_range", clip_sample_range, 0.0)
        _check_number("init_noise_sigma", init_noise_sigma, 0.0)
        for name, value in (("rescale_betas_zero_snr", rescale_betas_zero_snr), ("use_flow_sigmas", use_flow_sigmas),
                            ("use_dynamic_shifting", use_dynamic_shifting), ("thresholding", thresholding),
                            ("check_finite", check_finite), ("clip_sample", clip_sample),
                            ("discard_penultimate_sigma", discard_penultimate_sigma)):
            _check_bool(name, value)
        if isinstance(plan, Plan):
            raise ValueError("The scheduler config holds a plan's file path (configs are JSON): save the plan with "
                             "plan.save('name.plan.json') and pass plan='name.plan.json'.")
        if plan is not None:
            if not isinstance(plan, (str, os.PathLike)):
                raise TypeError(f"plan must be the path of a plan file (str), got {plan!r} ({type(plan).__name__}); "
                                "save a plan with plan.save('name.plan.json') and pass plan='name.plan.json'.")
            plan = os.fspath(plan)
        ems = solver_options.get("ems")
        if isinstance(ems, str) and ems.startswith(_IN_MEMORY_EMS):
            raise EMSError(f"solver_options['ems'] is {ems!r}: this config comes from a scheduler built with an EMS "
                           "object, which a config cannot hold. Pass solver_options={'ems': ems_object} again, or "
                           "save that scheduler with save_pretrained (it writes ems.safetensors beside the config) "
                           "and load it with from_pretrained.")
        in_config = {k: v for k, v in solver_options.items() if k != "ems" or not isinstance(v, EMS)}
        in_config = _config_value("solver_options", in_config)
        if isinstance(ems, EMS):
            in_config["ems"] = f"{_IN_MEMORY_EMS} {ems.model!r}>"
        self.register_to_config(solver=solver, solver_options=in_config, trained_betas=trained_betas, plan=plan,
                                grid_options=_config_value("grid_options", grid_options))
        # solver and solver_options are choices now, also where the class defaults made them: from_config of
        # this live config must carry them over (as it does from a saved one).
        self.register_to_config(_use_default_values=[k for k in self.config.get("_use_default_values", [])
                                                     if k not in ("solver", "solver_options")])

        self.solver = get_solver(solver, **solver_options)
        if self.solver.adaptive and plan is None:
            raise ValueError(f"Solver {solver!r} with options {solver_options} is adaptive: its evaluation times "
                             "are not known up front, so it cannot drive a diffusers pipeline. Use a fixed-grid "
                             "solver (e.g. 'dpmsolver++' with method='multistep').")
        if not self.solver.adaptive and not hasattr(self.solver, "plan") and self.solver.expected_nfe(4) != 4:
            raise ValueError(f"Solver {solver!r} evaluates the model {self.solver.expected_nfe(4)} times over 4 "
                             "grid intervals, at times it does not plan up front; a diffusers pipeline needs every "
                             "timestep before the first step. Use dp.sample or dpmsolve.integrations.kdiffusion "
                             "for it.")
        # Model evaluations per grid interval, as diffusers' ``order`` (2 for Heun-type schedulers; progress bars).
        nfe = None if self.solver.adaptive else self.solver.expected_nfe(64)
        self.order = max(1, (nfe or 64) // 64)
        if use_flow_sigmas:
            self.schedule = RectifiedFlow(t_min=1.0 / n, t_max=1.0 - 1.0 / n)
        else:
            betas = _betas(n, beta_start, beta_end, beta_schedule, trained_betas)
            self.schedule = DiscreteVP.from_alphas_cumprod(_alphas_cumprod(betas, rescale_betas_zero_snr))
        self._output = _ModelOutput(self.schedule, _PREDICTION_TYPES[prediction_type])
        self._denoiser = self._output
        if thresholding:
            self._denoiser = _diffusers_thresholding(self._output, float(dynamic_thresholding_ratio),
                                                     float(sample_max_value))
        elif clip_sample:   # diffusers' clip_sample (DDIM, Heun; thresholding wins): x0 clipped to +-clip_sample_range
            self._denoiser = ClipX0(self._output, -float(clip_sample_range), float(clip_sample_range))
        self.plan = self._load_plan(plan) if plan is not None else None
        if self.plan is not None:
            self.solver = self.plan.solver(solver_options.get("ems") if self.plan.uses_ems else None)
        self._grid_kind, self._grid_options = self._default_grid(flow_shift)
        if grid is not None:
            self._grid_kind = grid
            self._grid_options = grid_options
        elif grid_options:
            self._grid_options.update(grid_options)
        make_grid(self.schedule, 1, self._grid_kind, **self._grid_options)  # refuse bad grid options now

        self.init_noise_sigma = float(init_noise_sigma)
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._ts = None          # float64 grid of N + 1 times, the end included
        self._eval_ts = None     # float64 time of each evaluation (= timesteps)
        self._grid_index = None  # per evaluation: the grid index its step starts at (-1: inside a step)
        self._network_ts = None  # float64 copy of timesteps (checked against the timestep given to step)
        self._denoise_to_zero = False  # a plan's final denoising evaluation (one timestep more than steps)
        self._begin_index = None
        self._reset()

    def _check_plan_shape(self, sample: torch.Tensor) -> None:
        try:
            self.plan.check(data_shape=tuple(sample.shape[1:]))
        except PlanError as err:
            raise PlanError(f"The plan {self.config.plan}: {err}") from None

    def _load_plan(self, path: str) -> Plan:
        """The plan at ``path``, checked against this scheduler's schedule (a PlanError naming the path)."""
        try:
            return Plan.load(path, schedule=self.schedule)
        except PlanError as err:
            message = str(err)
            if path not in message:
                message = f"The plan {path}: {message}"
            raise PlanError(message) from None

    def _default_grid(self, shift: float):
        if self.config.use_flow_sigmas:
            return "flow_shift", {"shift": float(shift)}
        return "logSNR", {}

    def _reset(self):
        self._step_index = None
        self._state = None
        self._active = None      # the solver driving this run (the plan's tail after set_begin_index)
        self._x = None           # the point of the next evaluation (work dtype)
        self._returned = None    # the tensor handed back by the last step (to recognise it as the next sample)

    # --------------------------------------------------------------------------------------------- config

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, sampler: str | None = None,
                    scheduler: str | None = None, **kwargs):
        """As ``ConfigMixin.from_config``, reading diffusers' options where dpmsolve has the equivalent.

        - ``sampler`` / ``scheduler``: ComfyUI names (``dpmsolve.presets``; ``sampler`` may hold both, as in
          ``'dpmpp_2m_karras'``): the sampler sets ``solver`` and ``solver_options`` (and ComfyUI's grid rules:
          ``discard_penultimate_sigma`` for dpm_2 / uni_pc, the range ends for dpm_fast), the scheduler ``grid``
          and ``grid_options``; the grid then ends at sigma = 0 (ComfyUI's sigmas do) unless ``final_sigma`` is
          given. Not with ``solver=``, nor on a preset class (which runs its own solver).
        - The source scheduler's own method (the generic class, when neither the config nor a keyword names a
          dpmsolve solver, sampler or grid): a config of ``DPMSolverMultistepScheduler``,
          ``DPMSolverSinglestepScheduler``, ``UniPCMultistepScheduler``, ``DEISMultistepScheduler``,
          ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler``, ``PNDMScheduler`` or
          ``DDIMScheduler`` (known by its ``_class_name``, or by the options only it has) runs the equivalent
          dpmsolve solver on diffusers' own timesteps, so that swapping keeps the pipeline's samples: the solver
          from ``algorithm_type`` / ``solver_order`` / ``solver_type`` / ``predict_x0`` / ``lower_order_final`` /
          ``disable_corrector`` (DPM-Solver(++), UniPC, DEIS ``'logrho'``), ``'euler'``, ``'heun'``, ``'lms'``,
          ``'pndm'`` (``'plms'`` with ``skip_prk_steps``) or ``'ddim'``; the grid from the sigma flags
          (``use_karras_sigmas`` ...) or ``timestep_spacing`` + ``steps_offset`` (diffusers' ``'leading'``,
          ``'linspace'``, ``'trailing'`` timesteps of that scheduler; the k-diffusion ports' unrounded
          ``'linspace'`` is ``'normal'``); the end from ``final_sigmas_type`` or ``set_alpha_to_one``; and
          ``clip_sample``. Heun, PNDM and PLMS evaluate between grid times: ``timesteps`` then lists every
          evaluation (Heun: each inner time twice, as diffusers' Heun), with ``num_inference_steps`` grid
          intervals. Known differences: diffusers applies ``lower_order_final`` below 15 steps only (dpmsolve at
          every count: it changes 3rd-order runs of 15+ steps); DEIS with a sigma flag ends with a zero-length step
          in diffusers; DDIM / PNDM with ``'linspace'`` step to ``t - N // n``, not to the next timestep
          (diffusers' quirk, not copied); singlestep order 3 splits remainders differently; KDPM2's live config
          has LMS's options (it runs LMS; pass ``solver='dpm2'``).
        - Otherwise, a preset (``UniPCScheduler``, ``DPMSolverPPMultistepScheduler``, ...) runs its own solver and
          keeps the config's ``solver_options`` only when they configure that same solver; the generic class runs
          the config's ``solver``, else the one of ``algorithm_type``, else its default, with the options above
          where the solver takes them; the grid (unless the config or a keyword names one) is the sigma flag's
          (``use_karras_sigmas`` -> ``'karras'``, ``use_lu_lambdas`` -> ``'logSNR'``, ``use_exponential_sigmas``
          -> ``'exponential'``, ``use_beta_sigmas`` -> ``'beta_sigmas'``), ``'time_uniform'`` for
          ``timestep_spacing='trailing'``, else dpmsolve's default grid; ``final_sigmas_type`` -> ``final_sigma``.
        - A flow-matching source config (``FlowMatch*`` class, or a DPM/UniPC config with ``use_flow_sigmas``)
          turns on ``use_flow_sigmas`` with ``prediction_type='flow_prediction'``; its ``shift`` becomes
          ``flow_shift``.

        Set options it cannot honour (a finite ``lambda_min_clipped``, ``euler_at_final`` with
        ``final_sigma='min'``, an ``algorithm_type`` without a dpmsolve solver, Euler's ``interpolation_type=
        'log_linear'``, ...) draw ONE warning naming each. Unknown values of the options it reads are errors listing
        the valid ones. Keyword arguments override everything (diffusers' options are accepted as keywords too).
        """
        if sampler is not None or scheduler is not None:
            kwargs = cls._preset_keywords(sampler, scheduler, kwargs)
        if isinstance(config, Mapping):
            config = cls._translate(dict(config), kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _preset_keywords(cls, sampler: str | None, scheduler: str | None, kwargs: dict) -> dict:
        """``kwargs`` with the settings of ComfyUI's ``sampler`` / ``scheduler`` names (dpmsolve.presets)."""
        from ..presets import SCHEDULERS, preset_settings

        if cls._preset and sampler is not None:
            raise ValueError(f"{cls.__name__} runs its own solver ({cls._default_solver!r}); sampler={sampler!r} "
                             "selects another: use DPMSolveScheduler.from_config(config, sampler=...).")
        if sampler is not None and kwargs.get("solver") is not None:
            raise ValueError(f"sampler={sampler!r} and solver={kwargs['solver']!r} both name the solver; pass one.")
        if sampler is not None:
            settings = preset_settings(sampler, scheduler)
        else:
            if scheduler not in SCHEDULERS:
                raise ValueError(f"Unknown scheduler {scheduler!r}; ComfyUI schedulers: {', '.join(SCHEDULERS)}.")
            grid, grid_options = SCHEDULERS[scheduler]
            settings = {"grid": grid, "grid_options": dict(grid_options), "final_sigma": "zero"}
        given = sorted(k for k in settings if k in kwargs and k not in ("solver_options", "grid_options",
                                                                         "final_sigma"))
        if given:
            raise ValueError(f"{', '.join(given)} and sampler / scheduler names both set the same thing; pass one.")
        out = dict(kwargs)
        for key, value in settings.items():
            if key in ("solver_options", "grid_options") and key in kwargs:
                value = {**value, **dict(kwargs[key] or {})}   # the caller's options override the preset's
            elif key == "final_sigma" and key in kwargs:
                value = kwargs[key]
            out[key] = value
        return out

    @classmethod
    def _translate(cls, config: dict, kwargs: dict) -> dict:
        """``config`` with diffusers' options (read from it and moved out of ``kwargs``) put into this
        scheduler's keys; warns once about set options it cannot honour."""
        # Keys a live config left at its class defaults are not choices (diffusers drops them the same way); the
        # effective values of diffusers' options are read first.
        defaulted = set(config.pop("_use_default_values", ()))
        if "solver" in kwargs and kwargs["solver"] is None:   # solver=None: not a choice
            del kwargs["solver"]
        keywords = {k: kwargs.pop(k) for k in list(kwargs) if k in _DIFFUSERS_OPTIONS}
        foreign = "solver" not in config   # a config of diffusers' own schedulers (dpmsolve's always names one)
        config.update(keywords)
        family = _family(config)
        full = {**_family_defaults(family), **config}   # a saved config omits its class's defaults
        found = {k: full[k] for k in _DIFFUSERS_OPTIONS if k in full}
        for key in defaulted - set(keywords):
            if family is None or key not in _SCHEDULE_KEYS:   # (the model's schedule: its class defaults count)
                config.pop(key, None)
        ignored = []

        source = str(full.get("_class_name", ""))  # present in loaded configs, not in live ones
        flow_matching = source.startswith("FlowMatch") or (
            not source and "shift" in full and "beta_start" not in full and "use_flow_sigmas" not in full)
        if flow_matching:
            config.setdefault("use_flow_sigmas", True)
            config["prediction_type"] = "flow_prediction"
            if "shift" in full and "flow_shift" not in config:
                config["flow_shift"] = float(full["shift"])
        if config.get("use_flow_sigmas"):
            config.setdefault("prediction_type", "flow_prediction")

        for name, valid in (("algorithm_type", (*_ALGORITHMS, *_FOREIGN_ALGORITHMS)), ("solver_type", _SOLVER_TYPES),
                            ("timestep_spacing", _SPACINGS), ("final_sigmas_type", _FINAL_SIGMAS_TYPES)):
            if found.get(name) is not None:
                _check_choice(name, found[name], tuple(valid))

        # Solver and its options.
        algorithm = found.get("algorithm_type")
        given_solver, given = config.get("solver"), config.get("solver_options")
        # The source scheduler's own method: the generic class, no dpmsolve solver named (its grid too, unless one
        # is named).
        reproduce = (family is not None and not cls._preset and not given_solver and "solver" not in kwargs
                     and not config.get("use_flow_sigmas"))
        if foreign and not reproduce:   # diffusers' x0 clipping belongs to that scheduler's own method
            config.pop("clip_sample", None)
            config.pop("clip_sample_range", None)
        if cls._preset:
            solver = cls._default_solver
        elif reproduce:
            solver, family_options = _family_solver(family, full, found, ignored)
        else:
            solver = given_solver or _ALGORITHMS.get(algorithm) or cls._default_solver
            if algorithm in _FOREIGN_ALGORITHMS and not given_solver and "solver" not in kwargs:
                ignored.append(f"algorithm_type={algorithm!r} (no dpmsolve solver; {solver!r} runs)")
        solver = kwargs.get("solver") or solver
        if given is not None and given_solver is None:   # options for the class's default solver
            given_solver = cls._default_solver
        config["solver"] = solver
        if "solver_options" not in kwargs:
            base = dict(cls._default_solver_options) if solver == cls._default_solver else {}
            if reproduce:
                options = family_options
            elif given is not None and given_solver == solver and (
                    not cls._preset or _same_solver(solver, dict(given), base)):
                options = {**given, **cls._solver_options_from(keywords, solver, dict(given))}  # keywords win
            else:
                options = {**base, **cls._solver_options_from(found, solver, base)}
            config["solver_options"] = options

        # Grid and end.
        grid_keywords = {*DIFFUSERS_SIGMA_FLAGS, "timestep_spacing", "steps_offset"}
        grid_chosen = "grid" in kwargs or (config.get("grid") is not None and not grid_keywords & set(keywords))
        if not grid_chosen:
            grid_options = {}
            if reproduce:   # (not chosen: no grid keyword)
                grid, grid_options = _family_grid(family, full)
            else:
                flag = next((f for f in DIFFUSERS_SIGMA_FLAGS if found.get(f)), None)
                grid = DIFFUSERS_SIGMA_FLAGS[flag] if flag else _SPACINGS[found.get("timestep_spacing") or "linspace"]
            if grid is not None:
                if (config.get("grid") not in (None, grid) or reproduce) and "grid_options" not in kwargs:
                    config["grid_options"] = grid_options   # (the old grid's options do not apply)
                config["grid"] = grid
        if reproduce and "final_sigma" not in kwargs:
            config["final_sigma"] = _family_final(family, full)
        elif "final_sigmas_type" in found and "final_sigma" not in kwargs and (
                "final_sigma" not in config or "final_sigmas_type" in keywords):
            config["final_sigma"] = _FINAL_SIGMAS_TYPES[found["final_sigmas_type"]]
        if reproduce and family in ("ddim", "heun"):
            config["clip_sample"] = bool(full.get("clip_sample", False))
            config["clip_sample_range"] = float(full.get("clip_sample_range", 1.0))
        if reproduce and "init_noise_sigma" not in kwargs:
            config["init_noise_sigma"] = _family_noise_scale(family, full)
        final = kwargs.get("final_sigma", config.get("final_sigma", "zero"))
        if found.get("euler_at_final") and final != "zero":   # with 'zero' the last step is first order anyway
            ignored.append("euler_at_final=True (final_sigma='min' ends with the solver's own order; pass "
                           "solver_options={..., 'lower_order_final': True})")
        for name, neutral in _NEUTRAL.items():
            if found.get(name, neutral) != neutral:
                ignored.append(f"{name}={found[name]!r}")
        if ignored:
            warnings.warn(f"{cls.__name__}.from_config cannot honour these diffusers options and ignores them: "
                          f"{'; '.join(ignored)}.", UserWarning, stacklevel=3)
        return config

    @staticmethod
    def _solver_options_from(found: dict, solver: str, base: dict) -> dict:
        """The options of ``solver`` that diffusers' solver settings in ``found`` ask for (those it takes)."""
        options = {}
        if "solver_order" in found:
            options.update(order=_check_count("solver_order", found["solver_order"]), warmup="lower_order")
        kind = _SOLVER_TYPES.get(found.get("solver_type"))
        if kind is not None:
            options[kind[0]] = kind[1]
        if "lower_order_final" in found:
            options["lower_order_final"] = bool(found["lower_order_final"])
        if "predict_x0" in found:
            options["predict"] = "data" if found["predict_x0"] else "noise"
        if found.get("disable_corrector"):
            options["disable_corrector"] = [int(k) for k in found["disable_corrector"]]
        if not options:
            return {}
        params = _solver_params(solver, base)
        return {k: v for k, v in options.items() if k in params}

    @classmethod
    def load_config(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        """As ``ConfigMixin.load_config``; DPM-Solver-v3 statistics saved beside the config (``ems.safetensors``,
        see ``save_pretrained``) are read from that directory."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        options = config.get("solver_options")
        ems = options.get("ems") if isinstance(options, dict) else None
        if isinstance(ems, str) and pretrained_model_name_or_path is not None and not os.path.isabs(ems):
            path = Path(os.fspath(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "") / ems
            if path.is_file():
                config["solver_options"] = {**options, "ems": str(path)}
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """As diffusers'; DPM-Solver-v3 statistics are written beside the config as ``ems.safetensors``, which the
        saved config names (relative to the directory, so that the folder can move)."""
        ems = getattr(self.solver, "ems", None)
        if not isinstance(ems, EMS):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        ems.save(Path(save_directory) / EMS_FILE)
        live = self._internal_dict
        self._internal_dict = FrozenDict({**live, "solver_options": {**live["solver_options"], "ems": EMS_FILE}})
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            self._internal_dict = live

    # --------------------------------------------------------------------------------------------- grid

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index, set by the pipeline with ``set_begin_index`` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at ``timesteps[begin_index]``: the solver is initialised at that grid point on the first step."""
        self._begin_index = int(begin_index)

    def _network_time(self, ts: np.ndarray) -> np.ndarray:
        n = self.config.num_train_timesteps
        if self.config.use_flow_sigmas:
            return n * ts
        values = n * np.asarray(ts, dtype=np.float64) - 1.0
        snapped = np.round(values)
        return np.where(np.abs(values - snapped) <= 1e-9 * n, snapped, values)   # train steps exactly (n t - 1)

    def _time_from_network(self, values: np.ndarray) -> np.ndarray:
        n = self.config.num_train_timesteps
        return values / n if self.config.use_flow_sigmas else (values + 1.0) / n

    def _noise_level(self, ts: np.ndarray) -> np.ndarray:
        """diffusers' ``sigmas``: sigma/alpha (VP) or the flow sigma t; 0 at t = 0."""
        if self.config.use_flow_sigmas:
            return ts.copy()
        out = np.zeros_like(ts)
        pos = ts > 0
        out[pos] = np.exp(-self.schedule.log_snr(ts[pos]))
        return out

    def _time_from_sigmas(self, sigmas) -> np.ndarray:
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if self.config.use_flow_sigmas:
            return sig.copy()
        ts = np.zeros_like(sig)
        pos = sig > 0
        ts[pos] = self.schedule.t_from_log_snr(-np.log(sig[pos]))
        return ts

    def _append_end(self, ts: np.ndarray, what: str) -> np.ndarray:
        """Evaluation times (+ a trailing 0 taken as the end) -> the full grid, ended as final_sigma says."""
        if ts.size >= 2 and ts[-1] == 0.0:
            return check_grid(self.schedule, ts, name=f"the grid from {what}")
        if self._ends_at_zero():
            return check_grid(self.schedule, np.append(ts, 0.0), name=f"the grid from {what}")
        t_min = self.schedule.t_min
        if ts[-1] <= t_min * (1 + 1e-9):
            raise ValueError(f"The last of the {what} is already the final noise level (t_min), where "
                             "final_sigma='min' ends the grid without evaluating; drop it, or use "
                             "final_sigma='zero'.")
        return check_grid(self.schedule, np.append(ts, t_min), name=f"the grid from {what}")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | list[float] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None):
        """Build the grid and reset the solver.

        With a ``plan`` in the config, the grid is the plan's own: ``num_inference_steps`` must be None or the
        plan's model evaluations (``plan.nfe``; a ValueError naming both otherwise), and explicit ``timesteps`` /
        ``sigmas`` are refused (tune or write a plan for other times); ``mu`` is ignored. A plan with
        ``denoise_to_zero`` has one timestep more than steps: its last ``step`` returns the x0 prediction there.

        Args:
            num_inference_steps: model evaluations (grid intervals) for the configured ``grid``.
            device: where ``timesteps`` live.
            timesteps: explicit network time values of the evaluations (train indices; flow: ``N t``), decreasing;
                the end (0 or t_min, per ``final_sigma``) is appended. Excludes the other two arguments.
            sigmas: explicit noise levels of the evaluations (sigma/alpha; flow: the flow sigma), decreasing, as
                diffusers' Flux pipeline passes them; a trailing 0 is taken as the end of the grid.
            mu: with ``use_dynamic_shifting`` (flow), the grid shift becomes ``exp(mu)``; ignored otherwise.
        """
        if num_inference_steps is not None:
            num_inference_steps = _check_count("num_inference_steps", num_inference_steps)
        if self.plan is not None:
            self._set_plan_timesteps(num_inference_steps, device, timesteps, sigmas)
            return
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            if given == ["num_inference_steps", "sigmas"] or given == ["num_inference_steps", "timesteps"]:
                given = given[1:]  # pipelines pass the count along with an explicit grid
            else:
                raise ValueError("Pass exactly one of num_inference_steps, timesteps or sigmas.")
        if given[0] == "timesteps":
            values = _finite_values("timesteps", timesteps)
            ts = self._time_from_network(values)
            inner = ts[:-1] if ts.size >= 2 and ts[-1] == 0.0 else ts   # a trailing 0 is the end of the grid
            if not self.schedule.contains(inner):
                lo, hi = self._network_time(np.array([self.schedule.t_min, self.schedule.t_max]))
                out = [v for v, t in zip(values.tolist(), inner.tolist()) if not self.schedule.contains(t)]
                raise ValueError(f"set_timesteps got timesteps outside the model's range [{lo:.6g}, {hi:.6g}] (network "
                                 f"timesteps): {', '.join(f'{v:g}' for v in out[:5])}; pass decreasing timesteps "
                                 "in that range.")
            ts = self._append_end(ts, "timesteps")
        elif given[0] == "sigmas":
            values = _finite_values("sigmas", sigmas)
            if (values < 0).any():
                raise ValueError(f"set_timesteps got negative sigmas {values.tolist()}; noise levels are >= 0 and "
                                 "strictly decreasing (a trailing 0 ends the grid).")
            ts = self._append_end(self._time_from_sigmas(values), "sigmas")
        else:
            kind, options = self._grid_kind, dict(self._grid_options)
            if mu is not None and self.config.use_dynamic_shifting and self.config.use_flow_sigmas:
                options["shift"] = float(math.exp(mu))
            if self.config.discard_penultimate_sigma:   # ComfyUI's rule for dpm_2(_ancestral), uni_pc(_bh2)
                ts = np.delete(self._named_grid(num_inference_steps + 1, kind, options), -2)
            else:
                ts = self._named_grid(num_inference_steps, kind, options)
        self._set_grid(ts, device)

    def _named_grid(self, n: int, kind: str, options: dict) -> np.ndarray:
        """The grid ``kind`` of ``n`` steps, ended as ``final_sigma`` says (through the solver: singlestep solvers
        place their blocks on log-SNR grids as ``dp.sample`` does). diffusers' spacings (``'leading'``,
        ``'linspace'``, ``'trailing'``) on a DiscreteVP are diffusers' own timesteps: their form to sigma = 0,
        ``'leading'`` starting where diffusers starts (below the top: ``n (N // (n + 1)) + steps_offset``, or
        ``(n - 1) (N // n) + steps_offset`` with ``scheduler='ddim'``), and ``final_sigma='min'`` ending at the
        training sigma_min instead of 0 (diffusers' ``final_sigmas_type='sigma_min'``, ``set_alpha_to_one=False``;
        where the last timestep is already train step 0, diffusers' last step there has length 0 and is dropped)."""
        zero = self._ends_at_zero()
        if kind not in _DIFFUSERS_SPACINGS or not isinstance(self.schedule, DiscreteVP):
            return self.solver.grid(self.schedule, n, kind, t_end=0.0 if zero else None, **options)
        ts = make_grid(self.schedule, n, kind, t_end=0.0, **options)
        if kind == "leading":
            big, offset = self.config.num_train_timesteps, int(options.get("steps_offset", 0))
            first = (n - 1) * (big // n) if options.get("scheduler") == "ddim" else n * (big // (n + 1))
            ts[0] = min(float(self._time_from_network(np.array([first + offset], dtype=np.float64))[0]),
                        self.schedule.t_max)
        if not zero:
            t_min = self.schedule.t_min
            ts = ts[:-1] if ts[-2] <= t_min * (1 + 1e-12) else np.append(ts[:-1], t_min)
        return check_grid(self.schedule, ts, name=f"the {kind!r} grid")

    def _ends_at_zero(self) -> bool:
        """Whether a named grid ends at t = 0 (``final_sigma='zero'``) rather than at t_min."""
        return self.config.final_sigma == "zero"

    def _set_grid(self, ts: np.ndarray, device, denoise_to_zero: bool = False):
        """Timesteps (the evaluations: every time but the end, and the times a solver evaluates between them, e.g.
        Heun's second evaluation, in the solver's order; with a plan's ``denoise_to_zero`` every time) and sigmas
        (the noise level of each evaluation, then the end's: 0 after a final denoising evaluation)."""
        self._ts = ts
        self._denoise_to_zero = denoise_to_zero
        evaluated, starts = ts if denoise_to_zero else ts[:-1], None
        if self.plan is None and hasattr(self.solver, "plan"):
            nodes, stages = self.solver.plan(self.schedule, ts)
            if len(stages) != ts.size - 1:   # evaluations between the grid times (Heun, DPM-2, PNDM, ...)
                evaluated = np.array([nodes[i].t for i in range(len(stages))], dtype=np.float64)
                completed = np.cumsum([0] + [stage.completes for stage in stages[:-1]])
                starts = np.where([i == 0 or stages[i - 1].completes for i in range(len(stages))], completed, -1)
        self._eval_ts = evaluated
        self._grid_index = np.arange(evaluated.size) if starts is None else starts   # -1: inside a step
        # diffusers' num_inference_steps: the grid intervals (2 evaluations each for Heun), as its schedulers count
        self.num_inference_steps = evaluated.size if starts is None else ts.size - 1
        self._network_ts = self._network_time(evaluated).astype(np.float32).astype(np.float64)  # = timesteps
        self.timesteps = torch.from_numpy(self._network_ts).to(device=device, dtype=torch.float32)
        levels = np.append(self._noise_level(evaluated), 0.0 if denoise_to_zero else self._noise_level(ts[-1:]))
        self.sigmas = torch.from_numpy(levels).to(torch.float32)  # on the CPU, as diffusers
        self._begin_index = None
        self._reset()

    def _set_plan_timesteps(self, num_inference_steps, device, timesteps, sigmas):
        plan, path = self.plan, self.config.plan
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"This scheduler runs the plan {path}, which holds its own times: explicit "
                             f"{'timesteps' if timesteps is not None else 'sigmas'} cannot be used with it. Tune or "
                             "write a plan for those times, or build the scheduler without plan.")
        if num_inference_steps is not None and num_inference_steps != plan.nfe:
            raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with the plan {path}, which "
                             f"takes {plan.nfe} model evaluations ({len(plan.steps)} steps"
                             f"{' + a final denoising evaluation' if plan.denoise_to_zero else ''}); pass "
                             f"num_inference_steps={plan.nfe} (scheduler.plan.nfe) or None.")
        ts = check_grid(self.schedule, np.asarray(plan.ts, dtype=np.float64), name=f"the times of the plan {path}")
        self._set_grid(ts, device, plan.denoise_to_zero)

    # --------------------------------------------------------------------------------------------- stepping

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: the model sees ``x_t = alpha x0 + sigma eps`` directly."""
        return sample

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in ``timesteps`` (diffusers' rule: the second match if it is duplicated)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = torch.as_tensor(timestep).reshape(-1)[:1].to(device=schedule_timesteps.device,
                                                            dtype=schedule_timesteps.dtype)
        matches = (schedule_timesteps == value).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(value):.6g} is not one of this scheduler's timesteps; pass the "
                             "values of scheduler.timesteps, or call set_begin_index(i) before the first step.")
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        if not 0 <= self._step_index < len(self._eval_ts):
            raise ValueError(f"begin index {self._step_index} is outside the {len(self._eval_ts)} timesteps.")
        if self._grid_index[self._step_index] < 0:
            raise ValueError(f"begin index {self._step_index} is inside a step of {self.solver!r} (an evaluation "
                             "between grid times); begin at the first evaluation of a step, i.e. at index "
                             f"order * i (order = {self.order}) as diffusers' pipelines do.")

    def _solver_generator(self, generator, sample: torch.Tensor):
        if not self.solver.stochastic:
            return None
        if isinstance(generator, (list, tuple)):
            generator = generator[0] if generator else None
        if generator is not None and generator.device == sample.device:
            return generator
        # No generator, or one on another device (diffusers draws on the CPU then): seed one on the sample's
        # device from it (or from torch's global RNG, so torch.manual_seed reproduces a run).
        seed = int(torch.randint(2**62, (), generator=generator).item())
        return torch.Generator(device=sample.device).manual_seed(seed)

    def _start(self, sample: torch.Tensor, work: torch.dtype, generator) -> None:
        # The solver plans from this grid point on; a grid ending at t = 0 ends with its jump to the x0
        # prediction (the solver's own last stage). A plan runs its own step settings from that step on.
        x = sample.to(work)
        k, solver = int(self._grid_index[self._step_index]), self.solver
        if self.plan is not None:
            self._check_plan_shape(sample)
            solver = PlanSolver(self.plan.steps[k:]) if k else solver
        self._active = solver
        self._state = solver.init(self.schedule, self._ts[k:], x, self._solver_generator(generator, sample))
        self._x = x

    def _check_timestep(self, timestep, k: int) -> None:
        """Refuse a timestep that is not the next one of this run (a step repeated or skipped). The nearest entry of
        ``timesteps`` identifies it, so a pipeline that passes it in another dtype is still understood."""
        if timestep is None:
            return
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        distance = np.abs(self._network_ts - value)
        nearest = int(distance.argmin())
        if distance[k] <= distance[nearest]:   # (a timestep may repeat: Heun evaluates twice at most times)
            return
        taken = " (that step was already taken)" if nearest < k else ""
        raise ValueError(f"step() got timestep {value:.6g} = timesteps[{nearest}]{taken}, but the next step of this "
                         f"run is at timesteps[{k}] = {self._network_ts[k]:.6g}. Pass scheduler.timesteps in order, "
                         "each once; call set_timesteps again to start a new run (and set_begin_index(i) before its "
                         "first step to start at timesteps[i]).")

    def _predict(self, model_output: torch.Tensor, x_eval: torch.Tensor, t: float, k: int) -> Prediction:
        """Both predictions of the model output at grid time ``t``: learned-variance channels dropped, thresholding
        applied, NaN / Inf refused (``check_finite``)."""
        if model_output.shape != x_eval.shape:
            shape, want = tuple(model_output.shape), tuple(x_eval.shape)
            doubled = len(shape) == len(want) >= 2 and shape[0] == want[0] and shape[1] == 2 * want[1] \
                and shape[2:] == want[2:]
            if not (doubled and self.config.variance_type in _LEARNED_VARIANCE):
                hint = (" It has twice the sample's channels, as a learned-variance model's output: set "
                        "variance_type='learned_range' (or 'learned') in the scheduler config to drop them."
                        if doubled else "")
                raise ValueError(f"step() got a model_output of shape {shape} for a sample of shape {want}; it must "
                                 f"be the model's prediction for that sample, of the same shape.{hint}")
            model_output = model_output[:, :want[1]]
        self._output.output = model_output
        try:
            pred = self._denoiser(x_eval, t)
        finally:
            self._output.output = None
        if self.config.check_finite:
            try:
                _check_finite(pred, k + 1, t)
            except NonFiniteError as err:
                raise NonFiniteError(f"{err} (diffusers scheduler: step_index {k}, timestep "
                                     f"{self._network_ts[k]:.6g}; check_finite=False in the scheduler config turns "
                                     "this check off.)") from None
        return pred

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs) -> DPMSolveSchedulerOutput | tuple:
        """Consume the model output at ``timesteps[step_index]`` and return where to evaluate next.

        ``sample`` must be the tensor the model was evaluated at: the start noise on the first step, then what the
        previous step returned (a sample changed in between, e.g. by a pipeline callback, is taken as the new
        solution at a completed step). ``generator`` seeds stochastic solvers (used on the first step only).
        Extra keyword arguments of other schedulers (``eta``, ``variance_noise``, ...) are ignored.

        Refused with a ValueError: a ``timestep`` that is not the next of this run (a step repeated or skipped; the
        nearest entry of ``timesteps`` identifies it), a ``model_output`` not of the sample's shape (with
        ``variance_type='learned'`` / ``'learned_range'``, twice its channels: the first half is used). A model
        output holding NaN or Inf raises :class:`~dpmsolve.NonFiniteError` (``check_finite``).
        """
        if self._ts is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self._eval_ts):
            raise ValueError(f"All {len(self._eval_ts)} steps have been taken; call set_timesteps again.")
        self._check_timestep(timestep, k)
        in_dtype = sample.dtype
        work = torch.promote_types(in_dtype, torch.float32)
        if self._denoise_to_zero and k == len(self._eval_ts) - 1:
            return self._denoise_step(model_output, sample, work, return_dict)
        if self._x is None:
            self._start(sample, work, generator)
            state, solver = self._state, self._active
        else:
            state, solver = self._state, self._active
            if sample is not self._returned:  # changed outside: adopt it where it is the solution
                self._x = sample.to(work)
                if state.anchor_index == state.i:
                    state = dataclasses.replace(state, x=self._x, x_eval=self._x)
        x_eval, t = self._x, solver.ask(state)[1]
        pred = self._predict(model_output, x_eval, t, k)
        state = solver.tell(state, pred)
        x_next = solver.current(state)[0] if solver.done(state) else solver.ask(state)[0]
        self._state, self._x = state, x_next
        self._step_index = k + 1
        prev_sample = x_next.to(in_dtype)
        self._returned = prev_sample
        if not return_dict:
            return (prev_sample,)
        return DPMSolveSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred.x0.to(in_dtype))

    def _denoise_step(self, model_output, sample, work, return_dict):
        """A plan's final denoising evaluation (``denoise_to_zero``): the sample is its x0 prediction."""
        if self._x is None:
            self._check_plan_shape(sample)
        x_eval = self._x if self._x is not None and sample is self._returned else sample.to(work)
        x0 = self._predict(model_output, x_eval, float(self._ts[-1]), len(self._eval_ts) - 1).x0
        x0 = x0.to(sample.dtype)
        self._step_index = len(self._eval_ts)
        self._x, self._returned = None, x0
        if not return_dict:
            return (x0,)
        return DPMSolveSchedulerOutput(prev_sample=x0, pred_original_sample=x0)

    # --------------------------------------------------------------------------------------------- noising

    def _alpha_sigma_for(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.as_tensor(timesteps).reshape(-1)
        ts = None
        if self.timesteps is not None and values.is_floating_point():
            # Values of this scheduler's timesteps map to the exact float64 grid times (no float32 round trip).
            table = self.timesteps.to(values.device)
            hits = values[:, None].to(table.dtype) == table[None, :]
            if bool(hits.any(dim=1).all()):
                ts = self._eval_ts[hits.float().argmax(dim=1).cpu().numpy()]
        if ts is None:
            network = values.detach().cpu().to(torch.float64).numpy()
            lo, hi = self._network_time(np.array([self.schedule.t_min, self.schedule.t_max]))
            slack = 1e-4 * max(1.0, abs(hi))   # float32 round-off of valid values
            bad = network[~((network >= lo - slack) & (network <= hi + slack))]
            if bad.size:
                raise ValueError(f"timesteps {bad.tolist()} are outside the network times [{lo:g}, {hi:g}] of this "
                                 f"scheduler (num_train_timesteps={self.config.num_train_timesteps}; "
                                 f"{'N t for a flow model' if self.config.use_flow_sigmas else 'train indices'}); "
                                 "pass values of scheduler.timesteps or times inside that range.")
            ts = self._time_from_network(network)
        ts = np.clip(ts, self.schedule.t_min, self.schedule.t_max)
        a, s = self.schedule.alpha(ts), self.schedule.sigma(ts)
        shape = (-1,) + (1,) * (like.dim() - 1)
        work = torch.promote_types(like.dtype, torch.float32)
        as_tensor = lambda v: torch.as_tensor(np.atleast_1d(v), dtype=work, device=like.device).reshape(shape)
        return as_tensor(a), as_tensor(s)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at each network time in ``timesteps`` (train indices; flow: ``N t``)."""
        noise = check_tensor("noise", noise, batch=False)
        if noise.shape != original_samples.shape:
            try:
                fits = torch.broadcast_shapes(noise.shape, original_samples.shape) == original_samples.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"add_noise got noise of shape {tuple(noise.shape)} for original_samples of shape "
                                 f"{tuple(original_samples.shape)}; pass noise of the samples' shape, e.g. "
                                 "torch.randn_like(original_samples).")
        a, s = self._alpha_sigma_for(timesteps, original_samples)
        work = a.dtype
        out = a * original_samples.to(work) + s * noise.to(work)
        return out.to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' name for ``add_noise`` (``(1 - t) x0 + t noise`` for a flow schedule)."""
        return self.add_noise(sample, noise, timestep)


class DDIMSolveScheduler(DPMSolveScheduler):
    """DDIM (dpmsolve ``'ddim'``, eta = 0) on dpmsolve grids."""

    _default_solver = "ddim"
    _default_solver_options: dict = {}
    _preset = True


class DPMSolverPPMultistepScheduler(DPMSolveScheduler):
    """DPM-Solver++(2M) (dpmsolve ``'dpmsolver++'``, multistep, order 2)."""

    _default_solver = "dpmsolver++"
    _default_solver_options: dict = {"order": 2}
    _preset = True


class DPMSolverSinglestepScheduler(DPMSolveScheduler):
    """dpmsolve's singlestep DPM-Solver++ (order 2 blocks, as diffusers' default solver_order), NFE = steps."""

    _default_solver = "dpmsolver++"
    _default_solver_options: dict = {"method": "singlestep", "order": 2, "split": "fixed"}
    _preset = True


class UniPCScheduler(DPMSolveScheduler):
    """UniPC-2 with the bh2 variant (dpmsolve ``'unipc'``); accepts ``generator`` unlike diffusers' UniPC."""

    _default_solver = "unipc"
    _default_solver_options: dict = {"order": 2}
    _preset = True


class DPMSolveInverseScheduler(DPMSolveScheduler):
    """The inverse of :class:`DPMSolveScheduler` (diffusers' ``DDIMInverseScheduler`` /
    ``DPMSolverMultistepInverseScheduler``): ``step`` runs the probability-flow ODE from data to noise with a
    deterministic dpmsolve solver, exactly as :func:`dpmsolve.invert` does (the same solver on the sampling grid
    reversed), one model evaluation per ``step``:

    ```python
    inverse = DPMSolveInverseScheduler.from_config(pipe.scheduler.config)   # the pipeline's solver and grid
    inverse.set_timesteps(50)                                               # increasing: data -> noise
    for t in inverse.timesteps:
        latents = inverse.step(unet(latents, t, ...).sample, t, latents).prev_sample
    ```

    Config and ``from_config`` as :class:`DPMSolveScheduler` (a config of diffusers' ``DDIMInverseScheduler`` runs
    DDIM, of ``DPMSolverMultistepInverseScheduler`` DPM-Solver++, on their forward counterparts' timesteps). The
    grid is the sampling grid of ``set_timesteps(n)`` reversed, and it always starts at the schedule's t_min (as
    ``dp.invert``; an ODE step cannot leave sigma = 0): ``final_sigma`` / ``set_alpha_to_one`` do not apply.
    ``timesteps`` are the network times of the evaluations, increasing; the model is evaluated at the sample's own
    time. Differences from diffusers' ``DDIMInverseScheduler``: diffusers evaluates the network at the *target*
    timestep of each step (on the sample at the previous one) and starts at alpha = 1 with ``set_alpha_to_one=True``;
    with ``steps_offset=0, set_alpha_to_one=False`` its first step has length 0 (the identity), which is dropped
    here (n - 1 timesteps).

    Refused with a ValueError: a stochastic solver (``eta > 0``, SDE solvers: use ``dp.invert(..., noise_map=True)``),
    a ``plan`` (tuned for sampling), explicit ``timesteps`` / ``sigmas`` in ``set_timesteps``.
    """

    def _load_plan(self, path: str) -> Plan:
        raise ValueError(f"{type(self).__name__} cannot run a plan ({path}): a plan is tuned for sampling (noise -> "
                         "data). Build it without plan=, with a deterministic solver (e.g. solver='dpmsolver++').")

    def _ends_at_zero(self) -> bool:
        return False   # the inversion starts at t_min (dp.invert's default t_end)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps=None, sigmas=None, mu: float | None = None):
        """The inversion grid of ``num_inference_steps`` steps: the configured sampling grid reversed (from t_min
        to the top), ``timesteps`` increasing. ``mu`` as :meth:`DPMSolveScheduler.set_timesteps`."""
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"{type(self).__name__}.set_timesteps takes num_inference_steps only (explicit "
                             "timesteps / sigmas are not supported for inversion); pick the grid with grid= / "
                             "grid_options= in the config.")
        if num_inference_steps is None:
            raise ValueError("Pass num_inference_steps (the number of inversion steps).")
        if self.solver.stochastic:
            raise ValueError(f"{type(self).__name__} needs a deterministic solver; {self.solver!r} adds noise and "
                             "its ODE cannot be run backwards. Use e.g. solver='ddim' (eta=0) or 'dpmsolver++', or "
                             "dpmsolve.invert(..., noise_map=True) to recover a stochastic sampler's noises.")
        super().set_timesteps(num_inference_steps, device, mu=mu)

    def _set_grid(self, ts: np.ndarray, device, denoise_to_zero: bool = False):
        super()._set_grid(inversion_grid(self.schedule, ts), device, denoise_to_zero)
