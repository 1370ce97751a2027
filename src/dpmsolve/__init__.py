"""dpmsolve: fast, training-free samplers for diffusion and flow models (DPM-Solver family and peers).

The subpackages ``dpmsolve.zoo``, ``dpmsolve.lab`` and ``dpmsolve.integrations`` are imported on first use
(``dpmsolve.zoo.load(...)`` works after a plain ``import dpmsolve``), so ``import dpmsolve`` stays fast.
"""

import importlib as _importlib

from .grids import GRIDS as GRIDS, check_grid as check_grid, make_grid as make_grid
from .model import (
    PREDICTIONS as PREDICTIONS,
    TIME_INPUTS as TIME_INPUTS,
    ClassifierFreeGuidance as ClassifierFreeGuidance,
    ClassifierGuidance as ClassifierGuidance,
    ClipX0 as ClipX0,
    Denoiser as Denoiser,
    DynamicThresholding as DynamicThresholding,
    ModelDenoiser as ModelDenoiser,
    Prediction as Prediction,
    wrap_model as wrap_model,
)
from . import ems as ems
from .sampling import NonFiniteError as NonFiniteError, Solution as Solution, StepInfo as StepInfo
from .sampling import invert as invert, sample as sample
from .inversion import BDIA as BDIA, EDICT as EDICT, Inversion as Inversion, NoiseSequence as NoiseSequence
# Imported here, not lazily: once the submodule dpmsolve.generate is imported its name would shadow a lazy attribute.
from .generate import generate as generate
from .wrappers import PerSampleTime as PerSampleTime, TimeShift as TimeShift
from .tuning import Plan as Plan, PlanError as PlanError, PlanStep as PlanStep, tune as tune
from .schedules import (
    EDM as EDM,
    CosineVP as CosineVP,
    DiscreteVP as DiscreteVP,
    LinearVP as LinearVP,
    RectifiedFlow as RectifiedFlow,
    Schedule as Schedule,
)
from .solvers import (
    DDIM as DDIM,
    DEIS as DEIS,
    DPM2 as DPM2,
    IPNDM as IPNDM,
    IPNDMV as IPNDMV,
    LMS as LMS,
    PLMS as PLMS,
    PNDM as PNDM,
    GradientEstimation as GradientEstimation,
    HeavyBall as HeavyBall,
    RESMultistep as RESMultistep,
    Euler as Euler,
    Heun as Heun,
    SOLVERS as SOLVERS,
    AdaptiveDPMSolver as AdaptiveDPMSolver,
    DPMSolverMultistep as DPMSolverMultistep,
    DPMSolverSinglestep as DPMSolverSinglestep,
    DPMSolverV3 as DPMSolverV3,
    SDEDPMSolverPP as SDEDPMSolverPP,
    Solver as Solver,
    UniPC as UniPC,
    get_solver as get_solver,
)

__version__ = "0.1.0"

_LAZY_SUBPACKAGES = ("integrations", "lab", "zoo")


def __getattr__(name: str):
    """Import ``zoo``, ``lab`` and ``integrations`` on first access (PEP 562)."""
    if name in _LAZY_SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))
