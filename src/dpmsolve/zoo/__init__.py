"""Small trained diffusion models shipped with dpmsolve, loaded offline.

```python
import torch, dpmsolve as dp
from dpmsolve import zoo
m = zoo.load("digits")                      # net (eval, float32), schedule, denoiser, ...
labels = torch.arange(10).repeat(2)
x = torch.randn(len(labels), *m.shape, generator=torch.Generator().manual_seed(0))
sol = dp.sample(zoo.guided(m, labels, scale=3.0), x, "dpmsolver++", steps=20)
```

``digits`` is a class-conditional DDPM (noise prediction, ``DiscreteVP.linear()``, 1000 train steps) on
scikit-learn's 8x8 digits scaled to ``[-1, 1]``; label ``10`` is the null class for classifier-free guidance.
``digits-flow`` is the same network and data trained as a rectified flow (``RectifiedFlow()``, velocity
``eps - x0`` prediction, network time input ``1000 t``).
``patches`` is an unconditional model of 32x32 RGB patches of scikit-learn's two sample photos (``CosineVP()``
schedule, v-prediction, network time input ``1000 t``); score its samples with
:func:`dpmsolve.zoo.metrics.patches_distance`.
``plan(name, nfe, guidance)`` gives the tuned sampling plan shipped for a model (:mod:`dpmsolve.zoo.plans`);
``statistics(name, guidance)`` gives the DPM-Solver-v3 statistics shipped for a model (:mod:`dpmsolve.zoo.ems`).
``classifier()`` is a small CNN classifier of the same digits, used by :mod:`dpmsolve.zoo.metrics`
(``class_accuracy``, ``digits_fd``).
Reproduce the weights with ``python -m dpmsolve.zoo.train NAME`` (NAME: ``digits``, ``digits-flow``,
``patches``, ``digits-classifier``; see :mod:`dpmsolve.zoo.train`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..model import ClassifierFreeGuidance, Denoiser, wrap_model
from ..schedules import CosineVP, DiscreteVP, RectifiedFlow, Schedule

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = ("digits", "digits-flow", "patches")
CLASSIFIERS = ("digits-classifier",)

__all__ = ["CLASSIFIERS", "MODELS", "ZooModel", "classifier", "guided", "load", "plan", "statistics", "statistics_path",
           "weights_hash", "weights_path"]


@dataclass(frozen=True)
class ZooModel:
    """A loaded zoo model: the network, its schedule and a ready denoiser (``num_classes`` 0 and
    ``null_class`` -1 for an unconditional model)."""

    name: str
    net: torch.nn.Module
    schedule: Schedule
    denoiser: Denoiser
    num_classes: int
    null_class: int
    shape: tuple[int, ...]
    metadata: dict = field(repr=False)


def weights_path(name: str) -> Path:
    """The packaged ``.safetensors`` file of model ``name``."""
    if name not in MODELS + CLASSIFIERS:
        raise ValueError(f"Unknown zoo model {name!r}; valid names are: {', '.join(MODELS + CLASSIFIERS)}.")
    return WEIGHTS_DIR / f"{name}.safetensors"


def _schedule(meta: dict) -> Schedule:
    if meta["schedule"] == "DiscreteVP.linear(n=1000, beta_start=1e-4, beta_end=0.02)":
        return DiscreteVP.linear(1000, 1e-4, 0.02)
    if meta["schedule"] == "RectifiedFlow()":
        return RectifiedFlow()
    if meta["schedule"] == "CosineVP()":
        return CosineVP()
    raise ValueError(f"Unsupported zoo schedule {meta['schedule']!r}.")


def _load_net(name: str) -> tuple[torch.nn.Module, dict]:
    """The eval-mode float32 network stored for ``name`` and its metadata (offline, caller's RNG untouched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .nets import ARCHITECTURES

    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"The weights of zoo model {name!r} are missing at {path}; "
                                f"recreate them with `python -m dpmsolve.zoo.train {name}`.")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        net = ARCHITECTURES[meta["architecture"]](**json.loads(meta["net_kwargs"])).float()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.float().eval().requires_grad_(False), meta


def load(name: str) -> ZooModel:
    """Load a shipped model by name (offline, deterministic): returns a :class:`ZooModel`."""
    if name not in MODELS:
        raise ValueError(f"Unknown zoo model {name!r}; valid names are: {', '.join(MODELS)}.")
    net, meta = _load_net(name)
    schedule = _schedule(meta)
    denoiser = wrap_model(net, schedule, prediction=meta["prediction"], time_input=meta["time_input"])
    return ZooModel(name=name, net=net, schedule=schedule, denoiser=denoiser,
                    num_classes=int(meta["num_classes"]), null_class=int(meta["null_class"]),
                    shape=tuple(json.loads(meta["shape"])), metadata=meta)


@lru_cache(maxsize=None)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_hash(name: str) -> str:
    """The first 16 hex digits of the SHA-256 of zoo model ``name``'s weight file (identifies the weights in
    cached references and shipped statistics)."""
    path = Path(weights_path(name))
    st = path.stat()
    return _file_hash(str(path), st.st_mtime_ns, st.st_size)


def classifier(name: str = "digits-classifier") -> torch.nn.Module:
    """The shipped digits classifier (eval mode, float32): logits of ``(B, 1, 8, 8)`` images in ``[-1, 1]``;
    ``.features(x)`` gives its penultimate-layer features. Offline and deterministic like :func:`load`."""
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown zoo classifier {name!r}; valid names are: {', '.join(CLASSIFIERS)}.")
    return _load_net(name)[0]


def guided(model: ZooModel, labels, scale: float = 3.0, interval: tuple[float, float] | None = None
           ) -> ClassifierFreeGuidance:
    """A classifier-free-guided denoiser for ``labels`` (one per sample; ``scale`` 1 = plain conditional);
    ``interval=(sigma_lo, sigma_hi)`` guides only at those VE noise levels sigma/alpha (see
    :class:`~dpmsolve.ClassifierFreeGuidance`)."""
    if model.num_classes == 0:
        raise ValueError(f"Zoo model {model.name!r} is unconditional: use model.denoiser, not guided().")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels must be in [0, {model.num_classes - 1}].")
    null = torch.full_like(labels, model.null_class)
    return ClassifierFreeGuidance(model.denoiser, scale, cond={"y": labels}, uncond={"y": null}, interval=interval)


def statistics(name: str, guidance: float | None = 3.0):
    """The DPM-Solver-v3 statistics shipped for zoo model ``name`` at ``guidance`` (see :mod:`dpmsolve.zoo.ems`)."""
    from .ems import statistics as shipped

    return shipped(name, guidance)


def plan(name: str, nfe: int, guidance: float | None = 3.0):
    """The tuned sampling plan shipped for zoo model ``name`` at ``nfe`` evaluations (see :mod:`dpmsolve.zoo.plans`)."""
    from .plans import plan as shipped

    return shipped(name, nfe, guidance)


def statistics_path(name: str, guidance: float | None = 3.0) -> Path:
    """Where the statistics of ``name`` at ``guidance`` ship (see :mod:`dpmsolve.zoo.ems`)."""
    from .ems import statistics_path as where

    return where(name, guidance)
