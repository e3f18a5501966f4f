"""One WebDataset sample -> one training clip (SPEC 5): the members a sample needs, the decoder and its
errors, and the fixed clips validation uses. Nothing is unpickled: json via json.loads, wav via `wave`,
video via PyAV (decoding.py), in a decode server when isolated."""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import Dataset

from .audio_features import SAMPLES_PER_FRAME, audio_windows
from .decoding import open_video, read_wav

REQUIRED_FIELDS = ("mp4", "wav", "json")
CACHE_FIELDS = ("latents.npy", "audio.npy")  # added by `fada cache` (datamodules/cache.py)
# members above these sizes are skipped before they are parsed: 4 s of 512 px H.264 is ~1 MB, its wav
# 125 kB, its json a few kB (SPEC 5); the limits leave room for 10 s clips of larger frames
MAX_MEMBER_MB = {"json": 4, "wav": 64, "mp4": 512, "latents.npy": 512, "audio.npy": 512}
# the synthetic world's scores (datamodules/synthetic.py); real data names its own in `quality_keys`
QUALITY_KEYS = ("av_offset_frames", "blur_sigma", "noise_std", "motion_amplitude")


class BadSampleWarning(UserWarning):
    """A sample or shard was skipped because it could not be read."""


class ResizedClipWarning(UserWarning):
    """Clips are decoded at another frame size than the shards hold (see its count)."""


class SkipSample(Exception):
    """Raised by the decoder for data that is readable but unusable (too short, missing fields)."""


class MissingMembers(SkipSample):
    """A sample without all of REQUIRED_FIELDS (a shard cut short leaves one)."""


