"""Our solvers measured *through the diffusers adapter*: a peer-like runner for the accuracy lab.

:func:`run_adapter` drives :class:`~dpmsolve.integrations.diffusers.DPMSolveScheduler` the way a diffusers
pipeline does (``set_timesteps``, then one ``step`` per model evaluation) on the lab's model, from the lab's start
noise to the lab's endpoint, and returns a :class:`~dpmsolve.lab.peers.PeerResult` like the peers do. The scheduler
is built from a diffusers-style config, exactly as a user gets it from ``DPMSolveScheduler.from_config``: the
DiscreteVP schedule of the model as ``trained_betas = 1 - abar_n / abar_(n-1)`` with ``num_train_timesteps = N``,
``prediction_type='epsilon'``, and ``final_sigma`` ``'zero'`` or ``'min'`` for the endpoints ``'zero'`` and
``'t_min'``.

The grid is either a dpmsolve grid name (``'logSNR'``, ``'karras'``, ...; the scheduler's own ``set_timesteps(nfe)``)
or an explicit list of ``nfe`` network timesteps (train indices, as diffusers' schedulers hand them over, e.g. a
peer's ``PeerResult.settings['grid']``): the adapter then evaluates the model where that peer does, so
adapter-vs-peer differences are the solvers' own.

The model is evaluated at the scheduler's float64 grid time of each step (``scheduler._ts``), not at the float32
``timesteps`` value: for integer timesteps the two are the same time; for fractional ones (named grids) this keeps
the run equal to ``dpmsolve.sample`` on the same grid to float64 round-off (a real pipeline's network sees the
float32 value, a relative time error of ~1e-7).

:class:`AdapterConfig` is a :class:`~dpmsolve.lab.evaluate.SolverConfig` whose ``run`` goes through the adapter,
so ``evaluate(..., configs=[AdapterConfig(...)])`` puts adapter rows into a lab report unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..model import Denoiser
from ..schedules import DiscreteVP
from .evaluate import ENDPOINTS, SolverConfig
from .peers import PeerResult, _Counted

__all__ = ["run_adapter", "adapter_scheduler", "AdapterConfig"]


def adapter_scheduler(denoiser: Denoiser, solver: str, options: Mapping[str, Any] | None = None,
                      grid: str | None = "logSNR", grid_options: Mapping[str, Any] | None = None,
                      endpoint: str = "zero"):
    """A ``DPMSolveScheduler`` for ``denoiser``'s DiscreteVP schedule, built from a diffusers-style config."""
    from ..integrations.diffusers import DPMSolveScheduler

    schedule = denoiser.schedule
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"The diffusers adapter needs a DiscreteVP schedule (a discrete train grid), got "
                         f"{type(schedule).__name__}.")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}.")
    ac = schedule.alphas_cumprod
    betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
    config = {"num_train_timesteps": schedule.num_train_steps, "trained_betas": betas.tolist(),
              "prediction_type": "epsilon", "solver": solver, "solver_options": dict(options or {}),
              "final_sigma": "zero" if endpoint == "zero" else "min"}
    if grid is not None:
        config.update(grid=grid, grid_options=dict(grid_options or {}))
    sched = DPMSolveScheduler.from_config(config)
    # The betas round trip must give back the model's schedule (else the lab would measure a different ODE).
    back = sched.schedule.alphas_cumprod
    if back.shape != ac.shape or np.max(np.abs(back / ac - 1.0)) > 1e-12:
        raise RuntimeError("The adapter's schedule rebuilt from trained_betas differs from the model's.")
    return sched


def run_adapter(solver: str, options: Mapping[str, Any] | None, grid: str | Sequence[float],
                denoiser: Denoiser, x_T: torch.Tensor, nfe: int, endpoint: str = "zero",
                grid_options: Mapping[str, Any] | None = None) -> PeerResult:
    """Run dpmsolve solver ``solver`` (with ``options``) through the diffusers adapter with ``nfe`` model
    evaluations of ``denoiser`` from ``x_T`` at t_max to ``endpoint`` (``'zero'``: sigma = 0; ``'t_min'``).

    ``grid``: a dpmsolve grid name (with ``grid_options``), or ``nfe`` explicit network timesteps (train
    indices, decreasing; the end is appended as ``endpoint`` says). Never raises for a failing run: as
    :func:`~dpmsolve.lab.peers.run_peer`, the error is recorded in the result (``x`` None). The result's
    ``settings`` hold the scheduler config, its ``timesteps`` and the float64 grid ``ts`` it ran.
    """
    label = f"adapter:{solver}"
    settings: dict[str, Any] = {"runner": "dpmsolve.integrations.diffusers.DPMSolveScheduler", "solver": solver,
                                "options": dict(options or {}), "nfe_requested": nfe, "endpoint": endpoint}
    counted: _Counted | None = None
    try:
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}.")
        if not isinstance(denoiser, Denoiser):
            raise ValueError(f"denoiser must be a dpmsolve Denoiser, got {type(denoiser).__name__}.")
        named = isinstance(grid, str)
        sched = adapter_scheduler(denoiser, solver, options, grid if named else None,
                                  grid_options if named else None, endpoint)
        if named:
            settings.update(grid=grid, grid_options=dict(grid_options or {}))
            sched.set_timesteps(int(nfe))
        else:
            if grid_options:
                raise ValueError("grid_options apply to named grids only.")
            values = [float(v) for v in grid]
            if len(values) != nfe:
                raise ValueError(f"The explicit grid has {len(values)} timesteps, but nfe={nfe}.")
            settings["grid"] = values
            sched.set_timesteps(timesteps=values)
        settings.update(timesteps=[float(t) for t in sched.timesteps], ts=[float(t) for t in sched._ts])
        counted = _Counted(denoiser)
        x = x_T.detach().to(torch.float64)
        with torch.no_grad():
            for timestep, t in zip(sched.timesteps, sched._ts[:-1]):
                x = sched.step(counted(x, float(t)).eps, timestep, x).prev_sample
        settings["nfe"] = counted.calls
        if not bool(torch.isfinite(x).all()):
            return PeerResult(label, None, counted.calls,
                              f"NonFiniteError: {label} returned NaN or Inf after {counted.calls} model calls",
                              settings)
        return PeerResult(label, x.to(torch.float64), counted.calls, None, settings)
    except Exception as exc:  # noqa: BLE001 - as run_peer: a failing configuration is a finding
        return PeerResult(label, None, counted.calls if counted is not None else 0, f"{type(exc).__name__}: {exc}",
                          settings)


@dataclass(frozen=True)
class AdapterConfig(SolverConfig):
    """A lab configuration run through the diffusers adapter (``evaluate`` treats it as one of ours). ``grid`` is
    a dpmsolve grid name; the result has ``.x`` and ``.nfe`` as ``dp.sample``'s Solution."""

    def run(self, denoiser: Denoiser, x_T: torch.Tensor, nfe: int, endpoint: str):
        result = run_adapter(self.solver, self.options, self.grid, denoiser, x_T, nfe, endpoint,
                             self.grid_options or None)
        if result.error is not None:
            raise RuntimeError(result.error)
        return result
