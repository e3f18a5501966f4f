"""datamodules/prepare/media.py: frames picked by timestamp at 25 fps, rotation tags, 16 kHz mono audio on
the video's clock, probe's rejects, exact seeks. All media is written here by `write_video`; each source
frame carries its own index as a 4 x 4 grid of black/white blocks (16 bits), so a decoded frame names
the source frame it came from."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from datamodules.prepare import media
from datamodules.prepare.media import Rejected, iter_video, probe, read_audio, read_video, write_video

H, W = 48, 64  # stored frame size; 4 x 4 blocks of 12 x 16 px
SLOT = 640  # 16 kHz samples per 25 fps output frame


def coded_frames(n: int) -> np.ndarray:
    """(n, H, W, 3) uint8: frame i shows the bits of i, block (r, c) white iff bit 4 r + c of i is set."""
    bits = (np.arange(n)[:, None] >> np.arange(16)[None]) & 1  # (n, 16)
    grid = bits.reshape(n, 4, 4).astype(np.uint8) * 255
    return np.repeat(np.repeat(grid, H // 4, axis=1), W // 4, axis=2)[..., None].repeat(3, axis=3)


def frame_codes(frames: np.ndarray) -> np.ndarray:
    """Inverse of coded_frames for decoded (n, H, W, 3) frames: block means above mid-grey are ones."""
    n = len(frames)
    blocks = frames.reshape(n, 4, H // 4, 4, W // 4, 3).mean(axis=(2, 4, 5)) > 128  # (n, 4, 4)
    return (blocks.reshape(n, 16) << np.arange(16)).sum(axis=1)


def shown_at(times: list[Fraction], t: Fraction) -> int:
    """Slow reference: the last source frame whose time is <= t (frame times are exact fractions)."""
    shown = 0
    for i, time in enumerate(times):
        if time <= t:
            shown = i
    return shown


def tone(seconds: float, sample_rate: int, hz: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * sample_rate)) / sample_rate)
            ).astype(np.float32)


# ---------------------------------------------------------------------------------------------- timing


@pytest.mark.parametrize("source_fps, rate", [(24, Fraction(24)), (29.97, Fraction(30000, 1001)),
                                              (30, Fraction(30)), (60, Fraction(60))])
def test_constant_rate_becomes_25_fps_by_timestamp(tmp_path, source_fps, rate):
    n = int(2.3 * rate)
    path = write_video(tmp_path / "cfr.mp4", coded_frames(n), tone(2.5, 16000), fps=source_fps)
    frames = read_video(path)
    times = [i / rate for i in range(n)]
    expected = [shown_at(times, Fraction(k, 25)) for k in range(len(frames))]
    assert frame_codes(frames).tolist() == expected
    assert len(frames) == math.floor(Fraction(n) / rate * 25)  # frames = floor(duration * 25)
    info = probe(path)
    assert info.frames == len(frames) and info.duration == pytest.approx(float(n / rate), abs=1e-6)
    assert info.source_fps == pytest.approx(float(rate), rel=1e-4)


def test_variable_rate_becomes_25_fps_by_timestamp(tmp_path):
    gaps_ms = np.random.default_rng(0).integers(20, 61, size=80)  # whole ms: no near-ties with k / 25
    times_ms = np.concatenate([[0], np.cumsum(gaps_ms[:-1])])
    path = write_video(tmp_path / "vfr.mp4", coded_frames(80), tone(4.0, 16000), frame_times=times_ms / 1000)
    frames = read_video(path)
    times = [Fraction(int(t), 1000) for t in times_ms]
    expected = [shown_at(times, Fraction(k, 25)) for k in range(len(frames))]
    assert frame_codes(frames).tolist() == expected
    assert len(set(expected)) < len(expected) and len(set(expected)) <= max(expected)  # repeats and drops
    info = probe(path)
    assert times_ms[-1] / 1000 <= info.duration <= times_ms[-1] / 1000 + 0.061
    assert len(frames) == info.frames == math.floor((info.duration + media.EPS) * 25)


def test_frame_count_rule_pins_partial_last_slot():
    assert media.output_frame_count(2.0) == 50  # exactly 50 slots
    assert media.output_frame_count(2.002) == 50  # a partial 51st slot is dropped
    assert media.output_frame_count(2.04 - 5e-5) == 51  # within EPS of the slot end counts
    assert media.output_frame_count(0.0) == 0


def test_frame_rate_of_ntsc_rates():
    assert media.frame_rate(29.97) == Fraction(30000, 1001)
    assert media.frame_rate(23.976) == Fraction(24000, 1001)
    assert media.frame_rate(59.94) == Fraction(60000, 1001)
    assert media.frame_rate(30) == 30 and media.frame_rate(12.5) == Fraction(25, 2)


# ---------------------------------------------------------------------------------------------- rotation


def asymmetric_frames(n: int) -> np.ndarray:
    """A corner marker and a horizontal ramp: every 90-degree turn of it looks different."""
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:, :, 0] = np.linspace(0, 200, W, dtype=np.uint8)[None]
    frame[:12, :16] = 255
    return np.repeat(frame[None], n, axis=0)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_tag_gives_upright_frames(tmp_path, rotation):
    stored = asymmetric_frames(50)
    path = write_video(tmp_path / f"rot{rotation}.mp4", stored, tone(2.0, 16000), rotation=rotation)
    info = probe(path)
    upright = np.rot90(stored[0], k=-rotation // 90)  # a player turns the frames `rotation` degrees clockwise
    assert (info.rotation, info.height, info.width) == (rotation, *upright.shape[:2])
    frames = read_video(path, stop=3)
    errors = {turns: np.abs(frames[1].astype(int) - np.rot90(stored[0], k=-turns)).mean()
              for turns in range(4) if np.rot90(stored[0], k=-turns).shape == frames[1].shape}
    assert errors[rotation // 90] < 4 and min(e for t, e in errors.items() if t != rotation // 90) > 20
    small = read_video(path, max_side=32, stop=1)
    assert max(small.shape[1:3]) == 32 and (small.shape[1] > small.shape[2]) == (upright.shape[0] > upright.shape[1])


# ---------------------------------------------------------------------------------------------- audio


def flash_and_click(seconds: float, fps: float, sample_rate: int, audio_delay: float):
    """Coded frames with the one at 2.0 s all white, and audio that clicks (a 10 ms 1 kHz burst) at 2.0 s
    of the video clock: audio_delay seconds earlier in the audio track, which starts that much later."""
    rate = media.frame_rate(fps)
    frames = coded_frames(int(seconds * rate)) // 4  # dim, so the flash is the brightest frame
    frames[int(2 * rate)] = 255
    audio = np.zeros(round((seconds - audio_delay) * sample_rate), np.float32)
    click = round((2.0 - audio_delay) * sample_rate)
    audio[click:click + sample_rate // 100] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(sample_rate // 100)
                                                          / sample_rate)
    return frames, audio


@pytest.mark.parametrize("fps, sample_rate, audio_delay", [(25, 44100, 0.0), (30, 48000, 0.0),
                                                           (25, 48000, 0.3)])
def test_click_and_flash_share_one_clock(tmp_path, fps, sample_rate, audio_delay):
    frames, audio = flash_and_click(3.0, fps, sample_rate, audio_delay)
    path = write_video(tmp_path / "sync.mp4", frames, audio, fps=fps, sample_rate=sample_rate, channels=2,
                       audio_delay=audio_delay)
    info = probe(path)
    assert (info.sample_rate, info.channels) == (sample_rate, 2)
    video = read_video(path)
    sound = read_audio(path)
    assert sound.dtype == np.float32 and sound.ndim == 1
    flash_frame = int(np.argmax(video.mean(axis=(1, 2, 3))))
    onset = int(np.argmax(np.abs(sound) > 0.3 * np.abs(sound).max()))
    assert flash_frame == 50
    assert abs(onset / SLOT - flash_frame) <= 1  # within one output frame (40 ms)
    assert abs(onset / 16000 - 2.0) < 0.01
    if audio_delay:  # the 0.3 s before the audio stream starts are silence on the common clock
        assert np.abs(sound[: round(0.25 * 16000)]).max() < 1e-3


@pytest.mark.parametrize("sample_rate", [44100, 48000])
def test_stereo_audio_becomes_16k_mono(tmp_path, sample_rate):
    stereo = np.stack([tone(2.5, sample_rate), tone(2.5, sample_rate)], axis=1)  # (samples, 2)
    path = write_video(tmp_path / "a.mkv", coded_frames(50), stereo, sample_rate=sample_rate, channels=2)
    sound = read_audio(path)
    assert abs(len(sound) - 2.5 * 16000) < 0.05 * 16000
    spectrum = np.abs(np.fft.rfft(sound[1600:33600]))  # 2 s -> 0.5 Hz bins
    assert np.argmax(spectrum) / 2 == pytest.approx(440, abs=1)
    assert 0.15 < np.sqrt(np.mean(sound[1600:33600] ** 2)) < 0.3  # ~0.3 / sqrt(2): the tone, not summed to 2x


def test_read_audio_window_is_exact_length_and_on_the_clock(tmp_path):
    frames, audio = flash_and_click(6.0, 25, 48000, 0.0)
    path = write_video(tmp_path / "w.mp4", frames, audio, sample_rate=48000)
    full = read_audio(path)
    window = read_audio(path, start=1.5, duration=1.0)  # seeks past the warm-up margin
    assert window.shape == (16000,)
    np.testing.assert_allclose(window, full[24000:40000], atol=2e-3)
    tail = read_audio(path, start=5.5, duration=2.0)  # the file ends at ~6 s: zeros after
    assert tail.shape == (32000,) and np.abs(tail[16000:]).max() == 0


# ---------------------------------------------------------------------------------------------- seeking


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    """20 s at 30 fps: seeks cross keyframes, and 25 fps slots fall between source frames."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    return write_video(path, coded_frames(600), tone(20.0, 16000), fps=30)


