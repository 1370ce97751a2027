"""The accuracy lab: analytic problems with exact solutions, to measure solvers against the true ODE flow."""

from .problems import (
    AnalyticDenoiser as AnalyticDenoiser,
    AnalyticProblem as AnalyticProblem,
    GaussianData as GaussianData,
    GaussianMixture as GaussianMixture,
    PointMass as PointMass,
    digits_kde as digits_kde,
    reference_solution as reference_solution,
)
