"""Per-sample error metrics of the accuracy lab, with bootstrap intervals.

At 5-10 model evaluations the RMSE of a batch drawn from a multi-modal model is decided by the few samples whose
trajectory ended in another mode than the exact solution's: one such sample out of 64 moves the RMSE more than
all the others together, and which samples flip depends on the start noise. A cell of the lab (problem x
configuration x NFE) is therefore described by three numbers, each with a percentile-bootstrap interval over the
samples:

* the **median** per-sample error (how accurate a typical sample is);
* the **far fraction**: the share of samples whose error exceeds :func:`far_threshold` (how often a sample ends
  far from its reference, i.e. in another mode);
* the **RMSE** over all samples and coordinates (the classic number; the mean of the squared per-sample errors).

The per-sample error (:func:`per_sample_errors`) is the root mean square over the sample's coordinates of
``x - ref``, so ``sqrt(mean(e**2))`` over the samples is the RMSE per coordinate of the whole batch.

**The far threshold** is half the RMS spread of the reference samples around their mean,
``0.5 * sqrt(mean((ref - ref.mean(0))**2))`` (the same per-coordinate RMS as the errors). Why this definition:

* it is scale-free: multiplying the data by c multiplies both the errors and the threshold by c, so the far
  fraction of a problem does not depend on its units, and one rule serves every problem of the lab;
* it follows the data's spread: two modes of a distribution lie about one spread apart, so a sample that ends
  in another mode than its reference has an error of the order of the spread, while a sample that ends in the
  right mode with a discretisation error has an error far below it. Half the spread separates the two cases
  with margin on both sides (a sample more than half the spread away is closer to "somewhere else" than to
  its reference);
* it is computed once per problem from the reference alone, never from a solver's output, so every
  configuration in a cell is judged against the same threshold.

Bootstrap: the samples are resampled with replacement ``n_boot`` times by a seeded ``numpy`` Generator; the same
resampled indices give all three statistics (and, in :func:`ratio_ci`, both solvers of a pair: the samples share
their start noises, so the pairing is kept). Intervals are percentile intervals at ``level``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
import numpy as np
import torch

__all__ = ["per_sample_errors", "far_threshold", "CellStats", "cell_stats", "ratio_ci"]


def per_sample_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) float64: root-mean-square over all non-batch coordinates of x - ref, per sample."""
    x, ref = torch.as_tensor(x), torch.as_tensor(ref)
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}.")
    if x.ndim == 0:
        raise ValueError("x and ref need a batch dimension (shape (N, ...)).")
    diff = x.detach().to(torch.float64).cpu() - ref.detach().to(torch.float64).cpu()
    if diff.ndim == 1:  # (N,): one coordinate per sample
        return diff.abs()
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1).sqrt()


def far_threshold(ref: torch.Tensor) -> float:
    """Per-sample error above which a sample counts as 'far from the reference' (ended in another mode):
    half the RMS spread of the reference samples around their mean, 0.5 * sqrt(mean((ref - ref.mean(0))**2))."""
    ref = torch.as_tensor(ref).detach().to(torch.float64).cpu()
    if ref.ndim == 0 or ref.shape[0] < 1:
        raise ValueError("ref needs a batch dimension with at least one sample.")
    return 0.5 * float(((ref - ref.mean(dim=0)) ** 2).mean().sqrt())


@dataclass(frozen=True)
class CellStats:
    """One cell's per-sample statistics and their bootstrap intervals (``*_ci`` = (low, high))."""

    n: int
    median: float
    median_ci: tuple[float, float]
    far: float                       # fraction of samples with error > threshold, in [0, 1]
    far_ci: tuple[float, float]
    rmse: float
    rmse_ci: tuple[float, float]
    threshold: float

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("median_ci", "far_ci", "rmse_ci"):
            d[key] = [float(v) for v in d[key]]
        return d


def _as_errors(errors) -> np.ndarray:
    if isinstance(errors, torch.Tensor):
        errors = errors.detach().to(torch.float64).cpu().numpy()
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    if e.size == 0:
        raise ValueError("need at least one per-sample error.")
    return e


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _rms(e: np.ndarray, axis=None):
    return np.sqrt(np.mean(e * e, axis=axis))


def cell_stats(x, ref, *, threshold: float | None = None, n_boot: int = 1000, seed: int = 0,
               level: float = 0.95) -> CellStats:
    """Percentile bootstrap over samples (seeded numpy Generator; resample indices once, reuse for all three stats).

    ``threshold`` defaults to ``far_threshold(ref)``; the lab passes one threshold per problem.
    """
    e = _as_errors(per_sample_errors(x, ref))
    thr = far_threshold(ref) if threshold is None else float(threshold)
    idx = _indices(e.size, n_boot, seed)
    boot = e[idx]                                               # (n_boot, n)
    with np.errstate(invalid="ignore", over="ignore"):
        return CellStats(
            n=int(e.size),
            median=float(np.median(e)), median_ci=_interval(np.median(boot, axis=1), level),
            far=float(np.mean(e > thr)), far_ci=_interval(np.mean(boot > thr, axis=1), level),
            rmse=float(_rms(e)), rmse_ci=_interval(_rms(boot, axis=1), level),
            threshold=thr,
        )


_STATS = {"median": lambda e, axis=None: np.median(e, axis=axis), "rmse": _rms}


def ratio_ci(errors_a, errors_b, *, stat="median", n_boot=1000, seed=0) -> tuple[float, float, float]:
    """Paired bootstrap of stat(a)/stat(b) for per-sample errors of two solvers on the SAME start noises (same
    resampled indices): (ratio, lo, hi). stat in {'median','rmse'}. A cell is a tie when the interval contains 1.

    The interval is the 95% percentile interval.
    """
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {sorted(_STATS)}, got {stat!r}.")
    a, b = _as_errors(errors_a), _as_errors(errors_b)
    if a.shape != b.shape:
        raise ValueError(f"paired errors need the same number of samples, got {a.size} and {b.size}.")
    f = _STATS[stat]
    idx = _indices(a.size, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = float(f(a) / f(b))
        boot = f(a[idx], axis=1) / f(b[idx], axis=1)
    finite = boot[~np.isnan(boot)]
    if finite.size == 0:
        return ratio, math.nan, math.nan
    lo, hi = _interval(finite, 0.95)
    return ratio, lo, hi

