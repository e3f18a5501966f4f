"""The contract every distiller keeps. A distiller's test inherits `DistillerContract` and says only
how to build it (`make_distiller`, cheap settings welcome); nothing here asks which distiller it runs.

    class TestMine(DistillerContract):
        def make_distiller(self):
            return Mine(solver_steps=2)
"""
from __future__ import annotations

import pytest
import torch

from fada_lightning import sample
from fada_lightning.distill import DistillModule

from conftest import cpu_trainer, random_batch, shard_data

TRAIN_STEPS = 2


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
        """(module, trainer, checkpoint path) after TRAIN_STEPS optimizer steps on the synthetic shards."""
        root = tmp_path_factory.mktemp(type(self).__name__)
        torch.manual_seed(0)
        model = DistillModule(teacher_ckpt, self.make_distiller(), lr=1e-3, warmup_steps=1, ema_decay=0.9,
                              **self.module_options)
        trainer = cpu_trainer(root, TRAIN_STEPS, enable_checkpointing=False)
        trainer.fit(model, shard_data(shards, batch_size=2))
        trainer.save_checkpoint(root / "student.ckpt")
        return model, trainer, root / "student.ckpt"

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

    def test_gradients_reach_the_student_only(self, module):
        self._backward(module, random_batch())
        others = {name: p for name, p in module.named_parameters() if not name.startswith("net.")}
        assert [name for name, p in others.items() if p.grad is not None] == []
        assert not any(p.requires_grad or p.grad is not None for p in module.teacher.parameters())
        # the teacher is not a submodule: no strategy wraps it with the student, no checkpoint holds it
        assert not any(name.startswith("teacher.") for name in module.state_dict())

    def test_training_leaves_the_teacher_unchanged(self, trained, teacher_ckpt):
        model, trainer, _ = trained
        saved = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
        for name, p in model.teacher.state_dict().items():
            assert torch.equal(p, saved[f"ema.module.{name}"]), name
        assert not model.teacher.training
        optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert optimised == {id(p) for p in model.net.parameters()}
        copied = {n: p for n, p in model.net.state_dict().items() if f"ema.module.{n}" in saved}  # not new parts
        moved = [n for n, p in copied.items() if not torch.equal(p, saved[f"ema.module.{n}"])]
        assert len(moved) > len(copied) // 2  # while the student did train

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
        frames = module.hparams.clip_frames
        batch = random_batch(b=1, f=frames)
        video, nfe = module.eval().generate(batch["ref"], batch["audio"], generator=torch.Generator().manual_seed(0))
        steps = module.hparams.sample_steps
        assert nfe == module.distiller.nfe() == steps * (3 if module.samples_with_cfg else 1)
        assert video.shape == (1, frames, 3, 32, 32) and torch.isfinite(video).all()
        scheduler = module.scheduler()
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == steps

    def test_a_checkpoint_round_trips(self, trained, teacher_ckpt, shards, tmp_path):
        model, _, path = trained
        saved = torch.load(path, weights_only=True)
        assert not any(k.startswith("teacher.") for k in saved["state_dict"])
        assert saved["hyper_parameters"]["distiller"] == model.distiller.spec()
        loaded = sample.load_module(path)  # for sampling: no teacher needed
        assert loaded.teacher is None and loaded.distiller.spec() == model.distiller.spec()
        own = model.state_dict()
        assert own.keys() == loaded.state_dict().keys()
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in own.items())
        assert dict(loaded.scheduler().config) == dict(model.scheduler().config) == saved["scheduler_config"]
        batch = random_batch(b=1, f=model.hparams.clip_frames)
        videos = [m.eval().generate(batch["ref"], batch["audio"], generator=torch.Generator().manual_seed(0))[0]
                  for m in (model, loaded)]
        assert torch.equal(*videos)
        resumed = DistillModule(teacher_ckpt, self.make_distiller(), ema_decay=0.9, **self.module_options)  # resumes
        trainer = cpu_trainer(tmp_path, TRAIN_STEPS + 1, enable_checkpointing=False)
        trainer.fit(resumed, shard_data(shards, batch_size=2), ckpt_path=str(path))
        assert trainer.global_step == TRAIN_STEPS + 1
