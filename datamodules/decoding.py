"""Decoding shard members (mp4, wav) so that no sample can take the training process down.

    open_video(data, backend, isolate) -> clip;  len(clip) = n;  clip.size = (W, H) or None;
                                              clip.frames(indices, size) -> (k, H, W, 3) uint8

Backends (`VIDEO_BACKENDS`, or "module:Class" for a class of your own, see `clip_class`):
- "pyav": PyAV (FFmpeg's libraries, bundled in its wheel), frames in presentation order, each wanted
  frame converted (and resized) by swscale; decoding stops at the last wanted frame.
- "decord": decord's VideoReader. Faster seeking, but it segfaults on some corrupt mp4s
  (bench/fuzz_decode.py counts how often), so a data worker never runs it in its own process.

`isolate=True` runs the backend in a decode-server subprocess (one per process that decodes, started
on first use): a crash or a hang there costs the one sample being decoded, raised as `DecoderCrash`
naming what happened, and the next sample gets a new server. Frames come back over a pipe, raw.

wav members are read by Python's `wave` module (PCM, any rate, resampled to 16 kHz by torchaudio);
anything else falls back to PyAV. Nothing here unpickles.
"""
from __future__ import annotations

import importlib
import io
import os
import select
import signal
import struct
import subprocess
import sys
import wave

import numpy as np

SAMPLE_RATE = 16000
VIDEO_BACKENDS = ("pyav", "decord")
DECODE_TIMEOUT = 120.0  # seconds an isolated decoder may take for one request before it counts as hung


class DecodeError(Exception):
    """The member could not be decoded (a Python-level error: corrupt, empty, no video stream)."""


class DecoderCrash(DecodeError):
    """The isolated decoder died or hung on this member."""


# ---- in-process backends -------------------------------------------------------------------------
class PyAVClip:
    """An mp4 (bytes) opened with PyAV. `n` is the stream's frame count from the container's index,
    or, where the container has none, the count of frames that decode."""

    def __init__(self, data: bytes):
        import av

        self._av = av
        self.data = data
        try:
            # kept open for the first `frames` call, which decodes from it (a second open costs ~0.7 ms)
            self._container = self._open()
            if not self._container.streams.video:
                self._container.close()
                raise DecodeError("no video stream")
            stream = self._container.streams.video[0]
            n, self.size = stream.frames, (stream.codec_context.width, stream.codec_context.height)
            self.n = n if n > 0 else sum(1 for _ in self._decoded())
            if self.n == 0:
                raise DecodeError("no frames")
        except (av.FFmpegError, ValueError) as err:  # ValueError: also a UnicodeDecodeError in a header
            raise DecodeError(f"{type(err).__name__}: {err}") from None

    def __len__(self) -> int:
        return self.n

    def _open(self):
        return self._av.open(io.BytesIO(self.data), mode="r", metadata_errors="ignore")

    def _decoded(self):
        """Frames from the start: from the container opened in __init__ the first time, then a new one."""
        container, self._container = self._container or self._open(), None
        with container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # data workers are the parallelism
            yield from container.decode(stream)

    def frames(self, indices, size: int | None) -> np.ndarray:
        """Frames at `indices` (presentation order, repeats allowed), (k, H, W, 3) uint8 RGB, each
        resized to size x size when `size` is given."""
        from av.video.reformatter import VideoReformatter

        indices = np.asarray(indices, dtype=np.int64)
        wanted = set(indices.tolist())
        last, got = max(wanted), {}
        # one reformatter keeps its swscale context across frames (a new one per frame costs ~1 ms)
        reformatter = VideoReformatter()
        try:
            for i, frame in enumerate(self._decoded()):
                if i in wanted:
                    got[i] = reformatter.reformat(frame, size, size, "rgb24", threads=1).to_ndarray()
                if i >= last:
                    break
        except (self._av.FFmpegError, ValueError) as err:
            raise DecodeError(f"frame {len(got)}: {type(err).__name__}: {err}") from None
        if len(got) < len(wanted):
            raise DecodeError(f"only {i + 1 if got else 0} of {self.n} frames decode (wanted up to frame {last})")
        return np.stack([got[i] for i in indices.tolist()])


