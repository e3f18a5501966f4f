"""DistillModule + PeRFlow: the frozen teacher, the student, targets against slow references, NFE, checkpoints."""
import inspect
import shutil
import sys
import textwrap
import types

import pytest
import torch
from lightning.pytorch.cli import instantiate_class

from distillers.base import Distiller
from distillers.perflow import PeRFlow
from fada_lightning import sample
from fada_lightning.diffusion import PeRFlowScheduler
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.distill import DistillModule
from fada_lightning.models.denoiser import AvatarDenoiser
from fada_lightning.presets import ConfigError

from conftest import ExactNet, cpu_trainer, random_batch, shard_data, small_preset


def _bound(distiller, prediction_type="v_prediction"):
    distiller.bind(S.SD15_SCHEDULE, prediction_type)
    return distiller


@pytest.mark.parametrize("mode", ["balanced", "guided"])
@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_an_exact_teacher_gives_target_eps(mode, prediction_type):
    """Every DDIM step of an exact teacher keeps eps, so z_e is on the forward process and the target is eps."""
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 12, 4, 4, generator=g), torch.randn(6, 4, 12, 4, 4, generator=g)
    cond = Conditions(ref=torch.randn(6, 12, 4, 4), motion=torch.randn(6, 2, 12, 4, 4), audio=torch.randn(6, 4, 5, 1, 8))
    distiller = _bound(PeRFlow(mode=mode, solver_steps=3), prediction_type)
    t = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.26, 0.001])
    job = distiller.make_targets(ExactNet(z0, prediction_type), z0, cond, t, eps)
    torch.testing.assert_close(job.eps_target, eps, rtol=0, atol=2e-4)
    assert job.timestep.tolist() == pytest.approx([999, 899, 749, 499, 259, 0])  # T t - 1: DDPM index units


def _slow_target(teacher, distiller, z0, cond, t, eps):
    """Sample by sample, in float64 Python scalars for the schedule, each CFG pass its own call."""
    abar = S.alphas_cumprod()
    targets, inputs = [], []
    for i in range(len(t)):
        k = 4
        t_i = float(t[i])
        t_s = next(s for s in (1.0, 0.75, 0.5, 0.25) if s - 1 / k < t_i - 1e-9 <= s)
        t_e = t_s - 1 / k
        idx = lambda x: max(round(x * 1000) - 1, 0)  # noqa: E731
        a_s, a_e = float(abar[idx(t_s)]), float(abar[idx(t_e)])
        z = a_s ** 0.5 * z0[i:i + 1] + (1 - a_s) ** 0.5 * eps[i:i + 1]
        z_s = z
        c = cond.map(lambda x, i=i: x[i:i + 1])
        times = [t_s + (t_e - t_s) * j / distiller.solver_steps for j in range(distiller.solver_steps + 1)]
        for a, b in zip(times[:-1], times[1:]):
            n, a_n, a_b = idx(a), float(abar[idx(a)]), float(abar[idx(b)])
            nt = torch.tensor([n])
            if distiller.mode == "balanced":
                v = teacher(z, nt, c)
            else:
                no_audio = Conditions(ref=c.ref, motion=c.motion, audio=torch.zeros_like(c.audio))
                nothing = Conditions(ref=torch.zeros_like(c.ref), motion=c.motion, audio=no_audio.audio)
                v0, vr, va = teacher(z, nt, nothing), teacher(z, nt, no_audio), teacher(z, nt, c)
                v = v0 + distiller.ref_scale * (vr - v0) + distiller.audio_scale * (va - vr)
            e = (1 - a_n) ** 0.5 * z + a_n ** 0.5 * v  # v -> eps
            x0 = (z - (1 - a_n) ** 0.5 * e) / a_n ** 0.5
            z = a_b ** 0.5 * x0 + (1 - a_b) ** 0.5 * e
        lam = (a_e / a_s) ** 0.5
        eta = (1 - a_e) ** 0.5 - (a_e * (1 - a_s) / a_s) ** 0.5
        targets.append((z - lam * z_s) / eta)
        inputs.append(z_s + (t_i - t_s) / (t_e - t_s) * (z - z_s))
    return torch.cat(inputs), torch.cat(targets)


