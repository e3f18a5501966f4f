"""Shot boundaries by content difference, after PySceneDetect's ContentDetector (Panda-70M and TalkVid
cut with it at threshold 27 and a 15-frame minimum shot). PySceneDetect itself is not a dependency:
0.7.2 requires opencv-python (5.0), a second cv2 beside our opencv-python-headless < 5.

    score_t = mean over (H, S, V) of mean_pixels |C_t - C_{t-1}|   (OpenCV's 8-bit HSV: H in 0..179)
    cut at t  when score_t >= threshold and t - (last cut, or 0) >= min_shot

A cut at t means frame t opens a new shot. Shots are the ranges between cuts with `trim` frames
dropped on each side of every cut (a fade or a codec's smear around a cut is neither shot).
"""
from __future__ import annotations

import cv2
import numpy as np


def content_score(previous_hsv: np.ndarray | None, hsv: np.ndarray) -> float:
    """Mean absolute HSV difference of two frames (8-bit HSV, (H, W, 3)); 0 for the first frame."""
    if previous_hsv is None:
        return 0.0
    return float(np.abs(hsv.astype(np.int16) - previous_hsv).mean())


def to_hsv(frame: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> OpenCV's 8-bit HSV (H in 0..179, S and V in 0..255)."""
    return cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)


def find_cuts(scores: np.ndarray, threshold: float = 27.0, min_shot: int = 15) -> list[int]:
    """Per-frame content scores (n,) -> frames that open a new shot (ascending, never frame 0)."""
    cuts, last = [], 0
    for t in np.flatnonzero(np.asarray(scores) >= threshold):
        if t > 0 and t - last >= min_shot:
            cuts.append(int(t))
            last = t
    return cuts


def shot_ranges(cuts: list[int], num_frames: int, trim: int = 2) -> list[tuple[int, int]]:
    """Cuts -> shots [start, stop) with `trim` frames dropped on each side of every cut (not at the
    file's own start and end); shots left empty by trimming are dropped."""
    edges = [0, *cuts, num_frames]
    shots = []
    for i, (start, stop) in enumerate(zip(edges[:-1], edges[1:])):
        start += trim if i > 0 else 0
        stop -= trim if i < len(edges) - 2 else 0
        if stop > start:
            shots.append((start, stop))
    return shots
