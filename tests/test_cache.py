"""`fada cache` and training on cached latents: the same z0, conditions and audio as decoding the pixels."""
from __future__ import annotations

import tarfile
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules.cache import main as cache_main
from datamodules.cache import shard_name
from datamodules.clips import BadSampleWarning, ClipDecoder, SkipSample, cache_spec
from datamodules.streaming import AvatarDataModule
from fada_lightning.module import TeacherModule
from fada_lightning.presets import load_preset

from conftest import make_shards, small_preset, write_shard

PRESET = small_preset()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("plain"), n_clips=4, clips_per_shard=2, frames=12)


@pytest.fixture(scope="module")
def cached(plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached")
    written = cache_main([*plain, "--out", str(out), "--preset", "micro", "--dtype", "float32"])
    assert [p.name for p in written] == ["strict-00000.tar", "strict-00001.tar"]
    return [str(p) for p in written]


def raw_samples(url):
    return list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))


def test_cached_items_equal_decoded_items(plain, cached):
    """Same clip start and reference (same rng); latents = the codec on the decoded frames, same audio."""
    model = TeacherModule(preset=PRESET, ema_decay=None, clip_frames=4)
    pixels = ClipDecoder(model.audio_features, 4, 2, frame_size=32)
    latents = ClipDecoder(model.audio_features, 4, 2, frame_size=32, cache=cache_spec(model.preset))
    for a_raw, b_raw in zip(raw_samples(plain[0]), raw_samples(cached[0])):
        a = pixels(a_raw, np.random.default_rng(1))
        b = latents(b_raw, np.random.default_rng(1))
        assert (a["key"], a["start"]) == (b["key"], b["start"]) and "frames" not in b
        torch.testing.assert_close(b["audio"], a["audio"], rtol=1e-5, atol=1e-5)
        z0_a, cond_a = model.encode_batch({k: v[None] for k, v in a.items() if torch.is_tensor(v)})
        z0_b, cond_b = model.encode_batch({k: v[None] for k, v in b.items() if torch.is_tensor(v)})
        torch.testing.assert_close(z0_b, z0_a, rtol=1e-5, atol=1e-5)
        for field in ("ref", "motion", "audio"):
            torch.testing.assert_close(getattr(cond_b, field), getattr(cond_a, field), rtol=1e-5, atol=1e-5)


def test_latents_of_another_model_are_refused_by_name(cached):
    other = load_preset("micro")
    other["codec"]["init_args"]["scale"] = 0.5
    decoder = ClipDecoder(None, 4, 2, cache=cache_spec(other))
    with pytest.raises(SkipSample, match="run `fada cache` for this model's preset"):
        decoder(raw_samples(cached[0])[0])


def test_caching_resumes_and_keeps_bad_samples_as_they_were(plain, cached, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "strict-00000.tar").write_bytes(open(cached[0], "rb").read())  # done before a stop
    bad = write_shard(tmp_path / "in" / "bad-00000.tar", [{"__key__": "broken", "mp4": b"not a video",
                                                            "wav": b"x", "json": b"{}"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = cache_main([*plain, bad, "--out", str(out)])
    assert [p.name for p in written] == ["strict-00001.tar", "bad-00000.tar"]
    assert "strict-00000.tar exists, skipped" in capsys.readouterr().out
    assert any(issubclass(w.category, BadSampleWarning) and "'broken'" in str(w.message) for w in caught)
    with tarfile.open(out / "bad-00000.tar") as tar:
        assert sorted(tar.getnames()) == ["broken.json", "broken.mp4", "broken.wav"]
    assert not list(out.glob(".*tmp*"))  # nothing half written


def test_shard_names_of_urls():
    assert shard_name("pipe:aws s3 cp s3://bucket/fada/strict-000001.tar -") == "strict-000001.tar"
    assert shard_name("/data/lenient/lenient-00002.tar") == "lenient-00002.tar"


def test_a_model_trains_on_cached_shards(cached, tmp_path):
    from conftest import cpu_trainer

    model = TeacherModule(preset=PRESET, ema_decay=None, clip_frames=4)
    data = AvatarDataModule.for_model(model, train_shards=cached, val_shards=cached[:1], batch_size=2, num_workers=0,
                                      epoch_samples=4, val_samples=2, cached=True, shuffle_buffer=4)
    trainer = cpu_trainer(tmp_path, 2, enable_checkpointing=False)
    trainer.fit(model, data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert data.train_set.decoder.cache == cache_spec(model.preset)
