"""Does a student told the CFG scales (Eq 10) move with them as its teacher's Eq 9 does?

    python bench/cfg_scale_response.py runs/ablation/cfg_sweep/FADA-Fast/seed0/tb/run/checkpoints/best.ckpt \
        [--teacher TEACHER.ckpt (default: the one it was distilled from)] [--clips 10]

On the same held-out clips and noise, for s_r 1 -> 3 (s_a 6.5) and s_a 1 -> 6.5 (s_r 2):
- the distillation target of one clip window (the student's distiller on its teacher, real motion
  frames) at t = 0.95 .. 0.2: how far the target moves (mean |d eps|), how far the student's output
  moves on the same input told the other scale, the cosine between the two moves (1: the student
  moves the teacher's way), and the student's error (mean |eps - target|) at each scale on its own
  window; and the cosine of each move to G, the target's mean guidance effect
  (target at s_r 2, s_a 5, the middle of the training ranges, minus at 1, 1: the conditional output);
- the sampled frames: mean |d pixel| between the two scales' videos, the student's and the teacher's;
- with --neighbours instead: how far the student's sampled videos move between nearby scales, beside
  how alike the scale codes of LCM's embedding (time embedding, CFG layer) are for them;
- for FADA's tokens, their norms and cos(T_r - T_0, T_ar - T_r), the directions s_r and s_a move e_cfg,
  and how far training moved them from their random draw (rebuilt from the run's config.yaml and seed).
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule, LightningModule
from torch.nn.functional import cosine_similarity
from torch.utils.data import DataLoader

from fada_lightning.cli import FadaCLI, FadaParser
from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.evaluate import eval_clips, run_dir
from fada_lightning.models.cfg import scale_embedding
from fada_lightning.sample import load_module

CHANGES = {"s_r 1 -> 3 (s_a 6.5)": ((1.0, 6.5), (3.0, 6.5)), "s_a 1 -> 6.5 (s_r 2)": ((2.0, 1.0), (2.0, 6.5))}
MEAN_SCALES = (2.0, 5.0)  # the middle of distill_fada_fast.yaml's ranges
TIMES = (0.95, 0.7, 0.45, 0.2)
NEIGHBOURS = {"s_a 4 -> 4.5 (s_r 2)": ((2.0, 4.0), (2.0, 4.5)), "s_a 4 -> 8 (s_r 2)": ((2.0, 4.0), (2.0, 8.0)),
              "s_r 2 -> 2.5 (s_a 6.5)": ((2.0, 6.5), (2.5, 6.5))}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return cosine_similarity(a, b, dim=0).item()


def token_directions(net) -> str:
    tokens = getattr(net, "cfg_embedding", None)
    if tokens is None or not hasattr(tokens, "uncond"):
        return "no tokens (not layer_tokens)"
    to_ref, to_full = (tokens.ref - tokens.uncond).flatten(), (tokens.full - tokens.ref).flatten()
    return (f"|T_0| {tokens.uncond.norm():.3f}, |T_r - T_0| {to_ref.norm():.3f}, |T_ar - T_r| {to_full.norm():.3f}, "
            f"cos(T_r - T_0, T_ar - T_r) {cos(to_ref, to_full):.3f}")


def initial_tokens(ckpt: str):
    """The tokens `fada fit` drew before training `ckpt`: the student rebuilt from its run's config.yaml
    under the same seed (None without that file)."""
    config = run_dir(Path(ckpt)) / "config.yaml"
    if not config.is_file():
        return None
    fit_config = yaml.safe_load(config.read_text())
    for key in ("ckpt_path", "weights_only"):  # fit's own options, not the classes'
        fit_config.pop(key, None)
    fit_config["trainer"].update(logger=False, callbacks=None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(fit_config, f)
        cli = FadaCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      run=False, args=["--config", f.name], parser_class=FadaParser, auto_configure_optimizers=False)
    return cli.model.sampling_net.cfg_embedding


def token_moves(init, trained) -> str:
    """How far training moved each of Eq 10's directions from its draw, against its size."""
    moves = []
    for name, (a, b) in {"T_r - T_0": ("ref", "uncond"), "T_ar - T_r": ("full", "ref")}.items():
        drawn, now = (getattr(t, a).detach() - getattr(t, b).detach() for t in (init, trained))
        moves.append(f"{name} by {(now - drawn).norm():.3f} of {drawn.norm():.3f} (cosine {cos(drawn.flatten(), now.flatten()):.3f})")
    return "moved from the draw: " + ", ".join(moves)


@torch.no_grad()
def window_job(student, teacher, batch: dict, scales, t_value: float):
    """The distillation job of one clip window at time t and scales (s_r, s_a): the target the student's
    distiller makes from `teacher` (the network it was distilled from), real motion frames, the same
    noise for every call. A mixed distiller's ground-truth half is dropped."""
    distiller = student.distiller
    f, m = student.hparams.clip_frames, student.hparams.motion_frames
    frames = student.codec.encode(batch["frames"].flatten(0, 1)).unflatten(0, batch["frames"].shape[:2])
    z0 = frames[:, m:m + f]
    cond = Conditions(ref=student.codec.encode(batch["ref"]), motion=frames[:, :m], audio=batch["audio"][:, m:m + f])
    b, t = z0.shape[0], torch.full((z0.shape[0],), t_value)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    distiller.ref_scale, distiller.audio_scale = scales
    job = distiller.make_targets(teacher, z0, cond, t, eps, torch.Generator().manual_seed(2))
    return replace(job, **{k: getattr(job, k)[:b] for k in ("z", "timestep", "eps_target", "abar")},
                   cond=job.cond.map(lambda x: x[:b]))


