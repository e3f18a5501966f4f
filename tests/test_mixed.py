"""Mixed supervision (SPEC Eq 6-8 as pinned): the ground-truth loss weights and the mixed distiller."""
import pytest
import torch
from lightning.pytorch.cli import instantiate_class

from distillers.mixed import Adaptive, AdaptiveUnlimited, Fixed, MixedPeRFlow
from distillers.perflow import PeRFlow
from fada_lightning.diffusion import perflow as P
from fada_lightning.diffusion import schedule as S

from conftest import ExactNet, WobblyNet, random_latents


def test_the_adaptive_weight_rises_peaks_falls_and_dies():
    w = Adaptive()  # SPEC defaults: alpha 0.25, beta 0.2, R_p 30, R_d 100
    below = torch.tensor([0.0, 1.0, 5.0, 29.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(w(below), 0.2 * below**0.25)
    eps = 1e-9
    at_peak = w(torch.tensor([30.0 - eps, 30.0, 30.0 + eps], dtype=torch.float64))
    torch.testing.assert_close(at_peak, torch.full((3,), 0.2 * 30**0.25, dtype=torch.float64))  # continuous at R_p
    middle = torch.tensor([65.0], dtype=torch.float64)
    torch.testing.assert_close(w(middle), 0.2 * 30**0.25 * (100 - middle) / 70)
    assert torch.equal(w(torch.tensor([100.0, 100.5, 1e6])), torch.zeros(3))  # zero at and beyond R_d
    ratios = torch.linspace(0, 120, 1201, dtype=torch.float64)
    weights = w(ratios)
    assert weights.argmax() == 300 and (weights >= 0).all()


def test_the_unlimited_and_fixed_weights():
    unlimited = AdaptiveUnlimited(alpha=0.5, beta=0.2)
    ratios = torch.tensor([0.0, 4.0, 100.0, 1e6])
    torch.testing.assert_close(unlimited(ratios), torch.tensor([0.0, 0.4, 2.0, 200.0]))  # unbounded
    assert torch.equal(Fixed(0.2)(ratios), torch.full((4,), 0.2)) and torch.equal(Fixed(0.0)(ratios), torch.zeros(4))
    with pytest.raises(ValueError, match="r_peak"):
        Adaptive(r_peak=100, r_dead=30)


# ---- the mixed distiller -------------------------------------------------------------------------
def _mixed(**kwargs) -> MixedPeRFlow:
    distiller = MixedPeRFlow(**{"solver_steps": 2, **kwargs})
    distiller.bind(S.SD15_SCHEDULE, "v_prediction")
    return distiller


@pytest.mark.parametrize("mode", ["balanced", "guided"])
def test_the_ground_truth_half_lies_on_the_real_segment_and_its_target_is_eps(mode):
    distiller = _mixed(mode=mode)
    z0, cond, eps = random_latents(b=4)
    t = torch.tensor([1.0, 0.6, 0.3, 0.002])
    job = distiller.make_targets(WobblyNet(0.7), z0, cond, t, eps, torch.Generator().manual_seed(0))
    assert job.z.shape[0] == 8 and job.cond.ref.shape[0] == 8 and job.gt_mask.all()
    assert torch.equal(job.eps_target[4:], eps)  # exactly
    abar = S.alphas_cumprod(S.SD15_SCHEDULE).float()
    t_s, t_e = P.window_bounds(t, 4)
    z_s = S.add_noise(z0, eps, S.expand_like(abar[P.time_to_index(t_s)], z0))
    z_e = S.add_noise(z0, eps, S.expand_like(abar[P.time_to_index(t_e)], z0))
    torch.testing.assert_close(job.z[4:], P.interpolate(z_s, z_e, t, t_s, t_e))
    lam, eta = P.window_coefficients(abar[P.time_to_index(t_s)], abar[P.time_to_index(t_e)])
    torch.testing.assert_close(P.ddim_eps_target(z_s, z_e, lam, eta), eps, atol=2e-4, rtol=0)  # the identity it rests on
    if mode == "guided":  # the real clip is the conditional data: Eq 9 at s_r = s_a = 1
        assert torch.equal(job.cond.guidance[4:], torch.ones(4, 2))
        assert torch.equal(job.cond.guidance[:4], torch.tensor([[2.5, 6.5]] * 4))


def test_an_exact_teacher_makes_both_halves_agree():
    distiller = _mixed(solver_steps=4)
    z0, cond, eps = random_latents(b=3)
    job = distiller.make_targets(ExactNet(z0, "v_prediction"), z0, cond, torch.tensor([0.9, 0.5, 0.1]), eps)
    torch.testing.assert_close(job.z[:3], job.z[3:], atol=2e-5, rtol=0)
    torch.testing.assert_close(job.eps_target[:3], job.eps_target[3:], atol=5e-4, rtol=0)


def _exact_eps_prediction(job, offsets) -> torch.Tensor:
    """A v-prediction whose eps reading is the target plus `offsets` (2B,) per sample."""
    eps = job.eps_target + offsets.reshape(-1, 1, 1, 1, 1)
    return S.from_eps(eps, job.z, S.expand_like(job.abar, job.z), "v_prediction")


def test_the_ratio_is_per_sample_and_carries_no_gradient():
    distiller = _mixed(gt_weight=AdaptiveUnlimited(alpha=0.5, beta=0.2))
    z0, cond, eps = random_latents(b=3)
    job = distiller.make_targets(WobblyNet(0.7), z0, cond, torch.tensor([0.9, 0.5, 0.1]), eps)
    offsets = torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0, 6.0])  # L_distill (1, 1, 4), L_gt (4, 1, 36)
    pred = _exact_eps_prediction(job, offsets).requires_grad_(True)
    loss, logs = distiller.loss(pred, job)
    torch.testing.assert_close(logs["gt/ratio"], torch.tensor([4.0, 1.0, 9.0]))
    weight = 0.2 * torch.tensor([4.0, 1.0, 9.0]) ** 0.5
    torch.testing.assert_close(logs["gt/weight"], weight)
    torch.testing.assert_close(loss, (torch.tensor([1.0, 1.0, 4.0]) + weight * torch.tensor([4.0, 1.0, 36.0])).mean())
    assert not logs["gt/ratio"].requires_grad and not logs["gt/weight"].requires_grad

    def held_constant(p):  # the same loss with w a constant: R contributes no gradient
        e = (distiller.to_eps(p, job.z, job.abar) - job.eps_target).pow(2).flatten(1).mean(1)
        return (e[:3] + weight * e[3:]).mean()

    (grad,) = torch.autograd.grad(loss, pred)
    (expected,) = torch.autograd.grad(held_constant(pred), pred)
    torch.testing.assert_close(grad, expected)


