"""Analytic diffusion problems: data distributions whose exact denoiser is known in closed form.

The exact denoiser ``E[x0 | x_t]`` depends on x_t only through ``y = x_t / alpha`` and the VE noise level
``rho = sigma / alpha = exp(-lambda)``, so one problem serves every schedule. In these coordinates the
probability-flow ODE is ``dy/dlambda = E[x0 | y, rho] - y`` (Lu et al. 2022, Eq. 3.4 in VE form), which the
reference solver integrates with scipy's DOP853.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..model import Denoiser, Prediction
from ..schedules import Schedule

__all__ = ["AnalyticProblem", "GaussianData", "GaussianMixture", "PointMass", "AnalyticDenoiser",
           "reference_solution", "digits_kde"]


class AnalyticProblem(ABC):
    """A data distribution with an exact posterior mean ``posterior_mean(y, rho)``."""

    dim: int

    @abstractmethod
    def posterior_mean(self, y: torch.Tensor, rho: float) -> torch.Tensor:
        """E[x0 | x0 + rho * eps = y] for a batch y of shape (batch, dim)."""

    def denoiser(self, schedule: Schedule) -> AnalyticDenoiser:
        return AnalyticDenoiser(self, schedule)

    def exact_solution(self, schedule: Schedule, x: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
        """The probability-flow ODE solution from (x, t_start) to t_end (tight numerical solve by default)."""
        return reference_solution(self, schedule, x, t_start, t_end)

    def prior_sample(self, schedule: Schedule, n: int, t: float | None = None, generator=None,
                     dtype=torch.float64) -> torch.Tensor:
        """Exact samples of x_t (t defaults to t_max): alpha_t x0 + sigma_t eps with x0 from the data."""
        t = schedule.t_max if t is None else t
        a, s = schedule.alpha_sigma(t)
        x0 = self.data_sample(n, generator, dtype)
        return a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=dtype)

    @abstractmethod
    def data_sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        """n samples of x0, shape (n, dim)."""


class AnalyticDenoiser(Denoiser):
    """The exact denoiser of an analytic problem under a schedule (counts as one NFE per call)."""

    def __init__(self, problem: AnalyticProblem, schedule: Schedule):
        self.problem, self.schedule = problem, schedule

    def __call__(self, x, t, y=None):
        a, s = self.schedule.alpha_sigma(t)
        label = {} if y is None else {"label": y}
        x0 = self.problem.posterior_mean(x / a, s / a, **label).to(x.dtype)
        return Prediction(x0, (x - a * x0) / s)


def _as_tensor(values, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype)


@dataclass
class GaussianData(AnalyticProblem):
    """x0 ~ N(mean, diag(var)); the flow map is exact: ``y_t = mean + sqrt(var + rho_t^2) z``, z constant."""

    mean: torch.Tensor
    var: torch.Tensor

    def __post_init__(self):
        self.mean, self.var = _as_tensor(self.mean), _as_tensor(self.var)
        self.dim = self.mean.numel()

    def posterior_mean(self, y, rho):
        mean, var = self.mean.to(y), self.var.to(y)
        return mean + var / (var + rho**2) * (y - mean)

    def exact_solution(self, schedule, x, t_start, t_end):
        a0, s0 = schedule.alpha_sigma(t_start)
        a1, s1 = schedule.alpha_sigma(t_end)
        mean, var = self.mean.to(x), self.var.to(x)
        z = (x / a0 - mean) / torch.sqrt(var + (s0 / a0) ** 2)
        return a1 * (mean + torch.sqrt(var + (s1 / a1) ** 2) * z)

    def data_sample(self, n, generator=None, dtype=torch.float64):
        z = torch.randn((n, self.dim), generator=generator, dtype=dtype)
        return self.mean.to(dtype) + self.var.to(dtype).sqrt() * z


@dataclass
class PointMass(AnalyticProblem):
    """All data at one point: x0 and eps are constant along every exact trajectory."""

    point: torch.Tensor

    def __post_init__(self):
        self.point = _as_tensor(self.point)
        self.dim = self.point.numel()

    def posterior_mean(self, y, rho):
        return self.point.to(y).expand_as(y)

    def exact_solution(self, schedule, x, t_start, t_end):
        a0, s0 = schedule.alpha_sigma(t_start)
        a1, s1 = schedule.alpha_sigma(t_end)
        p = self.point.to(x)
        return a1 * p + s1 * (x - a0 * p) / s0

    def data_sample(self, n, generator=None, dtype=torch.float64):
        return self.point.to(dtype).expand(n, -1).clone()


@dataclass
class GaussianMixture(AnalyticProblem):
    """Mixture of diagonal Gaussians: ``means`` (K, D), ``vars`` (K, D), ``weights`` (K,).

    Optional integer ``labels`` (K,) make it class-conditional: ``posterior_mean(y, rho, label)`` restricts the
    mixture to the components of each sample's label (label -1: the whole mixture), which is what a
    class-conditional network with label dropout learns; the denoiser takes it as the model keyword ``y``.
    """

    means: torch.Tensor
    vars: torch.Tensor
    weights: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self):
        self.means, self.vars = _as_tensor(self.means), _as_tensor(self.vars)
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if self.weights is None else _as_tensor(self.weights)
        self.weights = w / w.sum()
        if self.labels is not None:
            self.labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long).reshape(k)
        self.dim = self.means.shape[1]

    @classmethod
    def random(cls, k: int = 4, dim: int = 2, seed: int = 0, spread: float = 1.0, classes: int = 0
               ) -> GaussianMixture:
        g = np.random.default_rng(seed)
        labels = np.arange(k) % classes if classes else None
        return cls(spread * g.normal(size=(k, dim)), (0.05 + 0.3 * g.random((k, dim))) ** 2, 0.5 + g.random(k),
                   labels)

    def component_log_posteriors(self, y, rho, label=None):
        """log p(k | y) under y = x0 + rho eps, shape (batch, K); restricted to ``label`` where given."""
        inv = 1.0 / (self.vars.to(y) + rho**2)                      # (K, D)
        means = self.means.to(y)
        # -1/2 sum_d (y_d - mu_kd)^2 / v_kd, expanded into matmuls (no (batch, K, D) tensor).
        quad = (y * y) @ inv.T - 2.0 * y @ (means * inv).T + (means * means * inv).sum(1)
        log_p = -0.5 * (quad - torch.log(inv).sum(1) + self.dim * math.log(2 * math.pi))
        log_p = log_p + torch.log(self.weights.to(y))
        if label is not None:
            if self.labels is None:
                raise ValueError("This mixture has no class labels; build it with labels=... for guidance.")
            label = torch.as_tensor(label, device=y.device).reshape(-1, 1)
            keep = (self.labels.to(y.device)[None] == label) | (label < 0)
            log_p = log_p.masked_fill(~keep, -math.inf)
        return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)

    def component_posteriors(self, y, rho, label=None):
        """p(k | y) under y = x0 + rho eps, shape (batch, K)."""
        return torch.exp(self.component_log_posteriors(y, rho, label))

    def posterior_mean(self, y, rho, label=None):
        var = self.vars.to(y)
        shrink = var / (var + rho**2)                                # (K, D)
        w = self.component_posteriors(y, rho, label)                 # (B, K)
        return w @ (self.means.to(y) * (1.0 - shrink)) + y * (w @ shrink)

    def data_sample(self, n, generator=None, dtype=torch.float64, label=None):
        weights = self.weights
        if label is not None:
            weights = weights * (self.labels == int(label))
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=dtype)
        return self.means.to(dtype)[k] + self.vars.to(dtype)[k].sqrt() * z


def digits_kde(bandwidth: float = 0.1, classes: bool = True) -> GaussianMixture:
    """Kernel-density model of scikit-learn's bundled 8x8 digits (1797 images scaled to [-1, 1], 64 dims):
    an equal-weight isotropic Gaussian of std ``bandwidth`` at every image, labelled by its digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = digits.data / 8.0 - 1.0
    return GaussianMixture(data, np.full_like(data, bandwidth**2), None, digits.target if classes else None)


def reference_solution(problem: AnalyticProblem, schedule: Schedule, x: torch.Tensor, t_start: float,
                       t_end: float | None, rtol: float = 1e-10, atol: float = 1e-12) -> torch.Tensor:
    """Tight DOP853 solution of the problem's probability-flow ODE from (x, t_start) to t_end
    (None: the data end, sigma = 0)."""
    from .reference import reference_between

    return reference_between(problem.posterior_mean, schedule, x, t_start, t_end, rtol=rtol, atol=atol)
