"""Noise schedules: the one place that knows how time maps to alpha, sigma and lambda.

A schedule defines ``x_t = alpha(t) * x_0 + sigma(t) * eps`` on ``[t_min, t_max]`` and the half log-SNR
``lambda(t) = log alpha(t) - log sigma(t)``, which decreases strictly in t. Every schedule also inverts
lambda exactly (``t_from_log_snr``), which is what the lambda-space solvers need.

All functions work on host float64 (Python floats or numpy arrays); data tensors never pass through here.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ._checks import check_finite

__all__ = [
    "Schedule",
    "VPSchedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "EDM",
    "RectifiedFlow",
]

# diffusers' clamp for zero-terminal-SNR schedules: alphas_cumprod[-1] = 2**-24 keeps sigma/alpha finite.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def _as_float64(t):
    return np.asarray(t, dtype=np.float64)


def _maybe_scalar(value, like):
    """Return a Python float when the input was a scalar, else the array."""
    return float(value) if np.ndim(like) == 0 else value


def _check_numbers(owner: str, obj, *names: str) -> None:
    """Each named field of ``obj`` is a finite real number (TypeError / ValueError naming it otherwise)."""
    for name in names:
        check_finite(name, getattr(obj, name), owner)


def _check_times(owner: str, t_min, t_max, below_one: bool, why: str) -> None:
    if not (0 < t_min < t_max and (t_max < 1 or not below_one)):
        bound = " < 1" if below_one else ""
        raise ValueError(f"{owner} needs 0 < t_min < t_max{bound} ({why}); got t_min={t_min!r}, t_max={t_max!r}.")


def _first_bad(values: np.ndarray, bad: np.ndarray) -> str:
    i = int(np.argmax(bad))
    return f"{float(values[i])!r} at index {i}"


class Schedule(ABC):
    """Base class: ``alpha``, ``sigma``, ``log_snr`` and the exact inverse ``t_from_log_snr``.

    Subclasses define ``t_min``, ``t_max``, ``_log_alpha_sigma(t)`` and ``_t_from_log_snr(lam)``.
    """

    t_min: float
    t_max: float

    @abstractmethod
    def _log_alpha_sigma(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log alpha(t) and log sigma(t) for a float64 array."""

    @abstractmethod
    def _t_from_log_snr(self, lam: np.ndarray) -> np.ndarray:
        """Exact inverse of lambda(t) for a float64 array."""

    def alpha(self, t):
        t = _as_float64(t)
        return _maybe_scalar(np.exp(self._log_alpha_sigma(t)[0]), t)

    def sigma(self, t):
        t = _as_float64(t)
        return _maybe_scalar(np.exp(self._log_alpha_sigma(t)[1]), t)

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha, sigma) at one time, as Python floats."""
        log_a, log_s = self._log_alpha_sigma(_as_float64(t))
        return float(np.exp(log_a)), float(np.exp(log_s))

    def log_snr(self, t):
        """Half log-SNR ``lambda(t) = log alpha - log sigma`` (strictly decreasing in t)."""
        t = _as_float64(t)
        log_a, log_s = self._log_alpha_sigma(t)
        return _maybe_scalar(log_a - log_s, t)

    def t_from_log_snr(self, lam):
        """The time whose half log-SNR is ``lam`` (vectorized exact inverse of ``log_snr``)."""
        lam = _as_float64(lam)
        return _maybe_scalar(self._t_from_log_snr(lam), lam)

    @property
    def log_snr_range(self) -> tuple[float, float]:
        """(lambda(t_max), lambda(t_min)): the noisiest and the cleanest log-SNR."""
        return self.log_snr(self.t_max), self.log_snr(self.t_min)

    def fingerprint(self) -> str:
        """A short text that identifies the schedule (used to validate saved statistics)."""
        return repr(self)

    def contains(self, t, tol: float = 1e-9) -> bool:
        t = _as_float64(t)
        span = self.t_max - self.t_min
        return bool(np.all((t >= self.t_min - tol * span) & (t <= self.t_max + tol * span)))


class VPSchedule(Schedule):
    """Variance preserving: ``alpha^2 + sigma^2 = 1``; subclasses give ``log alpha(t)`` and its inverse."""

    @abstractmethod
    def log_alpha(self, t: np.ndarray) -> np.ndarray:
        """log alpha(t) for a float64 array."""

    @abstractmethod
    def t_from_log_alpha(self, log_alpha: np.ndarray) -> np.ndarray:
        """Inverse of ``log_alpha``."""

    def _log_alpha_sigma(self, t):
        log_a = self.log_alpha(t)
        # sigma = sqrt(1 - alpha^2), computed without cancellation near alpha = 1.
        return log_a, 0.5 * np.log(-np.expm1(2.0 * log_a))

    def _t_from_log_snr(self, lam):
        # alpha^2 = 1 / (1 + exp(-2 lambda))  =>  log alpha = -softplus(-2 lambda) / 2
        return self.t_from_log_alpha(-0.5 * np.logaddexp(0.0, -2.0 * lam))


@dataclass(frozen=True, eq=False)
class DiscreteVP(VPSchedule):
    """A DDPM-style schedule with ``N`` train steps, as in the reference DPM-Solver.

    Train step ``n`` (0-based) sits at continuous time ``t_n = (n + 1) / N``; ``log alpha`` is interpolated
    piecewise linearly in t between the train steps, so ``t`` ranges over ``[1/N, 1]``. The network input for
    time t is the (fractional) train index ``N * t - 1`` (see ``wrap_model(time_input="discrete")``).

    Build it with ``DiscreteVP.from_betas(betas)`` or ``DiscreteVP.from_alphas_cumprod(alphas_cumprod)``.
    A zero-terminal-SNR schedule (``alphas_cumprod[-1] == 0``) is clamped to ``2**-24`` there, as diffusers does,
    so sigma/alpha and lambda stay finite.
    """

    alphas_cumprod: np.ndarray = field(repr=False)
    _log_alphas: np.ndarray = field(init=False, repr=False)
    _ts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1:
            raise ValueError(f"alphas_cumprod must be a 1-D array (one value per train step); got shape {ac.shape}.")
        if ac.size < 2:
            raise ValueError(f"DiscreteVP needs at least 2 train steps; got {ac.size} in alphas_cumprod.")
        bad = ~np.isfinite(ac) | (ac > 1) | np.concatenate([ac[:-1] <= 0, [ac[-1] < 0]])
        if np.any(bad):
            raise ValueError(
                f"alphas_cumprod must be finite and in (0, 1] (only the last entry may be 0 for a "
                f"zero-terminal-SNR schedule); got {_first_bad(ac, bad)}."
            )
        ac = ac.copy()
        if ac[-1] <= 0.0:
            ac[-1] = ZERO_SNR_ALPHA_BAR
        if np.any(ac >= 1.0):
            raise ValueError("alphas_cumprod must be < 1 everywhere: sigma = 0 makes log-SNR infinite.")
        if np.any(np.diff(ac) >= 0):
            bad = int(np.argmax(np.diff(ac) >= 0))
            raise ValueError(
                f"alphas_cumprod must decrease strictly so that log-SNR is monotone; it does not at train "
                f"step {bad + 1} ({ac[bad]:.6g} -> {ac[bad + 1]:.6g}). Check the betas (all must be in (0, 1))."
            )
        n = ac.size
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_log_alphas", 0.5 * np.log(ac))
        object.__setattr__(self, "_ts", np.arange(1, n + 1, dtype=np.float64) / n)

    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be a 1-D array (one value per train step); got shape {betas.shape}.")
        if betas.size < 2:
            raise ValueError(f"DiscreteVP needs at least 2 train steps; got {betas.size} betas.")
        bad = ~np.isfinite(betas) | (betas <= 0) | (betas > 1)
        if np.any(bad):
            raise ValueError(f"betas must be finite and in (0, 1]; got {_first_bad(betas, bad)}.")
        return cls(np.cumprod(1.0 - betas))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteVP:
        return cls(np.asarray(alphas_cumprod, dtype=np.float64))

    @staticmethod
    def _check_table(owner: str, n, beta_start, beta_end) -> None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"DiscreteVP.{owner} needs n >= 2 train steps (an integer); got n={n!r}.")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"DiscreteVP.{owner} {name} must be a real number, got {type(value).__name__} "
                                f"{value!r}.")
            if not 0 < value <= 1:
                raise ValueError(f"DiscreteVP.{owner} needs betas in (0, 1]; got {name}={value!r}.")

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """The DDPM linear-beta schedule (diffusers' ``beta_schedule="linear"``)."""
        cls._check_table("linear", n, beta_start, beta_end)
        return cls.from_betas(np.linspace(beta_start, beta_end, n))

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteVP:
        """Stable Diffusion's schedule (diffusers' ``beta_schedule="scaled_linear"``)."""
        cls._check_table("scaled_linear", n, beta_start, beta_end)
        return cls.from_betas(np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2)

    @property
    def num_train_steps(self) -> int:
        return self.alphas_cumprod.size

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_train_steps

    @property
    def t_max(self) -> float:
        return 1.0

    def log_alpha(self, t):
        return np.interp(t, self._ts, self._log_alphas)

    def t_from_log_alpha(self, log_alpha):
        # log alpha decreases in t: interpolate on the reversed table.
        return np.interp(log_alpha, self._log_alphas[::-1], self._ts[::-1])

    def train_index(self, t):
        """The (fractional) train index of time t: ``N t - 1``, in [0, N - 1]."""
        return _as_float64(t) * self.num_train_steps - 1.0

    def t_from_train_index(self, index):
        return (_as_float64(index) + 1.0) / self.num_train_steps

    def fingerprint(self) -> str:
        ac = self.alphas_cumprod
        return f"DiscreteVP(N={ac.size}, first={ac[0]:.9g}, mid={ac[ac.size // 2]:.9g}, last={ac[-1]:.9g})"

    def __repr__(self) -> str:
        return self.fingerprint()


@dataclass(frozen=True)
class LinearVP(VPSchedule):
    """Continuous VP-SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0) (Song et al. 2021)."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        _check_numbers("LinearVP", self, "beta_0", "beta_1", "t_min", "t_max")
        if not 0 < self.beta_0 < self.beta_1:
            raise ValueError(f"LinearVP needs 0 < beta_0 < beta_1 so that log-SNR decreases strictly (Song et al. use "
                             f"0.1 and 20); got beta_0={self.beta_0!r}, beta_1={self.beta_1!r}.")
        _check_times("LinearVP", self.t_min, self.t_max, False, "sigma is 0 at t = 0")

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_from_log_alpha(self, log_alpha):
        # Positive root of (d/4) t^2 + (b0/2) t - c = 0 with c = -log alpha, in the cancellation-free form.
        c = -log_alpha
        half_b0 = 0.5 * self.beta_0
        return 2.0 * c / (half_b0 + np.sqrt(half_b0**2 + (self.beta_1 - self.beta_0) * c))


@dataclass(frozen=True)
class CosineVP(VPSchedule):
    """Continuous cosine schedule (Nichol & Dhariwal 2021): alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2).

    ``t_max`` defaults to 0.9946, where the reference DPM-Solver stops because alpha vanishes at t = 1. The
    offset ``s`` must be in (0, 1]: it is a small shift (0.008 in the paper); larger ones lose t's precision in
    ``(t + s) / (1 + s)``.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def __post_init__(self):
        _check_numbers("CosineVP", self, "s", "t_min", "t_max")
        if not 0 < self.s <= 1:
            raise ValueError(f"CosineVP needs an offset 0 < s <= 1 (Nichol & Dhariwal use s = 0.008); got "
                             f"s={self.s!r}.")
        _check_times("CosineVP", self.t_min, self.t_max, True, "alpha is 0 at t = 1")

    @property
    def _log_alpha_0(self) -> float:
        return math.log(math.cos(math.pi / 2 * self.s / (1.0 + self.s)))

    def log_alpha(self, t):
        return np.log(np.cos(np.pi / 2 * (t + self.s) / (1.0 + self.s))) - self._log_alpha_0

    def t_from_log_alpha(self, log_alpha):
        return 2.0 * (1.0 + self.s) / np.pi * np.arccos(np.exp(log_alpha + self._log_alpha_0)) - self.s