@torch.no_grad()
def student_eps(student, job, scales) -> torch.Tensor:
    """The student's output, read as eps, on `job`'s input told `scales`, flattened."""
    pred = student.sampling_net(job.z, job.timestep, job.cond.with_guidance(*scales))
    return student.distiller.to_eps(pred.float(), job.z, job.abar).flatten()


def moves(student, jobs: dict, low, high):
    """(the target's move, the student's move, the student's error at `low`), flattened: the student on one
    input (the lower scale's window) told each scale, so its move is what the scale alone does (each
    scale's own input would add the input's change, read as eps, to the move)."""
    at_low = student_eps(student, jobs[low], low)
    d_target = (jobs[high].eps_target - jobs[low].eps_target).flatten()
    return d_target, student_eps(student, jobs[low], high) - at_low, eps_error(at_low, jobs[low])


def eps_error(eps: torch.Tensor, job) -> torch.Tensor:
    """Mean |eps - target eps| on `job`'s window (`eps`: the student's, flattened, told the job's scales)."""
    return (eps - job.eps_target.flatten()).abs().mean()


@torch.no_grad()
def sample_move(module, batch: dict, low, high) -> float:
    videos = [module.generate(batch["ref"], batch["audio"], None, *scales, generator=torch.Generator().manual_seed(0))[0]
              for scales in (low, high)]
    return (videos[1] - videos[0]).abs().mean().item()


def code_cosine(low, high) -> float:
    """Cosine between the codes (`scale_embedding`) of two scale pairs, over the changed scales' halves."""
    changed = [i for i in range(2) if low[i] != high[i]] or [0, 1]
    return cos(*(scale_embedding(torch.tensor([scales]))[0].view(2, -1)[changed].flatten() for scales in (low, high)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a student that takes the scales (cfg_conditioning other than none)")
    p.add_argument("--teacher", help="the teacher's checkpoint, for the targets and its samples (default: the student's teacher_ckpt)")
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--frames", type=int, default=24, help="frames sampled per clip (the targets use one window)")
    p.add_argument("--data", default="data/synthetic", help="the synthetic world's root (its test split)")
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                   help="also sample both scales' videos, the student's and the teacher's (minutes: 75 NFE)")
    p.add_argument("--neighbours", action="store_true",
                   help="only the student's sampled move between nearby scales, beside their codes' cosine")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    student = load_module(args.ckpt).eval()
    if not student.sampling_net.takes_guidance:
        raise SystemExit(f"{args.ckpt}: cfg_conditioning 'none', the student is not told the scales")
    dataset, _ = eval_clips(student, args.clips, args.frames, None, {"root": args.data})
    batch = next(iter(DataLoader(dataset, batch_size=args.clips)))
    print(f"{args.ckpt}: {student.hparams.cfg_conditioning}; {token_directions(student.sampling_net)}")
    tokens = getattr(student.sampling_net, "cfg_embedding", None)
    if hasattr(tokens, "uncond") and (drawn := initial_tokens(args.ckpt)) is not None:
        print(f"tokens {token_moves(drawn, tokens)}", flush=True)
    if args.neighbours:
        print(f"sampled frames ({args.frames} a clip): mean |d pixel| in [-1, 1] between nearby scales' videos; "
              "cosine of the changed scale's codes (LCM's embedding of 1000 s)")
        for name, (low, high) in NEIGHBOURS.items():
            print(f"{name:24s} student {sample_move(student, batch, low, high):.4f}, "
                  f"code cosine {code_cosine(low, high):.2f}", flush=True)
        return
    # the teacher's sampling network, which `load_teacher` distils from (not load_teacher itself: it
    # starts the student over as the teacher's copy)
    teacher = load_module(args.teacher or student.hparams.teacher_ckpt).eval()
    print(f"{args.clips} held-out clips; target and student moves: mean |d eps| of one clip window")
    print(f"{'change':22s} {'t':>5s} {'target':>8s} {'student':>8s} {'cosine':>7s} {'error':>8s} {'at high':>8s}")
    for t in TIMES:
        jobs = {scales: window_job(student, teacher.sampling_net, batch, scales, t)
                for scales in {*sum(CHANGES.values(), ()), (1.0, 1.0), MEAN_SCALES}}
        target = {scales: job.eps_target.flatten() for scales, job in jobs.items()}
        guidance = target[MEAN_SCALES] - target[1.0, 1.0]  # G
        line = []
        for name, (low, high) in CHANGES.items():
            d_target, d_student, error = moves(student, jobs, low, high)
            print(f"{name:22s} {t:5.2f} {d_target.abs().mean():8.4f} {d_student.abs().mean():8.4f} "
                  f"{cos(d_target, d_student):7.2f} {error:8.4f} {eps_error(student_eps(student, jobs[high], high), jobs[high]):8.4f}", flush=True)
            line.append(f"{name.split()[0]}: target {cos(d_target, guidance):.2f}, student {cos(d_student, guidance):.2f}")
        print(f"{'':22s} {t:5.2f} cosine of the moves to G: {'; '.join(line)}", flush=True)
    if not args.samples:
        return
    print(f"sampled frames ({args.frames} a clip): mean |d pixel| in [-1, 1] between the two scales' videos")
    for name, (low, high) in CHANGES.items():
        print(f"{name:22s} student {sample_move(student, batch, low, high):.4f}, "
              f"teacher {sample_move(teacher, batch, low, high):.4f}", flush=True)


if __name__ == "__main__":
    main()
