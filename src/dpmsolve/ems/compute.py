"""Estimate the empirical model statistics of a denoiser (Zheng et al. 2023, Sec. 3.1, App. C.1.1 and D).

At each of N + 1 log-SNR nodes and for K points x_lambda, one pass collects

- the Hutchinson estimate of ``l = E[diag(sigma d eps/dx)]``: ``(sigma J v) * v`` with a Rademacher probe v and
  ``J v`` from a forward-mode JVP (``torch.func.jvp``), as the reference recipe;
- the raw moments of ``(eps_bar, eps_bar', y) = (e^{-lambda} eps, e^{-lambda} d eps/dlambda, x / alpha)``,
  where ``d eps/dlambda`` is the total derivative along the ODE, taken by a central difference along the ODE's
  tangent in y = x / alpha (``dy/dlambda = -e^{-lambda} eps``; second-order accurate, two evaluations).

Because ``f = eps_bar - l y`` and ``f' = (l - 1) eps_bar + eps_bar' - l' y`` are affine in those three vectors,
their means and the five needed second moments give ``E f, E f', Var f, Cov(f, f')`` once l and its smoothed
derivative l' are known, so the whole estimate is ONE pass over the data (the reference needs three: l, then
l', then f) and the accumulators are mergeable sufficient statistics: the computation checkpoints after every
batch and resumes where it stopped. Then ``s = Cov(f, f') / Var f`` and ``b = E f' - s E f``.

The points x_lambda are ``alpha x0 + sigma z`` for data x0 (``source='data'``), or points on the model's own
ODE trajectories from a tight solve (``source='trajectory'``, the default without data: what the paper's
theory asks for, and the reference's route for Stable Diffusion, where no data is at hand).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..model import Denoiser, ModelDenoiser
from ..schedules import Schedule
from .statistics import EMS, EMSError, EMSWarning, prepare_output_path

__all__ = ["compute", "MOMENTS"]

# The accumulated sums per node: Hutchinson l, then first and second moments of (e = eps_bar, d = eps_bar', y).
MOMENTS = ("l", "e", "d", "y", "ee", "yy", "ey", "ed", "yd")


def _rademacher(shape, generator, dtype, device):
    return (torch.randint(0, 2, shape, generator=generator, device="cpu") * 2 - 1).to(device=device, dtype=dtype)


def _smooth(values: np.ndarray, half_window: int) -> np.ndarray:
    """Moving average over +-half_window nodes (truncated at the ends), along axis 0."""
    if half_window <= 0:
        return values
    n = values.shape[0]
    csum = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
    lo = np.clip(np.arange(n) - half_window, 0, n)
    hi = np.clip(np.arange(n) + half_window + 1, 0, n)
    width = (hi - lo).reshape((-1,) + (1,) * (values.ndim - 1))
    return (csum[hi] - csum[lo]) / width


def statistics_from_moments(lambdas: np.ndarray, sums: Mapping[str, np.ndarray], count: float, smooth: int = 5,
                            var_floor: float = 1e-8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(l, s, b) from the accumulated sums of ``MOMENTS`` over ``count`` points per node.

    l' is the central difference of l in lambda (one-sided at the ends), smoothed over +-``smooth`` nodes as
    the reference does. ``var_floor``: relative floor of Var f (against E f^2; and 1e-12 of E eps_bar^2 +
    l^2 E y^2 where f itself vanishes), so elements where f hardly varies (Gaussian data: f is then a function
    of lambda alone) get s ~ 0 instead of a ratio of round-off.
    """
    m = {k: np.asarray(v, dtype=np.float64) / count for k, v in sums.items()}
    l = m["l"]
    dl = _smooth(np.gradient(l, lambdas, axis=0, edge_order=1), smooth)
    mean_f = m["e"] - l * m["y"]
    mean_df = (l - 1.0) * m["e"] + m["d"] - dl * m["y"]
    f2 = m["ee"] - 2.0 * l * m["ey"] + l * l * m["yy"]
    var_f = np.maximum(f2 - mean_f**2, 0.0)
    ff = ((l - 1.0) * m["ee"] + m["ed"] - dl * m["ey"] - l * (l - 1.0) * m["ey"] - l * m["yd"] + l * dl * m["yy"])
    cov = ff - mean_f * mean_df
    # Floor Var f relative to E f^2, and (for f ~ 0, e.g. zero-mean Gaussian data, where f vanishes) at round-off
    # level relative to the two terms f is made of: otherwise s would be a ratio of round-off.
    scale = m["ee"] + l * l * m["yy"]
    s = cov / np.maximum(np.maximum(var_f, var_floor * f2), np.maximum(1e-12 * scale, 1e-300))
    b = mean_df - s * mean_f
    return l, s, b


