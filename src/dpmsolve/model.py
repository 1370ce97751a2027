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

from ._checks import check_finite, check_mapping, check_real
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


def _real(owner: str, name: str, value) -> float:
    """``value`` (a number or a one-element float tensor, read once at construction) as a finite float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    return check_finite(name, value, owner)


def _network_output(out) -> torch.Tensor:
    """The prediction tensor in a network's output: a tensor, a diffusers output's ``.sample``, or the first item
    of a tuple (``return_dict=False``); a TypeError naming what came back otherwise."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hint = {type(None): " (does its forward() end without a return?)",
            np.ndarray: "; convert it with torch.from_numpy, on x's device",
            dict: f" with keys {sorted(map(str, out))}; wrap it to pick the prediction, e.g. "
                  "lambda x, t: net(x, t)['eps']" if isinstance(out, dict) else ""}.get(type(out), "")
    raise TypeError(f"The network returned {type(out).__name__}{hint}; wrap_model expects a torch.Tensor of the "
                    "input's shape (or a tuple / diffusers output whose first item / .sample is one).")


def _time_tensor(value: float, x: torch.Tensor) -> torch.Tensor:
    # At least float32: a half-precision time would move the noise level (bf16 rounds train index 776.3 to 776).
    return torch.full((x.shape[0],), value, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _callable_time(time_input: Callable) -> Callable[[Schedule, float], float]:
    def mapped(schedule, t):
        value = time_input(t)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"The time_input callable returned {type(value).__name__} {value!r} for t={t!r}; it must "
                            "return a number, the network's time input.") from None
    return mapped


class ModelDenoiser(Denoiser):
    """A network wrapped for a schedule; build it with :func:`wrap_model`."""

    def __init__(self, net, schedule: Schedule, prediction: str = "eps", time_input=None,
                 model_kwargs: Mapping[str, Any] | None = None, input_dtype: torch.dtype | None = None):
        if not callable(net):
            raise TypeError(f"net must be the network (an nn.Module or a function net(x, t, **kwargs)), got "
                            f"{type(net).__name__} {net!r:.80}.")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a dpmsolve Schedule (e.g. dpmsolve.DiscreteVP.linear()), got "
                            f"{type(schedule).__name__}.")
        if not isinstance(prediction, str):
            raise TypeError(f"prediction must be a name from PREDICTIONS, got {type(prediction).__name__}.")
        prediction = _PREDICTION_ALIASES.get(prediction, prediction)
        _check_name("prediction", prediction, PREDICTIONS)
        if time_input is None:                     # what the schedule implies: a DDPM table's train index
            time_input = "discrete" if isinstance(schedule, DiscreteVP) else "continuous"
        if isinstance(time_input, str):
            _check_name("time_input", time_input, TIME_INPUTS)
            if time_input == "discrete":
                _discrete_time(schedule, schedule.t_max)  # fail now, not at the first step
            self._time_map = TIME_INPUTS[time_input]
        elif callable(time_input):
            self._time_map = _callable_time(time_input)
        else:
            raise TypeError(f"time_input must be a name from TIME_INPUTS or a callable t -> network time, got "
                            f"{type(time_input).__name__} {time_input!r}.")
        if input_dtype is not None and not (isinstance(input_dtype, torch.dtype) and input_dtype.is_floating_point):
            raise TypeError(f"input_dtype must be a floating-point torch.dtype (e.g. torch.float16) or None, got "
                            f"{type(input_dtype).__name__} {input_dtype!r}.")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.time_input = time_input
        self.model_kwargs = check_mapping("model_kwargs", model_kwargs, "wrap_model")
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
        if x.shape[0] == 0:                        # an empty batch: nothing to evaluate (networks may fail on it)
            return Prediction(torch.empty_like(x), torch.empty_like(x))
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
        out = _network_output(self.net(x.to(net_dtype), t_net, **{**self.model_kwargs, **model_kwargs}))
        if not out.is_floating_point():
            raise TypeError(f"The network returned a tensor of dtype {out.dtype}; it must return a floating-point "
                            "prediction.")
        if out.shape != x.shape:
            raise ValueError(
                f"The model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; it must return "
                "one prediction of the input's shape (drop learned-variance channels before wrapping)."
            )
        return Prediction(*self._convert(out.to(x.dtype), x, a, s))

    def __repr__(self) -> str:
        return f"ModelDenoiser(prediction={self.prediction!r}, time_input={self.time_input!r}, {self.schedule!r})"


