"""Face detectors, IoU face tracks and the single-face windows clips are cut from (SPEC 5b).

Boxes everywhere are float32 (x0, y0, x1, y1) in the frame's pixels (x1, y1 exclusive edges). A detector is
any callable frame (H, W, 3) uint8 RGB -> boxes (k, 4); `make_detector` builds one by name. Detectors load
their model lazily and drop it when pickled, so they can be handed to worker processes.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

HAAR_CASCADE = "haarcascade_frontalface_default.xml"  # OpenCV's bundled frontal-face cascade


class FaceDetector(Protocol):
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """frame (H, W, 3) uint8 RGB -> boxes (k, 4) float32 x0, y0, x1, y1 in that frame's pixels."""
        ...


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def _xywh_to_boxes(xywh) -> np.ndarray:
    xywh = np.asarray(xywh, np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _bundled_haar_cascade() -> str:
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, HAAR_CASCADE) if folder else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"OpenCV {cv2.__version__} ships no Haar cascade {HAAR_CASCADE} (opencv 5.x dropped them): "
            f'pip install "opencv-python-headless<5", or pass cascade= a local .xml file')
    return path


class HaarDetector:
    """OpenCV's Haar frontal-face cascade on the equalised grey frame (Viola-Jones; no weights to fetch)."""

    def __init__(self, scale_factor: float = 1.1,  # image pyramid step between detection scales
                 min_neighbors: int = 5,             # overlapping hits a face needs (higher: fewer false faces)
                 min_size: int = 24,                 # smallest face side in px (the cascade's window is 24)
                 cascade: str | None = None):        # a local cascade .xml; default: the one OpenCV bundles
        if cascade is not None and not os.path.isfile(cascade):
            raise FileNotFoundError(f"Haar cascade file not found: {cascade}")
        self.cascade = cascade or _bundled_haar_cascade()
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self._classifier = None
        self._load()  # fail at construction on an unreadable file, not at the first frame

    def _load(self):
        if self._classifier is None:
            try:
                classifier = cv2.CascadeClassifier(self.cascade)
            except (cv2.error, SystemError) as error:  # a malformed file raises inside OpenCV's parser
                raise ValueError(f"{self.cascade} is not a readable OpenCV cascade .xml") from error
            if classifier.empty():
                raise ValueError(f"{self.cascade} is not a readable OpenCV cascade .xml")
            self._classifier = classifier
        return self._classifier

    def __getstate__(self):
        return {**self.__dict__, "_classifier": None}  # cv2 objects do not pickle; reloaded on first use

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        grey = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        found = self._load().detectMultiScale(grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        return _xywh_to_boxes(found) if len(found) else _no_boxes()


class NoDetector:
    """Detector "none", for pre-cropped input: the whole frame is the one face."""

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return np.array([[0, 0, frame.shape[1], frame.shape[0]]], np.float32)


class YuNetDetector:
    """OpenCV's YuNet CNN (cv2.FaceDetectorYN) from a local .onnx file (e.g. face_detection_yunet_2023mar.onnx
    from opencv_zoo); nothing is downloaded."""

    def __init__(self, weights: str,                # local path of the YuNet .onnx
                 score_threshold: float = 0.7,      # minimum face confidence
                 nms_threshold: float = 0.3,        # IoU above which overlapping faces are merged
                 top_k: int = 5000):                # candidates kept before NMS
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"YuNet weights not found: {weights} (a local .onnx; nothing is downloaded)")
        self.weights, self.score_threshold, self.nms_threshold, self.top_k = weights, score_threshold, nms_threshold, top_k
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        size = (frame.shape[1], frame.shape[0])
        if self._model is None:
            self._model = cv2.FaceDetectorYN.create(self.weights, "", size, self.score_threshold,
                                                    self.nms_threshold, self.top_k)
        self._model.setInputSize(size)
        _, faces = self._model.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        return _no_boxes() if faces is None else _xywh_to_boxes(faces[:, :4])  # cols 4-13 landmarks, 14 score


DETECTORS = {"haar": HaarDetector, "none": NoDetector, "yunet": YuNetDetector}


def make_detector(name: str, **kwargs) -> FaceDetector:
    """A detector by name: one of `DETECTORS`, or "module:Class" for your own (Class(**kwargs) must be a
    `FaceDetector`)."""
    if name in DETECTORS:
        return DETECTORS[name](**kwargs)
    module, _, cls = name.partition(":")
    if not cls:
        raise ValueError(f"face detector {name!r} is not one of {sorted(DETECTORS)} nor a 'module:Class'")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes a (k, 4) and b (m, 4) -> (k, m); 0 where both are empty."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=-1)


@dataclass
class Track:
    """One face followed over frames [start, stop)."""
    start: int            # first frame index
    boxes: np.ndarray     # (n, 4) float32, interpolated over gaps and smoothed
    detected: np.ndarray  # (n,) bool: a raw detection matched this frame (False: interpolated)

    @property
    def stop(self) -> int:
        return self.start + len(self.boxes)


