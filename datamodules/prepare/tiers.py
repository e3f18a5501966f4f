"""The filter config of `fada prepare` (configs/prepare/*.yaml) and the tier of a scored clip.

One config, two threshold sets (SPEC 5b): `strict` (set A, the teacher's) and `lenient` (set B, the
distillation set, which contains A). A bound is `min_<score>` or `max_<score>` on a score in the clip's
json (SCORES); a score the clip does not have (no IQA model given) leaves its bound unchecked, except
sync: a clip whose sync was not scored by SyncNet enters strict only with `proxy_sync_in_strict`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from fada_lightning.presets import ConfigError

DEFAULT_CONFIG = "prepare/default.yaml"

# score -> what it measures (the json's "quality" keys; datamodules/prepare/scores.py computes them)
SCORES = {
    "face_size": "median side of the tracked face box, source pixels",
    "face_consistency": "share of the clip's frames with exactly one detected face",
    "crop_outside": "largest share of the square crop that lies outside the frame (padded)",
    "sharpness": "variance of the Laplacian of the gray face crop at 128 px",
    "noise": "pixel noise std of the face crop at the source resolution, 8-bit levels (Immerkaer's estimator)",
    "iqa": "learned image quality, 0-100 (only with an IQA model)",
    "head_motion": "mean per-frame move of the face centre / face side",
    "head_travel": "range of the face centre over the clip / face side",
    "head_scale": "largest / smallest face side - 1",
    "background_flow": "median optical flow outside the face, px per frame at the analysis size",
    "camera_pan": "median flow translation outside the face, px per frame at the analysis size",
    "camera_zoom": "median flow divergence outside the face (zoom)",
    "speech_ratio": "share of 40 ms frames with speech",
    "still": "mean absolute difference of consecutive frames at the analysis size, 8-bit (0: a still image)",
    "sync_confidence": "audio-visual sync confidence (SyncNet's, or the proxy's on its own scale)",
    "sync_offset": "audio-visual offset in frames, + = audio late (before correction)",
}


@dataclass
class PrepareConfig:
    frame_size: int = 512                # side of the square face crop written (sd15: 512; micro: 32)
    min_seconds: float = 2.0             # clip length bounds (FADA: 2-10 s; 48 frames is LatentSync's least)
    max_seconds: float = 10.0
    detector: str = "haar"               # haar | none (pre-cropped input) | yunet | module:Class
    detector_args: dict = field(default_factory=dict)  # e.g. {weights: /models/yunet.onnx} for yunet
    analysis_size: int = 256             # short side of the frames faces, shots and flow are found on
    detect_every: int = 2                # run the face detector on every n-th frame; the others hold its boxes
    margin: float = 1.8                  # crop side = face box side x margin, centred on the smoothed box
    shot_threshold: float = 27.0         # content difference of a cut (PySceneDetect's default; Panda-70M, TalkVid)
    min_shot_frames: int = 15            # Panda-70M, TalkVid
    cut_trim_frames: int = 2             # frames dropped on each side of a cut
    track_min_iou: float = 0.3           # a detection continues a track above this IoU
    track_max_gap: int = 5               # frames a track survives undetected (filled by interpolation)
    track_smooth: int = 5                # moving-average frames of the crop box
    syncnet: str | None = None           # local SyncNet weights (syncnet_python's syncnet_v2.model); else the proxy
    proxy_sync_in_strict: bool = False   # SPEC 5b: sync the proxy scored never enters strict, unless set
    max_sync_shift: int = 15             # offsets searched, frames either way
    iqa_model: str | None = None         # local TorchScript IQA model, (B, 3, H, W) in [0, 1] -> (B,) 0-100
    strict: dict = field(default_factory=dict)   # {min_/max_<score>: bound}: set A
    lenient: dict = field(default_factory=dict)  # set B; must admit every clip strict admits
    proxy_sync: dict = field(default_factory=dict)  # the proxy's sync_confidence bounds: {strict: x, lenient: y}
    clips_per_shard: int = 100           # clips per output tar, at most
    min_shards: int = 16                 # a small tier is spread over this many shards (each data worker of each
                                         # rank reads its own: ranks x workers must not exceed it)
    probe_timeout: float = 60.0          # seconds for a worker to open and probe one input
    timeout_per_second: float = 30.0     # then probe_timeout + this per second of its video for the rest
    source: str = ""                     # the YAML this came from (set by load_config; named in errors)

    def __post_init__(self):
        for tier in ("strict", "lenient"):
            check_bounds(getattr(self, tier), f"{self.source or 'prepare config'}: {tier}")
        looser = [key for key in sorted({*self.strict, *self.lenient})
                  if not admits(self.lenient.get(key), self.strict.get(key), key)]
        if not admits(self.proxy_sync.get("lenient"), self.proxy_sync.get("strict"), "min_sync_confidence"):
            looser.append("proxy_sync")
        if looser:
            raise ConfigError(f"{self.source or 'prepare config'}: lenient must admit every clip strict admits, but "
                              f"its {', '.join(looser)} is tighter than strict's (set B contains set A)")
        unknown = sorted(set(self.proxy_sync) - {"strict", "lenient"})
        if unknown:
            raise ConfigError(f"{self.source}: proxy_sync takes strict and lenient, not {unknown}")
        if self.detect_every < 1:
            raise ConfigError(f"{self.source}: detect_every must be >= 1, got {self.detect_every}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ConfigError(f"{self.source}: need 0 < min_seconds <= max_seconds")
        try:  # the detector here, before any worker: a missing weights file is one clear error
            from .faces import make_detector

            make_detector(self.detector, **self.detector_args)
        except (FileNotFoundError, ValueError, TypeError, ImportError, AttributeError) as error:
            raise ConfigError(f"{self.source or 'prepare config'}: detector {self.detector!r} with detector_args "
                              f"{self.detector_args}: {error}") from None
        for key in ("syncnet", "iqa_model"):
            path = getattr(self, key)
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(f"{self.source or 'prepare config'}: {key}: {path} does not exist (weights are "
                                  "local files; nothing is downloaded). Give the file, or null to go without")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}


def admits(lenient, strict, key: str) -> bool:
    """Whether a lenient bound is no tighter than strict's (None: no bound)."""
    if lenient is None or strict is None:
        return lenient is None
    return lenient <= strict if key.startswith("min_") else lenient >= strict