class _Batches:
    """The data points (or the number to generate) cut into batches, with their per-point model kwargs."""

    def __init__(self, data, n_data, shape, conditions, batch_size):
        if data is not None:
            if not isinstance(data, (torch.Tensor, np.ndarray)):
                raise TypeError(f"data must be a tensor (or numpy array) of data points, shape (K, *sample_shape); "
                                f"got {type(data).__name__}" + (" (load the file first, e.g. torch.load(path))"
                                                                 if isinstance(data, (str, Path)) else "") + ".")
            data = torch.as_tensor(data)
            if data.dim() < 2:
                raise EMSError("data must be a tensor of data points, shape (K, *sample_shape).")
            if n_data is not None:
                if n_data > data.shape[0]:
                    raise EMSError(f"n_data={n_data} but data holds only {data.shape[0]} points.")
                data = data[:n_data]
            shape = tuple(data.shape[1:])
            n_data = data.shape[0]
        elif n_data is None or shape is None:
            raise EMSError("Without data, pass n_data (K) and shape (the per-sample shape) to generate the points "
                           "from the model's own trajectories.")
        if not isinstance(n_data, int) or n_data < 2:
            raise EMSError(f"n_data must be an integer >= 2, got {n_data!r}.")
        self.data, self.n, self.shape = data, int(n_data), tuple(int(d) for d in shape)
        self.conditions = {k: torch.as_tensor(v) for k, v in (conditions or {}).items()}
        for k, v in self.conditions.items():
            if v.shape[:1] != (self.n,):
                raise EMSError(f"conditions[{k!r}] must have one entry per data point ({self.n}), got shape "
                               f"{tuple(v.shape)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EMSError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.count = math.ceil(self.n / batch_size)

    def __getitem__(self, k):
        idx = slice(k * self.batch_size, min(self.n, (k + 1) * self.batch_size))
        x0 = None if self.data is None else self.data[idx]
        return x0, idx.stop - idx.start, {key: v[idx] for key, v in self.conditions.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.n, self.shape, self.batch_size]).encode())
        for t in ([self.data] if self.data is not None else []) + [self.conditions[k] for k in sorted(self.conditions)]:
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _resolve(denoiser, kwargs) -> tuple[Denoiser, dict]:
    """The denoiser for one batch and the model kwargs to call it with."""
    if isinstance(denoiser, Denoiser):
        return denoiser, kwargs
    made = denoiser(kwargs)
    if not isinstance(made, Denoiser):
        raise EMSError("denoiser must be a dpmsolve Denoiser, or a function of a batch's conditions returning one.")
    return made, {}


