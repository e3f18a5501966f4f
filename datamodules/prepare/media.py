"""Media in and out for `fada prepare`, all in-process with PyAV (no ffmpeg shell-outs, any file name).

One clock for everything: t0 = the presentation time of the first decoded video frame. Times below are
seconds after t0.

Video frames are picked by timestamp, never by index, so constant, variable, 24, 29.97, 30 and 60 fps
sources all become FPS (25) frames per second:

    output frame k shows the source frame on screen at t_k = k / fps, i.e. the last source frame with
    pts <= t_k + EPS (EPS = 0.1 ms absorbs time-base rounding; the smallest frame gap we expect is 16 ms);
    duration = t_end, where t_end = pts of the last frame + its duration (the previous gap when unknown);
    frames = floor((duration + EPS) * fps): output frame k exists iff its whole slot ends inside the
    video, (k + 1) / fps <= t_end + EPS, so frames * 640 audio samples (16 kHz) never outrun the video.

Audio is float32 mono at SAMPLE_RATE, sample j played at j / sample_rate on the same clock: an audio
stream that starts later than t0 gets zeros in front, one that starts earlier loses its lead.

Rotation tags (the stream's display matrix) are applied on read; `rotation` everywhere means degrees
clockwise a player turns the stored frames to show them upright (the legacy `rotate` tag's sense).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

FPS, SAMPLE_RATE = 25, 16000
EPS = 1e-4  # seconds of slack in every timestamp comparison (time-base rounding)
AUDIO_SEEK_MARGIN = 0.5  # s decoded before an audio seek target: the AAC decoder's first frame is warm-up
SEEK_BACKOFF = 1.0  # s: first step back when a seek lands on a keyframe shown after the target (B-frames)

# why a whole input gave no clips ("timeout" and "error": run.py's, for a worker killed or a surprise raised)
REJECT_REASONS = ("no video", "no audio", "zero frames", "too short", "undecodable", "timeout", "no clips", "error")
CONTAINER_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


class Rejected(Exception):
    """An input that cannot become clips. reason: a short fixed code, one of REJECT_REASONS; detail: human text."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration: float  # seconds of video, first frame's pts to last frame's end
    frames: int  # frames at FPS that read_video returns for the whole file: floor((duration + EPS) * FPS)
    width: int  # upright (after the rotation tag is applied)
    height: int
    rotation: int  # degrees clockwise the stored frames are turned to display upright: 0, 90, 180, 270
    source_fps: float  # average frame rate of the stored stream
    sample_rate: int  # of the audio stream as stored
    channels: int


# ---------------------------------------------------------------------------------------------- timing


def output_frame_count(duration: float, fps: float = FPS) -> int:
    """Output frames whose slot [k / fps, (k + 1) / fps) ends inside `duration` seconds of video."""
    return max(0, math.floor((duration + EPS) * fps))


def clockwise_rotation(frame_rotation: float) -> int:
    """PyAV's `VideoFrame.rotation` (counterclockwise, -180..180) -> clockwise 0, 90, 180 or 270."""
    return int(round(-frame_rotation / 90.0)) % 4 * 90


def frame_rate(fps: float | Fraction) -> Fraction:
    """29.97 -> 30000/1001 (and 23.976, 59.94 alike); other rates as the nearest simple fraction."""
    if isinstance(fps, Fraction):
        return fps
    ntsc = round(fps * 1.001)
    if abs(fps - ntsc * 1000 / 1001) < 5e-3 and abs(fps - ntsc) > 5e-3:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _frame_time(frame: av.VideoFrame | av.AudioFrame, stream: av.stream.Stream) -> Fraction:
    pts = frame.pts
    if pts is None:
        raise av.error.InvalidDataError(0, "frame without a timestamp")  # probe: "undecodable"
    return pts * (frame.time_base or stream.time_base)


def _frame_end(frame: av.VideoFrame, start: Fraction, previous_gap: Fraction, stream: av.stream.Stream
               ) -> Fraction:
    """pts + duration of a decoded frame; the previous frame gap when the container stores no duration."""
    duration = (frame.duration or 0) * (frame.time_base or stream.time_base)
    return start + (duration if duration > 0 else previous_gap)


