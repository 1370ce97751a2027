"""Drop-in adapters for other libraries' sampling loops.

- ``dpmsolve.integrations.diffusers``: :class:`DPMSolveScheduler` and its named presets, diffusers schedulers
  that run any dpmsolve fixed-grid solver inside a diffusers pipeline, and
  :class:`DPMSolveInverseScheduler`, its inverse (data -> noise, as ``dpmsolve.invert``).
- ``dpmsolve.integrations.kdiffusion`` (where present): k-diffusion-style sampling functions.

Each submodule imports its host library, so it is loaded only when one of its names is first used (or imported
directly).
"""

from __future__ import annotations

import importlib

_DIFFUSERS_NAMES = ("DPMSolveScheduler", "DPMSolveSchedulerOutput", "DDIMSolveScheduler",
                    "DPMSolverPPMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCScheduler", "DPMSolveInverseScheduler")

__all__ = list(_DIFFUSERS_NAMES)


def __getattr__(name: str):
    if name in _DIFFUSERS_NAMES:
        return getattr(importlib.import_module(".diffusers", __name__), name)
    if name in ("diffusers", "kdiffusion"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
