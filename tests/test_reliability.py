"""Checkpoints survive kills, damaged or foreign files are refused in one line, and a checkpoint
is never taken for another role."""
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
