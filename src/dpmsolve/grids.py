"""Time grids: ``steps + 1`` strictly decreasing times from ``t_start`` (noise) to ``t_end`` (data).

Every grid is defined through the schedule, so one name means the same spacing for every model family:
``karras`` and ``exponential`` are spacings of the VE sigma ``sigma/alpha = exp(-lambda)``, ``logSNR`` is
uniform in lambda (the reference DPM-Solver's recommendation for small images), ``time_uniform`` and
``time_quadratic`` (and ``time_power``, between and beyond them) are spacings of the schedule's own t.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Sequence

import numpy as np

from ._checks import check_count, check_schedule
from .schedules import Schedule

__all__ = ["GRIDS", "make_grid", "check_grid", "time_uniform", "log_snr_uniform", "time_quadratic",
           "time_power", "karras", "exponential", "flow_shift", "log_snr_blocks"]


def time_uniform(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """Uniform in t."""
    return np.linspace(t_start, t_end, steps + 1)


def log_snr_uniform(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """Uniform in lambda = log(alpha/sigma) (Lu et al. 2022, 'logSNR')."""
    lams = np.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), steps + 1)
    return schedule.t_from_log_snr(lams)


def time_quadratic(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """Uniform in sqrt(t) (Song et al. 2021 DDIM 'quad'; the reference's 'time_quadratic')."""
    return np.linspace(np.sqrt(t_start), np.sqrt(t_end), steps + 1) ** 2


def time_power(schedule: Schedule, steps: int, t_start: float, t_end: float, power: float = 1.5) -> np.ndarray:
    """Uniform in t^(1/power): ``linspace(t_start^(1/p), t_end^(1/p), steps + 1)^p``.

    ``power=1`` is ``time_uniform`` and ``power=2`` is ``time_quadratic``; larger powers move steps from high
    noise to low noise. The default 1.5 is the lab's measured compromise for DDPM-type schedules ending at
    sigma = 0 (``benchmarks/accuracy.py``): ``time_uniform`` is too coarse at low noise (Gaussian data lose up
    to 7x against the peers at 5-8 NFE), ``time_quadratic`` takes steps so long at mid noise that a strongly
    guided (CFG 7.5) trajectory loses up to 9x; t^(2/3) sits between the two, not tuned per model.
    """
    if power <= 0:
        raise ValueError(f"time_power grid needs power > 0, got {power}.")
    return np.linspace(t_start ** (1.0 / power), t_end ** (1.0 / power), steps + 1) ** power


def karras(schedule: Schedule, steps: int, t_start: float, t_end: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) Eq. 5: uniform in sigma_VE^(1/rho), sigma_VE = sigma/alpha = exp(-lambda)."""
    if rho <= 0:
        raise ValueError(f"karras grid needs rho > 0, got {rho}.")
    s_max, s_min = np.exp(-schedule.log_snr(t_start)), np.exp(-schedule.log_snr(t_end))
    ramp = np.linspace(0.0, 1.0, steps + 1)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _with_exact_ends(schedule.t_from_log_snr(-np.log(sigmas)), t_start, t_end)


def exponential(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """Geometric in sigma_VE (k-diffusion's ``get_sigmas_exponential``): the same grid as ``logSNR``."""
    return log_snr_uniform(schedule, steps, t_start, t_end)


def flow_shift(schedule: Schedule, steps: int, t_start: float, t_end: float, shift: float = 3.0) -> np.ndarray:
    """The flow-matching time shift (Esser et al. 2024, SD3): ``u -> shift u / (1 + (shift - 1) u)`` applied to
    a uniform ramp u in [1, 0] mapped onto [t_end, t_start]; for RectifiedFlow with the full range this is
    diffusers' ``flow_shift`` grid. shift > 1 spends more steps at high noise."""
    if shift <= 0:
        raise ValueError(f"flow_shift grid needs shift > 0, got {shift}.")
    u = np.linspace(1.0, 0.0, steps + 1)
    u = shift * u / (1.0 + (shift - 1.0) * u)
    return t_end + (t_start - t_end) * u


def log_snr_blocks(schedule: Schedule, orders: Sequence[int], t_start: float, t_end: float) -> np.ndarray:
    """Singlestep block times as the reference DPM-Solver places them on its ``'logSNR'`` grid
    (``get_orders_and_timesteps_for_singlestep_solver``): ``len(orders) + 1`` block ends uniform in lambda, and
    block k divided uniformly in lambda into ``orders[k]`` steps; ``sum(orders) + 1`` times."""
    ends = np.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), len(orders) + 1)
    lams = [np.linspace(ends[k], ends[k + 1], q + 1)[:-1] for k, q in enumerate(orders)] + [ends[-1:]]
    return _with_exact_ends(schedule.t_from_log_snr(np.concatenate(lams)), t_start, t_end)