def wrap_model(net, schedule: Schedule, prediction: str = "eps", time_input=None,
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
            ``"c_noise"`` (EDM's ``log(sigma)/4``) or a callable ``t -> value``. Default (None): what the
            schedule implies, ``"discrete"`` for a :class:`DiscreteVP` (a DDPM network takes its integer train
            step, as diffusers and the reference's "discrete" model type) and ``"continuous"`` for the others.
            A DDPM network fed the continuous t in [1/N, 1] instead sees "train step 0 or 1" throughout and
            samples blow up; pass ``"continuous"`` explicitly for a network trained on t itself.
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
            raise TypeError(f"{type(self).__name__} wraps a dpmsolve denoiser (built by wrap_model), got "
                            f"{type(inner).__name__}; wrap the network first: wrap_model(net, schedule, ...).")
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
        if x.shape[0] == 0:
            return pred
        x0 = self.correct(pred.x0)
        a, s = self.schedule.alpha_sigma(t)
        return Prediction(x0, (x - a * x0) / s)


class DynamicThresholding(_X0Correction):
    """Imagen's dynamic thresholding of x0 (Saharia et al. 2022): per sample, ``s = max(q_ratio(|x0|),
    max_value)``, then ``x0 = clip(x0, -s, s) / s``."""

    def __init__(self, inner: Denoiser, ratio: float = 0.995, max_value: float = 1.0):
        super().__init__(inner)
        ratio = _real("DynamicThresholding", "ratio", ratio)
        max_value = _real("DynamicThresholding", "max_value", max_value)
        if not 0 < ratio <= 1:
            raise ValueError(f"DynamicThresholding needs a quantile 0 < ratio <= 1 (Imagen: 0.995); got "
                             f"ratio={ratio!r}.")
        if not max_value > 0:
            raise ValueError(f"DynamicThresholding needs max_value > 0 (the data range, 1 for [-1, 1]); got "
                             f"max_value={max_value!r}.")
        self.ratio, self.max_value = ratio, max_value

    def correct(self, x0):
        flat = x0.detach().abs().reshape(x0.shape[0], math.prod(x0.shape[1:]))
        flat = flat.to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, self.ratio, dim=1).clamp_min(self.max_value)
        s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s


class ClipX0(_X0Correction):
    """Clip the x0 prediction to ``[min_value, max_value]``."""

    def __init__(self, inner: Denoiser, min_value: float = -1.0, max_value: float = 1.0):
        super().__init__(inner)
        min_value, max_value = _real("ClipX0", "min_value", min_value), _real("ClipX0", "max_value", max_value)
        if not min_value < max_value:
            raise ValueError(f"ClipX0 needs min_value < max_value; got min_value={min_value!r}, "
                             f"max_value={max_value!r}.")
        self.min_value, self.max_value = min_value, max_value

    def correct(self, x0):
        return x0.clamp(self.min_value, self.max_value)


def _same(u, c) -> bool:
    try:
        return u is c or bool(u == c)
    except Exception:  # noqa: BLE001 - e.g. arrays, whose == is element-wise
        return False


def _concat_kwargs(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict:
    if set(uncond) != set(cond):
        raise ValueError("cond and uncond must name the same model keyword arguments, e.g. "
                         "cond={'y': labels}, uncond={'y': null_labels}.")
    out = {}
    for key in cond:
        u, c = uncond[key], cond[key]
        if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
            if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor) and c.dim() and u.dim()):
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors with one row per sample "
                                 f"(got {type(c).__name__} {tuple(getattr(c, 'shape', ()))} and {type(u).__name__} "
                                 f"{tuple(getattr(u, 'shape', ()))}).")
            if c.shape[0] != u.shape[0]:
                raise ValueError(f"cond[{key!r}] has {c.shape[0]} rows but uncond[{key!r}] has {u.shape[0]}; both "
                                 "need one row per sample of the batch.")
            out[key] = torch.cat([u, c])
        elif _same(u, c):
            out[key] = c                           # shared by both halves (e.g. a mode string)
        else:
            raise ValueError(f"cond[{key!r}] = {c!r} and uncond[{key!r}] = {u!r} differ but are not tensors, so one "
                             "network call cannot hold both; pass them as tensors with one row per sample.")
    return out