@dataclass(frozen=True)
class EDM(Schedule):
    """Variance exploding in EDM form (Karras et al. 2022): alpha = 1, sigma = t, so lambda = -log t."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        _check_numbers("EDM", self, "sigma_min", "sigma_max")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max (Karras et al. use 0.002 and 80); got "
                             f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}.")

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def _log_alpha_sigma(self, t):
        return np.zeros_like(t), np.log(t)

    def _t_from_log_snr(self, lam):
        return np.exp(-lam)


@dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022): alpha = 1 - t, sigma = t.

    lambda = log((1 - t) / t) is infinite at both ends, so the sampling range stays strictly inside (0, 1):
    by default ``[1e-3, 1 - 1e-3]``, like diffusers' flow grids. Start from ``x_T`` = standard noise.
    """

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def __post_init__(self):
        _check_numbers("RectifiedFlow", self, "t_min", "t_max")
        _check_times("RectifiedFlow", self.t_min, self.t_max, True, "lambda is infinite at 0 and 1; the default is "
                     "[1e-3, 1 - 1e-3]")

    def _log_alpha_sigma(self, t):
        return np.log1p(-t), np.log(t)

    def _t_from_log_snr(self, lam):
        # t = 1 / (1 + e^lambda), written to avoid overflow for large |lambda|.
        return np.exp(-np.logaddexp(0.0, lam))
