"""The embedded synthetic talking-head world (SPEC section 5), written as WebDataset shards.

Every clip is a pure function of (seed, tier, index): its numpy Generator is seeded from
that triple, so any clip re-renders alone and shards do not depend on process count.
A clip is a cartoon face (random identity) whose mouth opening follows the loudness of a
speech-like 16 kHz signal, with smooth head motion and blinks. `lenient` clips add one or
more degradations, recorded in json["quality"]:
  av_offset_frames  k: wav frame t + k carries the sound of video frame t (k > 0: audio late)
  blur_sigma        Gaussian blur std in pixels at the rendered size (0 = none)
  noise_std         additive Gaussian pixel noise std in 8-bit levels (0 = none)
  motion_amplitude  peak head translation / frame size (clean: 0.02-0.061, wild motion: >= 0.1)
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fada_lightning.video_io import encode_mp4, encode_wav, write_atomic

FPS, SAMPLE_RATE = 25, 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
TIERS = ("strict", "lenient")
MAX_AV_SHIFT = 8  # frames; lenient audio shifts are 3..8 frames either way
PEAK_FRAME_RMS = 0.18  # speech is scaled so its loudest 640-sample frame has this RMS
SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.89, 0.67, 0.52], [0.78, 0.57, 0.42],
                       [0.62, 0.43, 0.30], [0.47, 0.32, 0.23]])
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.85, 0.70, 0.40],
                         [0.60, 0.25, 0.10], [0.65, 0.65, 0.65], [0.20, 0.20, 0.35]])
IRIS_COLOURS = np.array([[0.35, 0.20, 0.10], [0.25, 0.45, 0.75], [0.30, 0.55, 0.30], [0.45, 0.45, 0.50]])
MOUTH_CAVITY = np.array([0.12, 0.03, 0.05])


def clip_rng(seed: int, tier: str, index: int) -> np.random.Generator:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    return np.random.default_rng([seed, TIERS.index(tier), index])


def sample_identity(rng: np.random.Generator, size: int) -> dict:
    """Everything that stays fixed within a clip; lengths in pixels, colours RGB in [0, 1]."""
    rx, ry = size * rng.uniform(0.25, 0.31), size * rng.uniform(0.31, 0.37)
    tone = rng.uniform(0, len(SKIN_TONES) - 1)  # a point between two neighbouring tones
    skin = SKIN_TONES[int(tone)] + (tone % 1) * (SKIN_TONES[int(tone) + 1] - SKIN_TONES[int(tone)])
    hair = np.clip(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.uniform(-0.05, 0.05, 3), 0, 1)
    eye_r = size * rng.uniform(0.035, 0.055)
    mouth_w = rx * rng.uniform(0.32, 0.45)
    identity = dict(
        rx=rx, ry=ry, skin=np.clip(skin + rng.uniform(-0.03, 0.03, 3), 0, 1), hair=hair,
        hair_volume=rng.uniform(1.04, 1.16),  # hair ends at v = hair_bottom ry: short, or long
        hair_bottom=rng.uniform(-0.35, 0.1) if rng.random() < 0.6 else rng.uniform(0.5, 1.1),
        hairline=rng.uniform(0.25, 0.6), hair_tilt=rng.uniform(-0.3, 0.3), bald=rng.random() < 0.08,
        eye_dx=rx * rng.uniform(0.36, 0.5), eye_y=-ry * rng.uniform(0.12, 0.25), eye_r=eye_r,
        iris=np.clip(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] + rng.uniform(-0.05, 0.05, 3), 0, 1),
        mouth_w=mouth_w, mouth_y=ry * rng.uniform(0.42, 0.52),
        lips=np.clip(skin * 0.75 + np.array([0.18, 0.02, 0.04]), 0, 1),
        background=rng.uniform(0.3, 0.9, (2, 3)), background_angle=rng.uniform(0, 2 * np.pi),
        shirt=rng.uniform(0.3, 0.9, 3), pitch=rng.uniform(90, 250))
    return {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v for k, v in identity.items()}


def voiced_syllable(rng: np.random.Generator, length: int, pitch: float) -> np.ndarray:
    """One vowel with unit RMS before its envelope: harmonics k*f0(t) of a gliding pitch
    f0(t) = pitch (1 + glide t/T)(1 + 0.015 sin(2 pi 5.5 t)) (vibrato), weighted by a 1/k
    tilt plus two Gaussian formant bumps F1, F2; raised-cosine attack and release."""
    t = np.arange(length) / SAMPLE_RATE
    f0 = pitch * (1 + rng.uniform(-0.08, 0.08) * t / t[-1]) * (1 + 0.015 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    k = np.arange(1, min(24, int(3800 / pitch)) + 1)[:, None]
    formant1, formant2 = rng.uniform(300, 850), rng.uniform(850, 2300)
    weight = (0.3 + np.exp(-((k * pitch - formant1) / 120) ** 2)
              + 0.6 * np.exp(-((k * pitch - formant2) / 200) ** 2)) / k
    tone = (weight * np.sin(k * phase)).sum(0)
    tone /= np.sqrt(np.mean(tone ** 2))
    attack, release = rng.uniform(0.015, 0.04) * SAMPLE_RATE, rng.uniform(0.03, 0.08) * SAMPLE_RATE
    ramp = np.clip(np.minimum(np.arange(length) / attack, (length - np.arange(length)) / release), 0, 1)
    return tone * (0.5 - 0.5 * np.cos(np.pi * ramp))


def synthesize_speech(rng: np.random.Generator, num_samples: int, pitch: float) -> np.ndarray:
    """Syllables of 100-300 ms at loudness 0.3-1 separated by 50-600 ms pauses (15%: 0.6-1.2 s)."""
    speech = np.zeros(num_samples)
    start = int(rng.uniform(0, 0.3) * SAMPLE_RATE)
    while start < num_samples:
        length = int(rng.uniform(0.1, 0.3) * SAMPLE_RATE)
        syllable = rng.uniform(0.3, 1.0) * voiced_syllable(rng, length, pitch)
        speech[start:start + length] = syllable[:num_samples - start]
        pause = rng.uniform(0.6, 1.2) if rng.random() < 0.15 else rng.uniform(0.05, 0.6)
        start += length + int(pause * SAMPLE_RATE)
    return speech * PEAK_FRAME_RMS / max(frame_rms(speech).max(), 1e-8)


def frame_rms(audio: np.ndarray) -> np.ndarray:
    """Loudness of frame t = RMS of samples [640 t, 640 (t + 1))."""
    return np.sqrt(np.mean(audio[: len(audio) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME]
                           .reshape(-1, SAMPLES_PER_FRAME) ** 2, axis=1))


def smooth_trajectory(rng: np.random.Generator, frames: int, peak: float, max_hz: float) -> np.ndarray:
    """Sum of three random sinusoids (0.15..max_hz Hz), scaled so that max |x| = peak."""
    t = np.arange(frames) / FPS
    hz, phase, weight = rng.uniform(0.15, max_hz, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.3, 1, 3)
    wave = (weight[:, None] * np.sin(2 * np.pi * hz[:, None] * t + phase[:, None])).sum(0)
    return peak * wave / max(np.abs(wave).max(), 1e-8)


def blink_track(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Eyelid closure (1 = closed): blinks of 3-5 frames, 1-4 s apart, profile min(1, 1.6 sin)."""
    closure, start = np.zeros(frames), int(rng.uniform(0, 3) * FPS)
    while start < frames:
        length = int(rng.integers(3, 6))
        profile = np.clip(1.6 * np.sin(np.pi * (np.arange(length) + 0.5) / length), 0, 1)
        closure[start:start + length] = profile[:frames - start]
        start += length + int(rng.uniform(1, 4) * FPS)
    return closure


def smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def ellipse(u, v, cu, cv, ru, rv):
    """Anti-aliased coverage of ((u-cu)/ru)^2 + ((v-cv)/rv)^2 <= 1. With f = that form - 1,
    the signed distance to the edge is ~ f / |grad f| pixels (first order); coverage is a
    smooth step of (0.5 - distance) over one pixel."""
    du, dv = (u - cu) / ru, (v - cv) / rv
    distance = (du * du + dv * dv - 1) / (2 * np.sqrt((du / ru) ** 2 + (dv / rv) ** 2) + 1e-6)
    return smoothstep(0.5 - distance)


def render_faces(face: dict, size: int, pose: np.ndarray, blink: np.ndarray, mouth_open: np.ndarray):
    """All frames at once -> float32 (n, size, size, 3) in [0, 1]. pose (n, 3) = [dx, dy, deg]."""
    blink, mouth_open = blink.astype(np.float32), mouth_open.astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dx, dy, angle = (pose[:, i, None, None].astype(np.float32) for i in range(3))
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    cx, cy = size / 2 + dx, 0.52 * size + dy
    u = cos * (x - cx) + sin * (y - cy)  # head-local coordinates: rotate by -angle about the
    v = -sin * (x - cx) + cos * (y - cy)  # moving head centre; features are placed in (u, v)
    along = ((x - size / 2) * float(np.cos(face["background_angle"]))  # gradient coordinate
             + (y - size / 2) * float(np.sin(face["background_angle"]))) / size + 0.5
    low, high = face["background"].astype(np.float32)
    canvas = np.repeat((low + np.clip(along, 0, 1)[..., None] * (high - low))[None], len(pose), 0)

    def draw(cu, cv, ru, rv, colour, clip=None):
        """Paint an ellipse given in head coordinates, touching only its bounding box, which
        is the union over frames of the centre (image = head centre + R(angle) (cu, cv)) +- reach."""
        reach = float(np.max(np.maximum(ru, rv))) + 2
        centre_x, centre_y = cx + cos * cu - sin * cv, cy + sin * cu + cos * cv
        x0, x1 = (int(np.clip(c, 0, size)) for c in (centre_x.min() - reach, centre_x.max() + reach + 1))
        y0, y1 = (int(np.clip(c, 0, size)) for c in (centre_y.min() - reach, centre_y.max() + reach + 1))
        box = (slice(None), slice(y0, y1), slice(x0, x1))
        coverage = ellipse(u[box], v[box], cu, cv, ru, rv)
        if clip is not None:
            coverage = coverage * clip(u[box], v[box])
        colour = colour(u[box], v[box]) if callable(colour) else np.float32(colour)
        canvas[box] += coverage[..., None] * (colour - canvas[box])  # 'over' with alpha = coverage

    body = (slice(None), slice(int(0.75 * size), None))  # shoulders: half the head's sway, no turn
    shoulders = ellipse(x[body[1:]], y[body[1:]], size / 2 + 0.5 * dx, 1.05 * size, 0.42 * size,
                        0.22 * size)
    canvas[body] += shoulders[..., None] * (face["shirt"] - canvas[body])
    rx, ry, volume, hair = face["rx"], face["ry"], face["hair_volume"], face["hair"]
    if not face["bald"]:  # hair mass behind the head, cut at v = hair_bottom (long styles: the jaw)
        draw(0, -0.05 * ry, rx * volume, ry * (volume + 0.3 * (face["hair_bottom"] > 0.3)), hair,
             lambda u, v: smoothstep(0.5 - (v - face["hair_bottom"] * ry)))

    def shaded_skin(u, v):  # darkens by up to 18% towards the rim: skin (1 - 0.18 min(r^2, 1))
        return face["skin"] * (1 - 0.18 * np.minimum((u / rx) ** 2 + (v / ry) ** 2, 1))[..., None]
    draw(0, 0, rx, ry, shaded_skin)
    if not face["bald"]:  # fringe: the hair cap above a (tilted) hairline v < -hairline ry + tilt u
        draw(0, -0.05 * ry, rx * volume, ry * volume, hair,
             lambda u, v: smoothstep(0.5 - (v + face["hairline"] * ry - face["hair_tilt"] * u)))
    draw(0, 0.12 * ry, 0.1 * rx, 0.08 * ry, face["skin"] * 0.85)  # nose
    eye_r, eye_y = face["eye_r"], face["eye_y"]
    lid = 0.62 * eye_r * (1 - 0.92 * blink[:, None, None])  # eyelid opening shrinks as blink -> 1
    for eye_x in (-face["eye_dx"], face["eye_dx"]):
        def sclera(u, v):
            return ellipse(u, v, eye_x, eye_y, eye_r, lid)  # noqa: B023 (drawn in this iteration)
        draw(eye_x, eye_y - 1.6 * eye_r, 1.3 * eye_r, 0.3 * eye_r, hair * 0.8)  # brow
        draw(eye_x, eye_y, eye_r, lid, (0.95, 0.95, 0.93))
        draw(eye_x, eye_y, 0.55 * eye_r, 0.55 * eye_r, face["iris"], sclera)
        draw(eye_x, eye_y, 0.25 * eye_r, 0.25 * eye_r, (0.05, 0.05, 0.05), sclera)
    # Mouth: a dark cavity of half-width w and half-height w (0.05 + 0.55 open), so its area
    # (the dark pixel count) grows linearly with the opening; the lips are a ring around it.
    width, mouth_y = face["mouth_w"], face["mouth_y"]
    height = width * (0.05 + 0.55 * mouth_open[:, None, None])
    draw(0, mouth_y, 1.12 * width, height + 0.14 * width, face["lips"])
    draw(0, mouth_y, width, height, MOUTH_CAVITY)
    return canvas


