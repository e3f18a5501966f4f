"""One input video -> its scored clips (WebDataset samples) and the reasons for what it drops.

    probe -> analysis pass (frames at `analysis_size`: shot scores, face detections, background flow)
          -> cuts, shots, face tracks, single-face windows of 2-10 s
          -> per window: full-resolution frames, square crops around the smoothed track, audio,
             scores, sync (offset corrected within the lenient bound), tier

Everything here runs inside one worker process per input (datamodules/prepare/run.py); it returns
plain data and never writes the output folder itself.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fada_lightning.video_io import encode_mp4, encode_wav

from . import scores as S
from .faces import crop_frames, face_counts, make_detector, single_face_windows, track_faces
from .media import FPS, SAMPLE_RATE, Rejected, VideoInfo, iter_video, probe, read_audio
from .shots import content_score, find_cuts, shot_ranges, to_hsv
from .tiers import PrepareConfig, assign_tier

# the mouth inside a face box, as fractions of the box (x0, y0, x1, y1): the lower middle, where Haar's
# frontal-face box and the synthetic world's face (datamodules/synthetic.mouth_dark_pixels) both have it
MOUTH_IN_FACE = (0.3, 0.6, 0.7, 0.92)
# side of the crops scores are measured on, whatever frame_size is written: sharpness and noise thresholds
# then mean the same at every preset, and the sync proxy sees a mouth of a useful size
MEASURE_SIZE = 128
# optical flow runs on the analysis frames downscaled by this much (half the pixels' work x 4 fewer);
# its translations are scaled back to analysis-frame pixels
FLOW_SCALE = 0.5
NOISE_FRAMES = 4  # frames of a clip its noise is measured on, at the source resolution


@dataclass
class Analysis:
    """Per-frame findings of the analysis pass over a whole input (n frames at 25 fps)."""
    content: np.ndarray                # (n,) HSV content difference to the previous frame
    detections: list[np.ndarray]       # n x (k, 4) face boxes, source pixels
    flow: np.ndarray                   # (n, 4) background flow stats against the previous frame (scores.flow_stats)
    change: np.ndarray                 # (n,) mean |gray_t - gray_{t-1}| of the whole frame, 8-bit levels


@dataclass
class InputResult:
    """What one input gave: samples (dicts of bytes, in time order) and every dropped clip's reasons."""
    input_id: str
    samples: list[dict] = field(default_factory=list)
    clips: list[dict] = field(default_factory=list)  # {key, start, frames, tier, reasons}: every window scored


def input_id(relative: str) -> str:
    """A stable, tar-safe id for an input: its name's letters and digits plus a hash of the relative path
    (two files named alike in different folders stay apart; spaces, quotes and unicode never reach a key)."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(relative).stem).strip("_")[:40] or "video"
    return f"{stem}_{hashlib.sha1(relative.encode()).hexdigest()[:10]}"


def analyse(path: str, info: VideoInfo, config: PrepareConfig) -> Analysis:
    """One decoding pass at the analysis size; keeps per-frame numbers only, never the frames."""
    scale = min(1.0, config.analysis_size / min(info.width, info.height))  # analysis px per source px
    max_side = max(1, round(max(info.width, info.height) * scale))
    detector = make_detector(config.detector, **config.detector_args)
    content, detections, flow, change = [], [], [], []
    previous_hsv = previous_gray = None
    for frame in iter_video(path, max_side=max_side):
        hsv = to_hsv(frame)
        content.append(content_score(previous_hsv, hsv))
        if len(detections) % config.detect_every == 0:
            boxes = np.asarray(detector(frame), np.float32).reshape(-1, 4)
        # else: the last detection holds (at 25 fps a face moves a pixel or two a frame; tracks smooth it)
        frame_scale = frame.shape[1] / info.width  # analysis px per source px, as this frame was resized
        detections.append(boxes / frame_scale)
        gray = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), None, fx=FLOW_SCALE, fy=FLOW_SCALE,
                          interpolation=cv2.INTER_AREA)
        largest = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))] if len(boxes) else None
        stats = (S.flow_stats(previous_gray, gray, None if largest is None else largest * FLOW_SCALE)
                 if previous_gray is not None else np.zeros(4, np.float32))
        flow.append(stats * np.float32([1 / FLOW_SCALE] * 3 + [1]))  # px at the analysis size; zoom is a ratio
        change.append(float(cv2.absdiff(previous_gray, gray).mean()) if previous_gray is not None else 0.0)
        previous_hsv, previous_gray = hsv, gray
    if not content:
        raise Rejected("zero frames", f"{path}: no frame decoded")
    return Analysis(np.asarray(content, np.float32), detections, np.stack(flow), np.asarray(change, np.float32))


def mouth_box(margin: float) -> tuple[float, float, float, float]:
    """MOUTH_IN_FACE as fractions of the square crop (the box fills its centre 1 / margin)."""
    inset = 0.5 - 0.5 / margin
    return tuple(inset + f / margin for f in MOUTH_IN_FACE)


def crop_outside(boxes: np.ndarray, margin: float, width: int, height: int) -> float:
    """Largest share of a frame's square crop that lies outside the frame (filled by padding)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * margin
    lo, hi = centre - side[:, None] / 2, centre + side[:, None] / 2
    inside = (np.clip(hi[:, 0], 0, width) - np.clip(lo[:, 0], 0, width)) * (
        np.clip(hi[:, 1], 0, height) - np.clip(lo[:, 1], 0, height))
    return float(np.max(1 - inside / side**2))


