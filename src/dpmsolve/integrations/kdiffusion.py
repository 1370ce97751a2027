"""k-diffusion-style sampler functions and sigma grids, backed by dpmsolve's solvers.

Every ``sample_<name>`` here has k-diffusion's signature and conventions and runs through :func:`dpmsolve.sample`
(no solver maths in this module):

```python
sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x
```

* ``model(x, sigma_batch, **extra_args)`` is a denoiser on VE coordinates ``x = x0 + sigma * eps`` that returns
  the denoised ``x0`` (k-diffusion's ``CompVisDenoiser`` / ``DiscreteEpsDDPMDenoiser``, ComfyUI's ``model_k``);
  ``sigma_batch`` has shape ``(batch,)``.
* ``x`` is the start, already scaled by ``sigmas[0]`` (``x = noise * sigmas[0]``, as k-diffusion expects).
* ``sigmas`` is a strictly decreasing 1-D tensor, usually ending with 0 (``get_sigmas_karras`` & co.). The
  sigmas are the step grid as given: an EDM schedule (``alpha = 1``, ``sigma = t``) covering
  ``[min positive sigma, sigmas[0]]`` is built and ``t = sigma`` is the explicit grid. A trailing 0 makes the
  last step the jump to the x0 prediction at the last positive sigma, exactly as k-diffusion's samplers end.
* ``extra_args`` go to every model call (conditioning, ``cond_scale``, ComfyUI's ``model_options`` and
  ``seed``); ``extra_args["seed"]`` also seeds the noise of a stochastic sampler when no generator, seed or
  noise sampler is given.
* ``callback`` receives k-diffusion's dict ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step:
  ``x`` is where the model was evaluated at ``sigmas[i]`` and ``denoised`` its prediction there
  (``sigma_hat == sigma``: no churn). The call for the final jump to sigma = 0 comes after that jump.
* ``disable`` controls the tqdm progress bar like k-diffusion's ``trange(..., disable=disable)``: True = off,
  None = only on a terminal, False = on.
* ``**options`` go to the dpmsolve solver (``order``, ``solver_type``, ``lower_order_final``, ``eta``,
  ``warmup``, ``corrector``, ...), overriding the sampler's defaults. Every sampler also accepts the noise options
  ``noise_sampler`` (k-diffusion's ``noise_sampler(sigma, sigma_next) -> noise like x``), ``s_noise``, ``seed``
  and ``generator``; they are used only when the solver draws noise (``eta > 0``).
* The result is the final x (the sample when ``sigmas`` ends with 0), in x's dtype.

Samplers (``SAMPLERS`` maps each name to its dpmsolve solver and defaults):

| Sampler | dpmsolve solver |
| --- | --- |
| ``ddim`` | DDIM (= DPM-Solver-1 = Euler on the VE ODE, k-diffusion's ``sample_euler`` without churn); ``eta`` > 0: DDIM with noise |
| ``dpmpp_2m`` | DPM-Solver++(2M), ``solver_type='dpmsolver'`` (= k-diffusion's ``sample_dpmpp_2m``) |
| ``dpmpp_3m`` | DPM-Solver++(3M), ``solver_type='taylor'`` (third order). k-diffusion's ``sample_dpmpp_3m_sde`` at eta = 0 is another method: the reference 3M form (``solver_type='dpmsolver'``, second difference at half weight) after a Taylor order-2 second step; no option here equals it |
| ``dpmpp_2s`` | singlestep DPM-Solver++(2S): a block of order 2 spans two sigma intervals (one evaluation per sigma, NFE = steps; not k-diffusion's ``dpmpp_2s_ancestral``, which evaluates twice per step) |
| ``dpmpp_3s`` | singlestep DPM-Solver++(3S) (``split='fast'`` by default: the reference's order split) |
| ``dpm_solver_2m`` | multistep DPM-Solver-2 (noise prediction) |
| ``dpm_solver_2s`` / ``dpm_solver_3s`` | singlestep DPM-Solver-2 / -3 (noise prediction) |
| ``unipc`` | UniPC order 3, B(h) = h (``variant='bh1'``) |
| ``unipc_bh2`` | UniPC order 3, B(h) = e^h - 1 |

Every ComfyUI KSampler name that dpmsolve implements is a sampler here too, with the solver and options of the
presets table (``dpmsolve.presets.SAMPLERS``; generated from it, so a name means the same here, in ``dp.sample``
and in the diffusers scheduler):

| ComfyUI sampler | dpmsolve solver |
| --- | --- |
| ``euler``, ``ddim`` / ``heun`` / ``dpm_2`` | ``'euler'``, ``'ddim'`` (the same method) / ``'heun'`` / ``'dpm2'`` |
| ``euler_ancestral`` / ``dpm_2_ancestral`` / ``dpmpp_2s_ancestral`` | ``'euler-ancestral'`` / ``'dpm2-ancestral'`` / ``'dpmpp-2s-ancestral'`` |
| ``lms`` / ``ipndm`` / ``ipndm_v`` | ``'lms'`` / ``'ipndm'`` / ``'ipndm_v'``, order 4 |
| ``deis`` | ``'deis'``, order 3, ``variant='rhoab'`` (ComfyUI's Adams weights in sigma) |
| ``dpmpp_2m`` | ``'dpmsolver++'``, order 2 (= k-diffusion's ``sample_dpmpp_2m``) |
| ``dpmpp_sde``, ``dpmpp_sde_gpu`` | ``'dpmpp-sde'`` (Brownian noise) |
| ``dpmpp_2m_sde(_gpu)`` / ``dpmpp_2m_sde_heun(_gpu)`` | ``'dpmpp-2m-sde'``, ``solver_type`` ``'midpoint'`` / ``'heun'`` |
| ``dpmpp_3m_sde``, ``dpmpp_3m_sde_gpu`` | ``'dpmpp-3m-sde'`` |
| ``ddpm`` | ``'ddim'``, ``eta=1`` (the DDPM posterior) |
| ``res_multistep`` / ``gradient_estimation`` | ``'res-multistep'`` / ``'gradient-estimation'`` (``gamma=2``) |
| ``er_sde`` | ``'er-sde'``, ``integration_points=200`` (ComfyUI's sums) |
| ``sa_solver`` / ``sa_solver_pece`` | ``'sa-solver'`` / with ``pece=True`` |
| ``uni_pc`` / ``uni_pc_bh2`` | ``'unipc'``, order 3, ``variant`` ``'bh1'`` / ``'bh2'``, ``lower_order_final=True`` |
| ``dpm_fast``, ``dpm_adaptive`` | k-diffusion's signatures (below): singlestep DPM-Solver-fast, adaptive DPM-Solver-23 |

ComfyUI names dpmsolve does not implement (``dpmsolve.presets.NOT_IMPLEMENTED``): the CFG++ variants (``*_cfg_pp``,
``cfgpp_ud10_ab``: they need the unconditional prediction inside the update, and guidance is a denoiser wrapper
here), the SEEDS family (``seeds_2``, ``seeds_3``, ``exp_heun_2_x0``, ``exp_heun_2_x0_sde``: not yet), ``heunpp2``
(no published method), ``res_multistep_ancestral`` (no noisy RES multistep yet) and ``lcm`` (sampling of
consistency-distilled models, not a solver). Differences from ComfyUI: its ``_gpu`` variants differ only in where
the Brownian tree lives; its ``sa_solver`` switches the noise on in the middle of the schedule only (pass ``tau=`` a
function for that), its ``uni_pc`` stops at sigma = 0.001 instead of jumping to 0.

Tuned plans (:class:`dpmsolve.Plan`, from ``dpmsolve.tune`` or ``Plan.load``): ``plan_sigmas(plan, schedule)``
is the plan's grid as k-diffusion sigmas, and ``sample_plan(model, x, sigmas, ..., plan=plan)`` runs the plan's
per-step settings on them (through the same path as every sampler here: equal to ``dpmsolve.sample(denoiser,
x_T, plan)`` up to round-off, with ``x = x_T / alpha(plan.ts[0])`` in VE coordinates):

```python
sigmas = kdiffusion.plan_sigmas(plan, schedule)              # plan.nfe + 1 sigmas (0 last when it denoises)
x = kdiffusion.sample_plan(model_k, noise * sigmas[0], sigmas, plan=plan)
sampler = comfy.samplers.KSAMPLER(kdiffusion.sample_plan, extra_options={"plan": "my.plan.json"})
```

``sample_dpm_adaptive(model, x, sigma_min, sigma_max, ...)`` has k-diffusion's adaptive signature (adaptive
DPM-Solver-12/23 from ``sigma_max`` to ``sigma_min``; k-diffusion's PID options are not supported), and
``sample_dpm_fast(model, x, sigma_min, sigma_max, n, ...)`` k-diffusion's DPM-Solver-fast signature (``n``
evaluations, equal to k-diffusion's to round-off when its times are float64).

Grids: ``get_sigmas_karras``, ``get_sigmas_exponential`` (= ``get_sigmas_logsnr``) return k-diffusion's tensors
(``n`` sigmas from ``sigma_max`` to ``sigma_min`` then 0); ``get_sigmas(schedule, n, kind)`` turns any dpmsolve
grid of a dpmsolve schedule into VE sigmas ``sigma / alpha`` ending with 0 (``time_uniform`` and
``time_quadratic`` are spacings of the schedule's own t, e.g. the train-step axis of a DiscreteVP).

Use from k-diffusion code: replace ``k_diffusion.sampling.sample_dpmpp_2m`` by
``dpmsolve.integrations.kdiffusion.sample_dpmpp_2m``; nothing else changes. For a VP model, wrap it as
k-diffusion does (``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser``): the adapter only sees the VE denoiser.

Use from ComfyUI (its API as read in ``comfy/samplers.py``, not exercised here): ComfyUI's ``KSAMPLER`` calls
``sampler_function(model_k, noise, sigmas, extra_args=..., callback=..., disable=..., **extra_options)`` with
the noise already scaled, so a custom node can return a sampler object built from any function here:

```python
import comfy.samplers
from dpmsolve.integrations import kdiffusion

sampler = comfy.samplers.KSAMPLER(kdiffusion.sample_dpmpp_3m, extra_options={"lower_order_final": True})
```
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import numpy as np
import torch

from .._checks import check_tensor
from ..grids import make_grid
from ..model import wrap_model
from ..presets import SAMPLERS as _PRESETS
from ..sampling import sample
from ..schedules import EDM, Schedule
from ..solvers import Solver, get_solver
from ..solvers.base import State
from ..solvers.stochastic import StochasticState
from ..tuning.plan import Plan, PlanError, PlanSolver, PlanStep

__all__ = [
    "SAMPLERS",
    *(f"sample_{name}" for name in ("ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_3s", "dpm_solver_2m",
                                    "dpm_solver_2s", "dpm_solver_3s", "unipc", "unipc_bh2")),
    *(f"sample_{name}" for name, preset in _PRESETS.items() if not preset.range_only and name not in (
        "ddim", "dpmpp_2m")),
    "sample_dpm_fast",
    "sample_dpm_adaptive",
    "sample_plan",
    "plan_sigmas",
    "get_sigmas_karras",
    "get_sigmas_exponential",
    "get_sigmas_logsnr",
    "get_sigmas",
]

# name -> (dpmsolve registry name, default options). The options a caller passes override the defaults. dpmsolve's
# own names first, then every ComfyUI sampler name of dpmsolve.presets that takes k-diffusion's (model, x, sigmas)
# signature (all but dpm_fast and dpm_adaptive, which take k-diffusion's (sigma_min, sigma_max) signatures below),
# from the presets table itself: a ComfyUI name means the same solver and options here and in dp.sample.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {}),
    "dpmpp_2m": ("dpmsolver++", {"order": 2}),
    "dpmpp_3m": ("dpmsolver++", {"order": 3, "solver_type": "taylor"}),
    "dpmpp_2s": ("dpmsolver++", {"method": "singlestep", "order": 2}),
    "dpmpp_3s": ("dpmsolver++", {"method": "singlestep", "order": 3}),
    "dpm_solver_2m": ("dpmsolver", {"order": 2}),
    "dpm_solver_2s": ("dpmsolver", {"method": "singlestep", "order": 2}),
    "dpm_solver_3s": ("dpmsolver", {"method": "singlestep", "order": 3}),
    "unipc": ("unipc", {"order": 3, "variant": "bh1"}),
    "unipc_bh2": ("unipc", {"order": 3, "variant": "bh2"}),
}
SAMPLERS.update((name, (preset.solver, dict(preset.options))) for name, preset in _PRESETS.items()
                if not preset.range_only)

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- noise

@dataclass(frozen=True)
class _ExternalNoiseState(State):
    noise_stds: tuple[float, ...] = ()   # the inner solver's per-stage noise std (its stages carry 0 instead)


class _ExternalNoise(Solver):
    """A fixed-grid solver whose noise ``std * z`` takes ``z`` from a k-diffusion noise sampler.

    Each noisy stage from node s to node t (the step's start and the point it lands on: the next sigma, or the
    intermediate point of ``dpmpp-sde``) draws ``s_noise * noise_sampler(sigma_s, sigma_t)``, where a sigma that is
    one of ``sigmas`` is passed as that very entry (k-diffusion's call) and any other as a float64 0-dim tensor
    of sigma / alpha. A :class:`~dpmsolve.solvers.stochastic.StochasticSolver` takes the sampler as its state's
    noise source (its own noise hook draws it); for any other fixed-grid solver the stages are handed over with
    the noise std set to 0 and the same noise is added after each noisy stage.
    """

    def __init__(self, inner: Solver, noise_sampler: NoiseSampler, sigmas: torch.Tensor, s_noise: float):
        if inner.adaptive or not hasattr(inner, "plan"):
            raise ValueError(f"noise_sampler needs a fixed-grid solver, got {type(inner).__name__}.")
        self.inner, self.noise_sampler, self.sigmas, self.s_noise = inner, noise_sampler, sigmas, float(s_noise)
        self.integrates = inner.integrates
        values = sigmas.detach().to("cpu", torch.float64).tolist()
        self._index = {v: j for j, v in enumerate(values)}

    @property
    def order(self) -> int:
        return self.inner.order

    @property
    def stochastic(self) -> bool:
        return self.inner.stochastic

    def expected_nfe(self, steps, ends_at_zero=False):
        return self.inner.expected_nfe(steps, ends_at_zero)

    def _sigma(self, node):
        j = self._index.get(node.t)  # the grid's own times are its sigmas (an EDM schedule, t = sigma)
        return self.sigmas[j] if j is not None else torch.tensor(math.exp(-node.lam), dtype=torch.float64)

    def _draw(self, s, t) -> torch.Tensor:
        """The noise source of a StochasticState: ``s_noise * noise_sampler(sigma_s, sigma_t)``."""
        z = self.noise_sampler(self._sigma(s), self._sigma(t))
        return z * self.s_noise if self.s_noise != 1.0 else z

    def init(self, schedule, ts, x, generator=None):
        state = self.inner.init(schedule, ts, x, generator)
        if isinstance(state, StochasticState):
            return replace(state, noise_source=self._draw)
        values = {f.name: getattr(state, f.name) for f in fields(state)}
        values["stages"] = tuple(stage._replace(noise_std=0.0) for stage in state.stages)
        return _ExternalNoiseState(**values, noise_stds=tuple(stage.noise_std for stage in state.stages))

    def ask(self, state):
        return self.inner.ask(state)

    def tell(self, state, pred):
        i = state.i
        new = self.inner.tell(state, pred)
        std = state.noise_stds[i] if isinstance(state, _ExternalNoiseState) else 0.0
        if std:
            x_new = new.x_eval  # a fresh tensor (also new.x when the stage completes a step)
            z = self.noise_sampler(self._sigma(state.nodes[state.stages[i].anchor]), self._sigma(state.nodes[i + 1]))
            x_new.add_(z.to(device=x_new.device, dtype=x_new.dtype), alpha=std * self.s_noise)
        return new

    def done(self, state):
        return self.inner.done(state)

    def step_completed(self, before, after):
        return self.inner.step_completed(before, after)

    def current(self, state):
        return self.inner.current(state)

    def __repr__(self):
        return f"{self.inner!r} with a k-diffusion noise sampler (s_noise={self.s_noise})"


def _randn_sampler(x: torch.Tensor, generator: torch.Generator) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------- the adapter

def _as_grid(sigmas) -> tuple[torch.Tensor, np.ndarray]:
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    if sigmas.dim() != 1:
        raise ValueError(f"sigmas must be a 1-D tensor (k-diffusion's convention), got shape {tuple(sigmas.shape)}.")
    ts = sigmas.detach().to("cpu", torch.float64).numpy()
    bad = np.flatnonzero(~np.isfinite(ts))
    if bad.size:
        raise ValueError(f"sigmas must be finite: sigmas[{bad[0]}] = {ts[bad[0]]} in {ts.tolist()}; they must be "
                         "strictly decreasing to 0 (or to sigma_min), e.g. get_sigmas_karras(n, sigma_min, sigma_max).")
    if ts.size and (ts < 0).any():
        raise ValueError(f"sigmas must be >= 0, got {ts}.")
    rising = np.flatnonzero(np.diff(ts) >= 0)
    if rising.size:
        i = int(rising[0])
        raise ValueError(f"sigmas must be strictly decreasing to 0 (or to sigma_min): sigmas[{i}] = {ts[i]:g} is "
                         f"followed by sigmas[{i + 1}] = {ts[i + 1]:g} in {ts.tolist()}. Reverse an increasing grid "
                         "(sigmas.flip(0)), drop repeated values, or build one with get_sigmas_karras(n, sigma_min, "
                         "sigma_max).")
    return sigmas, ts


def _ve_schedule(ts: np.ndarray) -> EDM:
    """The EDM schedule (alpha = 1, sigma = t) spanning [min positive sigma, first sigma]."""
    positive = ts[ts > 0]
    if positive.size == 0:
        raise ValueError(f"sigmas has no positive noise level to start from: {ts}.")
    sigma_max, sigma_min = float(ts[0]), float(positive.min())
    if not sigma_min < sigma_max:  # one step straight to 0 ([s, 0]): the range only has to hold s
        sigma_min = 0.5 * sigma_max
    return EDM(sigma_min=sigma_min, sigma_max=sigma_max)


def _progress(disable) -> bool | None:
    return None if disable is None else not disable


def _k_callback(callback, x: torch.Tensor, sigma_of: Callable[[int, float], Any]):
    """dpmsolve's per-step callback turned into k-diffusion's dict; returns (the callback, the last x seen)."""
    if callback is None:
        return None, None
    last = {"x": x, "i": -1}

    def on_step(info):
        i = info.step - 1
        sigma = sigma_of(i, info)
        callback({"x": last["x"], "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": info.x0})
        last["x"], last["i"] = info.x, i

    return on_step, last


def _net(model: Callable) -> Callable:
    def net(x, sigma, **extra_args):
        return model(x, sigma, **extra_args)

    return net


def _sample_k(solver_name: str | Callable[[np.ndarray], Solver], options: dict[str, Any], model, x: torch.Tensor,
              sigmas, extra_args, callback, disable) -> torch.Tensor:
    """The one generic k-diffusion-style sampler: everything goes through :func:`dpmsolve.sample`.

    ``solver_name``: a registry name (built with ``options``), or a function ``ts -> Solver`` of the sigma grid
    (then ``options`` may hold only the noise options)."""
    check_tensor("x", x)
    extra_args = dict(extra_args or {})
    noise_sampler = options.pop("noise_sampler", None)
    s_noise = float(options.pop("s_noise", 1.0))
    seed = options.pop("seed", None)
    generator = options.pop("generator", None)
    sigmas, ts = _as_grid(sigmas)
    if callable(solver_name):
        if options:
            raise ValueError(f"Unknown option(s) {', '.join(sorted(options))}: a plan holds its own step settings.")
        solver = solver_name(ts)
    else:
        solver = get_solver(solver_name, **options)
    if ts.size < 2:  # no step (k-diffusion's loop runs len(sigmas) - 1 times)
        return x
    schedule = _ve_schedule(ts)

    if solver.stochastic:
        if seed is None and generator is None:
            seed = extra_args.get("seed")  # ComfyUI passes its seed in extra_args
        if generator is None and seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(int(seed))
        if noise_sampler is None and s_noise != 1.0:
            if generator is None:
                generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, ()).item()))
            noise_sampler = _randn_sampler(x, generator)
        if noise_sampler is not None:
            solver = _ExternalNoise(solver, noise_sampler, sigmas, s_noise)

    denoiser = wrap_model(_net(model), schedule, prediction="x0", time_input="continuous", input_dtype=x.dtype)
    on_step, last = _k_callback(callback, x, lambda i, info: sigmas[i])
    solution = sample(denoiser, x, solver, grid=ts, generator=generator, callback=on_step,
                      progress=_progress(disable), model_kwargs=extra_args)
    i = ts.size - 2
    if on_step is not None and ts[-1] == 0.0 and last["i"] < i:
        # The jump to sigma = 0 (the x0 prediction at sigmas[-2]) when sample() reports no step for it.
        callback({"x": last["x"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": solution.x})
    return solution.x


def _make_sampler(name: str) -> Callable[..., torch.Tensor]:
    solver_name, defaults = SAMPLERS[name]

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return _sample_k(solver_name, {**defaults, **options}, model, x, sigmas, extra_args, callback, disable)

    shown = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__module__ = __name__
    sampler.__doc__ = (f"k-diffusion-style sampler: dpmsolve solver {solver_name!r} ({shown or 'defaults'}) on the "
                       "given sigmas.\n\nSee the module docstring for the conventions; ``**options`` override "
                       "the solver options and may add ``noise_sampler``, ``s_noise``, ``seed``, ``generator``.")
    return sampler


for _name in SAMPLERS:   # sample_ddim, sample_dpmpp_2m, ..., sample_euler_ancestral, sample_uni_pc_bh2, ...
    globals()[f"sample_{_name}"] = _make_sampler(_name)
del _name


def _sigma_range(name: str, sigma_min, sigma_max, eta) -> EDM:
    """The EDM schedule from ``sigma_min`` to ``sigma_max`` of k-diffusion's range-signature samplers (eta = 0 only)."""
    if eta:
        raise ValueError(f"{name} supports eta = 0 only (k-diffusion's default; no SDE form of it here).")
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"{name} needs 0 < sigma_min < sigma_max (it integrates from sigma_max down to "
                         f"sigma_min), got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
    return EDM(sigma_min=sigma_min, sigma_max=sigma_max)


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None, **options):
    """DPM-Solver-fast with ``n`` model evaluations from ``sigma_max`` to ``sigma_min`` (no jump to 0), with
    k-diffusion's ``sample_dpm_fast`` signature: singlestep DPM-Solver (noise prediction, ``solver_type=
    'dpmsolver'``) with the reference's order split (blocks of order 3, then 2 and 1 or ``n % 3``), the blocks
    uniform in log-SNR and divided uniformly in log-SNR (dpmsolve ``'dpmsolver'`` with ``method='singlestep',
    order=3, split='fast'`` on the ``'logSNR'`` grid; ComfyUI's ``dpm_fast``). ``eta`` must be 0 (k-diffusion's
    default; no SDE form here). The callback dict has ``sigma`` = the noise level of each step's start."""
    schedule = _sigma_range("sample_dpm_fast", sigma_min, sigma_max, eta)
    del s_noise, noise_sampler  # accepted for k-diffusion compatibility; unused at eta = 0
    solver_name, defaults = _PRESETS["dpm_fast"].solver, dict(_PRESETS["dpm_fast"].options)
    solver = get_solver(solver_name, **{**defaults, **options})
    ts = solver.grid(schedule, n, "logSNR")
    return _sample_k(lambda grid: solver, {}, model, x, torch.as_tensor(ts), extra_args, callback, disable)