class DecordClip:
    """An mp4 (bytes) opened with decord (resizing happens on open, so `frames` must get the same size)."""

    def __init__(self, data: bytes):
        self.data, self.reader, self.read_size = data, None, None
        self.n = len(self._reader(None))
        self.size = None  # (width, height): decord tells it only by decoding a frame
        if self.n == 0:
            raise DecodeError("no frames")

    def _reader(self, size):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        if self.reader is None or size != self.read_size:
            try:
                side = size or -1
                self.reader = decord.VideoReader(io.BytesIO(self.data), width=side, height=side, num_threads=1)
            except (decord.DECORDError, RuntimeError) as err:
                raise DecodeError(f"{type(err).__name__}: {err}") from None
            self.read_size = size
        return self.reader

    def __len__(self) -> int:
        return self.n

    def frames(self, indices, size: int | None) -> np.ndarray:
        import decord

        indices = np.asarray(indices, dtype=np.int64)
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            batch = self._reader(size).get_batch(unique.tolist())
        except (decord.DECORDError, RuntimeError) as err:
            raise DecodeError(f"{type(err).__name__}: {err}") from None
        array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        return array[inverse]


CLIP_CLASSES = {"pyav": PyAVClip, "decord": DecordClip}


def clip_class(backend: str):
    """A backend's clip class: a name of CLIP_CLASSES, or "module:Class" for one of your own (the same
    interface: Class(mp4 bytes) with len(), `size` and frames(indices, size))."""
    if backend in CLIP_CLASSES:
        return CLIP_CLASSES[backend]
    module, _, name = backend.partition(":")
    if not name:
        raise ValueError(f"video backend {backend!r} is not one of {VIDEO_BACKENDS} nor a 'module:Class'")
    return getattr(importlib.import_module(module), name)


def open_video(data: bytes, backend: str = "pyav", isolate: bool = True):
    """mp4 bytes -> a clip with len() and frames(indices, size); see the module docstring."""
    cls = clip_class(backend)  # a wrong name fails here, in this process, not in the server
    return IsolatedClip(data, backend) if isolate else cls(data)


# ---- the decode server ---------------------------------------------------------------------------
# Messages both ways: one op byte, a u64 payload length, the payload.
#   parent -> server: b"O" mp4 bytes               server -> parent: b"N" u64 frame count, i32 width, height
#   parent -> server: b"F" i64 size, i64 indices   server -> parent: b"A" u32 k, H, W, C + uint8 pixels
#   server -> parent on a Python-level failure: b"E" utf-8 message
_HEADER = struct.Struct("<cQ")