class ClipScorer:
    """The models a clip's scores need, built once per input: SyncNet and IQA when configured."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        self.syncnet = self.iqa = None
        if config.syncnet:
            from fada_lightning.metrics.sync import SyncNetScorer

            self.syncnet = SyncNetScorer(config.syncnet, vshift=config.max_sync_shift)
        if config.iqa_model:
            self.iqa = S.load_iqa_model(config.iqa_model)

    def sync(self, crops: np.ndarray, audio: np.ndarray) -> dict:
        if self.syncnet is not None:
            return S.syncnet_sync(self.syncnet, crops, audio)
        return S.sync_proxy(crops, audio, mouth_box(self.config.margin), self.config.max_sync_shift)

    def __call__(self, crops, native, audio, boxes, counts, flow, change, info: VideoInfo) -> dict:
        """crops (n, MEASURE_SIZE, MEASURE_SIZE, 3); native: a few crops at the source's own resolution;
        counts, flow, change: the analysis pass's numbers over the clip's frames."""
        scores = {"face_size": float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))),
                  "face_consistency": float(np.mean(counts == 1)),
                  "crop_outside": crop_outside(boxes, self.config.margin, info.width, info.height),
                  "sharpness": S.sharpness(crops), "noise": float(np.mean([S.noise_level(c[None]) for c in native])),
                  **S.head_motion(boxes), **S.background_motion(flow[1:] if len(flow) > 1 else flow),
                  "speech_ratio": S.speech_ratio(audio),
                  # still: whole frames, not crops (a jittering crop box is not motion)
                  "still": float(change[1:].mean()) if len(change) > 1 else 0.0}
        if self.iqa is not None:
            scores["iqa"] = S.image_quality(self.iqa, crops)
        return scores


def audio_window(path: str, first_frame: int, frames: int) -> np.ndarray:
    """The 16 kHz audio of video frames [first_frame, first_frame + frames); zeros before the file starts."""
    lead = max(0, -first_frame) * (SAMPLE_RATE // FPS)
    audio = read_audio(path, start=max(0, first_frame) / FPS, duration=frames / FPS - lead / SAMPLE_RATE)
    return np.concatenate([np.zeros(lead, np.float32), audio])[:frames * (SAMPLE_RATE // FPS)]


def process_input(path: str, relative: str, config: PrepareConfig, info: VideoInfo | None = None) -> InputResult:
    """Probe (if not given), analyse, cut, score and encode one input. Raises Rejected when the whole
    input is unusable; windows that fail both tiers are listed in `clips` with their reasons."""
    info = info or probe(path, config.min_seconds)
    result = InputResult(input_id(relative))
    analysis = analyse(path, info, config)
    n = len(analysis.content)
    shots = shot_ranges(find_cuts(analysis.content, config.shot_threshold, config.min_shot_frames), n,
                        config.cut_trim_frames)
    tracks = track_faces(analysis.detections, config.track_min_iou, config.track_max_gap, config.track_smooth)
    windows = single_face_windows(tracks, n, shots, round(config.min_seconds * FPS), round(config.max_seconds * FPS))
    counts = face_counts(analysis.detections)
    if not windows:
        raise Rejected("no clips", f"no {config.min_seconds:g} s window with exactly one face in one shot "
                       f"({n} frames, {len(shots)} shots, {len(tracks)} face tracks, one face in "
                       f"{np.mean(counts == 1):.0%} of frames)")
    scorer = ClipScorer(config)
    lenient_offset = config.lenient.get("max_sync_offset")
    for start, stop, track in windows:
        boxes = track.boxes[start - track.start:stop - track.start]
        # the written crops (frame_size), the scored ones (MEASURE_SIZE), and a few at the source's own
        # resolution for noise (a property of source pixels: resizing averages it away)
        crops, measured, native = [], [], []
        noise_frames = set(np.linspace(0, stop - start - 1, NOISE_FRAMES).round().astype(int).tolist())
        for i, frame in enumerate(iter_video(path, start=start, stop=stop)):
            box = boxes[i:i + 1]
            crops.append(crop_frames(frame[None], box, config.margin, config.frame_size)[0])
            measured.append(crop_frames(frame[None], box, config.margin, MEASURE_SIZE)[0])
            if i in noise_frames:
                side = max(8, round(float(np.max(box[0, 2:] - box[0, :2])) * config.margin))
                native.append(crop_frames(frame[None], box, config.margin, side)[0])
        if len(crops) < round(config.min_seconds * FPS):  # a truncated tail ended the window early
            continue
        crops, measured = np.stack(crops), np.stack(measured)  # (n, S, S, 3), (n, 128, 128, 3)
        stop, boxes = start + len(crops), boxes[:len(crops)]
        seconds = len(crops) / FPS
        audio = audio_window(path, start, len(crops))
        clip_scores = scorer(measured, native, audio, boxes, counts[start:stop], analysis.flow[start:stop],
                             analysis.change[start:stop], info)
        sync = scorer.sync(measured, audio)
        offset = int(sync["av_offset"])
        clip_scores.update(sync_confidence=float(sync["av_confidence"]), sync_offset=offset,
                           sync_source=sync["sync_source"])
        shift = offset if offset and (lenient_offset is None or abs(offset) <= lenient_offset) else 0
        if shift:  # wav frame t + shift carries video frame t's sound: read the audio that late
            audio = audio_window(path, start + shift, len(crops))
        tier, reasons = assign_tier(clip_scores, config)
        key = f"{result.input_id}-{start:06d}"
        result.clips.append({"key": key, "start": start, "frames": len(crops), "tier": tier,
                             "reasons": reasons["lenient"] if tier is None else reasons["strict"]})
        if tier is None:
            continue
        # numbers only; a score that could not be measured (no background to flow) is left out, read as NaN
        quality = {k: round(float(v), 6) for k, v in clip_scores.items() if k != "sync_source" and np.isfinite(v)}
        meta = {"video_id": result.input_id, "source": relative, "start_frame": start, "fps": FPS,
                "frames": len(crops), "duration": seconds, "sample_rate": SAMPLE_RATE, "size": config.frame_size,
                "tier": tier, "sync_source": clip_scores["sync_source"], "audio_shift_frames": shift,
                "quality": quality,
                "crop": {"detector": config.detector, "margin": config.margin,
                         "boxes": np.round(boxes, 1).tolist()}}
        result.samples.append({"__key__": key, "mp4": encode_mp4(crops, audio, FPS, SAMPLE_RATE),
                               "wav": encode_wav(audio, SAMPLE_RATE), "json": json.dumps(meta).encode()})
    return result
