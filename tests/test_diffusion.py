"""Schedule math, parameterisations, Eq 9 guidance and the sampling loop."""
import pytest
import torch
from diffusers import DDIMScheduler

from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions, cfg_conditions, condition_dropout, multi_cfg
from fada_lightning.diffusion.sampling import NFECounter, guided_denoiser, sample_loop

ABAR = S.alphas_cumprod()


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws from the same seed, whatever runs before it (or beside it under xdist)."""
    torch.manual_seed(0)


def _abar(n, like):
    return S.expand_like(ABAR[n], like)


def test_schedule_is_sd15_scaled_linear():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ABAR, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)
    sched = S.ddim_scheduler()
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        S.ddim_scheduler("sample")


def test_add_noise_matches_diffusers():
    z0, eps = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    n = torch.tensor([0, 10, 500, 999])
    ref = DDIMScheduler(**S.SD15_SCHEDULE).add_noise(z0, eps, n)
    torch.testing.assert_close(S.add_noise(z0, eps, _abar(n, z0)), ref)


def test_parameterisations_round_trip():
    z0, eps = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    abar = _abar(torch.tensor([1, 100, 400, 700, 999]), z0)
    z = S.add_noise(z0, eps, abar)
    torch.testing.assert_close(S.eps_to_x0(z, eps, abar), z0)
    torch.testing.assert_close(S.x0_to_eps(z, z0, abar), eps)
    v = S.v_target(z0, eps, abar)
    torch.testing.assert_close(S.eps_to_v(z, eps, abar), v)
    torch.testing.assert_close(S.v_to_eps(z, v, abar), eps)
    for kind in S.PREDICTION_TYPES:
        torch.testing.assert_close(S.to_eps(S.from_eps(eps, z, abar, kind), z, abar, kind), eps)


@pytest.mark.parametrize("kind", S.PREDICTION_TYPES)
def test_min_snr_weight_is_min_snr_in_x0_space(kind):
    """weight * ||pred error||^2 in the network's space == min(snr, gamma) * ||x0 error||^2."""
    z0, eps = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    n = torch.tensor([0, 50, 200, 500, 800, 999])
    abar = _abar(n, z0)
    z = S.add_noise(z0, eps, abar)
    target = S.from_eps(eps, z, abar, kind)
    pred = target + 0.1 * torch.randn_like(target)
    x0_pred = S.eps_to_x0(z, S.to_eps(pred, z, abar, kind), abar)
    lhs = S.min_snr_weight(ABAR[n], 5.0, kind) * (pred - target).pow(2).sum(1)
    rhs = S.snr(ABAR[n]).clamp(max=5.0) * (x0_pred - z0).pow(2).sum(1)
    torch.testing.assert_close(lhs, rhs)
    assert torch.equal(S.min_snr_weight(ABAR[n], None, kind), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("kind", S.PREDICTION_TYPES)
def test_ddim_with_an_exact_model_lands_on_the_data(kind):
    """A network that knows z0 predicts the exact eps (or v) at every z_t: DDIM keeps that eps
    along the whole path, so it lands on the forward process at its last timestep: with SD1.5's
    set_alpha_to_one=False that is add_noise(z0, eps, abar_0), within 1e-5 of z0 itself."""
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sched = S.ddim_scheduler(kind)

    def oracle(z, t):
        abar = ABAR[t].to(z.dtype)
        return S.from_eps(S.x0_to_eps(z, z0, abar), z, abar, kind)

    noise = torch.randn_like(z0)
    out = sample_loop(oracle, noise, sched, 25)
    eps = S.x0_to_eps(noise, z0, ABAR[sched.timesteps[0]])
    torch.testing.assert_close(out, S.add_noise(z0, eps, ABAR[0]), rtol=1e-5, atol=1e-6)  # diffusers keeps abar in float32
    assert sched.timesteps[0] == 961 and len(sched.timesteps) == 25


def _cond(b=2):
    return Conditions(ref=torch.randn(b, 4, 2, 2), motion=torch.randn(b, 2, 4, 2, 2), audio=torch.randn(b, 3, 5, 1, 6))


def test_cfg_conditions_order_and_nulls():
    cond = _cond()
    c3 = cfg_conditions(cond)
    assert c3.ref.shape[0] == 6
    assert c3.ref[:2].abs().sum() == 0 and c3.audio[:4].abs().sum() == 0  # (0,0), (r,0): no audio
    torch.testing.assert_close(c3.ref[2:4], cond.ref)
    torch.testing.assert_close(c3.audio[4:], cond.audio)
    torch.testing.assert_close(c3.motion, cond.motion.repeat(3, 1, 1, 1, 1))  # motion kept in every pass


def test_multi_cfg_identities():
    uncond, ref_only, full = torch.randn(3, 2, 5)
    pred = torch.cat([uncond, ref_only, full])
    torch.testing.assert_close(multi_cfg(pred, 1.0, 1.0), full)  # s_a = s_r = 1: eps(r, a)
    torch.testing.assert_close(multi_cfg(pred, 1.0, 0.0), ref_only)  # s_a = 0, s_r = 1: eps(r, 0)
    torch.testing.assert_close(multi_cfg(pred, 0.0, 0.0), uncond)
    # s_a = 0: reference-only CFG
    torch.testing.assert_close(multi_cfg(pred, 2.5, 0.0), uncond + 2.5 * (ref_only - uncond))
    # per-sample scales
    s_r, s_a = torch.tensor([2.0, 1.0]), torch.tensor([6.5, 0.0])
    out = multi_cfg(pred, s_r, s_a)
    torch.testing.assert_close(out[1], ref_only[1])
    torch.testing.assert_close(out[0], uncond[0] + 2 * (ref_only[0] - uncond[0]) + 6.5 * (full[0] - ref_only[0]))


def test_condition_dropout_rates_and_determinism():
    b = 20000
    cond = Conditions(ref=torch.ones(b, 1), motion=torch.ones(b, 1, 1), audio=torch.ones(b, 1))
    out = condition_dropout(cond, 0.05, 0.05, 0.05, generator=torch.Generator().manual_seed(1))
    again = condition_dropout(cond, 0.05, 0.05, 0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.audio, again.audio) and torch.equal(out.ref, again.ref)
    ref_dropped, audio_dropped = out.ref[:, 0] == 0, out.audio[:, 0] == 0
    assert (audio_dropped[ref_dropped]).all()  # reference is only ever dropped with audio
    assert abs(ref_dropped.float().mean() - 0.05) < 0.01
    assert abs(audio_dropped.float().mean() - (1 - 0.95 * 0.95)) < 0.01
    assert abs((out.motion[:, 0, 0] == 0).float().mean() - 0.05) < 0.01


def test_guided_denoiser_counts_three_passes_a_step():
    class Toy(torch.nn.Module):
        def encode_reference(self, cond):
            return {"ref": cond.ref}

        def forward(self, z, t, cond, reference=None):
            assert reference is not None  # the bank is computed once, not per step
            return z * 0 + cond.audio.mean() + reference["ref"].mean()

    counter = NFECounter(Toy(), clips=2)
    denoise = guided_denoiser(counter, _cond(), 2.5, 6.5)
    sample_loop(denoise, torch.randn(2, 3, 4, 2, 2), S.ddim_scheduler(), 25)
    assert counter.nfe == 75