def _check_rows(kwargs: Mapping[str, Any], batch: int, what: str) -> None:
    for key, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.shape[0] != batch:
            raise ValueError(f"ClassifierFreeGuidance {what}[{key!r}] has {v.shape[0]} rows for a batch of {batch} "
                             "samples; give one row per sample (e.g. labels.expand(batch) or a slice).")


def _guidance_interval(interval) -> tuple[float, float] | None:
    """``interval`` (None or two VE noise levels ``(sigma_lo, sigma_hi)``, 0 <= sigma_lo < sigma_hi) as floats."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise TypeError(f"ClassifierFreeGuidance interval must be None or a pair (sigma_lo, sigma_hi) of VE noise "
                        f"levels sigma/alpha, e.g. interval=(0.28, 5.42); got {interval!r}.")
    lo, hi = (check_real(name, v, "ClassifierFreeGuidance") for name, v in zip(("interval[0]", "interval[1]"),
                                                                           interval))
    if not (0.0 <= lo < hi) or math.isnan(hi):
        raise ValueError(f"ClassifierFreeGuidance interval needs 0 <= sigma_lo < sigma_hi (VE noise levels "
                         f"sigma/alpha; sigma_hi may be math.inf); got interval={interval!r}.")
    return lo, hi


class ClassifierFreeGuidance(_Wrapper):
    """Classifier-free guidance (Ho & Salimans 2021): ``m = m_u + scale (m_c - m_u)``.

    The conditional and unconditional inputs go through the network in one doubled batch (one NFE, as in the
    papers); ``cond`` and ``uncond`` are dicts of model keyword arguments whose tensors are concatenated along
    dim 0. The combination is applied to (x0, eps) directly: both are affine in the network output with the
    same x, so this equals guidance in the network's own output space. At ``scale == 1`` only the conditional
    half is run.

    ``interval=(sigma_lo, sigma_hi)`` applies the guidance only at noise levels ``sigma_lo < rho <= sigma_hi``
    and runs the plain conditional model (scale 1) elsewhere (Kynkaenniemi et al. 2024, "Applying guidance in a
    limited interval improves sample and distribution quality in diffusion models"). ``rho = sigma_t / alpha_t =
    exp(-lambda_t)`` is the VE noise level, EDM's sigma, in which the paper states its intervals (e.g.
    ``(0.28, 5.42]`` for EDM2-XXL): the same number means the same noise-to-signal ratio on every schedule (VP,
    VE/EDM, rectified flow), so an interval carries over between models. Outside the interval only the
    conditional half goes through the network (half the compute; the evaluation still counts as one NFE). With
    per-sample times, samples outside the interval get scale 1. ``sigma_hi`` may be ``math.inf``.
    """

    def __init__(self, inner: Denoiser, scale: float, cond: Mapping[str, Any], uncond: Mapping[str, Any],
                 interval: tuple[float, float] | None = None):
        super().__init__(inner)
        self.scale = _real("ClassifierFreeGuidance", "scale", scale)
        if self.scale < 0:
            raise ValueError(f"ClassifierFreeGuidance needs scale >= 0 (0: unconditional, 1: conditional, usually "
                             f"1-15); got scale={scale!r}.")
        self.interval = _guidance_interval(interval)
        if not isinstance(cond, Mapping) or not isinstance(uncond, Mapping):
            bad, value = ("cond", cond) if not isinstance(cond, Mapping) else ("uncond", uncond)
            raise TypeError(f"ClassifierFreeGuidance {bad} must be a dict of model keyword arguments, e.g. "
                            f"cond={{'y': labels}}, uncond={{'y': null_labels}}; got {type(value).__name__}.")
        self.cond, self.uncond = dict(cond), dict(uncond)
        self._both = _concat_kwargs(self.uncond, self.cond)

    @property
    def per_sample_time(self) -> bool:
        return self.inner.per_sample_time

    def guided_at(self, t) -> bool | np.ndarray:
        """Whether the guidance applies at time ``t`` (a bool; an array of bools for per-sample times)."""
        if self.interval is None:
            return True if not isinstance(t, np.ndarray) else np.ones(np.shape(t), dtype=bool)
        lo, hi = self.interval
        rho = np.exp(-np.asarray(self.schedule.log_snr(t), dtype=np.float64))   # sigma / alpha, VE noise level
        inside = (rho > lo) & (rho <= hi)
        return inside if isinstance(t, np.ndarray) else bool(inside)

    def __call__(self, x, t, **model_kwargs):
        _check_rows(self.cond, x.shape[0], "cond")
        inside = self.guided_at(t)
        if self.scale == 1.0 or not np.any(inside):
            return self.inner(x, t, **{**self.cond, **model_kwargs})
        # Per-call tensors with a batch dimension go to both halves (so do per-sample times).
        shared = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0]
                  else v for k, v in model_kwargs.items()}
        t_both = np.concatenate([t, t]) if isinstance(t, np.ndarray) else t
        both = self.inner(torch.cat([x, x]), t_both, **{**self._both, **shared})
        (x0_u, x0_c), (eps_u, eps_c) = both.x0.chunk(2), both.eps.chunk(2)
        scale = self.scale
        if not np.all(inside):                     # per-sample times, some outside the interval: scale 1 there
            per_sample = np.where(np.asarray(inside).reshape(-1), self.scale, 1.0)
            scale = torch.as_tensor(per_sample, dtype=x0_c.dtype, device=x0_c.device)
            scale = scale.reshape((-1,) + (1,) * (x0_c.dim() - 1))
        return Prediction(x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u))

    def __repr__(self) -> str:
        interval = "" if self.interval is None else f", interval={self.interval}"
        return f"ClassifierFreeGuidance(scale={self.scale:g}{interval}, {self.inner!r})"


class ClassifierGuidance(_Wrapper):
    """Classifier guidance (Dhariwal & Nichol 2021): ``eps <- eps - scale * sigma_t * grad_x log p(y | x_t)``.

    ``log_prob(x, t_net, **classifier_kwargs)`` returns the per-sample log-probability of the wanted class;
    ``t_net`` is the same network time the denoiser uses.
    """

    def __init__(self, inner: Denoiser, log_prob: Callable, scale: float,
                 classifier_kwargs: Mapping[str, Any] | None = None):
        super().__init__(inner)
        if not callable(log_prob):
            raise TypeError(f"ClassifierGuidance log_prob must be a function log_prob(x, t_net, **kwargs) -> "
                            f"per-sample log p(y | x), got {type(log_prob).__name__}.")
        self.log_prob, self.scale = log_prob, _real("ClassifierGuidance", "scale", scale)
        self.classifier_kwargs = check_mapping("classifier_kwargs", classifier_kwargs, "ClassifierGuidance")

    def _gradient(self, x, t) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = self.log_prob(x_in, _time_tensor(self.network_time(t), x), **self.classifier_kwargs)
            if not isinstance(lp, torch.Tensor):
                raise TypeError(f"ClassifierGuidance log_prob returned {type(lp).__name__}; it must return a tensor "
                                f"of per-sample log-probabilities, shape ({x.shape[0]},).")
            if lp.numel() != x.shape[0]:
                raise ValueError(f"ClassifierGuidance log_prob returned shape {tuple(lp.shape)} for a batch of "
                                 f"{x.shape[0]}; it must return one log-probability per sample (pick the wanted "
                                 "class, e.g. logits.log_softmax(-1)[range(n), y]).")
            grad = torch.autograd.grad(lp.sum(), x_in, allow_unused=True)[0] if lp.requires_grad else None
        if grad is None:
            raise ValueError("ClassifierGuidance log_prob's output does not depend on x (no gradient reaches x): it "
                             "must be differentiable in x, so do not detach x, call .item()/numpy on it, or run the "
                             "classifier under torch.no_grad().")
        return grad

    def __call__(self, x, t, **model_kwargs):
        pred = self.inner(x, t, **model_kwargs)
        if x.shape[0] == 0:
            return pred
        grad = self._gradient(x, t)
        a, s = self.schedule.alpha_sigma(t)
        eps = pred.eps - (self.scale * s) * grad.to(pred.eps.dtype)
        return Prediction((x - s * eps) / a, eps)
