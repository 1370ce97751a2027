"""Bulk generation: many images, one per seed, on any number of processes, resumable (``dpmsolve.generate``).

Every image depends only on its seed and the settings, never on the batch it was drawn in nor on the number of
processes (the pattern of EDM's ``generate.py``, made exact):

- **Start noise** of seed ``s``: ``torch.randn(shape, generator=torch.Generator().manual_seed(s))`` on the host
  (float32), moved to the device (:func:`noise`).
- **Solver noise** (stochastic solvers): a generator per sample, on the device, seeded by :func:`solver_seed`
  ``(s)``. The sampling engine takes one generator for a whole batch, so a stochastic solver runs here with one
  solver state per sample (a wrapper over the public ``init / ask / tell`` protocol: the network still sees the
  whole batch in one call). Image ``s`` then equals ``dp.sample(denoiser, noise(s)[None], solver,
  seed=solver_seed(s))`` with the same grid.
- **The network** is evaluated on slices of exactly ``eval_batch`` samples (the last slice padded): a matrix
  product's rounding depends on how many rows it has (CPU and GPU kernels pick their blocking by size), so an image
  would otherwise change in its last bits with the batch it shares. With a fixed slice width each sample sees the
  same arithmetic whatever ``batch`` is and whichever samples share its slice. ``eval_batch`` is therefore a
  setting (it is in the manifest), ``batch`` is not.
- **Labels** of class-conditional models: ``classes[s % len(classes)]`` (default ``classes = 0 .. C-1``).

Identical bytes hold for the same software and hardware (CPU and GPU kernels round differently).

Work is split across processes by ``torch.distributed`` (initialised from the environment that ``torchrun``,
SLURM-style launchers or ``accelerate`` set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). The missing seeds are cut into batches of ``batch``, and batch ``k`` goes to rank
``k % world_size``; after every round of batches the ranks exchange a small status (images written, or the error
that stopped them) over a gloo group, so a failing rank stops all of them with an error that names it. A rank
that dies without a word (killed, out of memory) breaks that exchange: the others stop, naming it when it ran on
the same host (its process is gone), else saying that the launcher's log names it. The output folder must be
shared by all ranks.

Output: ``OUT/manifest.json`` (the settings, the dpmsolve version, the seeds asked for, the runs), and per seed
``OUT/000123.png`` (``fmt="png"``) or per batch ``OUT/shard-000123-n64.npz`` (``fmt="npz"``: ``seeds``,
``images`` uint8 ``(N, H, W, C)``, ``samples`` float32 ``(N, C, H, W)`` as the solver returned them, and
``labels`` for class-conditional models). Every file is written to a temporary name and renamed into place
(``os.replace``), so a file with its final name is complete: a killed run restarted with the same command only
makes the seeds it finds missing.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .model import Denoiser, Prediction
from .solvers import Solver, get_solver

__all__ = ["generate", "GenerateResult", "RankFailure", "parse_seeds", "format_seeds", "noise", "solver_seed",
           "load_network", "read_manifest", "done_seeds", "MANIFEST", "FORMATS"]

MANIFEST = "manifest.json"
FORMATS = ("png", "npz")
SEED_LIMIT = 2**32          # CPU generators take 32-bit seeds (torch's mt19937): larger seeds would alias
_PNG = re.compile(r"^(\d{6,})\.png$")
_NPZ = re.compile(r"^shard-(\d{6,})-n(\d+)\.npz$")
_TMP = re.compile(r"^\..+\.\d+\.tmp$")


class RankFailure(RuntimeError):
    """A process of a distributed run failed or vanished; every rank stops with this error, which names it."""


@dataclass(frozen=True)
class GenerateResult:
    """What a :func:`generate` call did (the same on every rank).

    Attributes:
        out: the output folder.
        requested: seeds asked for.
        already_done: of those, found complete in ``out`` before this run.
        written: images written by this run (all ranks together).
        seconds: wall time of the sampling loop (after loading and setup).
        world_size: processes that shared the work.
    """

    out: Path
    requested: int
    already_done: int
    written: int
    seconds: float
    world_size: int

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------ seeds

def parse_seeds(seeds) -> list[int]:
    """Seeds as a list of distinct integers in ``[0, 2**32)``: from a string ``"0-9999"``, ``"1,5,10-19"``, an
    int, or an iterable of ints (order kept)."""
    if isinstance(seeds, str):
        out: list[int] = []
        for part in seeds.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"seeds {seeds!r}: {part!r} is not a seed or a range; write e.g. '0-9999' or "
                                 "'0,5,10-19' (non-negative integers).")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"seeds {seeds!r}: the range {part!r} is empty (its end is below its start).")
            if hi >= SEED_LIMIT:
                raise ValueError(f"seeds {seeds!r}: seeds must be below 2**32 = {SEED_LIMIT}, got {hi}.")
            out.extend(range(lo, hi + 1))
    elif isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        out = [int(seeds)]
    else:
        try:
            values = list(seeds)
        except TypeError:
            raise TypeError(f"seeds must be a string such as '0-9999', an int or a list of ints, got "
                            f"{type(seeds).__name__}.") from None
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"seeds must be integers, got {v!r} ({type(v).__name__}).")
            out.append(int(v))
    if not out:
        raise ValueError("seeds is empty: give at least one seed, e.g. '0-9999'.")
    bad = [s for s in out if not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(f"seeds must be in [0, 2**32), got {bad[0]}.")
    if len(set(out)) != len(out):
        seen, dup = set(), None
        for s in out:
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise ValueError(f"seed {dup} is given twice; each seed makes one image.")
    return out


def format_seeds(seeds: Sequence[int]) -> str:
    """The compact form of a seed list, ``"0-9999"`` or ``"1,5,10-19"`` (inverse of :func:`parse_seeds`)."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The start noise of ``seed``: float32 standard normal of ``shape``, drawn on the host."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)


