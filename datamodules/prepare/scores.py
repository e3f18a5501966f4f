"""Per-clip quality scores for `fada prepare` (SPEC 5b): pure functions on arrays, one number (or a few) each.

Conventions (the caller's): `crops` (n, S, S, 3) uint8 RGB square face crops at 25 fps; `mouth_box` (x0, y0, x1, y1)
fractions of the crop; `audio` float32 mono 16 kHz with sample 0 at frame 0 (640 samples a frame); `boxes` (n, 4) face
boxes x0, y0, x1, y1 in source pixels. Offsets use the synthetic world's sign (datamodules/synthetic.py): offset k means
audio frame t + k carries the sound of video frame t (k > 0: audio late).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SAMPLE_RATE, FPS = 16000, 25
LUMA = np.float32([0.299, 0.587, 0.114])  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY


def luma(frames: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 luma in 8-bit levels."""
    return frames.astype(np.float32) @ LUMA


# ---- image ---------------------------------------------------------------------------------------------------
def sharpness(crops: np.ndarray) -> float:
    """Mean over frames of var(Laplacian(gray)) (CV_64F, 3x3 aperture): falls under blur, rises with noise."""
    return float(np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in crops]))


def noise_level(crops: np.ndarray, frames: int = 8) -> float:
    """Pixel noise std in 8-bit levels, Immerkaer's estimator ("Fast Noise Variance Estimation", 1996) on the
    gray crops: sigma = sqrt(pi / 2) / (6 (W - 2)(H - 2)) sum |I * N|, N = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]
    (N cancels planes and edges to first order, not noise); mean over `frames` evenly spaced crops.
    Unlike the Laplacian's variance it does not rise with sharp detail, so it tells noise from sharpness."""
    kernel = np.float32([[1, -2, 1], [-2, 4, -2], [1, -2, 1]])
    picks = np.unique(np.linspace(0, len(crops) - 1, min(frames, len(crops))).round().astype(np.int64))
    sigmas = []
    for frame in crops[picks]:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
        response = cv2.filter2D(gray, -1, kernel)[1:-1, 1:-1]  # valid part only
        sigmas.append(np.sqrt(np.pi / 2) * np.abs(response).sum() / (6 * response.size))
    return float(np.mean(sigmas))


# ---- audio ---------------------------------------------------------------------------------------------------
def audio_envelope(audio: np.ndarray, frames: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> np.ndarray:
    """(frames,) float32 RMS of frame t's samples [round(t sr / fps), round((t + 1) sr / fps)); samples beyond the
    audio count as silence (a short wav gives 0 on its missing frames)."""
    bounds = np.round(np.arange(frames + 1) * sample_rate / fps).astype(np.int64)  # frame t: [bounds[t], bounds[t+1])
    edges = np.minimum(bounds, len(audio))
    energy = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64))])  # energy[i] = sum of x[:i]^2
    return np.sqrt((energy[edges[1:]] - energy[edges[:-1]]) / np.maximum(np.diff(bounds), 1)).astype(np.float32)