# ---------------------------------------------------------------------------------------------- decoding


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise Rejected("undecodable", f"{path}: cannot open ({error})") from error


def _decode(container: av.container.InputContainer, stream: av.stream.Stream) -> Iterator:
    """Decoded frames of one stream; stops (no exception) at the first packet that fails to decode,
    so a truncated or corrupt tail shortens the output. Tests wrap this to count decoded frames."""
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except (StopIteration, av.error.FFmpegError):
            return
        yield frame


def _first_frame_time(path: str | os.PathLike, stream_type: str) -> Fraction:
    """t0 of a file: the first decoded frame's pts (after edit lists) of its first `stream_type` stream.
    Opens its own container, so the caller's stays at the start of the file."""
    with _open(path) as container:
        streams = getattr(container.streams, stream_type)
        if not streams:
            raise Rejected(f"no {stream_type}", f"{path}: no {stream_type} stream")
        stream = streams[0]
        for frame in _decode(container, stream):
            return _frame_time(frame, stream)
    raise Rejected("zero frames", f"{path}: no {stream_type} frame decodes")


def _seek(container, stream, time: Fraction) -> None:
    """To the keyframe at or before `time` (seconds, absolute in the stream's clock)."""
    container.seek(math.floor(time / stream.time_base), stream=stream, backward=True, any_frame=False)


def _frames_from(container, stream, t0: Fraction, target: Fraction) -> Iterator:
    """Decoded frames starting at or before absolute time `target`: from the top of the file when target is
    t0, else by seeking. A keyframe found in decode order can be shown after target (B-frames), so step
    back, doubling, until the first frame is not."""
    if target <= t0:
        return _decode(container, stream)
    backoff = Fraction(0)
    while True:
        seek_time = max(target - backoff, t0)
        _seek(container, stream, seek_time)
        frames = _decode(container, stream)
        first = next(frames, None)
        if first is None or _frame_time(first, stream) <= target + Fraction(EPS) or seek_time == t0:
            return frames if first is None else _chain(first, frames)
        backoff = max(2 * backoff, Fraction(SEEK_BACKOFF))


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _to_rgb(frame: av.VideoFrame, max_side: int | None) -> np.ndarray:
    """Upright RGB uint8 (H, W, 3), downscaled (INTER_AREA) so max(H, W) <= max_side when given."""
    image = frame.to_ndarray(format="rgb24")
    turns = clockwise_rotation(frame.rotation) // 90
    if turns:
        image = np.ascontiguousarray(np.rot90(image, k=-turns))  # np.rot90 with k < 0 turns clockwise
    height, width = image.shape[:2]
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


# ---------------------------------------------------------------------------------------------- reading


def probe(path: str | os.PathLike, min_seconds: float = 2.0) -> VideoInfo:
    """Cheap checks and facts for one input: demux the video packets (timestamps only, no decoding) for the
    duration, decode the first frame (size, rotation) and the last group of pictures (truncation).
    Raises Rejected("no video" | "no audio" | "zero frames" | "too short" | "undecodable")."""
    with _open(path) as container:
        if not container.streams.video:
            raise Rejected("no video", f"{path}: no video stream")
        if not container.streams.audio:
            raise Rejected("no audio", f"{path}: no audio stream")
        video, audio = container.streams.video[0], container.streams.audio[0]
        try:
            span = _packet_span(container, video)
            if span is None:
                raise Rejected("zero frames", f"{path}: the video stream has no frames")
            first_keyframe, last_keyframe, t_end = span
            _seek(container, video, first_keyframe)
            first = next(_decode(container, video), None)
            if first is None:
                raise Rejected("undecodable", f"{path}: the first video frame does not decode")
            t0 = _frame_time(first, video)
            _seek(container, video, last_keyframe)
            if next(_decode(container, video), None) is None:  # a cut mp4 usually fails earlier, at open
                raise Rejected("undecodable", f"{path}: the last group of pictures does not decode")
        except av.error.FFmpegError as error:
            raise Rejected("undecodable", f"{path}: {error}") from error
        duration = float(t_end - t0)
        if duration + EPS < min_seconds:
            raise Rejected("too short", f"{path}: {duration:.3f} s of video < {min_seconds} s")
        rotation = clockwise_rotation(first.rotation)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        rate = video.average_rate or video.guessed_rate
        return VideoInfo(path=str(path), duration=duration, frames=output_frame_count(duration),
                         width=width, height=height, rotation=rotation,
                         source_fps=float(rate) if rate else 0.0,
                         sample_rate=audio.codec_context.sample_rate, channels=audio.codec_context.channels)


