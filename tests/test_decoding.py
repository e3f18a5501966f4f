"""Decoding that no sample can crash: backends agree with each other and with decord's reference,
a bounded fuzz of corrupt mp4s ends in frames or an error (never a dead process), and a sample that
crashes the isolated decoder is skipped, named, counted and remembered across runs."""
import io
import json
import os
import signal
import warnings

import decord
import numpy as np
import pytest

from conftest import burst_clip, write_shard
from datamodules.audio_features import LogMelFeatures
from datamodules.decoding import (VIDEO_BACKENDS, DecodeError, DecoderCrash, DecodeServer, IsolatedClip,
                                  decode_server, open_video, read_audio_pyav, read_wav)
from datamodules.clips import BadSampleWarning, ClipDecoder
from datamodules.streams import ClipStream, CrashedSamples
from datamodules.synthetic import encode_sample
from fada_lightning.faults import MUTATIONS, mutations
from fada_lightning.video_io import encode_wav


@pytest.fixture(scope="module")
def clip() -> dict:
    return encode_sample((0, "strict", 3, 32, 30))


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
@pytest.mark.parametrize("isolate", [False, True])
def test_every_backend_gives_decords_frames(clip, backend, isolate):
    reference = decord.VideoReader(io.BytesIO(clip["mp4"]), num_threads=1)
    expected = reference.get_batch(list(range(len(reference)))).asnumpy()
    video = open_video(clip["mp4"], backend, isolate)
    assert len(video) == len(reference) == 30
    wanted = [7, 3, 3, 29, 0]  # out of order, repeated, both ends
    assert np.array_equal(video.frames(wanted, None), expected[wanted])
    assert video.frames(wanted, 64).shape == (5, 64, 64, 3)  # decord mis-sizes some downscales (32 -> 16)


def test_wav_is_read_as_decord_reads_it_and_resampled_when_its_rate_differs(clip):
    expected = decord.AudioReader(io.BytesIO(clip["wav"]), sample_rate=16000, mono=True)[:].asnumpy()[0]
    assert np.allclose(read_wav(clip["wav"]), expected, atol=1e-6)
    stereo_8k = encode_wav(np.zeros(8000, np.float32), sample_rate=8000)  # 1 s at 8 kHz -> 16000 samples
    assert read_wav(stereo_8k).shape == (16000,)
    aac = read_audio_pyav(clip["mp4"])  # the mp4's own track, through PyAV
    assert abs(len(aac) - len(expected)) <= 1024 and np.corrcoef(aac[:len(expected)], expected)[0, 1] > 0.9
    with pytest.raises(DecodeError):
        read_wav(b"RIFF\x00\x00")


def fuzz_cases(clip: dict, count: int) -> list[tuple[str, bytes]]:
    return mutations(clip["mp4"], count, seed=1, others=[clip["wav"], clip["json"]])


def decode_all(video) -> None:
    """Every frame, up to 64: a corrupt index may claim billions."""
    video.frames(list(range(min(len(video), 64))), 32)


@pytest.mark.parametrize("backend", VIDEO_BACKENDS)
def test_a_bounded_fuzz_ends_in_frames_or_an_error_never_a_dead_process(clip, backend):
    """300 corrupt mp4s: the isolated decoder returns frames, or raises DecodeError (DecoderCrash
    where decord died), and the next clip decodes on a fresh server. PyAV never crashes here."""
    outcome = {"decoded": 0, "refused": 0, "crashed": 0}
    for _, data in fuzz_cases(clip, 300):
        try:
            decode_all(open_video(data, backend, isolate=True))
            outcome["decoded"] += 1
        except DecoderCrash:
            outcome["crashed"] += 1
        except DecodeError:
            outcome["refused"] += 1
    assert sum(outcome.values()) == 300 and outcome["refused"] > 100
    if backend == "pyav":
        assert outcome["crashed"] == 0
    decode_all(open_video(clip["mp4"], backend, isolate=True))  # still decoding after all that


def decord_crash(clip: dict) -> bytes:
    """The first mutation of `clip` that kills decord (found in a server, so this test survives it)."""
    for _, data in fuzz_cases(clip, 300):
        try:
            decode_all(open_video(data, "decord", isolate=True))
        except DecoderCrash:
            return data
        except DecodeError:
            pass
    pytest.fail("no mutation crashed decord: the isolation is untested")


