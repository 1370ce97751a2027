"""Time grids: ``steps + 1`` strictly decreasing times from ``t_start`` (noise) to ``t_end`` (data).

Every grid is defined through the schedule, so one name means the same spacing for every model family:
``karras`` and ``exponential`` are spacings of the VE sigma ``sigma/alpha = exp(-lambda)``, ``logSNR`` is
uniform in lambda (the reference DPM-Solver's recommendation for small images), ``time_uniform`` and
``time_quadratic`` (and ``time_power``, between and beyond them) are spacings of the schedule's own t.

The ecosystem's step schedules are grids by name too, each defined through the schedule:

* ComfyUI's schedulers ``simple``, ``sgm_uniform``, ``normal``, ``ddim_uniform``, ``beta``, ``linear_quadratic``,
  ``kl_optimal`` (and ``karras``, ``exponential`` above). On a :class:`DiscreteVP` they are ComfyUI's
  definitions on its ``model_sampling.sigmas`` (the VE sigma of each train step, log-sigma interpolated
  between steps); on a continuous schedule they are the continuous limit of the same rule, read in ComfyUI's
  timestep coordinate of that model family: t for VP schedules and rectified flow, log sigma for EDM (ComfyUI's
  ``ModelSamplingContinuousEDM``); ``linear_quadratic`` and ``kl_optimal`` act on ComfyUI's sigma (t for
  rectified flow, the VE sigma sigma/alpha otherwise).
* diffusers' ``timestep_spacing`` values ``leading``, ``linspace``, ``trailing`` (the integer train timesteps of
  ``DPMSolverMultistepScheduler``, or ``scheduler="ddim"`` for ``DDIMScheduler``'s) and ``beta_sigmas``
  (``use_beta_sigmas``); ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_lu_lambdas`` are the
  ``karras`` / ``exponential`` / ``logSNR`` grids (see ``DIFFUSERS_SIGMA_FLAGS``).
* Published tables (``grid_tables.py``): ``ays`` (Align Your Steps, Sabour et al. 2024) and ``gits``
  (Chen et al. 2024), sigma lists mapped log-linearly onto the schedule's VE-sigma range.

ComfyUI's and diffusers' lists end at sigma = 0: ``make_grid(..., t_end=0)`` gives exactly those; with the
default ``t_end`` (t_min) or another end the same rule is applied to the range ``[t_end, t_start]``. A grid always
starts at ``t_start`` (where the start noise is given): the two spacings whose first time lies below the top of
the range (diffusers' ``leading``, ComfyUI's ``ddim_uniform``) keep their other times and start at ``t_start``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Sequence

import numpy as np

from . import grid_tables
from ._checks import check_count, check_schedule
from .schedules import EDM, DiscreteVP, RectifiedFlow, Schedule

__all__ = ["GRIDS", "DIFFUSERS_SIGMA_FLAGS", "make_grid", "check_grid", "time_uniform", "log_snr_uniform",
           "time_quadratic", "time_power", "karras", "exponential", "flow_shift", "log_snr_blocks", "simple",
           "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal", "leading",
           "linspace", "trailing", "beta_sigmas", "ays", "gits", "loglinear_interp"]


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


# ------------------------------------------------------------------------------------------------------------
# The ecosystem's step schedules by name: ComfyUI's schedulers, diffusers' spacings, the AYS and GITS tables.
#
# Each function returns steps + 1 times; make_grid then sets the first to t_start and the last to t_end. They are
# called with t_end = 0 for a grid to sigma = 0 (ComfyUI's and diffusers' own form) and build it themselves.

def _t_lo(schedule: Schedule, t_end: float) -> float:
    """The lowest time the grid evaluates at: t_end, or t_min for a grid to sigma = 0."""
    return schedule.t_min if t_end == 0 else t_end


def _u(schedule: Schedule, t):
    """ComfyUI's timestep coordinate of a continuous schedule (any affine image of it): log sigma for EDM
    (``ModelSamplingContinuousEDM``: timestep = log(sigma) / 4), the schedule's own t otherwise."""
    t = np.asarray(t, dtype=np.float64)
    return np.log(t) if isinstance(schedule, EDM) else t


def _t_of_u(schedule: Schedule, u):
    return np.exp(u) if isinstance(schedule, EDM) else u


