"""Adversarial 4 -> 1 (distillers/adversarial.py, fada_lightning/diffusion/adversarial.py): SPEC 3b's checks
(D and G start undecided, R1 of a flat D is 0, the progressive schedule), the frozen reference G4's
chain against backward simulation, the student's start from a stage-1 checkpoint, and the contract."""
import math

import pytest
import torch

from distillers.adversarial import Adversarial, Discriminator, Progressive, Staged
from distillers.dmd import DMD
from fada_lightning.diffusion import adversarial as adv
from fada_lightning.diffusion import dmd
from fada_lightning.diffusion import schedule as S
from fada_lightning.distill import DistillModule
from fada_lightning.presets import ConfigError
from fada_lightning.testing import DistillerContract, cpu_trainer, random_batch, shard_data

LN2 = math.log(2)


# ---- the math ------------------------------------------------------------------------------------
def test_the_losses_at_an_undecided_discriminator():
    zero = torch.zeros(5, 3)
    assert float(adv.discriminator_loss(zero, zero)) == pytest.approx(2 * LN2)
    assert float(adv.generator_loss(zero)) == pytest.approx(LN2)
    # weighted positives: the weights pick rows; all-zero weights leave the fake side alone
    fake, real = torch.randn(4, 2), torch.tensor([[9.0, 9.0], [-2.0, -2.0]])
    assert float(adv.discriminator_loss(fake, real, torch.tensor([0.0, 1.0]))) == pytest.approx(
        float(torch.nn.functional.softplus(fake).mean() + torch.nn.functional.softplus(torch.tensor(2.0))))
    assert float(adv.discriminator_loss(fake, real, torch.zeros(2))) == pytest.approx(
        float(torch.nn.functional.softplus(fake).mean()))


def test_the_approximate_r1_is_zero_for_a_flat_d_and_sigma_squared_grad_norm_for_a_linear_one():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4096, 8, generator=g)
    assert torch.equal(adv.approximate_r1(torch.full((4096, 3), 2.0), torch.full((4096, 3), 2.0)), torch.zeros(4096))
    w, sigma = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, 0.3, -0.2, 1.5]), 0.1
    r1 = adv.approximate_r1((x @ w)[:, None], ((x + sigma * eps) @ w)[:, None])
    assert float(r1.mean()) == pytest.approx(sigma**2 * float(w.pow(2).sum()), rel=0.05)  # E (w . sigma eps)^2


