"""`fada prepare`'s shot detector (against a slow per-pixel reference) and its filter config and tiers."""
import colorsys

import numpy as np
import pytest

from datamodules.prepare.shots import content_score, find_cuts, shot_ranges, to_hsv
from datamodules.prepare.tiers import SCORES, PrepareConfig, assign_tier, failed_bounds, load_config
from fada_lightning.presets import ConfigError


def slow_hsv(frame: np.ndarray) -> np.ndarray:
    """Per pixel with colorsys, scaled to OpenCV's 8-bit HSV (H in 0..179)."""
    out = np.empty(frame.shape, np.float64)
    for i, j in np.ndindex(frame.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(frame[i, j] / 255.0))
        out[i, j] = (h * 180) % 180, s * 255, v * 255
    return out


def test_content_score_matches_a_per_pixel_reference():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(2))
    slow = np.abs(slow_hsv(b) - slow_hsv(a))
    fast = content_score(to_hsv(a), to_hsv(b))
    assert fast == pytest.approx(slow.mean(), abs=1.0)  # OpenCV rounds each channel to 8 bits
    assert content_score(None, to_hsv(a)) == 0.0 and content_score(to_hsv(a), to_hsv(a)) == 0.0


def test_a_hard_cut_is_found_on_its_frame_and_shots_are_trimmed():
    rng = np.random.default_rng(1)
    first, second = (rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(2))
    frames = [first + np.uint8(t % 2) for t in range(40)] + [second] * 30  # small flicker, then a cut at 40
    hsv = [to_hsv(f) for f in frames]
    scores = np.array([content_score(p, h) for p, h in zip([None, *hsv[:-1]], hsv)])
    assert find_cuts(scores) == [40]
    assert shot_ranges([40], 70, trim=2) == [(0, 38), (42, 70)]
    assert shot_ranges([], 70, trim=2) == [(0, 70)]


def test_cuts_closer_than_the_minimum_shot_are_one_cut():
    scores = np.zeros(100)
    scores[[10, 20, 40]] = 50.0
    assert find_cuts(scores, threshold=27, min_shot=15) == [20, 40]  # 10 < 15 frames from the start
    assert shot_ranges([5], 10, trim=3) == [(0, 2), (8, 10)]
    assert shot_ranges([3], 10, trim=3) == [(6, 10)]  # a shot trimmed away is dropped


def test_bundled_configs_load_and_lenient_admits_every_strict_bound():
    for name in ("prepare/default.yaml", "prepare/synthetic.yaml"):
        config = load_config(name)
        for key, bound in config.strict.items():
            lenient = config.lenient.get(key)
            assert lenient is not None or bound is None or key.startswith("max_"), (name, key)
            if bound is not None and lenient is not None:
                assert (lenient <= bound) if key.startswith("min_") else (lenient >= bound), (name, key)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: prepare/default.yaml\nstrict: {min_face_sise: 3}\n")
    with pytest.raises(ConfigError, match="min_face_sise is not a bound"):
        load_config(bad)
    bad.write_text("base: prepare/default.yaml\nface_detector: haar\n")
    with pytest.raises(ConfigError, match="face_detector not a prepare setting"):
        load_config(bad)
    bad.write_text("base: prepare/default.yaml\nsyncnet: /nowhere/syncnet_v2.model\n")
    with pytest.raises(ConfigError, match="syncnet: /nowhere/syncnet_v2.model does not exist"):
        load_config(bad)
    with pytest.raises(ConfigError, match="iqa_model: /no/iqa.pt does not exist"):
        load_config("prepare/default.yaml", iqa_model="/no/iqa.pt")