def _with_exact_ends(ts: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
    ts = np.array(ts, dtype=np.float64)
    ts[0], ts[-1] = t_start, t_end
    return ts


GRIDS: dict[str, Callable[..., np.ndarray]] = {
    "time_uniform": time_uniform,
    "logSNR": log_snr_uniform,
    "time_quadratic": time_quadratic,
    "time_power": time_power,
    "karras": karras,
    "exponential": exponential,
    "flow_shift": flow_shift,
}


def make_grid(schedule: Schedule, steps: int, kind: str = "logSNR", t_start: float | None = None,
              t_end: float | None = None, **options) -> np.ndarray:
    """``steps + 1`` times from ``t_start`` (default ``t_max``) down to ``t_end`` (default ``t_min``).

    ``t_end=0`` ends the grid at sigma = 0: ``sample`` then spends the last step on the x0 prediction at the
    previous time (the first-order data-prediction step to sigma = 0), so NFE still equals ``steps``.
    ``kind`` is a name in ``GRIDS``; ``options`` go to the grid (``rho`` for karras, ``power`` for time_power, ``shift`` for
    flow_shift).
    """
    check_schedule(schedule)
    steps = check_count("steps", steps)
    if kind not in GRIDS:
        raise ValueError(f"Unknown grid {kind!r}; valid names are: {', '.join(GRIDS)} "
                         "(or pass an explicit array of times).")
    allowed = list(inspect.signature(GRIDS[kind]).parameters)[4:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Grid {kind!r} has no option(s) {', '.join(unknown)}; its options are: "
                         f"{', '.join(allowed) or 'none'}.")
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"Grid option {name} of the {kind!r} grid must be a number, got {value!r} "
                            f"({type(value).__name__}).")
        if not math.isfinite(value):
            raise ValueError(f"Grid option {name}={value} of the {kind!r} grid must be a finite number.")
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a time: use a finite time in the schedule's range [t_min, "
                             f"t_max] = [{schedule.t_min:.6g}, {schedule.t_max:.6g}] (or None for its end).")
    t_start = schedule.t_max if t_start is None else float(t_start)
    if t_end == 0:
        return _grid_to_zero(schedule, int(steps), kind, t_start, options)
    t_end = schedule.t_min if t_end is None else float(t_end)
    check_grid(schedule, [t_start, t_end], name="[t_start, t_end]")
    ts = _with_exact_ends(_spaced(schedule, int(steps), kind, t_start, t_end, options), t_start, t_end)
    return check_grid(schedule, ts, name=f"the {kind!r} grid")


