"""Presets by ComfyUI name: every KSampler sampler and scheduler name that dpmsolve implements, in one table.

A preset name is a ComfyUI sampler name (``comfy/samplers.py``: ``KSAMPLER_NAMES + ["ddim", "uni_pc",
"uni_pc_bh2"]``), optionally followed by ``_<scheduler>`` with a ComfyUI scheduler name (``SCHEDULER_NAMES``),
as users write them: ``"dpmpp_2m_karras"``, ``"euler_ancestral_normal"``, ``"dpmpp_2m_sde_gpu_exponential"``.
It resolves to a registry solver with options (``SAMPLERS``) and a dpmsolve grid with options (``SCHEDULERS``);
strings stop here and at the solver registry, the maths never sees them:

```python
dp.sample(den, x, "dpmpp_2m_karras", steps=20)           # DPM-Solver++(2M) on ComfyUI's karras sigmas
dp.sample(den, x, "dpmpp_2m_sde", grid="karras", seed=0) # the scheduler as grid=, any dpmsolve grid name too
DPMSolveScheduler.from_config(cfg, sampler="dpmpp_2m_sde", scheduler="karras")
```

Conventions (ComfyUI's): the sigmas of a scheduler end at sigma = 0, so a preset's grid ends at t = 0 unless
``t_end`` is given (the last step is then the jump to the x0 prediction, as in every k-diffusion sampler); a
sampler name without a scheduler runs on dpmsolve's default grid, ``'logSNR'`` (ComfyUI's ``exponential``), also
to sigma = 0. ``dpm_2``, ``dpm_2_ancestral``, ``uni_pc`` and ``uni_pc_bh2`` compute the grid for one step more
and drop its penultimate time (ComfyUI's ``DISCARD_PENULTIMATE_SIGMA_SAMPLERS``). ``dpm_fast`` and
``dpm_adaptive`` use only the ends of the range, t_start and t_min (ComfyUI passes its scheduler's first and last
positive sigma, which are those for every full-range scheduler), and end at t_min without a final jump, as
k-diffusion's ``sample_dpm_fast`` / ``sample_dpm_adaptive``. Options given with a preset override its defaults
(``dp.sample(den, x, "dpmpp_2m_sde_karras", eta=0.5)``). A name that is also a registry name (``euler``,
``heun``, ``lms``, ``ddim``, ``deis``, ``ipndm``, ``ipndm_v``) is the registry's solver in ``dp.sample`` (the
registry comes first); ``deis`` differs there: the preset is ComfyUI's Adams weights in sigma (``variant=
'rhoab'``), the registry default the paper's tAB in the schedule's own t. ``_gpu`` names draw their Brownian
noise on the sample's device, like the others: in dpmsolve they are the same preset as the CPU names.

The ComfyUI names dpmsolve does not implement are in ``NOT_IMPLEMENTED``, each with the reason.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

__all__ = ["SAMPLERS", "SCHEDULERS", "NOT_IMPLEMENTED", "DEFAULT_GRID", "SamplerPreset", "parse_preset",
           "is_preset", "preset_settings", "resolve_preset"]


@dataclass(frozen=True)
class SamplerPreset:
    """A ComfyUI sampler as a dpmsolve solver: the registry name, its options, ComfyUI's grid rules."""

    solver: str
    options: Mapping[str, Any] = field(default_factory=dict)
    discard_penultimate: bool = False  # ComfyUI's DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    range_only: bool = False           # uses only the ends of the range and stops at t_min (dpm_fast / adaptive)
    checked: str = ""                  # the implementation it was checked against (docs)

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


def _p(solver: str, checked: str = "", discard: bool = False, range_only: bool = False, **options) -> SamplerPreset:
    return SamplerPreset(solver, options, discard, range_only, checked)