def test_discriminator_timesteps_lean_to_high_noise():
    t = adv.noise_level_timesteps(20000, 1000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    assert float(t.float().median()) == pytest.approx(1000 / (1 + math.exp(-1.0)) - 0.5, abs=10)


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_the_reference_chain_holds_backward_simulations_input_at_every_step(steps):
    """`sampling_chain`'s state at step k is what backward simulation makes with k steps (a reference), and
    its output is one more step from the last state."""
    abar, timesteps = S.alphas_cumprod().float(), dmd.generator_timesteps(4)
    g = torch.Generator().manual_seed(steps)
    noise, renoise = torch.randn(3, 2, 5, generator=g), torch.randn(3, 3, 2, 5, generator=g)

    def denoise(x, n):  # any deterministic x0 of (x, n)
        return 0.5 * torch.tanh(x) + n[:, None, None] / 2000

    inputs, out = adv.sampling_chain(denoise, noise, timesteps, abar, renoise)
    reference = dmd.backward_simulation(denoise, noise, timesteps, torch.full((3,), steps), abar, renoise)
    torch.testing.assert_close(inputs[:, steps], reference)
    torch.testing.assert_close(out, denoise(inputs[:, 3], timesteps[3].expand(3)))


# ---- the step schedules ---------------------------------------------------------------------------
def test_the_progressive_schedule_sums_to_one_is_monotone_and_reaches_one_step_at_k():
    schedule, K = Progressive(ramp_steps=40), 40
    rows = torch.stack([schedule.probabilities(k, 4) for k in range(0, 2 * K)])
    torch.testing.assert_close(rows.sum(1), torch.ones(len(rows), dtype=torch.float64))
    assert torch.equal(rows[0], torch.full((4,), 0.25, dtype=torch.float64))  # uniform at the start
    assert (rows[1:, 0] >= rows[:-1, 0]).all() and (rows[1:, 1:] <= rows[:-1, 1:]).all()
    assert float(rows[K // 2, 0]) == pytest.approx(0.25 + 0.75 * 0.5)
    assert (rows[K:, 0] == 1).all() and (rows[K - 1, 0] < 1)
    assert (Progressive(ramp_steps=0).probabilities(0, 4) == torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)).all()


def test_the_staged_schedule_walks_4_2_1_over_the_generators_timesteps():
    schedule = Staged((4, 2, 1), stage_steps=10)
    expect = {0: [0.25] * 4, 9: [0.25] * 4, 10: [0.5, 0, 0.5, 0], 19: [0.5, 0, 0.5, 0], 20: [1, 0, 0, 0], 500: [1, 0, 0, 0]}
    for step, p in expect.items():
        assert schedule.probabilities(step, 4).tolist() == p, step
    assert dmd.generator_timesteps(4)[[0, 2]].tolist() == dmd.generator_timesteps(2).tolist()  # [999, 499]
    with pytest.raises(ValueError, match="not among the generator's 4"):
        Staged((3,)).probabilities(0, 4)


def test_draws_follow_the_schedule_at_its_recorded_step():
    schedule = Progressive(ramp_steps=100)
    schedule.step.fill_(50)
    k = schedule.draw(40000, 4, torch.Generator().manual_seed(0))
    freq = torch.bincount(k, minlength=4).double() / len(k)
    torch.testing.assert_close(freq, schedule.probabilities(50, 4), rtol=0, atol=0.01)
    assert "step" in schedule.state_dict()  # in the checkpoint, with the distiller


# ---- the distiller --------------------------------------------------------------------------------
def adversarial_module(teacher_ckpt, distiller=None, **options) -> DistillModule:
    torch.manual_seed(0)
    model = DistillModule(teacher_ckpt, distiller or Adversarial(), ema_decay=None, **options)
    model.load_teacher()
    return model


def test_d_and_g_start_undecided(teacher_ckpt):
    """D's heads start near zero: D's loss ~2 ln 2 (G's samples against G4's), G's ~ln 2, R1 ~0."""
    model = adversarial_module(teacher_ckpt)
    job = model.distillation_job(random_batch(), torch.Generator().manual_seed(0))
    _, logs = model.distiller.network_loss("discriminator", model.net, job)
    assert float(logs["adversarial/d_loss"]) == pytest.approx(2 * LN2, abs=1e-3)
    assert float(logs["adversarial/r1"]) < 1e-8
    _, logs = model.distiller.student_loss(model.net, job)
    assert float(logs["adversarial/g_loss"]) == pytest.approx(LN2, abs=1e-3)


def test_a_flat_discriminator_has_zero_r1_and_gives_g_no_gradient(teacher_ckpt):
    model = adversarial_module(teacher_ckpt, Adversarial(real_weight=0.5))
    for head in model.distiller.networks["discriminator"].heads:
        torch.nn.init.zeros_(head.out.weight)
        torch.nn.init.constant_(head.out.bias, 0.7)
    job = model.distillation_job({**random_batch(), "tier": ["strict", "lenient"]}, torch.Generator().manual_seed(0))
    assert job.real_mask.tolist() == [1.0, 0.0]
    _, logs = model.distiller.network_loss("discriminator", model.net, job)
    assert float(logs["adversarial/r1"]) == 0
    loss, _ = model.distiller.student_loss(model.net, job)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.net.parameters())


def test_the_job_starts_g_on_g4s_chain_and_the_positive_is_its_end(teacher_ckpt):
    """G's input at step k is G4's chain state there (G4 = the starting student), the positive G4's 4-step
    output from the same noise: with G = G4, G's one step from the last state is exactly the positive."""
    model = adversarial_module(teacher_ckpt, Adversarial(step_schedule={
        "class_path": "distillers.adversarial.Staged", "init_args": {"stages": [4], "stage_steps": 1}}))
    distiller = model.distiller
    job = model.distillation_job(random_batch(b=8), torch.Generator().manual_seed(1))
    k = distiller.steps_before(job.timestep)
    assert len(set(k.tolist())) > 1  # a step per clip
    with torch.no_grad():
        last = (k == 3).nonzero()[:, 0]
        out = distiller.generator_x0(model.net, job.z[last], job.timestep[last], job.cond.map(lambda x: x[last]))
    torch.testing.assert_close(out, job.positive[last], rtol=1e-5, atol=1e-5)
    first = (k == 0).nonzero()[:, 0]
    assert first.numel() and not (job.z[first] == job.positive[first]).all()
    with torch.no_grad():  # val/loss: G's x against G4's, zero on the clips at G4's last step only
        gap = distiller.generator_x0(model.net, job.z, job.timestep, job.cond) - job.positive
        assert float(distiller.held_out_loss(model.net, job)) == pytest.approx(float(gap.square().mean()))
    assert float(gap[last].abs().max()) < 1e-5 and float(gap[first].square().mean()) > 1e-4


def test_the_student_starts_from_a_stage_one_checkpoint(teacher_ckpt, shards, tmp_path):
    """`student_ckpt`: G, its EMA and G4 start from the DMD student's weights (not the teacher's); a checkpoint
    of another network, or a teacher's, is refused by name."""
    torch.manual_seed(0)
    stage1 = DistillModule(teacher_ckpt, DMD(two_time_scale=1), lr=1e-2, warmup_steps=1, ema_decay=None)
    trainer = cpu_trainer(tmp_path, 2, enable_checkpointing=False)
    trainer.fit(stage1, shard_data(shards, stage1, batch_size=2))
    trainer.save_checkpoint(tmp_path / "dmd.ckpt")
    model = adversarial_module(teacher_ckpt, student_ckpt=str(tmp_path / "dmd.ckpt"))
    trained = stage1.net.state_dict()
    for net in (model.net, model.distiller.frozen["g4"]):
        assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    assert not all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in model.net.state_dict().items())
    assert not any(k.startswith("distiller.frozen") or "g4" in k for k in model.state_dict())  # G4 is not saved

    with pytest.raises(ConfigError, match=r"dmd.ckpt does not fit this student: cfg_conditioning: checkpoint 'none'"):
        adversarial_module(teacher_ckpt, student_ckpt=str(tmp_path / "dmd.ckpt"), cfg_conditioning="layer_tokens")
    with pytest.raises(ConfigError, match="a student checkpoint is needed here"):
        adversarial_module(teacher_ckpt, student_ckpt=teacher_ckpt)
    with pytest.raises(ConfigError, match="student checkpoint .*nowhere.ckpt does not exist"):
        adversarial_module(teacher_ckpt, student_ckpt=str(tmp_path / "nowhere.ckpt"))


