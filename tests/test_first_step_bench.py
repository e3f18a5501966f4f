"""bench/first_step.py's grain measure: pixel levels, zero on flat frames, large on speckle."""
import importlib.util
from pathlib import Path

import torch


def test_grain_is_the_mean_absolute_laplacian_in_pixel_levels():
    spec = importlib.util.spec_from_file_location("first_step", Path(__file__).resolve().parents[1] / "bench" / "first_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.grain(torch.full((2, 3, 3, 8, 8), 0.3)) == 0.0
    ramp = torch.linspace(-1, 1, 8).expand(8, 8)  # a linear ramp has no curvature
    assert abs(bench.grain(ramp)) < 1e-3
    checker = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2.0 - 1  # 0 and 255 alternating
    assert bench.grain(checker) == 4 * 255.0
