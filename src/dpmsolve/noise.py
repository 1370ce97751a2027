"""Noise for stochastic samplers: a seeded Brownian tree and a k-diffusion-style Brownian noise sampler.

A sampler step that adds ``std * z`` needs a standard normal ``z``. Fresh ``torch.randn`` draws (the engine's
default) give a new, independent path for every grid: refining the grid changes every draw. A Brownian tree
instead fixes ONE Brownian path W for a seed and hands out its normalised increments
``z = (W(b) - W(a)) / sqrt(|b - a|)`` over any interval, so a finer grid samples the same path (the samples
converge as the steps grow, as a strong SDE scheme should), and two steps over adjacent intervals get
increments that add up exactly (k-diffusion's ``BrownianTreeNoiseSampler`` idea; built here from the
Brownian bridge alone, Levy's construction).

Design of :class:`BrownianTree` (one tensor-valued path on ``[t0, t1]``):

* W(t0) = 0, W(t1) = sqrt(t1 - t0) z_root. Each interval [a, b] of the tree is split at m (the geometric mean
  sqrt(a b) when a > 0, so the resolution is relative to t, as noise levels spanning decades need; else the
  arithmetic mean), and W(m) is the Brownian bridge ``W(a) + w (W(b) - W(a)) + sqrt((m - a) w) z`` with
  ``w = (m - a) / (b - a)`` and z drawn from a generator seeded by a hash of (seed, level, index): every value is
  a pure function of the seed and the tree position, so queries can come in any order, from any number of
  trees, and repeat bitwise.
* A query W(t) descends ``depth`` levels, then samples the bridge between the two ends of its leaf at t itself
  (z seeded by (seed, leaf, t)), so every W(t) has exactly the law N(0, t - t0); points sharing a leaf (of
  relative width ~ log(t1 / t0) / 2**depth, about 1e-6 for the default depth and noise levels 0.002 ... 80) are
  only conditionally independent, the one approximation.
* A small cache of tree values (least recently used) makes queries at nearby times, as a sampler makes them, cost
  a few draws instead of ``depth``; it never changes a value.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Sequence

import torch

from ._checks import check_count, check_real

__all__ = ["BrownianTree", "BrownianNoise"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash(*words: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained): nearby keys give unrelated seeds."""
    h = 0x243F6A8885A308D3
    for w in words:
        h = _splitmix64(h ^ (w & _MASK64))
    return h >> 1


def _float_bits(t: float) -> int:
    return struct.unpack("<q", struct.pack("<d", t))[0]


