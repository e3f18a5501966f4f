"""The contract every distiller keeps, as a pytest class to inherit (needs pytest, the dev extra).

A distiller's test says only how to build it (cheap settings welcome); nothing here asks which
distiller it runs:

    from fada_lightning.testing import DistillerContract, shards, teacher_ckpt  # noqa: F401 (fixtures)

    class TestMine(DistillerContract):
        def make_distiller(self):
            return Mine(solver_steps=2)

`teacher_ckpt` and `shards` are fixtures: a random tiny teacher checkpoint and synthetic shards,
made in pytest's temporary folder (a project may define its own of the same names, as
fada-lightning's tests/conftest.py does with a trained teacher). The checks: a finite,
differentiable loss; gradients reach, at each optimizer step, only the network it updates; the
teacher and every network a step does not update stay bit-identical; the update counts follow
`Distiller.updates`; the teacher is unchanged by training; a step is deterministic given the seed;
the sampler makes the declared NFE (counted by a forward hook); every timestep the sampler uses is
one that training visits; the student exports (`fada export`) to a pipeline that samples as `fada sample`
does; a checkpoint round-trips, resumes with every optimizer's state, and
loads for sampling without the distiller's own networks.
"""
from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.streaming import AvatarDataModule
from datamodules.synthetic import write_shards

from . import sample
from .distill import DistillModule
from .module import TeacherModule
from .presets import load_preset

TRAIN_STEPS = 3


# ---- helpers: tiny models, data and trainers ---------------------------------------------------
def small_preset() -> dict:
    """`micro` with a narrower UNet: the same code paths, a few times faster."""
    preset = load_preset("micro")
    preset["net"]["unet"]["block_out_channels"] = [32, 32, 64]
    preset["name"] = "micro-narrow"
    return preset


def make_shards(root, n_clips: int, clips_per_shard: int, frames: int = 20, size: int = 32) -> list[str]:
    """Synthetic strict shards (datamodules.synthetic, seed 0) under root/synthetic -> sorted shard paths."""
    root = Path(root) / "synthetic"
    manifest = write_shards(root, strict_clips=n_clips, lenient_clips=0, clips_per_shard=clips_per_shard,
                            size=size, frames=frames, seed=0, progress=False, processes=1)
    return [str(root / p) for p in manifest["strict"]]


def random_teacher_checkpoint(path, clip_frames: int = 4) -> str:
    """A teacher checkpoint of random `small_preset` weights, as `fada fit` writes one."""
    torch.manual_seed(0)
    teacher = TeacherModule(preset=small_preset(), ema_decay=None, clip_frames=clip_frames)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams), "global_step": 0,
                "pytorch-lightning_version": L.__version__,
                "fada_role": teacher.checkpoint_role, "fada_module": "fada_lightning.module.TeacherModule"}, path)
    return str(path)


def cpu_trainer(root, steps: int, **kwargs) -> L.Trainer:
    """A quiet CPU trainer for `steps` steps; no validation unless `kwargs` asks for it."""
    kwargs = {"limit_val_batches": 0, **kwargs}
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), **kwargs)


def shard_data(shards: list[str], model, batch_size: int = 4) -> AvatarDataModule:
    """The shards as training and validation data cut for `model` (its clip shape and audio features)."""
    return AvatarDataModule.for_model(model, train_shards=shards, val_shards=shards[:1], batch_size=batch_size,
                                      num_workers=2, epoch_samples=64, val_samples=4)


def random_batch(b: int = 2, f: int = 4, m: int = 2, size: int = 32, seed: int = 0) -> dict:
    """A batch as the data module makes it, of random pixels and audio features (micro's shapes)."""
    g = torch.Generator().manual_seed(seed)
    return dict(frames=torch.rand(b, f, 3, size, size, generator=g) * 2 - 1,
                motion=torch.rand(b, m, 3, size, size, generator=g) * 2 - 1,
                ref=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
                audio=torch.randn(b, f, 5, 1, 128, generator=g), tier=[("strict", "lenient")[i % 2] for i in range(b)],
                key=[f"random-{seed}-{i:03d}" for i in range(b)], start=torch.zeros(b, dtype=torch.long))


