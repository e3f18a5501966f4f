"""The synthetic talking-head world: deterministic, learnable (mouth follows loudness),
honest about its degradations, and round-trips through shards, webdataset and decord."""

import io
import json
import os
import tarfile

import decord
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datamodules.synthetic import (SAMPLES_PER_FRAME, ensure_dataset, frame_rms, mouth_dark_pixels, render_clip,
                                  write_shards)
from fada_lightning.video_io import encode_mp4, encode_wav, read_audio, read_image, write_mp4


def lagged_correlation(opening: np.ndarray, loudness: np.ndarray, lag: int) -> float:
    """corr(opening[t], loudness[t + lag]) over the frames where both exist."""
    n = len(opening)
    return float(np.corrcoef(opening[max(0, -lag):n - max(0, lag)], loudness[max(0, lag):n + min(0, lag)])[0, 1])


def audio_lag(signal: np.ndarray, reference: np.ndarray, max_lag: int = 4000) -> int:
    """The k maximising sum_t signal[t + k] reference[t] (k > 0: signal is late)."""
    n = min(len(signal), len(reference))
    spectrum = np.fft.rfft(signal[:n], 2 * n) * np.conj(np.fft.rfft(reference[:n], 2 * n))
    correlation = np.fft.irfft(spectrum, 2 * n)
    lags = np.r_[0:max_lag + 1, -max_lag:0]
    return int(lags[np.argmax(correlation[lags])])


def test_same_seed_renders_identical_clip():
    first, second = render_clip(3, "lenient", 5), render_clip(3, "lenient", 5)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_different_seed_gives_different_identity():
    (video_a, audio_a, meta_a), (video_b, audio_b, meta_b) = render_clip(0, "strict", 0), render_clip(1, "strict", 0)
    assert np.abs(video_a[0].astype(int) - video_b[0].astype(int)).mean() > 10
    assert meta_a["mouth_open"] != meta_b["mouth_open"] and not np.allclose(audio_a, audio_b)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_mouth_opening_follows_loudness(size):
    clips = range(6) if size == 64 else range(1)
    for index in clips:
        video, audio, meta = render_clip(0, "strict", index, size=size, frames=50 if size < 256 else 25)
        assert video.shape == (meta["frames"], size, size, 3) and video.dtype == np.uint8
        assert audio.shape == (meta["frames"] * SAMPLES_PER_FRAME,) and audio.dtype == np.float32
        loudness = frame_rms(audio)
        np.testing.assert_allclose(meta["loudness"], loudness, atol=1e-5)
        assert lagged_correlation(mouth_dark_pixels(video), loudness, 0) > 0.8
        opening = np.array(meta["mouth_open"])
        assert opening.min() == 0 and 0 <= opening.max() <= 1  # closed in pauses


def test_shifted_audio_breaks_sync_and_recorded_offset_restores_it():
    shifted = [meta for meta in (render_clip(0, "lenient", i) for i in range(12))
               if meta[2]["quality"]["av_offset_frames"] != 0]
    assert len(shifted) >= 2
    for video, audio, meta in shifted:
        offset = meta["quality"]["av_offset_frames"]
        assert 3 <= abs(offset) <= 8
        opening, loudness = mouth_dark_pixels(video), frame_rms(audio)
        at_zero, at_offset = lagged_correlation(opening, loudness, 0), lagged_correlation(opening, loudness, offset)
        assert at_zero < 0.5 < 0.8 < at_offset
        best = max(range(-10, 11), key=lambda lag: lagged_correlation(opening, loudness, lag))
        assert best == offset


def test_quality_records_degradations():
    for index in range(16):
        quality = render_clip(0, "strict", index, frames=10)[2]["quality"]
        assert quality["av_offset_frames"] == 0 and quality["blur_sigma"] == quality["noise_std"] == 0
        assert 0.02 <= quality["motion_amplitude"] < 0.065
        quality = render_clip(0, "lenient", index, frames=10)[2]["quality"]
        degraded = [quality["av_offset_frames"] != 0, quality["blur_sigma"] > 0,
                    quality["noise_std"] > 0, quality["motion_amplitude"] >= 0.1]
        assert any(degraded), quality


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    manifest = write_shards(root, strict_clips=4, lenient_clips=4, clips_per_shard=2, frames=30,
                            seed=7, progress=False, processes=2)
    return root, manifest