def compute(denoiser: Denoiser | Callable[[dict], Denoiser], data: torch.Tensor | None = None, *,
            n_data: int | None = None, shape=None, conditions: Mapping[str, torch.Tensor] | None = None,
            schedule: Schedule | None = None, n_lambdas: int = 100, t_start: float | None = None,
            t_end: float | None = None, source: str | None = None, batch_size: int = 256, shared: bool = False,
            lambda_batch: int = 1, probes: int = 1, fd_step: float | None = None, smooth: int = 5,
            var_floor: float = 1e-8,
            trajectory_refine: int = 2, seed: int = 0, checkpoint=None, progress: bool | None = None,
            model_id: str = "", dtype: torch.dtype | None = None, device=None, jvp: str = "forward",
            group=None) -> EMS:
    """Estimate l, s, b of ``denoiser`` on ``n_lambdas + 1`` nodes uniform in log-SNR.

    Args:
        denoiser: a dpmsolve denoiser (any wrappers, e.g. classifier-free guidance at the scale you will sample
            with), or a function ``conditions_of_batch -> Denoiser`` (to build a guided denoiser per batch).
        data: data points x0, shape (K, *sample_shape), e.g. training images; or None to use the model's own
            trajectories (then give ``n_data`` = K and ``shape``).
        conditions: per-data-point model inputs, e.g. ``{"y": labels}`` (sliced per batch; passed as model
            kwargs, or to the denoiser factory).
        n_lambdas: N, the number of lambda intervals (the reference uses 120-1200; 50-200 suffice for small
            models). Coarse grids are risky: on the digits KDE, N = 30 made v3 2-100x worse than N = 100 (l, s, b
            are linear between nodes, and a wrong s is exponentiated over a whole step); on an 18-dim Gaussian
            N = 6 gave |s| in the hundreds (l' is then a coarse difference), which v3 refuses.
        t_start, t_end: the time range (default the schedule's); sampling must stay inside it.
        source: ``'data'`` (x = alpha x0 + sigma z; default with data) or ``'trajectory'`` (points on tight ODE
            solves started at t_start; default without data).
        batch_size: data points per batch.
        lambda_batch: log-SNR nodes per network call (the call then holds ``lambda_batch * batch_size`` points,
            one time per point): fills a GPU with few data points per batch. Needs a denoiser that takes
            per-sample times (``denoiser.per_sample_time``: networks wrapped by ``wrap_model``, and
            classifier-free guidance over them). The estimate is the same as with 1.
        shared: pool the statistics over all dimensions but the first (channels), so one EMS serves several
            resolutions.
        probes: Rademacher probes per point for l.
        fd_step: lambda step of the central difference for the total derivative (default 1e-4 in float64, 3e-3
            otherwise). Trained networks can be rough in t at the scale of a few train steps; then a small step
            makes s jump from node to node (the same for any K: it is the model, not noise) and a step near a
            tenth of the node spacing serves v3 better (shipped digits: 0.02, 6-NFE error -11%; patches: 0.03).
            Sharp models can diverge with a wide step (digits KDE at 0.05).
        smooth: half-window of l' smoothing (nodes).
        trajectory_refine: grid refinement of the trajectory solve (third-order DPM-Solver++ on N * refine
            uniform-lambda steps).
        seed: seeds probes, noise and trajectories (per batch, so a resumed run draws the same numbers).
        checkpoint: a file path; the sums are saved there after every batch, and a run with the same settings
            resumes from it. Removed when the computation finishes.
        progress: tqdm progress bar (None: only on a terminal).
        model_id: stored in the EMS.
        dtype, device: of the points (default float32, or the data's dtype and device).
        jvp: ``'forward'`` (``torch.func.jvp``; the network must be plain torch operations) or
            ``'finite_difference'`` (fourth-order central difference along v with a step ~ sigma_t scaled to the
            network's precision, evaluated in float64 where the denoiser accepts it; 5 evaluations per probe,
            for denoisers forward-mode AD cannot trace, e.g. ones that call numpy).
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD`` under ``torchrun``)
            to split the batches over: rank r of W takes batches r, r + W, ...; the sums are then added with one
            ``all_reduce``, and every rank returns the same statistics, equal to one process's to round-off (each
            batch draws its random numbers from its own seed, whoever computes it). Call it on every rank with the
            same arguments; a ``checkpoint`` path then gets the suffix ``.rank{r}of{W}`` (one file per rank).

    The result is checked with :meth:`EMS.diagnose`: statistics that look unsound (spikes of s that would blow
    up DPM-Solver-v3's steps) are returned with an :class:`~dpmsolve.ems.EMSWarning` naming the nodes and the fix.
    """
    from tqdm.auto import tqdm

    schedule = denoiser.schedule if isinstance(denoiser, Denoiser) else schedule
    if schedule is None:
        raise EMSError("With a denoiser factory, pass schedule= as well.")
    batches = _Batches(data, n_data, shape, conditions, batch_size)
    source = source or ("data" if batches.data is not None else "trajectory")
    if source not in ("data", "trajectory"):
        raise EMSError(f"source must be 'data' or 'trajectory', got {source!r}.")
    if source == "data" and batches.data is None:
        raise EMSError("source='data' needs data points.")
    if not isinstance(n_lambdas, int) or n_lambdas < 2:
        raise EMSError(f"n_lambdas must be an integer >= 2, got {n_lambdas!r}.")
    if jvp not in ("forward", "finite_difference"):
        raise EMSError(f"jvp must be 'forward' or 'finite_difference', got {jvp!r}.")
    if not isinstance(probes, int) or probes < 1:
        raise EMSError(f"probes must be a positive integer, got {probes!r}.")
    if not isinstance(lambda_batch, int) or lambda_batch < 1:
        raise EMSError(f"lambda_batch must be a positive integer, got {lambda_batch!r}.")
    if lambda_batch > 1 and not _resolve(denoiser, batches[0][2])[0].per_sample_time:
        raise EMSError("lambda_batch > 1 needs a denoiser that takes one time per sample (denoiser.per_sample_time: "
                       "networks wrapped by dpmsolve.wrap_model, and classifier-free guidance over them); use 1.")
    t_start = schedule.t_max if t_start is None else float(t_start)
    t_end = schedule.t_min if t_end is None else float(t_end)
    if not (schedule.contains(t_start) and schedule.contains(t_end) and t_start > t_end):
        raise EMSError(f"Need t_min <= t_end < t_start <= t_max ({schedule.t_min:g}, {schedule.t_max:g}); got "
                       f"t_start={t_start:g}, t_end={t_end:g}.")
    lambdas = np.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), n_lambdas + 1)
    times = np.asarray(schedule.t_from_log_snr(lambdas), dtype=np.float64)
    times[0], times[-1] = t_start, t_end
    if dtype is None:
        dtype = batches.data.dtype if batches.data is not None and batches.data.is_floating_point() else torch.float32
    device = device if device is not None else (batches.data.device if batches.data is not None else "cpu")
    fd = fd_step if fd_step is not None else (1e-4 if dtype == torch.float64 else 3e-3)
    stat_shape = (batches.shape[0],) + (1,) * (len(batches.shape) - 1) if shared and batches.shape else batches.shape
    reduce_dims = (0,) + (tuple(range(2, 1 + len(batches.shape))) if shared else ())
    per_point = int(np.prod(batches.shape)) // max(1, int(np.prod(stat_shape)))

    settings = {"schedule": schedule.fingerprint(), "n_lambdas": n_lambdas, "t_start": t_start, "t_end": t_end,
                "source": source, "shared": bool(shared), "probes": probes, "fd_step": fd, "seed": seed,
                "refine": trajectory_refine, "data": batches.fingerprint(), "dtype": str(dtype),
                "jvp": jvp}
    sums = {k: np.zeros((n_lambdas + 1,) + stat_shape) for k in MOMENTS}
    done, elapsed, fd_state = 0, 0.0, {}
    rank, world = _rank_of(group)
    mine = list(range(rank, batches.count, world))          # this rank's batches (all of them on one process)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    saved = settings                                        # what a checkpoint must match
    if checkpoint is not None and world > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.name}.rank{rank}of{world}")
        saved = {**settings, "rank": rank, "world": world}
    if checkpoint is not None and checkpoint.is_file():
        done, elapsed = _resume(checkpoint, saved, sums)

    bar = tqdm(total=len(mine) * (n_lambdas + 1), initial=done * (n_lambdas + 1), desc="dpmsolve EMS",
               unit="node", disable=(None if progress is None else not progress) if rank == 0 else True, leave=False)
    start = time.perf_counter()
    try:
        for k in mine[done:]:
            x0, n, kwargs = batches[k]
            den, call_kwargs = _resolve(denoiser, kwargs)
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
            path = None
            if source == "trajectory":
                path = _trajectory(den, schedule, times, x0, n, batches.shape, gen, dtype, device,
                                   trajectory_refine, call_kwargs)
            grouped = {}                     # nodes in a call -> (denoiser, model kwargs) for that many copies
            for first in range(0, lambdas.size, lambda_batch):
                nodes = range(first, min(first + lambda_batch, lambdas.size))
                points, draws = [], []
                for j in nodes:              # random numbers in the same order whatever lambda_batch is
                    if path is not None:
                        points.append(path[j])
                    else:
                        a, s = schedule.alpha_sigma(float(times[j]))
                        z = torch.randn((n,) + batches.shape, generator=gen, dtype=torch.float64).to(device, dtype)
                        points.append(a * x0.to(device, dtype) + s * z)
                    draws.append([_rademacher(points[-1].shape, gen, dtype, device) for _ in range(probes)])
                if len(nodes) not in grouped:
                    grouped[len(nodes)] = (_resolve(denoiser, _repeat(kwargs, len(nodes))) if len(nodes) > 1
                                           else (den, call_kwargs))
                group_den, group_kwargs = grouped[len(nodes)]
                moments = _node_moments(group_den, schedule, points, lambdas[list(nodes)], (lambdas[0], lambdas[-1]),
                                        fd, draws, group_kwargs, reduce_dims, jvp, fd_state)
                for j, node_moments in zip(nodes, moments):
                    for key, value in node_moments.items():
                        sums[key][j] += np.reshape(value, stat_shape)
                bar.update(len(nodes))
            done += 1
            if checkpoint is not None and done < len(mine):
                _save_checkpoint(checkpoint, saved, sums, done, elapsed + time.perf_counter() - start)
    finally:
        bar.close()
    wall = elapsed + time.perf_counter() - start
    if world > 1:
        _all_reduce_sums(sums, group, device)
    l, s, b = statistics_from_moments(lambdas, sums, float(batches.n * per_point), smooth=smooth,
                                      var_floor=var_floor)
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    info = {**settings, "smooth": smooth, "var_floor": var_floor, "wall_seconds": round(wall, 3),
            "estimator": f"Hutchinson l ({'forward JVP' if jvp == 'forward' else '4-point central difference'}), "
                         "one-pass moments, central difference along the ODE"}
    ems = EMS(lambdas, l, s, b, batches.shape, schedule.fingerprint(), batches.n, model_id, info)
    problem = ems.diagnose()
    if problem:                                # returned all the same: hours of work are not thrown away
        warnings.warn(problem, EMSWarning, stacklevel=2)
    return ems


