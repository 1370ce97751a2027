"""Sampling plans: a tuned solver as data (a grid of times plus per-step settings), run by the fixed-grid engine.

A :class:`Plan` holds ``steps + 1`` times and, for each step, the settings the exponential-integrator engine
already understands: which prediction it integrates (data x0: DPM-Solver++; noise eps: DPM-Solver; the model's
EMS parametrisation: DPM-Solver-v3, with the model's statistics given at sampling), whether it
is a multistep step or part of a singlestep block, its order (how many evaluations it interpolates), the
weighting rule of the derivative
terms, an optional UniC corrector (Zhao et al. 2023) of the step's result, and a DC-Solver-style compensation
(Zhao et al. 2024): the step's expansion point moved by ``compensation * h`` in lambda, which re-times the
stored predictions to offset their misalignment, and learned multipliers of the step's coefficients (the solver
coefficients fitted to the model, as S4S does: Frankel et al. 2025). Plans are found by :func:`dpmsolve.tune` (the USF idea
of searching the solver per step: Liu et al. 2023) or written by hand, saved as small JSON
files and validated on load against the schedule, sample shape and model they were made for.

The last time may be 0 (sigma = 0): the last step is then the jump to the x0 prediction at the previous time,
as on every dpmsolve grid; ``denoise_to_zero`` adds one final evaluation whose x0 prediction is the sample.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..schedules import Schedule
from ..solvers._exponential import Form, Node, Rule, interpolation_coefficients, step_coefficients
from ..solvers.base import FixedGridSolver
from ..solvers.dpm_solver import CORRECTORS

__all__ = ["Plan", "PlanStep", "PlanSolver", "PlanError", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: PlanStep.scale / corrector_scale
PREDICTS = ("data", "noise", "ems")
EMS_RULES = ("taylor", "pseudo")          # how an EMS step estimates the derivatives of g (DPM-Solver-v3)


class PlanError(ValueError):
    """A plan that is malformed, damaged, or made for another schedule, sample shape or model."""


@dataclass(frozen=True)
class PlanStep:
    """The settings of one step of a plan.

    Attributes:
        predict: ``"data"`` (integrate the x0 prediction, DPM-Solver++), ``"noise"`` (eps, DPM-Solver) or ``"ems"``
            (the model's EMS parametrisation, DPM-Solver-v3, Zheng et al. 2023: the plan runs with ``ems=`` the
            model's statistics; rule ``"taylor"`` or ``"pseudo"``, corrector None or ``"v3"``, multistep only).
        order: 1-3, the number of the latest evaluations of the same prediction the step interpolates (fewer
            while they are not yet available: after a change of prediction the history builds up again).
        rule: how the derivative terms are weighted (``Rule``: ``"taylor"``, ``"dpmsolver"``, ``"bh1"``,
            ``"bh2"``, ``"pseudo"``); DPM-Solver++ 2M is ``"dpmsolver"``, 3M ``"taylor"``.
        corrector: None, or a UniC corrector (``"unic"``, ``"unic-bh1"``, ``"unic-bh2"``; the v3 corrector
            ``"v3"`` on EMS steps) that takes this step again when the model has been evaluated at its result (no
            extra evaluation; not on the last step).
        compensation: expansion point of the step moved by ``compensation * h`` in lambda (0: none; needs
            ``rule="taylor"`` and order >= 2).
        method: ``"multistep"`` (from the current solution through the latest evaluations) or ``"singlestep"``:
            consecutive singlestep steps form blocks of ``order`` steps (fewer where the run ends), each block one
            DPM-Solver-k step from its start through the model evaluated at the grid times inside it (Lu et al. 2022,
            Alg. 1-2; the intermediate points are Taylor steps, the block's last step uses ``rule``). No corrector
            or compensation on singlestep steps.
        scale: multipliers of the step's update coefficients ``(a, c_1, .., c_k)`` in
            ``x' = a x + sum_j c_j m_j`` (k: the points the step interpolates; in a singlestep block, the step's
            stage: the block's start and the points up to this step); empty: all 1. Found by the tuner's
            coefficient fit.
        corrector_scale: the same for the step's corrector (k + 1 points); needs a corrector.
    """

    predict: str = "data"
    order: int = 2
    rule: str = "dpmsolver"
    corrector: str | None = None
    compensation: float = 0.0
    method: str = "multistep"
    scale: tuple[float, ...] = ()
    corrector_scale: tuple[float, ...] = ()

    def __post_init__(self):
        if self.predict not in PREDICTS:
            raise PlanError(f"A plan step's predict must be 'data', 'noise' or 'ems', got {self.predict!r}.")
        if not isinstance(self.order, (int, np.integer)) or isinstance(self.order, bool) or not 1 <= self.order <= 3:
            raise PlanError(f"A plan step's order must be an integer 1-3, got {self.order!r}.")
        object.__setattr__(self, "order", int(self.order))
        if self.rule not in {r.value for r in Rule}:
            raise PlanError(f"A plan step's rule must be one of {', '.join(r.value for r in Rule)}; got {self.rule!r}.")
        if self.predict == "ems":
            if self.rule not in EMS_RULES or self.corrector not in (None, "v3") or self.method != "multistep" \
                    or self.compensation:
                raise PlanError(f"An EMS step (DPM-Solver-v3) takes rule 'taylor' or 'pseudo', corrector None or "
                                f"'v3', method 'multistep' and no compensation; got rule={self.rule!r}, corrector="
                                f"{self.corrector!r}, method={self.method!r}, compensation={self.compensation!r}.")
        elif self.corrector is not None and self.corrector not in CORRECTORS:
            raise PlanError(f"A plan step's corrector must be None or one of {', '.join(CORRECTORS)} ('v3' on EMS "
                            f"steps); got {self.corrector!r}.")
        if not (isinstance(self.compensation, (int, float)) and math.isfinite(self.compensation)):
            raise PlanError(f"A plan step's compensation must be a finite number, got {self.compensation!r}.")
        object.__setattr__(self, "compensation", float(self.compensation))
        if self.method not in ("multistep", "singlestep"):
            raise PlanError(f"A plan step's method must be 'multistep' or 'singlestep', got {self.method!r}.")
        if self.method == "singlestep" and (self.corrector or self.compensation):
            raise PlanError("Singlestep steps take no corrector or compensation.")
        for name in ("scale", "corrector_scale"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise PlanError(f"A plan step's {name} must be a list of numbers, got {value!r}.")
            value = tuple(value)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise PlanError(f"A plan step's {name} must hold finite numbers, got {list(value)!r}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.corrector_scale and self.corrector is None:
            raise PlanError("A plan step's corrector_scale needs a corrector.")
        if self.compensation and (self.rule != "taylor" or self.order < 2):
            raise PlanError("Compensation moves the expansion point of the interpolating polynomial: it needs "
                            f"rule='taylor' and order >= 2 (got rule={self.rule!r}, order={self.order}).")

    @property
    def form(self) -> Form:
        return Form(data=self.predict == "data")

    def short(self) -> str:
        text = f"{self.predict[0].upper()}{self.order}{'S' if self.method == 'singlestep' else ''}"
        text += self.rule[:2]
        text += "+C" if self.corrector else ""
        text += "*" if self.scale or self.corrector_scale else ""
        return text + (f"~{self.compensation:+.2f}" if self.compensation else "")


@dataclass(frozen=True)
class Plan:
    """A grid of times with the settings of every step, and what it was made for.

    Accepted wherever a solver is: ``dp.sample(denoiser, x_T, plan)``. NFE = ``steps`` (+1 with
    ``denoise_to_zero``). ``schedule`` is ``Schedule.fingerprint()``; ``data_shape`` the per-sample shape
    (None: any); ``model`` an identifier of the model (empty: any); ``info`` what the tuner measured; ``ems`` the
    model's statistics its DPM-Solver-v3 steps run with (not saved: :meth:`with_ems`, ``Plan.load(..., ems=)``;
    ``dpmsolve.tune`` and ``dpmsolve.zoo.plan`` attach them).
    """

    ts: tuple[float, ...]
    steps: tuple[PlanStep, ...]
    denoise_to_zero: bool = False
    schedule: str = ""
    data_shape: tuple[int, ...] | None = None
    model: str = ""
    info: dict = field(default_factory=dict, compare=False)
    ems: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        ts = np.asarray(self.ts, dtype=np.float64).reshape(-1)
        if ts.size < 2 or not np.all(np.isfinite(ts)) or not np.all(np.diff(ts) < 0) or ts[-1] < 0:
            raise PlanError(f"A plan's times must be >= 2 finite, strictly decreasing values >= 0; got {ts.tolist()}.")
        object.__setattr__(self, "ts", tuple(float(t) for t in ts))
        steps = tuple(s if isinstance(s, PlanStep) else PlanStep(**s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if len(steps) != ts.size - 1:
            raise PlanError(f"A plan with {ts.size} times has {ts.size - 1} steps, but {len(steps)} step settings "
                            "were given.")
        if steps[-1].corrector is not None:
            raise PlanError("The last step of a plan cannot have a corrector (there is no evaluation at its end).")
        for i in range(1, len(steps)):
            if steps[i - 1].corrector is not None and steps[i].predict != steps[i - 1].predict:
                raise PlanError(f"Step {i - 1} has a corrector but step {i} integrates another prediction "
                                f"({steps[i].predict!r}); a corrector needs the next evaluation in its own form.")
        if ts[-1] == 0.0 and self.denoise_to_zero:
            raise PlanError("A plan ending at sigma = 0 (t = 0) cannot also denoise to zero.")
        if self.data_shape is not None:
            object.__setattr__(self, "data_shape", tuple(int(d) for d in self.data_shape))
        object.__setattr__(self, "denoise_to_zero", bool(self.denoise_to_zero))

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def multistep(cls, ts: Sequence[float], predict: str = "data", order: int = 2, rule: str = "dpmsolver",
                  corrector: str | None = None, lower_order_final: bool = False, **fields) -> Plan:
        """The same multistep settings at every step (``lower_order_final``: order ``steps - i`` at the end);
        the corrector is left off the last step. ``fields``: the Plan's other fields."""
        n = len(ts) - 1
        steps = []
        for i in range(n):
            p = min(order, n - i) if lower_order_final else order
            steps.append(PlanStep(predict, p, rule, corrector if i < n - 1 else None))
        return cls(tuple(ts), tuple(steps), **fields)

    def with_times(self, ts: Sequence[float]) -> Plan:
        """The same step settings on other times (same number of steps)."""
        return replace(self, ts=tuple(float(t) for t in ts))

    # --------------------------------------------------------------------------------------------- facts
    @property
    def nfe(self) -> int:
        """Model evaluations of a sample with this plan."""
        return len(self.steps) + int(self.denoise_to_zero)

    @property
    def to_zero(self) -> bool:
        """True when the plan's sample is at sigma = 0 (a final jump or a final denoising evaluation)."""
        return self.ts[-1] == 0.0 or self.denoise_to_zero

    @property
    def uses_ems(self) -> bool:
        """Whether some step integrates the model's EMS (then the plan runs with ``ems=`` its statistics)."""
        return any(s.predict == "ems" for s in self.steps)

    def solver(self, ems=None) -> PlanSolver:
        """The solver that runs this plan (``ems``: statistics for its EMS steps; default: the attached ones)."""
        return PlanSolver(self.steps, self.ems if ems is None else ems)

    def with_ems(self, ems) -> Plan:
        """This plan with the model's EMS attached (an ``EMS`` or the path of an EMS file), so that
        ``dp.sample(denoiser, x, plan)`` runs its DPM-Solver-v3 steps without ``ems=``."""
        from ..solvers.v3 import DPMSolverV3

        return replace(self, ems=None if ems is None else DPMSolverV3(ems).statistics)

    def check(self, schedule: Schedule | None = None, data_shape=None, model: str | None = None) -> None:
        """Raise a :class:`PlanError` when this plan was made for another schedule, sample shape or model."""
        if schedule is not None:
            if self.schedule and schedule.fingerprint() != self.schedule:
                raise PlanError(f"This plan was made for the schedule {self.schedule}, not {schedule.fingerprint()}; "
                                "tune one for this schedule (dpmsolve.tune).")
            body = np.asarray(self.ts[:-1] if self.ts[-1] == 0.0 else self.ts)
            if not schedule.contains(body):
                raise PlanError(f"This plan's times {self.ts[0]:.6g} .. {self.ts[-1]:.6g} leave the schedule's range "
                                f"[{schedule.t_min:.6g}, {schedule.t_max:.6g}].")
        if data_shape is not None and self.data_shape is not None and tuple(data_shape) != self.data_shape:
            raise PlanError(f"This plan was made for samples of shape {self.data_shape}, not {tuple(data_shape)}; "
                            "tune one for this shape.")
        if model is not None and self.model and model != self.model:
            raise PlanError(f"This plan was made for the model {self.model!r}, not {model!r}; tune one for this "
                            "model (dpmsolve.tune), or load it without model= to use it anyway.")

    # --------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"format": "dpmsolve-plan", "version": FORMAT_VERSION, "ts": list(self.ts),
                "steps": [asdict(s) for s in self.steps], "denoise_to_zero": self.denoise_to_zero,
                "schedule": self.schedule, "data_shape": None if self.data_shape is None else list(self.data_shape),
                "model": self.model, "info": self.info}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the plan") -> Plan:
        if not isinstance(data, dict) or data.get("format") != "dpmsolve-plan":
            raise PlanError(f"{source} is not a dpmsolve plan (no 'format': 'dpmsolve-plan').")
        version = data.get("version", -1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise PlanError(f"{source} has plan format version {version!r} ({type(version).__name__}); a plan's version "
                            f"must be an integer (this dpmsolve writes {FORMAT_VERSION}). The file is damaged: save the "
                            "plan again with Plan.save.")
        if version > FORMAT_VERSION:
            raise PlanError(f"{source} has plan format version {data['version']}; this dpmsolve reads up to "
                            f"{FORMAT_VERSION}. Upgrade dpmsolve.")
        try:
            steps = tuple(PlanStep(**s) for s in data["steps"])
            shape = data.get("data_shape")
            return cls(tuple(data["ts"]), steps, bool(data.get("denoise_to_zero", False)), str(data.get("schedule", "")),
                       None if shape is None else tuple(shape), str(data.get("model", "")), dict(data.get("info", {})))
        except PlanError as err:
            raise PlanError(f"{source} is not a valid plan: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"{source} is damaged ({type(err).__name__}: {err}).") from None

    def save(self, path) -> Path:
        """Write the plan as JSON (times as exact float64 decimal strings)."""
        from ..ems.statistics import prepare_output_path

        path = prepare_output_path(path, "plan")
        path.write_text(json.dumps(self.to_dict(), indent=1, default=float) + "\n")
        return path

    @classmethod
    def load(cls, path, schedule: Schedule | None = None, data_shape=None, model: str | None = None,
             ems=None) -> Plan:
        """Read a plan written by :meth:`save`; with ``schedule`` / ``data_shape`` / ``model`` given, refuse (a
        :class:`PlanError`) a plan made for another; ``ems``: the statistics to attach (:meth:`with_ems`)."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"No plan file at {path}.")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlanError(f"{path} is not a readable plan file ({err}).") from None
        plan = cls.from_dict(data, str(path))
        plan.check(schedule, data_shape, model)
        return plan if ems is None else plan.with_ems(ems)

    # -------------------------------------------------------------------------------------------- report
    def report(self) -> str:
        """What the plan is, and what tuning measured (tuning vs held-out error, cost in model evaluations)."""
        end = "sigma = 0 (final jump)" if self.ts[-1] == 0.0 else f"t = {self.ts[-1]:.4g}"
        end += " + final denoising evaluation" if self.denoise_to_zero else ""
        lines = [f"Plan: {self.nfe} model evaluations, {len(self.steps)} steps to {end}",
                 f"  schedule {self.schedule or '(any)'}, samples {self.data_shape or '(any shape)'}, model "
                 f"{self.model or '(any)'}",
                 "  times:  " + " ".join(f"{t:.4g}" for t in self.ts),
                 "  steps:  " + " ".join(s.short() for s in self.steps)
                 + "   (D/N/E: data/noise/EMS prediction, order, S: singlestep, rule, +C: corrector, *: fitted "
                 "coefficient scales, ~: compensation)"]
        if self.uses_ems:
            lines.append("  runs DPM-Solver-v3 steps with the model's EMS: " + (
                "attached" if self.ems is not None else "not attached, pass them: plan.with_ems(ems) or "
                "dp.sample(denoiser, x, plan, ems=...)"))
        info = self.info
        if info:
            lines.append(f"  tuned: {info.get('candidate', '?')}; objective {info.get('objective', '?')}")
            for key, label in (("tune", "tuning noises"), ("held_out", "held-out noises")):
                if key in info:
                    r = info[key]
                    lines.append(f"  {label} ({r['n']}): median error {r['median']:.4g} (start {r['start_median']:.4g}),"
                                 f" RMSE {r['rmse']:.4g} (start {r['start_rmse']:.4g}), far {100 * r['far']:.1f}%")
            if "fit" in info:
                f = info["fit"]
                verdict = "kept" if f["kept"] else f"not kept ({f['why']})"
                lines.append(f"  coefficient fit: {f['parameters']} scales, {f['iterations']} iterations; check-noise "
                             f"objective {f['check_before']:.4g} -> {f.get('check_after', f['check_before']):.4g}, "
                             f"{verdict}")
            if "cost" in info:
                c = info["cost"]
                lines.append(f"  cost: {c['model_evaluations']} model evaluations ({c['reference_evaluations']} for "
                             f"references, {c['search_evaluations']} in the search, {c.get('fit_evaluations', 0)} in "
                             f"the coefficient fit), {c['seconds']:.1f} s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan(nfe={self.nfe}, steps=[{' '.join(s.short() for s in self.steps)}], ts=[{self.ts[0]:.4g} .. "
                f"{self.ts[-1]:.4g}], model={self.model!r})")


class PlanSolver(FixedGridSolver):
    """Runs a plan's per-step settings on the fixed-grid engine (one evaluation per grid time but the last).

    Step i integrates its own prediction with the latest ``order`` evaluations made in that prediction (the
    history each evaluation leaves is the prediction of the step that starts there), weighted by its rule,
    optionally compensated, and its result is corrected by UniC when the next evaluation arrives.
    """

    def __init__(self, steps: Sequence[PlanStep], ems=None):
        self.steps = tuple(steps)
        if not self.steps:
            raise PlanError("A plan solver needs at least one step.")
        predicts = {s.predict for s in self.steps}
        names = {"data": "x0", "noise": "eps", "ems": "g"}
        self.integrates = "/".join(names[p] for p in PREDICTS if p in predicts)
        self.v3 = None
        if "ems" in predicts:
            from ..ems.statistics import EMSError
            from ..solvers.v3 import DPMSolverV3

            if ems is None:
                raise EMSError("This plan has DPM-Solver-v3 steps (predict 'ems'): pass the model's statistics, "
                               "e.g. dp.sample(denoiser, x, plan, ems=dpmsolve.ems.EMS.load(path)).")
            self.v3 = DPMSolverV3(ems)       # its EMS coefficient maths, for the EMS steps (unused otherwise)

    def init(self, schedule, ts, x, generator=None):
        if self.v3 is not None:
            self.v3.statistics.check(schedule, tuple(x.shape[1:]))
        return super().init(schedule, ts, x, generator)

    def _check_nodes(self, schedule, nodes):
        if self.v3 is not None:
            self.v3.statistics.check(schedule)
            ems_nodes = {j for i, s in enumerate(self.steps) if s.predict == "ems" for j in (i, i + 1)}
            self.v3.statistics.check_range([nodes[j].lam for j in sorted(ems_nodes) if math.isfinite(nodes[j].lam)])

    @property
    def order(self) -> int:
        bulk = self.steps[1:] or self.steps
        return min(min(s.order + (s.corrector is not None), 3) for s in bulk)

    def _points(self, i: int) -> tuple[int, ...]:
        step, points = self.steps[i], [i]
        while len(points) < step.order and points[-1] > 0 and self.steps[points[-1] - 1].predict == step.predict:
            points.append(points[-1] - 1)
        return tuple(points)

    def blocks(self) -> list[tuple[int, int]]:
        """(start, length) of the singlestep blocks: each run of singlestep steps split into blocks of the order
        of each block's first step (the last block of a run takes what is left)."""
        out, i, n = [], 0, len(self.steps)
        while i < n:
            if self.steps[i].method != "singlestep":
                i += 1
                continue
            end = i
            while end < n and self.steps[end].method == "singlestep":
                end += 1
            while i < end:
                length = min(self.steps[i].order, end - i)
                out.append((i, length))
                i += length
        return out

    def _stages(self, steps):
        if steps != len(self.steps):
            raise PlanError(f"This plan has {len(self.steps)} steps but the grid has {steps}; use the plan's own times.")
        stages = [(i, self._points(i), Rule(s.rule), True) for i, s in enumerate(self.steps)]
        for start, length in self.blocks():
            predicts = {self.steps[j].predict for j in range(start, start + length)}
            if len(predicts) > 1:
                raise PlanError(f"The singlestep block of steps {start}-{start + length - 1} mixes predictions.")
            for q in range(length):
                last = q == length - 1
                rule = Rule(self.steps[start + q].rule) if last else Rule.TAYLOR
                stages[start + q] = (start, tuple(range(start, start + q + 1)), rule, last)
        return stages

    def _correctors(self, stages, nodes):
        out = [None]
        for i in range(1, len(stages)):
            before = self.steps[i - 1]
            points = stages[i - 1][1]
            if before.corrector == "v3":     # v3's own corrector: the predictor's order, the newest point for its oldest
                out.append((i - 1, (i - 1, i) + points[1:-1], Rule.TAYLOR))
            else:
                out.append((i - 1, points + (i,), CORRECTORS[before.corrector]) if before.corrector else None)
        return out

    def _update(self, nodes: tuple[Node, ...], anchor, points, end, rule):
        step = self.steps[anchor]
        s, t = nodes[anchor], nodes[end]
        rhos = np.array([(nodes[j].lam - s.lam) / (t.lam - s.lam) for j in points])
        offset = None
        if step.predict == "ems":                      # v3's own coefficient maths
            a, coeffs, _, offset = self.v3._update(nodes, anchor, points, end, rule)
        elif step.compensation and end not in points:   # the predictor of a compensated step
            a, w = step.form.linear_and_weights(s, t, len(points))
            coeffs = interpolation_coefficients(rhos - step.compensation, w)
        else:
            a, coeffs = step_coefficients(step.form, s, t, rhos, rule)
        owner = self.steps[end - 1]                  # the step whose stage (or corrector) ends at ``end``
        scale = owner.corrector_scale if end in points else owner.scale
        if scale:
            if len(scale) != len(points) + 1:
                kind = "corrector_scale" if end in points else "scale"
                raise PlanError(f"Step {end - 1}'s {kind} has {len(scale)} values, but its update has {len(points) + 1} "
                                f"coefficients (a and {len(points)} point(s)); the plan's steps do not fit together.")
            a, coeffs = a * scale[0], [c * f for c, f in zip(coeffs, scale[1:])]
        if step.predict == "ems":                      # per-element arrays
            return a, tuple(coeffs), 0.0, offset
        return a, tuple(float(c) for c in coeffs), 0.0, None

    def _to_zero(self, nodes, i):
        if self.steps[i].predict == "ems":
            return self.v3._to_zero(nodes, i)
        a, coeffs = self.steps[i].form.to_zero(nodes[i])
        return a, coeffs, None

    def _aux(self, nodes, i):
        return self.v3._aux(nodes, i) if self.steps[i].predict == "ems" else self.steps[i].form

    def _integrand(self, stage, x_eval, pred):
        if isinstance(stage.aux, Form):
            return stage.aux.pick(pred)
        return self.v3._integrand(stage, x_eval, pred)

    def __repr__(self):
        return f"PlanSolver([{' '.join(s.short() for s in self.steps)}])"
