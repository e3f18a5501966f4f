"""DMD's math (fada_lightning/diffusion/dmd.py) against SPEC 3b's cheap checks: a Gaussian world with
exact scores, where the analytic answer is known, and the identities of the gradient and its loss."""
import math

import pytest
import torch

from fada_lightning.diffusion import dmd
from fada_lightning.diffusion import schedule as S

ABAR = S.alphas_cumprod().double()


def posterior_mean(x_t, abar, mean, var):
    """E[x0 | x_t] for x0 ~ N(mean, diag var) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = abar.sqrt()
    return mean + a * var / (abar * var + 1 - abar) * (x_t - a * mean)


def train_gaussian_generator(real_x0, fake_term: bool = True, steps: int = 1000, seed: int = 0):
    """x = scale * z + shift, z ~ N(0, I) in 4 dimensions, trained with the DMD loss; the fake score is exact
    for the generator's own distribution N(shift, scale^2) (or, with fake_term False, replaced by x itself:
    plain score distillation). -> (shift, |scale|)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(4, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([scale, shift], lr=2e-2)
    for _ in range(steps):
        z = torch.randn(256, 4, generator=g, dtype=torch.float64)
        x = scale * z + shift
        with torch.no_grad():
            abar = ABAR[dmd.dmd_timesteps(256, generator=g)][:, None]
            x_t = S.add_noise(x, torch.randn(x.shape, generator=g, dtype=torch.float64), abar)
            x0_real = real_x0(x_t, abar)
            x0_fake = posterior_mean(x_t, abar, shift, scale**2) if fake_term else x
            grad = dmd.dmd_gradient(x, x0_real, x0_fake).double()
        opt.zero_grad()
        dmd.dmd_loss(x, grad).backward()
        opt.step()
    return shift.detach(), scale.detach().abs()


MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 0.2, 1.5], dtype=torch.float64)


def test_dmd_recovers_the_data_distribution_with_exact_scores():
    shift, scale = train_gaussian_generator(lambda x_t, abar: posterior_mean(x_t, abar, MU, SIGMA**2))
    torch.testing.assert_close(shift, MU, rtol=0, atol=1e-2)
    torch.testing.assert_close(scale, SIGMA, rtol=0, atol=1e-2)


def test_without_the_fake_score_the_spread_collapses():
    """Plain score distillation (the fake score replaced by the sample): every sample is pulled to the
    real posterior mean, so the generator's spread shrinks far below the data's (the negative control)."""
    shift, scale = train_gaussian_generator(lambda x_t, abar: posterior_mean(x_t, abar, MU, SIGMA**2),
                                            fake_term=False)
    assert (scale < 0.3 * SIGMA).all(), scale


def test_the_guided_target_is_recovered():
    """Conditional N(mu_c, sigma^2) and unconditional N(mu_u, sigma^2) (equal variance): CFG at scale s on the
    real score makes the target N(mu_u + s (mu_c - mu_u), sigma^2)."""
    mu_u, s = torch.tensor([0.0, 0.5, -1.0, 1.0], dtype=torch.float64), 2.0

    def guided(x_t, abar):
        x0_c, x0_u = posterior_mean(x_t, abar, MU, SIGMA**2), posterior_mean(x_t, abar, mu_u, SIGMA**2)
        return x0_u + s * (x0_c - x0_u)

    shift, scale = train_gaussian_generator(guided)
    torch.testing.assert_close(shift, mu_u + s * (MU - mu_u), rtol=0, atol=1e-2)
    torch.testing.assert_close(scale, SIGMA, rtol=0, atol=1e-2)


def test_equal_scores_give_a_zero_gradient():
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(2, 3, 2, 4, 4, 4, generator=g)
    assert torch.equal(dmd.dmd_gradient(x, x0, x0), torch.zeros_like(x))


def test_the_loss_gradient_is_grad_over_numel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 5, 5, generator=g, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, *x.shape, generator=g)
    grad = dmd.dmd_gradient(x.detach(), x0_real, x0_fake)
    dmd.dmd_loss(x, grad).backward()
    # exact up to float32's rounding of x - (x - grad): 1e-10 on gradients of ~1e-3
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=0, atol=1e-9)