def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, eta=0.0, s_noise=1.0, noise_sampler=None,
                        return_info=False, **options):
    """Adaptive DPM-Solver-12 (``order=2``) / -23 (``order=3``) from ``sigma_max`` to ``sigma_min`` with
    k-diffusion's ``sample_dpm_adaptive`` signature (noise prediction, as k-diffusion's; pass
    ``predict='data'`` for DPM-Solver++). ``eta`` must be 0 (no adaptive SDE here) and k-diffusion's PID
    step-size options are not supported. ``return_info=True`` returns ``(x, {'nfe', 'n_accept', 'n_reject'})``.
    The callback dict has ``sigma`` = the noise level of each accepted step's start."""
    schedule = _sigma_range("sample_dpm_adaptive", sigma_min, sigma_max, eta)
    del s_noise, noise_sampler  # accepted for k-diffusion compatibility; unused at eta = 0
    options = {"method": "adaptive", "order": order, "rtol": rtol, "atol": atol, "h_init": h_init, **options}
    solver = get_solver("dpmsolver", **options)
    denoiser = wrap_model(_net(model), schedule, prediction="x0", time_input="continuous", input_dtype=x.dtype)
    start = {"t": sigma_max}

    def sigma_of(i, info):
        sigma, start["t"] = start["t"], info.t
        return torch.tensor(sigma, dtype=torch.float64)

    on_step, _ = _k_callback(callback, x, sigma_of)
    solution = sample(denoiser, x, solver, grid=[sigma_max, sigma_min], callback=on_step,
                      progress=_progress(disable), model_kwargs=dict(extra_args or {}))
    if return_info:
        return solution.x, {"nfe": solution.nfe, "n_accept": solution.stats.get("accepted"),
                            "n_reject": solution.stats.get("rejected")}
    return solution.x