def test_seek_gives_the_slice_of_a_full_read(long_file):
    full = read_video(long_file)
    assert len(full) == 500
    for start, stop in [(1, 30), (206, 215), (208, 209), (250, 350), (400, 500), (495, None), (499, 600)]:
        window = read_video(long_file, start=start, stop=stop)
        np.testing.assert_array_equal(window, full[start:stop], err_msg=f"frames {start}:{stop}")


def test_seek_does_not_decode_from_the_start(long_file, monkeypatch):
    decoded = []
    real_decode = media._decode

    def counting_decode(container, stream):
        for frame in real_decode(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(media, "_decode", counting_decode)
    window = read_video(long_file, start=400, stop=500)  # 16-20 s: source frames 480-599
    assert len(window) == 100
    assert len(decoded) < 480 - 1  # fewer than the frames before the window; a full read decodes 600


# ---------------------------------------------------------------------------------------------- probe


def test_probe_reports_an_ordinary_file(tmp_path):
    path = write_video(tmp_path / "ok.mp4", coded_frames(60), tone(2.4, 16000))
    assert probe(path) == media.VideoInfo(path=str(path), duration=pytest.approx(2.4), frames=60, width=W,
                                          height=H, rotation=0, source_fps=25.0, sample_rate=16000, channels=1)


def test_probe_rejects_no_audio_no_video_zero_frames(tmp_path):
    with pytest.raises(Rejected) as caught:
        probe(write_video(tmp_path / "silent.mp4", coded_frames(60), None))
    assert caught.value.reason == "no audio" and "silent.mp4" in str(caught.value)
    audio_only = write_video(tmp_path / "voice.mp4", None, tone(3.0, 16000))
    with pytest.raises(Rejected) as caught:
        probe(audio_only)
    assert caught.value.reason == "no video"
    assert read_audio(audio_only).shape[0] == pytest.approx(48000, abs=1100)  # its own clock: nothing lost
    with pytest.raises(Rejected) as caught:  # mp4 drops an empty track; Matroska keeps it
        probe(write_video(tmp_path / "empty.mkv", np.zeros((0, H, W, 3), np.uint8), tone(3.0, 16000)))
    assert caught.value.reason == "zero frames"


def test_probe_minimum_duration(tmp_path):
    with pytest.raises(Rejected) as caught:
        probe(write_video(tmp_path / "short.mp4", coded_frames(19), tone(2.0, 16000), fps=10))  # 1.9 s
    assert caught.value.reason == "too short"
    assert probe(write_video(tmp_path / "enough.mp4", coded_frames(20), tone(2.0, 16000), fps=10)).frames == 50


def test_probe_rejects_undecodable(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    good = write_video(tmp_path / "good.mp4", coded_frames(100), tone(4.0, 16000))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: int(0.6 * good.stat().st_size)])  # the moov atom is at the end
    for path in (noise, cut, tmp_path / "missing.mp4"):
        with pytest.raises(Rejected) as caught:
            probe(path)
        assert caught.value.reason == "undecodable" and path.name in caught.value.detail