def _comfy_sigma(schedule: Schedule, t):
    """ComfyUI's sigma of time t: the flow time for rectified flow (ComfyUI's CONST models), the VE sigma
    sigma/alpha = exp(-lambda) for every other schedule (ComfyUI's EPS / V / EDM models sample x / alpha)."""
    t = np.asarray(t, dtype=np.float64)
    return t if isinstance(schedule, RectifiedFlow) else np.exp(-np.asarray(schedule.log_snr(t)))


def _t_of_comfy_sigma(schedule: Schedule, sigma):
    sigma = np.asarray(sigma, dtype=np.float64)
    return sigma if isinstance(schedule, RectifiedFlow) else np.asarray(schedule.t_from_log_snr(-np.log(sigma)))


def _t_of_ve_sigma(schedule: Schedule, sigma):
    return np.asarray(schedule.t_from_log_snr(-np.log(np.asarray(sigma, dtype=np.float64))))


def _along(schedule: Schedule, f, t_start: float, t_lo: float) -> np.ndarray:
    """Times at fractions ``f`` of the range in the timestep coordinate (1: t_start, 0: t_lo).

    On a DiscreteVP the coordinate is the (fractional) train index, and the time is the one of ComfyUI's
    ``model_sampling.sigma(timestep)``: log sigma interpolated linearly between train steps."""
    f = np.asarray(f, dtype=np.float64)
    if isinstance(schedule, DiscreteVP):
        n = schedule.num_train_steps
        lo, hi = n * t_lo - 1.0, n * t_start - 1.0
        ac = schedule.alphas_cumprod
        log_sigmas = 0.5 * (np.log1p(-ac) - np.log(ac))
        log_sigma = np.interp(lo + f * (hi - lo), np.arange(n, dtype=np.float64), log_sigmas)
        return np.asarray(schedule.t_from_log_snr(-log_sigma))
    u0, u1 = _u(schedule, t_lo), _u(schedule, t_start)
    return _t_of_u(schedule, u0 + f * (u1 - u0))


def _nodes(schedule: DiscreteVP, t_start: float, t_lo: float) -> tuple[int, int]:
    """(lo, hi): the first and last train step of a DiscreteVP inside [t_lo, t_start] (step k sits at (k+1)/N)."""
    n = schedule.num_train_steps
    return int(math.ceil(n * t_lo - 1.0 - 1e-7)), int(math.floor(n * t_start - 1.0 + 1e-7))


def _node_times(schedule: DiscreteVP, k) -> np.ndarray:
    return (np.asarray(k, dtype=np.float64) + 1.0) / schedule.num_train_steps


def _check_picks(kind: str, ts: np.ndarray, steps: int, count: int) -> np.ndarray:
    """Refuse a grid on a DiscreteVP's train steps that repeats one (more steps than the range resolves)."""
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"The {kind!r} grid places its times on the DiscreteVP's train steps, and the range "
                         f"holds {count} of them: {steps} steps would repeat a train step. Use fewer steps, a wider "
                         "range, or a grid in continuous time (e.g. 'time_uniform', 'karras').")
    return ts


def _choice(kind: str, name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"Grid option {name}={value!r} of the {kind!r} grid is not one of: "
                         f"{', '.join(map(repr, choices))}.")
    return value