def speech_ratio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: int = FPS, relative: float = 0.1,
                 floor: float = 0.005) -> float:
    """Share of the 40 ms frames that are voiced: RMS > max(relative x the 95th percentile frame RMS (-20 dB under
    the clip's loud frames), floor (-46 dBFS, above the hiss of a quiet room)). Silence and hiss give 0."""
    frames = int(len(audio) * fps // sample_rate)
    if frames == 0:
        return 0.0
    rms = audio_envelope(audio, frames, sample_rate, fps)
    return float(np.mean(rms > max(relative * float(np.percentile(rms, 95)), floor)))


# ---- head and camera motion ----------------------------------------------------------------------------------
def head_motion(boxes: np.ndarray) -> dict[str, float]:
    """Face boxes (n, 4) -> motion in units of the median box side s, side = (w + h) / 2:
    head_motion = mean_t |c_(t+1) - c_t| / s (c the box centre), head_travel = |range of c over the clip| / s
    (the diagonal of the centres' bounding box), head_scale = max side / min side - 1."""
    boxes = np.asarray(boxes, dtype=np.float64)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2
    scale = float(np.median(side))
    steps = np.linalg.norm(np.diff(centre, axis=0), axis=1)
    return {"head_motion": float(steps.mean() / scale) if len(steps) else 0.0,
            "head_travel": float(np.linalg.norm(np.ptp(centre, axis=0)) / scale),
            "head_scale": float(side.max() / side.min() - 1)}


def flow_stats(prev_gray: np.ndarray, gray: np.ndarray, face_box=None, dilate: float = 0.25,
               min_background: float = 0.05) -> np.ndarray:
    """One frame pair (uint8 gray, H x W, short side ~128-256) -> (4,) float32 background motion in pixels per frame:
    [median |flow|, mean flow x, mean flow y, divergence], over the pixels outside face_box (x0, y0, x1, y1 in these
    frames' pixels) grown by `dilate` x its size on each side; face_box None: every pixel is background.
    Divergence: least squares of the similarity flow (u, v) = d (x, y) + r (-y, x) + (tx, ty) about the frame
    centre; d = relative scale change a frame (a zoom by 1.05 gives ~0.05, a pan 0). All NaN when less than
    `min_background` of the frame is background (the face fills it: camera motion unknown)."""
    flow = cv2.calcOpticalFlowFarneback(prev_gray, gray, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                        poly_n=5, poly_sigma=1.2, flags=0)  # (H, W, 2): where each pixel went
    h, w = gray.shape
    background = np.ones((h, w), dtype=bool)
    if face_box is not None:
        x0, y0, x1, y1 = face_box
        grow_x, grow_y = dilate * (x1 - x0), dilate * (y1 - y0)
        background[max(int(y0 - grow_y), 0):max(int(np.ceil(y1 + grow_y)), 0),
                   max(int(x0 - grow_x), 0):max(int(np.ceil(x1 + grow_x)), 0)] = False
    if background.mean() < min_background:
        return np.full(4, np.nan, dtype=np.float32)
    u, v = flow[background, 0].astype(np.float64), flow[background, 1].astype(np.float64)
    y, x = np.nonzero(background)
    x, y = x - (w - 1) / 2, y - (h - 1) / 2
    zeros, ones = np.zeros_like(x), np.ones_like(x)
    design = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])  # (2m, 4)
    divergence = np.linalg.lstsq(design, np.concatenate([u, v]), rcond=None)[0][0]
    return np.array([np.median(np.hypot(u, v)), u.mean(), v.mean(), divergence], dtype=np.float32)


def background_motion(stats: np.ndarray) -> dict[str, float]:
    """flow_stats of the clip's frame pairs (n, 4) -> {"background_flow": median of |flow| medians, "camera_pan":
    |median (mean x, mean y)|, "camera_zoom": median |divergence|}, pixels (of the analysis frames) per frame; pairs
    without background (NaN rows) are skipped; NaN when no pair has any."""
    stats = np.asarray(stats, dtype=np.float64).reshape(-1, 4)
    stats = stats[~np.isnan(stats).any(axis=1)]
    if len(stats) == 0:
        return {"background_flow": float("nan"), "camera_pan": float("nan"), "camera_zoom": float("nan")}
    median = np.median(stats, axis=0)
    return {"background_flow": float(median[0]), "camera_pan": float(np.hypot(median[1], median[2])),
            "camera_zoom": float(np.median(np.abs(stats[:, 3])))}


# ---- mouth and audio-visual sync -----------------------------------------------------------------------------
def mouth_region(crops: np.ndarray, mouth_box) -> np.ndarray:
    """(n, S, S, 3) -> (n, h, w) float32 luma of the mouth box (fractions of the crop, at least one pixel)."""
    height, width = crops.shape[1:3]
    x0, y0, x1, y1 = mouth_box
    rows = slice(int(y0 * height), max(int(y1 * height), int(y0 * height) + 1))
    cols = slice(int(x0 * width), max(int(x1 * width), int(x0 * width) + 1))
    return luma(crops[:, rows, cols])


def mouth_opening(crops: np.ndarray, mouth_box) -> np.ndarray:
    """(n,) mouth opening proxy: darkness of the mouth box, 255 - its mean luma (the open mouth's cavity is dark,
    so its area, and this, grow with the opening)."""
    return 255 - mouth_region(crops, mouth_box).mean(axis=(1, 2))


