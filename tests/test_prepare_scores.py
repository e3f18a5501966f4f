"""`fada prepare`'s per-clip scores (datamodules/prepare/scores.py): each measured on arrays whose answer is known,
the sync proxy on the synthetic world with audio shifted by a known number of frames."""
import cv2
import numpy as np
import pytest
import torch

from datamodules.prepare.scores import (audio_envelope, background_motion, flow_stats, head_motion, image_quality,
                                        load_iqa_model, mouth_opening, noise_level, sharpness,
                                        shift_correlations, speech_ratio, sync_proxy, syncnet_sync)
from datamodules.synthetic import (MAX_AV_SHIFT, SAMPLES_PER_FRAME, frame_rms, mouth_dark_pixels, render_clip,
                                   voiced_syllable)
from fada_lightning.metrics.sync import sync_scores

MOUTH_BOX = (0.32, 0.6, 0.68, 0.9)  # where synthetic.mouth_dark_pixels looks: every identity's mouth
FRAMES, PAD = 50, MAX_AV_SHIFT  # the shortest window prepare keeps (48 frames), with audio to shift into
SEEDS = range(10)


@pytest.fixture(scope="module")
def clips():
    return {seed: render_clip(seed, "strict", seed, size=64, frames=FRAMES + 2 * PAD) for seed in SEEDS}