@dataclass
class ClipDecoder:
    """Raw webdataset sample -> training item; see `__call__` for the shapes.

    A training clip starts at a random s in [M, n - F] with a random reference frame; with
    rng=None (validation) the clip starts at s = M and the reference is the last frame, so the
    item is a pure function of the sample."""

    audio_features: object  # a datamodules.audio_features class: (wav, T) -> (T, L, D)
    clip_frames: int = 8  # F
    motion_frames: int = 2  # M
    audio_radius: int = 2  # r: windows of 2r + 1 frames
    frame_size: int | None = None  # resize on decode; None keeps the shard's size
    quality_keys: tuple[str, ...] = QUALITY_KEYS  # json["quality"] entries read into "quality" (Q,)
    with_wav: bool = False  # also hand back the clip's own audio samples (evaluation: Sync-D)
    cache: dict | None = None  # read `fada cache`'s latents.npy / audio.npy made by exactly this (cache_spec)
    video_backend: str = "pyav"  # datamodules.decoding.VIDEO_BACKENDS
    isolate: bool = True  # decode video in a subprocess: a native crash costs one sample (decoding.py)
    max_member_mb: dict = field(default_factory=lambda: dict(MAX_MEMBER_MB))  # a larger member is skipped unread
    resized: int = field(default=0, init=False, repr=False)  # clips decoded at another frame size, this process

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        """-> {"frames": (F, 3, H, W) in [-1, 1], "motion": (M, 3, H, W), "ref": (3, H, W),
               "audio": (F, 2r + 1, L, D), "mouth_open": (F,) (NaN if the json has none),
               "quality": (Q,) json["quality"][k] for k in quality_keys (NaN where absent),
               "key": str, "tier": str, "start": int}, and with `with_wav` "wav": (F * 640,) float32 at 16 kHz.
        With `cache`, "latents": (M + F + 1, C, h, w) [motion, clip, reference] in place of the pixels
        (nothing is decoded: the GPUs do no decoding or encoding work)."""
        missing = [k for k in REQUIRED_FIELDS if k not in sample]
        if missing:
            raise MissingMembers(f"missing {', '.join(missing)}")
        for name, limit in self.max_member_mb.items():
            if name in sample and len(sample[name]) > limit * 2**20:
                raise SkipSample(f"its {name} is {len(sample[name]) / 2**20:.1f} MB, over the {limit:g} MB limit "
                                 f"(data.max_member_mb)")
        f, m = self.clip_frames, self.motion_frames
        meta = json.loads(sample["json"])
        if self.cache is not None:
            latents, features = self._cached(sample, meta)
            n = len(latents)
        else:
            video = open_video(sample["mp4"], self.video_backend, self.isolate)
            n = len(video)
            if self.frame_size and video.size not in (None, (self.frame_size, self.frame_size)):
                self.resized += 1
                if self.resized & (self.resized - 1) == 0:  # the 1st, 2nd, 4th, 8th ...: a count, not a flood
                    warnings.warn(f"clip {sample['__key__']!r} in shard {sample.get('__url__')} is "
                                  f"{video.size[0]}x{video.size[1]}: resized to {self.frame_size}x{self.frame_size} "
                                  f"({self.resized} clips so far in this process)", ResizedClipWarning)
        if n < m + f:
            raise SkipSample(f"{n} frames, fewer than motion + clip = {m + f}")
        start = int(rng.integers(m, n - f + 1)) if rng is not None else m
        ref = int(rng.integers(0, n)) if rng is not None else n - 1
        wanted = np.concatenate([np.arange(start - m, start + f), [ref]])  # motion [s - M, s), clip [s, s + F), ref

        if self.cache is not None:
            pixels = None
            wav = read_wav(sample["wav"]) if self.with_wav else None
        else:  # decode each wanted frame once, in order
            pixels = torch.from_numpy(video.frames(wanted, self.frame_size))  # (M + F + 1, H, W, 3) uint8
            pixels = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (M + F + 1, 3, H, W) in [-1, 1]
            wav = read_wav(sample["wav"])  # (samples,) float32 at 16 kHz
            if abs(len(wav) - n * SAMPLES_PER_FRAME) > SAMPLES_PER_FRAME:
                raise SkipSample(f"wav has {len(wav)} samples, {n} frames need {n * SAMPLES_PER_FRAME}")
            features = self.audio_features(torch.from_numpy(wav), n)  # (n, L, D), whole clip as in sampling

        mouth = meta.get("mouth_open")
        mouth_open = (torch.tensor(mouth[start:start + f], dtype=torch.float32) if mouth is not None
                      else torch.full((f,), float("nan")))
        if mouth_open.shape != (f,):
            raise SkipSample(f"json mouth_open has {len(mouth)} entries for {n} frames")
        key = sample["__key__"]
        scores = meta.get("quality") or {}
        try:
            quality = torch.tensor([float(scores.get(k, "nan")) for k in self.quality_keys])
        except (AttributeError, TypeError, ValueError):
            raise SkipSample(f"json quality {scores!r} is not a mapping of numbers") from None
        item = {
            "audio": audio_windows(features, start, f, self.audio_radius),  # (F, 2r + 1, L, D)
            "mouth_open": mouth_open,
            "quality": quality,
            "key": key,
            "tier": str(meta.get("tier", key.split("-")[0])),
            "start": start,
        }
        if pixels is None:
            item["latents"] = latents[torch.from_numpy(wanted)].float()
        else:
            item.update(frames=pixels[m:m + f], motion=pixels[:m], ref=pixels[-1])
        if self.with_wav:  # the clip's samples, zero-padded if the wav ends up to a frame early
            own = torch.from_numpy(wav[start * SAMPLES_PER_FRAME:(start + f) * SAMPLES_PER_FRAME])
            item["wav"] = torch.nn.functional.pad(own, (0, f * SAMPLES_PER_FRAME - len(own)))
        return item

    def _cached(self, sample: dict, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`fada cache`'s members -> latents (n, C, h, w), audio features (n, L, D), checked against `cache`."""
        made_by = meta.get("cache")
        if made_by != self.cache:
            raise SkipSample(f"its cached latents / audio features were made by {made_by}, this model needs "
                             f"{self.cache}: run `fada cache` for this model's preset on these shards")
        missing = [k for k in CACHE_FIELDS if k not in sample]
        if missing:
            raise SkipSample(f"json names a cache, but {', '.join(missing)} is missing")
        latents, features = (torch.from_numpy(np.load(io.BytesIO(sample[k]), allow_pickle=False)) for k in CACHE_FIELDS)
        if len(latents) != len(features):
            raise SkipSample(f"latents.npy has {len(latents)} frames, audio.npy {len(features)}")
        return latents, features.float()


def cache_spec(preset: dict) -> dict:
    """What cached latents and audio features depend on: the codec, the audio features and the frame size."""
    return {"codec": preset["codec"], "audio_features": preset["audio_features"], "frame_size": preset["frame_size"]}


def _describe(exn: Exception, limit: int = 200) -> str:
    """Decoders may put the whole input into their messages; keep warnings short."""
    text = f"{type(exn).__name__}: {exn}"
    return text if len(text) <= limit else text[:limit] + "..."


class FixedClips(Dataset):
    """The first `count` usable samples of `urls` (in order), each decoded with the fixed clip
    (rng=None), so validation loss is comparable across epochs. Raw bytes are kept in memory."""

    def __init__(self, urls: list[str], decoder: ClipDecoder, count: int):
        self.decoder, self.skipped = decoder, 0
        self.samples: list[dict] = []

        def warn(exn):
            self.skipped += 1
            warnings.warn(f"validation: skipping unreadable shard data: {_describe(exn)}", BadSampleWarning)
            return True

        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=warn))
        for raw in pipeline:
            if len(self.samples) == count:
                break
            try:
                decoder(raw)
            except Exception as exn:
                self.skipped += 1
                warnings.warn(f"validation: skipping sample {raw.get('__key__')!r} in shard {raw.get('__url__')}: "
                              f"{_describe(exn)}", BadSampleWarning)
                continue
            self.samples.append({k: raw[k] for k in ("__key__", "__url__", *REQUIRED_FIELDS)})
        if not self.samples:
            raise RuntimeError(f"no usable validation clip in {urls}")
        if len(self.samples) < count:
            warnings.warn(f"validation: only {len(self.samples)} of {count} clips available in {urls}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        item = self.decoder(self.samples[index])
        item["skipped"], item["worker"] = self.skipped, -1  # -1: not a streaming worker
        return item
