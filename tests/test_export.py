"""`fada export` and FadaAvatarPipeline: the teacher, the parts' save and load, the command, and a
pipeline that loads and samples with no Lightning imported. Every student's export is a
DistillerContract check (fada_lightning/testing.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fada_lightning.models.codec import SpaceToDepthCodec, VAECodec
from fada_lightning.pipeline import AudioEncoder, FadaAvatarPipeline
from fada_lightning.testing import (assert_pipeline_samples_as_fada_sample, exported_pipeline,
                                    random_face_and_speech)

DOC = Path(__file__).parents[1] / "docs" / "inference.md"


@pytest.fixture(scope="module")
def exported_teacher(teacher_ckpt, tmp_path_factory):
    return exported_pipeline(teacher_ckpt, tmp_path_factory.mktemp("export") / "teacher")


def test_the_teacher_exports_and_samples_as_fada_sample_does(exported_teacher, teacher_ckpt):
    assert_pipeline_samples_as_fada_sample(exported_teacher, teacher_ckpt, frames=7)  # 2 windows of 4, the last padded


def test_the_folder_is_a_diffusers_pipeline_in_safetensors(exported_teacher):
    folder = Path(exported_teacher.config._name_or_path)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FadaAvatarPipeline"
    assert index["denoiser"] == ["fada_lightning.models.denoiser", "AvatarDenoiser"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (index["num_inference_steps"], index["ref_guidance_scale"], index["audio_guidance_scale"]) == (25, 2.5, 6.5)
    from safetensors.torch import load_file

    weights = load_file(folder / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert {k.split(".")[0] for k in weights} == {"reference_net", "denoising_net", "audio_projection"}
    assert "pretrained" not in json.loads((folder / "denoiser" / "config.json").read_text())  # no path of the training machine


def test_the_pipeline_refuses_a_face_of_the_wrong_size_and_speech_of_the_wrong_shape(exported_teacher):
    image, audio = random_face_and_speech(2)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\) uint8 frames"):
        exported_teacher(image[:16], audio)
    with pytest.raises(ValueError, match="mono samples"):
        exported_teacher(image, np.stack([audio, audio]))


def test_a_vae_codec_and_wav2vec2_features_round_trip(tmp_path):
    """The sd15 parts at a tiny size: the VAE's weights and config (not its training path), and wav2vec2's
    weights inside the audio encoder, saved and loaded back give the same latents and features."""
    from datamodules.audio_features import Wav2Vec2Features

    torch.manual_seed(0)
    vae = VAECodec(config=dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                               sample_size=16))
    vae.register_to_config(config={k: v for k, v in vae.vae.config.items() if not k.startswith("_")})
    vae.save_pretrained(tmp_path / "codec")
    loaded = VAECodec.from_pretrained(tmp_path / "codec")
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(pixels), vae.encode(pixels))

    arch = dict(extractor_mode="group_norm", extractor_conv_layer_config=None, extractor_conv_bias=False,
                encoder_embed_dim=16, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=8,
                encoder_pos_conv_groups=2, encoder_num_layers=2, encoder_num_heads=2, encoder_attention_dropout=0.0,
                encoder_ff_interm_features=32, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
                encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)
    features = Wav2Vec2Features(arch)
    spec = {"class_path": "datamodules.audio_features.Wav2Vec2Features", "init_args": {"arch": arch, "weights": "x.pt"}}
    AudioEncoder.of(spec, features).save_pretrained(tmp_path / "audio_encoder")
    encoder = AudioEncoder.from_pretrained(tmp_path / "audio_encoder")
    wav = torch.randn(3 * 640)
    assert torch.equal(encoder(wav, 3), features(wav, 3))
    assert "weights" not in encoder.config.init_args

    codec = SpaceToDepthCodec(factor=2, scale=0.5)
    codec.save_pretrained(tmp_path / "s2d")
    assert SpaceToDepthCodec.from_pretrained(tmp_path / "s2d").scale == 0.5


def test_the_pipeline_loads_and_samples_without_lightning(exported_teacher):
    """A fresh interpreter (fada_lightning.testing imports Lightning, so it makes its own inputs)."""
    folder = exported_teacher.config._name_or_path
    code = f"""
