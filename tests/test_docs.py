"""docs/adding-a-distiller.md, done exactly as written: from an empty folder, through the `fada` command.

Blocks the page marks are acted on in order: ```python file=NAME is written to NAME, ```bash run is
run line by line, ```yaml replace=NAME replaces that entry of NAME. What the page takes as given
(a teacher checkpoint at the bundled configs' default path, a face image and a speech clip) is put
in place first. Also: every relative link and image in README.md and docs/*.md resolves."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from datamodules.synthetic import render_clip
from fada_lightning.video_io import encode_wav, write_atomic

PAGE = Path(__file__).parents[1] / "docs" / "adding-a-distiller.md"
BLOCK = re.compile(r"^```(\w+)[ \t]*([^\n]*)\n(.*?)^```$", re.S | re.M)


def marked_blocks(text: str) -> list[tuple[str, str, str]]:
    """[(language, mark, body)] of the fenced blocks that carry a mark after the language."""
    return [(lang, mark.strip(), body) for lang, mark, body in BLOCK.findall(text) if mark.strip()]


def replace_entry(config: dict, given: dict) -> dict:
    """`given` is one path of single-key mappings down to the entry it replaces whole
    ({model: {init_args: {distiller: {class_path, init_args}}}} replaces the distiller)."""
    (key, value), = given.items()
    if isinstance(value, dict) and len(value) == 1 and isinstance(config.get(key), dict):
        replace_entry(config[key], value)
    else:
        config[key] = value
    return config


def test_the_page_marks_the_steps_it_walks_through():
    marks = [(lang, mark) for lang, mark, _ in marked_blocks(PAGE.read_text())]
    assert marks[0] == ("python", "file=my_distillers.py") and ("yaml", "replace=my_distill.yaml") in marks
    assert ("python", "file=my_weighting.py") in marks and ("python", "file=test_my_distillers.py") in marks
    assert sum(lang == "bash" and mark == "run" for lang, mark in marks) == 6


@pytest.mark.slow
def test_adding_a_distiller_as_the_page_says(teacher_ckpt, tmp_path):
    teacher = tmp_path / "runs/teacher/tb/run/checkpoints/last.ckpt"
    teacher.parent.mkdir(parents=True)
    shutil.copy(teacher_ckpt, teacher)
    video, audio, _ = render_clip(3, "strict", 0, frames=6)
    Image.fromarray(video[0]).save(tmp_path / "face.png")
    write_atomic(tmp_path / "speech.wav", encode_wav(audio))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `fada` as installed

    outputs = []
    for lang, mark, body in marked_blocks(PAGE.read_text()):
        if lang == "python" and mark.startswith("file="):
            (tmp_path / mark[len("file="):]).write_text(body)
        elif lang == "yaml" and mark.startswith("replace="):
            target = tmp_path / mark[len("replace="):]
            target.write_text(yaml.safe_dump(replace_entry(yaml.safe_load(target.read_text()), yaml.safe_load(body))))
        elif lang == "bash" and mark == "run":
            for line in filter(None, body.splitlines()):
                done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=900)
                assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
                outputs.append(done.stdout)

    student = torch.load(tmp_path / "runs/perflow/tb/run/checkpoints/last.ckpt", weights_only=True)
    assert student["global_step"] == 3
    assert student["hyper_parameters"]["distiller"]["class_path"] == "my_distillers.LogitNormalTime"
    assert student["hyper_parameters"]["distiller"]["init_args"]["std"] == 1.2
    sampled = next(out for out in outputs if "per clip window" in out)
    assert "NFE 18 per clip window" in sampled and (tmp_path / "mine.mp4").is_file()
    weighted = torch.load(tmp_path / "runs/perflow/tb/weighting/checkpoints/last.ckpt", weights_only=True)
    assert weighted["global_step"] == 3 and len(weighted["optimizer_states"]) == 2  # the student's and the weighting's
    assert any(k.startswith("distiller.networks.weighting.") for k in weighted["state_dict"])
    scalars = {tag for events in (tmp_path / "runs/perflow/tb/weighting").glob("events.out.tfevents.*")
               for tag in _scalar_tags(events)}
    assert {"train/loss", "train/weighting_loss", "train/grad_norm/weighting", "train/u_mean"} <= scalars
    assert " passed" in outputs[-1] and "failed" not in outputs[-1]  # the contract, from outside the repository


def _scalar_tags(events) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_in_the_docs_resolves():
    """README.md and docs/*.md: every link or image that is not a URL or an anchor names a file that exists."""
    root = PAGE.parents[1]
    missing = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        prose = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)  # code is not links
        for target in LINK.findall(prose):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                missing.append(f"{page.relative_to(root)}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
