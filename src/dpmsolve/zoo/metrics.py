"""Cheap sample-quality metrics for the zoo models.

Digits, built on the shipped classifier (:func:`dpmsolve.zoo.classifier`):

- :func:`class_accuracy`: the fraction of images the classifier assigns to their intended labels;
- :func:`digits_fd`: a Frechet distance (as FID, with the classifier's penultimate-layer features instead of
  Inception's) between the images and the real digits. By default the reference statistics are those of the
  real *training* digits (``digits_data("train")``), so the held-out real digits give a fair "real" baseline.

FD estimates are biased upward for small sample sizes: compare numbers computed from equally many images.

Patches, with no network at all (nothing can be downloaded, and a feature network trained here on two photos
would mostly measure its own blind spots):

- :func:`patches_distance`: a multi-scale sliced Wasserstein distance (SWD) between the images and real patches
  (default: 2000 seeded random crops of the *training* region, ``reference_patches()``), as in ProGAN's SWD
  (Karras et al. 2018) but on whole patches. Why SWD: it is a true distance between distributions (zero iff the
  projected laws agree), it needs no density estimate or covariance of 3072-dim pixels from a few hundred
  samples (FD on raw pixels would be rank-deficient), it is cheap (a matrix product and a sort), and it
  compares sets of different sizes through quantiles. Why multi-scale: a random direction in pixel space sees
  mostly the low frequencies of natural images (their spectrum falls as 1/f^2), so pixels alone cannot tell
  a blurry or noisy sample from a sharp one; the two Laplacian-pyramid detail levels (32x32 and 16x16) see
  edges and texture, the 8x8 base sees colour and layout. The value is the mean of the three levels' SWDs
  (each the RMS over 256 fixed seeded unit directions of the 1-D Wasserstein-2 distance of the projections),
  each divided by the RMS pixel value of the reference's level, so that texture counts as much as colour.
  The directions come from a fixed seed, so the metric is deterministic. Like FD it is biased upward for small
  samples: compare equal numbers of images (e.g. samples vs :func:`dpmsolve.zoo.train.patches_data` held-out
  patches vs training patches vs :func:`blurred_noise`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["blurred_digits", "blurred_noise", "class_accuracy", "digits_fd", "features", "frechet_distance", "patches_distance",
           "reference_patches", "reference_stats", "sliced_wasserstein"]


@lru_cache(maxsize=1)
def _classifier():
    from . import classifier

    return classifier()


def _images(images) -> torch.Tensor:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1:] != (1, 8, 8):
        raise ValueError(f"images must have shape (B, 1, 8, 8), got {tuple(x.shape)}.")
    return x.clamp(-1, 1)


@torch.no_grad()
def features(images) -> np.ndarray:
    """The classifier's penultimate-layer features of ``images`` (``(B, 1, 8, 8)`` in ``[-1, 1]``), float64."""
    return _classifier().features(_images(images)).double().numpy()


@torch.no_grad()
def class_accuracy(images, labels) -> float:
    """The fraction of ``images`` that the shipped classifier assigns to ``labels``."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    pred = _classifier()(_images(images)).argmax(1)
    if pred.shape != labels.shape:
        raise ValueError(f"{len(pred)} images but {len(labels)} labels.")
    return float((pred == labels).float().mean())


def blurred_digits(n: int, seed: int = 0) -> torch.Tensor:
    """The digits' "structureless" baseline: Gaussian noise blurred by a 3x3 binomial kernel, clamped to [-1, 1]."""
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(noise, kernel, padding=1).clamp(-1, 1)


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


@lru_cache(maxsize=1)
def _train_stats() -> tuple[np.ndarray, np.ndarray]:
    from .train import digits_data

    return _stats(features(digits_data("train")[0]))


def reference_stats(reference=None) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, covariance)`` of the features of ``reference`` images (default: the real training digits)."""
    if reference is None:
        return _train_stats()
    return _stats(features(reference))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (scipy.linalg.sqrtm; imaginary round-off dropped)."""
    from scipy import linalg

    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)))


def digits_fd(images, reference=None) -> float:
    """Frechet distance between classifier features of ``images`` and of ``reference`` (default: real training digits)."""
    mu1, cov1 = _stats(features(images))
    mu2, cov2 = reference_stats(reference)
    return frechet_distance(mu1, cov1, mu2, cov2)


# --- patches --------------------------------------------------------------------------------------------------

SWD_PROJECTIONS = 256
SWD_SEED = 0


