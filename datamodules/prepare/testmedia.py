"""Raw talking-video test media as numpy arrays: a real face (skimage's astronaut) that talks.

For tests and benches of `fada prepare` (another module writes these arrays to files). Every clip is
deterministic by `seed` and returns (frames (n, H, W, 3) uint8 RGB, audio (samples,) float32 mono).

One clock everywhere: frame k shows time t_k (seconds; k / fps, or `frame_times` for a variable frame
rate) and its mouth opens with the loudness of the audio window [t_k, t_k + 1 / fps) - the same window
`datamodules.synthetic.frame_rms` gives frame k at 25 fps.

scikit-image is a dev-only dependency: it is imported inside the functions that need its photos.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from datamodules.synthetic import SAMPLE_RATE, synthesize_speech

# Read off astronaut() (512 x 512): OpenCV's frontal Haar cascade boxes her face at x 177-270, y 67-160;
# her (smiling, closed) mouth is centred at (224, 145), about 44 px wide, lips parting just below the teeth.
ASTRONAUT_FACE = (177.0, 67.0, 270.0, 160.0)  # x0, y0, x1, y1 in astronaut() pixels
ASTRONAUT_MOUTH = (224.0, 148.0, 15.0, 7.0)   # cavity centre x, y, half-width, half-height at loudness 1
# Head-and-shoulders framing (x0, y0, x1, y1): the face is 36% of the width. The full photo's space shuttle
# (x > 340) makes the Haar cascade report a second face in ~20% of slightly shifted 256 px frames.
PORTRAIT_FRAMING = (96, 0, 352, 256)
MOUTH_CAVITY = np.array([70.0, 22.0, 24.0], np.float32)  # dark red-brown RGB of an open mouth
MOUTH_ALPHA = 0.85                             # cavity opacity inside the ellipse (edges anti-aliased)


def astronaut_face() -> np.ndarray:
    """skimage.data.astronaut(): (512, 512, 3) uint8 RGB, a frontal face (box `ASTRONAUT_FACE`); a fresh copy."""
    return _astronaut().copy()


@functools.lru_cache(maxsize=1)
def _astronaut() -> np.ndarray:
    from skimage import data

    photo = data.astronaut()
    photo.flags.writeable = False
    return photo


def voice(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """(round(seconds * sample_rate),) float32 speech-like syllables and pauses (`synthesize_speech` at
    16 kHz, pitch 170-230 Hz), linearly resampled to `sample_rate` when it differs."""
    rng = np.random.default_rng([seed, 0])
    speech = synthesize_speech(rng, int(round(seconds * SAMPLE_RATE)), pitch=rng.uniform(170, 230))
    if sample_rate != SAMPLE_RATE:
        num_out = int(round(seconds * sample_rate))
        speech = np.interp(np.arange(num_out) * (SAMPLE_RATE / sample_rate), np.arange(len(speech)), speech)
    return speech.astype(np.float32)


def loudness(audio: np.ndarray, fps: float = 25, sample_rate: int = 16000, times=None) -> np.ndarray:
    """Per-frame RMS in [0, 1]: frame k covers samples [round(t_k sr), round((t_k + 1/fps) sr)) with
    t_k = k / fps (all whole frames of the audio) or t_k = times[k]; divided by the loudest whole frame
    of the regular k / fps grid (so values at arbitrary `times` share one scale; clipped to 1)."""
    audio = np.asarray(audio, np.float64)
    energy = np.concatenate([[0.0], np.cumsum(audio ** 2)])  # energy[j] = sum of audio[:j] ** 2

    def rms(starts):
        lo = np.clip(np.round(starts * sample_rate).astype(np.int64), 0, len(audio))
        hi = np.clip(np.round((starts + 1 / fps) * sample_rate).astype(np.int64), 0, len(audio))
        return np.sqrt(np.maximum(energy[hi] - energy[lo], 0) / np.maximum(hi - lo, 1))

    grid = rms(np.arange(int(len(audio) * fps / sample_rate + 1e-9)) / fps)
    values = grid if times is None else rms(np.asarray(times, np.float64))
    return np.clip(values / max(grid.max(initial=0.0), 1e-8), 0.0, 1.0)


def portrait_photo(mirror: bool = False):
    """The astronaut framed by `PORTRAIT_FRAMING` -> (photo (256, 256, 3) uint8, face box (4,), mouth (4,)),
    the boxes in the photo's pixels as `ASTRONAUT_FACE` and `ASTRONAUT_MOUTH`; mirrored left-right if asked."""
    x0, y0, x1, y1 = PORTRAIT_FRAMING
    photo = _astronaut()[y0:y1, x0:x1].copy()
    face = np.array(ASTRONAUT_FACE) - [x0, y0, x0, y0]
    mouth = np.array(ASTRONAUT_MOUTH) - [x0, y0, 0, 0]
    if mirror:  # pixel centre x -> w - 1 - x; box edges x0, x1 -> w - x1, w - x0
        width = x1 - x0
        photo = np.ascontiguousarray(photo[:, ::-1])
        face = np.array([width - face[2], face[1], width - face[0], face[3]])
        mouth = np.array([width - 1 - mouth[0], *mouth[1:]])
    return photo, face, mouth


