"""Per-sample lab metrics (dpmsolve.lab.metrics) against truths computed independently of the module."""

import math

import numpy as np
import pytest
import torch

from dpmsolve.lab.metrics import CellStats, cell_stats, far_threshold, per_sample_errors, ratio_ci


def test_per_sample_errors_hand_computed():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    ref = torch.zeros(3, 2)
    ref[2] = torch.tensor([2.0, 0.0])
    e = per_sample_errors(x, ref)
    # sqrt((9 + 16) / 2), sqrt((1 + 1) / 2), sqrt((4 + 0) / 2)
    assert e.dtype == torch.float64 and e.shape == (3,)
    assert torch.allclose(e, torch.tensor([math.sqrt(12.5), 1.0, math.sqrt(2.0)], dtype=torch.float64))
    # all non-batch coordinates, image-shaped samples: the same as the flattened ones
    xi = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert torch.allclose(per_sample_errors(xi, torch.zeros_like(xi)), per_sample_errors(xi.reshape(2, -1),
                                                                                          torch.zeros(2, 12)))
    # the RMS of the per-sample errors is the RMSE per coordinate of the batch
    assert float(e.pow(2).mean().sqrt()) == pytest.approx(math.sqrt((25 + 2 + 4) / 6))
    with pytest.raises(ValueError, match="shape"):
        per_sample_errors(x, ref[:2])


def test_far_threshold_hand_computed():
    # mean (1, 0); deviations (+-1, +-1) in every coordinate -> RMS spread 1, threshold 0.5
    ref = torch.tensor([[0.0, -1.0], [2.0, 1.0], [0.0, 1.0], [2.0, -1.0]])
    assert far_threshold(ref) == pytest.approx(0.5)
    # scale-free: scaling the data scales the threshold
    assert far_threshold(3.0 * ref) == pytest.approx(1.5)
    assert far_threshold(ref + 10.0) == pytest.approx(0.5)


def test_cell_stats_small_example_point_values():
    ref = torch.zeros(5, 1)
    x = torch.tensor([[0.1], [0.2], [0.3], [2.0], [-0.4]])
    s = cell_stats(x, ref, threshold=1.0, n_boot=200)
    assert isinstance(s, CellStats) and s.n == 5 and s.threshold == 1.0
    assert s.median == pytest.approx(0.3)
    assert s.far == pytest.approx(0.2)          # one of five above 1.0
    assert s.rmse == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09 + 4.0 + 0.16) / 5))
    for value, (lo, hi) in ((s.median, s.median_ci), (s.far, s.far_ci), (s.rmse, s.rmse_ci)):
        assert lo <= value <= hi
    assert 0.0 <= s.far_ci[0] and s.far_ci[1] <= 1.0
    d = s.to_dict()
    assert d["median_ci"] == list(s.median_ci) and set(d) == {"n", "median", "median_ci", "far", "far_ci", "rmse",
                                                               "rmse_ci", "threshold"}
    # default threshold comes from the reference; seeded: the same seed gives the same intervals
    assert cell_stats(x, ref + torch.tensor([[0.0], [2.0], [0.0], [2.0], [0.0]])).threshold > 0
    assert cell_stats(x, ref, threshold=1.0, n_boot=200, seed=3) == cell_stats(x, ref, threshold=1.0, n_boot=200,
                                                                               seed=3)


def test_bootstrap_interval_covers_the_true_median_of_a_normal_sample():
    # |N(0, 1)| has median Phi^-1(0.75) = 0.6744897...; per-sample error of a 1-dim sample is |x - ref|
    true_median = 0.6744897501960817
    covered = 0
    for seed in range(20):
        x = torch.from_numpy(np.random.default_rng(100 + seed).normal(size=(2000, 1)))
        s = cell_stats(x, torch.zeros_like(x), threshold=1.0, n_boot=300, seed=seed)
        covered += s.median_ci[0] <= true_median <= s.median_ci[1]
        assert s.median_ci[1] - s.median_ci[0] < 0.12
        # P(|Z| > 1) = 0.3173
        assert s.far_ci[0] - 0.04 < 0.3173 < s.far_ci[1] + 0.04
    assert covered >= 16                       # nominal 95%: 19 of 20 expected, >= 16 with overwhelming odds


def test_far_fraction_of_a_constructed_batch():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 4, generator=g, dtype=torch.float64)
    thr = far_threshold(ref)
    x = ref + 0.01 * torch.randn(400, 4, generator=g, dtype=torch.float64)     # near: error ~0.01 << thr ~0.5
    far_rows = torch.arange(0, 400, 8)                                            # 50 samples end elsewhere
    x[far_rows] = ref[far_rows] + 5.0
    s = cell_stats(x, ref, n_boot=500)
    assert s.threshold == pytest.approx(thr)
    assert s.far == pytest.approx(50 / 400)
    assert s.far_ci[0] < 0.125 < s.far_ci[1] and s.far_ci[1] - s.far_ci[0] < 0.1
    assert s.median < 0.05 < 5.0 < s.rmse + 5.0
    assert s.rmse == pytest.approx(float(((x - ref) ** 2).mean().sqrt()))


def test_paired_ratio_of_identical_inputs_is_exactly_one():
    e = np.random.default_rng(0).exponential(size=300)
    for stat in ("median", "rmse"):
        assert ratio_ci(e, e.copy(), stat=stat, n_boot=200) == (1.0, 1.0, 1.0)


def test_paired_ratio_of_a_scaled_solver_and_pairing():
    e = np.random.default_rng(1).exponential(size=300)
    r, lo, hi = ratio_ci(2.0 * e, e, stat="median", n_boot=200)
    assert r == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # pairing: the same resampled indices for both; an unpaired bootstrap would give a wide interval here
    noise = np.random.default_rng(2).normal(scale=0.01, size=300)
    r, lo, hi = ratio_ci(e * (1.1 + noise), e, stat="rmse", n_boot=300)
    assert lo < r < hi and 1.0 < lo and hi < 1.2
    with pytest.raises(ValueError, match="stat"):
        ratio_ci(e, e, stat="mean")
    with pytest.raises(ValueError, match="same number"):
        ratio_ci(e, e[:10])