class BrownianTree:
    """A seeded Brownian motion W on ``[t0, t1]`` with values of shape ``shape``, queried at any times in any order.

    ``tree(t)`` is W(t) (a new tensor); ``tree.increment(s, t)`` is W(t) - W(s). Same seed, same values, bitwise,
    whatever the order or set of queries. ``depth`` levels of bisection (geometric for t > 0) resolve the path
    (below that, points are conditionally independent bridge samples, with exact marginals). ``cache_size``
    values are kept (default ``2 * depth + 8`` tensors of ``shape``). Not thread-safe (the cache); values do
    not depend on it.
    """

    def __init__(self, shape: Sequence[int], t0: float, t1: float, seed: int, *, device="cpu",
                 dtype: torch.dtype = torch.float32, depth: int = 24, cache_size: int | None = None):
        t0, t1 = check_real("t0", t0, "BrownianTree"), check_real("t1", t1, "BrownianTree")
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise ValueError(f"BrownianTree needs finite t0 < t1, got t0={t0!r}, t1={t1!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"BrownianTree seed must be an int, got {seed!r} ({type(seed).__name__}).")
        if not dtype.is_floating_point:
            raise TypeError(f"BrownianTree dtype must be a floating-point dtype, got {dtype}.")
        self.shape, self.t0, self.t1, self.seed = tuple(int(n) for n in shape), t0, t1, seed & _MASK64
        self.device, self.dtype = torch.device(device), dtype
        self.depth = check_count("depth", depth, 1)
        self.cache_size = 2 * self.depth + 8 if cache_size is None else check_count("cache_size", cache_size, 1)
        self._cache: OrderedDict = OrderedDict()
        self._w1 = self._normal(0, 0).mul_(math.sqrt(t1 - t0))

    def _normal(self, *key: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(_hash(self.seed, *key))
        return torch.randn(self.shape, generator=generator, device=self.device, dtype=self.dtype)

    def _bridge(self, key: tuple[int, ...], a: float, m: float, b: float, wa, wb) -> torch.Tensor:
        """W(m) given W(a) = wa (None: 0) and W(b) = wb: the Brownian bridge, z seeded by ``key``."""
        w = (m - a) / (b - a)
        out = self._normal(*key).mul_(math.sqrt((m - a) * (b - m) / (b - a))).add_(wb, alpha=w)
        return out if wa is None else out.add_(wa, alpha=1.0 - w)

    def _cached(self, key: tuple[int, ...], a: float, m: float, b: float, wa, wb) -> torch.Tensor:
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            return w
        w = self._cache[key] = self._bridge(key, a, m, b, wa, wb)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w

    def __call__(self, t: float) -> torch.Tensor:
        t = float(t)
        span = self.t1 - self.t0
        if not (self.t0 - 1e-12 * span <= t <= self.t1 + 1e-12 * span):
            raise ValueError(f"BrownianTree on [{self.t0:g}, {self.t1:g}] was queried at t={t!r}, outside it; build "
                             "the tree over the whole range of times the sampler uses.")
        if t <= self.t0:
            return torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        if t >= self.t1:
            return self._w1.clone()
        a, b, wa, wb, index = self.t0, self.t1, None, self._w1, 0
        for level in range(1, self.depth + 1):
            m = math.sqrt(a * b) if a > 0 else 0.5 * (a + b)
            if not a < m < b:  # an interval too narrow to split in floating point
                break
            wm = self._cached((level, index), a, m, b, wa, wb)
            if t == m:
                return wm.clone()
            if t < m:
                b, wb, index = m, wm, 2 * index
            else:
                a, wa, index = m, wm, 2 * index + 1
        # The leaf [a, b]: the bridge at t itself, seeded by the leaf and t (exact marginal N(0, t - t0)).
        return self._cached((self.depth + 1, index, _float_bits(t)), a, t, b, wa, wb).clone()

    def increment(self, s: float, t: float) -> torch.Tensor:
        """W(t) - W(s)."""
        return self(t).sub_(self(s))

    def __repr__(self) -> str:
        return (f"BrownianTree(shape={self.shape}, t0={self.t0:g}, t1={self.t1:g}, seed={self.seed}, "
                f"depth={self.depth})")


class BrownianNoise:
    """A k-diffusion-style noise sampler on a Brownian tree: ``noise(sigma, sigma_next)`` is
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, a standard normal tensor shaped like ``x``.

    The tree runs over the noise levels ``[sigma_min, sigma_max]`` (VE sigma = sigma / alpha, as k-diffusion's
    ``BrownianTreeNoiseSampler``). ``seed``: an int (one tree over the whole batch), or one int per batch item
    (``x.shape[0]`` trees: each item's noise then does not depend on its batch-mates); None draws one from
    ``generator`` (or from torch's global generator). The tree computes in float32 (float64 for float64 x) on
    x's device.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed=None,
                 generator: torch.Generator | None = None, depth: int = 24):
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not (0 <= sigma_min < sigma_max < math.inf):
            raise ValueError(f"BrownianNoise needs 0 <= sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}.")
        if seed is None:
            device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=device).item())
        self.like = (x.shape, x.device, x.dtype)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        tree = dict(device=x.device, dtype=dtype, depth=depth)
        if isinstance(seed, int) and not isinstance(seed, bool):
            self.trees = [BrownianTree(x.shape, sigma_min, sigma_max, seed, **tree)]
            self.batched = False
        else:
            seeds = list(seed)
            if x.dim() == 0 or len(seeds) != x.shape[0]:
                raise ValueError(f"BrownianNoise got {len(seeds)} seeds for a batch of {x.shape[0] if x.dim() else 0}; "
                                 "pass one int, or one int per batch item.")
            self.trees = [BrownianTree(x.shape[1:], sigma_min, sigma_max, int(s), **tree) for s in seeds]
            self.batched = True
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if a == b:
            raise ValueError(f"BrownianNoise needs two different noise levels, got sigma = sigma_next = {a!r}.")
        parts = [tree.increment(a, b) for tree in self.trees]
        w = torch.stack(parts) if self.batched else parts[0]
        shape, device, dtype = self.like
        return w.div_(math.sqrt(abs(b - a))).to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return (f"BrownianNoise(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, "
                f"trees={len(self.trees)})")