def _rank_of(group) -> tuple[int, int]:
    """(rank, world size) in ``group`` (None: one process)."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise EMSError("group= was given but torch.distributed is not initialised; launch with torchrun and call "
                       "torch.distributed.init_process_group() first, or pass group=None.")
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_sums(sums: dict, group, device) -> None:
    """Add every rank's sums (float64, in one ``all_reduce``; on the device for an NCCL group)."""
    import torch.distributed as dist

    keys = list(sums)
    flat = torch.from_numpy(np.concatenate([sums[k].reshape(-1) for k in keys]))
    if dist.get_backend(group) == "nccl":
        flat = flat.to(device if device is not None and torch.device(device).type == "cuda" else "cuda")
    dist.all_reduce(flat, group=group)
    flat, start = flat.cpu().numpy(), 0
    for k in keys:
        size = sums[k].size
        sums[k][...] = flat[start:start + size].reshape(sums[k].shape)
        start += size


def _trajectory(den, schedule, times, x0, n, shape, gen, dtype, device, refine, kwargs) -> list[torch.Tensor]:
    """Points of tight probability-flow ODE solves at every EMS node, from x_start = alpha x0 + sigma z (with
    data) or sqrt(alpha^2 + sigma^2) z (unit-variance data assumed) at the first node."""
    from ..grids import check_grid
    from ..sampling import sample

    a, s = schedule.alpha_sigma(float(times[0]))
    z = torch.randn((n,) + shape, generator=gen, dtype=torch.float64).to(device, dtype)
    x = a * x0.to(device, dtype) + s * z if x0 is not None else math.sqrt(a * a + s * s) * z
    lam = np.asarray(schedule.log_snr(times), dtype=np.float64)
    fine = np.interp(np.arange((lam.size - 1) * refine + 1) / refine, np.arange(lam.size), lam)
    ts = np.asarray(schedule.t_from_log_snr(fine), dtype=np.float64)
    ts[::refine] = times
    ts = check_grid(schedule, ts)
    sol = sample(den, x, "dpmsolver++", order=3, solver_type="taylor", grid=ts, return_intermediates=True,
                 progress=False, model_kwargs=kwargs)
    return sol.trajectory[::refine]