def crop(clip, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A clean clip's FRAMES middle frames and its audio shifted so that audio frame t + shift carries the sound of
    video frame t (rendered PAD frames longer each side, so the shifted audio is still the clip's own speech)."""
    video, wav, _ = clip
    start = (PAD - shift) * SAMPLES_PER_FRAME
    return video[PAD:PAD + FRAMES], wav[start:start + FRAMES * SAMPLES_PER_FRAME]


def smooth_noise(shape, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """Texture-rich uint8 image: Gaussian-blurred uniform noise stretched to 0..255."""
    noise = cv2.GaussianBlur(np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32), (0, 0), sigma)
    return cv2.normalize(noise, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


# ---- sync ----------------------------------------------------------------------------------------------------
def test_shift_correlations_match_a_per_shift_corrcoef():
    rng = np.random.default_rng(0)
    seen, heard = rng.standard_normal(40), rng.standard_normal(40)
    fast = shift_correlations(seen, heard, max_shift=35, min_overlap=8)
    for k in range(-35, 36):  # the obviously right reference: corrcoef of seen[t], heard[t + k] where both exist
        t = np.arange(max(0, -k), min(40, 40 - k))
        expected = np.corrcoef(seen[t], heard[t + k])[0, 1] if len(t) >= 8 else np.nan
        np.testing.assert_allclose(fast[k + 35], expected, atol=1e-12)


@pytest.mark.parametrize("shift", [0, 3, -3, 8])
def test_sync_proxy_recovers_the_audio_shift(clips, shift):
    found = [sync_proxy(*crop(clips[seed], shift), MOUTH_BOX) for seed in SEEDS]
    estimates = np.array([f["av_offset"] for f in found])
    assert all(f["sync_source"] == "proxy" for f in found)
    assert np.all(np.abs(estimates - shift) <= 1), estimates
    assert np.sum(estimates == shift) >= 9, estimates  # measured: 10 of 10 at every shift


def test_sync_proxy_is_more_confident_with_the_clips_own_audio(clips):
    synced = np.array([sync_proxy(*crop(clips[seed], 0), MOUTH_BOX)["av_confidence"] for seed in SEEDS])
    unrelated = np.array([sync_proxy(crop(clips[seed], 0)[0], crop(clips[(seed + 1) % len(SEEDS)], 0)[1],
                                     MOUTH_BOX)["av_confidence"] for seed in SEEDS])
    # measured (Pearson units, 50 frames): synced 0.95-1.06, unrelated audio 0.22-0.75
    assert synced.min() > 0.8 and unrelated.max() < 0.8 and np.all(synced > unrelated), (synced, unrelated)


def test_sync_proxy_without_signal_scores_zero(clips):
    video, wav = crop(clips[0], 0)
    still = np.repeat(video[:1], FRAMES, axis=0)
    for crops, audio in ((still, wav), (video, np.zeros_like(wav)), (video[:5], wav)):
        assert sync_proxy(crops, audio, MOUTH_BOX) == {"av_offset": 0, "av_confidence": 0.0, "sync_source": "proxy"}


class OpeningSyncScorer(torch.nn.Module):
    """Stands in for SyncNetScorer (same call, same scoring): 5-frame windows of the mouth opening against 5-frame
    windows of the loudness, both z-scored, through metrics.sync.sync_scores. Records what it was given."""

    def forward(self, video, wav):
        self.video = video
        crops = ((video[0].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
        seen = mouth_opening(crops, MOUTH_BOX)
        heard = audio_envelope(wav[0].numpy(), len(crops))
        windows = [torch.from_numpy(((x - x.mean()) / x.std()).astype(np.float32)).unfold(0, 5, 1)
                   for x in (seen, heard)]
        return [sync_scores(*windows, vshift=15)]


@pytest.mark.parametrize("shift", [0, 3, -5])
def test_syncnet_sync_maps_syncnets_offset_to_our_sign(clips, shift):
    scorer = OpeningSyncScorer()
    video, wav = crop(clips[1], shift)
    result = syncnet_sync(scorer, video, wav)
    assert result["av_offset"] == shift and result["sync_source"] == "syncnet"
    assert result["av_confidence"] > 0 and result["av_distance"] >= 0
    assert scorer.video.shape == (1, FRAMES, 3, 64, 64) and -1 <= scorer.video.min() < scorer.video.max() <= 1


# ---- mouth, audio --------------------------------------------------------------------------------------------
def test_mouth_signals(clips):
    video, _ = crop(clips[0], 0)
    assert np.corrcoef(mouth_opening(video, MOUTH_BOX), mouth_dark_pixels(video))[0, 1] > 0.9  # measured 0.93


def test_audio_envelope_is_the_synthetic_worlds_frame_rms(clips):
    _, wav = crop(clips[2], 0)
    np.testing.assert_allclose(audio_envelope(wav, FRAMES), frame_rms(wav), rtol=1e-5, atol=1e-7)
    padded = audio_envelope(wav[:10 * SAMPLES_PER_FRAME], 12)  # audio shorter than the video: silence after it
    assert padded.shape == (12,) and np.all(padded[10:] == 0)


def test_speech_ratio():
    rng = np.random.default_rng(0)
    vowel = (0.1 * voiced_syllable(rng, 32000, 150.0)).astype(np.float32)  # 2 s of one continuous vowel
    hiss = (0.002 * rng.standard_normal(32000)).astype(np.float32)  # -54 dBFS, a quiet room
    assert speech_ratio(np.zeros(32000, np.float32)) == 0 and speech_ratio(hiss) == 0
    assert speech_ratio(vowel) > 0.9  # measured 0.98: only the attack and release frames fall under
    assert 0.4 < speech_ratio(np.concatenate([vowel[:16000], hiss[:16000]])) < 0.6


# ---- image ---------------------------------------------------------------------------------------------------
def test_sharpness_falls_under_blur_and_rises_with_noise(clips):
    crops = clips[0][0][:8]
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in crops])
    noisy = np.clip(crops + np.random.default_rng(0).normal(0, 8, crops.shape), 0, 255).astype(np.uint8)
    assert sharpness(blurred) < 0.1 * sharpness(crops) < 0.1 * sharpness(noisy) / 1.2  # measured 43, 2238, 2827
    flat = np.full((4, 64, 64, 3), 128, np.uint8)
    grain = np.random.default_rng(1).normal(0, 10, (4, 64, 64, 1))  # the same in every channel: gray noise std 10
    assert sharpness(flat) == 0  # white noise of std s: var(Laplacian) = 20 s^2 (its taps' squares sum to 20)
    assert sharpness(np.clip(128 + grain, 0, 255).round().astype(np.uint8).repeat(3, -1)) == pytest.approx(2000, rel=0.1)
    reference = np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in crops])
    assert sharpness(crops) == pytest.approx(reference)


class MeanQuality(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100 * x.mean(dim=(1, 2, 3))


def test_image_quality_with_a_torchscript_model(tmp_path):
    path = tmp_path / "iqa.pt"
    torch.jit.script(MeanQuality()).save(str(path))
    model = load_iqa_model(str(path))
    crops = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None, None] * 10, (20, 8, 8, 3))
    picks = np.linspace(0, 19, 8).round().astype(int)  # 8 evenly spaced frames; frame i is level 10 i
    assert image_quality(model, crops, batch=3) == pytest.approx(np.mean(100 * 10 * picks / 255), rel=1e-5)
    assert image_quality(model, crops[:2]) == pytest.approx(100 * 5 / 255, rel=1e-5)  # fewer frames than 8: all


