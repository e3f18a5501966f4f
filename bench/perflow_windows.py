"""Where a PeRFlow student's frames lose quality: its sampler against exact-teacher oracles, window by window.

    python bench/perflow_windows.py --teacher TEACHER.ckpt --student PERFLOW.ckpt [--clips 50]

Every model samples the same held-out clips (the synthetic world's test split) from the same noise, and
is scored with `fada evaluate`'s metrics:
  teacher           the teacher's own sampler: 25 DDIM steps x Eq 9 (75 NFE), its last step to abar_0
                    (SD1.5's set_alpha_to_one=False: a residual noise of std sqrt(1 - abar_0) = 0.029)
  teacher, to x0    the same with the last step to abar = 1 (the clean estimate; set_alpha_to_one=True)
  oracle, guided    the PeRFlow sampler (its steps over 4 windows) fed the window end of the teacher's
                    guided DDIM solve (8 steps of Eq 9) from where it stands: a perfect guided student
  oracle, balanced  the same with each CFG branch solved unguided and Eq 9 applied to the window ends,
                    as a balanced-mode student samples: what combining CFG over a whole window costs
  student @ n       the student with n sampler steps
and, along the balanced oracle's trajectory, the student's window-end error at each step:
mean |z_e(student) - z_e(oracle)|^2 per latent element, beside the jump's own size mean |z_e - z|^2.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from fada_lightning.diffusion import perflow as P
from fada_lightning.diffusion import schedule as S
from fada_lightning.diffusion.guidance import Conditions, cfg_conditions, multi_cfg
from fada_lightning.diffusion.sampling import conditional_denoiser, generate_clips, guided_denoiser
from fada_lightning.diffusion.scheduling_perflow import PeRFlowScheduler
from fada_lightning.evaluate import VideoEvaluator, eval_clips
from fada_lightning.metrics import synthetic
from fada_lightning.sample import load_module


def end_coefficients(t: torch.Tensor, num_windows: int, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda_t, eta_t) (B,) of the PeRFlow step rule at t (B,) float64: z_e_hat = lambda_t z + eta_t eps."""
    t_s, t_e = P.window_bounds(t, num_windows)
    lambda_s, eta_s = P.window_coefficients(abar[P.time_to_index(t_s)], abar[P.time_to_index(t_e)])
    d = lambda_s * (t - t_s) + (t_e - t)
    return lambda_s * (t_e - t_s) / d, eta_s * (t_e - t) / d


def window_end(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, num_windows: int, abar: torch.Tensor):
    """The PeRFlow step rule's window end z_e_hat from (z, t) and a ddim_eps; z, eps (B, ...)."""
    lambda_t, eta_t = end_coefficients(t, num_windows, abar)
    return S.expand_like(lambda_t, z) * z + S.expand_like(eta_t, z) * eps


def eps_landing_on(z: torch.Tensor, z_e: torch.Tensor, t: torch.Tensor, num_windows: int, abar: torch.Tensor):
    """The ddim_eps whose PeRFlow step from (z, t) lands on z_e: `window_end` solved for eps."""
    lambda_t, eta_t = end_coefficients(t, num_windows, abar)
    return (z_e - S.expand_like(lambda_t, z) * z) / S.expand_like(eta_t, z)