def _spaced(schedule: Schedule, steps: int, kind: str, t_start: float, t_end: float, options) -> np.ndarray:
    """The grid function's times; a NaN or Inf among them (an overflow, e.g. karras with a tiny rho) is refused
    naming the options that produced it."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ts = np.asarray(GRIDS[kind](schedule, steps, t_start, t_end, **options), dtype=np.float64)
    if not np.all(np.isfinite(ts)):
        given = ", ".join(f"{k}={v}" for k, v in options.items()) or "its default options"
        raise ValueError(f"The {kind!r} grid with {given} has NaN or Inf times (an overflow); choose a moderate "
                         f"value of {', '.join(options) or 'its options'}, or another grid.")
    return ts


# Grids spaced in the schedule's own t can reach t = 0 (sigma = 0) directly.
_TIME_SPACED = ("time_uniform", "time_quadratic", "time_power", "flow_shift")


def _grid_to_zero(schedule: Schedule, steps: int, kind: str, t_start: float, options) -> np.ndarray:
    """A grid whose last time is 0 (sigma = 0): the last step is the jump to the x0 prediction.

    Time-spaced grids run their spacing down to t = 0 (diffusers' default grids for DDPM models end this
    way); lambda-spaced grids cannot reach lambda = inf, so they span ``steps - 1`` intervals down to t_min and
    then append 0 (k-diffusion's ``append_zero``, diffusers' ``final_sigmas_type="zero"``)."""
    if kind in _TIME_SPACED:
        ts = _with_exact_ends(_spaced(schedule, steps, kind, t_start, 0.0, options), t_start, 0.0)
        if steps > 1 and ts[-2] < schedule.t_min * (1 - 1e-9):
            raise ValueError(f"A {kind!r} grid of {steps} steps down to t = 0 evaluates below t_min = "
                             f"{schedule.t_min:.6g}; use fewer steps or end at t_min (t_end=None).")
        ts[:-1] = np.maximum(ts[:-1], schedule.t_min)
    elif steps == 1:
        ts = np.array([t_start, 0.0])
    else:
        ts = np.append(make_grid(schedule, steps - 1, kind, t_start, None, **options), 0.0)
    check_grid(schedule, ts, name=f"the {kind!r} grid")
    return ts


def _as_times(ts, name: str) -> np.ndarray:
    """``ts`` as a float64 array; TypeError naming the first non-number (a string) it holds."""
    try:
        return np.asarray(ts, dtype=np.float64)
    except (TypeError, ValueError):
        items = [ts] if isinstance(ts, (str, bytes)) else np.asarray(ts, dtype=object).reshape(-1).tolist()
        for k, item in enumerate(items):
            if isinstance(item, (str, bytes)) or not (item is None or isinstance(item, numbers.Real)
                                                      or hasattr(item, "__len__")):
                raise TypeError(f"{name} must hold numbers (times in the schedule's range), got {item!r} "
                                f"({type(item).__name__}) at index {k}; pass floats, e.g. "
                                "dpmsolve.make_grid(schedule, steps).") from None
        raise


def check_grid(schedule: Schedule, ts, increasing: bool = False, name: str = "the time grid") -> np.ndarray:
    """Validate an explicit grid: at least 2 times, strictly monotone, inside the schedule's range.

    A decreasing grid may end at exactly 0 (sigma = 0, see ``make_grid``); its other times must be in range.
    """
    ts = _as_times(ts, name)
    if ts.ndim > 1:
        raise ValueError(f"{name} must be a 1-D sequence of times, got an array of shape {ts.shape}.")
    ts = ts.reshape(-1)
    if not increasing and ts.size >= 2 and ts[-1] == 0.0 and ts[-2] > 0.0:
        body = ts[:-1] if ts.size > 2 else ts[:1]
        if ts.size > 2:
            check_grid(schedule, body, name=name)
        elif not schedule.contains(body):
            raise ValueError(f"{name} starts outside the schedule's range [t_min, t_max] = "
                             f"[{schedule.t_min:.6g}, {schedule.t_max:.6g}].")
        return np.append(np.clip(body, schedule.t_min, schedule.t_max), 0.0)
    if ts.size < 2:
        raise ValueError(f"{name} needs at least 2 times (start and end), got {ts.size}.")
    bad = np.flatnonzero(~np.isfinite(ts))
    if bad.size:
        raise ValueError(f"{name} contains NaN or Inf: {', '.join(f'{ts[k]} at index {k}' for k in bad[:5])}; every "
                         f"time must be finite, in [t_min, t_max] = [{schedule.t_min:.6g}, {schedule.t_max:.6g}].")
    diffs = np.diff(ts)
    if increasing and not np.all(diffs > 0):
        raise ValueError(f"{name} must be strictly increasing for inversion (data -> noise); got {ts}.")
    if not increasing and not np.all(diffs < 0):
        raise ValueError(f"{name} must be strictly decreasing (from noise at t_max to data at t_min); got "
                         f"{ts}. Reverse it, or use invert() to go from data to noise.")
    if not schedule.contains(ts):
        raise ValueError(f"{name} leaves the schedule's range [t_min, t_max] = [{schedule.t_min:.6g}, "
                         f"{schedule.t_max:.6g}]: it spans [{ts.min():.6g}, {ts.max():.6g}].")
    return np.clip(ts, schedule.t_min, schedule.t_max)