def _as_plan(plan) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise ValueError("sample_plan needs plan=: a dpmsolve.Plan or the path of a plan file, got "
                     f"{type(plan).__name__}.")


def _plan_solver(plan: Plan, x: torch.Tensor) -> Callable[[np.ndarray], Solver]:
    """The solver of ``plan`` on a k-diffusion sigma grid (checked against the plan's shape and end): its steps,
    plus, for a plan that denoises to zero, the jump to sigma = 0 that stands for its final evaluation."""
    plan.check(data_shape=tuple(x.shape[1:]))
    steps = plan.steps + ((PlanStep("data", 1, "dpmsolver"),) if plan.denoise_to_zero else ())

    def solver(ts: np.ndarray) -> Solver:
        if ts.size - 1 != len(steps):
            raise PlanError(f"This plan takes {plan.nfe} model evaluations, so it needs {plan.nfe + 1} sigmas, but "
                            f"{ts.size} were given ({ts.size - 1} steps); use plan_sigmas(plan, schedule).")
        if plan.to_zero != (ts[-1] == 0.0):
            raise PlanError("This plan ends at sigma = 0 (its last sigma is 0)" if plan.to_zero else
                            "This plan ends at a positive sigma (no final jump to 0)"
                            f", but the given sigmas end at {ts[-1]:.6g}; use plan_sigmas(plan, schedule).")
        return PlanSolver(steps)

    return solver


