"""diffusers schedulers that run dpmsolve's solvers: a drop-in for any diffusers pipeline.

``DPMSolveScheduler`` is one generic scheduler: it builds a dpmsolve schedule from the usual diffusers config
(betas, prediction type, flow sigmas), a dpmsolve grid, and drives any fixed-grid dpmsolve solver through its
ask/tell protocol, one model evaluation per ``step``. It holds no solver maths: the update is the solver's own,
so a pipeline run equals ``dpmsolve.sample`` on the same model, noise and grid. The named subclasses only change
config defaults::

    from dpmsolve.integrations.diffusers import DPMSolverPPMultistepScheduler
    pipe.scheduler = DPMSolverPPMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, solver="unipc",
                                                   solver_options={"order": 3}, grid="karras")

A tuned :class:`~dpmsolve.Plan` (``dpmsolve.tune``, saved with ``plan.save``) runs the same way: the config holds
its file path, and the plan's times and step settings replace ``solver`` and ``grid``::

    pipe.scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, plan="digits-8nfe.plan.json")
    pipe(..., num_inference_steps=pipe.scheduler.plan.nfe)

Conventions (see ``set_timesteps``): ``timesteps`` are the network's time values of the evaluations, as float32
-- the fractional train index ``N t - 1`` for DDPM-type models (UNet2DModel / UNet2DConditionModel accept
fractional timesteps; our discrete schedule interpolates log alpha between train steps, as the reference
DPM-Solver), ``N t`` for flow models (``use_flow_sigmas``; SD3/Flux pipelines pass it on as sigma * 1000).
``sigmas`` holds the VE ratio sigma/alpha (flow: the flow sigma t) of every grid time, the end included.

Behaviours of diffusers' own schedulers that this one does not copy: ``step`` accepts ``generator`` (diffusers'
UniPC/DEIS raise a TypeError inside ``DDPMPipeline``); it never rounds timesteps to integers (so no duplicated
timesteps on dense Karras grids); the solver's lower-order final steps are explicit solver options, not gated on
the number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..grids import check_grid, make_grid
from ..model import PREDICTIONS, Prediction
from ..schedules import ZERO_SNR_ALPHA_BAR, DiscreteVP, RectifiedFlow
from ..solvers import get_solver
from ..tuning.plan import Plan, PlanError, PlanSolver

__all__ = ["DPMSolveScheduler", "DPMSolveSchedulerOutput", "DDIMSolveScheduler", "DPMSolverPPMultistepScheduler",
           "DPMSolverSinglestepScheduler", "UniPCScheduler"]

# diffusers' prediction_type -> dpmsolve.PREDICTIONS key
_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}
_FINAL_SIGMAS = ("zero", "min")


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
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; valid: 'linear', 'scaled_linear', "
                     "'squaredcos_cap_v2' (or pass trained_betas).")


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


class DPMSolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any dpmsolve fixed-grid solver (ask/tell), one evaluation per ``step``.

    Config:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the
            DDPM schedule, as in diffusers (``DiscreteVP``; times ``t = (n + 1) / N`` for train index n).
        prediction_type: ``'epsilon'``, ``'sample'``, ``'v_prediction'`` or ``'flow_prediction'``.
        solver, solver_options: a dpmsolve registry name and its options (``{"order": 3}``); any fixed-grid
            solver (not the adaptive one: a pipeline needs its timesteps up front).
        grid, grid_options: a dpmsolve grid name (``'logSNR'``, ``'time_uniform'``, ``'time_quadratic'``,
            ``'karras'``, ``'exponential'``, ``'flow_shift'``) and its options; default ``'logSNR'``, or
            ``'flow_shift'`` with ``shift=flow_shift`` for flow models.
        final_sigma: ``'zero'``: the grid ends at t = 0 and the last step returns the x0 prediction at the last
            evaluated time (diffusers' ``final_sigmas_type='zero'``, k-diffusion's appended zero); ``'min'``:
            it ends at the schedule's t_min (the training sigma of index 0; flow: 1/N).
        use_flow_sigmas, flow_shift: a rectified-flow model (``x_t = (1 - t) x0 + t eps``, t in [1/N, 1 - 1/N])
            whose network takes ``N t`` (SD3/Flux pass sigma * 1000); ``flow_shift`` is the default grid's shift.
        use_dynamic_shifting: for flow models, ``set_timesteps(mu=...)`` sets the shift to ``exp(mu)`` (Flux).
        plan: the path of a :class:`~dpmsolve.Plan` file (``Plan.save``; a path keeps the config JSON-serialisable),
            loaded and checked against this scheduler's schedule when the scheduler is built (a
            :class:`~dpmsolve.PlanError` naming the path otherwise) and against the sample shape on the first step.
            The plan's times and per-step settings then replace ``solver``, ``solver_options``, ``grid``,
            ``grid_options`` and ``final_sigma`` (which stay in the config, unused): ``set_timesteps`` takes no
            count but the plan's (``plan.nfe``), and a run equals ``dpmsolve.sample(denoiser, x_T, plan)``. The
            loaded plan is ``scheduler.plan`` (None without one). A relative path is read from the working
            directory, also by ``from_pretrained``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler",
                                                                  "FlowMatchHeunDiscreteScheduler"]
    order = 1
    _default_solver: str = "dpmsolver++"
    _default_solver_options: dict = {"order": 2}

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | np.ndarray | None = None,
                 rescale_betas_zero_snr: bool = False, prediction_type: str = "epsilon",
                 solver: str | None = None, solver_options: dict[str, Any] | None = None,
                 grid: str | None = None, grid_options: dict[str, Any] | None = None, final_sigma: str = "zero",
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, use_dynamic_shifting: bool = False,
                 plan: str | None = None):
        # Class defaults of the named presets are written into the config, so a saved config is self-contained.
        if solver is None:
            solver = self._default_solver
            if solver_options is None:
                solver_options = dict(self._default_solver_options)
        solver_options = dict(solver_options or {})
        grid_options = dict(grid_options or {})
        if trained_betas is not None:
            trained_betas = [float(b) for b in np.asarray(trained_betas, dtype=np.float64).reshape(-1)]
        if isinstance(plan, Plan):
            raise ValueError("The scheduler config holds a plan's file path (configs are JSON): save the plan with "
                             "plan.save('name.plan.json') and pass plan='name.plan.json'.")
        if plan is not None:
            if not isinstance(plan, (str, os.PathLike)):
                raise ValueError(f"plan must be the path of a plan file (str), got {type(plan).__name__}.")
            plan = os.fspath(plan)
        self.register_to_config(solver=solver, solver_options=solver_options, grid_options=grid_options,
                                trained_betas=trained_betas, plan=plan)

        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; valid: {', '.join(_PREDICTION_TYPES)}.")
        if final_sigma not in _FINAL_SIGMAS:
            raise ValueError(f"final_sigma must be 'zero' (end at sigma = 0) or 'min' (end at t_min), got "
                             f"{final_sigma!r}.")
        self.solver = get_solver(solver, **solver_options)
        if self.solver.adaptive and plan is None:
            raise ValueError(f"Solver {solver!r} with options {solver_options} is adaptive: its evaluation times "
                             "are not known up front, so it cannot drive a diffusers pipeline. Use a fixed-grid "
                             "solver (e.g. 'dpmsolver++' with method='multistep').")
        n = int(num_train_timesteps)
        if use_flow_sigmas:
            self.schedule = RectifiedFlow(t_min=1.0 / n, t_max=1.0 - 1.0 / n)
        else:
            betas = _betas(n, beta_start, beta_end, beta_schedule, trained_betas)
            self.schedule = DiscreteVP.from_alphas_cumprod(_alphas_cumprod(betas, rescale_betas_zero_snr))
        self._convert = PREDICTIONS[_PREDICTION_TYPES[prediction_type]]
        self.plan = self._load_plan(plan) if plan is not None else None
        if self.plan is not None:
            self.solver = self.plan.solver()
        self._grid_kind, self._grid_options = self._default_grid(flow_shift)
        if grid is not None:
            self._grid_kind = grid
            self._grid_options = grid_options
        elif grid_options:
            self._grid_options.update(grid_options)

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._ts = None          # float64 grid of N + 1 times, the end included
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
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ``ConfigMixin.from_config``; a flow-matching source config (``FlowMatch*`` class, or a DPM/UniPC
        config with ``use_flow_sigmas``) turns on ``use_flow_sigmas`` with ``prediction_type='flow_prediction'``,
        and its ``shift`` becomes ``flow_shift``. Keyword arguments override everything."""
        if isinstance(config, Mapping):
            config = dict(config)
            source = str(config.get("_class_name", ""))  # present in loaded configs, not in live ones
            flow_matching = source.startswith("FlowMatch") or (
                not source and "shift" in config and "beta_start" not in config and "use_flow_sigmas" not in config)
            if flow_matching:
                config.setdefault("use_flow_sigmas", True)
                config["prediction_type"] = "flow_prediction"
                if "shift" in config and "flow_shift" not in config:
                    config["flow_shift"] = float(config["shift"])
            if config.get("use_flow_sigmas"):
                config.setdefault("prediction_type", "flow_prediction")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
        return n * ts if self.config.use_flow_sigmas else n * ts - 1.0

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
        if self.config.final_sigma == "zero":
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
            values = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                                dtype=np.float64)
            ts = self._append_end(self._time_from_network(values.reshape(-1)), "timesteps")
        elif given[0] == "sigmas":
            values = sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas
            ts = self._append_end(self._time_from_sigmas(values), "sigmas")
        else:
            kind, options = self._grid_kind, dict(self._grid_options)
            if mu is not None and self.config.use_dynamic_shifting and self.config.use_flow_sigmas:
                options["shift"] = float(math.exp(mu))
            t_end = 0.0 if self.config.final_sigma == "zero" else None
            ts = make_grid(self.schedule, int(num_inference_steps), kind, t_end=t_end, **options)
        self._set_grid(ts, device)

    def _set_grid(self, ts: np.ndarray, device, denoise_to_zero: bool = False):
        """Timesteps (the evaluations: every time but the end; with ``denoise_to_zero`` every time) and sigmas
        (the noise level of each evaluation, then the end's: 0 after a final denoising evaluation)."""
        self._ts = ts
        self._denoise_to_zero = denoise_to_zero
        evaluated = ts if denoise_to_zero else ts[:-1]
        self.num_inference_steps = evaluated.size
        self.timesteps = torch.from_numpy(self._network_time(evaluated)).to(device=device, dtype=torch.float32)
        levels = self._noise_level(ts)
        levels = np.append(levels, 0.0) if denoise_to_zero else levels
        self.sigmas = torch.from_numpy(levels).to(torch.float32)  # on the CPU, as diffusers
        self._begin_index = None
        self._reset()

    def _set_plan_timesteps(self, num_inference_steps, device, timesteps, sigmas):
        plan, path = self.plan, self.config.plan
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"This scheduler runs the plan {path}, which holds its own times: explicit "
                             f"{'timesteps' if timesteps is not None else 'sigmas'} cannot be used with it. Tune or "
                             "write a plan for those times, or build the scheduler without plan.")
        if num_inference_steps is not None and int(num_inference_steps) != plan.nfe:
            raise ValueError(f"num_inference_steps={int(num_inference_steps)} disagrees with the plan {path}, which "
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
        if not 0 <= self._step_index < self.num_inference_steps:
            raise ValueError(f"begin index {self._step_index} is outside the {self.num_inference_steps} steps.")

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
        k, solver = self._step_index, self.solver
        if self.plan is not None:
            self._check_plan_shape(sample)
            solver = PlanSolver(self.plan.steps[k:]) if k else solver
        self._active = solver
        self._state = solver.init(self.schedule, self._ts[k:], x, self._solver_generator(generator, sample))
        self._x = x

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs) -> DPMSolveSchedulerOutput | tuple:
        """Consume the model output at ``timesteps[step_index]`` and return where to evaluate next.

        ``sample`` must be the tensor the model was evaluated at: the start noise on the first step, then what the
        previous step returned (a sample changed in between, e.g. by a pipeline callback, is taken as the new
        solution at a completed step). ``generator`` seeds stochastic solvers (used on the first step only).
        Extra keyword arguments of other schedulers (``eta``, ``variance_noise``, ...) are ignored.
        """
        if self._ts is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self.num_inference_steps:
            raise ValueError(f"All {self.num_inference_steps} steps have been taken; call set_timesteps again.")
        in_dtype = sample.dtype
        work = torch.promote_types(in_dtype, torch.float32)
        if self._denoise_to_zero and k == self.num_inference_steps - 1:
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
        a, s = self.schedule.alpha_sigma(t)
        pred = Prediction(*self._convert(model_output.to(work), x_eval, a, s))
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
        a, s = self.schedule.alpha_sigma(float(self._ts[-1]))
        x0 = Prediction(*self._convert(model_output.to(work), x_eval, a, s)).x0.to(sample.dtype)
        self._step_index = self.num_inference_steps
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
                ts = self._ts[hits.float().argmax(dim=1).cpu().numpy()]
        if ts is None:
            ts = self._time_from_network(values.detach().cpu().to(torch.float64).numpy())
        ts = np.clip(ts, self.schedule.t_min, self.schedule.t_max)
        a, s = self.schedule.alpha(ts), self.schedule.sigma(ts)
        shape = (-1,) + (1,) * (like.dim() - 1)
        work = torch.promote_types(like.dtype, torch.float32)
        as_tensor = lambda v: torch.as_tensor(np.atleast_1d(v), dtype=work, device=like.device).reshape(shape)
        return as_tensor(a), as_tensor(s)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at each network time in ``timesteps`` (train indices; flow: ``N t``)."""
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


class DPMSolverPPMultistepScheduler(DPMSolveScheduler):
    """DPM-Solver++(2M) (dpmsolve ``'dpmsolver++'``, multistep, order 2)."""

    _default_solver = "dpmsolver++"
    _default_solver_options: dict = {"order": 2}


class DPMSolverSinglestepScheduler(DPMSolveScheduler):
    """dpmsolve's singlestep DPM-Solver++ (order 2 blocks, as diffusers' default solver_order), NFE = steps."""

    _default_solver = "dpmsolver++"
    _default_solver_options: dict = {"method": "singlestep", "order": 2, "split": "fixed"}


class UniPCScheduler(DPMSolveScheduler):
    """UniPC-2 with the bh2 variant (dpmsolve ``'unipc'``); accepts ``generator`` unlike diffusers' UniPC."""

    _default_solver = "unipc"
    _default_solver_options: dict = {"order": 2}