def _packet_span(container, video) -> tuple[Fraction, Fraction, Fraction] | None:
    """(first keyframe pts, last keyframe pts, end of the last shown frame) in seconds from packet timestamps
    alone; None without packets. The end is the largest pts + its duration (the last gap if unknown)."""
    stamps, keyframes = [], []
    for packet in container.demux(video):
        pts = packet.pts if packet.pts is not None else packet.dts
        if packet.size == 0 or pts is None or packet.is_discard:
            continue
        stamps.append((pts, packet.duration or 0))
        if packet.is_keyframe:
            keyframes.append(pts)
    if not stamps:
        return None
    stamps.sort()
    last_pts, last_duration = stamps[-1]
    if not last_duration and len(stamps) > 1:
        last_duration = last_pts - stamps[-2][0]
    keyframes = keyframes or [stamps[0][0]]
    base = video.time_base
    return min(keyframes) * base, max(keyframes) * base, (last_pts + last_duration) * base


def iter_video(path: str | os.PathLike, fps: int = FPS, max_side: int | None = None, start: int = 0,
               stop: int | None = None) -> Iterator[np.ndarray]:
    """Upright RGB uint8 (H, W, 3) output frames start <= k < stop of the timing rule in the module docstring.
    start > 0 seeks (keyframe before t_start, then decode forward). A frame that fails to decode ends the
    iteration (no exception): a truncated file yields fewer frames. A repeated source frame is yielded as
    the same array object; copy before writing into it."""
    slot, eps = 1 / Fraction(fps), Fraction(EPS)
    stop = math.inf if stop is None else stop
    if start >= stop:
        return
    t0 = _first_frame_time(path, "video")
    with _open(path) as container:
        video = container.streams.video[0]
        pending: deque = deque()  # (k, source frame): what frame k shows is known, not yet that it exists
        held = held_time = None  # the last source frame decoded, and its time after t0
        gap, k = slot, start
        convert = _Converter(max_side)
        for frame in _frames_from(container, video, t0, t0 + start * slot):
            shown = _frame_time(frame, video) - t0
            while held is not None and k < stop and shown > k * slot + eps:
                pending.append((k, held))  # `frame` comes after t_k, so `held` is on screen at t_k
                k += 1
            if held_time is not None and shown > held_time:
                gap = shown - held_time
            held, held_time = frame, shown
            while pending and (pending[0][0] + 1) * slot <= shown + eps:  # the video reaches (k + 1) / fps
                yield convert(pending.popleft()[1])
            if k >= stop and not pending:
                return
        if held is None:
            return
        t_end = _frame_end(held, held_time, gap, video)  # relative to t0, like held_time
        while k < stop and (k + 1) * slot <= t_end + eps:
            pending.append((k, held))
            k += 1
        for j, frame in pending:
            if (j + 1) * slot <= t_end + eps:
                yield convert(frame)


class _Converter:
    """_to_rgb with a one-frame cache: a source frame shown in several output slots is converted once."""

    def __init__(self, max_side: int | None):
        self.max_side, self.frame, self.image = max_side, None, None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if frame is not self.frame:
            self.frame, self.image = frame, _to_rgb(frame, max_side=self.max_side)
        return self.image


