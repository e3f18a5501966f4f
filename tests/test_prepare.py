"""`fada prepare` end to end on media the tests make: where each input lands, the clips it writes (25 fps,
audio aligned, a face), the manifest `fada fit` reads, clear errors, and a killed run resumed."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from datamodules.decoding import read_wav
from datamodules.prepare.pipeline import MEASURE_SIZE, mouth_box
from datamodules.prepare.run import main, prepare
from datamodules.prepare.scores import sync_proxy
from datamodules.prepare.testmedia import write_raw_inputs
from datamodules.prepare.tiers import load_config

CONFIG = "prepare/testmedia.yaml"
pytestmark = pytest.mark.slow  # about a minute: 25 inputs through every stage, and a run killed and resumed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    expected = write_raw_inputs(root / "raw", seconds=2.4)  # 2.4 s clips (60 frames); one 23 s
    manifest = prepare([str(root / "raw")], root / "out", load_config(CONFIG), workers=2, progress=False)
    records = {json.loads(p.read_text())["source"]: json.loads(p.read_text())
               for p in (root / "out" / ".parts").glob("*.json")}
    return root, expected, manifest, records


def clips_of(out: Path, manifest: dict) -> list[dict]:
    urls = [str(out / p) for tier in ("strict", "lenient") for p in manifest[tier]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_every_input_lands_where_the_config_says(prepared):
    _, expected, manifest, records = prepared
    assert set(records) == set(expected)
    for name, where in expected.items():
        record = records[name]
        tiers = [clip["tier"] for clip in record["clips"]]
        if where.startswith("rejected:"):
            assert record["reject"] and record["reject"][0] == where.split(":")[1], (name, record)
            assert any(r["source"] == name for r in manifest["rejects"][where.split(":")[1]])
        elif where == "dropped":
            assert tiers and set(tiers) == {None}, (name, record["clips"])
        elif where == "lenient":
            assert "lenient" in tiers and "strict" not in tiers, (name, record["clips"])
        else:
            assert set(tiers) - {None}, (name, record["clips"])
    frames = {name: [c["frames"] for c in records[name]["clips"]] for name in records}
    assert frames["23 s.mp4"] == [250, 250, 75]  # 10 + 10 + 3 s
    assert len(frames["cut mid-file.mp4"]) == 2  # one clip each side of the cut, none across it
    assert any("sync_offset 8 > 6" in r for r in records["audio late 8 frames.mp4"]["clips"][0]["reasons"])
    assert any("still" in r for r in records["still image.mp4"]["clips"][0]["reasons"])
    assert any("face_size" in r for r in records["tiny face.mp4"]["clips"][0]["reasons"])
    strict_reasons = [r for clip in records["blur and noise.mp4"]["clips"] for r in clip["reasons"]]
    assert any(r.startswith(("sharpness", "noise")) for r in strict_reasons)
    assert any(r.startswith("background_flow") for r in records["camera pan.mp4"]["clips"][0]["reasons"])


def test_clips_are_25_fps_with_their_audio_aligned_and_the_face_found(prepared):
    root, _, manifest, _ = prepared
    clips = clips_of(root / "out", manifest)
    assert len(clips) == manifest["samples"]["strict"] + manifest["samples"]["lenient"] > 0
    for clip in clips:
        meta = json.loads(clip["json"])
        with av.open(io.BytesIO(clip["mp4"])) as container:
            stream = container.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
            assert stream.average_rate == 25 and container.streams.audio
        wav = read_wav(clip["wav"])
        assert frames.shape == (meta["frames"], 64, 64, 3) and len(wav) == meta["frames"] * 640
        assert meta["fps"] == 25 and meta["quality"]["face_consistency"] >= 0.8
        if meta["source"].startswith(("portrait", "audio late 3", "2.0 s")):
            # the written clip, read back: its mouth moves with its audio within one frame
            upscaled = np.stack([np.kron(f, np.ones((2, 2, 1), np.uint8)) for f in frames])
            assert MEASURE_SIZE == 128 and upscaled.shape[1] == MEASURE_SIZE
            sync = sync_proxy(upscaled, wav, mouth_box(1.8))
            assert abs(sync["av_offset"]) <= 1, (meta["source"], sync)
    late = [json.loads(c["json"]) for c in clips if json.loads(c["json"])["source"] == "audio late 3 frames.mp4"]
    assert late and abs(late[0]["quality"]["sync_offset"] - 3) <= 1 and late[0]["audio_shift_frames"] != 0


def test_the_manifest_counts_tiers_and_fit_reads_it(prepared):
    root, _, manifest, records = prepared
    out = root / "out"
    strict = sum(c["frames"] for r in records.values() for c in r["clips"] if c["tier"] == "strict")
    lenient = sum(c["frames"] for r in records.values() for c in r["clips"] if c["tier"] == "lenient")
    assert manifest["sets"]["A"]["hours"] == pytest.approx(strict / 25 / 3600, abs=1e-4)
    assert manifest["sets"]["B"]["hours"] == pytest.approx((strict + lenient) / 25 / 3600, abs=1e-4)
    assert manifest["sets"]["B"]["clips"] >= manifest["sets"]["A"]["clips"] > 0  # B contains A
    for clip in clips_of(out, manifest):
        assert json.loads(clip["json"])["tier"] in ("strict", "lenient")
    from datamodules.streaming import AvatarDataModule

    data = AvatarDataModule(train_shards=str(out / "manifest.json"), val_shards=str(out / "strict"),
                            tier_weights={"strict": 1, "lenient": 1}, clip_frames=8, motion_frames=2,
                            batch_size=2, num_workers=0, epoch_samples=4, val_samples=2, isolate_decoding=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["frames"].shape == (2, 8, 3, 64, 64) and set(batch["tier"]) <= {"strict", "lenient"}
    assert data.face_crop()["detector"] == "haar" and data.state_dict()["face_crop"]["margin"] == 1.8


def test_a_missing_weights_path_is_one_error_naming_its_key_and_nothing_connects(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("fada prepare tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    video = tmp_path / "in.mp4"
    video.write_bytes(b"")
    for setting, key in (("syncnet: /models/syncnet_v2.model", "syncnet"),
                         ("iqa_model: /models/hyperiqa.pt", "iqa_model"),
                         ("detector: yunet\ndetector_args: {weights: /models/yunet.onnx}", "detector_args")):
        config = tmp_path / "bad.yaml"
        config.write_text(f"base: prepare/default.yaml\n{setting}\n")
        with pytest.raises(SystemExit) as failed:
            main([str(video), "--out", str(tmp_path / "out"), "--config", str(config)])
        assert key in str(failed.value) and "/models/" in str(failed.value)
        assert not (tmp_path / "out").exists()  # refused before any work


def test_a_killed_run_resumes_to_the_same_shards_and_manifest(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    expected = write_raw_inputs(tmp_path / "all", seconds=2.4, long_seconds=6)
    for name in ("portrait 24fps.mp4", "cut mid-file.mp4", "6 s.mp4", "blur and noise.mp4", "no face.mp4",
                 "truncated.mp4"):
        os.replace(tmp_path / "all" / name, raw / name)
    assert expected
    command = [sys.executable, "-m", "datamodules.prepare.run", str(raw), "--config", CONFIG, "--workers", "1"]
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    killed = subprocess.Popen([*command, "--out", str(tmp_path / "resumed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp_path / "resumed" / ".parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.json"))) < 2 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the run and its worker, mid-input
    killed.wait()
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    finished = len(list(parts.glob("*.json")))
    assert 0 < finished < 6
    subprocess.run([*command, "--out", str(tmp_path / "resumed")], check=True, capture_output=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (straight / "manifest.json").read_bytes() == (resumed / "manifest.json").read_bytes()
    shards = sorted(p.relative_to(straight) for p in straight.glob("*/*.tar"))
    assert shards and shards == sorted(p.relative_to(resumed) for p in resumed.glob("*/*.tar"))
    for shard in shards:
        assert (straight / shard).read_bytes() == (resumed / shard).read_bytes(), shard


class AbortingDetector:
    """A face detector that kills its process, as a native library's segfault would."""

    def __call__(self, frame):
        os.abort()