def test_the_normaliser_is_per_sample():
    g = torch.Generator().manual_seed(3)
    x, x0_real, x0_fake = torch.randn(3, 4, 2, 3, 3, generator=g)
    before = dmd.dmd_gradient(x, x0_real, x0_fake)
    x[1] = 10 * x[1]  # another sample far away
    after = dmd.dmd_gradient(x, x0_real, x0_fake)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    x = x0_real.clone()  # |x - x0_real| = 0: no direction, not a NaN
    assert torch.equal(dmd.dmd_gradient(x, x0_real, x0_fake), torch.zeros_like(x))


def test_generator_timesteps_and_the_comparison_range():
    assert dmd.generator_timesteps(4).tolist() == [999, 749, 499, 249]
    assert dmd.generator_timesteps(1).tolist() == [999]
    t = dmd.dmd_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 980


def test_backward_simulation_runs_the_generator_and_renoises_to_the_next_timestep():
    """With a generator that always answers x0 = c, a clip's input after k >= 1 steps is c noised to
    timestep k with its k-th re-noising eps; a clip of k = 0 keeps its noise; extra passes change nothing."""
    timesteps = dmd.generator_timesteps(4)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    renoise = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(5))
    steps = torch.tensor([0, 1, 3])
    c = torch.full((3, 2), 0.7)
    seen = []

    def denoise(x, t):
        seen.append(t.tolist())
        return c[:len(x)]

    x = dmd.backward_simulation(denoise, noise, timesteps, steps, ABAR.float(), renoise)
    assert seen == [[999] * 3, [749] * 3, [499] * 3]  # every pass runs the whole batch
    assert torch.equal(x[0], noise[0])
    for b in (1, 2):
        k = int(steps[b])
        torch.testing.assert_close(x[b], S.add_noise(c[b], renoise[b, k - 1], ABAR.float()[int(timesteps[k])]))
    fewer = dmd.backward_simulation(denoise, noise[:2], timesteps, steps[:2], ABAR.float(), renoise[:2], passes=3)
    assert torch.equal(fewer, x[:2])


# ---- the DMD distiller (distillers/dmd.py) on the contract ---------------------------------------
from distillers.dmd import DMD  # noqa: E402
from fada_lightning.diffusion import DMDScheduler  # noqa: E402
from fada_lightning.distill import DistillModule  # noqa: E402
from fada_lightning.testing import DistillerContract, random_batch  # noqa: E402


class TestDMD(DistillerContract):
    def make_distiller(self):
        return DMD(two_time_scale=2, fake_lr=1e-3)


class TestDMDWithGANHead(DistillerContract):
    def make_distiller(self):
        return DMD(two_time_scale=2, fake_lr=1e-3, gan_gen_weight=1e-3)


class TestDMDWithCFGTokens(DistillerContract):
    """Scales drawn per clip and told to the student through FADA's CFG tokens: steerable at 4 NFE."""

    module_options = {"cfg_conditioning": "layer_tokens", "ref_scale": 2.0, "audio_scale": 6.5}

    def make_distiller(self):
        return DMD(ref_scale=(1.0, 3.0), audio_scale=(1.0, 9.0))


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_the_scheduler_steps_through_the_training_chain(prediction_type):
    """Timesteps [999, 749, 499, 249]; each step reads x0 from the model and re-noises it to the next
    timestep with fresh noise, as backward simulation does; the last returns x0."""
    scheduler = DMDScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    abar = S.alphas_cumprod().float()
    x0 = torch.full((2, 3), 0.4)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    g, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, n in enumerate(scheduler.timesteps):
        output = S.from_eps(S.x0_to_eps(z, x0, abar[int(n)]), z, abar[int(n)], prediction_type)  # an exact model
        z = scheduler.step(output, n, z, generator=g).prev_sample
        if i < 3:
            torch.testing.assert_close(z, S.add_noise(x0, torch.randn(2, 3, generator=reference),
                                                      abar[int(scheduler.timesteps[i + 1])]))
    torch.testing.assert_close(z, x0)


