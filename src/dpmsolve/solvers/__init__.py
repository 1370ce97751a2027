"""Solvers and their registry: names follow the literature and the ecosystem."""

from __future__ import annotations

import inspect
from typing import Callable

from .adaptive import AdaptiveDPMSolver
from .base import Correction, FixedGridSolver, Solver, Stage, State
from .dpm_solver import DDIM, DPMSolverMultistep, DPMSolverSinglestep, SDEDPMSolverPP, fast_orders
from .karras import DPM2, Euler, Heun
from .linear_multistep import DEIS, IPNDM, IPNDMV, LMS, GradientEstimation, RESMultistep
from .pndm import PLMS, PNDM
from .unipc import UniPC
from .v3 import DPMSolverV3
from .momentum import HeavyBall, momentum
from .er_sde import ERSDE
from .sa_solver import SASolver
from .stochastic import (DPM2Ancestral, DPMPP2MSDE, DPMPP2SAncestral, DPMPP3MSDE, DPMPPSDE, EulerAncestral,
                         StochasticSolver)

__all__ = ["SOLVERS", "get_solver", "Solver", "FixedGridSolver", "State", "Stage", "DDIM", "DPMSolverMultistep",
           "DPMSolverSinglestep", "SDEDPMSolverPP", "AdaptiveDPMSolver", "UniPC", "DPMSolverV3", "Correction",
           "fast_orders", "Euler", "Heun", "DPM2", "DEIS", "LMS", "IPNDM", "IPNDMV", "PNDM", "PLMS",
           "GradientEstimation", "RESMultistep"]

__all__ += ["StochasticSolver", "EulerAncestral", "DPM2Ancestral", "DPMPP2SAncestral", "DPMPPSDE", "DPMPP2MSDE",
            "DPMPP3MSDE", "ERSDE", "SASolver"]

_METHODS = {"multistep": DPMSolverMultistep, "singlestep": DPMSolverSinglestep, "adaptive": AdaptiveDPMSolver}


def _dpm_family(predict: str) -> Callable[..., Solver]:
    def build(method: str = "multistep", **options) -> Solver:
        if method not in _METHODS:
            raise ValueError(f"Unknown method {method!r}; valid: {', '.join(_METHODS)}.")
        return _construct(_METHODS[method], predict=predict, **options)

    return build


SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "dpmsolver": _dpm_family("noise"),     # DPM-Solver (Lu et al. 2022), noise prediction
    "dpmsolver++": _dpm_family("data"),    # DPM-Solver++ (Lu et al. 2022b), data prediction
    "sde-dpmsolver++": SDEDPMSolverPP,
    "unipc": UniPC,                        # UniPC (Zhao et al. 2023): UniP predictor + UniC corrector
    "dpmsolver-v3": DPMSolverV3,           # DPM-Solver-v3 (Zheng et al. 2023): needs the model's EMS
    "euler": Euler,                        # Euler in sigma-space (Karras et al. 2022, Alg. 1): equals DDIM
    "heun": Heun,                          # Heun / EDM (Karras et al. 2022, Alg. 2)
    "dpm2": DPM2,                          # k-diffusion's DPM-2 (sigma-space midpoint)
    "euler-ancestral": EulerAncestral,     # k-diffusion's Euler ancestral (stochastic)
    "dpm2-ancestral": DPM2Ancestral,       # k-diffusion's DPM-2 ancestral (stochastic)
    "dpmpp-2s-ancestral": DPMPP2SAncestral,  # k-diffusion's DPM-Solver++(2S) ancestral (stochastic)
    "dpmpp-sde": DPMPPSDE,                 # k-diffusion's DPM-Solver++ SDE (stochastic 2S, Brownian noise)
    "dpmpp-2m-sde": DPMPP2MSDE,            # k-diffusion's DPM-Solver++(2M) SDE (= sde-dpmsolver++ order 2)
    "dpmpp-3m-sde": DPMPP3MSDE,            # k-diffusion's DPM-Solver++(3M) SDE
    "er-sde": ERSDE,                       # ER-SDE-Solver-3 (Cui et al. 2023; ComfyUI er_sde)
    "sa-solver": SASolver,                 # SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector
    "deis": DEIS,                          # DEIS tAB / rhoAB / logrho (Zhang & Chen 2022)
    "pndm": PNDM,                          # PNDM (Liu et al. 2022): pseudo RK4 warm-up, then PLMS
    "plms": PLMS,                          # PLMS (Liu et al. 2022), diffusers' skip_prk_steps warm-up
    "ipndm": IPNDM,                        # iPNDM: equal-step Adams-Bashforth 4 on eps (ComfyUI ipndm)
    "ipndm_v": IPNDMV,                     # iPNDM, variable-step Adams-Bashforth (ComfyUI ipndm_v)
    "lms": LMS,                            # k-diffusion's linear multistep in sigma-space
    "res-multistep": RESMultistep,         # RES 2nd-order multistep (Zhang, Song & Chen 2023)
    "gradient-estimation": GradientEstimation,  # Permenter & Yuan 2024 (ComfyUI gradient_estimation)
    "momentum": momentum,                  # heavy-ball momentum around a fixed-grid solver (Wizadwongsa et al. 2023)
}


def _construct(cls, **options) -> Solver:
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {', '.join(unknown)}; its options are: "
                         f"{', '.join(params)}.")
    return cls(**options)


def get_solver(name: str, **options) -> Solver:
    """The solver registered as ``name`` with its options, e.g. ``get_solver("dpmsolver++", order=3)``."""
    if not isinstance(name, str):
        raise TypeError(f"The solver name must be a string, got {name!r} ({type(name).__name__}); valid names are: "
                        f"{', '.join(SOLVERS)}.")
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; valid names are: {', '.join(SOLVERS)}.")
    factory = SOLVERS[name]
    return _construct(factory, **options) if inspect.isclass(factory) else factory(**options)