def test_shards_round_trip_through_webdataset_and_decord(shard_root):
    root, manifest = shard_root
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["strict"] == ["strict/strict-00000.tar", "strict/strict-00001.tar"]
    assert manifest["samples"] == {"strict": 4, "lenient": 4} and manifest["clip_frames"] == 30
    urls = [str(root / path) for tier in ("strict", "lenient") for path in manifest[tier]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{t}-{i:06d}" for t in ("strict", "lenient") for i in range(4)]
    for sample in samples:
        meta = json.loads(sample["json"])
        tier, index = meta["tier"], int(sample["__key__"].split("-")[1])
        video, audio, expected_meta = render_clip(7, tier, index, size=64, frames=30)
        assert meta == expected_meta  # any clip re-renders alone, whatever the worker count
        reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
        assert len(reader) == meta["frames"] and reader.get_avg_fps() == 25
        decoded = reader.get_batch(range(len(reader))).asnumpy()
        psnr = 10 * np.log10(255 ** 2 / np.mean((decoded.astype(float) - video) ** 2))
        assert psnr > 28  # crf 18; yuv420p halves chroma, which costs most at 64 x 64
        wav = decord.AudioReader(io.BytesIO(sample["wav"]), sample_rate=16000, mono=True)[:].asnumpy()[0]
        assert abs(len(wav) - meta["frames"] * SAMPLES_PER_FRAME) <= SAMPLES_PER_FRAME
        np.testing.assert_allclose(wav[:len(audio)], audio[:len(wav)], atol=2e-4)
        aac = decord.AudioReader(io.BytesIO(sample["mp4"]), sample_rate=16000, mono=True)[:].asnumpy()[0]
        # The AAC track must line up with the wav of record: the 1024 priming samples are
        # dropped by the decoder thanks to the mp4 edit list.
        assert abs(audio_lag(aac, wav)) < SAMPLES_PER_FRAME


def test_shard_bytes_do_not_depend_on_shard_size_or_process_count(shard_root, tmp_path):
    root, manifest = shard_root  # 2 clips per shard, 2 processes
    single = write_shards(tmp_path, strict_clips=4, lenient_clips=4, clips_per_shard=4, frames=30,
                          seed=7, progress=False, processes=1)

    def members(base, paths):
        contents = {}
        for path in paths:
            with tarfile.open(base / path) as tar:
                contents.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
        return contents

    assert (members(root, manifest["strict"] + manifest["lenient"])
            == members(tmp_path, single["strict"] + single["lenient"]))


def test_ensure_dataset_reuses_matching_and_rebuilds_otherwise(shard_root):
    root, manifest = shard_root
    stamp = os.stat(root / "manifest.json").st_mtime_ns
    kwargs = dict(strict_clips=4, lenient_clips=4, clips_per_shard=2, frames=30, seed=7, progress=False)
    assert ensure_dataset(root, **kwargs) == manifest
    assert os.stat(root / "manifest.json").st_mtime_ns == stamp
    other = root.parent / "other"
    small = dict(strict_clips=1, lenient_clips=1, frames=5, size=32, progress=False, processes=1)
    assert ensure_dataset(other, seed=1, **small)["seed"] == 1
    rebuilt = ensure_dataset(other, seed=2, **small)
    assert rebuilt["seed"] == 2 and json.loads((other / "manifest.json").read_text()) == rebuilt


def test_read_image_crops_to_square_and_rejects_non_images(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = [200, 30, 30]  # the centre square is red, the side strips black
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - [200, 30, 30]).max() <= 2
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        read_image(tmp_path / "notes.png", 16)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_read_audio_resamples_to_16k(tmp_path, rate):
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    (tmp_path / "tone.wav").write_bytes(encode_wav(tone, rate))
    audio = read_audio(tmp_path / "tone.wav")
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 64
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5


def test_read_audio_rejects_empty_and_garbage(tmp_path):
    (tmp_path / "empty.wav").write_bytes(encode_wav(np.zeros(0, np.float32), 16000))
    with pytest.raises(ValueError, match="empty.wav"):
        read_audio(tmp_path / "empty.wav")
    with pytest.raises(ValueError):
        read_audio(b"this is not audio" * 10)


def test_write_mp4_is_atomic_and_readable(tmp_path):
    video, audio, _ = render_clip(0, "strict", 1, size=32, frames=10)
    path = write_mp4(tmp_path / "clip.mp4", video, audio)
    assert os.listdir(tmp_path) == ["clip.mp4"]
    assert len(decord.VideoReader(str(path))) == 10
    assert abs(len(read_audio(path)) - len(audio)) <= 1024  # AAC pads the tail to whole packets
    assert len(decord.VideoReader(io.BytesIO(encode_mp4(video, None)))) == 10
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((2, 31, 31, 3), np.uint8), None)