# ComfyUI sampler name -> dpmsolve solver. Options are ComfyUI's defaults where they differ from the registry's.
SAMPLERS: Mapping[str, SamplerPreset] = MappingProxyType({
    "euler": _p("euler", "k-diffusion sample_euler"),
    "euler_ancestral": _p("euler-ancestral", "k-diffusion sample_euler_ancestral"),
    "heun": _p("heun", "k-diffusion sample_heun"),
    "dpm_2": _p("dpm2", "k-diffusion sample_dpm_2", discard=True),
    "dpm_2_ancestral": _p("dpm2-ancestral", "k-diffusion sample_dpm_2_ancestral", discard=True),
    "lms": _p("lms", "k-diffusion sample_lms", order=4),
    "dpm_fast": _p("dpmsolver", "k-diffusion sample_dpm_fast", range_only=True, method="singlestep", order=3,
                   split="fast"),
    "dpm_adaptive": _p("dpmsolver", "k-diffusion sample_dpm_adaptive (its defaults)", range_only=True,
                       method="adaptive", order=3, rtol=0.05, atol=0.0078, h_init=0.05),
    "dpmpp_2s_ancestral": _p("dpmpp-2s-ancestral", "k-diffusion sample_dpmpp_2s_ancestral"),
    "dpmpp_sde": _p("dpmpp-sde", "k-diffusion sample_dpmpp_sde"),
    "dpmpp_sde_gpu": _p("dpmpp-sde", "k-diffusion sample_dpmpp_sde"),
    "dpmpp_2m": _p("dpmsolver++", "k-diffusion sample_dpmpp_2m", order=2),
    "dpmpp_2m_sde": _p("dpmpp-2m-sde", "k-diffusion sample_dpmpp_2m_sde"),
    "dpmpp_2m_sde_gpu": _p("dpmpp-2m-sde", "k-diffusion sample_dpmpp_2m_sde"),
    "dpmpp_2m_sde_heun": _p("dpmpp-2m-sde", "k-diffusion sample_dpmpp_2m_sde(solver_type='heun')",
                            solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": _p("dpmpp-2m-sde", "k-diffusion sample_dpmpp_2m_sde(solver_type='heun')",
                                solver_type="heun"),
    "dpmpp_3m_sde": _p("dpmpp-3m-sde", "k-diffusion sample_dpmpp_3m_sde"),
    "dpmpp_3m_sde_gpu": _p("dpmpp-3m-sde", "k-diffusion sample_dpmpp_3m_sde"),
    "ddpm": _p("ddim", "diffusers DDIMScheduler eta = 1 (the DDPM posterior, ComfyUI's DDPMSampler_step)", eta=1.0),
    "ipndm": _p("ipndm", "diffusers IPNDMScheduler", order=4),
    "ipndm_v": _p("ipndm_v", "k-diffusion sample_lms (order 4)", order=4),
    "deis": _p("deis", "k-diffusion sample_lms (rhoAB: Adams weights in sigma, as ComfyUI's)", order=3,
                variant="rhoab"),
    "res_multistep": _p("res-multistep", "diffusers DPMSolverMultistep 2M heun"),
    "gradient_estimation": _p("gradient-estimation", "Permenter & Yuan 2024 (paper loop)", gamma=2.0),
    "er_sde": _p("er-sde", "a loop from Cui et al. 2023 (ComfyUI's 200-point sums)", integration_points=200),
    "sa_solver": _p("sa-solver", "diffusers SASolverScheduler"),
    "sa_solver_pece": _p("sa-solver", "a loop from Xue et al. 2023", pece=True),
    "ddim": _p("ddim", "k-diffusion sample_euler; diffusers DDIMScheduler"),
    "uni_pc": _p("unipc", "UniPC reference (wl-zhao/UniPC)", discard=True, order=3, variant="bh1",
                 lower_order_final=True),
    "uni_pc_bh2": _p("unipc", "UniPC reference (wl-zhao/UniPC)", discard=True, order=3, variant="bh2",
                     lower_order_final=True),
})

# ComfyUI sampler names without a dpmsolve preset, and why.
_CFG_PP = ("CFG++ (Chung et al. 2024) mixes the unconditional prediction into the update, which needs the two "
           "guidance branches inside the solver; dpmsolve keeps guidance a denoiser wrapper")
NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType({
    "euler_cfg_pp": _CFG_PP,
    "euler_ancestral_cfg_pp": _CFG_PP,
    "dpmpp_2s_ancestral_cfg_pp": _CFG_PP,
    "dpmpp_2m_cfg_pp": _CFG_PP,
    "res_multistep_cfg_pp": _CFG_PP,
    "res_multistep_ancestral_cfg_pp": _CFG_PP,
    "gradient_estimation_cfg_pp": _CFG_PP,
    "cfgpp_ud10_ab": _CFG_PP + "; it also has no paper (an experiment in Comfy-Org/ComfyUI#15951)",
    "heunpp2": "a port of a webui extension with no published method to check it against",
    "exp_heun_2_x0": "SEEDS (Gonzalez et al. 2023) samplers are not implemented yet",
    "exp_heun_2_x0_sde": "SEEDS (Gonzalez et al. 2023) samplers are not implemented yet",
    "seeds_2": "SEEDS (Gonzalez et al. 2023) samplers are not implemented yet",
    "seeds_3": "SEEDS (Gonzalez et al. 2023) samplers are not implemented yet",
    "res_multistep_ancestral": "res-multistep is deterministic in dpmsolve (no ancestral noise option yet)",
    "lcm": "sampling of latent-consistency-distilled models (x0 prediction re-noised each step), not a solver "
           "of the diffusion ODE or SDE",
})

