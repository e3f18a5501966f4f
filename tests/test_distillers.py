"""Every shipped distiller keeps the contract (fada_lightning/testing.py); RFlow is PeRFlow with K = 1."""
import pytest
import torch
import yaml

from distillers.mixed import Fixed, MixedPeRFlow
from distillers.perflow import PeRFlow
from distillers.rflow import RFlow
from distillers.tcd import TCD
from fada_lightning.diffusion import schedule as S
from fada_lightning.presets import bundled_config_dir, load_config
from fada_lightning.testing import DistillerContract

from conftest import WobblyNet, random_batch, random_latents


class TestPeRFlow(DistillerContract):
    def make_distiller(self):
        return PeRFlow(solver_steps=2)


class TestGuidedPeRFlow(DistillerContract):
    def make_distiller(self):
        return PeRFlow(solver_steps=1, mode="guided", num_windows=2, sample_steps=3)


class TestRFlow(DistillerContract):
    def make_distiller(self):
        return RFlow(solver_steps=3, sample_steps=4)


class TestTCD(DistillerContract):
    def make_distiller(self):
        return TCD(sample_steps=4)


class TestBalancedHuberTCD(DistillerContract):
    def make_distiller(self):
        return TCD(mode="balanced", distance="huber", gamma=0.5)


class TestMixedPeRFlow(DistillerContract):
    def make_distiller(self):
        return MixedPeRFlow(solver_steps=1, num_windows=2, sample_steps=2)


class TestLenientOnlyMixedPeRFlow(DistillerContract):
    def make_distiller(self):
        return MixedPeRFlow(Fixed(0.2), gt_tiers=["lenient"], solver_steps=1, num_windows=2, sample_steps=2)


class TestFADAFast(DistillerContract):
    """Mixed supervision + multi-CFG distillation into a student with CFG layers and tokens."""

    module_options = {"cfg_conditioning": "layer_tokens", "ref_scale": 2.0, "audio_scale": 6.5}

    def make_distiller(self):
        return MixedPeRFlow(mode="guided", ref_scale=(1.0, 3.0), audio_scale=(3.0, 9.0), solver_steps=1,
                            num_windows=2, sample_steps=6)

    def test_the_fast_student_samples_at_6_nfe_and_follows_the_scales(self, trained, tmp_path):
        model, _, path, _ = trained
        assert model.distiller.nfe() == 6 and not model.samples_with_cfg
        batch = random_batch(b=1, f=model.hparams.clip_frames)
        model.eval()
        runs = {scales: model.generate(batch["ref"], batch["audio"], None, *scales,
                                       generator=torch.Generator().manual_seed(0))
                for scales in [(2.0, 6.5), (1.0, 3.0), (None, None)]}
        assert [nfe for _, nfe in runs.values()] == [6, 6, 6]
        assert not torch.equal(runs[(2.0, 6.5)][0], runs[(1.0, 3.0)][0])  # the scales steer the one pass
        assert torch.equal(runs[(2.0, 6.5)][0], runs[(None, None)][0])  # the defaults are the module's 2.0 / 6.5


@pytest.mark.parametrize("mode", ["balanced", "guided"])
def test_rflow_is_perflow_with_one_window(mode):
    rflow, perflow = RFlow(solver_steps=4, mode=mode), PeRFlow(num_windows=1, solver_steps=4, mode=mode)
    for d in (rflow, perflow):
        d.bind(S.SD15_SCHEDULE, "v_prediction")
    z0, cond, eps = random_latents(b=4)
    t = torch.tensor([1.0, 0.7, 0.3, 0.001])
    jobs = [d.make_targets(WobblyNet(0.7), z0, cond, t, eps, torch.Generator().manual_seed(1))
            for d in (rflow, perflow)]
    for field in ("z", "timestep", "eps_target", "abar", "weight"):
        assert torch.equal(getattr(jobs[0], field), getattr(jobs[1], field)), field
    assert dict(rflow.scheduler().config) == dict(perflow.scheduler().config)
    scheduler = rflow.scheduler()
    scheduler.set_timesteps(6)
    assert scheduler.timesteps.tolist() == [999, 832, 666, 499, 332, 166]  # one window: even steps (T t - 1)
    assert "num_windows" not in rflow.spec()["init_args"] and rflow.spec()["class_path"] == "distillers.rflow.RFlow"


def test_each_method_config_is_an_override_of_the_shared_base():
    """distill_<method>.yaml names distill.yaml as its base and sets only its run folder and method (TCD also
    the EMA that is its target network; the FADA configs the tiers and the student's CFG conditioning), so
    checkpoint cadence, data and the teacher's path are one edit in distill.yaml."""
    allowed = {"base", "trainer.default_root_dir", "trainer.logger", "model.init_args.distiller",
               "model.init_args.lr", "model.init_args.warmup_steps",
               "model.init_args.ema_decay", "model.init_args.cfg_conditioning", "model.init_args.cfg_tokens",
               "model.init_args.ref_scale", "model.init_args.audio_scale", "data.init_args.tier_weights",
               "model.init_args.student_ckpt"}

    def keys(config, prefix=""):
        if not isinstance(config, dict) or f"{prefix}".rstrip(".") in allowed:
            return {prefix.rstrip(".")}
        return {k for key, value in config.items() for k in keys(value, f"{prefix}{key}.")}

    methods = sorted(bundled_config_dir().glob("distill_*.yaml"))
    assert [p.stem for p in methods] == ["distill_dmd", "distill_fada_fast", "distill_mixed", "distill_perflow",
                                         "distill_rflow", "distill_tcd", "distill_turbo"]
    for path in methods:
        config = yaml.safe_load(path.read_text())
        assert config["base"] == "distill.yaml" and keys(config) <= allowed, (path.name, keys(config) - allowed)
        whole = load_config(path.name)
        assert whole["trainer"]["logger"]["init_args"] == {"save_dir": f"runs/{path.stem[len('distill_'):]}",
                                                           "name": "tb", "version": "run"}
        assert whole["trainer"]["callbacks"] == load_config("distill.yaml")["trainer"]["callbacks"]