import sys
import numpy as np, torch
from fada_lightning.pipeline import FadaAvatarPipeline
pipe = FadaAvatarPipeline.from_pretrained({str(folder)!r})
rng = np.random.default_rng(0)
out = pipe(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 0.1 * rng.standard_normal(640),
           num_inference_steps=2, generator=torch.Generator().manual_seed(0))
assert out.frames.shape == (1, 32, 32, 3), out.frames.shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")
                or m in ("fada_lightning.module", "fada_lightning.distill", "fada_lightning.cli"))
print("training modules:", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training modules: []" in done.stdout
    assert "accelerate" not in done.stderr  # no advice to install it at every load (it is used when present)


def test_fada_export_writes_the_folder_and_refuses_to_overwrite_it(teacher_ckpt, tmp_path, capsys):
    from fada_lightning import cli

    out = tmp_path / "teacher"
    cli.main(["export", teacher_ckpt, "--out", str(out)])
    assert "FadaAvatarPipeline.from_pretrained" in capsys.readouterr().out
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(SystemExit, match="exists: choose another --out, or pass --overwrite"):
        cli.main(["export", teacher_ckpt, "--out", str(out)])
    cli.main(["export", teacher_ckpt, "--out", str(out), "--overwrite"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert FadaAvatarPipeline.from_pretrained(out).config.frame_size == 32


def test_the_five_lines_of_docs_inference_run_as_written(exported_teacher, tmp_path, monkeypatch):
    """docs/inference.md's block, run in a folder holding what it names: the export, a face, speech."""
    import shutil

    import decord
    from PIL import Image

    from datamodules.synthetic import render_clip
    from fada_lightning.video_io import encode_wav, write_atomic

    block = re.search(r"^```python run\n(.*?)^```$", DOC.read_text(), re.S | re.M).group(1)
    assert len(block.strip().splitlines()) == 5
    shutil.copytree(exported_teacher.config._name_or_path, tmp_path / "exported" / "teacher")
    video, audio, _ = render_clip(3, "strict", 0, frames=6)
    Image.fromarray(video[0]).save(tmp_path / "face.png")
    write_atomic(tmp_path / "speech.wav", encode_wav(audio))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(DOC), "exec"), {})
    assert len(decord.VideoReader(str(tmp_path / "talking.mp4"))) == 6


def test_a_pipeline_loaded_in_bfloat16_samples_in_it(exported_teacher):
    """dtype= casts the denoiser (and the codec, had it weights); the audio encoder stays float32;
    the frames come out near the float32 pipeline's (bf16 rounding over 25 steps, not garbage)."""
    folder = exported_teacher.config._name_or_path
    half = FadaAvatarPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.denoiser.dtype == torch.bfloat16
    assert {p.dtype for p in half.audio_encoder.state_dict().values() if p.is_floating_point()} == {torch.float32}
    cast = FadaAvatarPipeline.from_pretrained(folder).to(torch.bfloat16)  # a cast after loading: the same
    assert cast.denoiser.dtype == torch.bfloat16
    exact = exported_teacher.audio_encoder.state_dict()
    assert all(torch.equal(v, exact[k]) for k, v in cast.audio_encoder.state_dict().items())
    image, audio = random_face_and_speech(6)
    frames = [pipe(image, audio, generator=torch.Generator().manual_seed(0)).frames for pipe in (half, exported_teacher)]
    assert frames[0].shape == frames[1].shape == (6, 32, 32, 3)
    assert 0 < np.abs(frames[0].astype(int) - frames[1]).mean() < 8


def test_a_micro_pipeline_moves_and_casts_as_a_whole(exported_teacher):
    """diffusers asks every part its device and dtype (pipe.device, pipe.to): the weightless codec answers."""
    pipe = FadaAvatarPipeline.from_pretrained(exported_teacher.config._name_or_path).to("cpu", torch.bfloat16)
    assert pipe.device.type == "cpu" and pipe.codec.device.type == "cpu" and pipe.denoiser.dtype == torch.bfloat16