DARK_LUMA = 45  # 8-bit luminance: the mouth cavity is ~15; skin, lips, shirt and background are above 65


def mouth_dark_pixels(video: np.ndarray) -> np.ndarray:
    """A pixel measure of mouth opening: per-frame count of dark pixels in the lower middle of
    the frame, where every identity's mouth is. video (n, H, W, 3) uint8 -> (n,). The cavity's
    area grows linearly with the opening (see `render_faces`), so this is linear in it too."""
    size = video.shape[1]
    box = video[:, int(0.6 * size):int(0.9 * size), int(0.32 * size):int(0.68 * size)].astype(np.float32)
    return ((box @ np.float32([0.299, 0.587, 0.114])) < DARK_LUMA).sum(axis=(1, 2))


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable blur of (n, H, W, C) along H then W; kernel exp(-k^2 / 2 sigma^2), |k| <= 3 sigma."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        padded = np.pad(frames, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
        length = frames.shape[axis]
        frames = sum(w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(kernel))
    return frames


def render_clip(seed: int, tier: str, index: int, size: int = 64, frames: int = 50):
    """-> (video uint8 (frames, size, size, 3), wav float32 (frames * 640,), json meta dict)."""
    rng = clip_rng(seed, tier, index)
    face = sample_identity(rng, size)
    # Speech covers MAX_AV_SHIFT extra frames on both sides, so a shifted wav is still real speech.
    speech = synthesize_speech(rng, (frames + 2 * MAX_AV_SHIFT) * SAMPLES_PER_FRAME, face["pitch"])
    seen = speech[MAX_AV_SHIFT * SAMPLES_PER_FRAME:(MAX_AV_SHIFT + frames) * SAMPLES_PER_FRAME]
    # Mouth opening = loudness of the frame's own 640 samples (a box-smoothed envelope; the
    # syllable attack/release keeps it smooth over frames) over the clip's peak loudness:
    # 0 in pauses, 1 on the loudest frame of the speech.
    mouth_open = np.clip(frame_rms(seen) / PEAK_FRAME_RMS, 0, 1)
    wild = tier == "lenient" and rng.random() < 0.4
    shift, blur, noise = (tier == "lenient") & (rng.random(3) < 0.4)
    if tier == "lenient" and not (wild or shift or blur or noise):  # at least one degradation
        wild, shift, blur, noise = np.arange(4) == rng.integers(4)
    peak_move = rng.uniform(0.10, 0.16) if wild else rng.uniform(0.02, 0.05)
    pose = np.stack([smooth_trajectory(rng, frames, peak_move * size, 2.0 if wild else 0.8),
                     smooth_trajectory(rng, frames, 0.7 * peak_move * size, 2.0 if wild else 0.8),
                     smooth_trajectory(rng, frames, rng.uniform(10, 20) if wild else rng.uniform(2, 5),
                                       2.0 if wild else 0.8)], axis=1)
    blink = blink_track(rng, frames)
    canvas = render_faces(face, size, pose, blink, mouth_open)
    blur_sigma = rng.uniform(0.8, 2.0) * size / 64 if blur else 0.0
    noise_std = rng.uniform(4, 14) if noise else 0.0
    if blur:
        canvas = gaussian_blur(canvas, blur_sigma)
    if noise:
        canvas = canvas + np.float32(noise_std / 255) * rng.standard_normal(canvas.shape, np.float32)
    video = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    offset = int(rng.choice([-1, 1]) * rng.integers(3, MAX_AV_SHIFT + 1)) if shift else 0
    start = (MAX_AV_SHIFT - offset) * SAMPLES_PER_FRAME  # wav frame t + offset = video frame t
    wav = speech[start:start + frames * SAMPLES_PER_FRAME].astype(np.float32)
    meta = {"video_id": f"synthetic-{seed}-{tier}-{index:06d}", "fps": FPS, "frames": frames,
            "duration": frames / FPS, "sample_rate": SAMPLE_RATE, "size": size, "tier": tier, "seed": seed,
            "mouth_open": _floats(mouth_open), "head_pose": [_floats(p) for p in pose],
            "blink": _floats(blink), "loudness": _floats(frame_rms(wav)),
            "quality": {"av_offset_frames": offset, "blur_sigma": round(float(blur_sigma), 4),
                        "noise_std": round(float(noise_std), 4),
                        "motion_amplitude": round(float(np.hypot(pose[:, 0], pose[:, 1]).max() / size), 4)}}
    return video, wav, meta