# ComfyUI scheduler name -> dpmsolve grid and options (the same names: grids.py reproduces each of them), plus
# ComfyUI's table-based sigma nodes (AlignYourStepsScheduler, GITSScheduler) under short names.
SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "simple": ("simple", {}),
    "sgm_uniform": ("sgm_uniform", {}),
    "karras": ("karras", {"rho": 7.0}),
    "exponential": ("exponential", {}),
    "ddim_uniform": ("ddim_uniform", {}),
    "beta": ("beta", {"alpha": 0.6, "beta": 0.6}),
    "normal": ("normal", {}),
    "linear_quadratic": ("linear_quadratic", {}),
    "kl_optimal": ("kl_optimal", {}),
    "ays": ("ays", {"model": "sd15"}),
    "ays_sdxl": ("ays", {"model": "sdxl"}),
    "ays_svd": ("ays", {"model": "svd"}),
    "gits": ("gits", {"coeff": 1.20}),
})

DEFAULT_GRID = "logSNR"   # a sampler name without a scheduler: dpmsolve's default grid (ComfyUI's exponential)


def _registry() -> Mapping[str, Any]:
    from .solvers import SOLVERS

    return SOLVERS


def _unknown(name) -> ValueError:
    from .grids import GRIDS

    why = NOT_IMPLEMENTED.get(name)
    if why is None and isinstance(name, str):
        for scheduler in sorted(SCHEDULERS, key=len, reverse=True):
            if name.endswith("_" + scheduler) and name[:-len(scheduler) - 1] in NOT_IMPLEMENTED:
                name = name[:-len(scheduler) - 1]
                why = NOT_IMPLEMENTED[name]
                break
    if why is not None:
        return ValueError(f"The ComfyUI sampler {name!r} is not implemented in dpmsolve: {why}. Implemented ComfyUI "
                          f"samplers: {', '.join(SAMPLERS)}.")
    return ValueError(f"Unknown solver {name!r}; valid names are: {', '.join(_registry())}; or a ComfyUI preset: a "
                      f"sampler ({', '.join(SAMPLERS)}), optionally followed by _<scheduler> with a ComfyUI scheduler "
                      f"({', '.join(SCHEDULERS)}), e.g. 'dpmpp_2m_karras' (grid names for grid=: {', '.join(GRIDS)}).")


