"""`fada`: bundled configs, --print_config, bad keys, a user's own class, fit and sample end to end."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import decord
import pytest
import torch
import yaml
from PIL import Image

from datamodules.synthetic import render_clip
from fada_lightning.cli import main
from fada_lightning.presets import bundled_config_dir, find_config, load_config, load_preset
from fada_lightning.video_io import encode_wav, write_atomic

FADA = str(Path(sys.executable).with_name("fada"))
RUN_CONFIGS = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().rglob("*.yaml")
                     if not {"presets", "table_rows", "tables", "eval", "strategies", "prepare", "budgets"} & set(p.relative_to(bundled_config_dir()).parts))
PRESETS = sorted(p.stem for p in (bundled_config_dir() / "presets").glob("*.yaml"))


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_shipped_config_loads(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", name, "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    preset = load_preset(name)
    assert preset["name"] == name and preset["frame_size"] > 0


def test_config_lookup_bare_name_path_and_missing(tmp_path):
    assert find_config("teacher.yaml") == bundled_config_dir() / "teacher.yaml"
    mine = tmp_path / "teacher.yaml"
    mine.write_text("x: 1\n")
    assert find_config(str(mine)) == mine
    with pytest.raises(FileNotFoundError, match="bundled: .*teacher.yaml"):
        find_config("no_such.yaml")


def test_help_lists_every_command_with_a_line_each():
    from lightning.pytorch.cli import LightningCLI

    from fada_lightning.cli import LIGHTNING_COMMANDS, TOOLS
    assert set(LIGHTNING_COMMANDS) == set(LightningCLI.subcommands())
    done = subprocess.run([FADA, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert listed == {*LIGHTNING_COMMANDS, *TOOLS}
    for module_function, _ in TOOLS.values():  # each names a function that exists
        module_name, function = module_function.split(":")
        assert callable(getattr(importlib.import_module(module_name), function))


def test_unknown_config_key_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "teacher.yaml", "--model.init_args.no_such_key=1", "--print_config"])
    first = str(done.value.code).splitlines()[0]
    assert first.startswith("fada: model (fada_lightning.module.TeacherModule): Option 'no_such_key' is not accepted")
    assert "usage" not in capsys.readouterr().err


@pytest.mark.parametrize("args, first", [
    (["--model.init_args.distiller.init_args.solver_stepz", "3"],
     "fada: model.init_args.distiller (distillers.perflow.PeRFlow): Option 'solver_stepz' is not accepted; did you "
     "mean solver_steps, sample_steps? It takes: audio_scale, min_snr_gamma, mode, num_windows, p_drop_audio, "
     "p_drop_motion, p_drop_ref_audio, ref_scale, sample_steps, solver_steps"),
    (["--trainer.max_stepz", "3"], "fada: --trainer.max_stepz is not an option; did you mean --trainer.max_steps"),
    (["--model.init_args.distiller.init_args.ref_scale=[1,3]"],
     "fada: PeRFlow ref_scale [1.0, 3.0]: a range is [low, high] and only guided mode draws scales from one"),
])
def test_a_config_mistake_leads_with_the_line_that_names_it(args, first, capsys):
    """No usage text and no union dump before it; a misspelled option gets the accepted names."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "distill_perflow.yaml", *args])
    assert str(done.value.code).splitlines()[0].startswith(first)
    assert "usage:" not in capsys.readouterr().err and "Subtypes" not in str(done.value.code)