class WindowOracle(nn.Module):
    """Stands in for a PeRFlow student whose output is read as `ddim_eps`: at (z, tau) it solves the teacher's
    DDIM for `solver_steps` steps from n(t) to t's window end and answers the eps that lands there.
    scales None: one conditional pass a solver step (each CFG branch alone when the sampler batches the
    three, as for a balanced student); (s_r, s_a): Eq 9 at every solver step (a guided student)."""

    takes_guidance = False

    def __init__(self, teacher: nn.Module, prediction_type: str, abar: torch.Tensor, num_windows: int = 4,
                 solver_steps: int = 8, scales: tuple[float, float] | None = None):
        super().__init__()
        self.teacher, self.prediction_type, self.abar = teacher, prediction_type, abar.double()
        self.num_windows, self.solver_steps, self.scales = num_windows, solver_steps, scales

    def encode_reference(self, cond: Conditions) -> Conditions:
        return cond  # the teacher's bank is made in each call, for the conditions it is given

    def forward(self, z: torch.Tensor, tau, cond: Conditions, reference=None) -> torch.Tensor:
        t = P.timestep_to_time(torch.as_tensor(tau, dtype=torch.float64).expand(len(z)))
        _, t_e = P.window_bounds(t, self.num_windows)
        denoise = conditional_denoiser(self.teacher, cond) if self.scales is None else \
            guided_denoiser(self.teacher, cond, *self.scales)
        indices = P.solver_indices(t, t_e, self.solver_steps)  # (B, N + 1), from n(t) to n(t_e)
        z_e = z
        for n, n_next in zip(indices.unbind(1)[:-1], indices.unbind(1)[1:]):
            abar_n, abar_next = (S.expand_like(self.abar[i].float(), z) for i in (n, n_next))
            eps = S.to_eps(denoise(z_e, n), z_e, abar_n, self.prediction_type)
            z_e = S.ddim_step(z_e, eps, abar_n, abar_next)
        return eps_landing_on(z, z_e, t, self.num_windows, self.abar).to(z.dtype)


