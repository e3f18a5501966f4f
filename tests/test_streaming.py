"""Audio features, shard streaming, bad-data handling and the DataModule (CPU, tiny shards)."""
from __future__ import annotations

import glob
import itertools
import json
import os
import signal
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import burst_clip, cpu_trainer, frame_index, make_shards, small_preset, write_shard

from datamodules.audio_features import LogMelFeatures, Wav2Vec2Features, audio_windows
from datamodules.clips import BadSampleWarning, ClipDecoder
from datamodules.shards import resolve_shards, split_shards
from datamodules.streaming import AvatarDataModule
from datamodules.streams import ClipStream, TierMix

TINY_WAV2VEC2 = dict(
    extractor_mode="group_norm", extractor_conv_layer_config=[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2,
    extractor_conv_bias=False, encoder_embed_dim=16, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=8,
    encoder_pos_conv_groups=2, encoder_num_layers=3, encoder_num_heads=2, encoder_attention_dropout=0.0,
    encoder_ff_interm_features=32, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
    encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)


# ---- audio features -------------------------------------------------------------------------
def audio_windows_reference(features, start, count, radius):
    """Slow and obviously right: one frame, one offset at a time."""
    t, rest = features.shape[0], features.shape[1:]
    out = torch.zeros(count, 2 * radius + 1, *rest)
    for i in range(count):
        for j, offset in enumerate(range(-radius, radius + 1)):
            frame = start + i + offset
            if 0 <= frame < t:
                out[i, j] = features[frame]
    return out


@pytest.mark.parametrize("start,count,radius", [(0, 7, 2), (3, 4, 2), (5, 6, 1), (-2, 3, 3), (0, 1, 0)])
def test_audio_windows_match_reference(start, count, radius):
    features = torch.randn(7, 2, 3)
    fast = audio_windows(features, start, count, radius)
    assert fast.shape == (count, 2 * radius + 1, 2, 3)
    torch.testing.assert_close(fast, audio_windows_reference(features, start, count, radius), rtol=0, atol=0)


def burst_wav(frames: int, burst_frame: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wav = 0.003 * torch.randn(frames * 640, generator=g)
    wav[burst_frame * 640:(burst_frame + 1) * 640] = 0.5 * torch.randn(640, generator=g)
    return wav


@pytest.mark.parametrize("burst_frame", [0, 6, 19])
def test_logmel_shape_and_alignment(burst_frame):
    features = LogMelFeatures(n_mels=32)
    assert (features.num_layers, features.dim) == (1, 128)
    out = features(burst_wav(20, burst_frame), 20)
    assert out.shape == (20, 1, 128) and out.dtype == torch.float32
    assert -1.5 < out.min() and out.max() < 1.5  # about unit range
    energy = out.mean(dim=(1, 2))  # (T,)
    assert energy.argmax() == burst_frame  # the burst lands in its own row, not a neighbour
    neighbours = [energy[k] for k in (burst_frame - 1, burst_frame + 1) if 0 <= k < 20]
    assert all(energy[burst_frame] - n > 0.5 for n in neighbours)


def test_logmel_pads_or_cuts_to_the_frame_count():
    features = LogMelFeatures(n_mels=8)
    assert features(torch.zeros(1000), 3).shape == (3, 1, 32)
    assert features(torch.zeros(10 * 640), 4).shape == (4, 1, 32)


def test_wav2vec2_features_from_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    saved = Wav2Vec2Features(TINY_WAV2VEC2)
    path = tmp_path / "wav2vec2.pt"
    torch.save(saved.model.state_dict(), path)
    loaded = Wav2Vec2Features(TINY_WAV2VEC2, weights=str(path))
    assert (loaded.num_layers, loaded.dim) == (3, 16)
    wav = burst_wav(13, 4)
    out = loaded(wav, 13)
    assert out.shape == (13, 3, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(out, saved(wav, 13))  # the weights are the saved ones
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training


def test_wav2vec2_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        Wav2Vec2Features(TINY_WAV2VEC2, weights=str(tmp_path / "nowhere.pt"))


# ---- shard lists and DDP-style splitting --------------------------------------------------------
def test_split_shards_is_disjoint_and_covering():
    urls = [f"s{i}" for i in range(11)]
    parts = [split_shards(urls, r, 2, w, 2) for r, w in itertools.product(range(2), range(2))]
    assert sorted(itertools.chain(*parts)) == sorted(urls)
    assert sum(map(len, parts)) == len(urls)
    with pytest.raises(ValueError, match="need at least 6 shards"):
        split_shards(urls[:5], 0, 3, 0, 2)


def test_resolve_shards_accepts_directory_glob_braces_and_lists(tmp_path):
    paths = [write_shard(tmp_path / f"part-{i:05d}.tar", [burst_clip(f"c-{i:06d}", frames=12, size=32)])
             for i in range(3)]
    assert resolve_shards(str(tmp_path)) == paths
    assert resolve_shards(str(tmp_path / "part-*.tar")) == paths
    assert resolve_shards(str(tmp_path / "part-{00000..00002}.tar")) == paths
    assert resolve_shards([paths[0], str(tmp_path / "part-0000[12].tar")]) == paths
    assert resolve_shards("https://host/x-{0..1}.tar") == ["https://host/x-0.tar", "https://host/x-1.tar"]


def test_ranks_and_workers_stream_disjoint_equal_shares(tmp_path):
    """2 ranks x 2 workers over 8 one-clip shards: each (rank, worker) yields its own 2 clips."""
    shards = make_shards(tmp_path, n_clips=8, clips_per_shard=1, frames=12, size=32)
    decoder = ClipDecoder(LogMelFeatures(n_mels=8), clip_frames=4, motion_frames=2)
    keys: dict[int, list[str]] = {}
    lengths = []
    for rank in range(2):
        stream = ClipStream(shards, decoder, samples_per_worker=2, rank=rank, world_size=2, num_workers=2, seed=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        lengths.append(len(loader))
        for item in loader:
            keys.setdefault(item["worker"], []).append(item["key"])
    assert lengths == [4, 4]
    assert sorted(keys) == [0, 1, 2, 3] and all(len(k) == 2 for k in keys.values())
    for a, b in itertools.combinations(keys.values(), 2):
        assert not set(a) & set(b)
    assert len(set(itertools.chain(*keys.values()))) == 8


def test_epochs_continue_the_stream_and_reshuffle(tmp_path):
    shards = make_shards(tmp_path, n_clips=6, clips_per_shard=1, frames=12, size=32)
    stream = ClipStream(shards, ClipDecoder(LogMelFeatures(n_mels=8), 4, 2), samples_per_worker=4, seed=0)
    epochs = [[item["key"] for item in stream] for _ in range(3)]
    assert all(len(e) == 4 for e in epochs)
    seen = list(itertools.chain(*epochs))
    assert set(seen[:6]) == set(seen[6:12])  # passes cover every shard once each
    assert seen[:6] != seen[6:12]  # in a new order


def test_a_shuffle_buffer_mixes_shards_reproducibly(tmp_path):
    """Two shards of 4 clips: without a buffer a worker reads shard by shard; with one, clips of both
    shards interleave, in the same order for the same seed and another for another seed."""
    shards = make_shards(tmp_path, n_clips=8, clips_per_shard=4, frames=12, size=32)
    decoder = ClipDecoder(LogMelFeatures(n_mels=8), 4, 2)

    def keys(buffer, seed=0):
        return [item["key"] for item in ClipStream(shards, decoder, 8, seed=seed, shuffle_buffer=buffer)]

    plain, mixed = keys(0), keys(8, seed=1)
    assert sorted(plain) == [f"strict-{i:06d}" for i in range(8)]
    assert set(mixed) <= set(plain)  # (the buffer reads ahead into the next pass: a clip may come twice)
    shard_of = [int(k[-6:]) // 4 for k in plain]
    assert shard_of in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)
    assert mixed == keys(8, seed=1) and mixed != keys(8, seed=2)
    assert [int(k[-6:]) // 4 for k in mixed] not in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)


# ---- bad data -------------------------------------------------------------------------------------
def test_bad_samples_and_truncated_tars_are_skipped_warned_and_counted(tmp_path):
    good = [burst_clip(f"good-{i:06d}", frames=12, size=32) for i in range(3)]
    garbage = {**burst_clip("bad-000000", frames=12, size=32), "mp4": b"not a video" * 50}
    short = burst_clip("short-000000", frames=4, size=32, burst_frame=1)
    no_wav = {k: v for k, v in burst_clip("nowav-000000", frames=12, size=32).items() if k != "wav"}
    bad_json = {**burst_clip("badjson-000000", frames=12, size=32), "json": b"{not json"}
    bad_quality = {**burst_clip("badquality-000000", frames=12, size=32),
                   "json": json.dumps({"tier": "strict", "quality": {"blur_sigma": "sharp"}}).encode()}
    mixed = write_shard(tmp_path / "mixed.tar", [good[0], garbage, short, no_wav, bad_json, bad_quality, good[1]])
    truncated = write_shard(tmp_path / "truncated.tar", [good[2], burst_clip("lost-000000", frames=12, size=32)])
    os.truncate(truncated, os.path.getsize(truncated) * 6 // 10)

    stream = ClipStream([mixed, truncated], ClipDecoder(LogMelFeatures(n_mels=8), 4, 2), samples_per_worker=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    assert len(items) == 3 and {i["key"] for i in items} <= {"good-000000", "good-000001", "good-000002"}
    for key in ("bad-000000", "short-000000", "nowav-000000", "badjson-000000", "badquality-000000"):
        assert any(key in m and mixed in m for m in messages), key
    assert any(truncated in m for m in messages)
    assert items[-1]["skipped"] >= 6 and items[-1]["worker"] == 0
    assert [i["skipped"] for i in items] == sorted(i["skipped"] for i in items)  # cumulative


def test_a_stream_without_any_usable_clip_fails_instead_of_spinning(tmp_path):
    garbage = {**burst_clip("bad-000000", frames=12, size=32), "mp4": b"junk" * 100}
    shard = write_shard(tmp_path / "bad.tar", [garbage])
    stream = ClipStream([shard], ClipDecoder(LogMelFeatures(n_mels=8), 4, 2), samples_per_worker=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(RuntimeError, match="no usable clip"):
            list(stream)


# ---- alignment ------------------------------------------------------------------------------------
def test_clip_frames_motion_and_audio_line_up(tmp_path):
    """Frame i shows grey 20 + 10 i and the burst sits on frame 9; for random clip starts the
    decoded frames, motion frames, mouth_open and the audio windows all point at the same frames."""
    features = LogMelFeatures(n_mels=8)
    decoder = ClipDecoder(features, clip_frames=6, motion_frames=2, audio_radius=2)
    sample = burst_clip("b-000000", frames=20, size=32, burst_frame=9)
    sample["__url__"] = "memory"
    hits = 0
    for seed in range(8):
        item = decoder(sample, np.random.default_rng(seed))
        s = item["start"]
        np.testing.assert_array_equal(frame_index(item["frames"]), np.arange(s, s + 6))
        np.testing.assert_array_equal(frame_index(item["motion"]), np.arange(s - 2, s))
        torch.testing.assert_close(item["mouth_open"], torch.arange(s, s + 6, dtype=torch.float32) / 20)
        # window row j, offset o covers frame s + j + o - 2: the burst is where frame 9 is
        loudness = item["audio"].mean(dim=(2, 3))  # (F, 5)
        for j, o in zip(*np.nonzero((np.arange(s, s + 6)[:, None] + np.arange(-2, 3)[None]) == 9)):
            hits += 1
            assert loudness[j, o] == loudness.max()
        if s <= 9 < s + 6:
            assert loudness[:, 2].argmax() == 9 - s  # the centre of the window of frame 9
    assert hits > 0


# ---- the DataModule -------------------------------------------------------------------------------
def test_missing_shard_path_is_named_before_training(tmp_path):
    shards = make_shards(tmp_path, n_clips=2, clips_per_shard=1, frames=12, size=32)
    missing = str(tmp_path / "gone" / "strict-00009.tar")
    with pytest.raises(FileNotFoundError, match="strict-00009.tar"):
        AvatarDataModule(train_shards=shards + [missing], num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="empty"):
        (tmp_path / "empty").mkdir()
        AvatarDataModule(train_shards=str(tmp_path / "empty"), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        AvatarDataModule(train_shards=str(tmp_path / "nothing-{0..3}.tar"), num_workers=0).setup("fit")


def test_datamodule_batches_through_a_real_dataloader(tmp_path):
    shards = make_shards(tmp_path, n_clips=8, clips_per_shard=2, frames=16, size=32)
    dm = AvatarDataModule(train_shards=os.path.dirname(shards[0]), val_shards=shards[:2],
                          audio_features=LogMelFeatures(n_mels=8), clip_frames=4, motion_frames=2, batch_size=2,
                          num_workers=2, epoch_samples=8, val_samples=3, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    batch = batches[0]
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["motion"].shape == (2, 2, 3, 32, 32)
    assert batch["ref"].shape == (2, 3, 32, 32) and batch["audio"].shape == (2, 4, 5, 1, 32)
    assert batch["mouth_open"].shape == (2, 4) and len(batch["key"]) == 2 and batch["tier"] == ["strict"] * 2
    assert batch["skipped"].tolist() == [0, 0] and set(batch["worker"].tolist()) <= {0, 1}
    assert -1 <= batch["frames"].min() and batch["frames"].max() <= 1
    assert len(list(loader)) == 4  # the next epoch, same length

    val = [dm.val_dataloader() for _ in range(2)]
    first, second = (list(v) for v in val)
    assert [len(b["key"]) for b in first] == [2, 1]
    for a, b in zip(first, second):  # fixed clips: identical every time
        torch.testing.assert_close(a["frames"], b["frames"])
        torch.testing.assert_close(a["audio"], b["audio"])


def test_datamodule_audio_features_by_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(AvatarDataModule, "data")
    cfg = parser.parse_object({"data": {"train_shards": "x.tar", "audio_features": {
        "class_path": "datamodules.audio_features.LogMelFeatures", "init_args": {"n_mels": 16}}}})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm.audio_features, LogMelFeatures) and dm.audio_features.dim == 64


def test_the_cli_links_the_models_clip_shape_and_audio_features_into_the_data(tmp_path, monkeypatch):
    """LightningCLI argument linking: the data module gets what the model was built with, not a default."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from fada_lightning.cli import FadaCLI, FadaParser
    from fada_lightning.presets import find_config

    monkeypatch.chdir(tmp_path)
    cli = FadaCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                  auto_configure_optimizers=False, parser_class=FadaParser,
                  args=["--config", str(find_config("teacher.yaml")), "--model.init_args.clip_frames=6",
                        "--model.init_args.motion_frames=3"])
    data, model = cli.datamodule, cli.model
    assert (data.clip_frames, data.motion_frames) == (6, 3)
    assert data.audio_features is model.audio_features and data.preset == model.preset
    decoder = data._make_decoder()
    assert (decoder.clip_frames, decoder.motion_frames, decoder.frame_size) == (6, 3, model.preset["frame_size"])


def test_data_built_for_another_model_is_refused_by_name():
    class Model:
        audio_features = LogMelFeatures(n_mels=8)
        hparams = {"clip_frames": 6, "motion_frames": 3}
        preset = {"frame_size": 32}

    dm = AvatarDataModule.for_model(Model(), train_shards="x.tar")
    decoder = dm._make_decoder()
    assert decoder.audio_features is Model.audio_features and (decoder.clip_frames, decoder.motion_frames) == (6, 3)
    dm.decoder = AvatarDataModule(train_shards="x.tar", clip_frames=4)._make_decoder()
    with pytest.raises(ValueError, match=r"clip_frames: data 4, model 6; motion_frames: data 2, model 3; audio_features: "
                                         r"data \('LogMelFeatures', 1, 128\), model \('LogMelFeatures', 1, 32\)\): "
                                         r"build it with AvatarDataModule.for_model"):
        dm._check_fits(Model())


def test_datamodule_generates_synthetic_data_and_trains_on_its_strict_shards(tmp_path):
    root = tmp_path / "synthetic"
    dm = AvatarDataModule(synthetic=dict(root=str(root), strict_clips=4, lenient_clips=2, clips_per_shard=1,
                                         size=32, frames=12, progress=False, processes=1),
                          audio_features=LogMelFeatures(n_mels=8), clip_frames=4, batch_size=2, num_workers=0,
                          epoch_samples=4, frame_size=64)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set.urls == [str(root / "strict" / f"strict-{i:05d}.tar") for i in range(4)]
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (2, 4, 3, 64, 64) and batch["ref"].shape == (2, 3, 64, 64)  # resized on decode


@pytest.fixture(scope="module")
def tiered(tmp_path_factory) -> str:
    """A synthetic world of 8 strict and 8 lenient clips, 2 per shard."""
    root = tmp_path_factory.mktemp("tiered") / "synthetic"
    from datamodules.synthetic import write_shards

    write_shards(root, strict_clips=8, lenient_clips=8, clips_per_shard=2, size=32, frames=12, progress=False,
                 processes=1)
    return str(root)


def _tiered_data(root, **kwargs) -> AvatarDataModule:
    settings = dict(synthetic=dict(root=root, strict_clips=8, lenient_clips=8, clips_per_shard=2, size=32,
                                   frames=12, progress=False, processes=1),
                    audio_features=LogMelFeatures(n_mels=8), clip_frames=4, batch_size=8, num_workers=0,
                    val_shards=os.path.join(root, "strict"), val_samples=2)
    return AvatarDataModule(**{**settings, **kwargs})


def test_tiers_mix_by_their_weights_and_keep_their_tags(tiered):
    dm = _tiered_data(tiered, tier_weights={"strict": 3, "lenient": 1}, epoch_samples=400)
    dm.setup("fit")
    assert isinstance(dm.train_set, TierMix) and len(dm.train_set) == 400
    tiers, keys = [], []
    for batch in dm.train_dataloader():
        tiers += batch["tier"]
        keys += batch["key"]
    assert len(tiers) == 400
    assert all(key.startswith(tier) for key, tier in zip(keys, tiers))  # each clip tagged with its shard set
    strict = tiers.count("strict") / len(tiers)
    assert abs(strict - 0.75) < 4 * (0.75 * 0.25 / 400) ** 0.5, strict  # the realised mix, within sampling error
    assert {"strict", "lenient"} == set(tiers)


def test_items_carry_the_quality_scores_of_their_json(tiered):
    from datamodules.clips import QUALITY_KEYS

    dm = _tiered_data(tiered, tier_weights={"strict": 1, "lenient": 1}, epoch_samples=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["quality"].shape == (8, len(QUALITY_KEYS))
    manifest = {}
    for tier in ("strict", "lenient"):
        for url in sorted(glob.glob(os.path.join(tiered, tier, "*.tar"))):
            for sample in wds.WebDataset(url, shardshuffle=False):
                manifest[sample["__key__"]] = json.loads(sample["json"])["quality"]
    for key, scores in zip(batch["key"], batch["quality"].tolist()):
        assert scores == pytest.approx([manifest[key][k] for k in QUALITY_KEYS]), key
    lenient = [q for q, t in zip(batch["quality"], batch["tier"]) if t == "lenient"]
    assert all(q[0] != 0 or q[1] > 0 or q[2] > 0 or q[3] >= 0.1 for q in lenient)  # every lenient clip is degraded

    named = _tiered_data(tiered, quality_keys=["blur_sigma", "no_such_score"], epoch_samples=8)
    named.setup("fit")
    quality = next(iter(named.train_dataloader()))["quality"]
    assert quality.shape == (8, 2) and quality[:, 0].eq(0).all() and quality[:, 1].isnan().all()  # strict: no blur


def test_tier_mix_gives_every_rank_the_same_count_from_disjoint_shards(tiered):
    urls = {tier: [os.path.join(tiered, tier, f"{tier}-{i:05d}.tar") for i in range(4)]
            for tier in ("strict", "lenient")}
    decoder = ClipDecoder(LogMelFeatures(n_mels=8), clip_frames=4)
    seen = []
    for rank in (0, 1):
        streams = {tier: ClipStream(u, decoder, 12, rank, 2, 1) for tier, u in urls.items()}
        mix = TierMix(streams, {"strict": 1, "lenient": 1}, 12)
        items = list(mix)
        assert len(items) == len(mix) == 12
        seen.append({item["key"] for item in items})
    assert not seen[0] & seen[1]


def test_tier_weights_must_name_the_tiers_there_are(tiered):
    dm = _tiered_data(tiered, tier_weights={"strict": 1, "lenient_b": 1})
    with pytest.raises(ValueError, match=r"tiers \['lenient_b'\]"):
        dm.setup("fit")
    tiers = {"strict": os.path.join(tiered, "strict"), "lenient": os.path.join(tiered, "lenient")}
    with pytest.raises(ValueError, match="give tier_weights"):
        _tiered_data(tiered, train_shards=tiers).setup("fit")
    with pytest.raises(ValueError, match="must be >= 0"):
        _tiered_data(tiered, train_shards=tiers, tier_weights={"strict": -1, "lenient": 1}).setup("fit")
    only_strict = _tiered_data(tiered, train_shards=tiers, tier_weights={"strict": 1}, epoch_samples=16)
    only_strict.setup("fit")
    assert set(itertools.chain.from_iterable(b["tier"] for b in only_strict.train_dataloader())) == {"strict"}


def test_a_stream_built_for_other_worker_counts_says_so(tiered):
    urls = [os.path.join(tiered, "strict", f"strict-{i:05d}.tar") for i in range(4)]
    stream = ClipStream(urls, ClipDecoder(LogMelFeatures(n_mels=8), clip_frames=4), 2, num_workers=2)
    with pytest.raises(RuntimeError, match="ClipStream was built for 2 workers but the DataLoader has 1"):
        next(iter(stream))
    mix = TierMix({"strict": stream}, {"strict": 1}, 2)
    with pytest.raises(RuntimeError, match="TierMix was built for 2 workers"):
        next(iter(mix))


# ---- resuming ---------------------------------------------------------------------------------------
def test_a_stream_resumed_at_its_position_goes_on_with_the_clips_it_had_not_reached(tmp_path):
    """A worker's position (first_epoch, pulled, skipped) after any item, given to a new stream,
    continues the same clips in the same order, with a shuffle buffer and across epochs."""
    shards = make_shards(tmp_path, n_clips=6, clips_per_shard=2, frames=12, size=32)
    decoder = ClipDecoder(LogMelFeatures(n_mels=8), 4, 2)
    whole = ClipStream(shards, decoder, samples_per_worker=5, shuffle_buffer=3)
    items = [item for _ in range(3) for item in whole]
    for cut in (2, 5, 7):  # inside the first epoch, at its end, inside the second
        last = items[cut - 1]
        resumed = ClipStream(shards, decoder, samples_per_worker=5, shuffle_buffer=3)
        resumed.resume = {0: (last["stream_epoch"], last["pulled"], last["skipped"])}
        after = [item["key"] for _ in range(3) for item in resumed][:len(items) - cut]
        assert after == [item["key"] for item in items[cut:]]


class KeyRecorder(L.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(list(batch["key"]))


def test_a_killed_and_resumed_fit_trains_on_the_clips_an_uninterrupted_one_does(tmp_path):
    """6 steps straight, against 3 steps, a checkpoint, and a resumed run to 6 (2 workers, 4 batches an
    epoch: the checkpoint falls inside an epoch, after worker 0 has yielded its share and worker 1 has
    not, and the run crosses an epoch end): the same clips at every step, and the same t and noise, so
    the same weights to the bit. A run that validates (after steps 2 and 4) trains to those weights too."""
    from fada_lightning.checkpoints import AtomicCheckpointIO
    from fada_lightning.module import TeacherModule

    shards = make_shards(tmp_path, n_clips=8, clips_per_shard=2, frames=12, size=32)

    def fit(steps, ckpt_path=None, save=None, validate=False):
        torch.manual_seed(0)  # as seed_everything: a resumed run starts from the same state as a new one
        model = TeacherModule(preset=small_preset(), clip_frames=4, ema_decay=None)
        data = AvatarDataModule.for_model(model, train_shards=shards, batch_size=2, num_workers=2, epoch_samples=8,
                                          seed=3, val_shards=shards[:1] if validate else None, val_samples=2)
        recorder = KeyRecorder()
        # no sanity check: Lightning isolates its random draws, so the val loader's first iterator (whose draw of
        # a base seed from the global generator shifted training) must come mid-training, at step 2
        validation = {"limit_val_batches": 1, "val_check_interval": 2, "num_sanity_val_steps": 0} if validate else {}
        trainer = cpu_trainer(tmp_path, steps, callbacks=[recorder], enable_checkpointing=False,
                              plugins=[AtomicCheckpointIO()], **validation)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return recorder.keys, model.net.state_dict()

    straight, weights = fit(6)
    first, _ = fit(3, save=tmp_path / "step3.ckpt")
    resumed, resumed_weights = fit(6, ckpt_path=tmp_path / "step3.ckpt")
    assert len(straight) == 6 and first + resumed == straight
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    validated, validated_weights = fit(6, validate=True)
    assert validated == straight and all(torch.equal(weights[k], validated_weights[k]) for k in weights)


@pytest.mark.parametrize("stop", ["max_steps", "sigterm", "sigterm after a validation"])
def test_a_fit_stopped_at_an_epoch_s_last_step_resumes_at_the_next_epoch_s_first_clips(tmp_path, stop):
    """Epochs of 4 batches (2 workers, 2 each); the first run stops right after step 4, an epoch's last: at its
    max_steps, or by SIGTERM, with or without a validation at that step, and FinalCheckpoint writes last.ckpt
    after the epoch has ended. The resumed run trains on the clips, and to the weights, of a run that went on
    (Lightning alone resumed the next epoch with the finished one's batch count: it ended it one batch in, or
    none, and skipped the rest), and validates where that run did."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fada_lightning.callbacks import FinalCheckpoint
    from fada_lightning.checkpoints import AtomicCheckpointIO
    from fada_lightning.module import TeacherModule

    shards = make_shards(tmp_path, n_clips=8, clips_per_shard=2, frames=12, size=32)
    validate = stop == "sigterm after a validation"

    class Watch(KeyRecorder):
        def __init__(self, kill_at=None):
            super().__init__()
            self.kill_at, self.validated = kill_at, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.kill_at:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this step

        def on_validation_end(self, trainer, pl_module):
            self.validated.append(trainer.global_step)

    def fit(steps, name, ckpt_path=None, kill_at=None):
        torch.manual_seed(0)
        model = TeacherModule(preset=small_preset(), clip_frames=4, ema_decay=None)
        data = AvatarDataModule.for_model(model, train_shards=shards, batch_size=2, num_workers=2, epoch_samples=8,
                                          seed=3, val_shards=shards[:1], val_samples=2)
        watch = Watch(kill_at)
        saving = FinalCheckpoint(dirpath=tmp_path / name, save_last=True, every_n_train_steps=100)
        validation = dict(limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0) if validate else {}
        trainer = cpu_trainer(tmp_path, steps, callbacks=[watch, saving], plugins=[AtomicCheckpointIO()], **validation)
        try:
            trainer.fit(model, data, ckpt_path=ckpt_path)
        except SIGTERMException:
            assert kill_at
        return watch, model.net.state_dict()

    straight, weights = fit(6, "straight")
    first, _ = fit(4, "first") if stop == "max_steps" else fit(6, "first", kill_at=4)
    resumed, resumed_weights = fit(6, "resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert len(straight.keys) == 6 and first.keys + resumed.keys == straight.keys
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    assert first.validated + resumed.validated == straight.validated == ([2, 4, 6] if validate else [])