def parse_preset(name: str) -> tuple[str, str | None]:
    """``(sampler, scheduler or None)`` of a preset name (``'dpmpp_2m_sde_karras'`` -> ``('dpmpp_2m_sde',
    'karras')``); a ValueError listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"A preset name must be a string, got {name!r} ({type(name).__name__}).")
    if name in SAMPLERS:
        return name, None
    for scheduler in sorted(SCHEDULERS, key=len, reverse=True):   # the longest scheduler suffix first
        suffix = "_" + scheduler
        if name.endswith(suffix) and name[:-len(suffix)] in SAMPLERS:
            return name[:-len(suffix)], scheduler
    raise _unknown(name)


def is_preset(name) -> bool:
    """Whether ``name`` is a preset name (and not a registry solver name, which comes first)."""
    if not isinstance(name, str) or name in _registry():
        return False
    try:
        parse_preset(name)
    except ValueError:
        return False
    return True


def _grid_of(scheduler: str | None, grid, grid_options: Mapping[str, Any] | None):
    """(grid name or explicit times, grid options) from a scheduler name and/or ``grid=``."""
    if scheduler is not None and grid is not None:
        raise ValueError(f"The preset names the scheduler {scheduler!r} and grid={grid!r} was given too; pass one "
                         "of them (the sampler name alone with grid=, or the full preset name).")
    if scheduler is None and isinstance(grid, str) and grid in SCHEDULERS:
        scheduler, grid = grid, None
    if scheduler is not None:
        kind, options = SCHEDULERS[scheduler]
        return kind, {**options, **dict(grid_options or {})}
    if grid is None:
        return DEFAULT_GRID, dict(grid_options or {})
    return grid, dict(grid_options or {})


def preset_settings(sampler: str, scheduler: str | None = None) -> dict[str, Any]:
    """The settings of a sampler (+ scheduler) by ComfyUI name for code without a schedule at hand (the diffusers
    adapter): ``solver``, ``solver_options``, ``grid``, ``grid_options``, ``final_sigma`` (``'zero'``, or
    ``'min'`` for ``dpm_fast``), ``discard_penultimate_sigma``. ``sampler`` may be a full preset name."""
    name, named_scheduler = parse_preset(sampler)
    if scheduler is not None and named_scheduler is not None:
        raise ValueError(f"sampler={sampler!r} names the scheduler {named_scheduler!r} already; drop scheduler=.")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; ComfyUI schedulers: {', '.join(SCHEDULERS)}.")
    preset = SAMPLERS[name]
    kind, options = _grid_of(scheduler or named_scheduler, None, None)
    if preset.range_only:
        kind, options = "logSNR", {}
    return {"solver": preset.solver, "solver_options": dict(preset.options), "grid": kind, "grid_options": options,
            "final_sigma": "min" if preset.range_only else "zero",
            "discard_penultimate_sigma": preset.discard_penultimate}


def resolve_preset(name, schedule, solver_options: Mapping[str, Any] | None = None, *, steps: int | None = None,
                   grid=None, t_start: float | None = None, t_end: float | None = None,
                   grid_options: Mapping[str, Any] | None = None):
    """``(solver, times)`` of preset ``name`` on ``schedule``, or None when ``name`` is a registry solver name (or
    not a string): ``dp.sample`` resolves a solver string through this. Unknown names raise a ValueError that
    lists the registry solvers, the ComfyUI samplers and schedulers (and says why for a ComfyUI name dpmsolve
    does not implement). ``solver_options`` override the preset's options; ``grid`` may be any dpmsolve grid name
    (ComfyUI's scheduler names included) or explicit times (used as given)."""
    if not isinstance(name, str) or name in _registry():
        return None
    from ._checks import check_count
    from .grids import check_grid
    from .solvers import get_solver

    sampler, scheduler = parse_preset(name)
    preset = SAMPLERS[sampler]
    solver = get_solver(preset.solver, **{**preset.options, **dict(solver_options or {})})
    kind, options = _grid_of(scheduler, grid, grid_options)
    if isinstance(kind, numbers.Number) or getattr(kind, "ndim", None) == 0:
        raise TypeError(f"grid must be a grid name (e.g. 'karras') or an array of times, got {kind!r} "
                        f"({type(kind).__name__}); a number is not a grid: pass steps={kind!r} for a number of steps.")
    if not isinstance(kind, str):   # explicit times
        ts = np.asarray(kind, dtype=np.float64)
        if t_start is not None or t_end is not None or options:
            raise ValueError("t_start, t_end and grid_options apply to named grids only; an explicit grid holds its "
                             "own times.")
        if preset.range_only:
            ts = check_grid(schedule, ts)
            end = ts[-2] if ts[-1] == 0.0 else ts[-1]
            return solver, (solver.grid(schedule, ts.size - 1, "logSNR", ts[0], end) if not solver.adaptive
                            else np.array([ts[0], end]))
        if steps is not None and steps != ts.size - 1:
            raise ValueError(f"steps={steps} disagrees with the explicit grid of {ts.size} times ({ts.size - 1} "
                             "steps); pass one of them.")
        return solver, ts
    steps = 20 if steps is None else check_count("steps", steps)
    if preset.range_only:   # ComfyUI: the scheduler's first and last positive sigma; no jump to sigma = 0
        end = None if t_end in (None, 0) else t_end
        if solver.adaptive:
            return solver, np.array([schedule.t_max if t_start is None else float(t_start),
                                     schedule.t_min if end is None else float(end)])
        return solver, solver.grid(schedule, steps, "logSNR", t_start, end)
    t_end = 0.0 if t_end is None else t_end
    if preset.discard_penultimate:
        ts = solver.grid(schedule, steps + 1, kind, t_start, t_end, **options)
        return solver, np.delete(ts, -2)
    return solver, solver.grid(schedule, steps, kind, t_start, t_end, **options)
