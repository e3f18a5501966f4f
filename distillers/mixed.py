"""Mixed supervision (SPEC section 3, Eq 6-8): PeRFlow plus a ground-truth loss, weighted per sample.

For t in the window (t_e, t_s] with z_s = add_noise(z0, eps, n(t_s)):
    distillation half  z_e = the teacher's DDIM solve from z_s          (PeRFlow)
    ground-truth half  z_e = add_noise(z0, eps, n(t_e)): the real clip's end point with the same eps,
                       so one DDIM jump z_s -> z_e has exactly eps as its noise and the target is eps
Both halves go through the student as one (2B) batch. Per sample, R = L_gt / L_distill (no gradient)
and L = L_distill + w(R) L_gt, where w applies only to the tiers in `gt_tiers` (all by default).
The published w is not readable, so the adaptive form below is our reading of the text (SPEC), and
every weight is a small swappable class named by `class_path`:

    Fixed(x)                                 w = x
    AdaptiveUnlimited(alpha, beta)           w = beta R^alpha
    Adaptive(alpha, beta, r_peak, r_dead)    w = beta R^alpha                                R <= R_p
                                             w = beta R_p^alpha (R_d - R) / (R_d - R_p)     R_p < R < R_d
                                             w = 0                                           R >= R_d
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from lightning.pytorch.cli import instantiate_class

from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions

from .base import DistillTargets
from .perflow import PeRFlow


class GTWeight:
    """w(R) for a (B,) tensor of loss ratios R >= 0 -> (B,) weights. A subclass keeps each
    constructor argument as the attribute of the same name (`spec` records them)."""

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        args = [k for k in inspect.signature(type(self).__init__).parameters if k != "self"]
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {k: getattr(self, k) for k in args}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.spec()['init_args'].items())})"


class Fixed(GTWeight):
    def __init__(self, weight: float = 0.2):
        self.weight = weight

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return torch.full_like(ratio, self.weight)


class AdaptiveUnlimited(GTWeight):
    def __init__(self, alpha: float = 0.25, beta: float = 0.2):
        self.alpha, self.beta = alpha, beta

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        return self.beta * ratio.clamp(min=0) ** self.alpha


class Adaptive(AdaptiveUnlimited):
    def __init__(self, alpha: float = 0.25, beta: float = 0.2, r_peak: float = 30.0, r_dead: float = 100.0):
        super().__init__(alpha, beta)
        if not 0 < r_peak < r_dead:
            raise ValueError(f"Adaptive needs 0 < r_peak < r_dead, got r_peak {r_peak}, r_dead {r_dead}")
        self.r_peak, self.r_dead = r_peak, r_dead

    def __call__(self, ratio: torch.Tensor) -> torch.Tensor:
        peak = self.beta * self.r_peak**self.alpha
        falling = peak * (self.r_dead - ratio) / (self.r_dead - self.r_peak)  # linear from the peak to 0 at R_d
        rising = super().__call__(ratio)
        return torch.where(ratio <= self.r_peak, rising, falling.clamp(min=0))


@dataclass
class MixedTargets(DistillTargets):
    """A (2B) batch: rows [:B] the distillation targets, rows [B:] the ground-truth ones."""

    gt_mask: torch.Tensor | None = None  # (B,) True where the clip's tier takes the ground-truth loss
    tiers: tuple[str, ...] | None = None  # (B,) the clips' tiers, for the logs


class MixedPeRFlow(PeRFlow):
    """PeRFlow + the ground-truth loss with a per-sample weight w(R) (module docstring).

    gt_weight: a GTWeight (YAML: {class_path: distillers.mixed.Fixed, init_args: {weight: 0.2}});
    default Adaptive() with SPEC's alpha 0.25, beta 0.2, R_p 30, R_d 100.
    gt_tiers: the data tiers whose clips get the ground-truth loss (None: every clip).
    **kwargs: PeRFlow's arguments (windows, solver steps, the CFG teacher).
    In guided mode the ground-truth half is the plain conditional data (Eq 9 at s_r = s_a = 1), so
    a student that takes CFG scales as input sees (1, 1) there (our reading; SPEC is silent).
    """

    def __init__(self, gt_weight: GTWeight | None = None, gt_tiers: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(gt_weight, dict):  # a checkpoint's spec
            gt_weight = instantiate_class((), gt_weight)
        self.gt_weight = Adaptive() if gt_weight is None else gt_weight
        if not isinstance(self.gt_weight, GTWeight):
            raise TypeError(f"gt_weight must be a distillers.mixed.GTWeight, got {type(self.gt_weight).__name__}")
        self.gt_tiers = None if gt_tiers is None else tuple(gt_tiers)
        self.hparams.update(gt_weight=self.gt_weight.spec(), gt_tiers=gt_tiers)  # plain data in checkpoints

    def gt_mask(self, tiers: list[str] | None, batch_size: int, device) -> torch.Tensor:
        if self.gt_tiers is None:
            return torch.ones(batch_size, dtype=torch.bool, device=device)
        if tiers is None:
            raise ValueError(f"gt_tiers {list(self.gt_tiers)} needs each clip's tier: the batch has no 'tier'")
        return torch.tensor([tier in self.gt_tiers for tier in tiers], device=device)

    def make_targets(self, teacher, z0, cond, t, eps, generator=None, tiers=None) -> MixedTargets:
        distill = super().make_targets(teacher, z0, cond, t, eps, generator, tiers)
        _, _, n_s, n_e = self.window(t)
        z_s, z_e = S.add_noise(z0, eps, self.abar(n_s, z0)), S.add_noise(z0, eps, self.abar(n_e, z0))
        gt_cond = distill.cond if distill.cond.guidance is None else distill.cond.with_guidance(1.0, 1.0)
        gt = replace(self.segment_targets(z_s, z_e, t, gt_cond), eps_target=eps)  # Eq 4 of this segment is eps
        both = {f: torch.cat([getattr(distill, f), getattr(gt, f)])
                for f in ("z", "timestep", "eps_target", "abar", "weight")}
        return MixedTargets(**both, cond=Conditions.cat([distill.cond, gt_cond]),
                            gt_mask=self.gt_mask(tiers, len(t), z0.device),
                            tiers=None if tiers is None else tuple(tiers))

    def held_out_loss(self, student, job: MixedTargets) -> torch.Tensor:
        """The distillation half alone, PeRFlow's loss: the quantity a `Plateau` budget watches is then the
        same in every row whatever w(R). With w(R) L_gt in, the value is mostly the ground-truth half's
        (its target is one draw of eps, not a mean: R stays near 10 in the micro runs), and the budget
        would stop each row on how fast it fits the data rather than the teacher."""
        return self.student_loss(student, job)[1]["loss_distill"]

    def loss(self, pred: torch.Tensor, job: MixedTargets) -> tuple[torch.Tensor, dict]:
        """mean_B [L_distill + w(R) L_gt] with R = L_gt / L_distill per sample, detached.
        Logs the means and (B,) tensors (histograms) of R and w over the clips that take the GT loss."""
        l_distill, l_gt = (job.weight * self.eps_error(pred, job)).chunk(2)  # (B,) each
        ratio = (l_gt / l_distill.clamp(min=torch.finfo(l_distill.dtype).tiny)).detach()
        weight = self.gt_weight(ratio) * job.gt_mask
        logs = {"loss_distill": l_distill.mean().detach(), "loss_gt": l_gt.mean().detach()}
        taken = job.gt_mask
        if taken.any():
            logs.update({"gt/ratio": ratio[taken], "gt/weight": weight[taken],
                         "gt/dropped": (weight[taken] == 0).float().mean()})
        for tier in sorted(set(job.tiers or ())):
            mine = torch.tensor([t == tier for t in job.tiers], device=ratio.device) & taken
            if mine.any():
                logs[f"gt/weight_{tier}"] = weight[mine].mean()
        return (l_distill + weight * l_gt).mean(), logs
