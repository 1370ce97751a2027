"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, Sec. 3.1 and App. C): l, s, b on a
lambda grid, their interpolation, and their safetensors files.

The probability-flow ODE ``dx/dlambda = (alpha'/alpha) x - sigma eps`` is rewritten with per-element
statistics (products are element-wise):

    N = sigma eps - l x,       f = N / alpha = (1 - l) x / alpha - x0,       f' ~= s f + b,

``l = E[diag(sigma d eps / dx)]`` absorbs the linear part of the model, and ``(s, b)`` is the per-element
least-squares fit of the total lambda-derivative ``f'`` on ``f``. ``l = 1, s = b = 0`` is DPM-Solver++;
``l = 0, s = -1, b = 0`` is DPM-Solver. Between grid nodes l, s and b are linear in lambda.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..schedules import Schedule

__all__ = ["EMS", "EMSError", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class EMSError(ValueError):
    """Statistics that do not fit the model, schedule or data they are used with (or a damaged file)."""


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics on a lambda grid.

    Attributes:
        lambdas: (N + 1,) strictly increasing log-SNR nodes (noisiest first).
        l, s, b: (N + 1, *stat_shape) float64; ``stat_shape`` is ``data_shape``, or ``data_shape`` with the
            spatial dimensions set to 1 when the statistics are shared across positions (one file then serves
            every resolution with the same channels).
        data_shape: the per-sample shape the statistics were estimated on, e.g. (3, 32, 32).
        schedule: the fingerprint of the schedule they belong to (``Schedule.fingerprint()``).
        n_data: K, the number of data points behind the estimate.
        model: a free-form identifier of the model (name, weights hash, guidance scale).
        info: provenance (estimator settings, wall time, where the data came from).
    """

    lambdas: np.ndarray
    l: np.ndarray
    s: np.ndarray
    b: np.ndarray
    data_shape: tuple[int, ...]
    schedule: str
    n_data: int = 0
    model: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        lam = _frozen(self.lambdas)
        if lam.ndim != 1 or lam.size < 2 or not np.all(np.diff(lam) > 0) or not np.all(np.isfinite(lam)):
            raise EMSError("EMS lambdas must be a strictly increasing finite 1-D array of at least 2 nodes.")
        object.__setattr__(self, "lambdas", lam)
        object.__setattr__(self, "data_shape", tuple(int(d) for d in self.data_shape))
        shapes = set()
        for name in ("l", "s", "b"):
            a = _frozen(getattr(self, name))
            if a.shape[:1] != (lam.size,):
                raise EMSError(f"EMS {name} has {a.shape[0] if a.ndim else 0} rows for {lam.size} lambda nodes.")
            if not np.all(np.isfinite(a)):
                raise EMSError(f"EMS {name} holds NaN or Inf; the file is damaged or the estimate diverged.")
            object.__setattr__(self, name, a)
            shapes.add(a.shape[1:])
        if len(shapes) != 1:
            raise EMSError(f"EMS l, s, b must have one shape; got {sorted(shapes)}.")
        stat_shape = shapes.pop()
        if stat_shape and (len(stat_shape) != len(self.data_shape)
                           or any(d not in (1, e) for d, e in zip(stat_shape, self.data_shape))):
            raise EMSError(f"EMS statistics of shape {stat_shape} do not fit data of shape {self.data_shape}.")

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def degenerate(cls, schedule: Schedule, data_shape=(), lambdas=None) -> EMS:
        """``l = 1, s = b = 0``: with these statistics DPM-Solver-v3 is multistep DPM-Solver++ (Taylor
        coefficients). ``lambdas`` defaults to the schedule's whole log-SNR range."""
        lam = np.asarray(schedule.log_snr_range if lambdas is None else lambdas, dtype=np.float64)
        shape = (lam.size,) + (1,) * len(tuple(data_shape))
        return cls(lam, np.ones(shape), np.zeros(shape), np.zeros(shape), tuple(data_shape), schedule.fingerprint(),
                   model="degenerate")

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def stat_shape(self) -> tuple[int, ...]:
        return self.l.shape[1:]

    @property
    def shared(self) -> bool:
        """Whether the statistics are shared across some data dimensions (stored with size 1 there)."""
        return self.stat_shape != self.data_shape

    @property
    def log_snr_range(self) -> tuple[float, float]:
        return float(self.lambdas[0]), float(self.lambdas[-1])

    def at(self, lam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(l, s, b) at log-SNR values ``lam`` (any shape), linear between nodes: arrays of shape
        ``lam.shape + stat_shape``. Values outside the grid raise an :class:`EMSError`."""
        lam = np.asarray(lam, dtype=np.float64)
        self.check_range(lam)
        flat = np.clip(lam.reshape(-1), self.lambdas[0], self.lambdas[-1])
        k = np.clip(np.searchsorted(self.lambdas, flat, side="right") - 1, 0, self.lambdas.size - 2)
        w = (flat - self.lambdas[k]) / (self.lambdas[k + 1] - self.lambdas[k])
        w = w.reshape((-1,) + (1,) * len(self.stat_shape))
        shape = lam.shape + self.stat_shape
        return tuple(((1.0 - w) * a[k] + w * a[k + 1]).reshape(shape) for a in (self.l, self.s, self.b))

    def check_range(self, lam) -> None:
        lo, hi = self.log_snr_range
        lam = np.asarray(lam, dtype=np.float64)
        tol = 1e-9 * (hi - lo)
        if lam.size and (lam.min() < lo - tol or lam.max() > hi + tol):
            raise EMSError(f"The sampling grid reaches log-SNR {lam.min():.4g} .. {lam.max():.4g}, outside the EMS "
                           f"grid [{lo:.4g}, {hi:.4g}]. Sample within the range the statistics were computed on "
                           "(t_start / t_end), or compute them on a wider range.")

    def check(self, schedule: Schedule | None = None, data_shape=None) -> None:
        """Raise an :class:`EMSError` when these statistics do not belong to ``schedule`` or cannot serve
        samples of per-sample shape ``data_shape``."""
        if schedule is not None and self.model != "degenerate" and schedule.fingerprint() != self.schedule:
            raise EMSError(f"These EMS were computed for the schedule {self.schedule}, not {schedule.fingerprint()}; "
                           "compute statistics for this schedule (dpmsolve.ems.compute).")
        if data_shape is not None:
            data_shape = tuple(data_shape)
            stat = self.stat_shape
            if stat and (len(stat) != len(data_shape) or any(d != 1 and d != e for d, e in zip(stat, data_shape))):
                hint = ("statistics shared across positions serve any resolution with the same channels"
                        if self.shared else "per-element statistics serve only the shape they were estimated on")
                raise EMSError(f"These EMS were computed for samples of shape {self.data_shape} (statistics "
                               f"{stat}); they cannot serve samples of shape {data_shape} ({hint}).")

    def share(self, dims=None) -> EMS:
        """Statistics averaged over ``dims`` of the data (default: all but the first, the spatial positions of
        a (C, H, W) sample), so that one EMS serves several resolutions. Averaging the estimated l, s, b is a
        shortcut; ``compute(..., shared=True)`` pools the raw moments instead, which is the better estimate."""
        dims = tuple(range(1, len(self.data_shape))) if dims is None else tuple(dims)
        axes = tuple(1 + d for d in dims)
        mean = {k: getattr(self, k).mean(axis=axes, keepdims=True) for k in ("l", "s", "b")}
        return EMS(self.lambdas, mean["l"], mean["s"], mean["b"], self.data_shape, self.schedule, self.n_data,
                   self.model, {**self.info, "shared_dims": list(dims)})

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write a safetensors file: the arrays (float64) and, as metadata, the lambda grid's provenance,
        schedule fingerprint, data shape, K, model identifier and format version."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.from_numpy(np.array(getattr(self, k))) for k in ("lambdas", "l", "s", "b")}
        meta = {"format": "dpmsolve-ems", "version": str(FORMAT_VERSION), "schedule": self.schedule,
                "data_shape": json.dumps(list(self.data_shape)), "n_data": str(int(self.n_data)), "model": self.model,
                "info": json.dumps(self.info, default=str)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path, schedule: Schedule | None = None, data_shape=None) -> EMS:
        """Read a file written by :meth:`save`, validating it (and, when given, that it fits ``schedule`` and
        samples of shape ``data_shape``); any damage or mismatch raises an :class:`EMSError`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise EMSError(f"No EMS file at {path}.")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = dict(f.metadata() or {})
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise EMSError(f"{path} is not a readable EMS file ({err}).") from None
        if meta.get("format") != "dpmsolve-ems":
            raise EMSError(f"{path} is not a dpmsolve EMS file (no 'dpmsolve-ems' metadata).")
        if int(meta.get("version", -1)) > FORMAT_VERSION:
            raise EMSError(f"{path} has EMS format version {meta['version']}; this dpmsolve reads up to "
                           f"{FORMAT_VERSION}. Upgrade dpmsolve.")
        missing = {"lambdas", "l", "s", "b"} - set(arrays)
        if missing:
            raise EMSError(f"{path} lacks the array(s) {sorted(missing)}; the file is damaged.")
        try:
            ems = cls(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"], tuple(json.loads(meta["data_shape"])),
                      meta["schedule"], int(meta.get("n_data", 0)), meta.get("model", ""),
                      json.loads(meta.get("info", "{}")))
        except (KeyError, json.JSONDecodeError) as err:
            raise EMSError(f"{path} has damaged EMS metadata ({err}).") from None
        ems.check(schedule, data_shape)
        return ems

    def __repr__(self) -> str:
        lo, hi = self.log_snr_range
        return (f"EMS(model={self.model!r}, nodes={self.lambdas.size}, lambda=[{lo:.3g}, {hi:.3g}], data_shape="
                f"{self.data_shape}, stat_shape={self.stat_shape}, K={self.n_data}, schedule={self.schedule})")
