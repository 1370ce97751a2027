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
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..schedules import Schedule

__all__ = ["EMS", "EMSError", "EMSWarning", "FORMAT_VERSION"]

FORMAT_VERSION = 1
# Soundness (EMS.diagnose): over any stretch of log-SNR as wide as one step of a SOUND_STEPS-step uniform grid,
# |int s dlambda| must stay below log(MAX_COEFFICIENT) of DPM-Solver-v3 (its step coefficients carry e^{-dS}).
# Sound statistics stay far below: the shipped zoo EMS reach 1.5-2.1, an analytic 64-dim KDE 5.9 with 100
# nodes; spurious spikes of s (float32 finite differences, too coarse a grid) reached 16-190.
SOUND_STEPS = 5


class EMSError(ValueError):
    """Statistics that do not fit the model, schedule or data they are used with (or a damaged file)."""


class EMSWarning(UserWarning):
    """Statistics that were computed but look unsound (see :meth:`EMS.diagnose`)."""


def prepare_output_path(path, what: str) -> Path:
    """``path`` as a Path whose parent folders exist; a clear error when it is a folder or a parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Cannot save the {what} to {path}: it is a folder. Give a file name, e.g. "
                                f"{path / ('name' + ''.join(path.suffixes or ['.out']))}.")
    for parent in path.parents:                # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"Cannot save the {what} to {path}: {parent} is a file, not a folder. "
                                         "Choose another path, or move that file away.")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _meta_int(meta: dict, key: str, default, source) -> int:
    raw = meta.get(key, default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise EMSError(f"{source} has damaged EMS metadata: {key!r} is {raw!r}, not an integer.") from None


def _meta_json(meta: dict, key: str, default: str, source):
    try:
        return json.loads(meta.get(key, default))
    except (TypeError, json.JSONDecodeError) as err:
        raise EMSError(f"{source} has damaged EMS metadata: {key!r} is not valid JSON ({err}).") from None


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics on a lambda grid.

    Attributes:
        lambdas: (N + 1,) strictly increasing log-SNR nodes (noisiest first).
        l: (N + 1, *stat_shape) float64, the linear part of the model; ``stat_shape`` is ``data_shape``, or
            ``data_shape`` with the spatial dimensions set to 1 when the statistics are shared across positions
            (one file then serves every resolution with the same channels).
        s: (N + 1, *stat_shape) float64, the slope of the least-squares fit ``f' ~= s f + b``.
        b: (N + 1, *stat_shape) float64, the intercept of that fit.
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
        shape = self.data_shape
        try:
            dims = None if isinstance(shape, (str, bytes)) else tuple(shape)
        except TypeError:
            dims = None
        if dims is None or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                                   for d in dims):
            raise EMSError(f"EMS data_shape must be a tuple of positive integers (the per-sample shape), got "
                           f"{shape!r}.")
        if not isinstance(self.info, dict):
            raise EMSError(f"EMS info must be a dict, got {type(self.info).__name__}.")
        if isinstance(self.n_data, bool) or not isinstance(self.n_data, (int, np.integer)) or self.n_data < 0:
            raise EMSError(f"EMS n_data must be a non-negative integer, got {self.n_data!r}.")
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

    @property
    def shared_dims(self) -> tuple[int, ...]:
        """The data dimensions the statistics are shared over: samples may have any size there. Those stored
        with size 1 where the data was larger, and those recorded as shared (``compute(shared=True)``: all but
        the first; :meth:`share`). Any other dimension must match ``data_shape`` exactly: statistics of
        1-channel data do not serve 3-channel samples."""
        stat, data = self.stat_shape, self.data_shape
        if not stat:
            return tuple(range(len(data)))
        free = {i for i, (d, e) in enumerate(zip(stat, data)) if d == 1 and (e != 1 or self.model == "degenerate")}
        if self.info.get("shared") is True:
            free |= set(range(1, len(data)))
        recorded = self.info.get("shared_dims", [])
        free |= {int(d) for d in (recorded if isinstance(recorded, list) else []) if isinstance(d, int)}
        return tuple(sorted(i for i in free if 0 <= i < len(data) and stat[i] == 1))

    def check(self, schedule: Schedule | None = None, data_shape=None) -> None:
        """Raise an :class:`EMSError` when these statistics do not belong to ``schedule`` or cannot serve
        samples of per-sample shape ``data_shape``."""
        if schedule is not None and self.model != "degenerate" and schedule.fingerprint() != self.schedule:
            raise EMSError(f"These EMS were computed for the schedule {self.schedule}, not {schedule.fingerprint()}; "
                           "compute statistics for this schedule (dpmsolve.ems.compute).")
        if data_shape is not None:
            data_shape = tuple(data_shape)
            stat, free = self.stat_shape, self.shared_dims
            if not stat:
                return
            bad = [i for i, (d, e) in enumerate(zip(self.data_shape, data_shape)) if i not in free and d != e]
            if len(stat) != len(data_shape) or bad:
                if self.shared:
                    hint = (f"statistics shared over dimension(s) {', '.join(map(str, free))} serve any size there; "
                            f"dimension(s) {', '.join(map(str, bad or range(len(stat))))} (e.g. the channels) must "
                            "match")
                else:
                    hint = "per-element statistics serve only the shape they were estimated on"
                raise EMSError(f"These EMS were computed for samples of shape {self.data_shape} (statistics "
                               f"{stat}); they cannot serve samples of shape {data_shape} ({hint}). Compute "
                               "statistics for this data (dpmsolve.ems.compute).")

    def diagnose(self, steps: int = SOUND_STEPS) -> str | None:
        """None when the statistics look sound, else what is wrong, at which nodes, and what to do.

        Over every stretch of log-SNR as wide as one step of a ``steps``-step uniform grid, ``|int s dlambda|``
        must stay below ``log(MAX_COEFFICIENT)`` of DPM-Solver-v3 (``e^{-dS}`` enters its step coefficients);
        spurious spikes of s break this long before v3 refuses them. The integral is bounded by that of the
        largest ``|s|`` over the elements at each node (exact for one element)."""
        from ..solvers.v3 import MAX_COEFFICIENT

        limit = math.log(MAX_COEFFICIENT)
        lam = self.lambdas
        peak = np.abs(self.s.reshape(lam.size, -1)).max(axis=1) if self.s.size else np.zeros(lam.size)
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (peak[1:] + peak[:-1]) * np.diff(lam))])
        width = (lam[-1] - lam[0]) / steps
        ends = np.searchsorted(lam, lam + width * (1 + 1e-12), side="right") - 1
        growth = cum[ends] - cum
        if growth.max() <= limit:
            return None
        flagged = np.zeros(lam.size, dtype=bool)
        for i in np.flatnonzero(growth > limit):
            flagged[i:ends[i] + 1] = True
        worst = np.argsort(np.where(flagged, peak, -1.0))[::-1][:5]
        nodes = ", ".join(f"{j} (lambda {lam[j]:.3g}, max |s| {peak[j]:.3g})" for j in sorted(worst) if flagged[j])
        fd = self.info.get("jvp") == "finite_difference"
        return (f"These EMS look unsound: over a log-SNR stretch of {width:.3g} (one step of a {steps}-step grid) "
                f"int |s| reaches {growth.max():.3g} > {limit:.3g}, so DPM-Solver-v3 steps would scale by up to "
                f"e^{growth.max():.3g}. Largest |s| at node(s) {nodes}. Recompute them with more nodes (n_lambdas), "
                "more data points, a larger var_floor or smoothing"
                + (", in float64 (dtype=torch.float64) or with jvp='forward'" if fd else ", in float64")
                + "; or sample with more steps.")

    def check_sound(self, steps: int = SOUND_STEPS) -> None:
        """Raise an :class:`EMSError` with :meth:`diagnose`'s message when the statistics look unsound."""
        problem = self.diagnose(steps)
        if problem:
            raise EMSError(problem)

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

        path = prepare_output_path(path, "EMS")
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
        version = _meta_int(meta, "version", -1, path)
        if version > FORMAT_VERSION:
            raise EMSError(f"{path} has EMS format version {version}; this dpmsolve reads up to "
                           f"{FORMAT_VERSION}. Upgrade dpmsolve.")
        missing = {"lambdas", "l", "s", "b"} - set(arrays)
        if missing:
            raise EMSError(f"{path} lacks the array(s) {sorted(missing)}; the file is damaged.")
        for key in ("data_shape", "schedule"):
            if key not in meta:
                raise EMSError(f"{path} has damaged EMS metadata (no {key!r}).")
        shape = _meta_json(meta, "data_shape", "", path)
        if not isinstance(shape, list):
            raise EMSError(f"{path} has damaged EMS metadata: 'data_shape' is {meta['data_shape']!r}, not a list.")
        try:
            ems = cls(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"], tuple(shape), meta["schedule"],
                      _meta_int(meta, "n_data", 0, path), meta.get("model", ""), _meta_json(meta, "info", "{}", path))
        except EMSError as err:
            raise EMSError(f"{path} is damaged: {err}") from None
        ems.check(schedule, data_shape)
        return ems

    def __repr__(self) -> str:
        lo, hi = self.log_snr_range
        return (f"EMS(model={self.model!r}, nodes={self.lambdas.size}, lambda=[{lo:.3g}, {hi:.3g}], data_shape="
                f"{self.data_shape}, stat_shape={self.stat_shape}, K={self.n_data}, schedule={self.schedule})")