def read_video(path: str | os.PathLike, fps: int = FPS, max_side: int | None = None, start: int = 0,
               stop: int | None = None) -> np.ndarray:
    """np.stack of iter_video: (n, H, W, 3) uint8; (0, 0, 0, 3) when no frame falls in [start, stop)."""
    frames = list(iter_video(path, fps=fps, max_side=max_side, start=start, stop=stop))
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, start: float = 0.0,
               duration: float | None = None) -> np.ndarray:
    """float32 mono (samples,): sample j is played at start + j / sample_rate on the video clock (audio-only
    files: the audio's own first frame is the zero). Resampled and downmixed by av.AudioResampler. With
    `duration`, exactly round(duration * sample_rate) samples, zero-padded where the audio does not reach."""
    with _open(path) as container:
        has_video = bool(container.streams.video)
    t0 = _first_frame_time(path, "video" if has_video else "audio")
    first_wanted = round(start * sample_rate)  # output sample 0 on the clock's sample grid
    end_wanted = None if duration is None else first_wanted + round(duration * sample_rate)
    with _open(path) as container:
        if not container.streams.audio:
            raise Rejected("no audio", f"{path}: no audio stream")
        audio = container.streams.audio[0]
        warm_up_from = t0 + Fraction(start) - Fraction(AUDIO_SEEK_MARGIN)
        if start > AUDIO_SEEK_MARGIN:  # else decode from the top: the first packets prime the AAC decoder
            _seek(container, audio, warm_up_from)
        signal, origin = _decode_mono(container, audio, sample_rate, t0, warm_up_from, end_wanted)
    end = origin + len(signal) if end_wanted is None else end_wanted
    out = np.zeros(max(0, end - first_wanted), np.float32)
    lo, hi = max(first_wanted, origin), min(end, origin + len(signal))  # overlap, on the clock's grid
    if hi > lo:
        out[lo - first_wanted:hi - first_wanted] = signal[lo - origin:hi - origin]
    return out