def solver_seed(seed: int) -> int:
    """The seed of the per-sample generator that feeds a stochastic solver's noise for image ``seed`` (a fixed
    scrambling of ``seed``, so that the solver's noise is not the start noise again)."""
    digest = hashlib.sha256(f"dpmsolve-solver-noise:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---------------------------------------------------------------------------------------------- models

def load_network(spec: str) -> Denoiser:
    """The denoiser made by ``spec`` = ``"module:function"`` or ``"path/to/file.py:function"``: the function is
    called without arguments and must return a dpmsolve Denoiser (``dpmsolve.wrap_model(net, schedule, ...)``,
    with any guidance wrapper around it). The current folder is importable, as for ``python -m``."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ValueError(f"a network is given as 'module:function' or 'file.py:function' (a function returning a "
                         f"dpmsolve Denoiser), got {spec!r}.")
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ValueError(f"network {spec!r}: no file {target}.")
            module_name = f"_dpmsolve_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ValueError(f"network {spec!r}: cannot import {exc.name!r} ({exc}).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"network {spec!r}: {target} has no function {name!r}.")
    made = function()
    if not isinstance(made, Denoiser):
        raise ValueError(f"network {spec!r}: {name}() returned {type(made).__name__}, not a dpmsolve Denoiser; "
                         "return dpmsolve.wrap_model(net, schedule, prediction=...).")
    return made


@dataclass
class _Model:
    """What generate needs to know about the model, whatever it came from."""

    name: str                     # as recorded in the manifest
    identity: str                 # hash of the weights (and guidance), "" when there is no torch network
    schedule: Any
    shape: tuple[int, ...]
    classes: tuple[int, ...] | None      # labels cycled by seed; None: unconditional
    guidance: float | None
    make: Callable[[torch.Tensor | None], Denoiser]    # labels of exactly eval_batch rows (or None) -> denoiser
    zoo_name: str | None = None


def _zoo_model(name: str, guidance, classes, device) -> _Model:
    from . import zoo

    m = zoo.load(name)
    m.net.to(device)
    if m.num_classes == 0:
        if guidance is not None or classes is not None:
            raise ValueError(f"model {name} is unconditional: it takes no guidance and no classes.")
        return _Model(name, "", m.schedule, m.shape, None, None, lambda labels: m.denoiser, name)
    scale = 3.0 if guidance is None else _finite("guidance", guidance)
    if scale < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}.")
    classes = tuple(range(m.num_classes)) if classes is None else _classes(classes, m.num_classes, name)
    return _Model(name, "", m.schedule, m.shape, classes, scale,
                  lambda labels: zoo.guided(m, labels.to(device), scale), name)


def _classes(classes, num_classes: int, name: str) -> tuple[int, ...]:
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        classes = [classes]
    try:
        out = tuple(int(c) for c in classes)
    except (TypeError, ValueError):
        raise ValueError(f"classes must be class labels (integers), got {classes!r}.") from None
    if not out:
        raise ValueError("classes is empty: give at least one class label.")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class labels of {name} are 0 .. {num_classes - 1}, got {bad[0]}.")
    return out


def _finite(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _user_model(model, shape, guidance, classes, name) -> _Model:
    from .tuning.search import model_identity

    spec = model if isinstance(model, str) else None
    den = load_network(model) if spec is not None else model
    if shape is None:
        raise ValueError("shape is needed with a network of your own: the shape of one sample, e.g. (3, 32, 32) "
                         "(on the command line --shape 3,32,32).")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a tuple of positive integers, got {shape!r}.") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a tuple of positive integers, got {shape!r}.")
    if guidance is not None or classes is not None:
        raise ValueError("guidance and classes apply to the shipped class-conditional models; put a network of "
                         "your own in its guidance wrapper (dpmsolve.ClassifierFreeGuidance) in the function that "
                         "returns it.")
    label = spec if spec is not None else (name or type(den).__name__)
    return _Model(label, model_identity(den), den.schedule, shape, None, None, lambda labels: den)


class _PipelineNet(torch.nn.Module):
    """A diffusers UNet as a plain network ``(x, network time) -> output`` (learned-variance channels dropped)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.channels = int(unet.config.in_channels)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.unet(x, t).sample[:, :self.channels]


def _pipeline_model(path: Path, shape, guidance, classes, device) -> _Model:
    """An unconditional pixel-space diffusers pipeline saved on disk (a ``unet`` and a ``scheduler``): its UNet
    wrapped with the schedule, prediction type and time input of its scheduler config."""
    from .integrations.diffusers import _PREDICTION_TYPES, DPMSolveScheduler
    from .model import wrap_model
    from .sample_cli import _float32_default, _load_pipeline
    from .tuning.search import model_identity

    if shape is not None or guidance is not None or classes is not None:
        raise ValueError("a diffusers pipeline takes no shape, guidance or classes here (it is run unconditionally).")
    with _float32_default():
        pipe = _load_pipeline(path)
    extra = sorted(k for k, v in pipe.components.items() if v is not None and k not in ("unet", "scheduler"))
    if extra or getattr(pipe, "unet", None) is None:
        raise ValueError(f"generate runs unconditional pixel-space diffusers pipelines (a unet and a scheduler, e.g. "
                         f"DDPMPipeline); {type(pipe).__name__} in {path} also has {', '.join(extra) or 'no unet'}. "
                         "A latent or text-to-image pipeline needs its VAE decoder and prompt encoder run per seed, "
                         "which generate does not do: use dpmsolve sample for it, or pass --network with a function "
                         "that returns its denoiser.")
    scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config)
    net = _PipelineNet(pipe.unet).to(device).eval().requires_grad_(False)
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    den = wrap_model(net, scheduler.schedule, prediction=_PREDICTION_TYPES[scheduler.config.prediction_type],
                     time_input=lambda t: float(scheduler._network_time(np.asarray(t, dtype=np.float64))))
    return _Model(f"pipeline:{path.name}", model_identity(den), den.schedule, (net.channels, *size), None, None,
                  lambda labels: den)


