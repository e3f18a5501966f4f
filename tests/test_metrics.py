"""Evaluation metrics: the Frechet distance against a slow reference and torchmetrics, SyncNet's scoring
and MFCC against their sources, the real extractors on random local weights, the synthetic world's net."""
import numpy as np
import pytest
import torch
from torch import nn

from datamodules.synthetic import SAMPLES_PER_FRAME, render_clip
from fada_lightning.metrics.extractors import InceptionFrames, R3DVideo, ScriptedFrameModel, load_state_dict
from fada_lightning.metrics.frechet import frechet_distance, frechet_from_features, gaussian_stats
from fada_lightning.metrics.sync import SyncNet, SyncNetScorer, mfcc, sync_distances, sync_scores


def slow_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook: covariances by loops over samples, tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) by eigh."""
    def stats(x):
        mu = x.mean(0)
        cov = sum(np.outer(r - mu, r - mu) for r in x) / (len(x) - 1)
        return mu, cov
    (m1, s1), (m2, s2) = stats(a), stats(b)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return torch.randn(n, d, generator=g) @ mix + shift


def test_frechet_matches_a_slow_reference():
    for n, d in ((50, 8), (30, 40)):  # also fewer samples than dimensions: singular covariances
        a, b = features(n, d, 0), features(n + 7, d, 1, shift=0.3)
        assert frechet_from_features(a, b) == pytest.approx(slow_frechet(a.double().numpy(), b.double().numpy()), rel=1e-6, abs=1e-8)


def test_frechet_matches_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(nn.Identity):  # torchmetrics' FID with a custom extractor: here the features themselves
        num_features = 16

    a, b = features(200, 16, 2), features(150, 16, 3, shift=0.5)
    fid = FrechetInceptionDistance(feature=Features())
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert frechet_from_features(a, b) == pytest.approx(float(fid.compute()), rel=1e-4)


def test_identical_features_give_zero_and_a_shift_gives_its_squared_length():
    a = features(100, 12, 4).double()
    assert abs(frechet_from_features(a, a.clone())) < 1e-8
    shift = torch.linspace(-1, 1, 12, dtype=torch.float64)
    assert frechet_from_features(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    mu, sigma = gaussian_stats(a)
    assert frechet_distance(mu, sigma, mu, 4 * sigma) > frechet_distance(mu, sigma, mu, 1.5 * sigma) > 0
    with pytest.raises(ValueError, match="width"):
        frechet_from_features(a, a[:, :5])


def test_sync_distances_match_syncnet_pythons_loop():
    g = torch.Generator().manual_seed(0)
    video, audio, vshift = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g), 4
    padded = torch.nn.functional.pad(audio, (0, 0, vshift, vshift))  # calc_pdist, written as it is there
    reference = torch.stack([torch.nn.functional.pairwise_distance(video[[i]].repeat(2 * vshift + 1, 1),
                                                                   padded[i:i + 2 * vshift + 1]) for i in range(12)])
    torch.testing.assert_close(sync_distances(video, audio, vshift), reference)


def test_sync_scores_find_the_offset_and_are_confident_only_when_in_sync():
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(40, 4, generator=g)
    in_sync = sync_scores(signal, signal, vshift=5)
    assert in_sync["offset"] == 0 and in_sync["sync_d"] < 1e-4 and in_sync["sync_c"] > 1
    late = sync_scores(signal[:-3], signal[3:], vshift=5)  # audio 3 frames early against the video
    unrelated = sync_scores(signal, torch.randn(40, 4, generator=g), vshift=5)
    assert late["offset"] == 3 and late["sync_d"] < unrelated["sync_d"] / 3  # (3 frames meet zero padding)
    assert unrelated["sync_d"] > 1 and unrelated["sync_c"] < in_sync["sync_c"]


def test_mfcc_equals_python_speech_features():
    import python_speech_features as psf  # a dev dependency: this test must run, not skip
    rng = np.random.default_rng(0)
    for length in (16000, 640 * 13, 300):
        wav = np.round(rng.standard_normal(length) * 3000).astype(np.int16)
        wav[: length // 4] = 0  # silent frames: the log floors
        ours = mfcc(torch.from_numpy(wav.astype(np.float64))).numpy()
        np.testing.assert_allclose(ours, psf.mfcc(wav, 16000), rtol=1e-6, atol=1e-6)


def test_syncnet_layers_are_syncnet_pythons_and_the_scorer_runs_on_local_weights(tmp_path):
    net = SyncNet()
    state = net.state_dict()
    expected = {"netcnnaud.0.weight": (64, 1, 3, 3), "netcnnaud.18.weight": (512, 256, 5, 4),
                "netcnnlip.0.weight": (96, 3, 5, 7, 7), "netcnnlip.18.weight": (512, 256, 1, 6, 6),
                "netfcaud.3.weight": (1024, 512), "netfclip.1.running_mean": (512,)}
    assert {k: tuple(state[k].shape) for k in expected} == expected
    torch.save(state, tmp_path / "syncnet_v2.model")
    scorer = SyncNetScorer(str(tmp_path / "syncnet_v2.model"), vshift=2)
    g = torch.Generator().manual_seed(0)
    video, wav = torch.rand(1, 8, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 8 * 640, generator=g) * 0.1
    lips, audio = scorer.embeddings(video[0], wav[0])
    assert lips.shape == audio.shape == (3, 1024)  # T - 5 windows, as syncnet_python's lastframe
    (scores,) = scorer(video, wav)
    assert set(scores) == {"sync_d", "sync_c", "offset"} and abs(scores["offset"]) <= 2


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_state_dict(tmp_path / "pickled_module.pt", "SyncNet")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        SyncNetScorer(str(tmp_path / "absent.model"))


def test_3d_resnet_features_from_local_weights(tmp_path):
    from torchvision.models.video import r3d_18

    torch.save(r3d_18(weights=None).state_dict(), tmp_path / "r3d_18.pth")
    extractor = R3DVideo(str(tmp_path / "r3d_18.pth"), size=32)
    video = torch.rand(2, 4, 3, 24, 24) * 2 - 1
    assert extractor(video).shape == (2, 512)


def test_inception_features_through_torchmetrics_from_a_local_file(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    with monkeypatch.context() as patch:  # random weights for the test: build once without loading any
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        random_net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    torch.save(random_net.state_dict(), tmp_path / "inception.pth")
    extractor = InceptionFrames(str(tmp_path / "inception.pth"))
    assert extractor(torch.rand(1, 2, 3, 32, 32) * 2 - 1).shape == (2, 2048)


def test_a_torchscript_model_plugs_in_as_expression_or_quality(tmp_path):
    class Brightness(nn.Module):
        def forward(self, frames):
            return frames.mean(dim=(1, 2, 3))

    torch.jit.script(Brightness()).save(str(tmp_path / "iqa.pt"))
    quality = ScriptedFrameModel(str(tmp_path / "iqa.pt"), size=16)
    video = torch.full((2, 3, 3, 32, 32), 0.5)
    torch.testing.assert_close(quality(video), torch.full((6,), 0.5))


@pytest.fixture(scope="module")
def world():
    from fada_lightning.metrics import synthetic

    return {role: getattr(synthetic, role)(seed=0, size=32) for role in
            ("WorldFrames", "WorldVideo", "WorldExpression", "WorldQuality", "WorldSync")}


def clips(count, frames=40, tier="strict", seed=2000):
    rendered = [render_clip(seed, tier, i, size=32, frames=frames) for i in range(count)]
    video = torch.stack([torch.from_numpy(v).permute(0, 3, 1, 2).float() / 127.5 - 1 for v, _, _ in rendered])
    return video, torch.stack([torch.from_numpy(w) for _, w, _ in rendered]), [m for _, _, m in rendered]


def test_world_net_reads_mouth_opening_from_pixels_on_held_out_clips(world):
    net = world["WorldSync"].net
    assert net.accuracy["mouth_open"]["r2"] > 0.9  # measured on its own held-out clips when it was trained
    video, _, metas = clips(4)
    predicted = world["WorldExpression"](video)[:, 0]
    truth = torch.tensor([m["mouth_open"] for m in metas]).flatten()
    assert (predicted - truth).abs().mean() < 0.08


def test_sync_d_of_a_clip_with_its_own_audio_is_lower_than_with_shifted_audio(world):
    video, wav, _ = clips(6)
    own = world["WorldSync"](video, wav)
    shifted = world["WorldSync"](video, wav.roll(10 * SAMPLES_PER_FRAME, dims=1))
    others = world["WorldSync"](video, wav.roll(1, dims=0))  # another clip's voice
    for own_clip, shifted_clip, other_clip in zip(own, shifted, others):
        assert own_clip["sync_d"] < shifted_clip["sync_d"] and own_clip["sync_d"] < other_clip["sync_d"]
    assert np.mean([c["sync_c"] for c in own]) > np.mean([c["sync_c"] for c in others])
    assert [c["offset"] for c in own] == [0] * 6


def test_world_quality_is_lower_for_blurred_or_noisy_clips(world):
    from datamodules.synthetic import gaussian_blur

    video, _, _ = clips(4)
    frames = (video.permute(0, 1, 3, 4, 2).numpy() + 1) / 2
    blurred = torch.from_numpy(gaussian_blur(frames.reshape(-1, 32, 32, 3), 1.0).reshape(frames.shape)).permute(0, 1, 4, 2, 3)
    noisy = video + 10 / 127.5 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    clean_q, blur_q, noise_q = (world["WorldQuality"](v).mean() for v in (video, blurred * 2 - 1, noisy.clamp(-1, 1)))
    assert clean_q > 0.85 and blur_q < clean_q - 0.15 and noise_q < clean_q - 0.15


def test_world_features_give_frechet_zero_on_the_same_clips_and_more_for_degraded_ones(world):
    video, _, _ = clips(8)
    noisy = (video + 12 / 127.5 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    for role in ("WorldFrames", "WorldVideo", "WorldExpression"):
        same = frechet_from_features(world[role](video), world[role](video))
        assert abs(same) < 1e-6
    assert frechet_from_features(world["WorldFrames"](video), world["WorldFrames"](noisy)) > 1e-2


def test_identity_distance_is_small_within_a_person_and_large_between_people():
    """Against a slow reference (a histogram by Python loops), and the scale its docstring states:
    a person's own frames near their first, another person's far."""
    from fada_lightning.metrics.synthetic import identity_distance

    clips = [render_clip(2001, "strict", i, size=32, frames=40)[0] for i in range(3)]
    reference = clips[0][0]

    def slow(frame):
        counts = {}
        for r, g, b in frame.reshape(-1, 3):
            key = (int(r) * 4 // 256, int(g) * 4 // 256, int(b) * 4 // 256)
            counts[key] = counts.get(key, 0) + 1
        ref = {}
        for r, g, b in reference.reshape(-1, 3):
            key = (int(r) * 4 // 256, int(g) * 4 // 256, int(b) * 4 // 256)
            ref[key] = ref.get(key, 0) + 1
        n = frame.shape[0] * frame.shape[1]
        return 0.5 * sum(abs(counts.get(k, 0) - ref.get(k, 0)) / n for k in {*counts, *ref})

    own, other = identity_distance(clips[0], reference), identity_distance(clips[1], reference)
    assert own[0] == 0 and np.allclose(own[[5, 30]], [slow(clips[0][5]), slow(clips[0][30])])
    assert np.isclose(other[3], slow(clips[1][3]))
    assert own.max() < 0.1 < 0.4 < other.min() and identity_distance(clips[2], reference).min() > 0.4