class SlowDetector:
    def __call__(self, frame):
        time.sleep(60)


def test_a_crashing_or_hanging_worker_costs_its_input_only(tmp_path):
    raw = tmp_path / "raw"
    write_raw_inputs(tmp_path / "all", seconds=2.4, long_seconds=3)
    raw.mkdir()
    for name in ("2.0 s.mp4", "no audio.mp4"):
        os.replace(tmp_path / "all" / name, raw / name)
    crashing = load_config(CONFIG, detector="test_prepare:AbortingDetector")
    manifest = prepare([str(raw)], tmp_path / "crash", crashing, workers=2, progress=False)
    assert [r["source"] for r in manifest["rejects"]["undecodable"]] == ["2.0 s.mp4"]
    assert "died" in manifest["rejects"]["undecodable"][0]["detail"]
    assert [r["source"] for r in manifest["rejects"]["no audio"]] == ["no audio.mp4"]  # the other went on
    hanging = load_config(CONFIG, detector="test_prepare:SlowDetector")
    hanging.probe_timeout, hanging.timeout_per_second = 2.0, 0.1
    began = time.monotonic()
    manifest = prepare([str(raw)], tmp_path / "hang", hanging, workers=1, progress=False)
    assert [r["source"] for r in manifest["rejects"]["timeout"]] == ["2.0 s.mp4"]
    assert time.monotonic() - began < 30