def _network_dtype(den, work: torch.dtype) -> torch.dtype:
    """The precision the denoiser computes in: a wrapped network's own dtype, else the dtype it is given."""
    while not isinstance(den, ModelDenoiser) and isinstance(getattr(den, "inner", None), Denoiser):
        den = den.inner
    if isinstance(den, ModelDenoiser):
        return torch.promote_types(den._net_dtype(torch.empty((), dtype=work)), torch.float32)
    return work


def _fd_jvp(den, t, kwargs, x, v, sigma, fd_state: dict) -> torch.Tensor:
    """J v by the fourth-order central difference ``(8 (e(h) - e(-h)) - (e(2h) - e(-2h))) / 12h`` along v.

    The points are formed and evaluated in float64 where the denoiser accepts it (``fd_state`` remembers whether
    it does). The step is per point, ``h = u^(1/5) sigma_t`` with u the unit roundoff of the precision the
    denoiser computes in (a wrapped network's dtype, else the evaluation dtype): eps varies on the scale of the
    noise sigma_t in x, so this balances the O((h / sigma)^4) truncation against the O(u / h) rounding (the old
    fixed step, 3e-3 in float32, was far too wide at small sigma on sharp models and made the statistics
    unsound)."""
    work = fd_state.setdefault("dtype", torch.float64)
    try:
        h = torch.finfo(_network_dtype(den, work)).eps ** 0.2 * sigma.to(work)
        xw, hv = x.to(work), h * v.to(work)
        with torch.no_grad():
            e = {k: den(xw + k * hv, t, **kwargs).eps.to(work) for k in (-2, -1, 1, 2)}
    except (RuntimeError, TypeError):
        if work == x.dtype:
            raise
        fd_state["dtype"] = x.dtype                # the denoiser refuses float64: difference in x's dtype
        return _fd_jvp(den, t, kwargs, x, v, sigma, fd_state)
    return (8.0 * (e[1] - e[-1]) - (e[2] - e[-2])) / (12.0 * h)