def random_face_and_speech(frames: int, size: int = 32, seed: int = 0) -> tuple:
    """A (size, size, 3) uint8 face of noise and `frames` video frames' worth of noise as 16 kHz speech."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            (0.1 * rng.standard_normal(frames * 640)).astype(np.float32))


def exported_pipeline(ckpt, folder):
    """`fada export` of ckpt into `folder`, loaded back as FadaAvatarPipeline (progress bars off)."""
    from .export import export
    from .pipeline import FadaAvatarPipeline

    pipe = FadaAvatarPipeline.from_pretrained(export(ckpt, folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_pipeline_samples_as_fada_sample(pipe, ckpt, frames: int) -> None:
    """The exported pipeline makes the frames `fada sample` makes from the checkpoint (same face, speech
    and seed), at the same NFE, through every part's save and load (weights, sampler, settings)."""
    image, audio = random_face_and_speech(frames)
    expected, nfe = sample.sample_video(sample.load_module(ckpt).eval(), image, audio, progress=False)
    out = pipe(image, audio, generator=torch.Generator().manual_seed(0))
    assert out.nfe == nfe and out.frames.shape == expected.shape == (frames, 32, 32, 3)
    assert np.abs(out.frames.astype(int) - expected).max() <= 1  # float tolerance, in uint8 levels


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("distill"), n_clips=8, clips_per_shard=4, frames=16, size=32)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> str:
    return random_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


