"""Model wrappers: turn a network into a denoiser ``(x, t) -> Prediction(x0, eps)``.

``wrap_model`` maps the schedule's continuous time to whatever the network was trained with and converts its
output (eps, x0, v, score or flow velocity) into both predictions. Guidance and x0 corrections are wrappers
around a denoiser, composed in any order; solvers never know about them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from .schedules import DiscreteVP, Schedule

__all__ = [
    "Prediction",
    "Denoiser",
    "ModelDenoiser",
    "wrap_model",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DynamicThresholding",
    "ClipX0",
    "PREDICTIONS",
    "TIME_INPUTS",
]


class Prediction(NamedTuple):
    """Both predictions of one evaluation: data ``x0`` and noise ``eps``, with ``x = alpha x0 + sigma eps``."""

    x0: torch.Tensor
    eps: torch.Tensor


class Denoiser(ABC):
    """Base of all denoisers: ``denoiser(x, t, **model_kwargs) -> Prediction`` for a scalar time ``t`` (or, where
    ``per_sample_time``, an array of one time per sample)."""

    schedule: Schedule

    @abstractmethod
    def __call__(self, x: torch.Tensor, t: float, **model_kwargs) -> Prediction:
        """Both predictions at ``(x, t)``."""

    def network_time(self, t: float) -> float:
        """The time value handed to the network for schedule time ``t`` (the schedule's t by default)."""
        return t

    @property
    def per_sample_time(self) -> bool:
        """Whether ``t`` may also be a 1-D numpy array of one time per sample (networks wrapped by
        :func:`wrap_model` and classifier-free guidance over them): lets ``ems.compute`` put several log-SNR
        nodes into one network call. Solvers always pass a float."""
        return False


# Conversions use fused ops on fresh tensors (one allocation each): they run once per model evaluation.
def _x0_eps_from_eps(out, x, a, s):
    if isinstance(s, torch.Tensor):                # per-sample times
        return (x - s * out) / a, out
    return torch.sub(x, out, alpha=s).div_(a), out


def _x0_eps_from_x0(out, x, a, s):
    if isinstance(a, torch.Tensor):
        return out, (x - a * out) / s
    return out, torch.sub(x, out, alpha=a).div_(s)


def _x0_eps_from_v(out, x, a, s):
    # v = alpha eps - sigma x0 (Salimans & Ho 2022), for any alpha, sigma.
    norm = a * a + s * s
    return (a * x - s * out) / norm, (s * x + a * out) / norm


def _x0_eps_from_score(out, x, a, s):
    eps = -s * out
    return (x - s * eps) / a, eps


def _x0_eps_from_flow(out, x, a, s):
    # Rectified-flow convention velocity = eps - x0 (SD3, Flux); exact for any alpha, sigma.
    norm = a + s
    return (x - s * out) / norm, (x + a * out) / norm


PREDICTIONS: dict[str, Callable] = {
    "eps": _x0_eps_from_eps,
    "x0": _x0_eps_from_x0,
    "v": _x0_eps_from_v,
    "score": _x0_eps_from_score,
    "flow": _x0_eps_from_flow,
}
_PREDICTION_ALIASES = {"epsilon": "eps", "noise": "eps", "sample": "x0", "x_start": "x0", "data": "x0",
                       "v_prediction": "v", "velocity": "flow", "flow_prediction": "flow"}


def _discrete_time(schedule: Schedule, t: float) -> float:
    if not isinstance(schedule, DiscreteVP):
        raise ValueError("time_input='discrete' needs a DiscreteVP schedule; use 'continuous' or a callable.")
    return float(schedule.train_index(t))


TIME_INPUTS: dict[str, Callable[[Schedule, float], float]] = {
    "continuous": lambda schedule, t: t,           # the schedule's own t (flow t, EDM sigma, VP t)
    "discrete": _discrete_time,                     # train index N t - 1, as the reference DPM-Solver
    "1000t": lambda schedule, t: 1000.0 * t,        # flow models trained on 1000 t (SD3, Flux)
    "sigma": lambda schedule, t: schedule.sigma(t) / schedule.alpha(t),   # VE sigma (k-diffusion)
    "c_noise": lambda schedule, t: 0.25 * math.log(schedule.sigma(t) / schedule.alpha(t)),  # EDM
}


def _check_name(kind: str, name: str, valid) -> None:
    if name not in valid:
        raise ValueError(f"Unknown {kind} {name!r}; valid names are: {', '.join(sorted(valid))}.")


def _time_tensor(value: float, x: torch.Tensor) -> torch.Tensor:
    # At least float32: a half-precision time would move the noise level (bf16 rounds train index 776.3 to 776).
    return torch.full((x.shape[0],), value, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


class ModelDenoiser(Denoiser):
    """A network wrapped for a schedule; build it with :func:`wrap_model`."""

    def __init__(self, net, schedule: Schedule, prediction: str = "eps", time_input="continuous",
                 model_kwargs: Mapping[str, Any] | None = None, input_dtype: torch.dtype | None = None):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a dpmsolve Schedule, got {type(schedule).__name__}.")
        prediction = _PREDICTION_ALIASES.get(prediction, prediction)
        _check_name("prediction", prediction, PREDICTIONS)
        if isinstance(time_input, str):
            _check_name("time_input", time_input, TIME_INPUTS)
            if time_input == "discrete":
                _discrete_time(schedule, schedule.t_max)  # fail now, not at the first step
            self._time_map = TIME_INPUTS[time_input]
        elif callable(time_input):
            self._time_map = lambda schedule, t: float(time_input(t))
        else:
            raise ValueError("time_input must be a name from TIME_INPUTS or a callable t -> network time.")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.time_input = time_input
        self.model_kwargs = dict(model_kwargs or {})
        self.input_dtype = input_dtype
        self._convert = PREDICTIONS[prediction]

    def network_time(self, t: float) -> float:
        return self._time_map(self.schedule, t)

    def _net_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.input_dtype is not None:
            return self.input_dtype
        if isinstance(self.net, torch.nn.Module):
            for p in self.net.parameters():
                if p.is_floating_point():
                    return p.dtype
        return x.dtype

    @property
    def per_sample_time(self) -> bool:
        return True

    def __call__(self, x: torch.Tensor, t: float | np.ndarray, **model_kwargs) -> Prediction:
        # The network sees its own dtype; the conversion to (x0, eps) runs in x's (sample() passes >= float32).
        net_dtype = self._net_dtype(x)
        time_dtype = torch.promote_types(net_dtype, torch.float32)
        if isinstance(t, np.ndarray):              # one time per sample (see Denoiser.per_sample_time)
            ts = t.astype(np.float64).reshape(-1)
            if ts.size != x.shape[0]:
                raise ValueError(f"Per-sample times need one time per sample: got {ts.size} for a batch of "
                                 f"{x.shape[0]}.")
            t_net = torch.tensor([self.network_time(float(v)) for v in ts], dtype=time_dtype, device=x.device)
            shape = (-1,) + (1,) * (x.dim() - 1)
            a, s = (torch.as_tensor(np.asarray(v, dtype=np.float64)).to(x.device, x.dtype).reshape(shape)
                    for v in (self.schedule.alpha(ts), self.schedule.sigma(ts)))
        else:
            t_net = _time_tensor(self.network_time(t), x).to(time_dtype)
            a, s = self.schedule.alpha_sigma(t)
        out = self.net(x.to(net_dtype), t_net, **{**self.model_kwargs, **model_kwargs})
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
        if out.shape != x.shape:
            raise ValueError(
                f"The model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; it must return "
                "one prediction of the input's shape (drop learned-variance channels before wrapping)."
            )
        return Prediction(*self._convert(out.to(x.dtype), x, a, s))

    def __repr__(self) -> str:
        return f"ModelDenoiser(prediction={self.prediction!r}, time_input={self.time_input!r}, {self.schedule!r})"


def wrap_model(net, schedule: Schedule, prediction: str = "eps", time_input="continuous",
               model_kwargs: Mapping[str, Any] | None = None, input_dtype: torch.dtype | None = None
               ) -> ModelDenoiser:
    """Wrap ``net(x, t_net, **model_kwargs)`` as a denoiser for ``schedule``.

    Args:
        net: the network; called with the batch ``x`` and a time tensor of shape ``(batch,)``.
        schedule: the noise schedule the network was trained with.
        prediction: what the network predicts: ``"eps"``, ``"x0"``, ``"v"`` (``alpha eps - sigma x0``),
            ``"score"`` (``grad log p``) or ``"flow"`` (velocity ``eps - x0``).
        time_input: the network's time input: ``"continuous"`` (the schedule's t), ``"discrete"`` (train index
            ``N t - 1`` of a DiscreteVP, as the reference DPM-Solver), ``"1000t"``, ``"sigma"`` (VE sigma/alpha),
            ``"c_noise"`` (EDM's ``log(sigma)/4``) or a callable ``t -> value``.
        model_kwargs: extra keyword arguments passed to every network call (class labels, text embeddings).
        input_dtype: the dtype the network takes (default: its parameters' dtype for an ``nn.Module``, else the
            dtype of x). The time input goes in at least float32; outputs are converted in x's dtype, which
            ``sample`` keeps at float32 or wider, so an fp16 network is not asked for fp16 arithmetic near
            alpha = 0 or sigma = 0.
    """
    return ModelDenoiser(net, schedule, prediction, time_input, model_kwargs, input_dtype)


class _Wrapper(Denoiser):
    """A denoiser that modifies another one's prediction."""

    def __init__(self, inner: Denoiser):
        if not isinstance(inner, Denoiser):
            raise ValueError("Guidance and correction wrappers take a denoiser built by wrap_model.")
        self.inner = inner
        self.schedule = inner.schedule

    def network_time(self, t: float) -> float:
        return self.inner.network_time(t)


class _X0Correction(_Wrapper):
    """Replace x0 by ``correct(x0)`` and recompute eps consistently."""

    @abstractmethod
    def correct(self, x0: torch.Tensor) -> torch.Tensor:
        """The corrected x0."""

    def __call__(self, x, t, **model_kwargs):
        pred = self.inner(x, t, **model_kwargs)
        x0 = self.correct(pred.x0)
        a, s = self.schedule.alpha_sigma(t)
        return Prediction(x0, (x - a * x0) / s)


class DynamicThresholding(_X0Correction):
    """Imagen's dynamic thresholding of x0 (Saharia et al. 2022): per sample, ``s = max(q_ratio(|x0|),
    max_value)``, then ``x0 = clip(x0, -s, s) / s``."""

    def __init__(self, inner: Denoiser, ratio: float = 0.995, max_value: float = 1.0):
        super().__init__(inner)
        if not (0 < ratio <= 1) or max_value <= 0:
            raise ValueError("DynamicThresholding needs 0 < ratio <= 1 and max_value > 0.")
        self.ratio, self.max_value = ratio, max_value

    def correct(self, x0):
        flat = x0.detach().abs().reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, self.ratio, dim=1).clamp_min(self.max_value)
        s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s


class ClipX0(_X0Correction):
    """Clip the x0 prediction to ``[min_value, max_value]``."""

    def __init__(self, inner: Denoiser, min_value: float = -1.0, max_value: float = 1.0):
        super().__init__(inner)
        if not min_value < max_value:
            raise ValueError("ClipX0 needs min_value < max_value.")
        self.min_value, self.max_value = min_value, max_value

    def correct(self, x0):
        return x0.clamp(self.min_value, self.max_value)


def _concat_kwargs(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict:
    if set(uncond) != set(cond):
        raise ValueError("cond and uncond must name the same model keyword arguments, e.g. "
                         "cond={'y': labels}, uncond={'y': null_labels}.")
    out = {}
    for key in cond:
        u, c = uncond[key], cond[key]
        out[key] = torch.cat([u, c]) if isinstance(c, torch.Tensor) else c
    return out


class ClassifierFreeGuidance(_Wrapper):
    """Classifier-free guidance (Ho & Salimans 2021): ``m = m_u + scale (m_c - m_u)``.

    The conditional and unconditional inputs go through the network in one doubled batch (one NFE, as in the
    papers); ``cond`` and ``uncond`` are dicts of model keyword arguments whose tensors are concatenated along
    dim 0. The combination is applied to (x0, eps) directly: both are affine in the network output with the
    same x, so this equals guidance in the network's own output space. At ``scale == 1`` only the conditional
    half is run.
    """

    def __init__(self, inner: Denoiser, scale: float, cond: Mapping[str, Any], uncond: Mapping[str, Any]):
        super().__init__(inner)
        self.scale = float(scale)
        self.cond, self.uncond = dict(cond), dict(uncond)
        self._both = _concat_kwargs(self.uncond, self.cond)

    @property
    def per_sample_time(self) -> bool:
        return self.inner.per_sample_time

    def __call__(self, x, t, **model_kwargs):
        if self.scale == 1.0:
            return self.inner(x, t, **{**self.cond, **model_kwargs})
        # Per-call tensors with a batch dimension go to both halves (so do per-sample times).
        shared = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0]
                  else v for k, v in model_kwargs.items()}
        t_both = np.concatenate([t, t]) if isinstance(t, np.ndarray) else t
        both = self.inner(torch.cat([x, x]), t_both, **{**self._both, **shared})
        (x0_u, x0_c), (eps_u, eps_c) = both.x0.chunk(2), both.eps.chunk(2)
        return Prediction(x0_u + self.scale * (x0_c - x0_u), eps_u + self.scale * (eps_c - eps_u))


class ClassifierGuidance(_Wrapper):
    """Classifier guidance (Dhariwal & Nichol 2021): ``eps <- eps - scale * sigma_t * grad_x log p(y | x_t)``.

    ``log_prob(x, t_net, **classifier_kwargs)`` returns the per-sample log-probability of the wanted class;
    ``t_net`` is the same network time the denoiser uses.
    """

    def __init__(self, inner: Denoiser, log_prob: Callable, scale: float,
                 classifier_kwargs: Mapping[str, Any] | None = None):
        super().__init__(inner)
        self.log_prob, self.scale = log_prob, float(scale)
        self.classifier_kwargs = dict(classifier_kwargs or {})

    def __call__(self, x, t, **model_kwargs):
        pred = self.inner(x, t, **model_kwargs)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = self.log_prob(x_in, _time_tensor(self.network_time(t), x), **self.classifier_kwargs)
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        a, s = self.schedule.alpha_sigma(t)
        eps = pred.eps - (self.scale * s) * grad.to(pred.eps.dtype)
        return Prediction((x - s * eps) / a, eps)