def face_counts(detections: list[np.ndarray]) -> np.ndarray:
    """(n,) int: raw detections per frame."""
    return np.array([len(boxes) for boxes in detections], np.int64)


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 over `window` frames (an even window counts one frame less).
    At the ends the window shrinks symmetrically (frame i averages [i - h_i, i + h_i], h_i = min(h, i, n-1-i)),
    so a constant stays constant and a linear trajectory passes unchanged."""
    x = np.asarray(x, np.float64)
    n, half = len(x), max(window - 1, 0) // 2
    i = np.arange(n)
    h = np.minimum(half, np.minimum(i, n - 1 - i))
    total = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])  # total[j] = x[:j].sum(0)
    count = (2 * h + 1).reshape(-1, *[1] * (x.ndim - 1))
    return (total[i + h + 1] - total[i - h]) / count


def track_faces(detections: list[np.ndarray], min_iou: float = 0.3, max_gap: int = 5, smooth: int = 5,
                min_length: int = 1) -> list[Track]:
    """Per-frame boxes (list of (k_t, 4)) -> face tracks, ordered by start frame.

    Frame by frame, detections are matched greedily (highest IoU first, IoU >= min_iou) to the last detected
    box of each live track; unmatched detections open tracks. A track survives up to `max_gap` frames without
    a detection; it ends at its last detection. Gaps inside a track are filled by linear interpolation of
    the box corners, then boxes are smoothed by `moving_average` over `smooth` frames. Tracks spanning fewer
    than `min_length` frames are dropped."""
    finished, live = [], []  # live: [frames list, boxes list] per track
    for t, boxes in enumerate(detections):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        finished += [track for track in live if t - track[0][-1] - 1 > max_gap]
        live = [track for track in live if t - track[0][-1] - 1 <= max_gap]
        overlap = iou(np.array([track[1][-1] for track in live]).reshape(-1, 4), boxes)
        taken_track, taken_box = set(), set()
        for flat in np.argsort(-overlap, axis=None, kind="stable"):
            j, k = divmod(int(flat), len(boxes))
            if overlap[j, k] < min_iou:
                break
            if j not in taken_track and k not in taken_box:
                live[j][0].append(t)
                live[j][1].append(boxes[k])
                taken_track.add(j)
                taken_box.add(k)
        live += [[[t], [boxes[k]]] for k in range(len(boxes)) if k not in taken_box]
    tracks = []
    for frames, boxes in finished + live:
        frames, boxes = np.array(frames), np.array(boxes, np.float64)
        span = np.arange(frames[0], frames[-1] + 1)
        if len(span) < min_length:
            continue
        filled = np.stack([np.interp(span, frames, boxes[:, c]) for c in range(4)], axis=1)
        tracks.append(Track(int(frames[0]), moving_average(filled, smooth).astype(np.float32),
                            np.isin(span, frames)))
    return sorted(tracks, key=lambda track: track.start)


def single_face_windows(tracks: list[Track], num_frames: int, shots: list[tuple[int, int]], min_frames: int = 50,
                        max_frames: int = 250, trim: int = 0) -> list[tuple[int, int, Track]]:
    """Clips [start, stop) in which exactly one track is alive (interpolated frames count), inside one shot.

    shots: [start, stop) frame ranges (already trimmed at cuts by the caller). Each maximal single-face span
    (one shot, one track) loses `trim` frames at both ends, then is cut into consecutive clips of `max_frames`;
    a tail shorter than `min_frames` is dropped (575 frames -> 250, 250, 75; a span < min_frames -> none).
    -> (start, stop, the track alive there), in frame order."""
    alive = np.zeros(num_frames, np.int64)
    owner = np.full(num_frames, -1, np.int64)
    for index, track in enumerate(tracks):
        alive[track.start:track.stop] += 1
        owner[track.start:track.stop] = index
    owner = np.where(alive == 1, owner, -1)  # the one track alive, or -1
    windows = []
    for shot_start, shot_stop in shots:
        key = owner[shot_start:shot_stop]
        if len(key) == 0:
            continue
        edges = np.flatnonzero(np.diff(key)) + 1  # where the owner changes
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(key)]):
            if key[lo] < 0:
                continue
            start, stop = shot_start + lo + trim, shot_start + hi - trim
            for clip_start in range(start, stop, max_frames):
                clip_stop = min(clip_start + max_frames, stop)
                if clip_stop - clip_start >= min_frames:
                    windows.append((int(clip_start), int(clip_stop), tracks[key[lo]]))
    return windows


def crop_box(box: np.ndarray, margin: float):
    """The square crop around a face box (..., 4) -> (x0, y0, side): side = max(w, h) * margin, centred on the
    box centre; the square covers [x0, x0 + side) x [y0, y0 + side) and may leave the frame (the caller pads
    with edge pixels there, as `crop_frames` does)."""
    box = np.asarray(box, np.float64)
    side = np.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]) * margin
    return (box[..., 0] + box[..., 2] - side) / 2, (box[..., 1] + box[..., 3] - side) / 2, side


def crop_frames(frames: np.ndarray, boxes: np.ndarray, margin: float, size: int) -> np.ndarray:
    """frames (n, H, W, 3), boxes (n, 4) -> (n, size, size, 3) uint8: the `crop_box` square of each frame
    (corners rounded to whole pixels), edge pixels replicated where it leaves the frame, resized (INTER_AREA)."""
    x0, y0, side = crop_box(boxes, margin)
    x0, y0, side = np.rint(x0).astype(int), np.rint(y0).astype(int), np.maximum(np.rint(side).astype(int), 1)
    height, width = frames.shape[1:3]
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for k, frame in enumerate(frames):
        rows = np.clip(np.arange(y0[k], y0[k] + side[k]), 0, height - 1)  # clipped indices = BORDER_REPLICATE
        cols = np.clip(np.arange(x0[k], x0[k] + side[k]), 0, width - 1)
        out[k] = cv2.resize(frame[np.ix_(rows, cols)], (size, size), interpolation=cv2.INTER_AREA)
    return out
