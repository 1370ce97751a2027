"""A denoiser wrapper that counts the model calls reaching it (shared by the NFE tests)."""

import dpmsolve as dp


class Counting(dp.Denoiser):
    """Counts the real model calls that reach the wrapped denoiser."""

    def __init__(self, inner: dp.Denoiser):
        self.inner, self.schedule, self.calls = inner, inner.schedule, 0

    def __call__(self, x, t, **model_kwargs):
        self.calls += 1
        return self.inner(x, t, **model_kwargs)