def sample_plan(model, x, sigmas, extra_args=None, callback=None, disable=None, plan=None, **options):
    """k-diffusion-style sampler running a tuned :class:`~dpmsolve.Plan` (or the path of a plan file) on
    ``sigmas``: one model evaluation per step, each step with the plan's settings (prediction, order, rule,
    corrector, compensation).

    ``sigmas`` are normally ``plan_sigmas(plan, schedule)``: then the result equals ``dpmsolve.sample(denoiser,
    x_T, plan)`` on the plan's schedule (``x = x_T / alpha(plan.ts[0])``; up to round-off). Other sigmas of the
    same length and end run the plan's settings on other times. ``plan`` is a keyword (ComfyUI:
    ``KSAMPLER(sample_plan, extra_options={"plan": plan})``); ``**options`` may hold only the noise options
    (unused: plans are deterministic). Refuses (:class:`~dpmsolve.PlanError`) a plan made for another sample
    shape, or sigmas that do not fit it."""
    plan = _as_plan(plan)
    check_tensor("x", x)
    return _sample_k(_plan_solver(plan, x), dict(options), model, x, sigmas, extra_args, callback, disable)


# --------------------------------------------------------------------------------------------- grids

def _to_tensor(sigmas: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.as_tensor(sigmas, dtype=torch.float64).to(device=device,
                                                           dtype=dtype or torch.get_default_dtype())


def _edm_sigmas(name: str, n: int, sigma_min: float, sigma_max: float, kind: str, device, dtype,
                **options) -> torch.Tensor:
    """k-diffusion's layout: ``n`` sigmas from sigma_max down to sigma_min (a ``kind`` grid of ``n - 1``
    intervals on the EDM schedule), then 0. ``name``: the helper, for error messages."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}.")
    if not (0 < float(sigma_min) < float(sigma_max) < math.inf):
        raise ValueError(f"{name} needs 0 < sigma_min < sigma_max (the sigmas decrease from sigma_max to sigma_min, "
                         f"then 0), got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
    if n == 1:
        body = np.array([float(sigma_max)])
    else:
        body = make_grid(EDM(sigma_min=float(sigma_min), sigma_max=float(sigma_max)), int(n) - 1, kind, **options)
    return _to_tensor(np.append(body, 0.0), device, dtype)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu",
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Karras et al. (2022) sigmas, as k-diffusion's ``get_sigmas_karras``: ``n`` values uniform in
    ``sigma^(1/rho)`` from ``sigma_max`` to ``sigma_min``, then 0 (``dtype`` default: torch's default dtype)."""
    return _edm_sigmas("get_sigmas_karras", n, sigma_min, sigma_max, "karras", device, dtype, rho=rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu",
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sigmas uniform in log sigma (= uniform in log-SNR), as k-diffusion's ``get_sigmas_exponential``:
    ``n`` values from ``sigma_max`` to ``sigma_min``, then 0."""
    return _edm_sigmas("get_sigmas_exponential", n, sigma_min, sigma_max, "exponential", device, dtype)


get_sigmas_logsnr = get_sigmas_exponential


def get_sigmas(schedule: Schedule, n: int, kind: str = "logSNR", device="cpu", dtype: torch.dtype | None = None,
               append_zero: bool = True, **grid_options) -> torch.Tensor:
    """The dpmsolve grid ``kind`` of ``schedule`` as k-diffusion sigmas (VE ``sigma / alpha`` per time).

    ``append_zero=True`` (k-diffusion's layout): ``n`` steps ending at sigma = 0, i.e. ``make_grid(schedule, n,
    kind, t_end=0)``: ``n`` positive sigmas then 0 (time-spaced grids such as ``time_uniform`` run their
    spacing down to t = 0; sigma-spaced ones reach t_min in ``n - 1`` steps, then 0). ``append_zero=False``:
    the ``n + 1`` sigmas of ``make_grid(schedule, n, kind)``, ending at t_min. ``grid_options`` go to the grid
    (``rho``, ``shift``)."""
    ts = make_grid(schedule, n, kind, t_end=0 if append_zero else None, **grid_options)
    sigmas = np.zeros_like(ts)
    positive = ts > 0
    sigmas[positive] = np.exp(-schedule.log_snr(ts[positive]))
    return _to_tensor(sigmas, device, dtype)


def plan_sigmas(plan: Plan, schedule: Schedule, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The times of ``plan`` as k-diffusion sigmas: VE ``sigma_t / alpha_t`` at each time of ``plan.ts`` (0 at
    t = 0), then 0 for a plan that denoises to zero (its final evaluation is k-diffusion's jump to sigma = 0).
    ``plan.nfe + 1`` values; ``schedule`` is the one the plan was made for (checked: a
    :class:`~dpmsolve.PlanError` otherwise)."""
    plan.check(schedule)
    ts = np.asarray(plan.ts, dtype=np.float64)
    sigmas = np.zeros_like(ts)
    positive = ts > 0
    sigmas[positive] = np.exp(-schedule.log_snr(ts[positive]))
    if plan.denoise_to_zero:
        sigmas = np.append(sigmas, 0.0)
    return _to_tensor(sigmas, device, dtype)