@pytest.mark.parametrize("mode", ["balanced", "guided"])
def test_vectorised_target_matches_a_slow_per_sample_reference(mode):
    torch.manual_seed(0)
    teacher = AvatarDenoiser(**small_preset()["net"]).eval()
    for layer in teacher.modules():  # make the zero-initialised temporal layers do something
        if hasattr(layer, "temporal"):
            torch.nn.init.normal_(layer.temporal.attn.to_out[0].weight, std=0.05)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 12, 16, 16, generator=g), torch.randn(3, 4, 12, 16, 16, generator=g)
    cond = Conditions(ref=torch.randn(3, 12, 16, 16, generator=g), motion=torch.randn(3, 2, 12, 16, 16, generator=g),
                      audio=torch.randn(3, 4, 5, 1, 128, generator=g))
    distiller = _bound(PeRFlow(mode=mode, solver_steps=2, p_drop_audio=0, p_drop_ref_audio=0, p_drop_motion=0))
    t = torch.tensor([0.95, 0.5, 0.1])
    with torch.no_grad():
        job = distiller.make_targets(teacher, z0, cond, t, eps)
        z_t, target = _slow_target(teacher, distiller, z0, cond, t, eps)
    torch.testing.assert_close(job.z, z_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(job.eps_target, target, rtol=1e-3, atol=1e-3)


def test_the_student_starts_as_the_teacher(teacher_ckpt):
    model = DistillModule(teacher_ckpt, PeRFlow())
    model.load_teacher()
    for (name, p), q in zip(model.net.state_dict().items(), model.teacher.state_dict().values()):
        assert torch.equal(p, q), name
    assert model.hparams.preset["name"] == "micro-narrow" and model.hparams.clip_frames == 4  # the teacher's


def test_distillation_loss_falls_on_the_synthetic_world(teacher_ckpt, shards, tmp_path):
    torch.manual_seed(0)
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=2, min_snr_gamma=5.0), lr=3e-4, warmup_steps=5,
                          ema_decay=None)
    dm = shard_data(shards, model)
    trainer = cpu_trainer(tmp_path, 40, enable_checkpointing=False)
    dm.trainer = trainer
    dm.setup("fit")
    model.load_teacher()
    fixed = next(iter(dm.val_dataloader()))

    def held_out():  # fixed clips; t, noise and dropout fixed by seed
        with torch.no_grad():
            return sum(model.held_out_loss(fixed, seed).item() for seed in range(4))

    before = held_out()
    trainer.fit(model, dm)
    after = held_out()
    assert after < 0.85 * before, (before, after)


def test_the_held_out_loss_is_the_sampling_network_s(teacher_ckpt):
    """val/loss scores the EMA, the network that samples and that a table evaluates, not the raw student."""
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=2), ema_decay=0.99)
    model.load_teacher()
    batch = random_batch()
    with torch.no_grad():
        before = float(model.held_out_loss(batch, 0))
        for p in model.net.parameters():
            p.add_(0.1)
        assert float(model.held_out_loss(batch, 0)) == before
        model.ema.module.load_state_dict(model.net.state_dict())
        assert float(model.held_out_loss(batch, 0)) != before


def test_a_held_out_batch_is_solved_by_the_teacher_once(teacher_ckpt):
    """PeRFlow's targets need only the batch, the seeded draws and the frozen teacher: validation makes
    each batch's job once, and makes it again for other clips (keys) at that index or for a new teacher."""
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=2), ema_decay=0.99)
    model.load_teacher()
    calls = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    batch, other = random_batch(seed=0), random_batch(seed=1)
    with torch.no_grad():
        fresh = model.distillation_job(batch, torch.Generator().manual_seed(3))
        calls.clear()
        first = float(model.held_out_loss(batch, 3))
        solved = len(calls)
        assert solved > 0 and first == float(model.distiller.held_out_loss(model.sampling_net, fresh))
        for p in model.ema.module.parameters():
            p.add_(0.01)
        assert float(model.held_out_loss(batch, 3)) != first and len(calls) == solved  # the job is reused
        model.held_out_loss(other, 3)
        assert len(calls) == 2 * solved  # other clips at the same index: solved afresh
        model.held_out_loss({**other, "start": other["start"] + 4}, 3)
        assert len(calls) == 3 * solved  # the same clips from another frame
        model.held_out_loss({k: v for k, v in other.items() if k != "key"}, 3)
        assert len(calls) == 4 * solved  # clips without keys are never taken for others
        model._keep_teacher(None)
        model.load_teacher()
        model.teacher.register_forward_hook(lambda *_: calls.append(1))
        model.held_out_loss(batch, 3)
        assert len(calls) == 5 * solved  # the teacher loaded anew