def _send(stream, op: bytes, payload: bytes) -> None:
    stream.write(_HEADER.pack(op, len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exact(stream, count: int) -> bytearray:
    buffer, done = bytearray(count), 0  # a bytearray: arrays viewing it are writable
    view = memoryview(buffer)
    while done < count:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError
        done += got
    return buffer


def _receive(stream) -> tuple[bytes, bytes]:
    op, length = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return op, bytes(_read_exact(stream, length)) if op != b"A" else _read_exact(stream, length)


def serve(backend: str, requests, replies) -> None:
    """The server's loop: open and read clips with `backend` until the parent closes the pipe."""
    clip = None
    while True:
        try:
            op, payload = _receive(requests)
        except EOFError:
            return
        try:
            if op == b"O":
                clip = clip_class(backend)(payload)
                _send(replies, b"N", struct.pack("<Qii", len(clip), *(clip.size or (-1, -1))))
            elif op == b"F":
                if clip is None:
                    raise DecodeError("frames asked for before a clip was opened")
                size, *indices = np.frombuffer(payload, dtype="<i8").tolist()
                pixels = np.ascontiguousarray(clip.frames(indices, size if size > 0 else None), dtype=np.uint8)
                _send(replies, b"A", struct.pack("<4I", *pixels.shape) + pixels.tobytes())
            else:
                raise DecodeError(f"unknown request {op!r}")
        except Exception as err:  # a Python-level failure is the sample's, not the server's
            text = f"{type(err).__name__}: {err}" if not isinstance(err, DecodeError) else str(err)
            _send(replies, b"E", text.encode("utf-8", "replace"))


class DecodeServer:
    """One decode-server subprocess (`python -m datamodules.decoding BACKEND`) for this process."""

    def __init__(self, backend: str, timeout: float = DECODE_TIMEOUT):
        self.backend, self.timeout = backend, timeout
        self.pid = os.getpid()  # a forked child must start its own, never talk on its parent's pipes
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen([sys.executable, "-m", "datamodules.decoding", backend],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)

    def ask(self, op: bytes, payload: bytes) -> tuple[bytes, bytes]:
        try:
            _send(self.process.stdin, op, payload)
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                self.close()
                raise DecoderCrash(f"the {self.backend} decoder hung (no answer in {self.timeout:.0f} s)")
            return _receive(self.process.stdout)
        except (EOFError, OSError):  # the pipe closed under us: the server died
            code = self.process.wait()
            what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise DecoderCrash(f"the {self.backend} decoder crashed ({what})") from None

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None

    def close(self) -> None:
        if self.pid == os.getpid() and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_servers: dict[str, DecodeServer] = {}


def decode_server(backend: str) -> DecodeServer:
    """This process's server for `backend`, (re)started when there is none or it died."""
    server = _servers.get(backend)
    if server is None or not server.alive():
        if server is not None:
            server.close()
        server = _servers[backend] = DecodeServer(backend)
    return server


class IsolatedClip:
    """A clip decoded by this process's decode server; the same interface as the in-process clips."""

    def __init__(self, data: bytes, backend: str):
        self.server = decode_server(backend)
        self.n, width, height = struct.unpack("<Qii", self._ask(b"O", data, b"N"))
        self.size = (width, height) if width >= 0 else None

    def _ask(self, op: bytes, payload: bytes, expected: bytes) -> bytes:
        reply, body = self.server.ask(op, payload)
        if reply == b"E":
            raise DecodeError(body.decode("utf-8", "replace"))
        if reply != expected:
            self.server.close()
            raise DecoderCrash(f"the {self.server.backend} decoder answered {reply!r}, expected {expected!r}")
        return body

    def __len__(self) -> int:
        return self.n

    def frames(self, indices, size: int | None) -> np.ndarray:
        request = np.asarray([size or 0, *np.asarray(indices).tolist()], dtype="<i8").tobytes()
        body = self._ask(b"F", request, b"A")
        shape = struct.unpack("<4I", body[:16])
        return np.frombuffer(body, dtype=np.uint8, offset=16).reshape(shape)


# ---- audio ---------------------------------------------------------------------------------------
def read_wav(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """wav bytes -> (samples,) float32 mono at `sample_rate`. PCM (8/16/24/32-bit) is read in Python
    (x / 2^(bits - 1), channels averaged); other encodings go through PyAV."""
    try:
        with wave.open(io.BytesIO(data)) as reader:
            width, channels, rate = reader.getsampwidth(), reader.getnchannels(), reader.getframerate()
            raw = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as err:
        if "unknown format" not in str(err):
            raise DecodeError(f"wav: {err}") from None
        return read_audio_pyav(data, sample_rate)
    if width == 3:  # 24-bit: widen to 32 by a zero low byte
        raw = np.frombuffer(raw[:len(raw) // 3 * 3], np.uint8).reshape(-1, 3)
        raw = np.concatenate([np.zeros((len(raw), 1), np.uint8), raw], axis=1).tobytes()
        width = 4
    if width == 1:  # 8-bit PCM is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        samples = np.frombuffer(raw[:len(raw) // width * width], dtype).astype(np.float32) / 2 ** (8 * width - 1)
    samples = samples[:len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    if rate != sample_rate:
        import torch
        import torchaudio

        samples = torchaudio.functional.resample(torch.from_numpy(samples), rate, sample_rate).numpy()
    return np.ascontiguousarray(samples, dtype=np.float32)


def read_audio_pyav(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio PyAV decodes (or a video's audio track) -> (samples,) float32 mono at `sample_rate`."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise DecodeError("no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                      for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.FFmpegError as err:
        raise DecodeError(f"audio: {type(err).__name__}: {err}") from None
    if not chunks:
        raise DecodeError("audio has no samples")
    return np.concatenate(chunks).astype(np.float32)


if __name__ == "__main__":  # the decode server: python -m datamodules.decoding BACKEND
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a native library prints goes to stderr, never into the replies
    serve(sys.argv[1], sys.stdin.buffer, replies)