def sliced_wasserstein(a, b, projections: int = SWD_PROJECTIONS, seed: int = SWD_SEED) -> float:
    """Sliced Wasserstein-2 distance between two point sets ``(n, d)`` and ``(m, d)`` (float64): the RMS over
    ``projections`` unit directions (drawn from ``seed``, so deterministic) of the 1-D W2 distance between the
    projected samples, computed from ``max(n, m)`` matching quantiles."""
    a, b = _flat(a), _flat(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sets have different dimensions: {a.shape[1]} and {b.shape[1]}.")
    w = _directions(a.shape[1], projections, seed)
    return _swd_sorted((a @ w).sort(dim=0).values, (b @ w).sort(dim=0).values)


def _flat(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach().double().cpu()
    return x.reshape(len(x), -1)


@lru_cache(maxsize=16)
def _directions(dim: int, projections: int, seed: int) -> torch.Tensor:
    w = torch.randn(dim, projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w / w.norm(dim=0, keepdim=True)


def _swd_sorted(pa: torch.Tensor, pb: torch.Tensor) -> float:
    m = max(len(pa), len(pb))
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    return float(((_quantiles(pa, q) - _quantiles(pb, q)) ** 2).mean().sqrt())


def _quantiles(sorted_x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles of each column of an already sorted ``(n, p)`` sample at levels ``q`` (linear interpolation)."""
    n = len(sorted_x)
    pos = (q * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).unsqueeze(1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def _patch_images(images) -> torch.Tensor:
    x = torch.as_tensor(images).detach().double().cpu()
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 4 or x.shape[3] % 4:
        raise ValueError(f"images must have shape (B, 3, H, W) with H, W divisible by 4, got {tuple(x.shape)}.")
    return x.clamp(-1, 1)


def _pyramid(x: torch.Tensor) -> list[torch.Tensor]:
    """Two Laplacian detail levels (full and half resolution) and the quarter-resolution base of ``x``."""
    from torch.nn.functional import avg_pool2d, interpolate

    levels = []
    for _ in range(2):
        down = avg_pool2d(x, 2)
        levels.append(x - interpolate(down, scale_factor=2, mode="nearest"))
        x = down
    return levels + [x]


def patches_distance(images, reference=None) -> float:
    """Multi-scale sliced Wasserstein distance between ``images`` (``(B, 3, 32, 32)`` in ``[-1, 1]``) and real
    patches (default :func:`reference_patches`): the mean over the pyramid levels of :func:`sliced_wasserstein`,
    each divided by the reference level's RMS (see the module docstring for which distance and why). 0 for
    identical sets; lower is better."""
    ref = _reference_projections() if reference is None else _level_projections(_patch_images(reference))
    out = _level_projections(_patch_images(images))
    return float(np.mean([_swd_sorted(a, b) / scale for (a, _), (b, scale) in zip(out, ref)]))


def _level_projections(x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Per pyramid level: the sorted projections on that level's fixed directions, and the level's RMS."""
    out = []
    for k, level in enumerate(_pyramid(x)):
        flat = level.reshape(len(level), -1)
        w = _directions(flat.shape[1], SWD_PROJECTIONS, SWD_SEED + k)
        out.append(((flat @ w).sort(dim=0).values, float(flat.pow(2).mean().sqrt())))
    return out


@lru_cache(maxsize=1)
def _reference_projections():
    return _level_projections(_patch_images(reference_patches()))


@lru_cache(maxsize=1)
def reference_patches(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random 32x32 crops (no flips) of the training region of the photos: the default reference."""
    from .train import random_patches

    return random_patches(n, generator=torch.Generator().manual_seed(seed), flip=False)


def blurred_noise(n: int, seed: int = 0, blur: float = 2.0) -> torch.Tensor:
    """A "structureless" baseline: Gaussian noise blurred by a Gaussian of ``blur`` pixels, then given the
    per-channel mean and standard deviation of the reference patches, ``(n, 3, 32, 32)`` clamped to ``[-1, 1]``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, 32 + 8 * int(blur), 32 + 8 * int(blur), generator=g, dtype=torch.float32)
    r = 4 * int(blur)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / blur) ** 2)
    k = (k / k.sum())
    kernel = (k[:, None] * k[None, :]).expand(3, 1, -1, -1).contiguous()
    x = torch.nn.functional.conv2d(noise, kernel, groups=3)[..., :32, :32]
    ref = reference_patches()
    mean, std = ref.mean((0, 2, 3)).view(1, 3, 1, 1), ref.std((0, 2, 3)).view(1, 3, 1, 1)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return (mean + std * x).clamp(-1, 1)