def test_the_synthetic_world_as_raw_videos_prepares_and_trains(tmp_path):
    """Shots of different identities joined by hard cuts -> prepare (pre-cropped: detector none) -> a
    teacher trains on the manifest, and its checkpoint records how its faces were cropped."""
    from datamodules.prepare.media import write_video
    from datamodules.synthetic import render_raw_video
    from fada_lightning.cli import main as fada
    from fada_lightning.sample import load_module

    for index in range(2):
        video, wav, _ = render_raw_video(0, index, shot_seconds=(3.0, 6.0, 3.0), size=64)
        write_video(tmp_path / "raw" / f"talk {index}.mp4", video, wav)
    manifest = prepare([str(tmp_path / "raw")], tmp_path / "out", load_config("prepare/synthetic.yaml"), workers=2,
                       progress=False)
    windows = [json.loads(p.read_text())["clips"] for p in (tmp_path / "out" / ".parts").glob("*.json")]
    assert [[c["frames"] for c in clips] for clips in windows] == [[73, 146, 73]] * 2  # cut at 75 and 225, 2 trimmed
    assert manifest["samples"]["strict"] > 0
    run = tmp_path / "run"
    fada(["fit", "--config", "teacher.yaml", f"--data.init_args.train_shards={tmp_path / 'out' / 'manifest.json'}",
          "--data.init_args.synthetic=null", f"--data.init_args.val_shards={tmp_path / 'out' / 'strict'}",
          "--data.init_args.num_workers=0", "--data.init_args.batch_size=2", "--data.init_args.epoch_samples=4",
          "--data.init_args.val_samples=2", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
          "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={run}",
          f"--trainer.logger.init_args.save_dir={run}", "--model.init_args.sample_steps=2"])
    checkpoint = run / "tb" / "run" / "checkpoints" / "last.ckpt"
    assert load_module(checkpoint).training_face_crop == {**manifest["crop"], "detector": "none"}
    from datamodules.cache import main as cache  # fada cache runs on prepare's shards

    written = cache([str(tmp_path / "out" / "strict"), "--preset", "micro", "--out", str(tmp_path / "cached")])
    assert [p.name for p in written] == [Path(p).name for p in manifest["strict"]]


def test_syncnet_and_iqa_weights_score_the_clips_when_given(tmp_path):
    """With local SyncNet weights (random here: the plumbing, not the numbers) sync comes from SyncNet,
    and with a TorchScript IQA model every clip's json has its score."""
    import torch

    from datamodules.prepare.pipeline import process_input
    from fada_lightning.metrics.sync import SyncNet

    write_raw_inputs(tmp_path / "all", seconds=2.4, long_seconds=3)
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet.pt")

    class MeanQuality(torch.nn.Module):
        def forward(self, images):  # (B, 3, H, W) in [0, 1] -> (B,) in 0-100
            return 100 * images.mean(dim=(1, 2, 3))

    torch.jit.script(MeanQuality()).save(str(tmp_path / "iqa.pt"))
    config = load_config(CONFIG, syncnet=str(tmp_path / "syncnet.pt"), iqa_model=str(tmp_path / "iqa.pt"))
    config.lenient = config.strict = {}  # keep every window, to read its scores
    result = process_input(str(tmp_path / "all" / "2.0 s.mp4"), "2.0 s.mp4", config)
    (sample,) = result.samples
    meta = json.loads(sample["json"])
    assert meta["sync_source"] == "syncnet" and abs(meta["quality"]["sync_offset"]) <= 15
    assert 0 < meta["quality"]["iqa"] < 100
