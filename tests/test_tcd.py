"""TCD: the consistency function against a slow exponential-integrator reference, targets against a slow
per-sample loop, the exact-teacher identity, and diffusers' TCDScheduler as the student's sampler."""
import math

import pytest
import torch
from diffusers import TCDScheduler

from distillers.tcd import TCD
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion import tcd
from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.diffusion import PeRFlowScheduler
from fada_lightning.diffusion.sampling import check_eta, sample_loop
from fada_lightning.presets import ConfigError

from conftest import ExactNet, WobblyNet, random_latents

ABAR = S.alphas_cumprod()  # float64


def _tcd(student_ema, prediction_type="epsilon", **kwargs):
    distiller = TCD(**kwargs)
    distiller.bind(S.SD15_SCHEDULE, prediction_type, student_ema)
    return distiller


def _slow_jump(x_t, eps, n_t, n_s):
    """TCD's exponential-integrator form, in float64 Python scalars: with lambda = log(alpha / sigma),
    h = lambda_s - lambda_t, x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0_hat."""
    a_t, a_s = math.sqrt(float(ABAR[n_t])), math.sqrt(float(ABAR[n_s]))
    s_t, s_s = math.sqrt(1 - float(ABAR[n_t])), math.sqrt(1 - float(ABAR[n_s]))
    h = math.log(a_s / s_s) - math.log(a_t / s_t)
    x0 = (x_t - s_t * eps) / a_t
    return (s_s / s_t) * x_t - a_s * (math.exp(-h) - 1) * x0


def test_the_consistency_function_is_a_ddim_jump_and_agrees_with_the_slow_reference():
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, generator=g)
    n_t, n_s = torch.tensor([999, 759, 259, 19]), torch.tensor([0, 500, 258, 0])
    fast = tcd.consistency_function(x_t, eps, S.expand_like(ABAR[n_t], x_t), S.expand_like(ABAR[n_s], x_t))
    slow = torch.stack([_slow_jump(x_t[i], eps[i], int(n_t[i]), int(n_s[i])) for i in range(4)])
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    same = tcd.consistency_function(x_t, eps, S.expand_like(ABAR[n_t], x_t), S.expand_like(ABAR[n_t], x_t))
    torch.testing.assert_close(same, x_t, rtol=0, atol=1e-12)  # s = t is the identity
    lam, eta = S.ddim_coefficients(ABAR[n_t], ABAR[n_s])  # and it is affine in (x_t, eps)
    torch.testing.assert_close(fast, S.expand_like(lam, x_t) * x_t + S.expand_like(eta, x_t) * eps)