class CallCounter:
    """Rows of the batches `net` runs forward inside the `with` block (a forward hook): network
    evaluations per clip when divided by the batch size."""

    def __init__(self, net: torch.nn.Module):
        self.net, self.rows, self.handle = net, 0, None

    def __enter__(self) -> "CallCounter":
        self.handle = self.net.register_forward_hook(lambda net, args, out: setattr(self, "rows", self.rows + len(args[0])))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class UpdateWatch(L.Callback):
    """Per training step: {step, due (Distiller.updates), stepped: [(optimizer's network, networks holding
    gradients then)], changed: networks whose weights moved, teacher_same: bit-identical teacher}."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {name: _snapshot(net) for name, (net, _) in module.trained_networks().items()}
        self.teacher = _snapshot(module.teacher)
        self.stepped = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        trained = module.trained_networks()
        owner = next(name for name, opt in zip(trained, trainer.optimizers) if opt is optimizer)
        holding = [name for name, (net, _) in trained.items() if any(p.grad is not None for p in net.parameters())]
        self.stepped.append((owner, holding))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        changed = [name for name, (net, _) in module.trained_networks().items()
                   if not _same(self.before[name], _snapshot(net))]
        self.steps.append(dict(step=trainer.global_step - 1, due=module.distiller.updates(trainer.global_step - 1),
                               stepped=self.stepped, changed=changed,
                               teacher_same=_same(self.teacher, _snapshot(module.teacher))))


class DistillerContract:
    module_options: dict = {}  # more DistillModule arguments (a student's cfg_conditioning)

    def make_distiller(self):
        raise NotImplementedError

    # ---- fixtures: a module with its teacher, and one trained for a few steps ------------------
    @pytest.fixture
    def module(self, teacher_ckpt) -> DistillModule:
        torch.manual_seed(0)
        model = DistillModule(teacher_ckpt, self.make_distiller(), ema_decay=0.9, **self.module_options)
        model.load_teacher()
        return model

    @pytest.fixture(scope="class")
    def trained(self, teacher_ckpt, shards, tmp_path_factory):
        """(module, trainer, checkpoint path, UpdateWatch) after TRAIN_STEPS steps on the synthetic shards."""
        root = tmp_path_factory.mktemp(type(self).__name__)
        torch.manual_seed(0)
        model = DistillModule(teacher_ckpt, self.make_distiller(), lr=1e-3, warmup_steps=1, ema_decay=0.9,
                              **self.module_options)
        watch = UpdateWatch()
        trainer = cpu_trainer(root, TRAIN_STEPS, enable_checkpointing=False, callbacks=[watch])
        trainer.fit(model, shard_data(shards, model, batch_size=2))
        trainer.save_checkpoint(root / "student.ckpt")
        return model, trainer, root / "student.ckpt", watch

    @staticmethod
    def _backward(module, batch, generator=None):
        module.zero_grad(set_to_none=True)
        loss, logs = module.distillation_loss(batch, generator)
        loss.backward()
        return loss, logs

    # ---- the contract --------------------------------------------------------------------------
    def test_loss_is_finite_and_differentiable(self, module):
        loss, logs = self._backward(module, random_batch())
        assert loss.ndim == 0 and torch.isfinite(loss), loss
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values()), logs
        grads = [p.grad for p in module.net.parameters()]
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2

    def test_the_teacher_is_frozen_and_kept_out_of_the_module(self, module):
        self._backward(module, random_batch())
        assert not any(p.requires_grad or p.grad is not None for p in module.teacher.parameters())
        # the teacher is not a submodule: no strategy wraps it with the student, no checkpoint holds it
        assert not any(name.startswith("teacher.") for name in module.state_dict())
        trained = {id(p) for net, _ in module.trained_networks().values() for p in net.parameters()}
        assert [n for n, p in module.named_parameters() if p.grad is not None and id(p) not in trained] == []

    def test_each_step_updates_exactly_the_networks_due(self, trained):
        """At each optimizer step only its own network holds gradients; the networks a step does not
        update and the teacher stay bit-identical; the updates follow Distiller.updates."""
        model, _, _, watch = trained
        assert [s["step"] for s in watch.steps] == list(range(TRAIN_STEPS))
        for s in watch.steps:
            assert [owner for owner, _ in s["stepped"]] == s["due"], s
            assert all(holding in ([], [owner]) for owner, holding in s["stepped"]), s
            assert s["changed"] == s["due"] and s["teacher_same"], s
        counts = {name: sum(name in s["due"] for s in watch.steps) for name in model.trained_networks()}
        assert counts == {name: sum(name in model.distiller.updates(k) for k in range(TRAIN_STEPS))
                          for name in model.trained_networks()}
        assert all(counts.values())  # every trained network did train

    def test_training_leaves_the_teacher_unchanged(self, trained, teacher_ckpt):
        model, trainer, _, _ = trained
        saved = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in saved) else "net."
        for name, p in model.teacher.state_dict().items():
            assert torch.equal(p, saved[f"{prefix}{name}"]), name
        assert not model.teacher.training
        optimised = [{id(p) for group in opt.param_groups for p in group["params"]} for opt in trainer.optimizers]
        assert optimised == [{id(p) for p in net.parameters()} for net, _ in model.trained_networks().values()]

    def test_a_step_is_deterministic_given_the_seed(self, module):
        batch = random_batch()
        runs = []
        for seed in (3, 3, 4):
            loss, _ = self._backward(module, batch, torch.Generator().manual_seed(seed))
            runs.append((loss.detach(), [p.grad.clone() for p in module.net.parameters() if p.grad is not None]))
        (loss_a, grads_a), (loss_b, grads_b), (loss_c, _) = runs
        assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
        assert not torch.equal(loss_a, loss_c)  # the seed is what fixes t, noise and dropout
        losses = []
        for _ in range(2):  # the training path draws from the global generator
            torch.manual_seed(7)
            losses.append(module.distillation_loss(batch)[0].detach())
        assert torch.equal(*losses)

    def test_the_sampler_makes_the_declared_nfe(self, module):
        """Network evaluations counted by a forward hook, per clip window, equal the declared NFE."""
        frames = module.hparams.clip_frames
        batch = random_batch(b=1, f=frames)
        with CallCounter(module.sampling_net) as calls:
            video, nfe = module.eval().generate(batch["ref"], batch["audio"], generator=torch.Generator().manual_seed(0))
        assert calls.rows == nfe == module.distiller.nfe()
        assert video.shape == (1, frames, 3, 32, 32) and torch.isfinite(video).all()

    def test_the_sampler_steps_only_at_timesteps_training_visits(self, module):
        """Every timestep of the student's scheduler is one that `make_targets` hands the student for some t
        that `sample_time` draws in practice (t's support found by 65536 draws; each distinct t then run once)."""
        g = torch.Generator().manual_seed(0)
        support = torch.unique(torch.cat([module.distiller.sample_time(4096, "cpu", g) for _ in range(16)]))
        assert len(support) <= 4096, "sample_time's t should lie on a grid (the 1/T grid, or a coarser one)"
        z0, cond = module.encode_batch(random_batch(b=1, f=1))
        trained = set()
        with torch.no_grad():
            for t in support.split(256):
                n = len(t)
                many = cond.map(lambda x, n=n: x.repeat(n, *[1] * (x.ndim - 1)))
                z = z0.repeat(n, *[1] * (z0.ndim - 1))
                job = module.distiller.make_targets(module.teacher, z, many, t, torch.randn(z.shape, generator=g), g,
                                                    ["strict"] * len(t))
                trained.update(torch.round(job.timestep.double(), decimals=3).tolist())
        scheduler = module.scheduler()
        scheduler.set_timesteps(module.hparams.sample_steps)
        assert len(scheduler.timesteps) == module.hparams.sample_steps
        sampled = [round(float(tau), 3) for tau in scheduler.timesteps]
        assert [tau for tau in sampled if tau not in trained] == [], sorted(trained)[-10:]

    def test_the_student_exports_and_samples_as_fada_sample_does(self, trained, tmp_path):
        """`fada export` -> FadaAvatarPipeline.from_pretrained, with no training code, samples as `fada sample`
        does over two clip windows (motion frames carried); a one-pass student refuses guidance scales."""
        pipe = exported_pipeline(trained[2], tmp_path / "exported")
        assert_pipeline_samples_as_fada_sample(pipe, trained[2], frames=trained[0].hparams.clip_frames + 2)
        if pipe.config.ref_guidance_scale is None:
            with pytest.raises(ValueError, match="one pass"):
                pipe(*random_face_and_speech(2), ref_guidance_scale=2.0)

    def test_a_checkpoint_round_trips_and_resumes(self, trained, teacher_ckpt, shards, tmp_path):
        model, trainer, path, _ = trained
        saved = torch.load(path, weights_only=True)
        assert not any(k.startswith("teacher.") for k in saved["state_dict"])
        assert saved["hyper_parameters"]["distiller"] == model.distiller.spec()
        own = model.state_dict()
        assert own.keys() == saved["state_dict"].keys()  # the distiller's own networks included
        loaded = sample.load_module(path)  # for sampling: no teacher, none of the distiller's networks
        assert loaded.teacher is None and loaded.distiller.spec() == model.distiller.spec()
        assert len(loaded.distiller.networks) == 0
        assert loaded.state_dict().keys() == {k for k in own if not k.startswith("distiller.networks.")}
        assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
        assert dict(loaded.scheduler().config) == dict(model.scheduler().config) == saved["scheduler_config"]
        batch = random_batch(b=1, f=model.hparams.clip_frames)
        videos = [m.eval().generate(batch["ref"], batch["audio"], generator=torch.Generator().manual_seed(0))[0]
                  for m in (model, loaded)]
        assert torch.equal(*videos)

        restored = {}

        class Restored(L.Callback):  # every optimizer's state and the weights, as resuming found them
            def on_train_start(self, trainer, module):
                restored["optimizers"] = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
                restored["state"] = _snapshot(module)

        resumed = DistillModule(teacher_ckpt, self.make_distiller(), ema_decay=0.9, **self.module_options)
        again = cpu_trainer(tmp_path, TRAIN_STEPS + 1, enable_checkpointing=False, callbacks=[Restored()])
        again.fit(resumed, shard_data(shards, resumed, batch_size=2), ckpt_path=str(path))
        assert again.global_step == TRAIN_STEPS + 1
        assert _same(restored["state"], {k: v for k, v in saved["state_dict"].items()})
        assert len(restored["optimizers"]) == len(saved["optimizer_states"]) == len(model.trained_networks())
        for mine, theirs in zip(restored["optimizers"], saved["optimizer_states"]):
            assert mine["state"].keys() == theirs["state"].keys()
            for k in theirs["state"]:
                for n, v in theirs["state"][k].items():
                    assert torch.equal(torch.as_tensor(mine["state"][k][n]), torch.as_tensor(v)), (k, n)
