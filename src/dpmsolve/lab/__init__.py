"""The accuracy lab: analytic problems with exact solutions, to measure solvers against the true ODE flow, and the
per-sample metrics (median error, far fraction, RMSE with bootstrap intervals) it reports."""

from .problems import (
    AnalyticDenoiser as AnalyticDenoiser,
    AnalyticProblem as AnalyticProblem,
    GaussianData as GaussianData,
    GaussianMixture as GaussianMixture,
    PointMass as PointMass,
    digits_kde as digits_kde,
    reference_solution as reference_solution,
)
from .metrics import (
    CellStats as CellStats,
    cell_stats as cell_stats,
    far_threshold as far_threshold,
    per_sample_errors as per_sample_errors,
    ratio_ci as ratio_ci,
)