def check_bounds(bounds: dict, where: str) -> None:
    for key, value in bounds.items():
        kind, _, score = key.partition("_")
        if kind not in ("min", "max") or score not in SCORES:
            raise ConfigError(f"{where}: {key} is not a bound; bounds are min_<score> or max_<score>, scores: "
                              f"{', '.join(SCORES)}")
        if value is not None and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number or null, got {value!r}")


def load_config(path: str | Path | None = None, **overrides) -> PrepareConfig:
    """A prepare config (a bundled name such as prepare/synthetic.yaml, or a path; `base:` merged in
    first) -> PrepareConfig, with `overrides` (None: keep) on top; unknown settings named."""
    from fada_lightning.presets import find_config, load_config as load_yaml

    path = find_config(path or DEFAULT_CONFIG)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a prepare config is a mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(PrepareConfig)} - {"source"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}: {', '.join(unknown)} not a prepare setting; settings: {', '.join(sorted(names))}")
    return PrepareConfig(**raw, source=str(path))


def failed_bounds(scores: dict, bounds: dict) -> list[str]:
    """The bounds a clip's scores break, as 'face_size 120 < 256'."""
    failed = []
    for key, bound in bounds.items():
        kind, _, name = key.partition("_")
        value = scores.get(name)
        if bound is None or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if name == "sync_offset":
            value = abs(value)
        if kind == "min" and value < bound:
            failed.append(f"{name} {value:.4g} < {bound:.4g}")
        elif kind == "max" and value > bound:
            failed.append(f"{name} {value:.4g} > {bound:.4g}")
    return failed


def tier_bounds(config: PrepareConfig, tier: str, sync_source: str | None) -> dict:
    """A tier's bounds for a clip whose sync came from `sync_source` ("syncnet", "proxy", None)."""
    bounds = dict(getattr(config, tier))
    if sync_source == "proxy":  # the proxy's confidence is on its own scale
        bounds["min_sync_confidence"] = config.proxy_sync.get(tier)
    return bounds


def assign_tier(scores: dict, config: PrepareConfig) -> tuple[str | None, dict[str, list[str]]]:
    """-> ("strict" | "lenient" | None, {tier: reasons it is not that tier}). Strict needs sync scored by
    SyncNet (or the proxy with `proxy_sync_in_strict`); every strict clip must also be lenient."""
    source = scores.get("sync_source")
    reasons = {tier: failed_bounds(scores, tier_bounds(config, tier, source)) for tier in ("strict", "lenient")}
    if source is None:
        reasons["strict"].append("sync not scored")
    elif source == "proxy" and not config.proxy_sync_in_strict:
        reasons["strict"].append("sync scored by the proxy (proxy_sync_in_strict is off)")
    if not reasons["strict"]:
        if reasons["lenient"]:
            raise AssertionError(f"{config.source}: a clip passes strict but not lenient "
                                 f"({'; '.join(reasons['lenient'])}), which PrepareConfig's check rules out")
        return "strict", reasons
    return ("lenient" if not reasons["lenient"] else None), reasons