def _decode_mono(container, audio, sample_rate: int, t0: Fraction, skip_before: Fraction,
                 stop_sample: int | None) -> tuple[np.ndarray, int]:
    """Resampled mono signal and the clock sample, round((t - t0) * sample_rate), of its first sample.
    Frames that end before `skip_before` (seek warm-up) are dropped; decoding stops past stop_sample.
    The first kept input sample is one that also lies on the output grid (audio sample index a multiple
    of rate_in / gcd(rate_in, rate_out)), so every read, whole or windowed, resamples at the same phase."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, origin, produced = [], None, 0
    for frame in _decode(container, audio):
        begins = _frame_time(frame, audio)
        if begins + Fraction(frame.samples, frame.sample_rate) <= skip_before:
            continue
        if origin is None:
            frame = _trim_to_grid(frame, begins, sample_rate)
            if frame is None:
                continue
            begins = _frame_time(frame, audio)
            origin = round((begins - t0) * sample_rate)
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
            produced += out.samples
        if stop_sample is not None and origin + produced >= stop_sample:
            break
    else:
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if origin is None or not chunks:
        return np.zeros(0, np.float32), 0
    return np.concatenate(chunks).astype(np.float32, copy=False), origin


def _trim_to_grid(frame: av.AudioFrame, begins: Fraction, sample_rate: int) -> av.AudioFrame | None:
    """Drop the leading samples before the first one on both sample grids (None: none in this frame)."""
    period = frame.sample_rate // math.gcd(frame.sample_rate, sample_rate)  # 441 for 44.1 -> 16 kHz
    drop = -round(begins * frame.sample_rate) % period
    if drop == 0:
        return frame
    if drop >= frame.samples:
        return None
    samples = frame.to_ndarray()  # planar (channels, n) or packed (1, n * channels)
    width = 1 if frame.format.is_planar else len(frame.layout.channels)
    trimmed = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, drop * width:]),
                                         format=frame.format.name, layout=frame.layout.name)
    trimmed.sample_rate, trimmed.time_base = frame.sample_rate, Fraction(1, frame.sample_rate)
    trimmed.pts = round(begins * frame.sample_rate) + drop
    return trimmed


# ---------------------------------------------------------------------------------------------- writing


def write_video(path: str | os.PathLike, frames: np.ndarray | None, audio: np.ndarray | None,
                fps: float = 25, sample_rate: int = 16000, channels: int = 1, rotation: int = 0,
                frame_times: np.ndarray | None = None, audio_delay: float = 0.0) -> Path:
    """Test media. frames (n, H, W, 3) uint8 RGB as stored (before rotation; None: audio-only file; n = 0: a
    video stream without frames); audio float32 (samples,) or (samples, channels), or None. H.264 yuv420p
    (crf 20, veryfast, mbtree=0 for reproducible bytes) + AAC. frame_times (n,) seconds: variable frame rate
    (pts in 1/90000 s). rotation: clockwise display rotation tag. audio_delay: seconds the audio starts
    after the video. Container by suffix (.mp4, .mov, .mkv); written to a temporary name, then renamed."""
    path = Path(path)
    container_format = CONTAINER_FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise ValueError(f"{path}: unknown container suffix; expected one of {sorted(CONTAINER_FORMATS)}")
    if frames is None and audio is None:
        raise ValueError(f"{path}: nothing to write (no frames, no audio)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        with av.open(str(tmp), mode="w", format=container_format) as container:
            video = None if frames is None else _add_video(container, frames, fps, rotation, frame_times)
            sound = None if audio is None else _add_audio(container, sample_rate, channels)
            samples = None if audio is None else _planar(audio, channels)
            _mux(container, video, frames, fps, frame_times, sound, samples, sample_rate, audio_delay)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _add_video(container, frames: np.ndarray, fps, rotation: int, frame_times):
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (n, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even H, W; got {frames.shape}")
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    rate = frame_rate(fps)  # with frame_times it only steers rate control; the pts carry the timing
    options = {"crf": "20", "preset": "veryfast", "x264-params": "mbtree=0"}
    video = container.add_stream("libx264", rate=rate, options=options)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    video.codec_context.thread_count = 1
    if frame_times is not None:
        video.codec_context.time_base = video.time_base = Fraction(1, 90000)
    if rotation % 360:
        video.set_display_rotation(-rotation)  # PyAV takes counterclockwise degrees
    return video


def _add_audio(container, sample_rate: int, channels: int):
    sound = container.add_stream("aac", rate=sample_rate)
    sound.layout = {1: "mono", 2: "stereo"}[channels]
    return sound


def _planar(audio: np.ndarray, channels: int) -> np.ndarray:
    """(samples,) or (samples, channels) float -> (channels, samples) float32 in [-1, 1]."""
    audio = np.asarray(audio, np.float32)
    audio = np.repeat(audio[:, None], channels, axis=1) if audio.ndim == 1 else audio
    if audio.shape[1] != channels:
        raise ValueError(f"audio has {audio.shape[1]} channels, expected {channels}")
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0).T)


def _mux(container, video, frames, fps, frame_times, sound, samples, sample_rate: int, audio_delay: float):
    """Encode video frame by frame, interleaving the audio that plays up to each frame's time."""
    rate = frame_rate(fps)
    times = (np.arange(0 if frames is None else len(frames)) / float(rate) if frame_times is None
             else np.asarray(frame_times, np.float64))
    audio_start = round(audio_delay * sample_rate)  # in samples; pts of the first audio frame
    written = 0

    def feed(until_seconds: float):
        nonlocal written
        if sound is None:
            return
        upto = min(samples.shape[1], max(0, round(until_seconds * sample_rate) - audio_start))
        if upto > written:
            layout = "mono" if samples.shape[0] == 1 else "stereo"
            chunk = av.AudioFrame.from_ndarray(samples[:, written:upto], format="fltp", layout=layout)
            chunk.sample_rate, chunk.pts = sample_rate, audio_start + written
            chunk.time_base = Fraction(1, sample_rate)
            container.mux(sound.encode(chunk))
            written = upto

    for index, image in enumerate([] if frames is None else frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        if frame_times is not None:
            frame.pts, frame.time_base = round(times[index] * 90000), Fraction(1, 90000)
        else:
            frame.pts, frame.time_base = index, 1 / rate
        container.mux(video.encode(frame))
        feed(times[index] + 1.0)
    if video is not None:
        container.mux(video.encode(None))
    feed(float(samples.shape[1] + audio_start) / sample_rate if sound is not None else 0.0)
    if sound is not None:
        container.mux(sound.encode(None))
