"""Mixed supervision's ground-truth loss weights (SPEC Eq 8 as pinned)."""
import pytest
import torch

from distillers.mixed import Adaptive, AdaptiveUnlimited, Fixed


def test_the_adaptive_weight_rises_peaks_falls_and_dies():
    w = Adaptive()  # SPEC defaults: alpha 0.25, beta 0.2, R_p 30, R_d 100
    below = torch.tensor([0.0, 1.0, 5.0, 29.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(w(below), 0.2 * below**0.25)
    eps = 1e-9
    at_peak = w(torch.tensor([30.0 - eps, 30.0, 30.0 + eps], dtype=torch.float64))
    torch.testing.assert_close(at_peak, torch.full((3,), 0.2 * 30**0.25, dtype=torch.float64))  # continuous at R_p
    middle = torch.tensor([65.0], dtype=torch.float64)
    torch.testing.assert_close(w(middle), 0.2 * 30**0.25 * (100 - middle) / 70)
    assert torch.equal(w(torch.tensor([100.0, 100.5, 1e6])), torch.zeros(3))  # zero at and beyond R_d
    ratios = torch.linspace(0, 120, 1201, dtype=torch.float64)
    weights = w(ratios)
    assert weights.argmax() == 300 and (weights >= 0).all()


def test_the_unlimited_and_fixed_weights():
    unlimited = AdaptiveUnlimited(alpha=0.5, beta=0.2)
    ratios = torch.tensor([0.0, 4.0, 100.0, 1e6])
    torch.testing.assert_close(unlimited(ratios), torch.tensor([0.0, 0.4, 2.0, 200.0]))  # unbounded
    assert torch.equal(Fixed(0.2)(ratios), torch.full((4,), 0.2)) and torch.equal(Fixed(0.0)(ratios), torch.zeros(4))
    with pytest.raises(ValueError, match="r_peak"):
        Adaptive(r_peak=100, r_dead=30)