def test_a_distiller_without_fixed_targets_makes_each_held_out_job_anew(teacher_ckpt):
    """A curriculum moves the draws with training, so a job is only reused where `fixed_targets` says so."""
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=2), ema_decay=None)
    model.distiller.fixed_targets = False
    model.load_teacher()
    calls = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.held_out_loss(random_batch(), 0)
        model.held_out_loss(random_batch(), 0)
    assert len(calls) > 0 and len(calls) % 2 == 0 and not model._held_out_jobs


def test_balanced_student_samples_at_18_nfe_and_guided_at_6(teacher_ckpt):
    batch = random_batch(b=1, f=6)
    balanced = DistillModule(teacher_ckpt, PeRFlow()).eval()
    video, nfe = balanced.generate(batch["ref"], batch["audio"])
    assert nfe == 18 and video.shape == (1, 6, 3, 32, 32)  # 6 PeRFlow steps x 3 CFG passes, per clip window
    guided = DistillModule(teacher_ckpt, PeRFlow(mode="guided")).eval()
    assert guided.generate(batch["ref"], batch["audio"])[1] == 6
    with pytest.raises(ValueError, match="one pass a step"):
        guided.generate(batch["ref"], batch["audio"], ref_scale=2.0)
    assert isinstance(balanced.scheduler(), PeRFlowScheduler)
    assert balanced.scheduler().config.prediction_type == "v_prediction"  # the teacher's parameterisation


def test_student_checkpoint_round_trips_without_its_teacher(teacher_ckpt, shards, tmp_path):
    torch.manual_seed(0)
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=2, num_windows=2, sample_steps=3), lr=1e-3,
                          ema_decay=0.9)
    trainer = cpu_trainer(tmp_path, 2, enable_checkpointing=False)
    trainer.fit(model, shard_data(shards, model, batch_size=2))
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])  # the teacher stays in its own file
    assert saved["scheduler_config"]["num_time_windows"] == 2

    moved = tmp_path / "elsewhere.ckpt"  # the teacher is gone: the student still loads and samples
    shutil.copy(teacher_ckpt, moved)
    model.hparams.teacher_ckpt = str(moved)
    trainer.save_checkpoint(path)
    moved.unlink()
    loaded = sample.load_module(path)
    assert type(loaded) is DistillModule and loaded.teacher is None
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    again = PeRFlowScheduler.from_config(saved["scheduler_config"])
    assert dict(loaded.scheduler().config) == dict(again.config)
    assert loaded.distiller.solver_steps == 2 and loaded.hparams.sample_steps == 3
    batch = random_batch(b=1, f=4)
    assert loaded.generate(batch["ref"], batch["audio"])[1] == 9


def test_a_teacher_of_another_preset_is_refused(teacher_ckpt):
    with pytest.raises(ConfigError, match=r"micro-narrow.*block_out_channels: teacher \[32, 32, 64\], student \[64, 64, 128\]"):
        DistillModule(teacher_ckpt, PeRFlow(), preset="micro")
    with pytest.raises(ConfigError, match="prediction_type: teacher 'v_prediction', student 'epsilon'"):
        DistillModule(teacher_ckpt, PeRFlow(), prediction_type="epsilon")


