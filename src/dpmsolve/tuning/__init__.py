"""Tuned sampling plans: :class:`Plan` (a grid plus per-step settings, run by the fixed-grid engine) and the
search that finds one for a model and a step budget (:func:`tune`)."""

from .plan import FORMAT_VERSION, Plan, PlanError, PlanSolver, PlanStep
from .search import FAMILIES, model_identity, plan_errors, tune

__all__ = ["tune", "FAMILIES", "model_identity", "plan_errors", "Plan", "PlanStep", "PlanSolver", "PlanError",
           "FORMAT_VERSION"]