def test_adversarial_refuses_settings_it_cannot_train():
    with pytest.raises(ValueError, match="sample_steps 3 must divide generator_steps"):
        Adversarial(sample_steps=3)
    with pytest.raises(ValueError, match="backbone must be one of"):
        Adversarial(backbone="mine")
    with pytest.raises(ValueError, match="GAN head"):
        Adversarial(gan_gen_weight=1e-3)
    with pytest.raises(ValueError, match="must be a StepSchedule"):
        Adversarial(step_schedule={"class_path": "torch.nn.Identity"})


def test_the_job_holds_every_draw_so_clips_are_the_same_alone_or_together(teacher_ckpt):
    model = adversarial_module(teacher_ckpt, Adversarial(real_weight=0.5, dmd_weight=0.5, ref_scale=(1.0, 3.0)))
    batch = random_batch()
    parts = [model.distillation_job({k: v[i:i + 1] for k, v in batch.items()}, torch.Generator().manual_seed(5 + i))
             for i in range(2)]
    joined = type(parts[0]).cat(parts)
    assert parts[0].timestep != parts[1].timestep
    for name in ("student", "discriminator", "fake_score"):
        together = model.distiller.update_loss(name, model.net, joined)[0]
        alone = [model.distiller.update_loss(name, model.net, part)[0] for part in parts]
        torch.testing.assert_close(together, sum(alone) / 2, rtol=1e-5, atol=1e-7)


