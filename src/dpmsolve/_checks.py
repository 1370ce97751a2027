"""Argument checks shared by every entry point: one function per concept, host-side and cheap.

The rule throughout: a wrong *type* raises ``TypeError``, a bad *value* raises ``ValueError``; every message names
the argument, the value given (or its type) and what to pass instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch


def _type(value) -> str:
    return type(value).__name__


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-number or a bool, ValueError for a non-integer
    (2.5, also 2.0: never truncated) or one below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({_type(value)}); pass an int, "
                        f"e.g. {name}={max(minimum, 10)}.")
    if not isinstance(value, numbers.Integral) or value < minimum:
        example = round(value) if math.isfinite(value) else minimum
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({_type(value)}); pass an int, "
                         f"e.g. {name}={max(minimum, example)}.")
    return int(value)


def check_order(name: str, order, allowed) -> int:
    """``order`` as an int if it is one of ``allowed``: TypeError for a non-number (or a bool), ValueError for any
    other value, including non-integers such as 2.5 or 2.0 (never truncated)."""
    valid = ", ".join(map(str, allowed))
    if isinstance(order, bool) or not isinstance(order, numbers.Real):
        raise TypeError(f"{name} supports order {valid}; got {order!r} ({type(order).__name__}), pass an int.")
    if not isinstance(order, numbers.Integral) or order not in allowed:
        raise ValueError(f"{name} supports order {valid}; got {order!r}.")
    return int(order)


def check_real(name: str, value, owner: str = "") -> float:
    """``value`` as a float; TypeError for a non-number or a bool (the value itself is checked by the caller)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        where = f"{owner} " if owner else ""
        raise TypeError(f"{where}{name} must be a real number, got {_type(value)} {value!r}; pass a float.")
    return float(value)


def check_finite(name: str, value, owner: str = "") -> float:
    """``value`` as a finite float: TypeError for a non-number or a bool, ValueError for NaN / Inf."""
    v = check_real(name, value, owner)
    if not math.isfinite(v):
        where = f"{owner} " if owner else ""
        raise ValueError(f"{where}{name} must be finite, got {value!r}.")
    return v


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, owner: str = "") -> float:
    """``value`` as a finite float in the interval [low, high] (``low_open`` / ``high_open``: that end excluded):
    TypeError for a non-number or a bool, ValueError for NaN / Inf or a value outside the interval."""
    v = check_real(name, value, owner)
    inside = math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not inside:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        interval = f"{lo}{low:g}, {'...' if high == math.inf else f'{high:g}'}{hi}"
        where = f"{owner} " if owner else ""
        raise ValueError(f"{where}{name} must be a finite number in {interval}, got {value!r}; pass a value in "
                         "that range.")
    return v


def check_mapping(name: str, value, owner: str = "") -> dict[str, Any]:
    """``value`` (None or a mapping) as a dict; TypeError for anything else (a list of pairs, a string)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        where = f"{owner} " if owner else ""
        raise TypeError(f"{where}{name} must be a dict of keyword arguments (a mapping, e.g. {{'y': labels}}), got "
                        f"{_type(value)} {value!r}.")
    return dict(value)


def check_tensor(name: str, value, *, floating: bool = True, batch: bool = True) -> torch.Tensor:
    """``value`` if it is a torch tensor (of a floating-point dtype, with a batch dimension): TypeError for
    another type or dtype, ValueError for a 0-dim tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type(value)}; convert it with "
                        f"torch.as_tensor({name}, dtype=torch.float32).")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype} (float16, bfloat16, float32 and "
                        f"float64 are accepted); convert it, e.g. {name}.float().")
    if batch and value.dim() < 1:
        raise ValueError(f"{name} must be a tensor with a batch dimension, shape (batch, ...), got a 0-dim tensor; "
                         f"use {name}.reshape(1).")
    return value


def check_denoiser(value, name: str = "denoiser") -> None:
    """TypeError unless ``value`` is a dpmsolve Denoiser (what :func:`dpmsolve.wrap_model` returns)."""
    from .model import Denoiser

    if not isinstance(value, Denoiser):
        raise TypeError(f"{name} must be built by dpmsolve.wrap_model (or be a dpmsolve.Denoiser), got "
                        f"{_type(value)}; wrap the network: dpmsolve.wrap_model(net, schedule, prediction=...).")


def check_schedule(value, name: str = "schedule") -> None:
    """TypeError unless ``value`` is a dpmsolve Schedule."""
    from .schedules import Schedule

    if not isinstance(value, Schedule):
        raise TypeError(f"{name} must be a dpmsolve Schedule (e.g. dpmsolve.LinearVP()), got {value!r} "
                        f"({_type(value)}).")