def talking_portrait(seconds: float, fps: float = 25, size: tuple[int, int] = (256, 256), seed: int = 0,
                     sample_rate: int = 16000, head_motion: float = 0.02, mouth: bool = True, frame_times=None):
    """The astronaut talking: (frames (n, H, W, 3) uint8, audio float32) with n = round(seconds * fps) or
    len(frame_times). The head-and-shoulders photo covers `size` (centre crop), wanders smoothly by up to
    head_motion * (W, H) px (sub-pixel translation, edges replicated), and its mouth opens with `loudness`
    at each frame's time."""
    times, audio, loud = _timeline(seconds, fps, seed, sample_rate, frame_times)
    photo, _, mouth_box = portrait_photo()
    frames = _portrait(photo, mouth_box if mouth else None, loud, size, _wander(times, seed, head_motion, size))
    return frames, audio


def two_faces(seconds: float, size: tuple[int, int] = (256, 512), seed: int = 0, **kwargs):
    """Two portraits side by side, each (H, W // 2): the talking astronaut on the left, her mirror image
    (independent head motion, mouth closed: a listener) on the right. kwargs: as `talking_portrait`."""
    half = (size[0], size[1] // 2)
    left, audio = talking_portrait(seconds, size=half, seed=seed, **kwargs)
    right, _ = talking_portrait(seconds, size=half, seed=seed + 1, mouth=False, **kwargs)
    return np.concatenate([left, right[:, :, ::-1]], axis=2), audio


def face_leaving(seconds: float, fps: float = 25, size: tuple[int, int] = (256, 256), seed: int = 0,
                 sample_rate: int = 16000, head_motion: float = 0.02, frame_times=None):
    """The talking portrait sliding right at constant speed over the clip's second half, by W at the end:
    the face is whole until seconds / 2, partly out after that, gone for about the last quarter."""
    times, audio, loud = _timeline(seconds, fps, seed, sample_rate, frame_times)
    photo, _, mouth = portrait_photo()
    slide = np.clip(2 * times / seconds - 1, 0, 1)[:, None] * np.array([size[1], 0.0])
    return _portrait(photo, mouth, loud, size, _wander(times, seed, head_motion, size) + slide), audio


def tiny_face(seconds: float, fps: float = 25, size: tuple[int, int] = (360, 640), seed: int = 0,
              sample_rate: int = 16000, head_motion: float = 0.02, frame_times=None, face_px: float = 40):
    """The talking portrait scaled so its (Haar) face box is `face_px` wide, centred on a wall: a diagonal
    grey-beige gradient (a flat canvas would fill the grey histogram and `equalizeHist` flatten the face)."""
    times, audio, loud = _timeline(seconds, fps, seed, sample_rate, frame_times)
    photo, face, mouth = portrait_photo()
    ramp = np.add.outer(np.linspace(0, 0.5, size[0]), np.linspace(0, 0.5, size[1]))[..., None]  # 0..1
    canvas = (40 + 180 * ramp * np.array([1.0, 0.95, 0.85])).astype(np.uint8)
    frames = _portrait(photo, mouth, loud, size, _wander(times, seed, head_motion, size),
                       scale=face_px / (face[2] - face[0]), canvas=canvas)
    return frames, audio


def still_image(seconds: float, seed: int = 0, **kwargs):
    """A still image as video: the portrait's first frame (mouth closed) repeated; the audio still talks.
    kwargs: as `talking_portrait` (but head_motion and mouth)."""
    frames, audio = talking_portrait(seconds, seed=seed, mouth=False, head_motion=0.0, **kwargs)
    return np.ascontiguousarray(np.broadcast_to(frames[:1], frames.shape)), audio


def degraded(seconds: float, blur_sigma: float = 2.0, noise_std: float = 8.0, seed: int = 0, **kwargs):
    """The talking portrait with a Gaussian blur (std `blur_sigma` px) and additive Gaussian pixel noise
    (std `noise_std` 8-bit levels). kwargs: as `talking_portrait`."""
    frames, audio = talking_portrait(seconds, seed=seed, **kwargs)
    rng = np.random.default_rng([seed, 2])
    out = np.empty_like(frames)
    for k, frame in enumerate(frames):
        blurred = cv2.GaussianBlur(frame, (0, 0), blur_sigma) if blur_sigma > 0 else frame
        noise = rng.standard_normal(frame.shape, dtype=np.float32) * noise_std
        out[k] = np.clip(blurred + noise, 0, 255).astype(np.uint8)  # uint8 + float32 -> float32
    return out, audio


def camera_pan(seconds: float, fps: float = 25, size: tuple[int, int] = (256, 256), seed: int = 0,
               sample_rate: int = 16000, head_motion: float = 0.0, frame_times=None,
               speed: float = 4.0, span: float = 0.2):
    """The camera pans back and forth horizontally at a steady `speed` px/frame (a triangle wave of amplitude
    span * W; at 256 px, 4 px/frame and 25 fps a leg lasts 26 frames): background and face move together.
    The photo is zoomed by 1 + 2 span about the face so no edge ever shows."""
    times, audio, loud = _timeline(seconds, fps, seed, sample_rate, frame_times)
    photo, face, mouth = portrait_photo()
    amplitude = span * size[1]
    period = 4 * amplitude / (speed * fps)  # seconds per back-and-forth
    pan = amplitude * (1 - 4 * np.abs((times / period) % 1.0 - 0.5))  # in [-A, A], slope +-4 A / period
    shift = _wander(times, seed, head_motion, size) + pan[:, None] * np.array([1.0, 0.0])
    frames = _portrait(photo, mouth, loud, size, shift, zoom=1 + 2 * span, anchor=(face[:2] + face[2:]) / 2)
    return frames, audio


def with_cut(seconds: float, fps: float = 25, size: tuple[int, int] = (256, 256), seed: int = 0,
             sample_rate: int = 16000, head_motion: float = 0.02, frame_times=None):
    """A hard cut at seconds / 2 (the first frame with t >= seconds / 2 opens the second shot): before it
    the portrait, after it a visibly different shot of the same speaker - mirrored, zoomed 1.5x about
    her face and warmed (R x1.1, B x0.7); her mouth keeps following the audio."""
    times, audio, loud = _timeline(seconds, fps, seed, sample_rate, frame_times)
    shift = _wander(times, seed, head_motion, size)
    cut = int(np.searchsorted(times, seconds / 2))
    photo, _, mouth = portrait_photo()
    first = _portrait(photo, mouth, loud[:cut], size, shift[:cut])
    photo, face, mouth = portrait_photo(mirror=True)
    warm = np.clip(photo * np.array([1.1, 1.0, 0.7]), 0, 255).astype(np.uint8)
    second = _portrait(warm, mouth, loud[cut:], size, shift[cut:], zoom=1.5, anchor=(face[:2] + face[2:]) / 2)
    return np.concatenate([first, second]), audio


def no_face(seconds: float, fps: float = 25, size: tuple[int, int] = (256, 256), seed: int = 0,
            sample_rate: int = 16000, head_motion: float = 0.02, frame_times=None):
    """No face: skimage's coffee cup with the same small smooth motion; the audio still talks."""
    from skimage import data

    times, audio, _ = _timeline(seconds, fps, seed, sample_rate, frame_times)
    return _portrait(data.coffee(), None, None, size, _wander(times, seed, head_motion, size)), audio


def _timeline(seconds, fps, seed, sample_rate, frame_times):
    """-> frame times (n,) s, audio, loudness at each frame time (n,)."""
    times = (np.arange(int(round(seconds * fps))) / fps if frame_times is None
             else np.asarray(frame_times, np.float64))
    audio = voice(seconds, sample_rate, seed)
    return times, audio, loudness(audio, fps, sample_rate, times=times)


def _wander(times: np.ndarray, seed: int, amplitude: float, size) -> np.ndarray:
    """(n, 2) smooth x, y offsets in px at `times`: per axis a sum of three sinusoids of 0.1-0.6 Hz divided by
    the sum of their weights, so |offset| <= amplitude * (W, H); a pure function of (t, seed)."""
    rng = np.random.default_rng([seed, 1])
    hz, phase, weight = rng.uniform(0.1, 0.6, (3, 2)), rng.uniform(0, 2 * np.pi, (3, 2)), rng.uniform(0.3, 1, (3, 2))
    wave = (weight * np.sin(2 * np.pi * hz * times[:, None, None] + phase)).sum(1) / weight.sum(0)
    return amplitude * wave * np.array([size[1], size[0]], np.float64)


def _portrait(image, mouth, loud, size, shift, zoom=1.0, anchor=None, scale=None, canvas=None) -> np.ndarray:
    """Animate one photo into (n, H, W, 3) uint8 frames, n = len(shift).

    The photo is scaled by `scale` (default: just covering `size`, times `zoom`), the point `anchor` (photo
    pixels, default its centre) lands where it would at zoom 1, and frame k is translated by shift[k] (x, y px,
    sub-pixel, bilinear). mouth (cx, cy, half_w, max_half_h) in photo pixels: a dark cavity ellipse of height
    loud[k] * max is blended there before the translation. Outside the photo: `canvas`, else replicated edges.
    """
    h, w = image.shape[:2]
    base = max(size[0] / h, size[1] / w) if scale is None else scale
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    anchor = centre if anchor is None else np.asarray(anchor, np.float64)
    # out = base zoom (p - anchor) + target, target = where the anchor sits at zoom 1 (photo centred)
    target = np.array([(size[1] - 1) / 2, (size[0] - 1) / 2]) + (anchor - centre) * base
    scale = base * zoom
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    sx, sy = resized.shape[1] / w, resized.shape[0] / h  # the rounded scale actually applied
    offset = target - anchor * np.array([sx, sy])
    frames = np.empty((len(shift), *size, 3), np.uint8)
    for k in range(len(shift)):
        source = resized
        if mouth is not None and loud is not None and loud[k] > 0.02:
            source = _open_mouth(resized, mouth[0] * sx, mouth[1] * sy, mouth[2] * sx, mouth[3] * sy * loud[k])
        matrix = np.array([[1.0, 0.0, offset[0] + shift[k][0]], [0.0, 1.0, offset[1] + shift[k][1]]])
        if canvas is None:
            cv2.warpAffine(source, matrix, (size[1], size[0]), dst=frames[k], flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        else:
            frames[k] = canvas
            cv2.warpAffine(source, matrix, (size[1], size[0]), dst=frames[k], flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_TRANSPARENT)
    return frames


def _open_mouth(image, cx, cy, half_w, half_h) -> np.ndarray:
    """A copy of `image` with an anti-aliased dark ellipse (centre cx, cy; semi-axes half_w, half_h px)
    alpha-blended over a patch around the mouth."""
    x0, y0 = max(int(cx - half_w) - 2, 0), max(int(cy - half_h) - 2, 0)
    x1, y1 = min(int(cx + half_w) + 3, image.shape[1]), min(int(cy + half_h) + 3, image.shape[0])
    if x1 <= x0 or y1 <= y0:
        return image
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)  # anti-aliasing needs 8 bits; drawn at 1/16 px (shift 4)
    cv2.ellipse(mask, (round((cx - x0) * 16), round((cy - y0) * 16)), (round(half_w * 16), round(half_h * 16)),
                0, 0, 360, 255, -1, cv2.LINE_AA, 4)
    alpha = (MOUTH_ALPHA / 255) * mask[..., None].astype(np.float32)
    out = image.copy()
    patch = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(patch * (1 - alpha) + MOUTH_CAVITY * alpha, 0, 255).astype(np.uint8)
    return out


# ---- a folder of raw inputs, each with where `fada prepare` should put it ----------------------------------
def shifted(audio: np.ndarray, frames: int, sample_rate: int = 16000, fps: float = 25) -> np.ndarray:
    """The audio `frames` video frames late (audio frame t + k carries frame t's sound), same length."""
    lag = int(round(frames * sample_rate / fps))
    return np.concatenate([np.zeros(lag, np.float32), audio])[:len(audio)]


def write_raw_inputs(folder, size: int = 128, seconds: float = 3.0, long_seconds: float = 23.0) -> dict[str, str]:
    """Write the test videos of `fada prepare` (tests/test_prepare.py, bench/prepare.py) into `folder`
    -> {file name: where it belongs}: "clips" (some tier), "lenient" (lenient, never strict), "dropped"
    (windows found, every one filtered out), or "rejected:<reason>" (the whole input)."""
    from .media import write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    square, rng = (size, size), np.random.default_rng(0)
    expected = {}

    def put(name, expect, media, **options):
        write_video(folder / name, *media, **options)
        expected[name] = expect

    for fps, name in ((24, "portrait 24fps.mp4"), (30000 / 1001, "portrait 29.97fps.mp4"),
                      (30, "portrait 30fps.mov"), (60, "portrait 60fps.mkv")):
        put(name, "clips", talking_portrait(seconds, fps=fps, size=square), fps=fps)
    times = np.cumsum(rng.integers(20, 61, size=int(seconds * 40)) / 1000.0)
    times = np.concatenate([[0.0], times[times < seconds - 0.06]])
    put("portrait vfr.mp4", "clips", talking_portrait(seconds, size=square, frame_times=times), frame_times=times)
    frames, audio = talking_portrait(seconds, size=square)
    put("portrait rotated 90.mp4", "clips", (np.ascontiguousarray(np.rot90(frames, 1, axes=(1, 2))), audio),
        rotation=90)  # stored turned a quarter counter-clockwise, shown upright by the tag
    for rate in (44100, 48000):
        put(f"portrait {rate / 1000:g}kHz stereo.mp4", "clips",
            talking_portrait(seconds, size=square, sample_rate=rate), sample_rate=rate, channels=2)
    put("cut mid-file.mp4", "clips", with_cut(2 * seconds + 0.4, size=square))
    put("no face.mp4", "rejected:no clips", no_face(seconds, size=square))
    put("two faces.mp4", "rejected:no clips", two_faces(seconds, size=(size, 2 * size)))
    put("face leaving.mp4", "clips", face_leaving(2 * seconds, size=square))
    put("tiny face.mp4", "dropped", tiny_face(seconds, size=(size, 2 * size), face_px=0.25 * size))
    put("still image.mp4", "dropped", still_image(seconds, size=square))
    put("blur and noise.mp4", "lenient", degraded(seconds, size=square))
    put("camera pan.mp4", "lenient", camera_pan(seconds, size=square))
    frames, audio = talking_portrait(seconds, size=square)
    put("audio late 3 frames.mp4", "clips", (frames, shifted(audio, 3)))
    put("audio late 8 frames.mp4", "dropped", (frames, shifted(audio, 8)))
    put("1.9 s.mp4", "rejected:too short", talking_portrait(1.9, size=square))
    put("2.0 s.mp4", "clips", talking_portrait(2.0, size=square))
    put(f"{long_seconds:g} s.mp4", "clips", talking_portrait(long_seconds, size=square))
    put("no audio.mp4", "rejected:no audio", (frames, None))
    put("no video.mp4", "rejected:no video", (None, audio))
    put("it's a \"tést\" 视频 (1).mp4", "clips", talking_portrait(seconds, size=square, seed=1))
    good = (folder / "portrait 30fps.mov").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[:len(good) * 6 // 10])
    expected["truncated.mp4"] = "rejected:undecodable"
    return expected
