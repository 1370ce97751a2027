"""The lambda integrals of DPM-Solver-v3's update (Zheng et al. 2023, Eq. 9 and 14), for any step.

For a step from lambda_a to lambda_b and per-element statistics l, s, b (linear between EMS nodes):

    dL = int_a^b l,   dS = int_a^b s,   Phi(lam) = int_a^lam (l + s),
    Bt(lam) = int_a^lam e^{-(S(r) - S(a))} b(r) dr,
    E_k = int_a^b e^{Phi(lam)} (lam - a)^k / k! dlam,     Cb = int_a^b e^{Phi(lam)} Bt(lam) dlam.

dL, dS and Phi are integrals of piecewise-linear functions, done exactly. The others use composite
Gauss-Legendre quadrature on the pieces between EMS nodes (each at most ``MAX_WIDTH`` wide), where the
integrands are smooth; the inner integral Bt at the quadrature nodes uses the Gauss-Legendre (spectral)
integration matrix. For constant statistics (l = 1, s = b = 0: DPM-Solver++) the error is at round-off, and
it vanishes spectrally as the pieces shrink. The reference implementation instead uses the trapezoid rule on
the EMS grid and snaps the sampling times to its nodes; here any time works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .statistics import EMS

__all__ = ["StepIntegrals", "step_integrals", "MAX_WIDTH"]

MAX_WIDTH = 0.25          # widest quadrature piece, in lambda
_NODES = 6                # Gauss-Legendre points per piece
_CHUNK = 256              # pieces processed at once (bounds memory for large data shapes)

_x, _w = np.polynomial.legendre.leggauss(_NODES)
_U, _W = (_x + 1.0) / 2.0, _w / 2.0                      # nodes and weights on [0, 1]


def _integration_matrix(u: np.ndarray) -> np.ndarray:
    """Q[q, r] = int_0^{u_q} ell_r(v) dv for the Lagrange basis ell_r through the nodes u."""
    n = u.size
    q = np.empty((n, n))
    for r in range(n):
        others = np.delete(u, r)
        coeffs = np.poly(others) / np.prod(u[r] - others)   # ell_r as a polynomial (highest power first)
        antider = np.polyint(coeffs)
        q[:, r] = np.polyval(antider, u) - np.polyval(antider, 0.0)
    return q


_Q = _integration_matrix(_U)


@dataclass(frozen=True)
class StepIntegrals:
    """The integrals of one step, each of the statistics' shape (see the module docstring)."""

    dL: np.ndarray
    dS: np.ndarray
    b_tilde: np.ndarray          # Bt(b)
    E: tuple[np.ndarray, ...]    # E_0 .. E_{n_taylor - 1}
    cb: np.ndarray | None


def _pieces(ems: EMS, a: float, b: float) -> np.ndarray:
    """Break points from a to b (either direction): the EMS nodes strictly between, then subdivided."""
    lo, hi = min(a, b), max(a, b)
    inner = ems.lambdas[(ems.lambdas > lo) & (ems.lambdas < hi)]
    points = np.concatenate([[lo], inner, [hi]])
    widths = np.diff(points)
    splits = np.maximum(1, np.ceil(widths / MAX_WIDTH).astype(int))
    mesh = [lo]
    for start, width, k in zip(points[:-1], widths, splits):
        mesh.extend(start + width * np.arange(1, k + 1) / k)
    mesh = np.array(mesh)
    mesh[-1] = hi
    return mesh if a <= b else mesh[::-1].copy()


def step_integrals(ems: EMS, a: float, b: float, n_taylor: int = 0, with_cb: bool = False) -> StepIntegrals:
    """dL, dS, Bt(b), E_k (k < n_taylor) and, if asked, Cb for the step from lambda a to b."""
    ems.check_range([a, b])
    shape = ems.stat_shape
    pad = (1,) * len(shape)
    mesh = _pieces(ems, a, b)
    zeros = np.zeros(shape)
    L, S, Bt = zeros.copy(), zeros.copy(), zeros.copy()
    E = [zeros.copy() for _ in range(n_taylor)]
    cb = zeros.copy() if with_cb else None
    for c in range(0, mesh.size - 1, _CHUNK):
        starts, ends = mesh[c:c + _CHUNK + 1][:-1], mesh[c + 1:c + _CHUNK + 1]
        width = ends - starts                                           # signed
        nodes = starts[:, None] + width[:, None] * _U                    # (P, n)
        l0, s0, b0 = ems.at(starts)
        l1, s1, _ = ems.at(ends)
        lq, sq, bq = ems.at(nodes)                                       # (P, n, *shape)
        wp = width.reshape((-1,) + pad)
        piece_L, piece_S = wp * (l0 + l1) / 2, wp * (s0 + s1) / 2
        L0 = L + np.cumsum(piece_L, axis=0) - piece_L                    # at each piece's start
        S0 = S + np.cumsum(piece_S, axis=0) - piece_S
        off = (nodes - starts[:, None]).reshape(nodes.shape + pad)       # lam - piece start
        S_q = S0[:, None] + off * (s0[:, None] + sq) / 2
        phi = L0[:, None] + S_q + off * (l0[:, None] + lq) / 2
        wq = width.reshape((-1, 1) + pad) * _W.reshape((1, -1) + pad)   # quadrature weights (P, n)
        integrand_b = np.exp(-S_q) * bq
        piece_B = np.sum(wq * integrand_b, axis=1)
        B0 = Bt + np.cumsum(piece_B, axis=0) - piece_B
        ephi = np.exp(phi)
        rel = (nodes - a).reshape(nodes.shape + pad)
        for k in range(n_taylor):
            E[k] = E[k] + np.sum(wq * ephi * rel**k, axis=(0, 1)) / math.factorial(k)
        if with_cb:
            inner = B0[:, None] + width.reshape((-1, 1) + pad) * np.einsum("qr,pr...->pq...", _Q, integrand_b)
            cb = cb + np.sum(wq * ephi * inner, axis=(0, 1))
        L = L + piece_L.sum(axis=0)
        S = S + piece_S.sum(axis=0)
        Bt = Bt + piece_B.sum(axis=0)
    return StepIntegrals(L, S, Bt, tuple(E), cb)