class _Sliced(Denoiser):
    """The model evaluated on slices of exactly ``width`` samples (the last one padded with zeros): every sample
    sees the same arithmetic whatever the batch is (see the module docstring)."""

    def __init__(self, model: _Model, labels: torch.Tensor | None, width: int, n: int):
        self.width, self.parts = width, []
        for start in range(0, n, width):
            rows = min(width, n - start)
            part = None
            if labels is not None:
                part = labels[start:start + rows]
                part = torch.cat([part, part.new_full((width - rows,), int(part[0]))]) if rows < width else part
            self.parts.append((model.make(part), rows))
        self.inner = self.parts[0][0]
        self.schedule = self.inner.schedule

    def network_time(self, t):
        return self.inner.network_time(t)

    def __call__(self, x, t, **model_kwargs):
        if len(self.parts) == 1 and x.shape[0] == self.width:
            return self.inner(x, t, **model_kwargs)
        x0s, epss, start = [], [], 0
        for den, rows in self.parts:
            xs = x[start:start + rows]
            if rows < self.width:
                xs = torch.cat([xs, xs.new_zeros((self.width - rows, *xs.shape[1:]))])
            pred = den(xs, t, **model_kwargs)
            x0s.append(pred.x0[:rows])
            epss.append(pred.eps[:rows])
            start += rows
        return Prediction(torch.cat(x0s), torch.cat(epss))


