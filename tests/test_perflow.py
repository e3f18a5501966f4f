"""PeRFlow math (Eq 2-5) and PeRFlowScheduler against slow references and exact identities."""
import math

import numpy as np
import pytest
import torch

from fada_lightning.diffusion import PeRFlowScheduler
from fada_lightning.diffusion import perflow as P
from fada_lightning.diffusion import schedule as S

ABAR = S.alphas_cumprod()  # float64
T = 1000


def slow_window(t: float, k: int) -> tuple[float, float]:
    """The official lookup: walk windows from the noise end while t is at or below the window's end."""
    starts = [1 - i / k for i in range(k)]
    ends = starts[1:] + [0.0]
    i = 0
    while t - 1e-4 <= ends[i]:
        i += 1
    return starts[i], ends[i]


@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_window_lookup_matches_slow_reference_on_the_whole_grid(k):
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    t_s, t_e = P.window_bounds(t, k)
    expected = torch.tensor([slow_window(x, k) for x in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(t_s, expected[:, 0])
    torch.testing.assert_close(t_e, expected[:, 1])


def test_window_lookup_at_the_boundaries():
    t = torch.tensor([1.0, 0.999, 0.751, 0.75, 0.749, 0.251, 0.25, 0.001])
    t_s, t_e = P.window_bounds(t, 4)
    assert t_s.tolist() == [1.0, 1.0, 1.0, 0.75, 0.75, 0.5, 0.25, 0.25]  # a boundary starts its window
    assert t_e.tolist() == [0.75, 0.75, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0]
    # a float32 boundary (0.75 = 750 / 1000 computed in float32) still lands in its own window
    assert P.window_bounds(torch.tensor([750.0]) / 1000, 4)[0].item() == 0.75


def test_time_to_index():
    t = torch.tensor([1.0, 0.75, 0.5, 0.001, 0.0])
    assert P.time_to_index(t).tolist() == [999, 749, 499, 0, 0]


def test_six_steps_over_four_windows():
    assert P.inference_timesteps(6, 4).tolist() == [999, 874, 749, 624, 499, 249]
    sched = PeRFlowScheduler()
    sched.set_timesteps(6)
    assert sched.timesteps.tolist() == [999, 874, 749, 624, 499, 249]
    assert P.inference_timesteps(4, 4).tolist() == [999, 749, 499, 249]
    assert P.inference_timesteps(8, 4).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    with pytest.raises(ValueError, match="at least one step per window"):
        sched.set_timesteps(3)


def _ddim_pair(n_s: int, n_e: int, shape=(3, 2, 4, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    return z0, eps, S.add_noise(z0, eps, ABAR[n_s]), S.add_noise(z0, eps, ABAR[n_e])


@pytest.mark.parametrize("t_s,t_e", [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)])
def test_an_exact_ddim_step_gives_target_eps(t_s, t_e):
    """z_e one exact DDIM jump from z_s with noise eps (both on the forward process) -> target = eps."""
    n_s, n_e = P.time_to_index(torch.tensor(t_s)), P.time_to_index(torch.tensor(t_e))
    z0, eps, z_s, z_e = _ddim_pair(int(n_s), int(n_e))
    assert torch.allclose(S.ddim_step(z_s, eps, ABAR[n_s], ABAR[n_e]), z_e, atol=1e-12)
    lambda_s, eta_s = P.window_coefficients(ABAR[n_s], ABAR[n_e])
    torch.testing.assert_close(P.ddim_eps_target(z_s, z_e, lambda_s, eta_s), eps, rtol=0, atol=1e-10)


def test_window_end_estimate_inverts_interpolation_and_target():
    """Eq 3 + Eq 4 solved for z_e by hand (z_s from the two linear equations) agrees, for any z_s, z_e."""
    g = torch.Generator().manual_seed(1)
    z_s, z_e = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0.999, 0.8, 0.6, 0.01], dtype=torch.float64)
    t_s, t_e = P.window_bounds(t, 4)
    lam, eta = P.window_coefficients(ABAR[P.time_to_index(t_s)], ABAR[P.time_to_index(t_e)])
    z_t, eps = P.interpolate(z_s, z_e, t, t_s, t_e), P.ddim_eps_target(z_s, z_e, lam, eta)
    torch.testing.assert_close(P.window_end_estimate(z_t, eps, t, t_s, t_e, lam, eta), z_e)
    r = ((t - t_s) / (t_e - t_s))[:, None]
    z_s_solved = (z_t - r * eta[:, None] * eps) / (1 - r + r * lam[:, None])
    torch.testing.assert_close(lam[:, None] * z_s_solved + eta[:, None] * eps, z_e)


@pytest.mark.parametrize("prediction_type", ["ddim_eps", "v_prediction"])
def test_scheduler_lands_on_every_window_end_given_the_true_eps(prediction_type):
    """Start at the forward process at t = 1; a model that outputs the true eps (as ddim_eps, or as v at
    the step's abar) makes every step land on the straight line, each window end exactly on z_e."""
    z0, eps, z, _ = _ddim_pair(999, 0, shape=(2, 3, 4, 4))
    sched = PeRFlowScheduler(prediction_type=prediction_type)
    sched.set_timesteps(6)
    for tau in sched.timesteps:
        out = eps
        if prediction_type == "v_prediction":
            out = S.eps_to_v(z, eps, ABAR[int(tau)])
        z = sched.step(out, tau, z).prev_sample
        t_next = sched.next_timestep(tau)
        if (t_next + 1) % 250 == 0:  # a window end: on the forward process there
            torch.testing.assert_close(z, S.add_noise(z0, eps, ABAR[max(t_next, 0)]), rtol=0, atol=1e-9)
    torch.testing.assert_close(z, S.add_noise(z0, eps, ABAR[0]), rtol=0, atol=1e-9)


def test_scheduler_step_matches_a_scalar_reference():
    """The step rule written out with Python floats, straight from SPEC, for every 6-step timestep."""
    sched = PeRFlowScheduler()
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    taus = sched.timesteps.tolist() + [-1]  # DDPM indices; -1 is t = 0
    for tau, tau_next in zip(taus[:-1], taus[1:]):
        t_c, t_next = (tau + 1) / T, (tau_next + 1) / T
        t_s, t_e = slow_window(t_c, 4)
        a_s, a_e = float(ABAR[round(t_s * T) - 1]), float(ABAR[max(round(t_e * T) - 1, 0)])
        lam, eta = math.sqrt(a_e / a_s), math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
        d = lam * (t_c - t_s) + (t_e - t_c)
        z_end = lam * (t_e - t_s) / d * z + eta * (t_e - t_c) / d * eps
        expected = z + (t_next - t_c) * (z_end - z) / (t_e - t_c)
        torch.testing.assert_close(sched.step(eps, tau, z).prev_sample, expected)


def test_scheduler_config_round_trips(tmp_path):
    sched = PeRFlowScheduler(num_time_windows=3, prediction_type="v_prediction")
    sched.save_config(tmp_path)
    again = PeRFlowScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(sched.config)
    again.set_timesteps(7)
    assert again.timesteps.tolist() == P.inference_timesteps(7, 3).tolist()
    assert isinstance(PeRFlowScheduler.from_config(sched.config), PeRFlowScheduler)


def test_scheduler_schedule_and_add_noise_match_diffusers():
    sched = PeRFlowScheduler()
    assert torch.equal(sched.alphas_cumprod, ABAR)  # the very float32 values diffusers trains and samples with
    x, n = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    taus = torch.tensor([999, 499, 0])  # DDPM indices
    torch.testing.assert_close(sched.add_noise(x, n, taus), S.add_noise(x, n, S.expand_like(ABAR[taus], x)))
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowScheduler(prediction_type="epsilon")


def test_solver_indices_are_even_in_time():
    t_s, t_e = torch.tensor([1.0, 0.25]), torch.tensor([0.75, 0.0])
    idx = P.solver_indices(t_s, t_e, 4)
    assert idx.tolist() == [[999, 937, 874, 811, 749], [249, 187, 124, 61, 0]]
    assert np.all(np.diff(idx.numpy(), axis=1) < 0)