def test_truncated_matroska_stops_cleanly(tmp_path):
    good = write_video(tmp_path / "good.mkv", coded_frames(100), tone(4.0, 16000))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(good.read_bytes()[: int(0.6 * good.stat().st_size)])  # opens: the header is in front
    info = probe(cut, min_seconds=0.5)
    full, partial = read_video(good), read_video(cut)
    assert 0 < len(partial) == info.frames < len(full)
    # the packets after the cut are gone: B-frames shown before the last decoded frame (up to 3 with x264's
    # veryfast) are missing, so their slots repeat the frame before them; all earlier frames are exact
    np.testing.assert_array_equal(partial[:-4], full[: len(partial) - 4])
    tail, reference = frame_codes(partial[-4:]), frame_codes(full[len(partial) - 4: len(partial)])
    assert (np.diff(tail) >= 0).all() and (tail <= reference).all()
    assert len(read_audio(cut)) > 0


def test_odd_file_names(tmp_path):
    path = write_video(tmp_path / "it's a \"tést\" 视频 (1).mp4", coded_frames(50), tone(2.0, 16000))
    assert path.exists() and not list(tmp_path.glob(".*tmp*"))  # renamed into place, no leftovers
    assert probe(path).frames == 50
    assert frame_codes(read_video(path, start=10, stop=12)).tolist() == [10, 11]
    assert read_audio(path, duration=1.0).shape == (16000,)


