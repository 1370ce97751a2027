"""Empirical model statistics (EMS) for DPM-Solver-v3 (Zheng et al. 2023): estimate, save, load, validate.

```python
stats = dpmsolve.ems.compute(denoiser, data=x0_batch, n_lambdas=100)     # minutes on a CPU for small models
stats.save("model.ems.safetensors"); stats = dpmsolve.ems.load("model.ems.safetensors", schedule)
dpmsolve.sample(denoiser, x_T, "dpmsolver-v3", ems=stats, steps=8)
```
"""

from .statistics import EMS, EMSError, EMSWarning, FORMAT_VERSION
from .compute import compute, statistics_from_moments
from .quadrature import StepIntegrals, step_integrals

__all__ = ["EMS", "EMSError", "EMSWarning", "FORMAT_VERSION", "StepIntegrals", "compute", "load",
           "statistics_from_moments", "step_integrals"]


def load(path, schedule=None, data_shape=None) -> EMS:
    """Read and validate an EMS file (see :meth:`EMS.load`)."""
    return EMS.load(path, schedule, data_shape)