def render_raw_video(seed: int, index: int, shot_seconds=(6.0, 12.0, 4.0), size: int = 64,
                     lenient_every: int = 3) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The synthetic world as a raw long video, as `fada prepare` meets real ones: shots of different
    identities joined by hard cuts (every `lenient_every`-th shot a lenient, degraded one). ->
    (video (n, size, size, 3) uint8, wav (n * 640,), each shot's json meta with its first frame)."""
    videos, wavs, shots, first = [], [], [], 0
    for shot, seconds in enumerate(shot_seconds):
        tier = "lenient" if lenient_every and shot % lenient_every == lenient_every - 1 else "strict"
        video, wav, meta = render_clip(seed, tier, index * 100 + shot, size, round(seconds * FPS))
        videos.append(video)
        wavs.append(wav)
        shots.append({**meta, "first_frame": first})
        first += len(video)
    return np.concatenate(videos), np.concatenate(wavs), shots


def _floats(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def encode_sample(job: tuple) -> dict:
    """(seed, tier, index, size, frames) -> one WebDataset sample of bytes (runs in workers)."""
    seed, tier, index, size, frames = job
    video, wav, meta = render_clip(seed, tier, index, size, frames)
    return {"__key__": f"{tier}-{index:06d}", "mp4": encode_mp4(video, wav, FPS, SAMPLE_RATE),
            "wav": encode_wav(wav, SAMPLE_RATE), "json": json.dumps(meta).encode()}


def write_tar(path: Path, samples, bar: tqdm) -> None:
    import webdataset  # here, not at the top: spawned render workers need not import torch

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # renamed into place when complete
    with open(tmp, "wb") as stream, webdataset.TarWriter(stream, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
            bar.update()
    os.replace(tmp, path)


def write_tier(root: Path, tier: str, samples, count: int, clips_per_shard: int, bar: tqdm) -> list[str]:
    """Consume `count` samples in order into <root>/<tier>/<tier>-%05d.tar; -> relative paths."""
    (root / tier).mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, first in enumerate(range(0, count, clips_per_shard)):
        shards.append(f"{tier}/{tier}-{shard:05d}.tar")
        write_tar(root / shards[-1], itertools.islice(samples, min(clips_per_shard, count - first)), bar)
    return shards


def write_shards(root, strict_clips: int = 512, lenient_clips: int = 256, clips_per_shard: int = 64,
                 size: int = 64, frames: int = 50, seed: int = 0, progress: bool = True,
                 processes: int = 2) -> dict:
    """Render and write <root>/{strict,lenient}/<tier>-%05d.tar, then <root>/manifest.json."""
    root = Path(root)
    (root / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until we finish
    counts = {"strict": strict_clips, "lenient": lenient_clips}
    jobs = [(seed, tier, index, size, frames) for tier in TIERS for index in range(counts[tier])]
    workers = min(processes, os.cpu_count() or 1, len(jobs))
    # spawn, not fork: callers may hold threads (torch, Lightning) that fork would copy mid-lock
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        samples = pool.imap(encode_sample, jobs, chunksize=4) if pool else map(encode_sample, jobs)
        with tqdm(total=len(jobs), unit="clip", disable=not progress, desc="synthetic") as bar:
            shards = {tier: write_tier(root, tier, samples, counts[tier], clips_per_shard, bar)
                      for tier in TIERS}
    finally:
        if pool:
            pool.terminate()
    manifest = {"seed": seed, "size": size, "clip_frames": frames, **shards,
                "samples": counts, "clips_per_shard": clips_per_shard}
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def ensure_dataset(root, **kwargs) -> dict:
    """The manifest at root if it matches the request (and its shards exist), else write_shards."""
    request = inspect.signature(write_shards).bind(root, **kwargs)
    request.apply_defaults()
    wanted = request.arguments
    path = Path(root) / "manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        same = (manifest.get("seed"), manifest.get("size"), manifest.get("clip_frames"),
                manifest.get("samples"), manifest.get("clips_per_shard")) == (
            wanted["seed"], wanted["size"], wanted["frames"],
            {"strict": wanted["strict_clips"], "lenient": wanted["lenient_clips"]}, wanted["clips_per_shard"])
        if same and all((Path(root) / p).exists() for tier in TIERS for p in manifest[tier]):
            return manifest
    return write_shards(root, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic talking-head shards.")
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--strict", type=int, default=512)
    parser.add_argument("--lenient", type=int, default=256)
    parser.add_argument("--clips-per-shard", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--raw-videos", type=int, default=0, help="instead: this many raw long videos (shots of "
                        "--shot-seconds joined by hard cuts) as mp4 files, the input `fada prepare` expects")
    parser.add_argument("--shot-seconds", default="8,12,6,10", help="seconds of each shot of a raw video")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.raw_videos:
        from datamodules.prepare.media import write_video

        shots = tuple(float(s) for s in args.shot_seconds.split(","))
        for index in tqdm(range(args.raw_videos), unit="video", desc="raw videos"):
            video, wav, _ = render_raw_video(args.seed, index, shots, args.size)
            write_video(Path(args.out) / f"talk {index:03d}.mp4", video, wav)
        print(f"wrote {args.raw_videos} videos of {sum(shots):g} s to {args.out} in {time.perf_counter() - began:.1f} s")
        return
    manifest = write_shards(args.out, args.strict, args.lenient, args.clips_per_shard, args.size,
                            args.frames, args.seed, processes=args.processes)
    print(f"wrote {manifest['samples']} clips to {args.out} in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