def test_equal_scores_at_scale_one_give_the_generator_no_gradient(teacher_ckpt):
    """F = R (F starts as the teacher's copy) and s_r = s_a = 1 (Eq 9 is then the conditional pass):
    x0_fake = x0_real, so the DMD gradient, and G's, is zero."""
    model = DistillModule(teacher_ckpt, DMD(ref_scale=1.0, audio_scale=1.0), ema_decay=None)
    model.load_teacher()
    loss, logs = model.distillation_loss(random_batch(), torch.Generator().manual_seed(0))
    assert float(logs["dmd/x0_gap"].abs().max()) < 1e-5  # Eq 9 at (1, 1) differs from one pass by rounding only
    with torch.no_grad():  # the held-out loss (val/loss) is that gap, not the DMD loss's value
        assert float(model.held_out_loss(random_batch(), 0)) < 1e-5
    loss.backward()
    zero = max(float(p.grad.abs().max()) for p in model.net.parameters() if p.grad is not None)
    guided = DistillModule(teacher_ckpt, DMD(), ema_decay=None)  # the default scales, for scale
    guided.load_teacher()
    guided.distillation_loss(random_batch(), torch.Generator().manual_seed(0))[0].backward()
    assert zero < 1e-4 * max(float(p.grad.abs().max()) for p in guided.net.parameters() if p.grad is not None)


def test_the_held_out_loss_is_the_gap_between_the_real_and_fake_scores(teacher_ckpt):
    """At the default scales R (guided) and F (the teacher's copy, unguided) differ: val/loss is their mean
    x0 gap on G's sample, the same for the same draws, and unlike the DMD loss it owes nothing to its normaliser."""
    model = DistillModule(teacher_ckpt, DMD(), ema_decay=None)
    model.load_teacher()
    batch = random_batch()
    with torch.no_grad():
        gap = float(model.held_out_loss(batch, 3))
        _, logs = model.distillation_loss(batch, torch.Generator().manual_seed(3))
    assert gap > 1e-3 and gap == pytest.approx(float(logs["dmd/x0_gap"].mean()), rel=1e-5)


def test_dmd_refuses_settings_it_cannot_train():
    with pytest.raises(ValueError, match="mode must be guided"):
        DMD(mode="balanced")
    with pytest.raises(ValueError, match="sample_steps 6 must equal generator_steps 4"):
        DMD(sample_steps=6)


def test_the_gan_head_starts_undecided(teacher_ckpt):
    """The head's last layer starts at zero: every logit is 0, so D's loss is 2 ln 2 and G's ln 2; only
    strict clips are real."""
    model = DistillModule(teacher_ckpt, DMD(gan_gen_weight=1e-3), ema_decay=None)
    model.load_teacher()
    job = model.distillation_job({**random_batch(), "tier": ["strict", "lenient"]}, torch.Generator().manual_seed(0))
    assert job.real_mask.tolist() == [1.0, 0.0]
    _, logs = model.distiller.network_loss("fake_score", model.net, job)
    assert float(logs["gan/d_loss"]) == pytest.approx(2 * math.log(2)) and float(logs["gan/logit_real"]) == 0
    _, logs = model.distiller.student_loss(model.net, job)
    assert float(logs["gan/g_loss"]) == pytest.approx(math.log(2))


def test_the_job_holds_every_draw_so_clips_are_the_same_alone_or_together(teacher_ckpt):
    """Two jobs of one clip each, joined, give the losses of the same two clips in one job: what makes
    1 and P processes agree."""
    model = DistillModule(teacher_ckpt, DMD(ref_scale=(1.0, 3.0)), ema_decay=None)
    model.load_teacher()
    batch = random_batch()
    seeded = lambda i: torch.Generator().manual_seed(11 + i)  # noqa: E731
    parts = [model.distillation_job({k: v[i:i + 1] for k, v in batch.items()}, seeded(i)) for i in range(2)]
    joined = type(parts[0]).cat(parts)
    assert parts[0].timestep != parts[1].timestep  # a k each: the joined job runs the larger k's passes
    for loss in (model.distiller.student_loss, lambda *a: model.distiller.network_loss("fake_score", *a)):
        together = loss(model.net, joined)[0]
        alone = [loss(model.net, part)[0] for part in parts]
        torch.testing.assert_close(together, sum(alone) / 2)