def test_the_solver_grid_and_the_sampled_times():
    grid = tcd.solver_grid(50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    distiller = _tcd(ExactNet(torch.zeros(1), "epsilon"))
    t = distiller.sample_time(4000, "cpu", torch.Generator().manual_seed(0))
    n = (t * 1000).round().long() - 1
    assert set(n.tolist()) == set(grid.tolist())  # t_{n+k} covers the grid, and only it
    n_to = torch.tensor([0, 19, 979] * 2000)
    s = tcd.sample_end_index(n_to, torch.Generator().manual_seed(0))
    assert (s >= 0).all() and (s <= n_to).all() and (s[::3] == 0).all()
    assert s[1::3].unique().tolist() == list(range(20))  # uniform on {0, ..., t_n}, both ends included
    assert abs(s[2::3].float().mean().item() - 979 / 2) < 15


@pytest.mark.parametrize("mode", ["balanced", "guided"])
@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_an_exact_teacher_and_an_exact_target_network_give_target_eps(mode, prediction_type):
    z0, cond, eps = random_latents()
    exact = ExactNet(z0, prediction_type)
    distiller = _tcd(exact, prediction_type, mode=mode)
    t = distiller.sample_time(5, "cpu", torch.Generator().manual_seed(2))
    job = distiller.make_targets(exact, z0, cond, t, eps, torch.Generator().manual_seed(3))
    torch.testing.assert_close(job.eps_target, eps, rtol=0, atol=5e-4)
    n = (t * 1000).round() - 1
    assert torch.equal(job.timestep, n) and torch.equal(job.abar, ABAR.float()[n.long()])
    loss, _ = distiller.loss(S.from_eps(eps, job.z, S.expand_like(job.abar, job.z), prediction_type), job)
    assert loss < 1e-6


def _slow_targets(distiller, teacher, ema, z0, cond, eps, n, n_s):
    """Sample by sample, float64 schedule scalars, every CFG pass its own call, eps networks."""
    targets = []
    for i in range(len(n)):
        n_t, n_prev = int(n[i]), max(int(n[i]) - distiller.skip, 0)
        a_t, a_prev = float(ABAR[n_t]), float(ABAR[n_prev])
        c = cond.map(lambda x, i=i: x[i:i + 1])
        z = a_t ** 0.5 * z0[i:i + 1] + (1 - a_t) ** 0.5 * eps[i:i + 1]
        if distiller.mode == "guided":
            no_audio = Conditions(ref=c.ref, motion=c.motion, audio=torch.zeros_like(c.audio))
            nothing = Conditions(ref=torch.zeros_like(c.ref), motion=c.motion, audio=no_audio.audio)
            e0, er, ea = (teacher(z, torch.tensor([n_t]), x) for x in (nothing, no_audio, c))
            e = e0 + distiller.ref_scale * (er - e0) + distiller.audio_scale * (ea - er)
        else:
            e = teacher(z, torch.tensor([n_t]), c)
        x0 = (z - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        z_prev = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e  # one DDIM step t -> t_n
        target = _slow_jump(z_prev, ema(z_prev, torch.tensor([n_prev]), c), n_prev, int(n_s[i]))
        a_s = float(ABAR[int(n_s[i])])  # the eps that makes the student's jump t -> s land on the target
        lam, eta = (a_s / a_t) ** 0.5, (1 - a_s) ** 0.5 - (a_s * (1 - a_t) / a_t) ** 0.5
        targets.append((target - lam * z) / eta)
    return torch.cat(targets)


@pytest.mark.parametrize("mode", ["balanced", "guided"])
def test_vectorised_targets_match_a_slow_per_sample_reference(mode):
    z0, cond, eps = random_latents(b=4, seed=1)
    teacher, ema = WobblyNet(0.7), WobblyNet(0.4)
    distiller = _tcd(ema, mode=mode, p_drop_audio=0, p_drop_ref_audio=0, p_drop_motion=0)
    t = torch.tensor([1000, 760, 260, 20]) / 1000  # grid points 999, 759, 259 and 19 (whose t_n is 0)
    job = distiller.make_targets(teacher, z0, cond, t, eps, torch.Generator().manual_seed(5))
    n_s = tcd.sample_end_index((torch.tensor([999, 759, 259, 19]) - 20).clamp(min=0), torch.Generator().manual_seed(5))
    slow = _slow_targets(distiller, teacher, ema, z0.double(), cond.map(torch.Tensor.double), eps.double(),
                         [999, 759, 259, 19], n_s)
    torch.testing.assert_close(job.eps_target.double(), slow, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(job.scale.double(), S.ddim_coefficients(ABAR[[999, 759, 259, 19]], ABAR[n_s])[1],
                               rtol=1e-5, atol=1e-6)


def test_the_loss_is_l2_or_pseudo_huber_on_the_consistency_function():
    z0, cond, eps = random_latents(b=3)
    for distance in ("l2", "huber"):
        distiller = _tcd(WobblyNet(0.4), distance=distance, huber_c=0.05)
        job = distiller.make_targets(WobblyNet(0.7), z0, cond, torch.tensor([1.0, 0.5, 0.02]), eps,
                                     torch.Generator().manual_seed(0))
        pred = torch.randn_like(job.z)
        loss, _ = distiller.loss(pred, job)
        scale = S.expand_like(job.scale, job.z)  # f_theta - target = eta (eps_theta - eps_target)
        diff = scale * pred - scale * job.eps_target
        expected = diff.pow(2) if distance == "l2" else (diff.pow(2) + 0.05**2).sqrt() - 0.05
        torch.testing.assert_close(loss, expected.flatten(1).mean(1).mean())


def test_tcd_scheduler_timesteps_and_gamma_zero_is_ddim_to_the_next_timestep():
    distiller = _tcd(ExactNet(torch.zeros(1), "epsilon"))
    scheduler = distiller.scheduler()
    assert isinstance(scheduler, TCDScheduler) and scheduler.config.original_inference_steps == 50
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]
    scheduler.set_timesteps(6)
    steps = scheduler.timesteps.tolist()
    assert set(steps) <= set(tcd.solver_grid(50).tolist())  # the student samples at times it trained at
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, 4, 4, generator=g, dtype=torch.float64)
    eps_of = lambda z, t: torch.tanh(z) * (1 + t / 1000)  # noqa: E731  any eps-network
    sampled = sample_loop(eps_of, z, distiller.scheduler(), 6, eta=0.0)
    expected = z
    for t, t_next in zip(steps, steps[1:] + [0]):  # TCD's last step lands on index 0
        expected = S.ddim_step(expected, eps_of(expected, t), ABAR[t], ABAR[t_next])
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5)
    noisy = sample_loop(eps_of, z, distiller.scheduler(), 6, torch.Generator().manual_seed(1), eta=0.3)
    assert not torch.allclose(noisy, expected, atol=1e-3)  # gamma > 0 re-noises between steps


