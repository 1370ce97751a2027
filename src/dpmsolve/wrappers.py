"""Sampling extras that wrap a solver or a denoiser instead of being solvers of their own.

- :class:`TimeShift`: time-shifted DDIM (TS-DDIM; Li et al. 2024, "Alleviating exposure bias in diffusion models
  through sampling with shifted time steps", ICLR 2024).
- :class:`PerSampleTime`: lets a denoiser that takes one time per call (the lab's analytic ones) be evaluated at
  one time per sample, as :class:`TimeShift` asks.

Heavy-ball momentum is :class:`dpmsolve.solvers.momentum.HeavyBall` (registry name ``"momentum"``); guidance in
a limited interval of noise levels is ``ClassifierFreeGuidance(..., interval=(sigma_lo, sigma_hi))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ._checks import check_number
from .model import Denoiser, Prediction, _Wrapper
from .schedules import Schedule
from .solvers.base import SolverWrapper, State
from .solvers.dpm_solver import DDIM

__all__ = ["TimeShift", "TimeShiftState", "PerSampleTime"]

# The VP-equivalent variance is clipped into [_TINY, 1 - _TINY] before its log-SNR is taken.
_TINY = 1e-12


@dataclass(frozen=True)
class TimeShiftState:
    """DDIM's state, the time(s) of the next evaluation (the grid time, a float, or one per sample; None once
    done) and the schedule."""

    base: State
    t_eval: float | np.ndarray | None
    schedule: Schedule


class TimeShift(SolverWrapper):
    """TS-DDIM (Li et al. 2024): DDIM whose model evaluations happen at a per-sample *shifted* time.

    Exposure bias: a sample produced by a few inaccurate steps does not carry the noise level of its grid time t.
    Before each evaluation, TS picks for each sample the time t_s in a window around t whose noise level matches
    the sample's own variance, evaluates the model at (x, t_s) and takes the DDIM step from t_s to the next grid
    time: ``x_next = alpha_next x0(x, t_s) + sigma_next eps(x, t_s)``. The paper's rule, for a VP model, is
    ``t_s = argmin_{tau in window} |Var(x) - sigma_tau^2|`` (Var: the unbiased variance over a sample's
    coordinates, as the reference code's ``torch.var``); sigma^2 is monotone in tau, so this is the exact match
    clipped into the window. On other schedules the sample is read at its VP scale first (``Var(x) / (alpha_t^2 +
    sigma_t^2)`` against ``sigma_tau^2 / (alpha_tau^2 + sigma_tau^2)``), which is the same rule for VP schedules.
    The shift acts only while t is above ``cutoff``; below it (and with ``window = 0``) the steps are DDIM's, bit
    for bit. TS changes the sampler's target: it no longer solves the probability-flow ODE, so measure it by
    sample quality, not by error against the ODE.

    Order 1, one evaluation per step, integrates x0 (DDIM, eta = 0). The evaluations at shifted times are
    per-sample times: the denoiser must accept a 1-D array of times (``Denoiser.per_sample_time``; ``wrap_model``'s
    denoisers and classifier-free guidance over them do; wrap others in :class:`PerSampleTime`).

    Args:
        window: full width of the search window, as a fraction of the schedule's time range ``t_max - t_min``:
            the paper's window of w train steps of an N-step DDPM is ``w / N`` (its experiments: 5-40 steps of
            1000, i.e. 0.005-0.04). 0 turns the shift off.
        cutoff: shift only while ``(t - t_min) / (t_max - t_min) > cutoff``; the paper's cutoff train step c is
            ``c / N`` (its experiments: 200-900 of 1000). 0 shifts at every step, 1 never.
    """

    integrates = "x0"

    def __init__(self, window: float = 0.02, cutoff: float = 0.3):
        self.window = check_number("window", window, 0.0, 1.0, owner="TimeShift")
        self.cutoff = check_number("cutoff", cutoff, 0.0, 1.0, owner="TimeShift")
        self.base = DDIM()

    @property
    def order(self) -> int:
        return 1

    def _shifted(self, schedule: Schedule, state: State) -> float | np.ndarray:
        """The time(s) of the evaluation at grid index ``state.i``: the grid time, or one per sample."""
        node = state.nodes[state.i]
        span = schedule.t_max - schedule.t_min
        x = state.x_eval
        if self.window == 0.0 or (node.t - schedule.t_min) / span <= self.cutoff or x.shape[0] == 0:
            return node.t
        flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] < 2:
            raise ValueError("TimeShift estimates each sample's noise level from the variance over its coordinates; "
                             "it needs samples of at least 2 coordinates.")
        scale = math.exp(2.0 * node.log_alpha) + math.exp(2.0 * node.log_sigma)   # 1 for VP schedules
        v = (flat.var(dim=1) / scale).clamp(_TINY, 1.0 - _TINY).cpu().numpy()
        t_match = schedule.t_from_log_snr(0.5 * np.log((1.0 - v) / v))            # sigma_vp(t)^2 = v
        lo = max(node.t - 0.5 * self.window * span, schedule.t_min)
        hi = min(node.t + 0.5 * self.window * span, schedule.t_max)
        return np.clip(np.asarray(t_match, dtype=np.float64).reshape(-1), lo, hi)

    def init(self, schedule, ts, x, generator=None) -> TimeShiftState:
        base = self.base.init(schedule, ts, x, generator)
        return TimeShiftState(base, self._shifted(schedule, base), schedule)

    def ask(self, state: TimeShiftState):
        return state.base.x_eval, state.t_eval

    def tell(self, state: TimeShiftState, pred: Prediction) -> TimeShiftState:
        after = self.base.tell(state.base, pred)
        if isinstance(state.t_eval, np.ndarray):   # DDIM from the shifted times: pred is consistent at t_s
            end = state.base.nodes[state.base.i + 1]
            x_new = pred.x0 if end.log_sigma == -math.inf else math.exp(end.log_alpha) * pred.x0 + \
                math.exp(end.log_sigma) * pred.eps
            after = replace(after, x=x_new, x_eval=x_new)
        t_eval = None if self.base.done(after) else self._shifted(state.schedule, after)
        return TimeShiftState(after, t_eval, state.schedule)

    def __repr__(self) -> str:
        return f"TimeShift(window={self.window:g}, cutoff={self.cutoff:g})"


class PerSampleTime(_Wrapper):
    """Evaluate a denoiser that takes one time per call at one time per sample: one call of ``inner`` per distinct
    time, on the samples at that time (tensor keyword arguments with one row per sample are sliced along).

    For the lab's analytic denoisers and other cheap models; a network wrapped by ``wrap_model`` takes per-sample
    times in one call already. The calls made here count as one evaluation in ``sample``'s NFE.
    """

    @property
    def per_sample_time(self) -> bool:
        return True

    def __call__(self, x, t, **model_kwargs):
        if not isinstance(t, np.ndarray):
            return self.inner(x, t, **model_kwargs)
        ts = np.asarray(t, dtype=np.float64).reshape(-1)
        if ts.size != x.shape[0]:
            raise ValueError(f"Per-sample times need one time per sample: got {ts.size} for a batch of {x.shape[0]}.")
        x0, eps = torch.empty_like(x), torch.empty_like(x)
        for value in np.unique(ts):
            rows = np.nonzero(ts == value)[0]
            index = torch.as_tensor(rows, device=x.device)
            kwargs = {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0]
                      else v for k, v in model_kwargs.items()}
            pred = self.inner(x[index], float(value), **kwargs)
            x0[index], eps[index] = pred.x0.to(x0.dtype), pred.eps.to(eps.dtype)
        return Prediction(x0, eps)