def test_one_step_with_cfg_tokens_is_still_steered_by_the_scales(teacher_ckpt):
    """A one-pass student told its scales (FADA's CFG tokens) samples at 1 NFE per window, and the scales it
    is given change what it makes."""
    model = adversarial_module(teacher_ckpt, Adversarial(ref_scale=(1.0, 3.0), audio_scale=(1.0, 9.0)),
                               cfg_conditioning="layer_tokens")
    with torch.no_grad():  # a trained student's tokens: away from their zero-output start
        for name, p in model.net.named_parameters():
            if "cfg" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = random_batch(b=1, f=model.hparams.clip_frames)
    videos = [model.eval().generate(batch["ref"], batch["audio"], ref_scale=r, audio_scale=a,
                                    generator=torch.Generator().manual_seed(0)) for r, a in ((1.0, 1.0), (3.0, 9.0))]
    assert videos[0][1] == videos[1][1] == 1
    assert (videos[0][0] - videos[1][0]).abs().max() > 1e-3


class TestAdversarial(DistillerContract):
    """The default: LADD's frozen-teacher backbone, self-compare, progressive sampling, R1."""

    def make_distiller(self):
        return Adversarial(d_lr=1e-3, step_schedule={"class_path": "distillers.adversarial.Progressive",
                                                     "init_args": {"ramp_steps": 2}})

    def test_g4_and_the_backbone_stay_bit_identical_and_the_schedule_state_is_saved(self, trained):
        model, _, path, _ = trained
        saved = torch.load(path, weights_only=True)["state_dict"]
        g4 = model.distiller.frozen["g4"]
        start = model.teacher.state_dict()  # the student started as the teacher's copy
        assert all(torch.equal(v, start[k]) for k, v in g4.state_dict().items())
        assert not any(p.requires_grad for p in g4.parameters()) and not g4.training
        assert int(saved["distiller.step_schedule.step"]) == model.trainer.global_step - 1
        assert model.distiller.networks["discriminator"].backbone is None  # heads only: the teacher is D's body


class TestAdversarialVariants(DistillerContract):
    """A trainable backbone, real clips beside G4's, the DMD term (and its fake score), a staged schedule,
    and CFG tokens told the scales drawn per clip."""

    module_options = {"cfg_conditioning": "layer_tokens", "ref_scale": 2.0, "audio_scale": 6.5}

    def make_distiller(self):
        return Adversarial(backbone="trainable", real_weight=0.5, dmd_weight=0.5, fake_lr=1e-3, d_lr=1e-3,
                           head_blocks=(1, 2), ref_scale=(1.0, 3.0), audio_scale=(1.0, 9.0), sample_steps=2,
                           step_schedule={"class_path": "distillers.adversarial.Staged",
                                          "init_args": {"stages": [4, 2, 1], "stage_steps": 1}})


def test_discriminator_heads_read_the_blocks_they_are_on(teacher_ckpt):
    model = adversarial_module(teacher_ckpt, Adversarial(head_blocks=(0, 2)))
    d = model.distiller.networks["discriminator"]
    assert isinstance(d, Discriminator) and d.blocks == [0, 2] and len(d.heads) == 2
    with pytest.raises(ValueError, match="decoder blocks 0 .. 2"):
        adversarial_module(teacher_ckpt, Adversarial(head_blocks=(3,)))
