"""bench/drift.py's arithmetic: frame bins and where drift starts."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def drift():
    spec = importlib.util.spec_from_file_location("drift", Path(__file__).resolve().parents[1] / "bench" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bins_cover_every_frame_once_the_last_may_be_short(drift):
    edges = drift.edges_of(60, 25)
    assert edges == [0, 25, 50, 60]
    values = np.stack([np.arange(60.0), -np.arange(60.0)])  # (2, T): both metrics at once
    means = drift.bin_means(values, edges)
    np.testing.assert_allclose(means, [[12, 37, 54.5], [-12, -37, -54.5]])
    np.testing.assert_allclose(drift.bin_means(values, [0, 8])[:, 0], [3.5, -3.5])  # the first window


def test_onset_is_where_every_later_bin_stays_worse(drift):
    identity = np.array([0.10, 0.13, 0.11, 0.15, 0.16])  # worse: higher; the dip at bin 2 resets it
    assert drift.onset(identity, 0.10, 0.02, +1) == 3
    assert drift.onset(identity, 0.00, 0.02, +1) == 0  # worse than the baseline from the start
    iqa = np.array([0.80, 0.77, 0.79])  # worse: lower; bin 1 alone is no drift
    assert drift.onset(iqa, 0.80, 0.02, -1) is None
    assert drift.onset(iqa - 0.1, 0.80, 0.02, -1) == 0


def test_the_noise_reference_and_the_colour_shift(drift):
    frames = np.full((4, 8, 8, 3), 100, np.uint8)
    np.testing.assert_array_equal(drift.with_noise(frames, 0), frames)
    noisy = drift.with_noise(frames, 10)
    assert noisy.dtype == np.uint8 and 9 < (noisy.astype(float) - 100).std() < 11
    np.testing.assert_array_equal(drift.with_noise(frames, 10, seed=3), drift.with_noise(frames, 10, seed=3))
    bluer = frames.copy()
    bluer[..., 2] += 20
    np.testing.assert_allclose(drift.colour_shift(bluer, frames), [0, 0, 20])
