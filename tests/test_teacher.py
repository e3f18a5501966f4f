"""The teacher LightningModule: Eq 1 training on the synthetic world, sampling, NFE, checkpoints."""
import lightning as L
import pytest
import torch

from datamodules.streaming import AvatarDataModule
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.sampling import generate_clips
from fada_lightning.module import TeacherModule

from conftest import make_shards, small_preset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("teacher"), n_clips=8, clips_per_shard=4, frames=16, size=32)


def _batch(module, b=2, f=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, s = module.preset["net"]["audio"], module.preset["frame_size"]
    return dict(frames=torch.rand(b, f, 3, s, s, generator=g) * 2 - 1,
                motion=torch.rand(b, m, 3, s, s, generator=g) * 2 - 1,
                ref=torch.rand(b, 3, s, s, generator=g) * 2 - 1,
                audio=torch.randn(b, f, a["window"], a["layers"], a["dim"], generator=g))


@pytest.mark.parametrize("kind", S.PREDICTION_TYPES)
def test_loss_targets_are_eq1_in_the_networks_own_space(kind):
    """A network that outputs the exact target has zero loss; in v space that target is v."""
    module = TeacherModule(preset=small_preset(), prediction_type=kind, ema_decay=None, clip_frames=4)
    z0, eps = torch.randn(2, 4, 12, 16, 16), torch.randn(2, 4, 12, 16, 16)
    n = torch.tensor([100, 800])
    abar = module.abar(n, z0)
    expected = eps if kind == "epsilon" else S.v_target(z0, eps, abar)
    oracle = lambda z, t, c: expected  # noqa: E731
    assert module.diffusion_loss(oracle, z0, None, n, eps).abs().max() < 1e-5
    assert module.diffusion_loss(lambda z, t, c: expected + 1, z0, None, n, eps).min() > 0


def test_teacher_loss_falls_on_the_synthetic_world(shards):
    torch.manual_seed(0)
    model = TeacherModule(preset=small_preset(), ema_decay=None, clip_frames=4, lr=2e-3, warmup_steps=5)
    dm = AvatarDataModule.for_model(model, train_shards=shards, val_shards=shards[:1], batch_size=4, num_workers=2,
                                    epoch_samples=160, val_samples=4)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    dm.trainer = trainer
    dm.setup("fit")
    fixed = next(iter(dm.val_dataloader()))

    def held_loss():  # fixed clips, t and noise: comparable before and after
        with torch.no_grad():
            z0, cond = model.encode_batch(fixed)
            g = torch.Generator().manual_seed(0)
            n = torch.linspace(100, 900, z0.shape[0]).long()
            return model.diffusion_loss(model.net, z0, cond, n, torch.randn(z0.shape, generator=g)).mean().item()

    before = held_loss()
    trainer.fit(model, dm)
    after = held_loss()
    assert after < 0.85 * before, (before, after)


def test_teacher_sample_costs_75_nfe_per_window_and_carries_motion():
    torch.manual_seed(0)
    module = TeacherModule(preset=small_preset(), ema_decay=None, clip_frames=4, motion_frames=2).eval()
    batch = _batch(module, b=1, f=10)  # 10 frames: windows of 4, 4 and 2 (+2 padded)
    seen = []
    forward = module.net.forward

    def spy(sample, t, cond, reference=None):
        seen.append(cond.motion[:1].clone())
        return forward(sample, t, cond, reference)

    module.net.forward = spy
    video, nfe = module.generate(batch["ref"], batch["audio"], steps=25)
    assert nfe == 75  # 25 DDIM steps x 3 CFG passes, per clip window
    assert video.shape == (1, 10, 3, 32, 32) and video.abs().max() <= 1
    assert len(seen) == 3 * 25
    ref_latent = module.codec.encode(batch["ref"])
    torch.testing.assert_close(seen[0], ref_latent[:, None].expand(-1, 2, -1, -1, -1))  # clip 1 starts from r
    # clip 2's motion frames are clip 1's last two frames, as latents (same seed: same samples)
    seen.clear()
    latents, _ = generate_clips(module.net, module.scheduler(), ref_latent, batch["audio"], 4, 2, 25)
    torch.testing.assert_close(seen[25], latents[:, 2:4])
    torch.testing.assert_close(seen[50], latents[:, 6:8])


def test_ema_tracks_the_net_and_samples():
    module = TeacherModule(preset=small_preset(), ema_decay=0.9, clip_frames=4)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)  # first update copies
    module.on_train_batch_end(None, None, 1)
    ema_p, p = next(module.ema.module.parameters()), next(module.net.parameters())
    torch.testing.assert_close(ema_p, p)
    assert module.sampling_net is module.ema.module


def test_checkpoint_of_another_preset_is_a_clear_error(tmp_path):
    narrow = TeacherModule(preset=small_preset(), ema_decay=None)
    checkpoint = {"hyper_parameters": dict(narrow.hparams)}
    micro = TeacherModule(preset="micro", ema_decay=None)
    with pytest.raises(ValueError, match="micro-narrow.*micro"):
        micro.on_load_checkpoint(checkpoint)


def test_audio_features_that_do_not_fit_the_net_fail_at_construction():
    preset = small_preset()
    preset["net"]["audio"]["dim"] = 64
    with pytest.raises(ValueError, match=r"audio_features give \(L, D\) = \(1, 128\).*expects \(1, 64\)"):
        TeacherModule(preset=preset)


def test_skipped_samples_are_summed_over_workers_and_logged():
    module = TeacherModule(preset=small_preset(), ema_decay=None)
    logged = []
    module.log = lambda name, value, **kw: logged.append((name, value))
    module.log_data_health({"worker": torch.tensor([0, 1, 0]), "skipped": torch.tensor([2, 1, 3])})
    module.log_data_health({"worker": torch.tensor([1]), "skipped": torch.tensor([4])})
    assert logged == [("data/skipped_samples", 4.0), ("data/skipped_samples", 7.0)]  # cumulative per worker


def test_codec_that_does_not_fit_the_net_fails_at_construction():
    preset = small_preset()
    preset["codec"]["init_args"]["factor"] = 4  # 48 latent channels into a 12-channel UNet
    with pytest.raises(ValueError, match="codec makes 48 latent channels, net.unet.in_channels is 12"):
        TeacherModule(preset=preset)