class _PerSample(Solver):
    """A solver run with one state (and one generator) per sample: each sample's noise comes from its own
    generator and its update is computed on its own, so it does not depend on the other samples of the batch.
    ``dp.sample`` drives it like any solver; the model still sees the whole batch in one call."""

    adaptive = False

    def __init__(self, inner: Solver, generators: Sequence[torch.Generator]):
        self.inner, self.generators = inner, list(generators)
        self.integrates = inner.integrates

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def order(self) -> int:
        return self.inner.order

    def init(self, schedule, ts, x, generator=None):
        if x.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators for a batch of {x.shape[0]}.")
        return tuple(self.inner.init(schedule, ts, x[i:i + 1], g) for i, g in enumerate(self.generators))

    def ask(self, states):
        asked = [self.inner.ask(s) for s in states]
        return torch.cat([a[0] for a in asked]), asked[0][1]

    def tell(self, states, pred: Prediction):
        return tuple(self.inner.tell(s, Prediction(pred.x0[i:i + 1], pred.eps[i:i + 1]))
                     for i, s in enumerate(states))

    def done(self, states) -> bool:
        return self.inner.done(states[0])

    def step_completed(self, before, after) -> bool:
        return self.inner.step_completed(before[0], after[0])

    def current(self, states):
        now = [self.inner.current(s) for s in states]
        return torch.cat([c[0] for c in now]), now[0][1]

    def expected_nfe(self, steps: int, ends_at_zero: bool = False):
        return self.inner.expected_nfe(steps, ends_at_zero)

    def grid(self, *args, **kwargs):
        return self.inner.grid(*args, **kwargs)

    def __repr__(self) -> str:
        return f"PerSample({self.inner!r})"


def _solver(name: str, order, model: _Model) -> tuple[Solver, dict]:
    """The solver object for ``name`` (order 2 where the solver takes an order and none is given; DPM-Solver-v3
    with the statistics shipped for a zoo model) and the options to record."""
    options: dict[str, Any] = {}
    if name == "dpmsolver-v3":
        if model.zoo_name is None:
            raise ValueError("dpmsolver-v3 needs the model's statistics (dpmsolve.ems.compute); generate runs it "
                             "for the shipped models only. Use another solver, or sample with dp.sample.")
        from . import zoo
        from .solvers import DPMSolverV3

        options = {"order": int(order)} if order is not None else DPMSolverV3.recommended(model.guidance)
        solver = get_solver(name, **options, ems=zoo.statistics(model.zoo_name, model.guidance))
        return solver, options
    if order is not None:
        options = {"order": int(order)}
        solver = get_solver(name, **options)
    else:
        try:
            solver, options = get_solver(name, order=2), {"order": 2}
        except (TypeError, ValueError):
            solver = get_solver(name)
    if solver.adaptive:
        raise ValueError(f"solver {name!r} chooses its steps from the error of the whole batch, so an image would "
                         "depend on the images beside it; use a fixed-grid solver.")
    return solver, options


# ------------------------------------------------------------------------------------------------ files

def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def _to_uint8(x: torch.Tensor, upscale: int) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> uint8 ``(N, H * upscale, W * upscale, C)`` (nearest neighbours)."""
    images = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    images = images.permute(0, 2, 3, 1)
    if upscale > 1:
        images = images.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return images.contiguous().numpy()


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    pixels = image[..., 0] if image.shape[-1] == 1 else image
    _atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def _write_batch(out: Path, fmt: str, seeds: list[int], x: torch.Tensor, labels, upscale: int) -> None:
    images = _to_uint8(x, upscale)
    if fmt == "png":
        for seed, image in zip(seeds, images):
            _write_png(out / _png_name(seed), image)
        return
    arrays = {"seeds": np.asarray(seeds, dtype=np.int64), "images": images,
              "samples": x.detach().float().cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    _atomic_write(out / f"shard-{seeds[0]:06d}-n{len(seeds)}.npz", lambda f: np.savez(f, **arrays))


def _our_files(out: Path) -> list[Path]:
    """The image files, shards, manifest and temporary files of generate in ``out``."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.is_file() and (_PNG.match(p.name) or _NPZ.match(p.name)
                                                         or _TMP.match(p.name) or p.name == MANIFEST)]