def shift_correlations(seen: np.ndarray, heard: np.ndarray, max_shift: int, min_overlap: int = 8) -> np.ndarray:
    """Pearson r of seen[t] against heard[t + k] over the frames where both exist, for k = -max_shift..max_shift
    -> (2 max_shift + 1,) float64; NaN where fewer than min_overlap pairs overlap or a side is constant there.
    Vectorised as sync_distances: heard NaN-padded by max_shift, windows[k, t] = heard[t + k]."""
    n = min(len(seen), len(heard))
    seen, heard = np.asarray(seen[:n], np.float64), np.asarray(heard[:n], np.float64)
    padded = np.pad(heard, max_shift, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, n)  # (2 max_shift + 1, n): row j is shift j - max_shift
    valid = ~np.isnan(windows)
    count = valid.sum(1)
    a = np.where(valid, seen, 0.0)
    b = np.where(valid, windows, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = a.sum(1) / count, b.sum(1) / count
        da, db = np.where(valid, a - mean_a[:, None], 0.0), np.where(valid, b - mean_b[:, None], 0.0)
        r = (da * db).sum(1) / np.sqrt((da * da).sum(1) * (db * db).sum(1))
    r[(count < min_overlap) | ~np.isfinite(r)] = np.nan
    return r


def sync_proxy(crops: np.ndarray, audio: np.ndarray, mouth_box, max_shift: int = 15) -> dict:
    """Weightless AV sync: frame-to-frame changes of the mouth opening against those of the loudness,
    d/dt mouth_opening(t) vs d/dt audio_envelope(t + k), Pearson r per shift k (shift_correlations).
    -> {"av_offset": argmax_k r (k > 0: audio late), "av_confidence": max r - median r over the shifts (SyncNet's
    conf, in Pearson units 0..2), "sync_source": "proxy"}. No usable signal (a still mouth, silence, < 10 frames):
    offset 0, confidence 0.

    Why these signals (measured on the synthetic world, 64 px, 30 clips a tier, unrelated = the next clip's audio):
    darkness tracks loudness itself (mouth opening = loudness there), motion energy only |its rate of change|.
    Darkness undifferenced (1 s mean removed): synced confidence min 0.74 vs unrelated max 0.93 at 50 frames. Differenced
    (removes lighting drift and the slow speech/pause rhythm any two speech clips share): 0.91 vs 0.75 at 50 frames,
    0.98 vs 0.45 at 100. Motion energy against |d envelope| finds the same offsets (all exact) with 0.87 vs 0.65 and
    0.93 vs 0.50 on clean clips, but head motion leaks into it: on lenient clips (wild motion, blur, noise) its
    synced minimum falls to 0.44 / 0.26 (50 / 100 frames), darkness's to 0.56 / 0.62; averaging both is no better.
    Hence darkness differences. Offsets: every clip exact at shifts 0, +-3, +8, strict and lenient, 50 and 100 frames."""
    frames = min(len(crops), int(len(audio) * FPS // SAMPLE_RATE))
    unscored = {"av_offset": 0, "av_confidence": 0.0, "sync_source": "proxy"}
    if frames < 10:
        return unscored
    seen = np.diff(mouth_opening(crops[:frames], mouth_box))
    heard = np.diff(audio_envelope(audio, frames).astype(np.float64))
    r = shift_correlations(seen, heard, max_shift)
    if np.isnan(r).all():
        return unscored
    best = int(np.nanargmax(r))
    return {"av_offset": best - max_shift, "av_confidence": float(r[best] - np.nanmedian(r)), "sync_source": "proxy"}


def syncnet_sync(scorer, crops: np.ndarray, audio: np.ndarray) -> dict:
    """SyncNet (fada_lightning.metrics.sync.SyncNetScorer, local weights) on one clip's face crops.
    Sign: sync_distances compares video window i with audio window i + j - vshift and sync_scores reports
    offset = vshift - argmin_j, so audio K frames late (best j = vshift + K) comes back as offset -K; ours is +K,
    hence av_offset = -offset. av_confidence = Sync-C (median - min distance), av_distance = Sync-D."""
    import torch

    video = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(127.5).sub(1)[None]
    wav = torch.from_numpy(np.asarray(audio, dtype=np.float32))[None]
    scores = scorer(video, wav)[0]
    return {"av_offset": -int(scores["offset"]), "av_confidence": float(scores["sync_c"]),
            "av_distance": float(scores["sync_d"]), "sync_source": "syncnet"}


# ---- learned image quality -----------------------------------------------------------------------------------
def load_iqa_model(path: str):
    """A TorchScript IQA model from a local file (never downloaded): (B, 3, H, W) float in [0, 1] -> (B,) 0-100."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"IQA model {path} does not exist: it is a local TorchScript file (nothing is "
                                f"downloaded); leave the IQA model unset to skip learned image quality")
    import torch

    return torch.jit.load(str(path), map_location="cpu").eval()


def image_quality(model, crops: np.ndarray, batch: int = 16, frames: int = 8) -> float:
    """Mean IQA score (0-100) of `frames` evenly spaced crops (all of them if fewer), `batch` at a time."""
    import torch

    picks = np.unique(np.linspace(0, len(crops) - 1, min(frames, len(crops))).round().astype(np.int64))
    images = torch.from_numpy(np.ascontiguousarray(crops[picks])).permute(0, 3, 1, 2).float().div(255)
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        scores = [model(images[i:i + batch].to(device)).float().reshape(-1).cpu() for i in range(0, len(images), batch)]
    return float(torch.cat(scores).mean())
