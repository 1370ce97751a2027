"""Cheap sample-quality metrics for the digits models, built on the shipped classifier (:func:`dpmsolve.zoo.classifier`).

- :func:`class_accuracy`: the fraction of images the classifier assigns to their intended labels;
- :func:`digits_fd`: a Frechet distance (as FID, with the classifier's penultimate-layer features instead of
  Inception's) between the images and the real digits. By default the reference statistics are those of the
  real *training* digits (``digits_data("train")``), so the held-out real digits give a fair "real" baseline.

FD estimates are biased upward for small sample sizes: compare numbers computed from equally many images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["class_accuracy", "digits_fd", "features", "frechet_distance", "reference_stats"]


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