def test_load_iqa_model_names_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "hyperiqa.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_iqa_model(str(missing))


# ---- motion --------------------------------------------------------------------------------------------------
def test_head_motion():
    still = np.tile([[10.0, 20.0, 60.0, 70.0]], (10, 1))
    assert head_motion(still) == {"head_motion": 0.0, "head_travel": 0.0, "head_scale": 0.0}
    moving = still + 2 * np.arange(10)[:, None] * np.array([1, 0, 1, 0])  # 2 px a frame to the right, side 50
    assert head_motion(moving) == pytest.approx({"head_motion": 2 / 50, "head_travel": 18 / 50, "head_scale": 0.0})
    growing = still + np.arange(10)[:, None] * np.array([-1, -1, 1, 1])  # side 50 -> 68 about a fixed centre
    assert head_motion(growing) == pytest.approx({"head_motion": 0.0, "head_travel": 0.0, "head_scale": 68 / 50 - 1})


def test_flow_stats_see_a_pan_outside_the_face():
    height, width, face = 144, 192, (80, 40, 112, 80)
    scene = smooth_noise((height + 40, width + 40))
    before, after = scene[20:20 + height, 20:20 + width], scene[20:20 + height, 17:17 + width].copy()
    after[40:80, 80:112] = smooth_noise((40, 32), seed=1)  # the face changes arbitrarily: masked out
    stats = flow_stats(before, after, face)
    assert stats.shape == (4,) and stats.dtype == np.float32
    motion = background_motion(np.stack([stats, stats, flow_stats(before, before, face)]))
    assert motion["camera_pan"] == pytest.approx(3, abs=0.1) and motion["background_flow"] == pytest.approx(3, abs=0.1)
    assert motion["camera_zoom"] < 0.005  # measured 6e-6
    np.testing.assert_allclose(flow_stats(before, before, None), 0, atol=1e-3)


def test_flow_stats_tell_a_zoom_from_a_pan():
    height, width = 144, 192
    frame = smooth_noise((height, width))
    big = cv2.resize(frame, None, fx=1.05, fy=1.05, interpolation=cv2.INTER_LINEAR)
    top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    zoomed = big[top:top + height, left:left + width]
    scene = smooth_noise((height, width + 10))
    pan = flow_stats(scene[:, 5:5 + width], scene[:, 2:2 + width], None)
    zoom = flow_stats(frame, zoomed, None)
    assert zoom[3] == pytest.approx(0.05, abs=0.01) and abs(pan[3]) < 0.005  # relative scale change a frame


def test_background_motion_without_background():
    assert np.isnan(flow_stats(smooth_noise((64, 64)), smooth_noise((64, 64)), (0, 0, 64, 64))).all()
    rows = np.array([[np.nan] * 4, [1.0, 0.6, 0.8, -0.02], [np.nan] * 4])
    assert background_motion(rows) == pytest.approx({"background_flow": 1.0, "camera_pan": 1.0, "camera_zoom": 0.02})
    assert all(np.isnan(v) for v in background_motion(np.full((2, 4), np.nan)).values())


def test_noise_level_reads_gray_noise_std_and_ignores_sharp_detail():
    rng = np.random.default_rng(3)
    edges = np.zeros((4, 96, 96), np.float32)
    edges[:, :, 48:] = 200  # a hard edge: large Laplacian variance, no noise
    for std in (0.0, 3.0, 8.0):
        gray = np.clip(edges + 20 + rng.normal(0, std, edges.shape), 0, 255).astype(np.uint8)
        crops = np.repeat(gray[..., None], 3, axis=-1)
        assert noise_level(crops) == pytest.approx(std, abs=0.2 + 0.1 * std)