def test_the_held_out_loss_is_perflow_s_whatever_the_ground_truth_weight():
    """A plateau budget watches the same quantity in every Table 3 row: the distillation half's loss."""
    z0, cond, eps = random_latents(b=3)
    t, teacher, student = torch.tensor([0.9, 0.5, 0.1]), WobblyNet(0.7), WobblyNet(0.3)
    plain = PeRFlow(solver_steps=2)
    plain.bind(S.SD15_SCHEDULE, "v_prediction")
    expected = plain.held_out_loss(student, plain.make_targets(teacher, z0, cond, t, eps, torch.Generator().manual_seed(0)))
    for weight in (Fixed(0.0), Fixed(1.0), AdaptiveUnlimited(alpha=0.5, beta=0.2)):
        mixed = _mixed(gt_weight=weight)
        job = mixed.make_targets(teacher, z0, cond, t, eps, torch.Generator().manual_seed(0))
        torch.testing.assert_close(mixed.held_out_loss(student, job), expected)
    assert float(mixed.student_loss(student, job)[0]) > float(expected) * 1.1  # training still adds w L_gt


def test_gt_tiers_choose_which_clips_get_the_ground_truth_loss():
    distiller = _mixed(gt_weight=Fixed(0.5), gt_tiers=["lenient"])
    z0, cond, eps = random_latents(b=4)
    tiers = ["strict", "lenient", "lenient", "strict"]
    job = distiller.make_targets(WobblyNet(0.7), z0, cond, torch.tensor([0.9, 0.5, 0.1, 0.7]), eps, tiers=tiers)
    assert job.gt_mask.tolist() == [False, True, True, False]
    pred = _exact_eps_prediction(job, torch.ones(8)).requires_grad_(True)
    loss, logs = distiller.loss(pred, job)
    torch.testing.assert_close(loss, torch.tensor(1.0 + 0.5 / 2))  # L_d = 1 each; GT (w 0.5) on half
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad[4].abs().sum() == 0 and grad[7].abs().sum() == 0 and grad[5].abs().sum() > 0
    assert logs["gt/weight"].tolist() == [0.5, 0.5] and logs["gt/weight_lenient"] == 0.5
    assert "gt/weight_strict" not in logs
    with pytest.raises(ValueError, match="tier"):
        distiller.make_targets(WobblyNet(0.7), z0, cond, torch.tensor([0.9, 0.5, 0.1, 0.7]), eps)


def test_the_mixed_distiller_rebuilds_from_its_spec():
    distiller = _mixed(gt_weight=Adaptive(alpha=0.5), gt_tiers=["lenient"], num_windows=2)
    spec = distiller.spec()
    assert spec["init_args"]["gt_weight"] == {"class_path": "distillers.mixed.Adaptive",
                                             "init_args": {"alpha": 0.5, "beta": 0.2, "r_peak": 30.0, "r_dead": 100.0}}
    rebuilt = instantiate_class((), spec)
    assert isinstance(rebuilt.gt_weight, Adaptive) and rebuilt.gt_weight.alpha == 0.5
    assert rebuilt.gt_tiers == ("lenient",) and rebuilt.num_windows == 2
    assert isinstance(MixedPeRFlow().gt_weight, Adaptive)  # SPEC's default
