"""Checkpoints survive kills, damaged or foreign files are refused in one line, a checkpoint is never
taken for another role, and bad data is counted by the sample and named (the fault suite; decoder
crashes are in test_decoding.py, resuming the data stream in test_streaming.py)."""
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import burst_clip, write_shard

from datamodules.audio_features import LogMelFeatures
from datamodules.clips import ClipDecoder, ResizedClipWarning
from datamodules.streams import ClipStream
from fada_lightning.checkpoints import (AtomicCheckpointIO, CheckpointError, check_role, checkpoint_role,
                                        read_checkpoint, write_atomically)
from fada_lightning.cli import check_resumable, main
from fada_lightning.distill import read_teacher_checkpoint

WEIGHTS = 10_000_000  # 40 MB of float32: a save takes long enough to be killed inside


def keep_saving(path: Path, step: int) -> None:
    """In a forked child: save checkpoints of growing steps over `path` until killed."""
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork
    io, weights = AtomicCheckpointIO(), torch.arange(WEIGHTS, dtype=torch.float32)
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "state_dict": {"w": weights + step}}, path)


def test_a_checkpoint_survives_sigkill_at_any_instant_with_tmpdir_elsewhere(tmp_path, monkeypatch):
    """10 kills at random instants of a process saving a 40 MB checkpoint over and over (TMPDIR on
    another folder, as a cluster's tmpfs would be): every time the file is a whole checkpoint of a
    step no older than the last one seen, and no partial or temporary file is left once a save
    completes."""
    path, tmp = tmp_path / "ckpt" / "last.ckpt", tmp_path / "tmp"
    tmp.mkdir()
    path.parent.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    rng, last_step, killed_mid_save = np.random.default_rng(0), 0, 0
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                keep_saving(path, last_step)
            finally:
                os._exit(1)
        time.sleep(float(rng.uniform(0.05, 1.0)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed_mid_save += (path.parent / ".last.ckpt.partial").exists()
        if path.exists():
            checkpoint = torch.load(path, weights_only=True)
            assert checkpoint["global_step"] >= last_step
            weights = checkpoint["state_dict"]["w"] - checkpoint["global_step"]  # whole: every value its own
            assert torch.equal(weights, torch.arange(WEIGHTS, dtype=torch.float32))
            last_step = checkpoint["global_step"]
        assert not list(tmp.iterdir())  # nothing in TMPDIR
        assert {p.name for p in path.parent.iterdir()} <= {"last.ckpt", ".last.ckpt.partial"}
    assert last_step > 0 and killed_mid_save > 0  # some kills did land inside a save
    write_atomically({"global_step": last_step + 1}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_files_that_are_not_checkpoints_are_one_line_each(tmp_path):
    good = tmp_path / "good.ckpt"
    write_atomically({"global_step": 3, "state_dict": {"w": torch.ones(1000)}}, good)
    cases = {"empty.ckpt": b"", "notes.txt": b"these are my notes\n", "cut.ckpt": good.read_bytes()[:5000]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as raised:
            read_checkpoint(tmp_path / name)
        message = str(raised.value)
        assert str(tmp_path / name) in message and "\n" not in message
        assert "empty" in message if not data else "not a checkpoint" in message


def test_fit_with_a_ckpt_path_that_is_not_a_checkpoint_exits_with_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "teacher.yaml", f"--ckpt_path={junk}"])
    assert "junk.ckpt is not a checkpoint" in str(done.value.code)


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_good_one(tmp_path):
    for step in (2, 4):
        write_atomically({"global_step": step, "state_dict": {}}, tmp_path / f"step{step:06d}.ckpt")
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "step000004.ckpt").read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"last.ckpt is damaged .*resuming from .*step000004.ckpt"):
        assert AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4
    (tmp_path / "step000002.ckpt").unlink()
    (tmp_path / "step000004.ckpt").unlink()
    with pytest.raises(CheckpointError, match="last.ckpt is not a checkpoint"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")


def test_roles_are_recorded_and_inferred_for_older_checkpoints():
    assert checkpoint_role({"fada_role": "student"}) == "student"
    assert checkpoint_role({"fada_module": "fada_lightning.distill.DistillModule"}) == "student"
    assert checkpoint_role({"hyper_parameters": {"_class_path": "fada_lightning.module.TeacherModule"}}) == "teacher"
    assert checkpoint_role({}) is None
    with pytest.raises(CheckpointError, match=r"x.ckpt is a student checkpoint \(m.Mine, step 7\), but a teacher"):
        check_role("x.ckpt", {"fada_role": "student", "fada_module": "m.Mine", "global_step": 7}, "teacher", "hint")


def test_a_student_given_as_teacher_and_a_teacher_given_to_resume_a_student_are_refused(teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=False)
    assert checkpoint_role(checkpoint) == "teacher"  # written by a real fit, role recorded
    student = tmp_path / "student.ckpt"
    torch.save({**checkpoint, "fada_role": "student", "fada_module": "fada_lightning.distill.DistillModule"}, student)
    with pytest.raises(CheckpointError, match=r"student.ckpt is a student checkpoint .* a teacher checkpoint is needed"):
        read_teacher_checkpoint(student)
    with pytest.raises(CheckpointError, match=r"is a teacher checkpoint .*this config trains a DistillModule"):
        check_resumable(Path(teacher_ckpt), "fada_lightning.distill.DistillModule")
    with pytest.raises(CheckpointError, match=r"is a student checkpoint .*this config trains a TeacherModule"):
        check_resumable(student, "fada_lightning.module.TeacherModule")


# ---- data: lost samples, member sizes, resized clips -----------------------------------------------
def stream_items(shards, count, **kwargs):
    stream = ClipStream(shards, ClipDecoder(LogMelFeatures(n_mels=8), 4, 2, **kwargs.pop("decoder", {})),
                        samples_per_worker=count, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    return items, [w for w in caught if issubclass(w.category, UserWarning)]


def test_a_truncated_shard_counts_every_sample_it_lost(tmp_path):
    clips = [burst_clip(f"clip-{i:06d}", frames=12) for i in range(8)]
    truncated = write_shard(tmp_path / "cut.tar", clips)
    os.truncate(truncated, os.path.getsize(truncated) * 4 // 10)
    readable = [s for s in wds.DataPipeline(wds.SimpleShardList([truncated]),
                                           wds.tarfile_to_samples(handler=wds.ignore_and_continue))
                if {"mp4", "wav", "json"} <= s.keys()]
    assert 0 < len(readable) < 8
    good = write_shard(tmp_path / "good.tar", [burst_clip("good-000000", frames=12)])
    # one item past both shards: a shard's loss is known when its visit ends, as the next one opens
    items, caught = stream_items([truncated, good], len(readable) + 2, shard_samples={truncated: 8, good: 1})
    assert items[-1]["skipped"] == 8 - len(readable)  # every lost sample, once, not one per error
    assert any(f"shard {truncated}: " in str(w.message) and "of its 8 samples" in str(w.message) for w in caught)


def test_an_oversized_member_is_skipped_before_it_is_parsed(tmp_path):
    huge = {**burst_clip("huge-000000", frames=12), "json": b'{"tier": "strict", "pad": "' + b"x" * (5 << 20) + b'"}'}
    shard = write_shard(tmp_path / "s.tar", [huge, burst_clip("fine-000000", frames=12)])
    items, caught = stream_items([shard], 1)
    assert [i["key"] for i in items] == ["fine-000000"] and items[0]["skipped"] == 1
    assert any("huge-000000" in str(w.message) and "json is 5.0 MB, over the 4 MB limit" in str(w.message)
               for w in caught)


def test_clips_decoded_at_another_size_are_counted_in_a_warning(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [burst_clip(f"big-{i:06d}", frames=12, size=64) for i in range(3)])
    items, caught = stream_items([shard], 3, decoder={"frame_size": 32})
    assert items[0]["frames"].shape[-2:] == (32, 32)
    counts = [str(w.message) for w in caught if issubclass(w.category, ResizedClipWarning)]
    assert len(counts) == 2 and "is 64x64: resized to 32x32 (1 clips" in counts[0] and "(2 clips" in counts[1]


def test_fada_sample_checks_its_inputs_before_the_model_and_warns_on_a_tiny_face(teacher_ckpt, tmp_path):
    from PIL import Image

    from fada_lightning.sample import sample_file
    from fada_lightning.video_io import encode_wav, write_atomic

    face, speech, out = tmp_path / "face.png", tmp_path / "speech.wav", tmp_path / "out.mp4"
    with pytest.raises(FileNotFoundError, match="image .*face.png does not exist"):
        sample_file(tmp_path / "no.ckpt", face, speech, out)  # named before the (missing) checkpoint
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(face)
    with pytest.raises(FileNotFoundError, match="audio .*speech.wav does not exist"):
        sample_file(tmp_path / "no.ckpt", face, speech, out)
    write_atomic(speech, encode_wav(np.zeros(16000 // 25 * 4, np.float32)))
    with pytest.warns(UserWarning, match="face.png is 4x4, far below the model's 32x32 frames"):
        sample_file(teacher_ckpt, face, speech, out, steps=1, progress=False)
    assert out.is_file()


class Payload:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_members_in_a_shard_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "executed"
    payload = pickle.dumps(Payload(marker))
    clip = {**burst_clip("clip-000000", frames=12), "pyd": payload, "pickle": payload}
    shard = write_shard(tmp_path / "s.tar", [clip])
    items, _ = stream_items([shard], 1)
    assert [i["key"] for i in items] == ["clip-000000"] and items[0]["skipped"] == 0
    assert not marker.exists()


def test_a_sharded_save_cut_between_its_renames_is_finished_on_the_next_read(tmp_path):
    """FSDP2 swaps a complete `.last.ckpt.partial` folder in by two renames: a kill between them
    leaves no last.ckpt, and the next read puts the new folder (or, if it is not whole, the old) in place."""
    from fada_lightning.checkpoints import recover_folder_swap

    def folder(name, whole=True, step=0):
        (tmp_path / name).mkdir()
        if whole:
            (tmp_path / name / ".metadata").write_bytes(b"")
        (tmp_path / name / "step").write_text(str(step))

    folder(".last.ckpt.old", step=4)
    folder(".last.ckpt.partial", step=6)
    recover_folder_swap(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt" / "step").read_text() == "6"
    for name in ("last.ckpt", ".last.ckpt.old"):
        shutil.rmtree(tmp_path / name)
    folder(".last.ckpt.old", step=4)
    (tmp_path / ".last.ckpt.partial").mkdir(exist_ok=True)
    (tmp_path / ".last.ckpt.partial" / ".metadata").unlink(missing_ok=True)
    recover_folder_swap(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt" / "step").read_text() == "4"
