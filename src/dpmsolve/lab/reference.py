"""Reference solutions of the probability-flow ODE: tight DOP853 solves, cached on disk.

In VE coordinates ``y = x / alpha`` and ``rho = sigma / alpha = exp(-lambda)`` the ODE of every schedule is
``dy/dlambda = D(y, rho) - y`` with ``D`` the denoiser's x0 prediction (Lu et al. 2022, Eq. 3.4), so a
reference needs only ``D``. Integrating to ``rho -> 0`` (the data end, sigma = 0) is possible when ``D`` is
known for every rho (analytic problems); a network is only defined inside its schedule's range.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..model import Denoiser
from ..schedules import Schedule

__all__ = ["X0Fn", "solve_reference", "reference_between", "denoiser_x0_fn", "cache_dir", "cached"]

X0Fn = Callable[[torch.Tensor, float], torch.Tensor]   # (y, rho) -> x0 prediction, y of shape (batch, ...)

# The data end: integrate to rho = RHO_ZERO, then one final evaluation of D (its error is O(RHO_ZERO^2)).
RHO_ZERO = 1e-7


def solve_reference(x0_fn: X0Fn, y: torch.Tensor, lam_start: float, lam_end: float | None,
                    rtol: float = 1e-10, atol: float = 1e-12) -> torch.Tensor:
    """Integrate ``dy/dlambda = x0_fn(y, e^-lambda) - y`` from lam_start to lam_end with scipy's DOP853 in
    float64; ``lam_end=None`` means the data end (rho -> 0): returns ``x0_fn`` at rho = 1e-7."""
    from scipy.integrate import solve_ivp

    y0 = y.detach().to(torch.float64)
    target = -math.log(RHO_ZERO) if lam_end is None else lam_end

    def rhs(lam, y_flat):
        cur = torch.from_numpy(y_flat).reshape(y0.shape)
        return (x0_fn(cur, math.exp(-lam)) - cur).reshape(-1).numpy()

    sol = solve_ivp(rhs, (lam_start, target), y0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    y_end = torch.from_numpy(sol.y[:, -1]).reshape(y0.shape)
    return x0_fn(y_end, RHO_ZERO) if lam_end is None else y_end


def denoiser_x0_fn(denoiser: Denoiser, **model_kwargs) -> X0Fn:
    """The VE x0 function of any denoiser (valid for rho inside its schedule's range)."""
    schedule = denoiser.schedule

    def x0_fn(y: torch.Tensor, rho: float) -> torch.Tensor:
        t = float(schedule.t_from_log_snr(-math.log(rho)))
        a = schedule.alpha(t)
        with torch.no_grad():
            return denoiser(a * y, t, **model_kwargs).x0.to(torch.float64)

    return x0_fn


def reference_between(x0_fn: X0Fn, schedule: Schedule, x: torch.Tensor, t_start: float, t_end: float | None,
                      **tolerances) -> torch.Tensor:
    """Reference in the schedule's coordinates from (x, t_start) to t_end (None: the data end, sigma = 0)."""
    a0 = schedule.alpha(t_start)
    lam_end = None if t_end is None else schedule.log_snr(t_end)
    y = solve_reference(x0_fn, x.to(torch.float64) / a0, schedule.log_snr(t_start), lam_end, **tolerances)
    a1 = 1.0 if t_end is None else schedule.alpha(t_end)   # at sigma = 0 the sample is x0 itself
    return (a1 * y).to(x.dtype)


def cache_dir() -> Path:
    """Where references are cached: $DPMSOLVE_CACHE, else ~/.cache/dpmsolve."""
    root = os.environ.get("DPMSOLVE_CACHE") or Path.home() / ".cache" / "dpmsolve"
    return Path(root)


def cached(key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per ``key``, stored as .npy under cache_dir()/references."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = cache_dir() / "references" / f"{digest}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, value.detach().cpu().numpy())
    os.replace(tmp, path)
    return value