def test_tcd_settings_and_the_target_network_are_checked():
    assert TCD(gamma=0.2).sample_eta == 0.2 and not TCD().sample_cfg and TCD(mode="balanced").sample_cfg
    assert TCD(sample_steps=4).nfe() == 4 and TCD(mode="balanced").nfe() == 18
    with pytest.raises(ValueError, match="distance"):
        TCD(distance="l1")
    with pytest.raises(ValueError, match="gamma"):
        TCD(gamma=1.5)
    with pytest.raises(ConfigError, match="ema_decay"):
        TCD().bind(S.SD15_SCHEDULE, "epsilon", None)
    check_eta(TCDScheduler(), 0.5)  # `fada sample --eta`: schedulers that take one accept it
    check_eta(S.ddim_scheduler(), 0.5)
    with pytest.raises(ValueError, match="PeRFlowScheduler is deterministic"):
        check_eta(PeRFlowScheduler(), 0.3)


def test_the_teacher_solution_lands_on_each_end_and_agrees_with_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, generator=g)
    n, n_end = torch.tensor([999, 759, 259, 19]), torch.tensor([0, 500, 259, 0])
    constant = tcd.teacher_solution(z, lambda z, n: eps, n, n_end, 20, ABAR)  # an eps that ignores z:
    torch.testing.assert_close(constant, S.ddim_step(z, eps, S.expand_like(ABAR[n], z), S.expand_like(ABAR[n_end], z)))
    assert torch.equal(constant[2], z[2])  # DDIM steps compose to the one jump, and n = n_end stays put
    eps_of = lambda z, n: torch.tanh(z) * (1 + S.expand_like(n, z) / 1000)  # noqa: E731
    fast = tcd.teacher_solution(z, eps_of, n, n_end, 20, ABAR)
    for i in range(4):
        x, at = z[i:i + 1], int(n[i])
        while at > int(n_end[i]):
            to = max(at - 20, int(n_end[i]))
            x = _slow_jump(x, torch.tanh(x) * (1 + at / 1000), at, to)
            at = to
        torch.testing.assert_close(fast[i:i + 1], x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["balanced", "guided"])
def test_the_held_out_loss_is_zero_for_the_exact_consistency_function_and_ignores_the_ema(mode):
    """val/loss measures f_theta against the teacher's solution, not the EMA's jump: 0 for a student that
    is the exact teacher, clearly above 0 for another network, and unchanged when the EMA changes."""
    z0, cond, eps = random_latents(b=4, seed=2)
    exact = ExactNet(z0, "epsilon")
    distiller = _tcd(WobblyNet(0.4), mode=mode)
    distiller.set_teacher(exact)
    t = distiller.sample_time(4, "cpu", torch.Generator().manual_seed(1))
    job = distiller.make_targets(exact, z0, cond, t, eps, torch.Generator().manual_seed(1))
    assert float(distiller.held_out_loss(exact, job)) < 1e-8
    wrong = float(distiller.held_out_loss(WobblyNet(0.4), job))
    assert wrong > 1e-3
    distiller.bind(S.SD15_SCHEDULE, "epsilon", WobblyNet(-2.0))  # another target network
    assert float(distiller.held_out_loss(WobblyNet(0.4), job)) == wrong


def test_each_held_out_batch_is_solved_by_the_teacher_once():
    z0, cond, eps = random_latents(b=3, seed=4)
    calls = []
    teacher = WobblyNet(0.7)
    teacher.forward = lambda *args, f=teacher.forward, **kwargs: calls.append(1) or f(*args, **kwargs)
    distiller = _tcd(WobblyNet(0.4), mode="balanced")
    distiller.set_teacher(teacher)
    jobs = [distiller.make_targets(teacher, z0, cond, torch.tensor([1.0, 0.6, 0.3]), eps, torch.Generator().manual_seed(i))
            for i in range(2)]
    calls.clear()
    first = [float(distiller.held_out_loss(WobblyNet(0.4), job)) for job in jobs]
    solved = len(calls)
    assert solved > 2 and [float(distiller.held_out_loss(WobblyNet(0.4), job)) for job in jobs] == first
    assert len(calls) == solved  # the second validation reuses both solutions
    distiller.set_teacher(WobblyNet(0.2))  # a new teacher solves again
    assert float(distiller.held_out_loss(WobblyNet(0.4), jobs[0])) != first[0]