def done_seeds(out, fmt: str | None = None) -> set[int]:
    """The seeds whose image is complete in ``out`` (files with their final names; temporary files never
    count). ``fmt``: ``"png"``, ``"npz"`` or None (both)."""
    out = Path(out)
    found: set[int] = set()
    if not out.is_dir():
        return found
    for entry in os.scandir(out):
        if fmt in (None, "png") and (m := _PNG.match(entry.name)) and entry.name == _png_name(int(m.group(1))):
            found.add(int(m.group(1)))
        elif fmt in (None, "npz") and _NPZ.match(entry.name):
            try:
                with np.load(entry.path) as shard:
                    found.update(int(s) for s in shard["seeds"])
            except Exception as exc:  # noqa: BLE001 - any unreadable shard is reported the same way
                raise ValueError(f"{entry.path} is damaged ({type(exc).__name__}: {exc}); delete it and run again "
                                 "(its seeds are then made again).") from None
    return found


def read_manifest(out) -> dict | None:
    """The manifest of the generate output folder ``out`` (None when there is none)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable generate manifest ({exc}); pass overwrite (--overwrite) to "
                         "start over in this folder.") from None
    if not isinstance(data, dict) or data.get("format") != "dpmsolve-generate" or "settings" not in data:
        raise ValueError(f"{path} is not a dpmsolve generate manifest; use another output folder, or pass "
                         "overwrite (--overwrite) to replace it.")
    return data


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def _prepare_folder(out: Path, settings: dict, seeds: list[int], overwrite: bool, fmt: str) -> set[int]:
    """Rank 0: check (or clear) the folder against the settings, write the manifest, return the seeds done."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = None if overwrite else read_manifest(out)
    if overwrite:
        for path in _our_files(out):
            path.unlink(missing_ok=True)
    elif manifest is not None:
        diff = _differences(manifest["settings"], settings)
        if diff:
            raise ValueError(f"{out} holds images made with other settings ({'; '.join(diff)}); use another output "
                             "folder, or pass overwrite (--overwrite) to delete them and start over.")
    else:
        existing = [p for p in _our_files(out) if not _TMP.match(p.name)]
        if existing:
            raise ValueError(f"{out} holds {len(existing)} image file(s) but no {MANIFEST}, so their settings are "
                             "unknown; use another output folder, or pass overwrite (--overwrite) to delete them.")
    for path in out.iterdir():             # left by a killed run: never taken for done
        if _TMP.match(path.name):
            path.unlink(missing_ok=True)
    done = done_seeds(out, fmt)
    runs = list(manifest.get("runs", [])) if manifest else []
    data = {"format": "dpmsolve-generate", "version": 1, "settings": settings, "seeds": format_seeds(seeds),
            "runs": runs}
    _write_manifest(out, data)
    return done