def test_tiers_strict_inside_lenient_and_unscored_sync_never_strict():
    config = PrepareConfig(strict={"min_face_size": 256, "min_sync_confidence": 4, "max_sync_offset": 6},
                           lenient={"min_face_size": 150, "min_sync_confidence": 3, "max_sync_offset": 6},
                           proxy_sync={"strict": 0.5, "lenient": 0.3})
    good = {"face_size": 300, "sync_confidence": 5.0, "sync_offset": -2, "sync_source": "syncnet"}
    assert assign_tier(good, config)[0] == "strict"
    assert assign_tier({**good, "face_size": 200}, config)[0] == "lenient"
    assert assign_tier({**good, "sync_offset": 8}, config) == (None, {
        "strict": ["sync_offset 8 > 6"], "lenient": ["sync_offset 8 > 6"]})
    proxy = {**good, "sync_confidence": 0.6, "sync_source": "proxy"}
    tier, reasons = assign_tier(proxy, config)
    assert tier == "lenient" and "proxy" in reasons["strict"][-1]
    config.proxy_sync_in_strict = True
    assert assign_tier(proxy, config)[0] == "strict"
    assert assign_tier({**good, "sync_source": None}, config)[0] == "lenient"  # no sync score: never strict
    for strict, lenient in (({"min_face_size": 100}, {"min_face_size": 200}), ({"max_noise": 3}, {"max_noise": 2}),
                            ({}, {"max_noise": 2}), ({"max_noise": None}, {"max_noise": 2})):
        with pytest.raises(ConfigError, match="lenient must admit every clip strict admits, but its"):
            PrepareConfig(strict=strict, lenient=lenient)
    PrepareConfig(strict={"max_noise": 3}, lenient={"max_noise": None})  # no bound admits everything


def test_a_score_the_clip_lacks_leaves_its_bound_unchecked():
    assert failed_bounds({"sharpness": 10.0}, {"min_iqa": 50, "min_sharpness": 20}) == ["sharpness 10 < 20"]
    assert set(SCORES) >= {"face_size", "sync_confidence", "background_flow", "still"}


def test_prepare_writes_tars_byte_for_byte_as_webdataset_does():
    import io

    import webdataset as wds

    from datamodules.prepare.run import write_tar

    samples = [{"__key__": "clip_1a2b-000000", "mp4": b"\0" * 1500, "json": b"{}", "wav": b"RIFF"},
               {"__key__": "clip_1a2b-000250", "mp4": b"x", "json": b"{\"a\": 1}", "wav": b""}]
    reference, ours = io.BytesIO(), io.BytesIO()
    with wds.TarWriter(reference, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    write_tar(ours, samples)
    assert ours.getvalue() == reference.getvalue()


def test_inputs_are_found_recursively_in_order_and_a_shared_name_is_refused(tmp_path):
    from datamodules.prepare.run import find_inputs

    for name in ("b/clip.MP4", "a/talk one.mov", "a/notes.txt", "c/clip.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [relative for _, relative in find_inputs([str(tmp_path)])] == ["a/talk one.mov", "b/clip.MP4", "c/clip.mp4"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="both 'clip.mp4' under the inputs given"):  # their clips' keys would clash
        find_inputs([str(tmp_path / "c"), str(tmp_path / "d")])
    assert len(find_inputs([str(tmp_path / "c"), str(tmp_path / "c" / "clip.mp4")])) == 1  # the same file twice
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        find_inputs([str(tmp_path / "missing")])


def test_a_small_tier_is_spread_over_min_shards_and_packing_settings_redo_no_input():
    from datamodules.prepare.run import config_hash, shard_size

    assert [shard_size(n, 100, 16) for n in (0, 1, 32, 1600, 5000)] == [1, 1, 2, 100, 100]
    config = load_config("prepare/default.yaml")
    repacked = load_config("prepare/default.yaml", clips_per_shard=7, min_shards=3)
    assert config_hash(config) == config_hash(repacked) != config_hash(load_config("prepare/default.yaml", margin=2))


def test_without_syncnet_weights_the_default_config_warns_that_strict_stays_empty(tmp_path):
    from datamodules.prepare.run import prepare

    with pytest.warns(UserWarning, match="set A will be empty"), pytest.raises(FileNotFoundError):
        prepare([str(tmp_path / "none")], tmp_path / "out", load_config("prepare/default.yaml"), progress=False)