def _count(kind: str, name: str, value, minimum: int) -> int:
    if float(value) != int(value) or int(value) < minimum:
        raise ValueError(f"Grid option {name} of the {kind!r} grid must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _positive(kind: str, **values) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"The {kind!r} grid needs {name} > 0, got {name}={value}.")


def _beta_ppf(q, a: float, b: float) -> np.ndarray:
    """Quantiles of the Beta(a, b) distribution (scipy's ``betaincinv``, imported lazily)."""
    from scipy.special import betaincinv

    return np.asarray(betaincinv(a, b, np.asarray(q, dtype=np.float64)), dtype=np.float64)


def simple(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """ComfyUI's ``simple``: ``steps`` times uniform in the timestep from the top, then the end.

    DiscreteVP: train steps ``hi - floor(i * M / steps)`` of the ``M`` in the range (ComfyUI:
    ``sigmas[-(1 + int(i * len(sigmas) / steps))]``). Continuous: fractions ``1 - i / steps`` of the range, so
    with ``t_end > 0`` it is uniform in the timestep coordinate (``time_uniform``, or geometric in sigma for EDM).
    """
    t_lo = _t_lo(schedule, t_end)
    if isinstance(schedule, DiscreteVP):
        lo, hi = _nodes(schedule, t_start, t_lo)
        m = hi - lo + 1
        ts = np.append(_node_times(schedule, hi - np.floor(np.arange(steps) * (m / steps))), t_end)
        ts[0] = t_start
        return _check_picks("simple", ts, steps, m)
    return np.append(_along(schedule, 1.0 - np.arange(steps) / steps, t_start, t_lo), t_end)


def sgm_uniform(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """ComfyUI's ``sgm_uniform`` (``normal_scheduler(sgm=True)``): ``steps + 1`` times uniform in the timestep
    from the top of the range to its bottom, the last replaced by the end (sigma = 0 for ``t_end=0``)."""
    body = _along(schedule, np.linspace(1.0, 0.0, steps + 1)[:-1], t_start, _t_lo(schedule, t_end))
    return np.append(body, t_end)


def normal(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """ComfyUI's ``normal``: ``steps`` times uniform in the timestep from the top to the bottom of the range,
    then sigma = 0 (``t_end=0``); with ``t_end > 0``, ``steps + 1`` such times ending at t_end."""
    if t_end == 0:
        return np.append(_along(schedule, np.linspace(1.0, 0.0, steps), t_start, schedule.t_min), 0.0)
    return _along(schedule, np.linspace(1.0, 0.0, steps + 1), t_start, t_end)


def _leading(kind: str, schedule: Schedule, steps: int, t_start: float, t_end: float, offset: int,
             ddim: bool) -> np.ndarray:
    """diffusers' ``leading`` spacing: ``n + 1`` times ``k * (M // (n + 1)) + steps_offset``, k = n..0, counted
    from the bottom of the range (the first is then t_start). To sigma = 0: DPMSolverMultistep evaluates the
    first ``steps`` of ``n = steps`` such times, DDIMScheduler all ``n + 1 = steps`` of ``n = steps - 1``."""
    t_lo = _t_lo(schedule, t_end)
    if isinstance(schedule, DiscreteVP):
        lo, hi = _nodes(schedule, t_start, t_lo)
        m = hi - lo + 1

        def points(n):
            return _node_times(schedule, lo + (np.arange(n + 1) * (m // (n + 1)))[::-1] + offset)
    else:
        if offset:
            raise ValueError(f"Grid option steps_offset={offset} of the {kind!r} grid counts train steps: only a "
                             "DiscreteVP has them; leave it 0 for a continuous schedule.")
        m = None

        def points(n):
            return _along(schedule, np.arange(n, -1, -1) / (n + 1), t_start, t_lo)
    if t_end != 0:
        ts = points(steps)
        ts[-1] = t_end
    elif ddim:
        ts = np.append(points(steps - 1), 0.0)
    else:
        ts = np.append(points(steps)[:-1], 0.0)
    ts[0] = t_start
    return ts if m is None else _check_picks(kind, ts, steps, m)


def leading(schedule: Schedule, steps: int, t_start: float, t_end: float, steps_offset: int = 0,
            scheduler: str = "dpmsolver") -> np.ndarray:
    """diffusers' ``timestep_spacing="leading"`` (``steps_offset``: SD configs ship 1): on a DiscreteVP with
    ``t_end=0`` the train timesteps of ``DPMSolverMultistepScheduler`` (also UniPC, DEIS) or, with
    ``scheduler="ddim"``, of ``DDIMScheduler``, except the first: diffusers' first timestep lies below the top
    (901 of 1000 for 10 steps and steps_offset=1) and its start noise is taken there; a dpmsolve grid starts at
    t_start, where the start noise is given, and keeps diffusers' other timesteps. On a custom range the spacing
    is that of the train steps inside it (as diffusers' ``last_timestep`` when it clips the top)."""
    steps_offset = _count("leading", "steps_offset", steps_offset, 0)
    ddim = _choice("leading", "scheduler", scheduler, ("dpmsolver", "ddim")) == "ddim"
    return _leading("leading", schedule, steps, t_start, t_end, steps_offset, ddim)


def ddim_uniform(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """ComfyUI's ``ddim_uniform``: train steps ``1 + j * (N // steps)`` (the original DDIM 'uniform' choice),
    i.e. ``leading`` with ``steps_offset=1, scheduler="ddim"`` (offset 0 on a continuous schedule). ComfyUI keeps
    every such step below N, one more than ``steps`` when N % steps > 1; dpmsolve keeps ``steps``, and starts at
    t_start."""
    offset = 1 if isinstance(schedule, DiscreteVP) else 0
    return _leading("ddim_uniform", schedule, steps, t_start, t_end, offset, True)


def _linspace_points(schedule: Schedule, n: int, t_start: float, t_lo: float):
    """``n + 1`` times uniform in the timestep over the range; on a DiscreteVP rounded to train steps as
    diffusers rounds ``np.linspace(0, N - 1, n + 1)``. Returns (times, number of train steps or None)."""
    if isinstance(schedule, DiscreteVP):
        lo, hi = _nodes(schedule, t_start, t_lo)
        m = hi - lo + 1
        return _node_times(schedule, lo + np.linspace(0, m - 1, n + 1).round()[::-1]), m
    return _along(schedule, np.linspace(1.0, 0.0, n + 1), t_start, t_lo), None


def linspace(schedule: Schedule, steps: int, t_start: float, t_end: float, scheduler: str = "dpmsolver"
             ) -> np.ndarray:
    """diffusers' ``timestep_spacing="linspace"``: ``np.linspace(0, N - 1, steps + 1).round()`` train steps, the
    lowest replaced by sigma = 0 (``DPMSolverMultistepScheduler``), or with ``scheduler="ddim"``
    ``np.linspace(0, N - 1, steps).round()`` then sigma = 0 (``DDIMScheduler``); with ``t_end > 0`` both are the
    ``steps + 1`` times uniform in the timestep from t_start to t_end."""
    ddim = _choice("linspace", "scheduler", scheduler, ("dpmsolver", "ddim")) == "ddim"
    if t_end == 0:
        ts, m = _linspace_points(schedule, steps - 1 if ddim else steps, t_start, schedule.t_min)
        ts = np.append(ts if ddim else ts[:-1], 0.0)
    else:
        ts, m = _linspace_points(schedule, steps, t_start, t_end)
    ts[0] = t_start
    return ts if m is None else _check_picks("linspace", ts, steps, m)


def trailing(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2024; the same in DPMSolverMultistep and DDIM):
    train steps ``round(N - i * N / steps) - 1`` then sigma = 0, i.e. uniform in t from t_start down to t = 0,
    evaluated at its first ``steps`` times; with ``t_end > 0``, ``steps + 1`` uniform times (as ``linspace``)."""
    if t_end != 0:
        return linspace(schedule, steps, t_start, t_end)
    if isinstance(schedule, DiscreteVP):
        lo, hi = _nodes(schedule, t_start, schedule.t_min)
        m = hi - lo + 1
        ts = np.append(_node_times(schedule, lo - 1 + np.round(m + np.arange(steps) * (-(m / steps)))), 0.0)
        ts[0] = t_start
        return _check_picks("trailing", ts, steps, m)
    return np.append(_along(schedule, 1.0 - np.arange(steps) / steps, t_start, schedule.t_min), 0.0)


def beta(schedule: Schedule, steps: int, t_start: float, t_end: float, alpha: float = 0.6,
         beta: float = 0.6) -> np.ndarray:
    """ComfyUI's ``beta`` (Lee et al. 2024, 'Beta sampling is all you need', arXiv 2407.12173): times at the
    Beta(alpha, beta) quantiles ``ppf(1 - i / steps)`` of the timestep range, i < steps, then the end. On a
    DiscreteVP the train steps ``rint(ppf * (M - 1))`` (ComfyUI drops repeated steps and returns fewer; dpmsolve
    refuses them). The quantiles are scipy's ``betaincinv``, imported when the grid is used."""
    _positive("beta", alpha=alpha, beta=beta)
    q = _beta_ppf(1.0 - np.linspace(0.0, 1.0, steps, endpoint=False), alpha, beta)
    t_lo = _t_lo(schedule, t_end)
    if isinstance(schedule, DiscreteVP):
        lo, hi = _nodes(schedule, t_start, t_lo)
        m = hi - lo + 1
        ts = np.append(_node_times(schedule, lo + np.rint(q * (m - 1))), t_end)
        ts[0] = t_start
        return _check_picks("beta", ts, steps, m)
    return np.append(_along(schedule, q, t_start, t_lo), t_end)


def _linear_quadratic_fractions(steps: int, threshold_noise: float, linear_steps: int | None) -> np.ndarray:
    """1 - sigma / sigma_max of ComfyUI's ``linear_quadratic_schedule`` (from Genmo's Mochi): ``steps + 1``
    values from 0 to 1, linear up to ``threshold_noise`` over ``linear_steps`` steps, then quadratic."""
    if steps == 1:
        return np.array([0.0, 1.0])
    n_lin = steps // 2 if linear_steps is None else linear_steps
    n_quad = steps - n_lin
    diff = n_lin - threshold_noise * steps
    quad = diff / (n_lin * n_quad ** 2)
    lin = threshold_noise / n_lin - 2.0 * diff / n_quad ** 2
    const = quad * n_lin ** 2
    i = np.arange(steps, dtype=np.float64)
    x = np.where(i < n_lin, i * threshold_noise / n_lin, quad * i ** 2 + lin * i + const)
    return np.append(x, 1.0)


def linear_quadratic(schedule: Schedule, steps: int, t_start: float, t_end: float, threshold_noise: float = 0.025,
                     linear_steps: int | None = None) -> np.ndarray:
    """ComfyUI's ``linear_quadratic`` (Genmo's Mochi schedule): ComfyUI's sigma (t for rectified flow, the VE
    sigma otherwise) ``sigma_start * (1 - x)`` with x linear up to ``threshold_noise`` over ``linear_steps``
    (default steps // 2) steps, then quadratic up to 1, i.e. down to sigma = 0; with ``t_end > 0`` the same
    fractions of [sigma(t_end), sigma(t_start)]."""
    if not 0 < threshold_noise < 1:
        raise ValueError(f"The 'linear_quadratic' grid needs 0 < threshold_noise < 1, got {threshold_noise}.")
    if linear_steps is not None and steps > 1:
        linear_steps = _count("linear_quadratic", "linear_steps", linear_steps, 1)
        if linear_steps >= steps:
            raise ValueError(f"Grid option linear_steps={linear_steps} of the 'linear_quadratic' grid must be < "
                             f"steps ({steps}): the quadratic part needs at least one step.")
    x = _linear_quadratic_fractions(steps, threshold_noise, linear_steps)
    if not np.all(np.diff(x) > 0):
        raise ValueError(f"The 'linear_quadratic' grid with threshold_noise={threshold_noise}, linear_steps="
                         f"{linear_steps} is not monotone for {steps} steps; use a smaller threshold_noise or the "
                         "default linear_steps.")
    s_start = float(_comfy_sigma(schedule, t_start))
    s_end = 0.0 if t_end == 0 else float(_comfy_sigma(schedule, t_end))
    sigmas = s_end + (1.0 - x[:-1]) * (s_start - s_end)
    if t_end == 0 and sigmas[-1] < _comfy_sigma(schedule, schedule.t_min) * (1 - 1e-9):
        raise ValueError(f"A 'linear_quadratic' grid of {steps} steps down to t = 0 evaluates below t_min = "
                         f"{schedule.t_min:.6g}; use fewer steps or end at t_min (t_end=None).")
    ts = _t_of_comfy_sigma(schedule, np.maximum(sigmas, _comfy_sigma(schedule, _t_lo(schedule, t_end))))
    return np.append(ts, t_end)


def kl_optimal(schedule: Schedule, steps: int, t_start: float, t_end: float) -> np.ndarray:
    """ComfyUI's ``kl_optimal`` (AUTOMATIC1111 PR 15608; the KL-optimal Euler schedule, AYS paper App. A):
    ComfyUI's sigma at ``tan`` of an arctan-uniform ramp from sigma(t_start) to sigma(t_end); to sigma = 0, ``steps``
    such sigmas down to sigma(t_min), then 0 (as ``karras``)."""
    if t_end == 0:
        if steps == 1:
            return np.array([t_start, 0.0])
        return np.append(kl_optimal(schedule, steps - 1, t_start, schedule.t_min), 0.0)
    a_max, a_min = np.arctan(_comfy_sigma(schedule, t_start)), np.arctan(_comfy_sigma(schedule, t_end))
    w = np.arange(steps + 1) / steps
    return _t_of_comfy_sigma(schedule, np.tan(w * a_min + (1.0 - w) * a_max))


def beta_sigmas(schedule: Schedule, steps: int, t_start: float, t_end: float, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """diffusers' ``use_beta_sigmas`` (arXiv 2407.12173): VE sigmas ``sigma_min + ppf(1 - u) (sigma_max -
    sigma_min)`` for u uniform in [0, 1] (the Beta(alpha, beta) quantiles spaced linearly in sigma, unlike
    ComfyUI's ``beta``, which spaces train steps); to sigma = 0, ``steps`` such sigmas then 0."""
    _positive("beta_sigmas", alpha=alpha, beta=beta)
    if t_end == 0:
        if steps == 1:
            return np.array([t_start, 0.0])
        return np.append(beta_sigmas(schedule, steps - 1, t_start, schedule.t_min, alpha, beta), 0.0)
    s_max, s_min = np.exp(-schedule.log_snr(t_start)), np.exp(-schedule.log_snr(t_end))
    q = _beta_ppf(1.0 - np.linspace(0.0, 1.0, steps + 1), alpha, beta)
    return _t_of_ve_sigma(schedule, s_min + q * (s_max - s_min))


def loglinear_interp(sigmas: Sequence[float], count: int) -> np.ndarray:
    """``count`` values interpolated linearly in log sigma between a decreasing list's entries, placed at equal
    fractions of the list (the AYS paper's and ComfyUI's ``loglinear_interp``); the ends are kept."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    xs = np.linspace(0.0, 1.0, sigmas.size)
    return np.exp(np.interp(np.linspace(0.0, 1.0, count), xs, np.log(sigmas[::-1])))[::-1].copy()


def _table_grid(schedule: Schedule, sigmas: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
    """A published VE-sigma list of ``steps + 1`` entries as times: log sigma mapped affinely from the table's
    [last, first] onto [sigma(t_lo), sigma(t_start)] (the identity on the schedule the table was made for); the
    last entry is the end (ComfyUI sets it to sigma = 0)."""
    log_s = np.log(sigmas)
    f = (log_s - log_s[-1]) / (log_s[0] - log_s[-1])
    lam_start, lam_lo = schedule.log_snr(t_start), schedule.log_snr(_t_lo(schedule, t_end))
    ts = np.asarray(schedule.t_from_log_snr(lam_lo + f * (lam_start - lam_lo)), dtype=np.float64)
    ts[0], ts[-1] = t_start, t_end
    return ts


def ays(schedule: Schedule, steps: int, t_start: float, t_end: float, model: str = "sd15") -> np.ndarray:
    """Align Your Steps (Sabour, Fidler & Kreis 2024): NVIDIA's optimised 10-step sigmas for ``model`` ("sd15",
    "sdxl", "svd"; ``grid_tables.AYS_SIGMAS``), log-linearly interpolated to other step counts as the paper and
    ComfyUI's ``AlignYourStepsScheduler`` do, and mapped log-linearly onto the schedule's VE-sigma range (on the
    model's own schedule, e.g. ``DiscreteVP.scaled_linear()`` for SD1.5/SDXL or ``EDM(0.002, 700)`` for SVD, the
    table itself); the last sigma is the end (0 for ``t_end=0``, as in ComfyUI)."""
    table = grid_tables.AYS_SIGMAS[_choice("ays", "model", model, tuple(grid_tables.AYS_SIGMAS))]
    sigmas = np.array(table) if steps + 1 == len(table) else loglinear_interp(table, steps + 1)
    return _table_grid(schedule, sigmas, t_start, t_end)


def gits(schedule: Schedule, steps: int, t_start: float, t_end: float, coeff: float = 1.20) -> np.ndarray:
    """GITS (Chen et al. 2024, 'On the trajectory regularity of ODE-based diffusion sampling'): the SD1.5 sigmas
    of ComfyUI's ``GITSScheduler`` for ``coeff`` in 0.80, 0.85, ..., 1.50 and 2-20 steps (``grid_tables``);
    above 20 steps the 20-step list log-linearly interpolated, as ComfyUI does (1 step: its two ends). Mapped onto
    the schedule like ``ays``; the last sigma is the end."""
    key = round(float(coeff), 2)
    if key not in grid_tables.GITS_SIGMAS or abs(key - coeff) > 1e-9:
        raise ValueError(f"Grid option coeff={coeff!r} of the 'gits' grid has no table; GITS tables exist for "
                         f"coeff = {', '.join(f'{c:.2f}' for c in grid_tables.GITS_SIGMAS)}.")
    rows = grid_tables.GITS_SIGMAS[key]
    if 2 <= steps <= len(rows) + 1:
        sigmas = np.array(rows[steps - 2])
    else:
        sigmas = loglinear_interp(rows[-1] if steps > 2 else rows[0], steps + 1)
    return _table_grid(schedule, sigmas, t_start, t_end)


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
    # ComfyUI's scheduler names (karras and exponential above)
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "normal": normal,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
    # diffusers' timestep_spacing values and use_beta_sigmas
    "leading": leading,
    "linspace": linspace,
    "trailing": trailing,
    "beta_sigmas": beta_sigmas,
    # published tables (grid_tables.py)
    "ays": ays,
    "gits": gits,
}

# diffusers' sigma flags (DPMSolverMultistepScheduler and peers) -> the grid that gives the same sigmas, to sigma = 0
# with make_grid(..., t_end=0) (diffusers' final_sigmas_type="zero") on the scheduler's DiscreteVP.
DIFFUSERS_SIGMA_FLAGS: dict[str, str] = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_lu_lambdas": "logSNR",
    "use_beta_sigmas": "beta_sigmas",
}

# Grids that build their own form to t = 0 (called with t_end = 0; their other times stay >= t_min).
_ZERO_NATIVE = ("simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal",
                "leading", "linspace", "trailing", "beta_sigmas", "ays", "gits")


def make_grid(schedule: Schedule, steps: int, kind: str = "logSNR", t_start: float | None = None,
              t_end: float | None = None, **options) -> np.ndarray:
    """``steps + 1`` times from ``t_start`` (default ``t_max``) down to ``t_end`` (default ``t_min``).

    ``t_end=0`` ends the grid at sigma = 0: ``sample`` then spends the last step on the x0 prediction at the
    previous time (the first-order data-prediction step to sigma = 0), so NFE still equals ``steps``.
    ``kind`` is a name in ``GRIDS``; ``options`` go to the grid (``rho`` for karras, ``power`` for time_power,
    ``shift`` for flow_shift, ``model`` for ays, ``coeff`` for gits, ``steps_offset`` / ``scheduler`` for leading...).
    ComfyUI's and diffusers' names reproduce their sigma lists (which end at sigma = 0) with ``t_end=0``.
    """
    check_schedule(schedule)
    steps = check_count("steps", steps)
    if kind not in GRIDS:
        raise ValueError(f"Unknown grid {kind!r}; valid names are: {', '.join(GRIDS)} "
                         "(or pass an explicit array of times).")
    params = inspect.signature(GRIDS[kind]).parameters
    allowed = list(params)[4:]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Grid {kind!r} has no option(s) {', '.join(unknown)}; its options are: "
                         f"{', '.join(allowed) or 'none'}.")
    for name, value in options.items():
        default = params[name].default
        if isinstance(default, str):   # a choice by name; the grid checks the value
            if not isinstance(value, str):
                raise TypeError(f"Grid option {name} of the {kind!r} grid must be a name (a str, default "
                                f"{default!r}), got {value!r} ({type(value).__name__}).")
            continue
        if value is None and default is None:
            continue
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

    The ecosystem's names (``_ZERO_NATIVE``) build their own list to sigma = 0, as ComfyUI and diffusers do.
    Time-spaced grids run their spacing down to t = 0 (diffusers' default grids for DDPM models end this
    way); lambda-spaced grids cannot reach lambda = inf, so they span ``steps - 1`` intervals down to t_min and
    then append 0 (k-diffusion's ``append_zero``, diffusers' ``final_sigmas_type="zero"``)."""
    if kind in _ZERO_NATIVE:
        ts = _spaced(schedule, steps, kind, t_start, 0.0, options)
        ts[0], ts[-1] = t_start, 0.0
        if ts[:-1].min() < schedule.t_min * (1 - 1e-9):
            raise ValueError(f"A {kind!r} grid of {steps} steps down to t = 0 evaluates below t_min = "
                             f"{schedule.t_min:.6g}; use fewer steps or end at t_min (t_end=None).")
        ts[:-1] = np.clip(ts[:-1], schedule.t_min, schedule.t_max)
    elif kind in _TIME_SPACED:
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