def test_a_crash_is_one_named_error_and_the_next_clip_gets_a_new_server(clip):
    data = decord_crash(clip)
    before = decode_server("decord").process.pid
    with pytest.raises(DecoderCrash, match=r"the decord decoder crashed \(signal SIG"):
        decode_all(open_video(data, "decord", isolate=True))
    decode_all(open_video(clip["mp4"], "decord", isolate=True))
    assert decode_server("decord").process.pid != before


def test_a_hung_decoder_is_killed_after_its_timeout(clip):
    server = DecodeServer("pyav", timeout=1.0)
    try:
        os.kill(server.process.pid, signal.SIGSTOP)  # a decoder stuck in a loop answers nothing
        with pytest.raises(DecoderCrash, match="hung"):
            server.ask(b"O", clip["mp4"])
        assert server.process.poll() is not None
    finally:
        server.close()


def test_a_crashing_sample_is_skipped_named_counted_and_remembered(clip, tmp_path):
    crash = {**burst_clip("crash-000000", frames=12), "mp4": decord_crash(clip)}
    good = [burst_clip(f"good-{i:06d}", frames=12) for i in range(3)]
    shard = write_shard(tmp_path / "s.tar", [good[0], crash, good[1], good[2]])
    decoder = ClipDecoder(LogMelFeatures(n_mels=8), 4, 2, video_backend="decord", isolate=True)
    record = tmp_path / "run" / "crashed_samples.jsonl"

    def run():
        stream = ClipStream([shard], decoder, samples_per_worker=3, crashed=CrashedSamples(record))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = list(stream)
        return items, [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]

    items, messages = run()
    assert [i["key"] for i in items] == ["good-000000", "good-000001", "good-000002"]
    assert items[-1]["skipped"] == 1
    assert any("crash-000000" in m and shard in m and "crashed" in m for m in messages)
    assert [json.loads(line)["key"] for line in record.read_text().splitlines()] == ["crash-000000"]

    server = decode_server("decord").process.pid
    items, messages = run()  # the next run: skipped unread, so the server lives on
    assert [i["key"] for i in items] == ["good-000000", "good-000001", "good-000002"]
    assert any("crash-000000" in m and "in an earlier run" in m for m in messages)
    assert decode_server("decord").process.pid == server
    assert len(record.read_text().splitlines()) == 1


def test_a_forked_child_starts_its_own_server(clip):
    parent = decode_server("pyav")
    pid = os.fork()
    if pid == 0:  # the child: a new server, never the parent's pipes
        try:
            code = 0 if decode_server("pyav") is not parent and len(IsolatedClip(clip["mp4"], "pyav")) == 30 else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert decode_server("pyav") is parent and len(IsolatedClip(clip["mp4"], "pyav")) == 30


def test_every_mutation_kind_is_made(clip):
    cases = fuzz_cases(clip, 2 * len(MUTATIONS))
    assert {kind for kind, _ in cases} == set(MUTATIONS)
    assert all(data != clip["mp4"] for _, data in cases)


MIRRORED = '''
from datamodules.decoding import PyAVClip


class MirroredClip(PyAVClip):
    """A user's backend: PyAV's frames, mirrored left to right."""

    def frames(self, indices, size):
        return super().frames(indices, size)[:, :, ::-1].copy()
'''


@pytest.mark.parametrize("isolate", [False, True])
def test_a_backend_of_your_own_is_named_module_colon_class(clip, tmp_path, monkeypatch, isolate):
    (tmp_path / "my_clips.py").write_text(MIRRORED)
    monkeypatch.syspath_prepend(str(tmp_path))  # this process, and (PYTHONPATH) the decode server
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    mirrored = open_video(clip["mp4"], "my_clips:MirroredClip", isolate).frames([0, 9], None)
    plain = open_video(clip["mp4"], "pyav", isolate=False).frames([0, 9], None)
    assert np.array_equal(mirrored, plain[:, :, ::-1])
    with pytest.raises(ValueError, match="nor a 'module:Class'"):
        open_video(clip["mp4"], "nosuch", isolate)