@torch.no_grad()
def window_errors(student: nn.Module, student_type: str, oracle: WindowOracle, cond: Conditions, noise: torch.Tensor,
                  scheduler: PeRFlowScheduler, steps: int, scales: tuple[float, float]) -> list[tuple[int, float, float]]:
    """Along the balanced oracle's trajectory from `noise` (one clip window), at each sampler step:
    (timestep, mean |z_e(student) - z_e(oracle)|^2, mean |z_e(oracle) - z|^2), both Eq 9-combined."""
    scheduler.set_timesteps(steps)
    cond3, abar, k = cfg_conditions(cond), oracle.abar, oracle.num_windows
    bank = student.encode_reference(cond3)
    rows, z = [], noise
    for tau in scheduler.timesteps:
        t = P.timestep_to_time(torch.full((len(z),), float(tau), dtype=torch.float64))
        z3, tau3 = z.repeat(3, *([1] * (z.ndim - 1))), torch.full((3 * len(z),), int(tau))
        eps_oracle = multi_cfg(oracle(z3, tau3, cond3), *scales)
        abar_t = S.expand_like(abar[P.time_to_index(t.repeat(3))].float(), z3)
        eps_student = multi_cfg(S.to_eps(student(z3, tau3, cond3, reference=bank), z3, abar_t, student_type), *scales)
        end_oracle, end_student = window_end(z, eps_oracle, t, k, abar), window_end(z, eps_student, t, k, abar)
        rows.append((int(tau), float((end_student - end_oracle).square().mean()), float((end_oracle - z).square().mean())))
        z = scheduler.step(eps_oracle, tau, z).prev_sample
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="a PeRFlow student (distill_perflow.yaml) of --teacher")
    p.add_argument("--clips", type=int, default=50)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--student-steps", type=int, nargs="+", default=[6, 8, 12])
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out (teacher, 'oracle, guided', ...)")
    args = p.parse_args(argv)

    teacher, student = load_module(args.teacher).eval(), load_module(args.student).eval()
    distiller, hp = student.distiller, teacher.hparams
    scales = (hp.ref_scale, hp.audio_scale)
    abar = teacher.alphas_cumprod.double()
    teacher_net, student_net = teacher.sampling_net, student.sampling_net
    k, n = distiller.num_windows, distiller.solver_steps
    oracle_scheduler = PeRFlowScheduler(num_time_windows=k, prediction_type="ddim_eps", **distiller.schedule_config)
    samplers = {  # name -> (net, scheduler, steps, scales)
        "teacher": (teacher_net, teacher.scheduler(), hp.sample_steps, scales),
        "teacher, to x0": (teacher_net, S.ddim_scheduler(hp.prediction_type, {**teacher.schedule, "set_alpha_to_one": True}),
                           hp.sample_steps, scales),
        "oracle, guided": (WindowOracle(teacher_net, hp.prediction_type, abar, k, n, scales), oracle_scheduler,
                           distiller.sample_steps, (None, None)),
        "oracle, balanced": (WindowOracle(teacher_net, hp.prediction_type, abar, k, n), oracle_scheduler,
                             distiller.sample_steps, scales),
        **{f"student @ {s}": (student_net, student.scheduler(), s, scales) for s in args.student_steps},
    }
    samplers = {name: v for name, v in samplers.items() if name not in args.skip}
    evaluator = VideoEvaluator(*(getattr(synthetic, role)() for role in
                                 ("WorldFrames", "WorldVideo", "WorldExpression", "WorldQuality", "WorldSync")))
    dataset, _ = eval_clips(teacher, args.clips, args.frames, None, {"root": "data/synthetic"})
    batches = list(DataLoader(dataset, batch_size=args.batch_size, shuffle=False))
    print(f"{len(dataset)} held-out clips x {args.frames} frames; teacher {args.teacher}, student {args.student} "
          f"({k} windows, solver {n} steps, mode {distiller.mode})")
    print(f"{'sampler':<18} {'steps':>5} {'seconds':>8} {'IQA':>7} {'Sync-D':>7} {'FVD':>7} {'FID':>7} {'E-FID':>7}")
    for name, (net, scheduler, steps, (s_r, s_a)) in samplers.items():
        evaluator.reset()
        began = time.perf_counter()
        for index, batch in enumerate(batches):
            g = torch.Generator().manual_seed(index)  # the same noise for every sampler
            ref = teacher.codec.encode(batch["ref"])
            latents, _ = generate_clips(net, scheduler, ref, batch["audio"], hp.clip_frames, hp.motion_frames, steps,
                                        s_r, s_a, generator=g)
            video = teacher.codec.decode(latents.flatten(0, 1)).unflatten(0, latents.shape[:2]).clamp(-1, 1)
            evaluator.update(video, batch["frames"], batch["wav"])
        m = evaluator.compute()
        print(f"{name:<18} {steps:>5} {time.perf_counter() - began:>8.1f} {m['IQA']:>7.4f} {m['Sync-D']:>7.4f} "
              f"{m['FVD']:>7.3f} {m['FID']:>7.3f} {m['E-FID']:>7.4f}", flush=True)
    print("ground truth       IQA {IQA:.4f}  Sync-D {Sync-D:.4f}".format(**m["ground_truth"]))

    # the student's window-end error along the balanced oracle's path (first clip window of each batch)
    totals: dict[int, list[float]] = {}
    oracle = samplers.get("oracle, balanced", (WindowOracle(teacher_net, hp.prediction_type, abar, k, n),))[0]
    for index, batch in enumerate(batches):
        g = torch.Generator().manual_seed(index)
        ref = teacher.codec.encode(batch["ref"])
        motion = ref[:, None].expand(-1, hp.motion_frames, -1, -1, -1)
        cond = Conditions(ref=ref, motion=motion, audio=batch["audio"][:, :hp.clip_frames])
        noise = torch.randn((len(ref), hp.clip_frames, *ref.shape[1:]), generator=g)
        for tau, error, jump in window_errors(student_net, hp.prediction_type, oracle, cond, noise,
                                              PeRFlowScheduler(num_time_windows=k, **distiller.schedule_config),
                                              distiller.sample_steps, scales):
            totals.setdefault(tau, []).append((error, jump))
    print(f"\nthe student's window-end error along the balanced oracle's path ({distiller.sample_steps} steps):")
    print(f"{'timestep':>8} {'window':>12} {'error':>10} {'jump':>10} {'error/jump':>10}")
    for tau, pairs in totals.items():
        t = P.timestep_to_time(torch.tensor(float(tau), dtype=torch.float64))
        t_s, t_e = P.window_bounds(t, k)
        error, jump = (sum(v) / len(v) for v in zip(*pairs))
        print(f"{tau:>8} {f'({float(t_e):.2f}, {float(t_s):.2f}]':>12} {error:>10.5f} {jump:>10.5f} {error / jump:>10.4f}")


if __name__ == "__main__":
    main()