def test_scale_ranges_work_for_every_distiller_that_takes_them(capsys):
    """The CFG-teacher arguments are declared once (CFGDistiller): TCD takes a range as PeRFlow does."""
    from distillers.tcd import TCD

    with pytest.raises(SystemExit):
        main(["fit", "--config", "distill_tcd.yaml", "--model.init_args.distiller.init_args.ref_scale=[1,3]",
              "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["distiller"]["init_args"]["ref_scale"] == [1, 3]
    assert TCD(ref_scale=(1.0, 3.0)).spec()["init_args"]["ref_scale"] == (1.0, 3.0)


USER_MODULE = '''
from fada_lightning.module import TeacherModule


class SlowerTeacher(TeacherModule):
    """A user's own class, importable only from the current directory."""

    def __init__(self, lr_scale: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.hparams.lr = self.hparams.lr * lr_scale
'''


def _tiny_run_config(tmp_path: Path, model_class: str, base: str = "teacher.yaml", name: str = "tiny") -> Path:
    config = load_config(base)
    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1,
                             default_root_dir=str(tmp_path / "run"))
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(tmp_path / "run"), "name": "tb", "version": "t"}
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    config["model"]["class_path"] = model_class
    config["model"]["init_args"].update(clip_frames=4, ema_decay=0.9)
    config["trainer"]["logger"]["init_args"]["version"] = name
    config["data"]["init_args"].update(batch_size=2, epoch_samples=4, val_samples=2, synthetic=dict(
        root=str(tmp_path / "data"), strict_clips=4, lenient_clips=0, clips_per_shard=2, frames=12, size=32, progress=False))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fada(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([FADA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_rerun_refuses_to_fork_and_ckpt_path_last_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(_tiny_run_config(tmp_path, "fada_lightning.module.TeacherModule"))
    fast = ["--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]
    main(["fit", "--config", config, *fast])
    with pytest.raises(SystemExit) as refused:
        main(["fit", "--config", config, *fast])
    assert "already holds checkpoints" in str(refused.value.code) and "--ckpt_path last" in str(refused.value.code)
    main(["fit", "--config", config, *fast, "--ckpt_path", "last", "--trainer.max_steps", "3"])
    last = torch.load(tmp_path / "run/tb/tiny/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["fada_role"] == "teacher"
    assert sorted(p.name for p in (tmp_path / "run/tb").iterdir()) == ["tiny"]  # one run folder, no version_1


def test_user_class_in_the_current_directory_is_found_by_class_path(tmp_path):
    (tmp_path / "my_teacher.py").write_text(USER_MODULE)
    config = _tiny_run_config(tmp_path, "my_teacher.SlowerTeacher")
    done = _fada("fit", "--config", str(config), "--model.init_args.lr_scale=0.25", "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["model"]["class_path"] == "my_teacher.SlowerTeacher"
    assert printed["model"]["init_args"]["lr_scale"] == 0.25


@pytest.mark.slow
def test_fit_fast_dev_run_end_to_end(tmp_path):
    config = _tiny_run_config(tmp_path, "fada_lightning.module.TeacherModule")
    done = _fada("fit", "--config", str(config), "--trainer.fast_dev_run=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_fit_then_sample_end_to_end(tmp_path):
    """A user's class trains, checkpoints, and `fada sample` writes an mp4 with audio at 75 NFE."""
    (tmp_path / "my_teacher.py").write_text(USER_MODULE)
    config = _tiny_run_config(tmp_path, "my_teacher.SlowerTeacher")
    done = _fada("fit", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run" / "tb" / "tiny"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and list((run / "samples").glob("*.mp4")) and list(run.glob("events.out.tfevents*"))
    done = _fada("test", "--config", str(config), "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert done.returncode == 0 and "test/loss" in done.stdout, done.stderr[-3000:]

    video, audio, _ = render_clip(7, "strict", 0, frames=6)  # two clip windows
    Image.fromarray(video[0]).save(tmp_path / "face.png")
    write_atomic(tmp_path / "speech.wav", encode_wav(audio))
    out = tmp_path / "out.mp4"
    done = _fada("sample", "--ckpt", str(ckpt), "--image", "face.png", "--audio", "speech.wav", "-o", str(out),
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NFE 75 per clip window" in done.stdout
    reader = decord.VideoReader(str(out))
    assert len(reader) == 6 and reader[0].shape == (32, 32, 3)
    sound = decord.AudioReader(str(out), sample_rate=16000, mono=True)
    assert abs(sound.shape[1] - len(audio)) < 2048  # the audio track is there (AAC pads its last frame)

    (tmp_path / "not_an_image.png").write_text("hello")  # bad input: one clear line each, no traceback
    done = _fada("sample", "--ckpt", str(ckpt), "--image", "not_an_image.png", "--audio", "speech.wav", cwd=tmp_path)
    assert done.returncode != 0 and "not_an_image.png" in done.stderr and "Traceback" not in done.stderr
    done = _fada("sample", "--ckpt", "missing.ckpt", "--image", "face.png", "--audio", "speech.wav", cwd=tmp_path)
    assert done.returncode != 0 and "missing.ckpt" in done.stderr and "fada fit" in done.stderr


@pytest.mark.slow
def test_distil_a_teacher_then_sample_the_student_end_to_end(tmp_path):
    """`fada fit --config distill_perflow.yaml` on a teacher checkpoint; the student samples at 18 NFE."""
    teacher_config = _tiny_run_config(tmp_path, "fada_lightning.module.TeacherModule")
    done = _fada("fit", "--config", str(teacher_config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = tmp_path / "run" / "tb" / "tiny" / "checkpoints" / "last.ckpt"

    config = _tiny_run_config(tmp_path, "fada_lightning.distill.DistillModule", base="distill_perflow.yaml",
                              name="student")
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"].pop("clip_frames")  # the student takes the teacher's clip shape
    raw["model"]["init_args"]["distiller"]["init_args"]["solver_steps"] = 2
    config.write_text(yaml.safe_dump(raw))
    done = _fada("fit", "--config", str(config), "--model.init_args.teacher_ckpt", "missing.ckpt", cwd=tmp_path)
    assert done.returncode != 0 and "fada fit --config teacher.yaml" in done.stderr
    assert "Traceback" not in done.stderr  # one clear line
    done = _fada("fit", "--config", str(config), "--model.init_args.teacher_ckpt", str(teacher), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[fada] teacher: {Path(teacher).resolve()} (step " in done.stdout  # which teacher, in the run's log
    student = tmp_path / "run" / "tb" / "student" / "checkpoints" / "last.ckpt"
    assert student.is_file()
    done = _fada("fit", "--config", str(config), "--model.init_args.teacher_ckpt", str(teacher),
                 "--ckpt_path", str(student), "--trainer.max_steps=4", cwd=tmp_path)  # a stopped run resumes
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(student, weights_only=True)["global_step"] == 4

    video, audio, _ = render_clip(7, "strict", 0, frames=6)
    Image.fromarray(video[0]).save(tmp_path / "face.png")
    write_atomic(tmp_path / "speech.wav", encode_wav(audio))
    done = _fada("sample", "--ckpt", str(student), "--image", "face.png", "--audio", "speech.wav", "-o", "s.mp4",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NFE 18 per clip window" in done.stdout and "PeRFlowScheduler" in done.stdout
    assert len(decord.VideoReader(str(tmp_path / "s.mp4"))) == 6