def test_a_sharded_folder_teacher_is_checked_from_its_metadata_alone(teacher_ckpt, tmp_path, monkeypatch):
    """A teacher saved as a folder of shards (FSDP2) is checked like a file, even with every setting given,
    and only its meta.pt is read to do so (the shards are read when the teacher is loaded)."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint import state_dict_loader

    saved = torch.load(teacher_ckpt, weights_only=False)
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": saved.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    torch.save(saved, folder / "meta.pt")
    given = dict(prediction_type="v_prediction", schedule=S.SD15_SCHEDULE, clip_frames=4, motion_frames=2,
                 ref_scale=2.5, audio_scale=6.5)
    def no_shards(*args, **kwargs):
        raise AssertionError("the teacher's shards were read to check its settings")

    monkeypatch.setattr(state_dict_loader, "_load_state_dict_from_keys", no_shards)
    with pytest.raises(ConfigError, match=r"block_out_channels: teacher \[32, 32, 64\], student \[64, 64, 128\]"):
        DistillModule(str(folder), PeRFlow(), preset="micro", **given)
    assert DistillModule(str(folder), PeRFlow(), preset=small_preset(), **given).hparams.clip_frames == 4


def test_a_missing_or_foreign_teacher_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*fada fit --config teacher.yaml"):
        DistillModule(str(tmp_path / "nope.ckpt"), PeRFlow())
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a checkpoint.*fada fit --config teacher.yaml"):
        DistillModule(str(junk), PeRFlow())
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ConfigError, match="not a fada-lightning teacher checkpoint"):
        DistillModule(str(tmp_path / "bare.ckpt"), PeRFlow())


def test_teacher_weights_that_do_not_fit_name_the_parameters(teacher_ckpt, tmp_path):
    checkpoint = torch.load(teacher_ckpt, weights_only=True)
    bad = {k: v for k, v in checkpoint["state_dict"].items() if "audio_projection" not in k}
    bad["ema.module.denoising_net.conv_in.weight"] = torch.zeros(1)
    checkpoint["state_dict"] = bad
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    model = DistillModule(str(tmp_path / "bad.ckpt"), PeRFlow())
    with pytest.raises(ConfigError, match=r"missing audio_projection.*conv_in.weight: teacher \(1,\)"):
        model.load_teacher()


def test_perflow_config_errors():
    with pytest.raises(ValueError, match="mode"):
        PeRFlow(mode="fast")
    with pytest.raises(ValueError, match="sample_steps 3 < num_windows 4"):
        PeRFlow(sample_steps=3)


def test_bf16_mixed_runs_the_teacher_under_autocast_and_keeps_the_student_fp32(teacher_ckpt, shards, tmp_path):
    model = DistillModule(teacher_ckpt, PeRFlow(solver_steps=1), ema_decay=0.9)
    seen = []
    forward = AvatarDenoiser.forward

    def spy(net, *args, **kwargs):
        out = forward(net, *args, **kwargs)
        seen.append((net is model.teacher, out.dtype, torch.is_grad_enabled()))
        return out

    trainer = cpu_trainer(tmp_path, 1, enable_checkpointing=False, precision="bf16-mixed")
    AvatarDenoiser.forward = spy
    try:
        trainer.fit(model, shard_data(shards, model, batch_size=1))
    finally:
        AvatarDenoiser.forward = forward
    assert (True, torch.bfloat16, False) in seen  # the teacher's solve: autocast, no autograd
    assert (False, torch.bfloat16, True) in seen  # the student: autocast, with autograd
    assert not any(teacher and grad for teacher, _, grad in seen)
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"].item()))


def docstring_example(monkeypatch) -> type:
    """The worked example of the Distiller docstring, run as written: its code is `my_distillers.py`."""
    doc = inspect.getdoc(Distiller)
    body = doc.split("In `my_distillers.py`:", 1)[1].split("\nand in a copy", 1)[0]
    module = types.ModuleType("my_distillers")
    exec(compile(textwrap.dedent(body), "my_distillers.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "my_distillers", module)
    return module.NoisyFirst


def test_the_docstring_example_records_its_arguments_and_reweights(monkeypatch):
    NoisyFirst = docstring_example(monkeypatch)
    mine = _bound(NoisyFirst(power=2.0, solver_steps=1))
    spec = mine.spec()
    assert spec["class_path"] == "my_distillers.NoisyFirst"
    assert spec["init_args"]["power"] == 2.0 and spec["init_args"]["solver_steps"] == 1
    assert spec["init_args"]["mode"] == "balanced"  # **kwargs: every PeRFlow argument is the subclass's too
    rebuilt = instantiate_class((), spec)
    assert type(rebuilt) is NoisyFirst and dict(rebuilt.hparams) == dict(mine.hparams)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 12, 4, 4, generator=g)
    cond = Conditions(ref=torch.randn(2, 12, 4, 4, generator=g), motion=torch.randn(2, 2, 12, 4, 4, generator=g),
                      audio=torch.randn(2, 4, 5, 1, 8, generator=g))
    job = mine.make_targets(ExactNet(z0, "v_prediction"), z0, cond, torch.tensor([1.0, 0.25]), torch.randn_like(z0))
    torch.testing.assert_close(job.weight, torch.tensor([4.0, 0.25]))