def test_rejected_reasons_are_fixed_codes():
    assert Rejected("too short", "x.mp4: 1.9 s").reason == "too short"
    with pytest.raises(ValueError):
        Rejected("it is bad")


def test_iter_video_is_lazy(tmp_path):
    path = write_video(tmp_path / "lazy.mp4", coded_frames(50), tone(2.0, 16000))
    frames = iter_video(path)
    assert frame_codes(np.stack([next(frames), next(frames)])).tolist() == [0, 1]
    assert read_video(path, start=5, stop=5).shape == (0, 0, 0, 3)


def test_seek_steps_back_when_it_lands_after_the_target(long_file, monkeypatch):
    """A demuxer that seeks by decode time can land on a keyframe shown after the target (B-frames);
    simulate that by making the first seek overshoot by 8 s: iter_video must step back and stay exact."""
    full = read_video(long_file, stop=260)
    calls, real_seek = [], media._seek

    def overshooting_seek(container, stream, time):
        calls.append(float(time))
        real_seek(container, stream, time + (8 if len(calls) == 1 else 0))  # 18 s: past keyframes

    monkeypatch.setattr(media, "_seek", overshooting_seek)
    np.testing.assert_array_equal(read_video(long_file, start=250, stop=260), full[250:260])
    assert calls == [10.0, 9.0]  # stepped back one SEEK_BACKOFF