def _write_manifest(out: Path, data: dict) -> None:
    text = json.dumps(data, indent=1) + "\n"
    _atomic_write(out / MANIFEST, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------------ distributed

class _Ranks:
    """The processes sharing the work: a process group (or none) and a gloo group for the status exchange."""

    def __init__(self, group=None, timeout: float = 1800.0, device=None):
        self.dist, self.owned, self.group, self.health = None, False, None, None
        self.rank, self.size, self.peers = 0, 1, [(socket.gethostname(), os.getpid())]
        import torch.distributed as dist

        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if group is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed.")
            cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
            self.owned, group = True, dist.group.WORLD
        if group is None:
            return
        self.dist, self.group = dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if dist.get_backend(group) == "gloo":
            self.health = group
        else:   # the status exchange carries Python objects: a CPU (gloo) group over the same ranks
            self.health = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                         timeout=datetime.timedelta(seconds=timeout))
        self.src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
        self.peers = self.gather((socket.gethostname(), os.getpid()))

    def device(self, device) -> str:
        """The device of this rank: ``device`` as given, else ``cuda:LOCAL_RANK`` when CUDA is there, else cpu."""
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda" and dev.index is None and self.size > 1:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.empty(0, device=dev)      # fails here, clearly, when the device is not usable
            return str(dev)
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if self.size > 1 else "cuda"
        return "cpu"

    def gather(self, value) -> list:
        """``value`` of every rank (a list indexed by rank); a :class:`RankFailure` naming a rank that vanished."""
        if self.dist is None:
            return [value]
        out = [None] * self.size
        try:
            self.dist.all_gather_object(out, value, group=self.health)
        except RuntimeError as exc:
            raise self._lost(exc) from None
        return out

    def share(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.dist is None:
            return value
        box = [value]
        try:
            self.dist.broadcast_object_list(box, src=self.src, group=self.health)
        except RuntimeError as exc:
            raise self._lost(exc) from None
        return box[0]

    def _lost(self, exc: BaseException) -> RankFailure:
        """The error for a status exchange that broke: a rank died or stopped answering."""
        host = socket.gethostname()
        deadline = time.monotonic() + 5.0
        dead: list[int] = []
        while True:
            dead = [r for r, (h, pid) in enumerate(self.peers)
                    if r != self.rank and h == host and not _running(pid)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if dead:
            names = ", ".join(f"rank {r} (pid {self.peers[r][1]})" for r in dead)
            return RankFailure(f"{names} of {self.size} died without a word (killed, or out of memory?), so rank "
                               f"{self.rank} stopped too. The images written so far are complete: run the same "
                               "command again to make the rest.")
        return RankFailure(f"rank {self.rank} of {self.size} lost contact with the other ranks ({reason}); one of "
                           "them died or stopped answering on another host (the launcher's log names it). The "
                           "images written so far are complete: run the same command again to make the rest.")

    def close(self) -> None:
        if self.owned and self.dist is not None and self.dist.is_initialized():
            try:
                self.dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may refuse to be torn down; the process ends anyway
                pass


def _running(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs: gone and zombie processes do not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------- main

def generate(model, seeds, out, *, solver: str = "dpmsolver++", order: int | None = None, steps: int = 20,
             grid: str = "logSNR", final: str = "zero", plan=None, guidance: float | None = None,
             classes=None, shape: Sequence[int] | None = None, batch: int = 64, eval_batch: int = 32,
             fmt: str = "png", upscale: int = 1, device=None, overwrite: bool = False,
             progress: bool | None = None, group=None, timeout: float = 1800.0,
             name: str | None = None) -> GenerateResult:
    """Make one image per seed in the folder ``out``, splitting the seeds over the processes of a
    ``torch.distributed`` run (``torchrun``): the images are the same whatever the number of processes and the
    batch size; a run restarted with the same arguments makes only the seeds that are missing.

    Args:
        model: a shipped model (``"digits"``, ``"digits-flow"``, ``"patches"``), a network of your own as
            ``"module:function"`` / ``"file.py:function"`` (a function without arguments returning a dpmsolve
            Denoiser; see :func:`load_network`), a Denoiser object, or the folder of an unconditional pixel-space
            diffusers pipeline saved with ``save_pretrained`` (a ``unet`` and a ``scheduler``, e.g.
            ``DDPMPipeline``; latent and text-to-image pipelines are refused: their VAE decoder and prompts would
            have to run per seed).
        seeds: ``"0-9999"``, ``"0,5,10-19"``, an int or a list of ints in ``[0, 2**32)``; one image each.
        out: the output folder (shared by all ranks).
        solver, order, steps, grid, final: the solver (a registry name; order 2 by default where it has one),
            grid intervals, grid name, and where the grid ends (``"zero"``: sigma = 0, ``"min"``: the schedule's
            t_min). DPM-Solver-v3 uses the statistics shipped with a zoo model. Solvers that pick their own steps
            (adaptive) are refused: their steps would depend on the batch.
        plan: a tuned :class:`~dpmsolve.Plan` or its file, instead of solver / order / steps / grid / final.
        guidance: classifier-free guidance scale of a class-conditional zoo model (default 3).
        classes: class labels of a class-conditional zoo model; image ``s`` gets ``classes[s % len(classes)]``
            (default: all classes).
        shape: the shape of one sample, for a network of your own.
        batch: samples per rank sampled together (memory; does not change the images).
        eval_batch: samples per network call (a setting: it fixes the rounding, see the module docstring).
        fmt: ``"png"`` (one file per seed, named by seed) or ``"npz"`` (one shard per batch).
        upscale: each pixel becomes ``upscale x upscale`` pixels in the images (nearest neighbours).
        device: torch device (default ``cuda:LOCAL_RANK`` where CUDA is available, else cpu).
        overwrite: delete what an earlier run with other settings left in ``out`` (its images, shards and
            manifest) and start over; without it such a folder is refused.
        progress: a tqdm bar on rank 0 (None: only on a terminal).
        group: the process group to split over (default: the default group when torch.distributed is
            initialised, else one initialised from the environment when ``WORLD_SIZE`` > 1, else one process).
        timeout: seconds a rank waits for the others at a status exchange before giving up.
        name: the model's name in the manifest when ``model`` is a Denoiser object.

    Returns:
        a :class:`GenerateResult` (the same on every rank).

    Raises:
        ValueError: bad arguments, or ``out`` holds images made with other settings (without ``overwrite``).
        RankFailure: another rank failed or died (every rank stops; the message names it).
    """
    from . import __version__
    from .sampling import sample
    from .tuning.plan import Plan

    seeds = parse_seeds(seeds)
    for label, value, low in (("steps", steps, 1), ("batch", batch, 1), ("eval_batch", eval_batch, 1),
                              ("upscale", upscale, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}.")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if final not in ("zero", "min"):
        raise ValueError(f"final must be 'zero' or 'min', got {final!r}.")
    if fmt == "png":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError("writing PNG images needs Pillow (pip install pillow); or use fmt='npz'.",
                                      name="PIL") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: is a file, not a folder.")

    ranks = _Ranks(group, timeout, device)
    try:
        try:
            device = ranks.device(device)
            if isinstance(model, (str, Path)) and Path(model).is_dir():
                spec = _pipeline_model(Path(model), shape, guidance, classes, device)
            elif isinstance(model, str) and ":" not in model:
                from . import zoo

                if model not in zoo.MODELS:
                    raise ValueError(f"model {model!r} is not shipped (shipped: {', '.join(zoo.MODELS)}); give a "
                                     "network of your own as 'module:function'.")
                spec = _zoo_model(model, guidance, classes, device)
            elif isinstance(model, (str, Denoiser)):
                spec = _user_model(model, shape, guidance, classes, name)
            else:
                raise TypeError(f"model must be a shipped model's name, 'module:function' or a dpmsolve Denoiser, "
                                f"got {type(model).__name__}.")
            if spec.identity == "" and spec.zoo_name is not None:
                from .tuning.search import model_identity

                spec.identity = model_identity(_Sliced(spec, _labels(spec, seeds[:1]), 1, 1))

            if plan is not None:
                plan = plan if isinstance(plan, Plan) else Plan.load(plan)
                plan.check(spec.schedule, spec.shape, spec.identity or None)
                ems = None
                if plan.uses_ems:           # v3 steps: the statistics shipped with a zoo model
                    if spec.zoo_name is None:
                        raise ValueError("This plan has DPM-Solver-v3 steps, which need the model's statistics; "
                                         "generate has them for the shipped models only: sample with dp.sample(..., "
                                         "ems=...) instead.")
                    from . import zoo

                    ems = zoo.statistics(spec.zoo_name, spec.guidance)
                base, ts, to_zero = plan.solver(ems), np.asarray(plan.ts), plan.denoise_to_zero
                method = {"plan": {**plan.to_dict(), "info": {}}}
                grid_args = {"grid": ts, "denoise_to_zero": to_zero}
            else:
                if not isinstance(solver, str):
                    raise TypeError(f"solver must be a registry name such as 'dpmsolver++', got "
                                    f"{type(solver).__name__}.")
                base, options = _solver(solver, order, spec)
                method = {"solver": solver, "options": options, "steps": int(steps), "grid": grid, "final": final}
                grid_args = {"steps": int(steps), "grid": grid, "t_end": 0.0 if final == "zero" else None}
                base.grid(spec.schedule, int(steps), grid, None, grid_args["t_end"])    # a bad grid fails here

            settings = {"model": spec.name, "model_id": spec.identity, "shape": list(spec.shape),
                        "guidance": spec.guidance, "classes": None if spec.classes is None else list(spec.classes),
                        **method, "stochastic": bool(base.stochastic), "eval_batch": int(eval_batch), "format": fmt,
                        "upscale": int(upscale), "dpmsolve": __version__}
            settings = json.loads(json.dumps(settings, default=float))
            local = None
        except Exception as exc:  # noqa: BLE001 - shared below, so no rank waits for one that gave up
            if ranks.size == 1:
                raise
            local = exc
        errors = ranks.gather(None if local is None else _describe(local))
        if local is not None:
            raise local
        failed = [(i, e) for i, e in enumerate(errors) if e is not None]
        if failed:
            raise RankFailure(f"rank {failed[0][0]} of {ranks.size} failed while loading: {failed[0][1]}")

        # Rank 0 checks the folder and finds what is done; every rank gets the same list of seeds to make.
        prepared = None
        if ranks.rank == 0:
            try:
                prepared = ("ok", sorted(_prepare_folder(out, settings, seeds, overwrite, fmt)))
            except (ValueError, OSError) as exc:
                prepared = ("error", exc)
        prepared = ranks.share(prepared)
        if prepared[0] == "error":
            raise prepared[1]
        done = set(prepared[1])
        todo = [s for s in seeds if s not in done]
        already = len(seeds) - len(todo)
        if not todo:
            return GenerateResult(out, len(seeds), already, 0, 0.0, ranks.size)

        batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        rounds = math.ceil(len(batches) / ranks.size)
        bar = None
        if ranks.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"dpmsolve generate ({ranks.size} process"
                                            f"{'es' if ranks.size > 1 else ''})", unit="img", smoothing=0.1,
                       disable=None if progress is None else not progress, leave=False)
        written, start = 0, time.perf_counter()
        try:
            for r in range(rounds):
                k = r * ranks.size + ranks.rank
                made, error = 0, None
                if k < len(batches):
                    try:
                        _run_batch(sample, spec, base, grid_args, batches[k], eval_batch, device, out, fmt, upscale)
                        made = len(batches[k])
                    except Exception as exc:  # noqa: BLE001 - reported to every rank below, then raised
                        if ranks.size == 1:
                            raise
                        error = _describe(exc)
                statuses = ranks.gather((made, error))
                failed = [(i, e) for i, (_, e) in enumerate(statuses) if e is not None]
                if failed:
                    who = ", ".join(str(i) for i, _ in failed)
                    raise RankFailure(f"rank{'s' if len(failed) > 1 else ''} {who} of {ranks.size} failed: "
                                      f"{failed[0][1]} (all ranks stopped; the images written so far are complete: "
                                      "fix the cause and run the same command again to make the rest)")
                count = sum(n for n, _ in statuses)
                written += count
                if bar is not None:
                    bar.update(count)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        if ranks.rank == 0:
            manifest = read_manifest(out) or {"format": "dpmsolve-generate", "version": 1, "settings": settings,
                                              "seeds": format_seeds(seeds), "runs": []}
            manifest["runs"] = list(manifest.get("runs", [])) + [{
                "seeds": format_seeds(seeds), "already_done": already, "written": written,
                "seconds": round(seconds, 3), "images_per_second": round(written / max(seconds, 1e-9), 3),
                "processes": ranks.size, "batch": int(batch), "device": device, "torch": torch.__version__,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}]
            _write_manifest(out, manifest)
        ranks.gather(None)          # nobody leaves before the manifest is final
        return GenerateResult(out, len(seeds), already, written, seconds, ranks.size)
    finally:
        ranks.close()


def _labels(spec: _Model, seeds: Sequence[int]) -> torch.Tensor | None:
    if spec.classes is None:
        return None
    return torch.tensor([spec.classes[s % len(spec.classes)] for s in seeds], dtype=torch.long)


def _run_batch(sample, spec: _Model, base: Solver, grid_args: dict, seeds: list[int], eval_batch: int, device,
               out: Path, fmt: str, upscale: int) -> None:
    labels = _labels(spec, seeds)
    x = torch.stack([noise(s, spec.shape) for s in seeds]).to(device)
    den = _Sliced(spec, labels, eval_batch, len(seeds))
    solver = base
    if base.stochastic:
        dev = torch.device(device)
        solver = _PerSample(base, [torch.Generator(device=dev).manual_seed(solver_seed(s)) for s in seeds])
    result = sample(den, x, solver, progress=False, **grid_args)
    _write_batch(out, fmt, seeds, result.x, labels, upscale)