def _jvp(den, t, kwargs, x, v, mode, sigma, fd_state):
    """(eps(x), J v) with J = d eps / dx."""
    if mode == "finite_difference":
        with torch.no_grad():
            eps = den(x, t, **kwargs).eps
        return eps, _fd_jvp(den, t, kwargs, x, v, sigma, fd_state)
    try:
        return torch.func.jvp(lambda u: den(u, t, **kwargs).eps, (x,), (v,))
    except RuntimeError as err:
        raise EMSError(f"Forward-mode AD (torch.func.jvp) cannot trace this denoiser ({err}). Make the network plain "
                       "torch operations, or pass jvp='finite_difference'.") from err


def _repeat(kwargs: dict, copies: int) -> dict:
    """Per-point model kwargs for ``copies`` stacked copies of a batch."""
    return {k: torch.cat([v] * copies) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in kwargs.items()}


def _node_moments(den, schedule, points, lams, lam_range, fd, draws, kwargs, dims, mode, fd_state
                  ) -> list[dict[str, np.ndarray]]:
    """The sums of every moment at each of the nodes ``lams`` (points, probes per node) from one set of network
    calls: with several nodes the points are stacked and each carries its own time."""
    n, g = points[0].shape[0], len(points)
    ts = np.asarray(schedule.t_from_log_snr(np.asarray(lams, dtype=np.float64)), dtype=np.float64)
    al, si = np.atleast_1d(schedule.alpha(ts)), np.atleast_1d(schedule.sigma(ts))
    x = torch.cat(points)
    shape = (-1,) + (1,) * (x.dim() - 1)

    def per_point(values):                       # one value per node -> a column over the stacked points
        return torch.as_tensor(np.repeat(np.asarray(values, dtype=np.float64), n)).to(x.device, x.dtype).reshape(shape)

    def when(t_nodes):                           # the denoiser's time: a float for one node, else one per point
        return float(t_nodes[0]) if g == 1 else np.repeat(t_nodes, n)

    a, s = per_point(al), per_point(si)
    hutch = 0.0
    eps = None
    for p in range(len(draws[0])):
        v = torch.cat([d[p] for d in draws])
        eps, jv = _jvp(den, when(ts), kwargs, x, v, mode, s, fd_state)
        hutch = hutch + (s.to(jv.dtype) * jv * v.to(jv.dtype)).double() / len(draws[0])
    eps = eps.detach()
    # Total derivative along the ODE: central difference along its tangent in y = x / alpha.
    y = x / a
    scale = np.exp(-np.asarray(lams, dtype=np.float64))
    sc = per_point(scale)
    dy = -sc * eps                                                   # dy/dlambda
    lo, hi = np.maximum(lams - fd, lam_range[0]), np.minimum(lams + fd, lam_range[1])
    with torch.no_grad():
        ends = []
        for other in (lo, hi):
            t_o = np.asarray(schedule.t_from_log_snr(other), dtype=np.float64)
            a_o = np.atleast_1d(schedule.alpha(t_o))
            ends.append(den(per_point(a_o) * (y + per_point(other - lams) * dy), when(t_o), **kwargs).eps)
    deps = (ends[1] - ends[0]) / per_point(hi - lo)
    e, d, yy = (sc * eps).double(), (sc * deps).double(), y.double()
    out = []
    for j in range(g):
        r = slice(j * n, (j + 1) * n)
        h, ej, dj, yj = hutch[r], e[r], d[r], yy[r]
        terms = {"l": h, "e": ej, "d": dj, "y": yj, "ee": ej * ej, "yy": yj * yj, "ey": ej * yj, "ed": ej * dj,
                 "yd": yj * dj}
        out.append({key: u.sum(dim=dims).cpu().numpy() for key, u in terms.items()})
    return out


