"""dcfast.eval.metrics: unbiased KID-kernel MMD^2 against a float64 loop; AMMD, BwT, accuracy, forgetting."""
import math

import pytest
import torch

from dcfast.eval import metrics

nan = math.nan


def mmd2_loop(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as the defining sums, in float64.

    Returns (MMD^2, scale): scale = |kxx| + |kyy| + 2|kxy|, the size of the terms that cancel, so a
    tolerance relative to it holds whatever order another machine sums them in."""
    x, y = x.double().tolist(), y.double().tolist()
    d = len(x[0])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[a], x[b]) for a in range(m) for b in range(m) if a != b) / (m * (m - 1))
    kyy = sum(k(y[a], y[b]) for a in range(n) for b in range(n) if a != b) / (n * (n - 1))
    kxy = sum(k(x[a], y[b]) for a in range(m) for b in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy, abs(kxx) + abs(kyy) + 2 * abs(kxy)


@pytest.mark.parametrize("m,n,d", [(2, 2, 1), (3, 5, 4), (7, 4, 6)], ids=["2x2-d1", "3x5-d4", "7x4-d6"])
def test_mmd2_matches_loop(m, n, d):
    g = torch.Generator().manual_seed(m * 100 + n)
    x, y = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g) + 0.3
    expected, scale = mmd2_loop(x, y)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(expected, rel=0, abs=1e-7 * scale)


def test_mmd2_matches_torchmetrics_kid():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) + 0.5
    # identity "feature extractor"; one subset of all samples = the full unbiased estimate
    kid = kid_module.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=6)
    kid.update(y, real=True)
    kid.update(x, real=False)
    mean, _ = kid.compute()
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)


def test_mmd2_near_zero_for_one_distribution_and_larger_when_shifted():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    shifted = torch.randn(200, 8, generator=g) + 1.0
    same, diff = metrics.mmd2_unbiased(a, b), metrics.mmd2_unbiased(a, shifted)
    assert abs(same) < 0.05
    assert diff > 1.0 and diff > 20 * abs(same)


def test_mmd2_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_samples >= 2"):
        metrics.mmd2_unbiased(torch.randn(1, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="same feature dim"):
        metrics.mmd2_unbiased(torch.randn(3, 3), torch.randn(4, 2))


MMD = torch.tensor([[0.10, 0.20, 0.40],
                    [nan, 0.30, 0.35],
                    [nan, nan, 0.50]])
ACC = torch.tensor([[1.00, 0.50, 0.75],
                    [nan, 0.80, 0.40],
                    [nan, nan, 0.90]])


def test_summary_from_hand_built_matrices():
    assert metrics.ammd(MMD) == pytest.approx((0.40 + 0.35 + 0.50) / 3)
    assert metrics.bwt_mmd(MMD) == pytest.approx(((0.40 - 0.10) + (0.35 - 0.30)) / 2)
    assert metrics.final_accuracy(ACC) == pytest.approx((0.75 + 0.40 + 0.90) / 3)
    # first N-1 concepts, best before the final state minus final: concept 1: 1.00 - 0.75; concept 2: 0.80 - 0.40
    assert metrics.forgetting(ACC) == pytest.approx((0.25 + 0.40) / 2)
    assert metrics.bwt(ACC) == pytest.approx(((0.75 - 1.00) + (0.40 - 0.80)) / 2)
    s = metrics.summary(ACC, MMD)
    assert set(s) == {"ammd", "bwt_mmd", "final_accuracy", "forgetting"}


def test_bwt_sign_and_single_task():
    improving = torch.tensor([[0.5, 0.2], [nan, 0.3]])
    assert metrics.bwt_mmd(improving) < 0  # MMD fell: backward transfer, not forgetting
    assert math.isnan(metrics.bwt_mmd(torch.tensor([[0.3]])))
    assert metrics.forgetting(torch.tensor([[0.7]])) == 0.0


def test_forgetting_counts_the_best_earlier_state_not_the_final_one():
    # concept 1 peaks at state 2 (0.9), ends at 0.6; concept 2 improves (0.5 -> 0.7): negative forgetting
    scores = torch.tensor([[0.8, 0.9, 0.6], [nan, 0.5, 0.7], [nan, nan, 0.2]])
    assert metrics.forgetting(scores, "fidelity") == pytest.approx(((0.9 - 0.6) + (0.5 - 0.7)) / 2)
    s = metrics.fidelity_summary(scores, scores, scores)
    assert s["final_fidelity"] == pytest.approx((0.6 + 0.7 + 0.2) / 3)
    assert s["bwt_fidelity"] == pytest.approx(((0.6 - 0.8) + (0.7 - 0.5)) / 2)
    assert s["plasticity"] == pytest.approx((0.8 + 0.5 + 0.2) / 3)


def test_final_overwrite_averages_the_earlier_concepts_at_the_final_state():
    overwrite = torch.tensor([[nan, 0.5, 0.25], [nan, nan, 0.75], [nan, nan, nan]])
    assert metrics.final_overwrite(overwrite) == pytest.approx((0.25 + 0.75) / 2)
    assert metrics.final_overwrite(torch.tensor([[nan]])) is None
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        metrics.final_overwrite(torch.zeros(2, 3))


def test_matrix_shape_errors():
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        metrics.ammd(torch.zeros(2, 3))
