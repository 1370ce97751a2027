"""Shared maths of the lambda-space exponential integrators (DDIM, DPM-Solver(++), UniPC, SDE variants).

For a step s -> t with h = lambda_t - lambda_s, the probability-flow ODE integrates exactly to

    data form  (DPM-Solver++): x_t = (sigma_t/sigma_s) x_s + alpha_t * Int e^{-(lambda_t - l)} x0(l) dl
    noise form (DPM-Solver):   x_t = (alpha_t/alpha_s) x_s - sigma_t * Int e^{+(lambda_t - l)} eps(l) dl

(Lu et al. 2022, Eq. 3.4; Lu et al. 2022b, Eq. 8). Expanding the prediction m in a Taylor series in lambda
around lambda_s gives ``x_t = A x_s + sum_k W_k h^k m^(k)(lambda_s)`` with ``W_k = c_t h phi_{k+1}(-/+h)``.
Every update in this package is therefore ``x_t = A x_s + sum_j c_j m_j``: a linear combination of stored
predictions whose float64 coefficients are computed here, on the host, once per step. The derivatives are
estimated from predictions at ``lambda_j = lambda_s + rho_j h`` by polynomial interpolation, which makes an
order-p update exact whenever m is a polynomial of degree p - 1 in lambda.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..schedules import Schedule


class Node(NamedTuple):
    """A time with its schedule values, all host float64."""

    t: float
    lam: float
    log_alpha: float
    log_sigma: float

    @classmethod
    def at(cls, schedule: Schedule, t: float) -> Node:
        log_a, log_s = schedule._log_alpha_sigma(np.float64(t))
        return cls(float(t), float(log_a - log_s), float(log_a), float(log_s))

    @classmethod
    def at_log_snr(cls, schedule: Schedule, lam: float) -> Node:
        return cls.at(schedule, float(schedule.t_from_log_snr(lam)))

    @classmethod
    def zero(cls) -> Node:
        """sigma = 0 (the data end, t = 0): lambda = inf, alpha = 1."""
        return cls(0.0, math.inf, 0.0, -math.inf)

    @property
    def alpha(self) -> float:
        return math.exp(self.log_alpha)

    @property
    def sigma(self) -> float:
        return math.exp(self.log_sigma)


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{n>=0} z^n / (n+k)!  (phi_0 = e^z, phi_1 = (e^z - 1)/z), stable for small |z|."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 0.5:
        term, total = 1.0 / math.factorial(k), 0.0
        for n in range(30):
            total += term
            term *= z / (n + k + 1)
            if abs(term) < 1e-18 * abs(total):
                break
        return total + term
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


class Rule(enum.Enum):
    """How the derivative terms of a high-order step are weighted.

    TAYLOR: the exact integral of the interpolating polynomial (the reference's ``solver_type='taylor'``;
    diffusers' ``heun``). DPMSOLVER: the reference's ``solver_type='dpmsolver'`` formulas (diffusers'
    ``midpoint``): order 2 weights the first difference by ``W_0 / 2``; singlestep order 3 is DPM-Solver-3
    (Lu et al. 2022, Alg. 2), which uses only the far intermediate point; multistep order 3 is the reference's
    3M update, whose second-difference weight is half of the Taylor one (so it is exact only up to degree 1).

    BH1, BH2 (UniPC, Zhao et al. 2023, Sec. 3.1-3.2): ``x_t = A x_s + W_0 m_s + B~ sum_k a_k D_k`` with
    ``D_k = (m_k - m_s) / r_k`` (r_k = rho_k, the points' positions) and ``B~`` the weight of ``B(h) = h``
    (BH1) or ``e^h - 1`` (BH2): ``c_t h`` or ``W_0``. With more than two points the a_k solve the square system
    ``sum_k a_k r_k^(n-1) = n! W_n / B~`` (n = 1 .. points - 1), which makes ``B~ a_k`` the Taylor weights:
    B(h) cancels and the update IS the TAYLOR one. With two points (UniP-2, UniC-1) the paper and its
    reference fix ``a = 1/2`` instead, and B(h) matters: BH2 is then DPMSOLVER's ``W0/2`` rule, BH1 weights
    the difference by ``c_t h / 2``.

    PSEUDO (DPM-Solver-v3's pseudo-order, Zheng et al. 2023, Thm. 3.4): the k-th derivative is k! times the
    Newton divided difference of the first k + 1 points only (see ``derivative_matrix``); the formal order is
    lost beyond 2 points, in exchange for stability at very few steps.
    """

    TAYLOR = "taylor"
    DPMSOLVER = "dpmsolver"
    BH1 = "bh1"
    BH2 = "bh2"
    PSEUDO = "pseudo"


@dataclass(frozen=True)
class Form:
    """Which prediction an exponential integrator integrates, with the SDE noise share ``eta``.

    ``data=True`` integrates x0 (DPM-Solver++), ``data=False`` integrates eps (DPM-Solver). With ``eta > 0``
    (data form only) the step is SDE-DPM-Solver++: the linear part decays by an extra ``e^{-eta h}``, the
    weights use ``H = (1 + eta) h`` and Gaussian noise of std ``sigma_t sqrt(1 - e^{-2 eta h})`` is added
    (Lu et al. 2022b, Sec. 5; eta = 1 is the reverse SDE, eta = 0 the ODE).
    """

    data: bool = True
    eta: float = 0.0

    def pick(self, pred) -> torch.Tensor:
        return pred.x0 if self.data else pred.eps

    def linear_and_weights(self, s: Node, t: Node, p: int) -> tuple[float, np.ndarray]:
        """A and the scaled Taylor weights W_k (k < p): x_t = A x_s + sum_k W_k (h^k m^(k)(lambda_s))."""
        h = t.lam - s.lam
        if self.data:
            big_h = (1.0 + self.eta) * h
            a = math.exp(t.log_sigma - s.log_sigma - self.eta * h)
            w = [t.alpha * big_h * phi(k + 1, -big_h) for k in range(p)]
        else:
            a = math.exp(t.log_alpha - s.log_alpha)
            w = [-t.sigma * h * phi(k + 1, h) for k in range(p)]
        return a, np.array(w)

    def exponent(self, s: Node, t: Node) -> float:
        """The argument z of the phi functions in the weights ``W_k``: -(1 + eta) h (data form), +h (noise
        form); ``W_0 / phi_1(z)`` is then ``alpha_t (1 + eta) h`` or ``-sigma_t h``."""
        h = t.lam - s.lam
        return -(1.0 + self.eta) * h if self.data else h

    def to_zero(self, s: Node) -> tuple[float, tuple[float, ...]]:
        """(A, c) of the step from s to sigma = 0 (alpha = 1 there for every schedule): x_0 = the x0 prediction,
        written in the integrated prediction (data form: x0 itself; noise form: (x - sigma eps) / alpha)."""
        if self.data:
            return 0.0, (1.0,)
        return math.exp(-s.log_alpha), (-math.exp(s.log_sigma - s.log_alpha),)

    def noise_std(self, s: Node, t: Node) -> float:
        h = t.lam - s.lam
        return t.sigma * math.sqrt(max(-math.expm1(-2.0 * self.eta * h), 0.0)) if self.eta else 0.0


def interpolation_coefficients(rhos: Sequence[float], w: np.ndarray) -> np.ndarray:
    """c with sum_j c_j m_j = sum_k w_k h^k p^(k)(lambda_s), p the polynomial through (rho_j, m_j).

    ``rhos[0]`` must be 0 (the point lambda_s itself); the others are (lambda_j - lambda_s) / h.
    """
    rhos = np.asarray(rhos, dtype=np.float64)
    p = rhos.size
    w = np.asarray(w)
    if w.dtype == np.float64 and rhos[0] == 0.0:
        # Orders 1 and 2 in closed form (V^T = [[1]] and [[1, 1], [0, rho1]]: no pivoting, so this is the
        # arithmetic LAPACK does; identical to np.linalg.solve on 4e5 random systems) without solve's ~15 us of
        # overhead per call, which was most of a plan's time.
        if p == 1:
            return w[:1].copy()
        if p == 2 and rhos[1] != 0.0:
            c1 = w[1] / rhos[1]
            return np.array([w[0] - c1, c1])
    vander = np.stack([rhos**k / math.factorial(k) for k in range(p)], axis=1)  # m_j = sum_k V[j,k] d_k
    return np.linalg.solve(vander.T, w[:p])


def derivative_matrix(rhos: Sequence[float], pseudo: bool = False) -> np.ndarray:
    """D with ``h^k m^(k)(lambda_s) ~= sum_j D[k, j] m_j`` for predictions m_j at ``lambda_s + rho_j h``
    (``rhos[0] == 0``).

    ``pseudo=False``: the derivatives of the interpolating polynomial (the inverse Vandermonde matrix; exact for
    polynomials of degree < len(rhos)). ``pseudo=True``: ``k!`` times the divided difference of the first k + 1
    points (DPM-Solver-v3's pseudo-order estimate).
    """
    rhos = np.asarray(rhos, dtype=np.float64)
    p = rhos.size
    if not pseudo:
        vander = np.stack([rhos**k / math.factorial(k) for k in range(p)], axis=1)
        return np.linalg.inv(vander)
    d = np.zeros((p, p))
    for k in range(p):
        for j in range(k + 1):
            d[k, j] = math.factorial(k) / np.prod([rhos[j] - rhos[m] for m in range(k + 1) if m != j])
    return d


def step_coefficients(form: Form, s: Node, t: Node, rhos: Sequence[float], rule: Rule = Rule.TAYLOR):
    """(A, c): the update ``x_t = A x_s + sum_j c_j m_j`` from predictions m_j at lambda_s + rho_j h."""
    p = len(rhos)
    a, w = form.linear_and_weights(s, t, p)
    if rule is Rule.TAYLOR or p == 1:
        return a, interpolation_coefficients(rhos, w)
    if rule is Rule.PSEUDO:
        return a, w @ derivative_matrix(rhos, pseudo=True)
    if p == 2:  # m0 + (B~/2) (m1 - m0) / rho1, B~ = W0 (DPMSOLVER, BH2) or W0 / phi_1(z) = c h (BH1)
        b = w[0] / phi(1, form.exponent(s, t)) if rule is Rule.BH1 else w[0]
        half = 0.5 * b / rhos[1]
        return a, np.array([w[0] - half, half])
    if rule is Rule.BH1 or rule is Rule.BH2:  # UniPC's square systems: B(h) cancels, the Taylor update
        return a, interpolation_coefficients(rhos, w)
    if p == 3 and rhos[1] > 0:  # DPM-Solver-3: W1 (m2 - m0) / rho2
        return a, np.array([w[0] - w[1] / rhos[2], 0.0, w[1] / rhos[2]])
    if p == 3:  # reference multistep 3M: Taylor with half the second-derivative weight
        return a, interpolation_coefficients(rhos, np.array([w[0], w[1], 0.5 * w[2]]))
    raise ValueError(f"solver_type 'dpmsolver' is defined for orders 1-3, not {p}.")


def combine(a, x: torch.Tensor, coeffs: Sequence, ms: Sequence[torch.Tensor], offset: torch.Tensor | None = None
            ) -> torch.Tensor:
    """a * x + sum_j coeffs[j] * ms[j] (+ offset), skipping zero coefficients; a new tensor (inputs untouched).

    Coefficients are host floats, or tensors broadcastable to x (per-element coefficients, as DPM-Solver-v3's).
    The sums accumulate in place on the fresh product ``x * a`` (one allocation per step instead of one per
    term), with the same kernels and order as the out-of-place form, so results are bitwise identical. A term
    that would promote the dtype or broadcast the shape falls back to the out-of-place add.
    """
    out = x * a
    for c, m in zip(coeffs, ms):
        if isinstance(c, torch.Tensor):
            out = out.addcmul_(m, c) if m.shape == out.shape and m.dtype == out.dtype else out + c * m
        elif c != 0.0:
            if m.dtype == out.dtype and m.shape == out.shape:
                out.add_(m, alpha=float(c))
            else:
                out = out.add(m, alpha=float(c))
    if offset is not None:
        out = out.add_(offset) if out.dtype == offset.dtype else out + offset
    return out