def _save_checkpoint(path: Path, settings: dict, sums: dict, done: int, elapsed: float) -> None:
    from safetensors.torch import save_file

    prepare_output_path(path, "EMS checkpoint")
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sums.items()}, str(tmp),
              metadata={"settings": json.dumps(settings, sort_keys=True), "done": str(done), "elapsed": str(elapsed)})
    tmp.replace(path)


def _resume(path: Path, settings: dict, sums: dict) -> tuple[int, float]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise EMSError(f"The EMS checkpoint {path} is unreadable ({err}); delete it to start over.") from None
    try:
        stored_settings = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError:
        stored_settings = None
    if stored_settings != json.loads(json.dumps(settings, sort_keys=True)):
        raise EMSError(f"The EMS checkpoint {path} belongs to a computation with other settings or data; delete it "
                       "or pass another checkpoint path.")
    for k in sums:
        if k not in stored or stored[k].shape != sums[k].shape:
            raise EMSError(f"The EMS checkpoint {path} is damaged (array {k!r}); delete it to start over.")
        sums[k][...] = stored[k]
    try:
        return int(meta["done"]), float(meta.get("elapsed", 0.0))
    except (KeyError, TypeError, ValueError):
        raise EMSError(f"The EMS checkpoint {path} has damaged metadata ('done' / 'elapsed'); delete it to start "
                       "over.") from None
