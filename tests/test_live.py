"""Live generation: speech in chunks -> video clip by clip (SpeechStream, FadaAvatarPipeline.stream,
`fada sample --stream`), and the mp4 that grows while it is written (Mp4Writer live)."""
from __future__ import annotations

import shutil

import av
import numpy as np
import pytest
import torch

from datamodules.audio_features import LogMelFeatures
from fada_lightning.pipeline import SpeechStream, audio_feature_windows
from fada_lightning.testing import exported_pipeline, random_face_and_speech
from fada_lightning.video_io import Mp4Writer, encode_wav, write_atomic


@pytest.fixture(scope="module")
def pipe(teacher_ckpt, tmp_path_factory):
    return exported_pipeline(teacher_ckpt, tmp_path_factory.mktemp("live") / "teacher")


def chunked(audio: np.ndarray, size: int) -> list[np.ndarray]:
    return [audio[i:i + size] for i in range(0, len(audio), size)]


@pytest.mark.parametrize("samples", [10 * 640, 10 * 640 + 17, 3 * 640 + 1, 300, 61 * 640 + 5])
@pytest.mark.parametrize("chunk", [3200, 999, 1 << 20])
def test_streamed_audio_windows_are_the_whole_files(samples, chunk):
    """Log-mel windows made from chunks, clip by clip, equal the windows of the whole speech at once, for
    speech that ends on a frame, inside one, before the first clip fills, and any chunk size."""
    features = LogMelFeatures(n_mels=8)
    audio = (0.1 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    whole = audio_feature_windows(features, audio, radius=2)[0]
    parts = list(SpeechStream(features, clip_frames=4, radius=2).windows(chunked(audio, chunk)))
    assert [w.shape[1] for w, _ in parts] == [min(4, len(whole) - s) for s in range(0, len(whole), 4)]
    torch.testing.assert_close(torch.cat([w[0] for w, _ in parts]), whole, rtol=0, atol=1e-5)
    assert np.array_equal(np.concatenate([s for _, s in parts]), audio)  # the speech under each clip, in order


def test_a_clip_goes_out_as_soon_as_the_speech_it_reads_has_arrived():
    """Clip frames [0, 4) read features of frames up to 5 (radius 2), which read frame 6 (context 1): the
    first window is out after 7 frames of speech, before the rest is given."""
    pulled = []

    def microphone(audio):
        for part in chunked(audio, 640):
            pulled.append(len(part))
            yield part

    audio = np.zeros(20 * 640, np.float32)
    windows = SpeechStream(LogMelFeatures(n_mels=8), clip_frames=4, radius=2).windows(microphone(audio))
    next(windows)
    assert len(pulled) == 7


def test_the_stream_makes_the_frames_the_whole_call_makes(pipe):
    image, audio = random_face_and_speech(13)
    whole = pipe(image, audio, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    clips = list(pipe.stream(image, chunked(audio, 3200), num_inference_steps=3,
                             generator=torch.Generator().manual_seed(0)))
    assert [len(c.frames) for c in clips] == [4, 4, 4, 1] and {c.nfe for c in clips} == {9}
    assert np.abs(np.concatenate([c.frames for c in clips]).astype(int) - whole.frames).max() <= 1
    assert np.array_equal(np.concatenate([c.audio for c in clips]), audio)


def decoded(path) -> tuple[int, np.ndarray]:
    """(video frames, audio samples) as ffmpeg decodes them (it applies the AAC priming's edit list)."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return frames, audio


def test_a_live_mp4_plays_while_it_grows_and_keeps_its_sound_in_sync(tmp_path):
    """Written a second at a time, the file grows with each second; a copy taken before close plays all
    but its last fragment; the finished file's beeps sit where they were written, as in a plain mp4."""
    t = np.arange(4 * 16000) / 16000
    beeps = (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 1 < 0.1)).astype(np.float32)
    video = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    sizes = []
    with Mp4Writer(tmp_path / "live.mp4", 32, 32, live=True) as mp4:
        for second in range(4):
            mp4.write(video[25 * second:25 * (second + 1)], beeps[16000 * second:16000 * (second + 1)])
            sizes.append((tmp_path / "live.mp4").stat().st_size)
        shutil.copy(tmp_path / "live.mp4", tmp_path / "cut.mp4")  # as a killed run leaves it
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert 75 <= decoded(tmp_path / "cut.mp4")[0] < 100
    frames, sound = decoded(tmp_path / "live.mp4")
    onsets = [int(np.argmax(np.abs(sound[16000 * s:]) > 0.1)) for s in range(4)]
    assert frames == 100 and max(onsets) <= 8  # each beep at its second, to a few samples


def test_fada_sample_streams_into_a_growing_mp4(teacher_ckpt, tmp_path, capsys):
    from PIL import Image

    from fada_lightning import cli

    image, audio = random_face_and_speech(11)
    Image.fromarray(image).save(tmp_path / "face.png")
    write_atomic(tmp_path / "speech.wav", encode_wav(audio))
    cli.main(["sample", "--ckpt", teacher_ckpt, "--image", str(tmp_path / "face.png"), "--audio",
              str(tmp_path / "speech.wav"), "-o", str(tmp_path / "live.mp4"), "--steps", "2", "--stream",
              "--chunk-ms", "120"])
    printed = capsys.readouterr().out
    assert "streamed in 120 ms chunks: first frames after" in printed and "frames/s overall" in printed
    frames, sound = decoded(tmp_path / "live.mp4")
    assert frames == 11 and abs(len(sound) - len(audio)) < 1024
